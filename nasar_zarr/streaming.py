"""Reductions of a lazy dask chunk of the cube, a few inner chunks at a time.

A dask chunk of :func:`nasar_zarr.open_cube` is a :class:`~nasar_zarr.backend.LazyRows`
(its samples, not yet read). Reducing one by reading it whole costs a fresh
block of up to ~3 GB (the page faults of filling it cost more than the
reduction); this module instead reads it piece by piece (:data:`PIECE_BYTES`
of the widest input, whole inner chunks) and reduces each piece while it is
in the CPU's cache, so a task holds a few MB, whatever its chunk size.

What streams (everything else reads the chunk whole, as before):

- The reductions dask and xarray call on a chunk: ``np.sum``, ``np.nansum``,
  ``np.min``/``np.max``, ``np.nanmin``/``np.nanmax``, ``np.any``/``np.all``
  and the same ndarray methods, with ``axis`` (int, tuple or None),
  ``dtype`` and ``keepdims``; ``out``, ``initial`` and ``where`` read the
  chunk whole. ``ds[v].sum()``, ``.mean()``, ``.min()``, ``.max()``,
  ``.count()`` of a float variable (NaN skipped) and of the flags stream.
- The elementwise steps xarray and dask put before them: a ufunc call
  (``np.isnan(x)``, ``~m``, ``x - u``, ...) and ``np.where(c, x, y)`` on a
  lazy chunk return a :class:`LazyMap` (the expression, not its values),
  which a reduction evaluates piece by piece and anything else evaluates
  whole, as numpy would have (the chunks read whole and kept, once).
- dask's ``mean`` asks a chunk for its count of non-NaN values and then its
  ``nansum`` with the same arguments: the pass that counts also sums, and the
  sum is handed over (:func:`reduce`), so the chunk is read once.
- :func:`sum_pieces` applies an additive per-block kernel (the histogram's)
  piece by piece.

Numerics: counts, integer sums, ``min``/``max`` and ``any``/``all`` equal
numpy's on the whole chunk exactly. A float sum is the sum of the pieces'
sums (each pairwise-summed by numpy, as numpy would the whole chunk), so it
differs from numpy's whole-chunk sum by float rounding only (dask already
sums its chunks in its own order; ``dtype="float64"`` gives the precision).

Nothing here keeps module state: a chunk's hand-over lives on that chunk's
object, a piece lives for one step of a loop.
"""

from __future__ import annotations

import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from dask.sizeof import sizeof

PIECE_BYTES = 2 << 20  # of the widest input: whole inner chunks, a few MB, in cache
# remote: each piece one coalesced request, the next few in flight (measured: 4 MB x 6)
REMOTE_PIECE_BYTES = 4 << 20
REMOTE_AHEAD = 6
# numpy function -> (kind, NaN-skipping)
REDUCTIONS: dict[Any, tuple[str, bool]] = {
    np.sum: ("sum", False),
    np.nansum: ("sum", True),
    np.min: ("min", False),
    np.amin: ("min", False),
    np.nanmin: ("min", True),
    np.max: ("max", False),
    np.amax: ("max", False),
    np.nanmax: ("max", True),
    np.any: ("any", False),
    np.all: ("all", False),
}
METHODS: dict[str, Callable[..., Any]] = {
    "sum": np.sum,
    "min": np.min,
    "max": np.max,
    "any": np.any,
    "all": np.all,
}
# how the pieces' partial results combine (fmin/fmax: a NaN piece does not hide the rest)
COMBINE: dict[tuple[str, bool], Callable[..., Any]] = {
    ("sum", False): np.add,
    ("sum", True): np.add,
    ("min", False): np.minimum,
    ("min", True): np.fmin,
    ("max", False): np.maximum,
    ("max", True): np.fmax,
    ("any", False): np.logical_or,
    ("all", False): np.logical_and,
}
MEMO = "_stream_handover"  # a chunk's attribute: the nansum its count pass computed
_SIGNATURES = {f: inspect.signature(f) for f in REDUCTIONS}


def _is_rows(value: Any) -> bool:
    """A :class:`~nasar_zarr.backend.LazyRows`. Not imported: backend's hooks import this
    module (so this one stays below it), and a LazyRows exists only once backend is loaded."""
    backend = sys.modules.get("nasar_zarr.backend")
    return backend is not None and isinstance(value, backend.LazyRows)


def is_lazy(value: Any) -> bool:
    """True for a chunk this module can stream (a LazyRows or a :class:`LazyMap`)."""
    return isinstance(value, LazyMap) or _is_rows(value)


# ---------------------------------------------------------------------------- hooks


def array_function(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """A streamed ``func(*args, **kwargs)``, or ``NotImplemented`` to read the inputs whole.

    Called by the ``__array_function__`` of a lazy chunk.
    """
    if func in REDUCTIONS:
        try:
            bound = _SIGNATURES[func].bind(*args, **kwargs)
        except TypeError:
            return NotImplemented
        a = bound.arguments.pop("a")
        if not is_lazy(a):
            return NotImplemented
        kind, skipnan = REDUCTIONS[func]
        return reduce(a, kind, skipnan=skipnan, **bound.arguments)
    if func is np.where and len(args) == 3 and not kwargs:
        return LazyMap.build(np.where, args)
    return NotImplemented


def array_ufunc(ufunc: Any, method: str, inputs: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """A :class:`LazyMap` for an elementwise ufunc call, or ``NotImplemented``.

    Called by the ``__array_ufunc__`` of a lazy chunk; ``out=``, ``where=``,
    other methods (``reduce``, ``accumulate``, ...) and ufuncs of several outputs
    are not streamed.
    """
    if method != "__call__" or kwargs or ufunc.nout != 1:
        return NotImplemented
    return LazyMap.build(ufunc, inputs)


def method(chunk: Any, name: str) -> Callable[..., Any] | None:
    """The streamed ndarray method ``name`` of a lazy chunk (``chunk.sum(...)``), or None."""
    func: Callable[..., Any] | None = METHODS.get(name)
    if func is None:
        return None
    return lambda *args, **kwargs: func(chunk, *args, **kwargs)


# ---------------------------------------------------------------------------- expressions


class LazyArray(np.lib.mixins.NDArrayOperatorsMixin):
    """What a lazy chunk knows without reading (its ``shape`` and ``dtype``); every other
    use goes through ``values()``. Pickles as that ndarray. Base of :class:`LazyMap` and
    :class:`nasar_zarr.backend.LazyRows`."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def values(self) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self.values()
        if dtype is not None and np.dtype(dtype) != values.dtype:
            return values.astype(dtype)
        return values.copy() if copy else values

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (np.asarray, (self.values(),))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values())


class LazyMap(LazyArray):
    """An elementwise expression over lazy chunks with the same samples, not yet evaluated.

    ``func(*operands)`` where each operand is a lazy chunk (a LazyRows or
    another LazyMap) of ``n`` samples, a numpy array that broadcasts against it
    (one with ``n`` rows is cut along with the pieces) or a scalar. A streamed
    reduction evaluates it a piece at a time; any other use as an array
    (``np.asarray``, indexing, an attribute) evaluates it whole, once.
    Pickles as that array.

    Parameters
    ----------
    func
        A ufunc or :func:`numpy.where`.
    operands
        Its arguments.
    shape, dtype
        The result's (found by :meth:`build`).
    """

    def __init__(
        self, func: Any, operands: tuple[Any, ...], shape: tuple[int, ...], dtype: np.dtype
    ) -> None:
        self.func = func
        self.operands = operands
        self.shape = shape
        self.dtype = dtype
        self._values: np.ndarray | None = None
        self._lock = threading.Lock()

    @classmethod
    def build(cls, func: Any, args: Sequence[Any]) -> LazyMap | Any:
        """``func(*args)`` as a LazyMap, or ``NotImplemented`` where it cannot stream
        (inputs of different lengths, an operand that would not be cut by rows, a 0-d
        result, an already evaluated chunk)."""
        lazies = [a for a in args if is_lazy(a)]
        if not lazies or any(_evaluated(a) for a in lazies):
            return NotImplemented
        n = lazies[0].shape[0]
        if n == 0 or any(a.shape[0] != n for a in lazies):
            return NotImplemented
        ndim = max(a.ndim for a in lazies)
        operands = []
        for a in args:
            if not is_lazy(a) and not np.isscalar(a):
                if not isinstance(a, np.ndarray) or a.ndim > ndim:
                    return NotImplemented
                if a.ndim == ndim and a.shape[0] not in (1, n):
                    return NotImplemented
            operands.append(a)
        try:  # the result's dtype and shape, from zero rows of every input
            with np.errstate(all="ignore"):
                meta = func(*(_rows(a, 0, 0, n, {}) for a in operands))
        except (TypeError, ValueError):
            return NotImplemented
        if not isinstance(meta, np.ndarray) or meta.ndim != ndim:
            return NotImplemented
        return cls(func, tuple(operands), (n, *meta.shape[1:]), meta.dtype)

    # --- the array, evaluated once
    def values(self) -> np.ndarray:
        """The expression evaluated whole (on the first call, then kept).

        As numpy would have evaluated it: its lazy chunks read whole (and kept by
        them, so another use of a chunk does not read it again), each step applied
        to whole arrays; the steps' results are not kept.
        """
        if self._values is None:
            with self._lock:
                if self._values is None:
                    self._values = np.asarray(_whole(self))
        return self._values

    def __array_ufunc__(self, ufunc: Any, method_name: str, *inputs: Any, **kwargs: Any) -> Any:
        done = array_ufunc(ufunc, method_name, inputs, kwargs)
        if done is not NotImplemented:
            return done
        return getattr(ufunc, method_name)(*_unwrap(inputs), **_unwrap(kwargs))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        done = array_function(func, args, kwargs)
        if done is not NotImplemented:
            return done
        return func(*_unwrap(args), **_unwrap(kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("func", "operands", "_values", "_lock"):
            raise AttributeError(name)
        streamed = method(self, name)
        return streamed if streamed is not None else getattr(self.values(), name)

    def __getitem__(self, key: Any) -> Any:
        return self.values()[key]

    def __repr__(self) -> str:
        name = getattr(self.func, "__name__", repr(self.func))
        state = "evaluated" if self._values is not None else "not evaluated"
        return f"LazyMap({name}, shape={self.shape}, dtype={self.dtype}, {state})"


@sizeof.register(LazyMap)
def _sizeof_lazy_map(value: LazyMap) -> int:
    return value.nbytes


def _whole(value: Any) -> Any:
    if isinstance(value, LazyMap):
        if value._values is not None:
            return value._values
        return value.func(*(_whole(v) for v in value.operands))
    if _is_rows(value):
        return value.values()
    return value


def _evaluated(value: Any) -> bool:
    return value._values is not None


def _unwrap(value: Any) -> Any:
    if is_lazy(value):
        return value.values()
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _rows(
    value: Any, a: int, b: int, n: int, cache: dict[int, Any], ahead: _Pass | None = None
) -> Any:
    """Rows ``a:b`` of an operand of ``n`` rows. A lazy chunk is read or evaluated once per
    piece (``cache``, keyed by the operand's id, lives for one piece); ``ahead`` holds
    the reads of a remote chunk's next pieces, already in flight."""
    if isinstance(value, LazyMap):
        if value._values is not None:
            return value._values[a:b]
        got = cache.get(id(value))
        if got is None:
            got = value.func(*(_rows(v, a, b, n, cache, ahead) for v in value.operands))
            cache[id(value)] = got
        return got
    if _is_rows(value):
        got = cache.get(id(value))
        if got is None:
            got = ahead.take(value, a, b) if ahead is not None else None
            if got is None:
                got = _read(value, a, b)
            cache[id(value)] = got
        return got
    if isinstance(value, np.ndarray) and value.ndim and value.shape[0] == n and n != 1:
        return value[a:b]
    return value


def _read(chunk: Any, a: int, b: int) -> np.ndarray:
    """Samples ``a:b`` of a LazyRows: its narrowing, read by the fast reader (only the
    inner chunks that hold them), or a view of its values where already read."""
    if chunk._values is not None:
        return np.asarray(chunk._values[a:b])
    return np.asarray(chunk[a:b].values())


def _remote(value: Any) -> bool:
    return getattr(value.layout, "location", None) is not None


class _Pass:
    """One pass over a lazy chunk's pieces: on a remote store, the reads of the next
    :data:`REMOTE_AHEAD` pieces of each remote input in flight (threads of this pass
    only, shut down with it), so the pass pays the latency once, not once a piece."""

    def __init__(self, value: Any, spans: list[tuple[int, int]]) -> None:
        self.remote = [leaf for leaf in _leaves(value) if leaf._values is None and _remote(leaf)]
        self.spans = spans
        self.pool = ThreadPoolExecutor(REMOTE_AHEAD) if self.remote else None
        self.futures: dict[tuple[int, int, int], Future[np.ndarray]] = {}
        self.submitted = 0

    def __enter__(self) -> _Pass:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def advance(self, i: int) -> None:
        """Piece ``i`` is next: keep it and the following pieces' reads in flight."""
        if self.pool is None:
            return
        while self.submitted < min(len(self.spans), i + REMOTE_AHEAD):
            a, b = self.spans[self.submitted]
            for leaf in self.remote:
                self.futures[id(leaf), a, b] = self.pool.submit(_read, leaf, a, b)
            self.submitted += 1

    def take(self, leaf: Any, a: int, b: int) -> np.ndarray | None:
        future = self.futures.pop((id(leaf), a, b), None)
        return None if future is None else future.result()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i, span in enumerate(self.spans):
            self.advance(i)
            yield span


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, LazyMap):
        for v in value.operands:
            yield from _leaves(v)
    elif is_lazy(value):
        yield value


def pieces(value: Any, piece_bytes: int | None = None) -> list[tuple[int, int]]:
    """``(a, b)`` row ranges covering a lazy chunk: about ``piece_bytes`` of its widest
    input each, cut at its first input's inner-chunk boundaries where its rows are
    contiguous (so no inner chunk is decoded twice)."""
    n = value.shape[0]
    leaves = [leaf for leaf in _leaves(value) if leaf._values is None] or [value]
    if piece_bytes is None:
        remote = any(_is_rows(leaf) and _remote(leaf) for leaf in leaves)
        piece_bytes = REMOTE_PIECE_BYTES if remote else PIECE_BYTES
    row_bytes = max(int(np.prod(leaf.shape[1:])) * leaf.dtype.itemsize for leaf in leaves)
    first = leaves[0]
    layout = getattr(first, "layout", None)
    inner = int(layout.inner) if layout is not None else 1
    k = max(1, piece_bytes // max(1, row_bytes * inner))
    if layout is not None:  # whole pieces per shard, so none spans two objects
        per_shard = max(1, layout.shard // inner)
        k = max(d for d in range(1, min(k, per_shard) + 1) if per_shard % d == 0)
    step = k * inner
    rows = getattr(first, "rows", None)
    start = rows.start if isinstance(rows, range) and rows.step == 1 else 0
    edges = [0]
    b = -(-(start + 1) // step) * step - start  # the first boundary after the start
    while b < n:
        edges.append(b)
        b += step
    edges.append(n)
    return list(zip(edges[:-1], edges[1:], strict=True))


# ---------------------------------------------------------------------------- reductions


def reduce(
    value: Any,
    kind: str,
    *,
    skipnan: bool = False,
    axis: Any = None,
    dtype: Any = None,
    out: Any = None,
    keepdims: Any = np._NoValue,
    **other: Any,
) -> Any:
    """``np.sum``/``nansum``/``min``/... of a lazy chunk, a piece at a time.

    Parameters
    ----------
    value
        A LazyRows or :class:`LazyMap`.
    kind
        ``"sum"``, ``"min"``, ``"max"``, ``"any"`` or ``"all"``.
    skipnan
        The ``nan`` variant (``nansum``, ``nanmin``, ``nanmax``).
    axis, dtype, keepdims
        As numpy's.
    out, **other
        ``out``, ``initial``, ``where``: given, the chunk is read whole and numpy
        does the rest.

    Returns
    -------
    numpy.ndarray or numpy scalar
        What numpy returns for the whole chunk (see the module docstring for sums
        of floats).
    """
    keep = False if keepdims is np._NoValue else bool(keepdims)
    func = _numpy_func(kind, skipnan)
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    n = value.shape[0]
    if out is not None or other or _evaluated(value) or n == 0:
        return func(value.values(), axis=axis, out=out, keepdims=keep, **kwargs, **other)
    try:
        axes = tuple(range(value.ndim)) if axis is None else _axes(axis, value.ndim)
    except (TypeError, ValueError, np.exceptions.AxisError):
        return func(value.values(), axis=axis, keepdims=keep, **kwargs)
    if not axes:
        return func(value.values(), axis=axis, keepdims=keep, **kwargs)
    handed = _take_handover(value, kind, skipnan, axes, dtype, keep)
    if handed is not None:
        return handed
    if kind == "sum":
        # xarray's nansum: sum(where(isnan(x), 0, x)), the same values as nansum(x)
        masked = _nan_masked(value)
        if masked is not None:
            value, skipnan, func = masked, True, np.nansum
    counted = _counted(value) if kind == "sum" else None
    parts: list[Any] = []
    sums: list[Any] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # All-NaN pieces: judged whole
        source = counted if counted is not None else value
        with _Pass(source, pieces(source)) as ahead:
            for a, b in ahead:
                piece = _rows(source, a, b, n, {}, ahead)
                if counted is not None:
                    # dask's mean/var count a chunk's non-NaN values (sum(~isnan(x))),
                    # then nansum it with the same arguments: both in one pass, the sum
                    # handed over
                    count, total = _count_and_nansum(piece, axes, kwargs)
                    parts.append(count)
                    sums.append(total)
                else:
                    parts.append(_piece_reduce(piece, kind, skipnan, func, axes, kwargs))
    result = _combine(parts, kind, skipnan, axes)
    if counted is not None:
        result = result.astype(np.dtype(dtype) if dtype is not None else np.intp)
        if all(total is not None for total in sums):
            _give_handover(counted, axes, dtype, _combine(sums, "sum", True, axes))
    if kind in ("min", "max") and skipnan and np.isnan(result).any():
        warnings.warn("All-NaN slice encountered", RuntimeWarning, stacklevel=4)
    return _finish(result, axes, keep)


def _piece_reduce(
    piece: np.ndarray,
    kind: str,
    skipnan: bool,
    func: Callable[..., Any],
    axes: tuple[int, ...],
    kwargs: dict[str, Any],
) -> np.ndarray:
    if kind == "sum" and skipnan and piece.dtype.kind == "f":
        # nansum copies the piece to zero its NaN; a plain sum of a piece without NaN
        # adds the same values in the same order, so try that first
        total = np.sum(piece, axis=axes, keepdims=True, **kwargs)
        if not np.isnan(total).any():
            return total
    if kind == "sum" and piece.dtype == bool:  # counts: exact integers, cast once at the end
        return np.asarray(np.sum(piece, axis=axes, keepdims=True, dtype=np.int64))
    return np.asarray(func(piece, axis=axes, keepdims=True, **kwargs))


def _count_and_nansum(
    piece: np.ndarray, axes: tuple[int, ...], kwargs: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The non-NaN count (int64) and the nansum of a piece (None unless a float ``dtype``
    is asked for: only dask's mean/var hand a sum over), with keepdims."""
    dtype = kwargs.get("dtype")
    if dtype is None or np.dtype(dtype).kind not in "fc":
        return _count(~np.isnan(piece), axes), None
    total = np.sum(piece, axis=axes, keepdims=True, **kwargs)
    if not np.isnan(total).any():  # no NaN: every value counts, the sum is the nansum
        size = int(np.prod([piece.shape[i] for i in axes]))
        return np.full(total.shape, size, dtype=np.int64), total
    return _count(~np.isnan(piece), axes), np.nansum(piece, axis=axes, keepdims=True, **kwargs)


def _count(mask: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.asarray(np.sum(mask, axis=axes, keepdims=True, dtype=np.int64))


def _numpy_func(kind: str, skipnan: bool) -> Callable[..., Any]:
    for func, (k, nan) in REDUCTIONS.items():
        if k == kind and nan == skipnan:
            return func
    raise ValueError(f"no reduction {kind!r} (skipnan={skipnan})")


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    items = axis if isinstance(axis, (tuple, list)) else (axis,)
    axes = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"axis must be an integer, got {item!r}")
        if not -ndim <= int(item) < ndim:
            raise np.exceptions.AxisError(int(item), ndim)
        axes.append(int(item) % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError("duplicate value in 'axis'")
    return tuple(sorted(axes))


def _combine(parts: list[Any], kind: str, skipnan: bool, axes: tuple[int, ...]) -> np.ndarray:
    """The pieces' keepdims results as one: combined where the sample axis is reduced,
    else stacked along it."""
    if 0 not in axes:
        return np.concatenate(parts, axis=0)
    combine = COMBINE[kind, skipnan]
    result = np.asarray(parts[0]).copy()
    for part in parts[1:]:
        combine(result, part, out=result)
    return result


def _finish(result: np.ndarray, axes: tuple[int, ...], keep: bool) -> Any:
    if keep:
        return result
    squeezed = result.squeeze(axis=axes)
    return squeezed[()] if squeezed.ndim == 0 else squeezed


def _nan_masked(value: Any) -> Any:
    """The chunk ``x`` when ``value`` is ``where(isnan(x), 0, x)`` of ``x``'s dtype, else None."""
    if not isinstance(value, LazyMap) or value.func is not np.where:
        return None
    mask, zero, x = value.operands
    if not (isinstance(mask, LazyMap) and mask.func is np.isnan and mask.operands[0] is x):
        return None
    if not is_lazy(x) or x.dtype.kind != "f" or value.dtype != x.dtype:
        return None
    zero_value = zero.flat[0] if isinstance(zero, np.ndarray) and zero.size else zero
    if isinstance(zero, np.ndarray) and (zero.size == 0 or any(zero.strides)):
        return None  # only a broadcast scalar: checking a real array would cost a pass
    return x if np.isscalar(zero_value) and zero_value == 0 else None


def _counted(value: Any) -> Any:
    """The chunk ``x`` when ``value`` is ``~isnan(x)`` (dask's ``nannumel``), else None."""
    if not isinstance(value, LazyMap) or value.func not in (np.invert, np.logical_not):
        return None
    (inner,) = value.operands
    if not isinstance(inner, LazyMap) or inner.func is not np.isnan:
        return None
    (x,) = inner.operands
    return x if is_lazy(x) and x.dtype.kind == "f" else None


def _give_handover(
    chunk: Any, axes: tuple[int, ...], dtype: Any, keepdims_result: np.ndarray
) -> None:
    # on the chunk object itself (never module state): one pending nansum, replaced by the
    # next count pass; dict.__setitem__ is atomic, so threads sharing a chunk are safe
    vars(chunk)[MEMO] = ((axes, np.dtype(dtype).str), keepdims_result)


def _take_handover(
    value: Any, kind: str, skipnan: bool, axes: tuple[int, ...], dtype: Any, keep: bool
) -> Any:
    if kind != "sum" or not skipnan or dtype is None:
        return None
    pending = vars(value).get(MEMO)
    if pending is None or pending[0] != (axes, np.dtype(dtype).str):
        return None
    vars(value).pop(MEMO, None)
    return _finish(pending[1].copy(), axes, keep)


def sum_pieces(
    kernel: Callable[..., np.ndarray], chunk: Any, aligned: np.ndarray | None, **kwargs: Any
) -> np.ndarray:
    """``kernel(chunk, aligned, **kwargs)`` for an additive ``kernel``, a piece at a time.

    Parameters
    ----------
    kernel
        Maps rows of ``chunk`` (and the same rows of ``aligned``) to counts that
        add up over rows (the histogram's per-block counts).
    chunk
        A lazy chunk (read a piece at a time) or a numpy array (one call).
    aligned
        None or an array with the same rows as ``chunk``.

    Returns
    -------
    numpy.ndarray
        The sum of the kernel over the pieces: exactly the kernel of the whole.
    """
    if not is_lazy(chunk) or _evaluated(chunk) or chunk.shape[0] == 0:
        return kernel(np.asarray(chunk), aligned, **kwargs)
    total = None
    with _Pass(chunk, pieces(chunk)) as ahead:
        for a, b in ahead:
            part = kernel(
                np.asarray(_rows(chunk, a, b, chunk.shape[0], {}, ahead)),
                None if aligned is None else aligned[a:b],
                **kwargs,
            )
            total = part if total is None else total + part
    assert total is not None
    return total
