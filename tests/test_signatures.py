"""SAR signatures: dB backscatter, ratios, change, wrapped phase, coherence; lazy, with CF attrs."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import nasar_zarr  # noqa: F401  (registers ds.nasar)
from nasar_zarr import signatures
from nasar_zarr.testing.dask import raise_if_dask_computes


@pytest.fixture(scope="module")
def raw(cube):
    """The raw variables, computed once (float64 for the reference formulas)."""
    return {name: cube[name].values.astype(np.float64) for name in ("rtc", "ifg", "coh")}


@pytest.fixture(scope="module")
def sigs(cube):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log10(0) or 0/0 would warn: none may happen
        return cube.nasar.signatures().compute()


def _db(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, 10.0 * np.log10(np.where(x > 0, x, 1.0)), np.nan)


def test_signatures_stay_lazy_with_cf_attrs(cube):
    with raise_if_dask_computes():
        out = cube.nasar.signatures()
        single = [
            cube.nasar.backscatter_db(),
            cube.nasar.cross_co_ratio_db(),
            cube.nasar.temporal_change_db(),
            cube.nasar.wrapped_phase(),
            cube.nasar.coherence(),
        ]
    assert list(out.data_vars) == [
        "backscatter_db",
        "cross_co_ratio_db",
        "temporal_change_db",
        "wrapped_phase",
        "coherence",
    ]
    units = {
        "backscatter_db": "dB",
        "cross_co_ratio_db": "dB",
        "temporal_change_db": "dB",
        "wrapped_phase": "rad",
        "coherence": "1",
    }
    for var in [*out.data_vars.values(), *single]:
        assert isinstance(var.data, da.Array), var.name
        assert var.dtype == np.float32, var.name
        assert var.attrs["units"] == units[var.name]
        assert var.attrs["long_name"]
    assert out["cross_co_ratio_db"].dims == ("sample", "view", "time", "y", "x")
    assert out["temporal_change_db"].dims == ("sample", "view", "pol", "y", "x")
    assert out["wrapped_phase"].dims == ("sample", "view", "y", "x")


def test_backscatter_db_is_nan_where_not_positive(cube, sigs, raw):
    rtc = raw["rtc"]
    want = _db(rtc)
    got = sigs["backscatter_db"].values
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    zero = rtc <= 0
    assert zero.any()  # the missing cross-pol channels
    assert np.all(np.isnan(got[zero]))
    assert np.all(np.isfinite(got[~zero]))
    # The missing cross-pol of a sample is NaN everywhere, never -inf.
    missing = ~cube["rtc_present"].values
    assert np.all(np.isnan(got[missing]))
    assert not np.isinf(got).any()


def test_cross_co_ratio_and_temporal_change(sigs, raw):
    db = _db(raw["rtc"])
    ratio = sigs["cross_co_ratio_db"].values
    np.testing.assert_allclose(ratio, db[:, :, :, 1] - db[:, :, :, 0], atol=1e-4)
    change = sigs["temporal_change_db"].values
    np.testing.assert_allclose(change, db[:, :, 1] - db[:, :, 0], atol=1e-4)
    # Synthetic cross-pol is 7-10 dB darker than co-pol; the change is small.
    assert -13.0 < np.nanmedian(ratio) < -5.0
    assert abs(np.nanmedian(change)) < 1.0


def test_wrapped_phase_is_arctan2_sin_cos(sigs, raw):
    phase = sigs["wrapped_phase"].values
    ifg = raw["ifg"]
    np.testing.assert_allclose(phase, np.arctan2(ifg[:, :, 1], ifg[:, :, 0]), atol=1e-6)
    assert phase.min() >= -np.pi and phase.max() <= np.pi
    # The phase gives back the stored cos/sin.
    np.testing.assert_allclose(np.cos(phase), ifg[:, :, 0], atol=1e-5)
    np.testing.assert_allclose(np.sin(phase), ifg[:, :, 1], atol=1e-5)


def test_coherence_passes_through(cube, sigs, raw):
    np.testing.assert_array_equal(sigs["coherence"].values, raw["coh"].astype(np.float32))
    # The cube's own variable keeps its attributes.
    assert cube["coh"].attrs["long_name"] == "interferometric coherence"
    assert "source_keys" in cube["coh"].attrs


def test_numpy_backed_inputs():
    rtc = xr.DataArray(
        np.array([[1.0, 0.1], [0.0, 0.01]], dtype=np.float32)[None, None],
        dims=("view", "time", "pol", "x"),
        coords={"time": ["prime"], "pol": ["co", "cross"]},
    ).isel(view=0)
    db = signatures.backscatter_db(rtc)
    assert isinstance(db.data, np.ndarray)
    np.testing.assert_allclose(db.values[0], [[0.0, -10.0], [np.nan, -20.0]], atol=1e-5)
    ratio = signatures.cross_co_ratio_db(rtc)
    np.testing.assert_allclose(ratio.values[0], [np.nan, -10.0], atol=1e-5)
    ifg = xr.DataArray(
        np.array([[-1.0, 0.0], [0.0, 1.0]], dtype=np.float32),
        dims=("component", "x"),
        coords={"component": ["cos", "sin"]},
    )
    np.testing.assert_allclose(signatures.wrapped_phase(ifg).values, [np.pi, np.pi / 2])
