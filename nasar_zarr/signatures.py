"""SAR signatures from the cube's raw variables, lazily, with CF attributes.

All functions take xarray objects backed by numpy or dask and return the same
kind without computing. Conventions (see ``docs/ANALYSIS.md``):

- Backscatter in decibels is ``10 * log10(gamma0)``. Non-positive values (the
  release sets invalid, non-finite and negative backscatter to 0, and pads a
  missing polarization with 0) become **NaN**, not ``-inf``: NaN is skipped by
  xarray reductions (``mean``, ``quantile``, plots), ``-inf`` would poison them.
- Ratios and changes are differences of decibels, so they are NaN wherever one
  side is (missing cross-pol, zero pixels).
- The wrapped phase is ``arctan2(sin, cos)`` in radians, in ``[-pi, pi]``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

_F32 = np.dtype("float32")


def _with_attrs(
    da: xr.DataArray, name: str, long_name: str, units: str, description: str
) -> xr.DataArray:
    da = da.astype(_F32, copy=False)
    da.attrs = {"long_name": long_name, "units": units, "description": description}
    da.name = name
    return da


def backscatter_db(rtc: xr.DataArray) -> xr.DataArray:
    """Backscatter in decibels, ``10 * log10(rtc)``; non-positive values become NaN.

    Parameters
    ----------
    rtc
        Linear gamma0 (the cube's ``rtc``).

    Returns
    -------
    xarray.DataArray
        float32 dB, same dims; NaN where ``rtc <= 0`` (missing polarization,
        invalid pixel) or NaN (unwritten sample).
    """
    # Masking first (rather than after) keeps log10 from ever seeing 0: no warnings.
    db = 10.0 * xr.apply_ufunc(np.log10, rtc.where(rtc > 0), dask="allowed")
    return _with_attrs(
        db,
        "backscatter_db",
        "RTC backscatter (gamma0)",
        "dB",
        "10 * log10(rtc); non-positive (missing or invalid) values are NaN.",
    )


def cross_co_ratio_db(rtc: xr.DataArray) -> xr.DataArray:
    """Cross-pol over co-pol ratio in decibels, ``dB(cross) - dB(co)``.

    Parameters
    ----------
    rtc
        Linear gamma0 with ``pol`` labels ``"co"`` and ``"cross"``.

    Returns
    -------
    xarray.DataArray
        float32 dB without the ``pol`` dimension; NaN where either channel is
        non-positive (e.g. a missing cross-pol).
    """
    db = backscatter_db(rtc)
    ratio = db.sel(pol="cross", drop=True) - db.sel(pol="co", drop=True)
    return _with_attrs(
        ratio,
        "cross_co_ratio_db",
        "cross-pol to co-pol backscatter ratio",
        "dB",
        "10 * log10(rtc[cross] / rtc[co]) as a difference of dB;"
        " NaN where either channel is non-positive.",
    )


def temporal_change_db(rtc: xr.DataArray) -> xr.DataArray:
    """Temporal log-ratio, ``dB(secondary) - dB(prime)``.

    Parameters
    ----------
    rtc
        Linear gamma0 with ``time`` labels ``"prime"`` and ``"secondary"``.

    Returns
    -------
    xarray.DataArray
        float32 dB without the ``time`` dimension; positive where the secondary
        acquisition is brighter; NaN where either acquisition is non-positive.
    """
    db = backscatter_db(rtc)
    change = db.sel(time="secondary", drop=True) - db.sel(time="prime", drop=True)
    return _with_attrs(
        change,
        "temporal_change_db",
        "backscatter change, secondary over prime",
        "dB",
        "10 * log10(rtc[secondary] / rtc[prime]) as a difference of dB;"
        " NaN where either acquisition is non-positive.",
    )


def wrapped_phase(ifg: xr.DataArray) -> xr.DataArray:
    """Wrapped interferometric phase ``arctan2(sin, cos)`` in radians, in ``[-pi, pi]``.

    Parameters
    ----------
    ifg
        The cube's ``ifg`` with ``component`` labels ``"cos"`` and ``"sin"``.

    Returns
    -------
    xarray.DataArray
        float32 radians without the ``component`` dimension.
    """
    phase = xr.apply_ufunc(
        np.arctan2,
        ifg.sel(component="sin", drop=True),
        ifg.sel(component="cos", drop=True),
        dask="allowed",
    )
    return _with_attrs(
        phase,
        "wrapped_phase",
        "wrapped interferometric phase",
        "rad",
        "arctan2(ifg[sin], ifg[cos]), in [-pi, pi].",
    )


def coherence(coh: xr.DataArray) -> xr.DataArray:
    """Interferometric coherence, passed through with CF attributes.

    Parameters
    ----------
    coh
        The cube's ``coh``.

    Returns
    -------
    xarray.DataArray
        The same values (float32), in [0, 1].
    """
    return _with_attrs(
        coh.copy(deep=False),
        "coherence",
        "interferometric coherence",
        "1",
        "Interferometric coherence magnitude in [0, 1], as stored in the cube.",
    )


def signatures(ds: xr.Dataset) -> xr.Dataset:
    """All SAR signatures of a cube in one lazy Dataset.

    Parameters
    ----------
    ds
        A cube with ``rtc``, ``ifg`` and ``coh`` (numpy- or dask-backed).

    Returns
    -------
    xarray.Dataset
        ``backscatter_db``, ``cross_co_ratio_db``, ``temporal_change_db``,
        ``wrapped_phase`` and ``coherence``, with the cube's coordinates.
    """
    out = {}
    if "rtc" in ds:
        out["backscatter_db"] = backscatter_db(ds["rtc"])
        out["cross_co_ratio_db"] = cross_co_ratio_db(ds["rtc"])
        out["temporal_change_db"] = temporal_change_db(ds["rtc"])
    if "ifg" in ds:
        out["wrapped_phase"] = wrapped_phase(ds["ifg"])
    if "coh" in ds:
        out["coherence"] = coherence(ds["coh"])
    return xr.Dataset(out, coords=ds.coords, attrs=ds.attrs)
