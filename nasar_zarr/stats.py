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

The per-chunk kernel (:func:`fused_counts_kernel`) returns exactly the counts of
transforming in float32 and calling :func:`numpy.histogram`, but for float32
data it finds them without transforming: a value's bin follows from its bit
pattern, through thresholds computed once per ``(transform, bins, range, clip)``
with the same numpy expressions and checked against :func:`numpy.histogram`.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import schema, streaming

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
    a boolean block over its leading axes (``rtc_present`` for ``rtc``);
    ``axis`` is the group axis. The counts are those of the reference
    (:func:`_reference_fused_counts`: the present values, transformed as
    :data:`TRANSFORMS` in float32 and binned by :func:`numpy.histogram`), bit
    for bit. For float32 input they are found without transforming: the bin of
    a value depends only on its bit pattern, through thresholds found once per
    ``(transform, bins, range, clip)`` (see :func:`_bin_plan`), so a block costs
    a shift, a table lookup and :func:`numpy.bincount` of ``bits >> 12``, plus
    an exact comparison for the few values in a cell that holds a threshold.
    Other input, and any case :func:`_bin_plan` cannot vouch for, takes the
    reference.

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
    plan = None
    if _fast_path_applies(x, present, axis, transform, bins, range):
        plan = _bin_plan(transform, bins, range[0], range[1], bool(clip))
    if plan is None:
        return _reference_fused_counts(
            x, present, axis=axis, transform=transform, bins=bins, range=range, clip=clip
        )
    return _plan_counts(x, present, axis, plan)


def _reference_fused_counts(
    x: np.ndarray,
    present: np.ndarray | None,
    *,
    axis: int | None,
    transform: str | None,
    bins: int,
    range: tuple[float, float],
    clip: bool,
) -> np.ndarray:
    """:func:`fused_counts_kernel` the direct way; the definition of its counts.

    Only present channels are copied out, transformed in place and binned by
    :func:`numpy.histogram`: one copy, the transform and the histogram per group.
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
        out[g, 0] = _reference_histogram(v, bins=bins, range=range, clip=clip)
    return out


def _reference_histogram(
    v: np.ndarray, *, bins: int, range: tuple[float, float], clip: bool, weights: Any = None
) -> np.ndarray:
    """The reference's binning of transformed values ``v`` (modified in place)."""
    if clip:
        v[~np.isfinite(v)] = np.nan  # NaN is never counted; +-inf is not valid either
        np.clip(v, range[0], range[1], out=v)
    # np.histogram with a range drops NaN and +-inf (outside the range).
    return np.histogram(v, bins=bins, range=range, weights=weights)[0]


# The fast path. A float32 value's bin is a function of its bit pattern, and, the
# transform being monotone, a step function of its order: it changes only at
# thresholds (the least x whose transform reaches a bin), found by bisection over
# bit patterns with the very numpy expressions the reference evaluates, so exact
# for this numpy and libm. Counting is a bincount of cells (bit patterns >> _SHIFT,
# 1/2048 of an octave): a cell without a threshold lies in one bin; values in the
# few cells with one are compared with the thresholds themselves.
_SHIFT = 12
_HALF = 1 << (31 - _SHIFT)  # raw cells [0, _HALF) hold +0.0 to +NaN, the rest the negatives
_NAN_CELL = _HALF - 1  # positive NaNs 0x7FFFF000...: never counted (absent channels go here)
_KEY_NEG_INF = -0x7F800001  # order keys (see _keys) of -inf and +inf
_KEY_POS_INF = 0x7F800000
_WINDOW = 64  # ulps either side of a threshold in which monotonicity is checked
_MAX_PER_CELL = 32  # thresholds in one cell beyond which the reference is used
_MAX_BINS = 1 << 14  # beyond, the reference (the checks grow with the bins)
_CHUNK = 1 << 22  # values per bincount: bounds memory on large blocks


def _keys(bits: np.ndarray) -> np.ndarray:
    """int32 float32 bit patterns <-> int32 keys in the floats' order (an involution).

    -0.0 is just below +0.0, positive NaNs are above +inf, negative ones below -inf.
    """
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _floats(keys: np.ndarray) -> np.ndarray:
    """The float32 values of order keys, as a new contiguous array."""
    return _keys(np.asarray(keys, dtype=np.int32)).view(np.float32)


def _fast_path_applies(
    x: np.ndarray,
    present: np.ndarray | None,
    axis: int | None,
    transform: str | None,
    bins: int,
    range: tuple[float, float],
) -> bool:
    """Whether the arguments are ones the fast path reproduces (else: the reference)."""
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.size > 0):
        return False
    if transform not in _INPLACE or type(bins) is not int or not 1 <= bins <= _MAX_BINS:
        return False
    if len(range) != 2 or not _subnormals_work():
        return False
    # Python floats (or ints a float32 holds exactly) are what np.histogram compares in
    # float32 and turns into float32 edges; numpy scalars would promote to float64.
    for r in range:
        if type(r) is int:
            if abs(r) > 2**24:
                return False
        elif type(r) is not float:
            return False
    if axis is not None and not (type(axis) is int and 0 <= axis < x.ndim):
        return False
    if present is not None:
        if not (isinstance(present, np.ndarray) and present.dtype == bool):
            return False
        if present.ndim > x.ndim or (axis is not None and axis >= present.ndim):
            return False
        lead = x.shape[: present.ndim]
        if any(p not in (1, n) for p, n in zip(present.shape, lead, strict=True)):
            return False
        if axis is not None and present.shape[axis] != x.shape[axis]:
            return False  # the reference takes the mask group by group
    return True


def _subnormals_work() -> bool:
    """Whether this thread's floating point keeps subnormals (no flush-to-zero or
    denormals-are-zero mode, which some libraries set): the thresholds assume it."""
    tiny = np.array([1e-45, 2.0], dtype=np.float32)
    return bool(tiny[0] > 0) and bool(np.multiply(tiny[:1], tiny[1:])[0] > tiny[0])


class _BinPlan:
    """Read-only tables of the fast path for one ``(transform, bins, range, clip)``.

    Bin ``j`` holds the values whose order key is in ``[K[j], K[j + 1])``; keys
    below ``K[0]`` or from ``K[bins]`` on are not counted. A straddled cell holds
    at least one ``K``; the others are summed whole, per segment of cells.
    """

    def __init__(self, keys: np.ndarray, bins: int) -> None:
        self.bins = bins
        kc = keys >> _SHIFT  # key cell of each threshold (arithmetic shift: floor)
        cells = np.unique(kc)
        raw = np.where(cells >= 0, cells, _HALF - 1 - cells)
        first = np.searchsorted(kc, cells, side="left")
        count = np.searchsorted(kc, cells, side="right") - first
        per_cell = int(count.max())
        self.per_cell = per_cell
        # per straddled cell: its thresholds (padded with a key nothing reaches) and the
        # label after t of them: a bin, or `bins` for "not counted"
        thresholds = np.full((cells.size, per_cell), np.iinfo(np.int64).max, dtype=np.int64)
        labels = np.empty((cells.size, per_cell + 1), dtype=np.intp)
        for t in builtins.range(per_cell + 1):
            seg = first - 1 + t
            labels[:, t] = np.where((seg >= 0) & (seg < bins), seg, bins)
            if t < per_cell:
                has = t < count
                thresholds[has, t] = keys[first[has] + t]
        # per raw cell: straddled or not; and which straddled cell it is
        straddled = np.zeros(2 * _HALF, dtype=bool)
        straddled[raw] = True
        slot = np.zeros(2 * _HALF, dtype=np.uint16)
        slot[raw] = np.arange(cells.size)
        # whole cells of bin j: strictly between the cells of K[j] and K[j + 1]
        start, stop = kc[:-1] + 1, kc[1:]
        full = np.flatnonzero(start < stop)
        if full.size:
            lo, hi = int(start[full[0]]), int(stop[full[-1]])
            self.starts = start[full] - lo
            self.seg_bins = full
            # key cells [lo, hi) as raw-cell slices: negative keys reversed, then positive
            self.neg = (_HALF - min(hi, 0), _HALF - lo) if lo < 0 else (0, 0)
            self.pos = (max(lo, 0), hi) if hi > 0 else (0, 0)
        else:
            self.starts = self.seg_bins = np.zeros(0, dtype=np.intp)
            self.neg = self.pos = (0, 0)
        self.cells = max(self.neg[1], self.pos[1], int(raw.max()) + 1)
        self.is_straddled, self.slot, self.straddled = straddled, slot, raw.astype(np.intp)
        self.thresholds, self.labels = thresholds, labels
        arrays = (self.starts, self.seg_bins, straddled, slot, self.straddled, thresholds, labels)
        for a in arrays:
            a.flags.writeable = False
        # flat, for one-dimensional takes: slot s, threshold t at s * per_cell + t
        self.flat_thresholds = thresholds.ravel()
        self.flat_labels = labels.ravel()


@functools.lru_cache(maxsize=32)  # ~3 MB each
def _bin_plan(
    transform: str | None, bins: int, lo: float, hi: float, clip: bool
) -> _BinPlan | None:
    """Thresholds and tables for the fast path, or None where it cannot vouch for them.

    Thresholds are found by bisection over float32 order keys, evaluating the
    reference's own transform (:data:`_INPLACE`, on a contiguous float32 array
    as the reference does) and comparing with numpy's float32 edges; the plan
    is used only if

    - the edges are at least 8 float32 ulps apart (then :func:`numpy.histogram`
      places ``v`` in bin ``i`` exactly when ``edges[i] <= v < edges[i+1]``:
      its index estimate is within one bin and it corrects one step);
    - the predicates are monotone in a window of :data:`_WINDOW` ulps around
      every threshold and on a coarse grid over all floats, and the transform
      does not depend on where a value sits in an array (a libm function
      within a few ulps of an increasing one can only be out of order between
      inputs whose results are a few ulps apart: near a threshold, that is
      inside the window; float32 ``log1p20`` and ``db`` were also found
      monotone over every float32 with numpy 2.4 and glibc 2.36);
    - the reference binning (:func:`_reference_histogram`) of the values next
      to every threshold and of special values (zeros, infinities, NaN, the
      extremes) is the plan's, value by value.

    The result is cached (pure, read-only arrays), so safe across threads.
    """
    fn = _INPLACE[transform]
    flo, fhi = np.float32(lo), np.float32(hi)
    if not (np.isfinite(flo) and np.isfinite(fhi) and lo < hi):
        return None
    # np.histogram's edges for float32 data and a range of Python numbers
    edges = np.linspace(lo, hi, bins + 1, dtype=np.float32)
    ulp = np.spacing(max(abs(flo), abs(fhi)))
    if not (np.all(np.isfinite(edges)) and (hi - lo) / bins >= 8 * float(ulp)):
        return None
    big = np.finfo(np.float32).max
    # key K[j] is the least x with f(x) >= c[j] (> for the last: the first not counted)
    if clip:  # finite values count, those outside the range in the end bins
        c = np.concatenate([[-big], edges[1:-1], [np.inf]]).astype(np.float32)
    else:
        top = np.nextafter(edges[-1], np.float32(np.inf))
        c = np.concatenate([edges[:-1], [top]]).astype(np.float32)

    def transformed(keys: np.ndarray) -> np.ndarray:
        return fn(_floats(keys))

    with np.errstate(all="ignore"):
        low = np.full(c.size, _KEY_NEG_INF, dtype=np.int64)
        high = np.full(c.size, _KEY_POS_INF + 1, dtype=np.int64)
        while np.any(active := low < high):
            mid = (low + high) >> 1
            reached = transformed(mid) >= c
            high = np.where(active & reached, mid, high)
            low = np.where(active & ~reached, mid + 1, low)
        keys = low
        if np.any(np.diff(keys) < 0):
            return None
        # monotone (and layout-independent) around every threshold
        near = np.clip(
            keys[:, None] + np.arange(-_WINDOW, _WINDOW), _KEY_NEG_INF, _KEY_POS_INF
        ).ravel()
        values = transformed(near)
        again = transformed(near[::-1].copy())[::-1]
        shifted = transformed(near[1:])
        if not (
            np.array_equal(values.view(np.uint32), again.view(np.uint32))
            and np.array_equal(values[1:].view(np.uint32), shifted.view(np.uint32))
        ):
            return None
        reached = (values.reshape(c.size, -1) >= c[:, None]).ravel()
        if not np.array_equal(reached, near >= np.repeat(keys, 2 * _WINDOW)):
            return None
        # and on a coarse grid over all floats
        grid = np.linspace(_KEY_NEG_INF, _KEY_POS_INF, 1 << 14).astype(np.int64)
        fv = transformed(grid)
        steps = np.where(np.isnan(fv), 0, np.searchsorted(c, fv, side="right"))
        if not np.array_equal(steps, np.searchsorted(keys, grid, side="right")):
            return None
        # the reference bins values next to the thresholds and special values as planned
        probe = np.clip(keys[:, None] + np.arange(-1, 1), _KEY_NEG_INF, _KEY_POS_INF).ravel()
        specials = np.array(
            [0.0, -0.0, np.inf, -np.inf, np.nan, big, -big, 1e-45, -1e-45, lo, hi, 1.0, -1.0],
            dtype=np.float32,
        )
        probe = np.concatenate([probe, _keys(specials.view(np.int32)).astype(np.int64)])
        seg = np.searchsorted(keys, probe, side="right") - 1
        planned = np.where((seg >= 0) & (seg < bins), seg, -1)
        if not np.array_equal(_reference_bins(transformed(probe), bins, (lo, hi), clip), planned):
            return None
    plan = _BinPlan(keys, bins)
    if plan.per_cell > _MAX_PER_CELL or plan.straddled.size >= np.iinfo(np.uint16).max:
        return None
    return plan


def _reference_bins(v: np.ndarray, bins: int, range: tuple[float, float], clip: bool) -> np.ndarray:
    """The bin :func:`_reference_histogram` gives each of the transformed values, or -1.

    Each value weighs a distinct power of two, 52 at a time, so every bin's
    (exact) sum of weights names its members.
    """
    out = np.full(v.size, -1, dtype=np.intp)
    for at in builtins.range(0, v.size, 52):
        part = v[at : at + 52].copy()
        bit = np.arange(part.size, dtype=np.uint64)
        sums = _reference_histogram(
            part, bins=bins, range=range, clip=clip, weights=np.ldexp(1.0, bit.astype(np.int64))
        )
        where = np.flatnonzero(sums)
        members = (sums[where].astype(np.uint64)[:, None] >> bit) & np.uint64(1)
        row, col = np.nonzero(members)
        out[at + col] = where[row]
        out[at + np.flatnonzero(members.sum(axis=0) > 1)] = -2  # in two bins: refuse
    return out


def _plan_counts(
    x: np.ndarray, present: np.ndarray | None, axis: int | None, plan: _BinPlan
) -> np.ndarray:
    """:func:`fused_counts_kernel` of float32 ``x`` with a :class:`_BinPlan`."""
    x = np.ascontiguousarray(x)
    shape = x.shape
    if axis is None:
        outer, n_groups, inner = 1, 1, x.size
    else:
        outer, n_groups = int(np.prod(shape[:axis])), shape[axis]
        inner = int(np.prod(shape[axis + 1 :]))
    # (outer, group, inner): a group's values are `outer` rows of `inner` contiguous values
    bits = x.reshape(outer, n_groups, inner).view(np.uint32)
    flat = bits.reshape(-1)
    absent = None
    if present is not None:
        mask = np.broadcast_to(present, shape[: present.ndim])
        absent = ~np.ascontiguousarray(mask).reshape(outer, n_groups, -1)
    out = np.zeros((n_groups, 1, plan.bins), dtype=np.int64)
    per_chunk = max(1, _CHUNK // inner)  # rows per bincount
    buffer = np.empty(min(per_chunk, outer) * inner, dtype=np.intp)
    for g in builtins.range(n_groups):
        # rows with no present channel are skipped, not read
        rows = np.arange(outer) if absent is None else np.flatnonzero(~absent[:, g].all(axis=1))
        for c0 in builtins.range(0, rows.size, per_chunk):
            chunk = rows[c0 : c0 + per_chunk]
            idx = buffer[: chunk.size * inner].reshape(chunk.size, inner)
            runs = np.flatnonzero(np.diff(chunk) != 1) + 1  # runs of consecutive rows
            for a, b in zip([0, *runs], [*runs, chunk.size], strict=True):
                np.right_shift(bits[chunk[a] : chunk[b - 1] + 1, g], _SHIFT, out=idx[a:b])
            if absent is not None:
                part = absent[chunk, g]
                if part.any():
                    idx.reshape(chunk.size, part.shape[1], -1)[part] = _NAN_CELL
            out[g, 0] += _cell_counts(idx, flat, (chunk * n_groups + g) * inner, plan)
    return out


def _cell_counts(
    idx: np.ndarray, flat: np.ndarray, row_at: np.ndarray, plan: _BinPlan
) -> np.ndarray:
    """``(bins,)`` int64 counts of the values with cells ``idx`` (rows, n).

    Their bit patterns are ``flat[row_at[row] + column]``.
    """
    counts = np.zeros(plan.bins + 1, dtype=np.int64)
    at = np.flatnonzero(np.take(plan.is_straddled, idx))
    if at.size:  # values in straddled cells: compared with the cell's thresholds
        n = idx.shape[1]
        if n & (n - 1) == 0:  # shifts, cheaper than divmod
            row, column = at >> (n.bit_length() - 1), at & (n - 1)
        else:
            row, column = np.divmod(at, n)
        bits = flat[row_at[row] + column]
        which = np.take(plan.slot, bits >> _SHIFT).astype(np.intp)
        key = _keys(bits.view(np.int32))
        per_cell = plan.per_cell
        if per_cell == 1:
            passed = (key >= np.take(plan.flat_thresholds, which)).view(np.int8)
        else:
            first = which * per_cell
            passed = np.zeros(at.size, dtype=np.intp)
            for t in builtins.range(per_cell):
                passed += key >= np.take(plan.flat_thresholds, first + t)
        label = np.take(plan.flat_labels, which * (per_cell + 1) + passed)
        counts += np.bincount(label, minlength=plan.bins + 1)
    if plan.seg_bins.size:  # the other values, whole cells at a time
        cc = np.bincount(idx.reshape(-1), minlength=plan.cells)
        cc[plan.straddled] = 0
        parts = [cc[plan.neg[0] : plan.neg[1]][::-1], cc[plan.pos[0] : plan.pos[1]]]
        cells = np.concatenate(parts) if all(p.size for p in parts) else max(parts, key=len)
        counts[plan.seg_bins] += np.add.reduceat(cells, plan.starts)
    return counts[: plan.bins]


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
    # Counts come out as (1, groups, bins) per block, padded with singleton axes to the
    # data's ndim: dropping axes instead (drop_axis) makes dask concatenate every
    # input block along them first, a full copy of each chunk (measured: a third of
    # the histogram's CPU).
    out_ndim = max(ndim, 3)
    pad = (1,) * (out_ndim - 3)
    extra: dict[str, Any] = {"new_axis": list(builtins.range(ndim, 3))} if ndim < 3 else {}
    per_block = da.map_blocks(
        _block_counts,
        *args,
        **kwargs,
        **extra,
        out_ndim=out_ndim,
        chunks=((1,) * data.numblocks[0], (n_groups,), (bins,), *((1,),) * len(pad)),
        dtype=np.int64,
        meta=np.empty((0,) * out_ndim, dtype=np.int64),
    )
    return per_block.sum(axis=0).reshape(n_groups, bins)


def _block_counts(
    x: np.ndarray,
    present: np.ndarray | None = None,
    *,
    present_ndim: int = 0,
    out_ndim: int = 3,
    **kwargs: Any,
) -> np.ndarray:
    """:func:`fused_counts_kernel` of one dask block, as ``(1, groups, bins, 1, ...)``
    (``out_ndim`` axes)."""
    if present is not None:
        present = present.reshape(present.shape[:present_ndim])
    # a lazy chunk of open_cube is counted a few inner chunks at a time (counts add up)
    counts = streaming.sum_pieces(fused_counts_kernel, x, present, **kwargs)
    return counts.reshape(1, counts.shape[0], counts.shape[2], *(1,) * (out_ndim - 3))


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
