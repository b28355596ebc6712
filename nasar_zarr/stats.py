"""Corpus statistics in one out-of-core pass: histograms and quantiles.

:func:`histogram` builds one task per dask chunk (each reads its chunk once and
returns ``(group, 1, bins)`` counts) and a tree sum, so a corpus of any size
is binned in a single streaming pass with bounded memory; numpy-backed input is
binned directly. :func:`quantiles` reads quantiles off a fine histogram (exact
quantiles would need a sort of the whole corpus): on corpus-sized data the
result is within one bin width of ``numpy.quantile`` on the same values (see
:func:`quantiles_from_histogram` for the exact bound).

For ``rtc``, missing polarizations (``rtc_present`` False) are left out, as are
NaN values (unwritten samples) and anything the transform makes non-finite.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import schema

Transform = str | Callable[[xr.DataArray], xr.DataArray] | None

# The release's RTC transform before clip_and_rescale: log1p(20 * x).
TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "log1p20": lambda x: np.log1p(np.float32(20.0) * x),
    "db": lambda x: 10.0 * np.log10(x.where(x > 0)),
}
# Ranges that hold practically all values, so no range argument is needed for these.
# log1p(20 x) = 8 is gamma0 ~ 149 (+21.7 dB), beyond the brightest urban returns.
DEFAULT_RANGES: dict[tuple[str, str | None], tuple[float, float]] = {
    ("rtc", "log1p20"): (0.0, 8.0),
    ("rtc", "db"): (-50.0, 30.0),
    ("coh", None): (0.0, 1.0),
    ("inc_angle", None): (0.0, 90.0),
    ("slope_deg", None): (0.0, 90.0),
    ("dem", None): (-500.0, 9000.0),
}
HISTOGRAM_BINS = 800
QUANTILE_BINS = 8000
_ONE = "_nasar_group"  # stand-in group dim when ``by`` is absent


def _transform(var: str, transform: Transform) -> tuple[str | None, Callable]:
    if transform == "auto":
        transform = "log1p20" if var == "rtc" else None
    if transform is None:
        return None, lambda x: x
    if callable(transform):
        return getattr(transform, "__name__", "callable"), transform
    if transform not in TRANSFORMS:
        raise ValueError(
            f"unknown transform {transform!r}; expected one of {sorted(TRANSFORMS)},"
            " None, or a callable taking and returning a DataArray"
        )
    return transform, TRANSFORMS[transform]


def _range(var: str, name: str | None, range: Sequence[float] | None) -> tuple[float, float]:
    if range is None:
        try:
            return DEFAULT_RANGES[(var, name)]
        except KeyError:
            raise ValueError(
                f"no default range for {var!r} with transform {name!r}: pass range=(low, high)"
                " (the bins must be known before the data are read, to keep it one pass)"
            ) from None
    lo, hi = (float(r) for r in range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"range must be finite with high > low, got {range!r}")
    return lo, hi


def _counts_kernel(
    values: np.ndarray, valid: np.ndarray, *, bins: int, range: tuple[float, float], clip: bool
) -> np.ndarray:
    """``(groups, n)`` values and mask -> ``(groups, 1, bins)`` int64 counts."""
    out = np.zeros((values.shape[0], 1, bins), dtype=np.int64)
    for g in np.arange(values.shape[0]):
        v = values[g][valid[g]]
        if clip:
            v = np.clip(v, range[0], range[1])
        out[g, 0] = np.histogram(v, bins=bins, range=range)[0]
    return out


def histogram(
    ds: xr.Dataset,
    var: str = "rtc",
    *,
    bins: int = HISTOGRAM_BINS,
    range: Sequence[float] | None = None,
    transform: Transform = "auto",
    by: str | None = "pol",
    clip: bool = False,
) -> xr.DataArray:
    """Counts of a variable's values over the whole (selected) cube, lazily, in one pass.

    Parameters
    ----------
    ds
        A cube (numpy- or dask-backed).
    var
        The variable to bin.
    bins
        Number of equal-width bins over ``range``.
    range
        ``(low, high)`` of the bins, in transformed units. Values outside are
        not counted (as :func:`numpy.histogram`) unless ``clip``. Defaults exist
        for a few variables (:data:`DEFAULT_RANGES`), e.g. ``(0, 8)`` for
        ``rtc`` with ``"log1p20"``.
    transform
        ``"auto"`` (``"log1p20"`` for ``rtc``, none otherwise), ``"log1p20"``
        (``log1p(20 x)``, the release's RTC transform), ``"db"``
        (``10 log10 x``, non-positive dropped), None, or a callable mapping a
        DataArray to a DataArray lazily.
    by
        A dimension to keep: one histogram per label (``pol`` by default, so
        co- and cross-pol are binned apart). Ignored if ``var`` lacks it.
    clip
        Count values below/above ``range`` in the first/last bin (so every
        valid value is counted; used for quantiles).

    Returns
    -------
    xarray.DataArray
        int64 ``counts`` with dims ``(by, "bin")`` (or ``("bin",)``); coordinates
        ``bin`` (bin centres), ``bin_lower`` and ``bin_upper``. For ``rtc``,
        missing polarizations and NaN are excluded.
    """
    if var not in ds:
        raise KeyError(f"{var!r} is not a variable of this dataset; it has {list(ds.data_vars)}")
    if int(bins) < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    bins = int(bins)
    name, fn = _transform(var, transform)
    lo, hi = _range(var, name, range)
    raw = ds[var]
    if not callable(transform):
        present = ds[schema.RTC_PRESENT] if var == "rtc" and schema.RTC_PRESENT in ds else None
        group = by if by is not None and by in raw.dims else None
        counts = _fused_counts(raw, present, group, name, bins=bins, range=(lo, hi), clip=clip)
        return _counts_array(counts, raw, group, var, name, bins, lo, hi, clip)
    values = fn(raw)
    valid = np.isfinite(values)
    if var == "rtc" and schema.RTC_PRESENT in ds:
        # A missing polarization is zero-padded, not a real zero backscatter.
        valid = valid & ds[schema.RTC_PRESENT]
    group = by if by is not None and by in values.dims else None
    if group is None:
        values, valid = values.expand_dims(_ONE), valid.expand_dims(_ONE)
        group = _ONE
    values, valid = xr.broadcast(values, valid)
    values = values.transpose(group, ...)
    valid = valid.transpose(group, ...)
    n_groups = values.sizes[group]
    kwargs: dict[str, Any] = {"bins": bins, "range": (lo, hi), "clip": clip}
    if _is_dask(values.data) or _is_dask(valid.data):
        counts = _dask_counts(values.data, valid.data, n_groups, kwargs)
    else:
        counts = _counts_kernel(
            np.asarray(values.data).reshape(n_groups, -1),
            np.asarray(valid.data).reshape(n_groups, -1),
            **kwargs,
        )
        counts = counts.sum(axis=1)
    return _counts_array(
        counts, values, None if group == _ONE else group, var, name, bins, lo, hi, clip
    )


def _counts_array(
    counts: Any,
    values: xr.DataArray,
    group: str | None,
    var: str,
    name: str | None,
    bins: int,
    lo: float,
    hi: float,
    clip: bool,
) -> xr.DataArray:
    """``(groups, bins)`` counts as the labelled DataArray :func:`histogram` returns."""
    edges = np.histogram_bin_edges([], bins=bins, range=(lo, hi))
    coords: dict[str, Any] = {
        "bin": ("bin", (edges[:-1] + edges[1:]) / 2, {"long_name": "bin centre"}),
        "bin_lower": ("bin", edges[:-1]),
        "bin_upper": ("bin", edges[1:]),
    }
    dims: tuple[str, ...] = (group or _ONE, "bin")
    if group is None:
        counts, dims = counts[0], ("bin",)
    else:
        coords[group] = values[group]
    attrs = {
        "long_name": f"count of {var} values" + (f" after {name}" if name else ""),
        "units": "1",
        "variable": var,
        "transform": name or "none",
        "range": [lo, hi],
        "bins": bins,
        "clip": int(clip),
    }
    return xr.DataArray(counts, dims=dims, coords=coords, name="counts", attrs=attrs)


# numpy kernels of the named transforms, in place on a float32 copy (same values as
# TRANSFORMS: log1p(float32(20) * x); 10 log10 x with non-positive x dropped).
def _log1p20_inplace(v: np.ndarray) -> np.ndarray:
    np.multiply(v, np.float32(20.0), out=v)
    return np.log1p(v, out=v)


def _db_inplace(v: np.ndarray) -> np.ndarray:
    v[~(v > 0)] = np.nan
    np.log10(v, out=v)
    return np.multiply(v, v.dtype.type(10.0), out=v)


_INPLACE: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {
    "log1p20": _log1p20_inplace,
    "db": _db_inplace,
    None: lambda v: v,
}


def fused_counts_kernel(
    x: np.ndarray,
    present: np.ndarray | None,
    *,
    axis: int | None,
    transform: str | None,
    bins: int,
    range: tuple[float, float],
    clip: bool,
) -> np.ndarray:
    """Counts of one block in one pass: ``(groups, 1, bins)`` int64.

    ``x`` is a block of the variable (sample axis first); ``present`` (or None)
    a boolean block over its leading axes (``rtc_present`` for ``rtc``): only
    present channels are copied out, transformed in place and binned, so a
    block costs one copy, the transform and :func:`numpy.histogram` (the
    generic path made ~5 full-size temporaries). ``axis`` is the group axis.

    Parameters
    ----------
    x
        Values, sample axis first.
    present
        Channel mask over the leading ``present.ndim`` axes of ``x``, or None.
    axis
        Axis of ``x`` to keep (one histogram per index along it), or None.
    transform
        A key of :data:`TRANSFORMS` or None.
    bins, range, clip
        As :func:`histogram`.

    Returns
    -------
    numpy.ndarray
        ``(groups, 1, bins)`` int64 counts of the finite transformed values.
    """
    fn = _INPLACE[transform]
    n_groups = 1 if axis is None else x.shape[axis]
    out = np.zeros((n_groups, 1, bins), dtype=np.int64)
    for g in np.arange(n_groups):
        xg = x if axis is None else np.take(x, [g], axis=axis)
        if present is not None:
            pg = present if axis is None else np.take(present, [g], axis=axis)
            pg = np.broadcast_to(pg, xg.shape[: pg.ndim]).reshape(-1)
            v = xg.reshape(pg.size, -1)[pg]  # present channels only (a copy)
        else:
            v = np.array(xg, copy=True)
        v = fn(v.astype(np.result_type(v.dtype, np.float32), copy=False))
        if clip:
            v[~np.isfinite(v)] = np.nan  # NaN is never counted; +-inf is not valid either
            np.clip(v, range[0], range[1], out=v)
        # np.histogram with a range drops NaN and +-inf (outside the range).
        out[g, 0] = np.histogram(v, bins=bins, range=range)[0]
    return out


def _fused_counts(
    raw: xr.DataArray,
    present: xr.DataArray | None,
    group: str | None,
    transform: str | None,
    *,
    bins: int,
    range: tuple[float, float],
    clip: bool,
) -> Any:
    """``(groups, bins)`` counts with :func:`fused_counts_kernel` on each dask chunk."""
    axis = raw.dims.index(group) if group is not None else None
    if present is not None:
        # the mask's dims must lead the variable's, in the variable's order
        lead = raw.dims[: present.ndim]
        if set(present.dims) != set(lead):
            present = None
        else:
            present = present.transpose(*lead)
    kwargs: dict[str, Any] = {
        "axis": axis,
        "transform": transform,
        "bins": bins,
        "range": range,
        "clip": clip,
    }
    data = raw.data
    if not _is_dask(data):
        mask = None if present is None else np.asarray(present.values, dtype=bool)
        return fused_counts_kernel(np.asarray(data), mask, **kwargs).sum(axis=1)
    import dask.array as da

    ndim = data.ndim
    n_groups = 1 if axis is None else raw.shape[axis]
    if data.numblocks[1:] != (1,) * (ndim - 1):
        data = data.rechunk({i: -1 for i in builtins.range(1, ndim)})
    args = [data]
    if present is not None:
        # trailing singleton axes, so that the mask's blocks line up with the data's
        mask = da.asarray(present.data).astype(bool)
        kwargs["present_ndim"] = mask.ndim
        mask = mask.reshape(*mask.shape, *(1,) * (ndim - mask.ndim))
        args.append(mask.rechunk({0: data.chunks[0], **{i: -1 for i in builtins.range(1, ndim)}}))
    extra: dict[str, Any] = {}
    if ndim >= 3:
        extra["drop_axis"] = list(builtins.range(3, ndim))
    else:
        extra["new_axis"] = list(builtins.range(ndim, 3))
    per_block = da.map_blocks(
        _block_counts,
        *args,
        **kwargs,
        **extra,
        chunks=((1,) * data.numblocks[0], (n_groups,), (bins,)),
        dtype=np.int64,
        meta=np.empty((0, 0, 0), dtype=np.int64),
    )
    return per_block.sum(axis=0)


def _block_counts(
    x: np.ndarray, present: np.ndarray | None = None, *, present_ndim: int = 0, **kwargs: Any
) -> np.ndarray:
    """:func:`fused_counts_kernel` of one dask block, as ``(1, groups, bins)``."""
    if present is not None:
        present = present.reshape(present.shape[:present_ndim])
    counts = fused_counts_kernel(x, present, **kwargs)
    return counts.reshape(1, counts.shape[0], counts.shape[2])


def _is_dask(a: Any) -> bool:
    return type(a).__module__.startswith("dask.")


def _dask_counts(values, valid, n_groups: int, kwargs: dict[str, Any]):
    import dask.array as da

    values = da.asarray(values)
    valid = da.asarray(valid).rechunk(values.chunks)
    # One group axis then everything else: merging whole trailing axes into the
    # chunked one keeps dask's reshape free of rechunking.
    flat = values.reshape(n_groups, -1)
    mask = valid.reshape(n_groups, -1).rechunk(flat.chunks)
    n_blocks = flat.numblocks[1]
    if flat.numblocks[0] != 1:
        flat, mask = flat.rechunk({0: -1}), mask.rechunk({0: -1})
    per_block = da.map_blocks(
        _counts_kernel,
        flat,
        mask,
        **kwargs,
        new_axis=[2],
        chunks=((n_groups,), (1,) * n_blocks, (kwargs["bins"],)),
        dtype=np.int64,
        meta=np.empty((0, 0, 0), dtype=np.int64),
    )
    return per_block.sum(axis=1)


def _quantile_kernel(
    counts: np.ndarray, *, lower: np.ndarray, upper: np.ndarray, q: np.ndarray
) -> np.ndarray:
    """Quantiles from counts (``..., bins``), linear within a bin -> (``..., len(q)``)."""
    counts = np.asarray(counts, dtype=np.float64)
    cdf = np.cumsum(counts, axis=-1)
    total = cdf[..., -1:]
    out = np.full((*counts.shape[:-1], q.size), np.nan)
    for idx in np.ndindex(counts.shape[:-1]):
        n = total[idx][0]
        if n <= 0:
            continue
        target = q * n
        # The first bin whose cumulative count reaches the target holds the quantile
        # (for q = 0, the first non-empty bin).
        i = np.searchsorted(cdf[idx], target, side="left").clip(0, counts.shape[-1] - 1)
        i = np.where(target > 0, i, np.argmax(counts[idx] > 0))
        before = np.where(i > 0, cdf[idx][i - 1], 0.0)
        inside = counts[idx][i]
        frac = np.divide(target - before, inside, out=np.zeros_like(target), where=inside > 0).clip(
            0.0, 1.0
        )
        out[idx] = lower[i] + frac * (upper[i] - lower[i])
    return out


def quantiles_from_histogram(
    counts: xr.DataArray, q: Sequence[float] = (0.01, 0.99)
) -> xr.DataArray:
    """Quantiles read off a histogram from :func:`histogram`, lazily.

    The cumulative count is interpolated linearly within the bin where it
    reaches ``q * total``. That bin holds the order statistic next to the one
    :func:`numpy.quantile` (linear) interpolates from, so the error is at most
    one bin width, ``(high - low) / bins`` (0.001 with the defaults for
    ``rtc``), plus the gap between two adjacent sorted values at that quantile,
    which is negligible for corpus-sized data (millions of pixels). This holds
    as long as the values lie inside the histogram's range (values outside it
    are not counted, or piled in the edge bins with ``clip``).

    Parameters
    ----------
    counts
        A histogram with a ``bin`` dimension and ``bin_lower``/``bin_upper``
        coordinates.
    q
        Quantiles in [0, 1].

    Returns
    -------
    xarray.DataArray
        float64 with ``bin`` replaced by ``quantile``; NaN where nothing was counted.
    """
    qs = np.asarray(q, dtype=np.float64).ravel()
    if qs.size == 0 or np.any((qs < 0) | (qs > 1)) or not np.all(np.isfinite(qs)):
        raise ValueError(f"q must be quantiles in [0, 1], got {q!r}")
    out = xr.apply_ufunc(
        _quantile_kernel,
        counts,
        input_core_dims=[["bin"]],
        output_core_dims=[["quantile"]],
        kwargs={"lower": counts["bin_lower"].values, "upper": counts["bin_upper"].values, "q": qs},
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"quantile": qs.size}},
    )
    out = out.assign_coords(quantile=qs)
    width = (counts["bin_upper"] - counts["bin_lower"]).values
    out.attrs = {
        "long_name": f"quantiles of {counts.attrs.get('variable', 'values')}",
        "units": "1",
        "transform": counts.attrs.get("transform", "none"),
        "method": "linear interpolation of the cumulative histogram",
        "accuracy": float(width.max()) if width.size else float("nan"),
    }
    out.name = "quantiles"
    return out


def quantiles(
    ds: xr.Dataset,
    q: Sequence[float] = (0.01, 0.99),
    *,
    var: str = "rtc",
    bins: int = QUANTILE_BINS,
    range: Sequence[float] | None = None,
    transform: Transform = "auto",
    by: str | None = "pol",
) -> xr.DataArray:
    """Corpus quantiles in one pass, from a fine histogram (per ``pol`` for ``rtc``).

    With the defaults this re-derives the release's RTC constants: the 1st and
    99th percentiles of ``log1p(20 x)`` per polarization (``p1``/``p99`` of
    ``clip_and_rescale``), to within ``(high - low) / bins`` = 0.001.

    Parameters
    ----------
    ds
        A cube (numpy- or dask-backed).
    q
        Quantiles in [0, 1].
    var, bins, range, transform, by
        As :func:`histogram`; values outside ``range`` are counted in the edge
        bins (``clip=True``), so pick a range that holds the data.

    Returns
    -------
    xarray.DataArray
        float64 with dims ``(by, "quantile")`` (or ``("quantile",)``); the
        ``accuracy`` attribute is the bin width.
    """
    counts = histogram(ds, var, bins=bins, range=range, transform=transform, by=by, clip=True)
    return quantiles_from_histogram(counts, q)
