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
