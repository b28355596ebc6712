"""The release loader's normalization, as lazy array functions (numpy and dask alike).

Every function takes xarray objects whose data may be numpy or dask arrays and
returns the same kind, building a task graph and reading nothing when the input
is dask-backed. The formulas are those of the NA-SAR dataset card (the release's
PyTorch loader, ``NASARWebRTCDataset`` / ``NASARWebInSARDataset``): its
"Preprocessing" section and the InSAR loader table; see ``docs/ANALYSIS.md``:

- RTC: ``x = log1p(20.0 * x)``, then ``clip_and_rescale`` with ``p1=0.15, p99=2.39``
  for co-pol and ``p1=0.01, p99=1.09`` for cross-pol; "fully missing
  polarizations remain zero-padded after preprocessing".
- ``dem``: global elevation ``(-100 m, 4000 m) -> [0, 1]``.
- ``dem_relief``: "patch-local p5/p95 relief -> [0, 1]".
- ``slope``: slope degrees ``(0 deg, 45 deg) -> [0, 1]``.

``clip_and_rescale(x, lo, hi) = (clip(x, lo, hi) - lo) / (hi - lo)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import schema

# The loader's defaults (dataset card, "Preprocessing" and the InSAR loader table).
RTC_GAIN = 20.0
RTC_RANGES: dict[str, tuple[float, float]] = {"co": (0.15, 2.39), "cross": (0.01, 1.09)}
DEM_RANGE = (-100.0, 4000.0)
RELIEF_PERCENTILES = (5.0, 95.0)
SLOPE_RANGE = (0.0, 45.0)

_F32 = np.dtype("float32")
_PATCH_DIMS = ("y", "x")
_CARD = "NA-SAR dataset card, release loader"


def _check_range(name: str, bounds: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {bounds!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(
            f"{name} must be finite with high > low, got {bounds!r}; e.g. {name}=(0.0, 1.0)"
        )
    return lo, hi


def clip_and_rescale(x: Any, low: Any, high: Any) -> Any:
    """``(clip(x, low, high) - low) / (high - low)``: the release loader's rescaling.

    Works on numpy arrays, dask arrays and xarray objects alike (``low``/``high``
    may be scalars or arrays broadcasting against ``x``). NaN stays NaN.

    Parameters
    ----------
    x
        Values to rescale.
    low, high
        The values mapped to 0 and 1 (``p1`` and ``p99`` in the dataset card).
    """
    return (x.clip(low, high) - low) / (high - low)


def _attrs(long_name: str, description: str, units: str = "1") -> dict[str, str]:
    return {"long_name": long_name, "units": units, "description": description}


def rtc_normalized(
    rtc: xr.DataArray,
    rtc_present: xr.DataArray | None = None,
    *,
    rtc_gain: float = RTC_GAIN,
    rtc_ranges: Mapping[str, Sequence[float]] = RTC_RANGES,
) -> xr.DataArray:
    """RTC backscatter as the release loader returns it: ``log1p(gain*x)``, clipped, rescaled.

    Dataset card, "Preprocessing"::

        x = log1p(20.0 * x)
        co_pol = clip_and_rescale(co_pol, p1=0.15, p99=2.39)
        cross_pol = clip_and_rescale(cross_pol, p1=0.01, p99=1.09)

    Fully missing polarizations remain exactly 0. A missing channel is one whose
    ``rtc_present`` is False (the converter sets it where the channel is all
    zero); with the default ranges a zero already maps to 0 (``p1 > 0``), but not
    with a range whose low end is negative, so the mask is applied explicitly.
    NaN (a sample the converter never wrote) stays NaN rather than becoming a
    silent zero.

    Parameters
    ----------
    rtc
        Linear gamma0 with a ``pol`` dimension labelled as ``rtc_ranges``' keys.
    rtc_present
        Boolean mask broadcasting against ``rtc`` (``ds.rtc_present``); None
        treats every channel as present.
    rtc_gain
        The factor inside ``log1p`` (20.0 in the release).
    rtc_ranges
        ``{pol label: (p1, p99)}`` in log1p units, one entry per ``pol`` label.

    Returns
    -------
    xarray.DataArray
        float32 in [0, 1] (NaN where the input is NaN), same dims and coordinates.
    """
    pols = [str(p) for p in rtc["pol"].values]
    missing = [p for p in pols if p not in rtc_ranges]
    if missing:
        raise ValueError(
            f"rtc_ranges has no range for polarization(s) {missing}; got keys"
            f" {sorted(rtc_ranges)}, expected one (p1, p99) pair per pol label {pols}"
        )
    bounds = np.array([_check_range(f"rtc_ranges[{p!r}]", rtc_ranges[p]) for p in pols], _F32)
    # float32 bounds keep the result float32 (a float64 array would upcast the cube).
    low = xr.DataArray(bounds[:, 0], dims="pol", coords={"pol": rtc["pol"]})
    high = xr.DataArray(bounds[:, 1], dims="pol", coords={"pol": rtc["pol"]})
    if rtc_present is None:
        rtc_present = xr.DataArray(True)
    # One fused in-place kernel per chunk: the chain of xarray ops made ~5 full-size
    # temporaries per chunk and ran at ~0.6x a raw read.
    out = xr.apply_ufunc(
        rtc_kernel,
        rtc,
        rtc_present.astype(bool),
        low,
        high,
        kwargs={"gain": _F32.type(rtc_gain)},
        dask="parallelized",
        output_dtypes=[_F32],
        keep_attrs=False,
    ).transpose(*rtc.dims)
    ranges_text = ", ".join(
        f"{p}: ({lo:g}, {hi:g})" for p, (lo, hi) in zip(pols, bounds, strict=True)
    )
    out.attrs = _attrs(
        "normalized RTC backscatter",
        f"clip_and_rescale(log1p({rtc_gain:g} * rtc), p1, p99) per polarization ({ranges_text});"
        f" missing polarizations stay 0 ({_CARD}, Preprocessing).",
    )
    out.name = "rtc"
    return out


def rtc_kernel(
    x: np.ndarray,
    present: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    *,
    gain: np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """numpy core of :func:`rtc_normalized`: one output buffer, updated in place.

    ``present``, ``low`` and ``high`` broadcast against ``x``. A channel that is
    not present is either all zero (a missing polarization: it becomes exactly 0)
    or all NaN (an unwritten sample: it stays NaN). ``out`` (float32, the shape of
    ``x``, any strides) receives the result instead of a new array.
    """
    out = np.multiply(x, gain, dtype=_F32, out=out)
    np.log1p(out, out=out)
    low, high = np.asarray(low, _F32), np.asarray(high, _F32)
    np.clip(out, low, high, out=out)
    out -= low
    out /= high - low
    if (low < 0).any():  # with p1 >= 0 a zero channel already maps to exactly 0
        missing = ~np.asarray(present, bool) & ~np.isnan(out[..., :1, :1])
        np.copyto(out, _F32.type(0), where=missing)
    return out


def dem_normalized(dem: xr.DataArray, *, dem_range: Sequence[float] = DEM_RANGE) -> xr.DataArray:
    """Global elevation rescaling: ``clip_and_rescale(dem, -100 m, 4000 m)``.

    Dataset card, InSAR loader table: "dem_view_0/1 | dem | global elevation,
    (-100 m, 4000 m) -> [0, 1]".

    Parameters
    ----------
    dem
        Elevation in metres.
    dem_range
        ``(low, high)`` in metres, mapped to 0 and 1.

    Returns
    -------
    xarray.DataArray
        float32 in [0, 1], same dims and coordinates.
    """
    return _rescaled(
        dem,
        "dem",
        dem_range,
        source="dem",
        unit="m",
        long_name="normalized elevation",
        loader_key="dem_view_0/1",
    )


def slope_normalized(
    slope_deg: xr.DataArray, *, slope_range: Sequence[float] = SLOPE_RANGE
) -> xr.DataArray:
    """Slope rescaling: ``clip_and_rescale(slope_deg, 0 deg, 45 deg)``.

    Dataset card, InSAR loader table: "slope_view_0/1 | slope_deg | slope
    degrees, (0 deg, 45 deg) -> [0, 1]".

    Parameters
    ----------
    slope_deg
        Terrain slope in degrees.
    slope_range
        ``(low, high)`` in degrees, mapped to 0 and 1.

    Returns
    -------
    xarray.DataArray
        float32 in [0, 1], same dims and coordinates.
    """
    return _rescaled(
        slope_deg,
        "slope",
        slope_range,
        source="slope_deg",
        unit="deg",
        long_name="normalized terrain slope",
        loader_key="slope_view_0/1",
    )


def _rescaled(
    values: xr.DataArray,
    name: str,
    bounds: Sequence[float],
    *,
    source: str,
    unit: str,
    long_name: str,
    loader_key: str,
) -> xr.DataArray:
    """``clip_and_rescale`` to a fixed range, float32, with CF attributes."""
    lo, hi = _check_range(f"{name}_range", bounds)
    out = clip_and_rescale(values, _F32.type(lo), _F32.type(hi)).astype(_F32, copy=False)
    out.attrs = _attrs(
        long_name,
        f"clip_and_rescale({source}, {lo:g} {unit}, {hi:g} {unit}) ({_CARD}: {loader_key}).",
    )
    out.name = name
    return out


def relief_kernel(
    dem: np.ndarray, *, percentiles: Sequence[float] = RELIEF_PERCENTILES
) -> np.ndarray:
    """Patch-local relief of numpy patches ``(..., y, x)``: clip to own p5/p95, rescale.

    The percentiles are ``np.nanpercentile`` over the last two axes with numpy's
    default linear interpolation, computed in float64 (the result is float32).
    A flat patch (``p95 == p5``) gives 0 everywhere; an all-NaN patch gives NaN.

    Parameters
    ----------
    dem
        Elevation, patch axes last.
    percentiles
        ``(low, high)`` percentiles in [0, 100].

    Returns
    -------
    numpy.ndarray
        float32, same shape as ``dem``.
    """
    values = np.asarray(dem, dtype=np.float64)
    if values.size == 0:
        return values.astype(_F32)
    flat = values.reshape(*values.shape[:-2], -1)
    if not np.isnan(flat).any():  # the usual case; np.percentile is vectorised, nan* is not
        lo, hi = np.percentile(flat, list(percentiles), axis=-1)
    else:
        with warnings.catch_warnings():
            # All-NaN patches (unwritten samples) are expected: they stay NaN.
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanpercentile(flat, list(percentiles), axis=-1)
    lo, hi = lo[..., None, None], hi[..., None, None]
    span = hi - lo
    # A flat patch clips to lo and divides by 1: exactly 0, with no 0/0.
    span = np.where(span > 0, span, 1.0)
    return ((np.clip(values, lo, hi) - lo) / span).astype(_F32)


def dem_relief(
    dem: xr.DataArray, *, relief_percentiles: Sequence[float] = RELIEF_PERCENTILES
) -> xr.DataArray:
    """Patch-local relief: each sample clipped to its own p5/p95 and rescaled to [0, 1].

    Dataset card, InSAR loader table: "dem_relief_view_0/1 | dem | patch-local
    p5/p95 relief -> [0, 1]". Per sample, ``p_lo, p_hi = nanpercentile(dem,
    (5, 95))`` over ``(y, x)`` (numpy's linear interpolation), then
    ``clip_and_rescale(dem, p_lo, p_hi)``; a flat patch gives 0.

    Lazy and per sample: :func:`relief_kernel` runs on each dask chunk through
    :func:`xarray.apply_ufunc` (``dask="parallelized"``); ``y`` and ``x`` must be
    whole in each chunk (they are in the cube).

    Parameters
    ----------
    dem
        Elevation with ``y`` and ``x`` dimensions.
    relief_percentiles
        ``(low, high)`` percentiles in [0, 100].

    Returns
    -------
    xarray.DataArray
        float32 in [0, 1], same dims and coordinates.
    """
    lo, hi = _check_range("relief_percentiles", relief_percentiles)
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"relief_percentiles must lie in [0, 100], got {relief_percentiles!r}")
    out = xr.apply_ufunc(
        relief_kernel,
        dem,
        input_core_dims=[list(_PATCH_DIMS)],
        output_core_dims=[list(_PATCH_DIMS)],
        kwargs={"percentiles": (lo, hi)},
        dask="parallelized",
        output_dtypes=[_F32],
        keep_attrs=False,
    ).transpose(*dem.dims)
    out.attrs = _attrs(
        "patch-local relief",
        f"Per sample: clip_and_rescale(dem, p{lo:g}, p{hi:g}) with the sample's own"
        f" percentiles over (y, x); flat patches give 0 ({_CARD}: dem_relief_view_0/1).",
    )
    out.name = "dem_relief"
    return out


def normalized(
    ds: xr.Dataset,
    *,
    rtc_gain: float = RTC_GAIN,
    rtc_ranges: Mapping[str, Sequence[float]] = RTC_RANGES,
    dem_range: Sequence[float] = DEM_RANGE,
    relief_percentiles: Sequence[float] = RELIEF_PERCENTILES,
    slope_range: Sequence[float] = SLOPE_RANGE,
) -> xr.Dataset:
    """The cube as the release's InSAR loader returns it, lazily, float32.

    Holds ``rtc`` (:func:`rtc_normalized`), ``dem`` (:func:`dem_normalized`),
    ``dem_relief`` (:func:`dem_relief`), ``slope`` (:func:`slope_normalized`)
    and, passed through unchanged, ``inc_angle``, ``ifg`` and ``coh``. The DEM
    channels keep the cube's one-per-sample layout (the loader repeats them per
    view as ``dem_view_0/1``...). Variables missing from ``ds`` are skipped.

    Parameters
    ----------
    ds
        A cube (numpy- or dask-backed), e.g. from :func:`nasar_zarr.open_cube`.
    rtc_gain, rtc_ranges
        See :func:`rtc_normalized`.
    dem_range
        See :func:`dem_normalized`.
    relief_percentiles
        See :func:`dem_relief`.
    slope_range
        See :func:`slope_normalized`.

    Returns
    -------
    xarray.Dataset
        Same coordinates as ``ds``; the root attributes are kept.
    """
    out: dict[str, xr.DataArray] = {}
    if "rtc" in ds:
        present = ds[schema.RTC_PRESENT] if schema.RTC_PRESENT in ds else None
        out["rtc"] = rtc_normalized(ds["rtc"], present, rtc_gain=rtc_gain, rtc_ranges=rtc_ranges)
    if "dem" in ds:
        out["dem"] = dem_normalized(ds["dem"], dem_range=dem_range)
        out["dem_relief"] = dem_relief(ds["dem"], relief_percentiles=relief_percentiles)
    if "slope_deg" in ds:
        out["slope"] = slope_normalized(ds["slope_deg"], slope_range=slope_range)
    for name in ("inc_angle", "ifg", "coh"):
        if name in ds:
            out[name] = ds[name]
    return xr.Dataset(out, coords=ds.coords, attrs=ds.attrs)
