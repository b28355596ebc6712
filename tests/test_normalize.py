"""Normalization: the release loader's formulas, lazily, on numpy and dask alike."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import nasar_zarr  # noqa: F401  (registers ds.nasar)
from nasar_zarr import normalize
from nasar_zarr.testing.dask import raise_if_dask_computes
from tests.conftest import decode_with_card

TOL = 1e-5


# ------------------------------------------------------------------ the card, in plain numpy
def card_clip_and_rescale(x, p1, p99):
    """The dataset card's clip_and_rescale, in float64."""
    return (np.clip(x, p1, p99) - p1) / (p99 - p1)


def card_rtc(channel, p1, p99, gain=20.0):
    """One (128, 128) RTC channel as the release loader returns it."""
    x = channel.astype(np.float64)
    if not np.any(x != 0):  # a fully missing polarization stays zero-padded
        return np.zeros_like(x)
    return card_clip_and_rescale(np.log1p(gain * x), p1, p99)


def card_relief(dem, lo_pct=5.0, hi_pct=95.0):
    dem = dem.astype(np.float64)
    lo, hi = np.percentile(dem, [lo_pct, hi_pct])
    if hi <= lo:
        return np.zeros_like(dem)
    return (np.clip(dem, lo, hi) - lo) / (hi - lo)


def card_sample(
    arrays,
    *,
    gain=20.0,
    rtc_ranges=None,
    dem_range=(-100.0, 4000.0),
    relief=(5.0, 95.0),
    slope_range=(0.0, 45.0),
):
    """A sample's 12 source arrays -> normalized arrays laid out as the cube's variables."""
    ranges = rtc_ranges or {"co": (0.15, 2.39), "cross": (0.01, 1.09)}
    rtc = np.empty((2, 2, 2, 128, 128))
    for view in range(2):
        for t, time in enumerate(("prime", "secondary")):
            source = arrays[f"{time}_rtc_view_{view}"]
            for p, pol in enumerate(("co", "cross")):
                rtc[view, t, p] = card_rtc(source[p], *ranges[pol], gain=gain)
    dem = arrays["dem"][0]
    return {
        "rtc": rtc,
        "dem": card_clip_and_rescale(dem.astype(np.float64), *dem_range),
        "dem_relief": card_relief(dem, *relief),
        "slope": card_clip_and_rescale(arrays["slope_deg"][0].astype(np.float64), *slope_range),
        "inc_angle": np.stack([arrays[f"inc_angle_view_{v}"][0] for v in range(2)]),
        "ifg": np.stack([arrays[f"ifg_view_{v}"] for v in range(2)]),
        "coh": np.stack([arrays[f"coh_view_{v}"][0] for v in range(2)]),
    }


def card_expected(raw, keys, **options):
    samples = [card_sample(raw[k], **options) for k in keys]
    return {name: np.stack([s[name] for s in samples]) for name in samples[0]}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def raw(small_corpus):
    return decode_with_card(small_corpus.root)


@pytest.fixture(scope="module")
def keys(cube):
    return [str(k) for k in cube["sample"].values]


@pytest.fixture(scope="module")
def computed(cube):
    return cube.nasar.normalized().compute()


# ------------------------------------------------------------------ tests
def test_normalized_equals_the_release_formulas(computed, raw, keys):
    expected = card_expected(raw, keys)
    assert set(computed.data_vars) == set(expected)
    for name, want in expected.items():
        got = computed[name].values
        assert got.shape == want.shape, name
        assert computed[name].dtype == np.float32, name
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=name)
    # Passed through bit for bit.
    for name in ("inc_angle", "ifg", "coh"):
        np.testing.assert_array_equal(computed[name].values, expected[name])
    assert float(computed["rtc"].min()) == 0.0 and float(computed["rtc"].max()) == 1.0
    for name in ("dem", "dem_relief", "slope"):
        assert 0.0 <= float(computed[name].min()) <= float(computed[name].max()) <= 1.0


def test_same_coordinates_and_cited_attrs(cube, computed):
    assert computed["rtc"].dims == cube["rtc"].dims
    assert computed["dem_relief"].dims == cube["dem"].dims
    np.testing.assert_array_equal(computed["sample"].values, cube["sample"].values)
    np.testing.assert_array_equal(computed["quality_score"].values, cube["quality_score"].values)
    for name in ("rtc", "dem", "dem_relief", "slope"):
        attrs = computed[name].attrs
        assert attrs["units"] == "1" and attrs["long_name"]
        assert "dataset card" in attrs["description"]
    assert "log1p(20 * rtc)" in computed["rtc"].attrs["description"]
    assert "co: (0.15, 2.39)" in computed["rtc"].attrs["description"]


def test_everything_stays_lazy(cube):
    with raise_if_dask_computes():
        out = cube.nasar.normalized()
        pieces = [
            cube.nasar.rtc_normalized(),
            cube.nasar.dem_normalized(),
            cube.nasar.dem_relief(),
            cube.nasar.slope_normalized(),
        ]
    for var in [*out.data_vars.values(), *pieces]:
        assert isinstance(var.data, da.Array), var.name
        # dask chunks stay one Zarr shard along sample
        assert var.chunks[0] == cube["rtc"].chunks[0], var.name


def test_pieces_equal_the_dataset(cube, computed):
    sub = cube.isel(sample=slice(0, 6))
    np.testing.assert_array_equal(sub.nasar.rtc_normalized().values, computed["rtc"][:6].values)
    np.testing.assert_array_equal(sub.nasar.dem_normalized().values, computed["dem"][:6].values)
    np.testing.assert_array_equal(sub.nasar.dem_relief().values, computed["dem_relief"][:6].values)
    np.testing.assert_array_equal(sub.nasar.slope_normalized().values, computed["slope"][:6].values)


def test_numpy_and_dask_alike(cube, computed):
    eager = cube.isel(sample=slice(3, 12)).load()  # numpy-backed
    out = eager.nasar.normalized()
    for name, var in out.data_vars.items():
        assert isinstance(var.data, np.ndarray), name
        np.testing.assert_array_equal(var.values, computed[name][3:12].values, err_msg=name)


def test_ranges_are_configurable(cube, raw, keys):
    options = {
        "gain": 10.0,
        "rtc_ranges": {"co": (0.0, 3.0), "cross": (0.05, 0.8)},
        "dem_range": (0.0, 2000.0),
        "relief": (10.0, 90.0),
        "slope_range": (5.0, 30.0),
    }
    sub = cube.isel(sample=slice(0, 10))
    got = sub.nasar.normalized(
        rtc_gain=options["gain"],
        rtc_ranges=options["rtc_ranges"],
        dem_range=options["dem_range"],
        relief_percentiles=options["relief"],
        slope_range=options["slope_range"],
    ).compute()
    expected = card_expected(raw, keys[:10], **options)
    default = card_expected(raw, keys[:10])
    for name in ("rtc", "dem", "dem_relief", "slope"):
        np.testing.assert_allclose(got[name].values, expected[name], atol=TOL, rtol=0, err_msg=name)
        # ... and different numbers from the defaults.
        assert np.abs(expected[name] - default[name]).max() > 0.01, name


def test_missing_polarization_stays_exactly_zero(cube, computed):
    missing = ~cube["rtc_present"].values
    assert missing.any(), "the shared small_corpus fixture should have a missing cross-pol"
    # The converter marks exactly the samples whose metadata says cross-pol is missing.
    flags = cube["cross_pol_available"].values
    np.testing.assert_array_equal(missing[..., 1].all(axis=(1, 2)), ~flags)
    rtc = computed["rtc"].values
    assert np.all(rtc[missing] == 0.0)
    assert np.all(rtc[~missing].max(axis=(-2, -1)) > 0)
    # With a range whose low end is below 0, zeros would map to 0.5: the mask keeps them 0.
    shifted = cube.nasar.rtc_normalized(rtc_ranges={"co": (-1.0, 3.0), "cross": (-1.0, 1.0)})
    values = shifted.values
    assert np.all(values[missing] == 0.0)
    assert np.all(values[~missing] > 0.0)


def _patch_dataset(dem_patches: np.ndarray) -> xr.Dataset:
    return xr.Dataset(
        {"dem": (("sample", "y", "x"), dem_patches.astype(np.float32))},
        coords={"sample": [f"s{i}" for i in range(len(dem_patches))]},
    )


def test_flat_dem_relief_is_zero_and_nan_stays_nan():
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32)
    patches = np.stack(
        [
            np.full((16, 16), 250.0),  # flat
            100.0 + 3.0 * yy + xx,  # ramp
            np.full((16, 16), np.nan),  # never written
            np.where((yy == 0) & (xx == 0), 500.0, 10.0),  # one spike: p5 == p95, still flat
        ]
    )
    ds = _patch_dataset(patches)
    for backed in (ds, ds.chunk({"sample": 2})):
        with raise_if_dask_computes():
            relief = backed.nasar.dem_relief()
        values = relief.values
        assert values.dtype == np.float32
        assert np.all(values[0] == 0.0)
        np.testing.assert_allclose(values[1], card_relief(patches[1]), atol=TOL)
        assert np.all(np.isnan(values[2]))
        assert np.all(values[3] == 0.0)


def test_unwritten_samples_stay_nan_not_zero(cube):
    sub = cube.isel(sample=slice(0, 3)).load()
    sub["rtc"][1] = np.nan  # as a pending sample reads
    sub["rtc_present"][1] = False
    sub["dem"][1] = np.nan
    sub["slope_deg"][1] = np.nan
    out = sub.nasar.normalized()
    for name in ("rtc", "dem", "dem_relief", "slope"):
        assert np.all(np.isnan(out[name][1].values)), name
        assert not np.any(np.isnan(out[name][0].values)), name


def test_clip_and_rescale_on_numpy_dask_and_xarray():
    x = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan], dtype=np.float32)
    want = np.array([0.0, 0.0, 0.25, 0.5, 1.0, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(normalize.clip_and_rescale(x, 0.0, 2.0), want)
    lazy = normalize.clip_and_rescale(da.from_array(x, chunks=2), 0.0, 2.0)
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), want)
    np.testing.assert_array_equal(
        normalize.clip_and_rescale(xr.DataArray(x), 0.0, 2.0).values, want
    )


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rtc_ranges": {"co": (0.15, 2.39)}}, "no range for polarization"),
        ({"rtc_ranges": {"co": (2.0, 1.0), "cross": (0.0, 1.0)}}, "high > low"),
        ({"dem_range": (1.0,)}, "pair"),
        ({"slope_range": (0.0, np.inf)}, "finite"),
        ({"relief_percentiles": (5.0, 150.0)}, r"\[0, 100\]"),
    ],
)
def test_bad_ranges_are_refused(cube, options, match):
    with pytest.raises(ValueError, match=match):
        cube.nasar.normalized(**options)
