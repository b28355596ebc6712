"""Corpus histograms and quantiles: one lazy pass, equal to numpy on the computed values."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import nasar_zarr  # noqa: F401  (registers ds.nasar)
from nasar_zarr import stats
from nasar_zarr.testing.dask import raise_if_dask_computes


@pytest.fixture(scope="module")
def log_rtc(cube):
    """Per pol: the valid log1p(20 x) values (missing polarizations and NaN left out)."""
    rtc = cube["rtc"].values.astype(np.float32)
    present = cube["rtc_present"].values
    values = np.log1p(np.float32(20.0) * rtc)
    out = {}
    for p, pol in enumerate(("co", "cross")):
        v = values[:, :, :, p]
        mask = np.broadcast_to(present[:, :, :, p, None, None], v.shape) & np.isfinite(v)
        out[pol] = v[mask]
    return out


def test_histogram_is_lazy_and_equals_numpy(cube, log_rtc):
    with raise_if_dask_computes():
        counts = cube.nasar.histogram(bins=50, range=(0.0, 4.0))
    assert isinstance(counts.data, da.Array)
    assert counts.dims == ("pol", "bin")
    assert list(counts["pol"].values) == ["co", "cross"]
    computed = counts.compute()
    for pol in ("co", "cross"):
        want, edges = np.histogram(log_rtc[pol], bins=50, range=(0.0, 4.0))
        np.testing.assert_array_equal(computed.sel(pol=pol).values, want)
        np.testing.assert_allclose(computed["bin_lower"].values, edges[:-1])
        np.testing.assert_allclose(computed["bin_upper"].values, edges[1:])
    # Missing cross-pol channels are left out: fewer cross-pol values than co-pol.
    assert computed.sel(pol="cross").sum() < computed.sel(pol="co").sum()
    assert computed.attrs["transform"] == "log1p20"


def test_histogram_one_task_per_chunk(cube):
    counts = cube.nasar.histogram(bins=20)
    graph = dict(counts.data.__dask_graph__())
    per_chunk = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("_block_counts")]
    assert len(per_chunk) == len(cube["rtc"].chunks[0])


def test_histogram_numpy_backed_equals_dask(cube):
    sub = cube.isel(sample=slice(0, 10))
    lazy = sub.nasar.histogram(bins=30).compute()
    eager = sub.load().nasar.histogram(bins=30)
    assert isinstance(eager.data, np.ndarray)
    xr.testing.assert_identical(lazy, eager)


def test_clip_counts_every_valid_value(cube, log_rtc):
    counts = cube.nasar.histogram(bins=10, range=(0.5, 1.5), clip=True).compute()
    for pol in ("co", "cross"):
        v = np.clip(log_rtc[pol], 0.5, 1.5)
        np.testing.assert_array_equal(
            counts.sel(pol=pol).values, np.histogram(v, bins=10, range=(0.5, 1.5))[0]
        )
        assert int(counts.sel(pol=pol).sum()) == log_rtc[pol].size


def test_quantiles_within_one_bin_of_numpy(cube, log_rtc):
    with raise_if_dask_computes():
        q = cube.nasar.quantiles((0.01, 0.5, 0.99))
    assert isinstance(q.data, da.Array)
    q = q.compute()
    width = q.attrs["accuracy"]
    assert width == pytest.approx(8.0 / stats.QUANTILE_BINS)
    for pol in ("co", "cross"):
        want = np.quantile(log_rtc[pol].astype(np.float64), [0.01, 0.5, 0.99])
        got = q.sel(pol=pol).values
        assert np.all(np.abs(got - want) <= width), (pol, got, want)
    # The synthetic corpus sits near the release's constants (p1, p99 of log1p(20 x)).
    assert q.sel(pol="co", quantile=0.01) == pytest.approx(0.15, abs=0.1)
    assert q.sel(pol="co", quantile=0.99) == pytest.approx(2.39, abs=0.2)


def test_variables_without_pol_and_transforms(cube):
    coh = cube["coh"].values
    counts = cube.nasar.histogram("coh", bins=20).compute()
    assert counts.dims == ("bin",)
    np.testing.assert_array_equal(counts.values, np.histogram(coh, bins=20, range=(0, 1))[0])
    q = cube.nasar.quantiles((0.25, 0.75), var="coh", bins=2000).compute()
    assert q.dims == ("quantile",)
    np.testing.assert_allclose(
        q.values, np.quantile(coh.astype(np.float64), [0.25, 0.75]), atol=1 / 2000
    )
    # dB and callable transforms
    rtc = cube["rtc"].values
    db = 10 * np.log10(rtc[:, :, :, 0][rtc[:, :, :, 0] > 0])
    got = cube.nasar.histogram(transform="db", bins=40, range=(-40, 10)).sel(pol="co")
    np.testing.assert_array_equal(got.values, np.histogram(db, bins=40, range=(-40, 10))[0])
    got = cube.nasar.histogram(transform=np.sqrt, bins=40, range=(0, 2)).sel(pol="co")
    np.testing.assert_array_equal(
        got.values,
        np.histogram(
            np.sqrt(rtc[:, :, :, 0][cube["rtc_present"].values[:, :, :, 0]]), bins=40, range=(0, 2)
        )[0],
    )
    assert got.attrs["transform"] == "sqrt"


def test_quantiles_from_a_known_histogram():
    counts = xr.DataArray(
        [10, 10, 10, 10],
        dims="bin",
        coords={
            "bin_lower": ("bin", [0.0, 1.0, 2.0, 3.0]),
            "bin_upper": ("bin", [1.0, 2.0, 3.0, 4.0]),
        },
    )
    q = stats.quantiles_from_histogram(counts, (0.0, 0.25, 0.5, 0.9, 1.0))
    np.testing.assert_allclose(q.values, [0.0, 1.0, 2.0, 3.6, 4.0])
    # q = 0 starts at the first non-empty bin
    sparse = counts.copy(data=[0, 0, 4, 0])
    np.testing.assert_allclose(
        stats.quantiles_from_histogram(sparse, (0.0, 1.0)).values, [2.0, 3.0]
    )
    empty = stats.quantiles_from_histogram(counts * 0, (0.5,))
    assert np.isnan(empty.values).all()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    bins=st.integers(1, 300),
    q=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
)
def test_quantiles_are_within_one_bin_width_of_numpy(seed, n, bins, q):
    rng = np.random.default_rng(seed)
    values = rng.gamma(2.0, 0.2, size=(n, 3)).clip(0.0, 1.0).astype(np.float32)
    ds = xr.Dataset({"coh": (("sample", "x"), values)}).chunk({"sample": 64})
    got = stats.quantiles(ds, q, var="coh", bins=bins).values
    x = np.sort(values.ravel().astype(np.float64))
    n = x.size
    for qi, g in zip(q, got, strict=True):
        # numpy interpolates between x[floor(q(n-1))] and x[ceil(q(n-1))]; the histogram
        # bin holds x[ceil(qn) - 1]: adjacent order statistics, plus one bin width.
        idx = [
            int(np.floor(qi * (n - 1))),
            int(np.ceil(qi * (n - 1))),
            max(int(np.ceil(qi * n)) - 1, 0),
        ]
        width = 1.0 / bins
        assert x[min(idx)] - width - 1e-9 <= g <= x[max(idx)] + width + 1e-9
        if n >= 2 and x[max(idx)] == x[min(idx)]:  # no gap: within one bin of numpy
            assert abs(g - np.quantile(x, qi)) <= width + 1e-9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"transform": "log2"}, "unknown transform"),
        ({"var": "ifg"}, "no default range"),
        ({"var": "nope"}, "not a variable"),
        ({"range": (1.0, 1.0)}, "high > low"),
        ({"bins": 0}, "positive"),
    ],
)
def test_bad_arguments_are_refused(cube, kwargs, match):
    with pytest.raises((ValueError, KeyError), match=match):
        stats.histogram(cube, **kwargs)


def test_bad_quantiles_are_refused(cube):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cube.nasar.quantiles((0.5, 99))


# ------------------------------------------------- fused_counts_kernel against its reference
# A frozen copy of the kernel as it was before the bit-pattern fast path: the definition of
# the counts it must return, bit for bit.


def _ref_log1p20_inplace(v):
    np.multiply(v, np.float32(20.0), out=v)
    return np.log1p(v, out=v)


def _ref_db_inplace(v):
    v[~(v > 0)] = np.nan
    np.log10(v, out=v)
    return np.multiply(v, v.dtype.type(10.0), out=v)


_REF_INPLACE = {"log1p20": _ref_log1p20_inplace, "db": _ref_db_inplace, None: lambda v: v}


def reference_kernel(x, present, *, axis, transform, bins, range, clip):
    fn = _REF_INPLACE[transform]
    n_groups = 1 if axis is None else x.shape[axis]
    out = np.zeros((n_groups, 1, bins), dtype=np.int64)
    for g in np.arange(n_groups):
        xg = x if axis is None else np.take(x, [g], axis=axis)
        if present is not None:
            pg = present if axis is None else np.take(present, [g], axis=axis)
            pg = np.broadcast_to(pg, xg.shape[: pg.ndim]).reshape(-1)
            v = xg.reshape(pg.size, -1)[pg]
        else:
            v = np.array(xg, copy=True)
        v = fn(v.astype(np.result_type(v.dtype, np.float32), copy=False))
        if clip:
            v[~np.isfinite(v)] = np.nan
            np.clip(v, range[0], range[1], out=v)
        out[g, 0] = np.histogram(v, bins=bins, range=range)[0]
    return out


def assert_kernel_exact(x, present=None, **kwargs):
    with np.errstate(all="ignore"):
        want = reference_kernel(x, present, **kwargs)
        got = stats.fused_counts_kernel(x, present, **kwargs)
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    return got


# (transform, range) pairs: the defaults, a negative low edge, a narrow range, integers
CONFIGS = [
    ("log1p20", (0.0, 8.0)),
    ("log1p20", (-1.0, 4.0)),
    ("log1p20", (0.5, 1.5)),
    ("db", (-50.0, 30.0)),
    ("db", (-3.0, 7.0)),
    (None, (0.0, 1.0)),
    (None, (-500.0, 9000.0)),
    (None, (-1, 2)),
]
BINS = [1, 7, 50, 800]
# fmt: off
SPECIALS = np.array(
    [0.0, -0.0, -0.05, 1 / 20, -1 / 20, np.nan, -np.nan, np.inf, -np.inf, 1e-45, -1e-45,
     1.1754942e-38, 3.4028235e38, -3.4028235e38, 1e30, -1e30, 1.0, -1.0, 0.5, 8.0, 149.0],
    dtype=np.float32,
)
# fmt: on


def threshold_neighbours(transform, bins, range, clip, offsets=(-3, -2, -1, 0, 1, 2)):
    """The floats a few ulps either side of every threshold of the fast path, by offset."""
    plan = stats._bin_plan(transform, bins, range[0], range[1], clip)
    assert plan is not None
    keys = np.unique(plan.thresholds[plan.thresholds < np.iinfo(np.int64).max])
    lo, hi = stats._KEY_NEG_INF, stats._KEY_POS_INF
    return {o: stats._floats(np.clip(keys + o, lo, hi)) for o in offsets}


def test_the_fast_path_applies_to_the_default_histograms():
    for args in [
        ("log1p20", 800, 0.0, 8.0, False),
        ("log1p20", 800, 0.0, 8.0, True),
        ("log1p20", stats.QUANTILE_BINS, 0.0, 8.0, True),
        ("db", 800, -50.0, 30.0, False),
        (None, 800, 0.0, 1.0, False),
        (None, stats.QUANTILE_BINS, 0.0, 90.0, True),
        (None, 800, -500.0, 9000.0, False),
    ]:
        plan = stats._bin_plan(*args)
        assert plan is not None, args
        for a in (plan.flat_thresholds, plan.flat_labels, plan.slot, plan.is_straddled):
            assert not a.flags.writeable


@pytest.mark.parametrize("transform, range", CONFIGS)
@pytest.mark.parametrize("clip", [False, True])
def test_kernel_exact_around_every_threshold(transform, range, clip):
    for bins in (7, 800):
        near = threshold_neighbours(transform, bins, range, clip)
        for values in near.values():
            # one value per threshold and offset: off-by-ones at thresholds do not cancel
            assert_kernel_exact(
                values, axis=None, transform=transform, bins=bins, range=range, clip=clip
            )
        everything = np.concatenate([*near.values(), SPECIALS])
        assert_kernel_exact(
            everything, axis=None, transform=transform, bins=bins, range=range, clip=clip
        )


@pytest.mark.parametrize("clip", [False, True])
def test_kernel_exact_per_value(clip):
    """Each value its own group: the bin of every single value is the reference's."""
    rng = np.random.default_rng(3)
    near = threshold_neighbours("log1p20", 800, (0.0, 8.0), clip, offsets=(-1, 0))
    values = np.concatenate(
        [SPECIALS, rng.choice(near[-1], 60), rng.choice(near[0], 60), rng.gamma(1.0, 0.3, 40)]
    ).astype(np.float32)
    assert_kernel_exact(
        values[:, None], axis=0, transform="log1p20", bins=800, range=(0.0, 8.0), clip=clip
    )


def test_kernel_exact_at_the_edges_themselves():
    """Identity transform: the values are the bin edges, their neighbours, and beyond."""
    for range in [(0.0, 1.0), (-500.0, 9000.0), (0.1, 0.7)]:
        for bins in (7, 800):
            edges = np.linspace(range[0], range[1], bins + 1, dtype=np.float32)
            up = np.nextafter(edges, np.float32(np.inf))
            down = np.nextafter(edges, np.float32(-np.inf))
            for values in (edges, up, down, np.concatenate([edges, up, down, SPECIALS])):
                for clip in (False, True):
                    assert_kernel_exact(
                        values, axis=None, transform=None, bins=bins, range=range, clip=clip
                    )


def realistic_block(rng, n=6, side=16):
    x = rng.gamma(1.0, 0.08, size=(n, 2, 2, 2, side, side)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0.0
    x[1] = np.nan
    x[3, 0, 1, 1, :4] = -1 / 20
    x[3, 1, 0, 0, 5] = -0.01
    x[4, 1, 1, 0, 0, :3] = [np.inf, -np.inf, 3e38]
    present = rng.random((n, 2, 2, 2)) < 0.8
    present[2, :, :, 1] = False
    return x, present


@pytest.mark.parametrize("transform, range", CONFIGS)
@pytest.mark.parametrize("clip", [False, True])
def test_kernel_exact_on_blocks(transform, range, clip):
    rng = np.random.default_rng(11)
    x, present = realistic_block(rng)
    kwargs = {"transform": transform, "bins": 50, "range": range, "clip": clip}
    assert stats._bin_plan(transform, 50, *range, clip) is not None  # the fast path, tested
    for axis in (3, 1, None):  # by pol (mask per row), by view (mask per channel), none
        assert_kernel_exact(x, present, axis=axis, **kwargs)
        assert_kernel_exact(x, None, axis=axis, **kwargs)
    # a mask over fewer axes, a broadcast one, and a non-contiguous block
    assert_kernel_exact(
        x, present[:, :, 0, :].copy().reshape(6, 2, 1, 2).repeat(2, 2), axis=3, **kwargs
    )
    assert_kernel_exact(x, present[:, :1, :1, :], axis=3, **kwargs)
    assert_kernel_exact(x, present[:, 0, 0, 0].copy(), axis=0, **kwargs)
    assert_kernel_exact(np.swapaxes(x, 4, 5), present, axis=3, **kwargs)
    assert_kernel_exact(x, np.zeros_like(present), axis=3, **kwargs)  # nothing present


def test_kernel_chunks_and_float64(monkeypatch):
    rng = np.random.default_rng(5)
    x, present = realistic_block(rng)
    kwargs = {"transform": "log1p20", "bins": 800, "range": (0.0, 8.0)}
    for clip in (False, True):
        # float64 input takes the reference (the transform is then computed in float64)
        assert_kernel_exact(x.astype(np.float64), present, axis=3, clip=clip, **kwargs)
        # numpy scalars in the range make np.histogram compare in float64: reference too
        wide = {**kwargs, "range": (np.float64(0.0), np.float64(8.0))}
        assert_kernel_exact(x, present, axis=3, clip=clip, **wide)
    monkeypatch.setattr(stats, "_CHUNK", 3 * 256)  # several bincounts per group
    for clip in (False, True):
        assert_kernel_exact(x, present, axis=3, clip=clip, **kwargs)


def test_kernel_exact_with_narrow_bins():
    """Many thresholds per cell (the fast path compares with each), then more than it
    takes, then edges closer than 8 ulps (np.histogram's bins not provably exact): the
    last two take the reference."""
    x = np.concatenate([np.linspace(0.999, 1.011, 20001, dtype=np.float32), SPECIALS])
    for bins, range, clip, per_cell in [
        (600, (1.0, 1.01), False, 30),
        (300, (1.0, 1.01), True, 15),
        (1000, (1.0, 1.01), False, None),
        (200, (1.0, 1.0001), True, None),
    ]:
        plan = stats._bin_plan(None, bins, range[0], range[1], clip)
        assert (plan and plan.per_cell) == per_cell
        kwargs = {"axis": None, "transform": None, "bins": bins, "range": range, "clip": clip}
        assert_kernel_exact(x, None, **kwargs)
        if plan is not None:
            for values in threshold_neighbours(None, bins, range, clip).values():
                assert_kernel_exact(values, None, **kwargs)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    config=st.sampled_from(CONFIGS),
    bins=st.sampled_from(BINS),
    clip=st.booleans(),
    n=st.integers(1, 300),
)
def test_kernel_exact_on_any_float32(data, config, bins, clip, n):
    transform, range = config
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
    keys = np.unique(stats._bin_plan(transform, bins, range[0], range[1], clip).thresholds.ravel())
    keys = keys[keys < np.iinfo(np.int64).max]
    near = st.tuples(st.sampled_from(keys.tolist()), st.integers(-4, 4)).map(
        lambda k: stats._floats(np.clip(k[0] + k[1], stats._KEY_NEG_INF, stats._KEY_POS_INF))
    )
    values = data.draw(
        st.lists(
            st.one_of(floats, near, st.sampled_from(SPECIALS.tolist())), min_size=n, max_size=n
        )
    )
    x = np.array(values, dtype=np.float32).reshape(n, 1)
    groups = data.draw(st.sampled_from([None, 1]))
    if groups:  # two groups along axis 1, some rows absent
        x = np.concatenate([x, x[::-1]], axis=1)
        present = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        present = np.stack([present, ~present], axis=1)
        assert_kernel_exact(
            x, present, axis=1, transform=transform, bins=bins, range=range, clip=clip
        )
    else:
        assert_kernel_exact(
            x, None, axis=None, transform=transform, bins=bins, range=range, clip=clip
        )


def test_kernel_exact_from_many_threads():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(8)
    blocks = [realistic_block(rng, n=5) for _ in range(8)]
    kwargs = {"axis": 3, "transform": "log1p20", "bins": 123, "range": (0.0, 5.0), "clip": True}
    stats._bin_plan.cache_clear()  # every thread may find the cache empty
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: stats.fused_counts_kernel(*b, **kwargs), blocks))
    for (x, present), counts in zip(blocks, got, strict=True):
        with np.errstate(all="ignore"):
            want = reference_kernel(x, present, **kwargs)
        np.testing.assert_array_equal(counts, want)


def test_order_keys():
    rng = np.random.default_rng(2)
    bits = rng.integers(-(2**31), 2**31, 20000, dtype=np.int64).astype(np.int32)
    values = bits.view(np.float32)
    ok = ~np.isnan(values)
    keys = stats._keys(bits)
    np.testing.assert_array_equal(stats._keys(keys), bits)  # an involution
    np.testing.assert_array_equal(stats._floats(keys).view(np.int32), bits)
    order = np.argsort(values[ok], kind="stable")
    assert np.all(np.diff(keys[ok][order]) >= 0)
    assert stats._keys(np.array([0x80000000], dtype=np.uint32).view(np.int32))[0] == -1
    inf = np.array([np.inf, -np.inf], dtype=np.float32).view(np.int32)
    assert stats._keys(inf).tolist() == [stats._KEY_POS_INF, stats._KEY_NEG_INF]


def _wobbly(v):
    """Identity, but not monotone: the three floats just above the edge 0.2 map below it."""
    edge = np.float32(0.2)
    above = stats._floats(stats._keys(np.array([edge]).view(np.int32)) + np.arange(1, 4))
    v[np.isin(v, above)] = np.float32(0.19)
    return v


def _positional(v):
    """Identity, but odd positions in the array come out one ulp lower."""
    odd = np.arange(v.size).reshape(v.shape) % 2 == 1
    v[odd] = np.nextafter(v[odd], np.float32(-np.inf))
    return v


@pytest.mark.parametrize("name, fn", [("_test_wobbly", _wobbly), ("_test_positional", _positional)])
def test_transforms_the_plan_cannot_vouch_for_take_the_reference(monkeypatch, name, fn):
    monkeypatch.setitem(stats._INPLACE, name, fn)
    assert stats._bin_plan(name, 10, 0.0, 1.0, False) is None
    x = np.concatenate([threshold_neighbours(None, 10, (0.0, 1.0), False)[o] for o in (-1, 0, 1)])
    kwargs = {"axis": None, "transform": name, "bins": 10, "range": (0.0, 1.0), "clip": False}
    np.testing.assert_array_equal(
        stats.fused_counts_kernel(x, None, **kwargs),
        stats._reference_fused_counts(x, None, **kwargs),
    )


def test_flush_to_zero_threads_take_the_reference(monkeypatch):
    assert stats._subnormals_work()
    x, present = realistic_block(np.random.default_rng(4))
    kwargs = {"axis": 3, "transform": "log1p20", "bins": 800, "range": (0.0, 8.0), "clip": False}
    fast = assert_kernel_exact(x, present, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(stats, "_subnormals_work", lambda: False)
    monkeypatch.setattr(stats, "_plan_counts", refuse)
    np.testing.assert_array_equal(assert_kernel_exact(x, present, **kwargs), fast)
