"""PyTorch datasets over the cube: the release loader's outputs, with random access.

The NA-SAR release ships streaming loaders (``NASARWebRTCDataset``,
``NASARWebInSARDataset``) over the WebDataset tars. :class:`RTCDataset` and
:class:`InSARDataset` return the same per-sample dicts (the dataset card's keys,
float32 tensors, the card's transforms) from the cube, as map-style datasets:
exact ``len``, random access, batched reads (``__getitems__``), and
:class:`ShardAwareSampler` for a deterministic, resumable, rank-split order that
keeps reads inside a few Zarr shards.

The transforms are those of :mod:`nasar_zarr.normalize` (the same numpy kernels),
so a sample equals ``ds.nasar.normalized()`` for that sample, bit for bit.

Fork safety: a dataset pickles without open handles and opens its reader lazily
in each process. :func:`dataloader` starts workers with ``forkserver`` (or
``spawn``). A process forked after tensorstore started its threads (PyTorch's
default start method on Linux, after the parent read the cube) cannot use
tensorstore again (tensorstore aborts it), so such a worker reads through
zarr-python instead, with a warning; ``engine="tensorstore"`` turns that into a
clear error.

Install with ``pip install 'nasar-zarr[torch]'``.
"""

from __future__ import annotations

import glob
import math
import multiprocessing
import os
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

try:
    import torch
    import torch.distributed as dist
    from torch import Tensor
    from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "nasar_zarr.torch needs PyTorch: pip install 'nasar-zarr[torch]' (CPU-only wheels:"
        " pip install torch --index-url https://download.pytorch.org/whl/cpu)"
    ) from err

from nasar_zarr import normalize, schema, store
from nasar_zarr.reader import CubeReader

__all__ = [
    "InSARDataset",
    "RTCDataset",
    "ShardAwareSampler",
    "collate",
    "dataloader",
    "safe_start_method",
    "shard_aware_order",
]

_F32 = np.dtype("float32")
_RTC_VARIABLES = ("rtc", schema.RTC_PRESENT)
_DEM_VARIABLES = ("dem", "slope_deg")
_PASSTHROUGH = ("inc_angle", "ifg", "coh")  # returned as stored
DEFAULT_WINDOW = 4  # ShardAwareSampler: shards whose blocks are shuffled together


# ------------------------------------------------------------------ fork safety


class _ForkGuard:
    """Is tensorstore usable in this process?

    tensorstore aborts a process forked after its thread pool started. Before each
    ``os.fork`` the parent notes whether those threads run; the child inherits the
    note (and keeps it for its own children).
    """

    unsafe = False  # this process descends from a fork taken while tensorstore ran
    opened = False  # a dataset of this module opened tensorstore in this process
    _threads_at_fork = False
    warned = False

    @classmethod
    def before(cls) -> None:
        cls._threads_at_fork = cls.opened or _tensorstore_threads_running()

    @classmethod
    def after_in_child(cls) -> None:
        cls.unsafe = cls.unsafe or cls._threads_at_fork
        cls.opened = False
        cls.warned = False


def _tensorstore_threads_running() -> bool:
    """Whether tensorstore's thread pool (threads named ``ts_pool_worker``) runs (Linux)."""
    for comm in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(comm) as f:
                if f.read().startswith("ts_pool"):
                    return True
        except OSError:  # the thread ended meanwhile
            continue
    return False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_ForkGuard.before, after_in_child=_ForkGuard.after_in_child)

_FORKED_HINT = (
    "this process was forked after tensorstore started its threads (multiprocessing start"
    " method 'fork' after the parent read the cube), and tensorstore aborts such a process."
    " Start workers with nasar_zarr.torch.dataloader(...) (forkserver) or"
    " DataLoader(..., multiprocessing_context='spawn')"
)


# ------------------------------------------------------------------ datasets


def _positions(indices: Any, group: Any, n: int, url: str) -> np.ndarray:
    """Cube positions from integer positions or a selection of the cube (``ds.nasar.select``)."""
    coords = getattr(indices, "coords", None)
    if coords is not None:
        if schema.SAMPLE_DIM not in coords:
            raise ValueError(
                f"indices is an xarray object without a {schema.SAMPLE_DIM!r} coordinate;"
                " pass a selection of the cube (e.g. ds.nasar.select(...)) or integer positions"
            )
        import pandas as pd

        wanted = np.asarray(indices[schema.SAMPLE_DIM].values).astype(object)
        keys = pd.Index(np.asarray(group[schema.SAMPLE_DIM][:]).astype(object))
        positions = keys.get_indexer(wanted)
        unknown = wanted[positions < 0]
        if unknown.size:
            raise ValueError(
                f"{unknown.size} sample key(s) of the selection are not in the cube at {url},"
                f" e.g. {[str(k) for k in unknown[:3]]}; select from the cube this dataset reads"
            )
        return positions.astype(np.int64)
    positions = np.asarray(indices)
    if positions.size == 0:
        return np.zeros(0, np.int64)
    if positions.ndim != 1 or not np.issubdtype(positions.dtype, np.integer):
        raise TypeError(
            f"indices must be a 1-D sequence of integer sample positions or a selection of"
            f" the cube, got {positions.dtype} with shape {positions.shape}"
        )
    if positions.min() < 0 or positions.max() >= n:
        raise IndexError(
            f"indices must lie in [0, {n}) for a cube of {n} samples, got values from"
            f" {positions.min()} to {positions.max()}"
        )
    return positions.astype(np.int64)


def _runs(cube_sorted: np.ndarray, inner_chunk: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Group sorted unique cube positions into runs over consecutive inner chunks.

    Returns the runs ``(start, stop)`` and, for each position, its row in the
    concatenation of the runs.
    """
    if cube_sorted.size == 0:
        return [], np.zeros(0, np.int64)
    chunk = cube_sorted // inner_chunk
    cut = np.flatnonzero(np.diff(chunk) > 1) + 1
    first = np.concatenate([[0], cut])
    last = np.concatenate([cut - 1, [cube_sorted.size - 1]])
    starts, stops = cube_sorted[first], cube_sorted[last] + 1
    offsets = np.concatenate([[0], np.cumsum(stops - starts)[:-1]])
    run_of = np.repeat(np.arange(first.size), last - first + 1)
    rows = offsets[run_of] + (cube_sorted - starts[run_of])
    return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)], rows


def _plan_reads(
    cube: np.ndarray, inner_chunk: int
) -> tuple[list[tuple[int, int]], np.ndarray | None]:
    """The runs to read for the cube positions ``cube`` (any order, duplicates allowed).

    Returns the runs and the rows of their concatenation to take, in request order;
    None when the runs, read in the returned order, already are the request (a batch
    of :class:`ShardAwareSampler` is whole blocks: no gather copy).
    """
    unique, inverse = np.unique(cube, return_inverse=True)
    runs, rows = _runs(unique, inner_chunk)
    n_read = sum(b - a for a, b in runs)
    if unique.size == cube.size == n_read and runs:
        starts = np.array([a for a, _ in runs])
        run_of = np.searchsorted(starts, cube, side="right") - 1
        first = np.unique(run_of, return_index=True)[1]
        ordered = [runs[k] for k in np.argsort(first)]
        if np.array_equal(np.concatenate([np.arange(a, b) for a, b in ordered]), cube):
            return ordered, None
    return runs, rows[inverse.reshape(-1)]


_Empty = Callable[[tuple[int, ...]], "Tensor"]


def _empty(shape: tuple[int, ...]) -> Tensor:
    return torch.empty(shape, dtype=torch.float32)


def _shared_empty(shape: tuple[int, ...]) -> Tensor:
    """A float32 tensor in shared memory: a DataLoader worker sends it without a copy.

    What ``default_collate`` does in a worker (torch's storage ``_new_shared``).
    """
    proto = torch.empty(0, dtype=torch.float32)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).view(shape)


def _batched(index: tuple[int, ...]) -> tuple[Any, ...]:
    """A placement's per-sample slot index, for every sample of a batch."""
    return (slice(None), *index)


class _CubeDataset(Dataset):
    """Shared machinery: selection, layout, lazy per-process reader, batched reads."""

    def __init__(
        self,
        url: str,
        *,
        variables: tuple[str, ...],
        storage_options: Mapping[str, Any] | None,
        indices: Any,
        engine: str | None,
        rtc_gain: float,
        rtc_ranges: Mapping[str, Sequence[float]] | None,
    ) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options) if storage_options else None
        if engine not in (None, "tensorstore", "zarr"):
            raise ValueError(f"engine must be 'tensorstore', 'zarr' or None, got {engine!r}")
        self.engine = engine
        ranges = dict(normalize.RTC_RANGES if rtc_ranges is None else rtc_ranges)
        pols = [str(p) for p in schema.LABELS["pol"]]
        missing = [p for p in pols if p not in ranges]
        if missing:
            raise ValueError(
                f"rtc_ranges has no range for polarization(s) {missing}; got keys"
                f" {sorted(ranges)}, expected one (p1, p99) pair per pol label {pols}"
            )
        bounds = np.array(
            [normalize._check_range(f"rtc_ranges[{p!r}]", ranges[p]) for p in pols], _F32
        )
        # The pol axis of rtc (sample, view, time, pol, y, x) is the third from the end.
        self._rtc_low, self._rtc_high = bounds[:, 0, None, None], bounds[:, 1, None, None]
        self._rtc_gain = _F32.type(rtc_gain)

        group: Any = store.open_group(self.url, self.storage_options)
        absent = [v for v in variables if v not in group]
        if absent:
            raise ValueError(self._absent_message(absent, sorted(group.array_keys())))
        self._variables = variables
        status = np.asarray(group[schema.STATUS][:])
        n = int(status.shape[0])
        layout = store.read_provenance(group.attrs).get("layout") or {}
        rtc = group["rtc"]
        self.inner_chunk = int(layout.get("inner_chunk") or rtc.chunks[0])
        self.shard_size = int(layout.get("shard") or (rtc.shards or rtc.chunks)[0])
        written = status == schema.STATUS_WRITTEN
        if indices is None:
            positions = np.flatnonzero(written).astype(np.int64)
        else:
            positions = _positions(indices, group, n, self.url)
            unwritten = positions[~written[positions]]
            if unwritten.size:
                raise ValueError(
                    f"indices include {unwritten.size} sample(s) that hold no data in {self.url}"
                    f" (status 0 pending or 2 rejected), e.g. positions {unwritten[:5].tolist()};"
                    " select written samples, e.g. with ds.nasar.select() (written_only=True)"
                )
        positions.flags.writeable = False
        self._sample_indices = positions
        self.cube_size = n
        self._reader: CubeReader | None = None
        self._reader_pid: int | None = None

    def _absent_message(self, absent: list[str], present: list[str]) -> str:
        return (
            f"the cube at {self.url} has no variable(s) {absent} that"
            f" {type(self).__name__} reads; it has {present}"
        )

    @property
    def sample_indices(self) -> np.ndarray:
        """Cube position (along ``sample``) of each item, read-only."""
        return self._sample_indices

    def __len__(self) -> int:
        return int(self._sample_indices.size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url!r}, {len(self)} of {self.cube_size} samples,"
            f" shard {self.shard_size}, inner chunk {self.inner_chunk})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # no open handles cross a process boundary
        state["_reader_pid"] = None
        return state

    @property
    def reader(self) -> CubeReader:
        """This process's reader, opened on first use (and again in a new process)."""
        pid = os.getpid()
        if self._reader is None or self._reader_pid != pid:
            engine = self.engine
            if _ForkGuard.unsafe and engine != "zarr":
                if engine == "tensorstore":
                    raise RuntimeError(
                        f"{type(self).__name__}(engine='tensorstore'): "
                        f"{_FORKED_HINT}, or pass engine=None to fall back."
                    )
                engine = "zarr"
                if not _ForkGuard.warned:
                    _ForkGuard.warned = True
                    warnings.warn(
                        f"nasar_zarr.torch: {_FORKED_HINT}. Reading through"
                        " zarr-python instead (slower).",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            reader = CubeReader(
                self.url,
                variables=self._variables,
                engine=engine,
                storage_options=self.storage_options,
            )
            if reader.engine == "tensorstore":
                _ForkGuard.opened = True
            self._reader, self._reader_pid = reader, pid
        return self._reader

    def _cube_positions(self, items: Sequence[int]) -> np.ndarray:
        items_arr = np.asarray(items, dtype=np.int64).reshape(-1)
        n = len(self)
        if items_arr.size and (items_arr.min() < -n or items_arr.max() >= n):
            bad = items_arr[(items_arr < -n) | (items_arr >= n)]
            raise IndexError(f"index {int(bad[0])} is out of range for a dataset of {n} samples")
        return self._sample_indices[items_arr]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: a dict of float32 tensors plus ``sample_key`` and ``index``."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(
                f"index must be an int, got {type(index).__name__}; use __getitems__ for a batch"
            )
        return self.__getitems__([int(index)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several samples in as few reads as possible (what a DataLoader asks per batch).

        The items are sorted, grouped into runs over consecutive inner Zarr chunks
        and read together (:meth:`nasar_zarr.reader.CubeReader.read_runs`); the
        card's transforms then run once over the batch.

        Parameters
        ----------
        indices
            Item positions in this dataset (duplicates and any order allowed).

        Returns
        -------
        list of dict
            One dict per requested item, in the requested order.
        """
        cube = self._cube_positions(indices)
        reader = self.reader
        runs, take = _plan_reads(cube, self.inner_chunk)
        data = reader.read_runs(runs)
        if take is not None:
            data = {name: values[take] for name, values in data.items()}
        empty = _shared_empty if torch.utils.data.get_worker_info() is not None else _empty
        arrays = self._transform(data, empty)
        keys = np.asarray(reader.keys)[cube]
        return [
            {
                **{key: values[j] for key, values in arrays.items()},
                "sample_key": str(keys[j]),
                "index": int(cube[j]),
            }
            for j in range(cube.size)
        ]

    def _rtc_items(self, data: Mapping[str, np.ndarray], empty: _Empty) -> dict[str, Tensor]:
        rtc = data["rtc"]  # (sample, view, time, pol, y, x)
        # Laid out (view, time, sample, pol, y, x): each output key is one contiguous batch.
        buffer = empty((rtc.shape[1], rtc.shape[2], rtc.shape[0], *rtc.shape[3:]))
        normalize.rtc_kernel(
            rtc,
            data[schema.RTC_PRESENT][..., None, None],
            self._rtc_low,
            self._rtc_high,
            gain=self._rtc_gain,
            out=buffer.numpy().transpose(2, 0, 1, 3, 4, 5),
        )
        return {p.source_key: buffer[p.index] for p in schema.VARIABLES["rtc"].placements}

    def _transform(self, data: Mapping[str, np.ndarray], empty: _Empty) -> dict[str, Tensor]:
        raise NotImplementedError


class RTCDataset(_CubeDataset):
    """The release's RTC loader (``NASARWebRTCDataset``) over the cube, map-style.

    Each item is a dict of float32 tensors ``prime_rtc_view_0``,
    ``secondary_rtc_view_0``, ``prime_rtc_view_1``, ``secondary_rtc_view_1``
    (each ``(2, 128, 128)``: co-pol, cross-pol) transformed as the dataset card
    says (``log1p(gain * x)``, then per-polarization clip-and-rescale; missing
    polarizations stay 0), plus ``sample_key`` (str) and ``index`` (int, the
    sample's position along the cube's ``sample`` dimension).

    Parameters
    ----------
    url
        Local path or fsspec URL of the cube.
    storage_options
        fsspec options for remote stores.
    indices
        The samples to serve: integer cube positions, or a selection of the cube
        (``ds.nasar.select(...)`` or any ``ds.isel/sel``), matched by sample key.
        Default: every written sample (``status == 1``). Every given sample must
        be written.
    rtc_gain, rtc_ranges
        The card's RTC transform: ``log1p(rtc_gain * x)`` and ``{"co": (p1, p99),
        "cross": (p1, p99)}`` (default ``{"co": (0.15, 2.39), "cross": (0.01, 1.09)}``).
    engine
        ``"tensorstore"``, ``"zarr"`` or None (tensorstore for local stores when
        installed); see :class:`nasar_zarr.reader.CubeReader`.

    Examples
    --------
    >>> ds = RTCDataset("demo-output/nasar.zarr")                 # doctest: +SKIP
    >>> item = ds[0]; item["prime_rtc_view_0"].shape
    torch.Size([2, 128, 128])
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        indices: Any = None,
        rtc_gain: float = normalize.RTC_GAIN,
        rtc_ranges: Mapping[str, Sequence[float]] | None = None,
        engine: str | None = None,
    ) -> None:
        super().__init__(
            url,
            variables=_RTC_VARIABLES,
            storage_options=storage_options,
            indices=indices,
            engine=engine,
            rtc_gain=rtc_gain,
            rtc_ranges=rtc_ranges,
        )

    def _transform(self, data: Mapping[str, np.ndarray], empty: _Empty) -> dict[str, Tensor]:
        return self._rtc_items(data, empty)


class InSARDataset(_CubeDataset):
    """The release's InSAR loader (``NASARWebInSARDataset``) over the cube, map-style.

    Everything :class:`RTCDataset` returns, plus ``inc_angle_view_0/1``
    ``(1, 128, 128)``, ``ifg_view_0/1`` ``(2, 128, 128)`` and ``coh_view_0/1``
    ``(1, 128, 128)`` as stored, and the card's DEM-derived channels
    ``dem_view_0/1``, ``dem_relief_view_0/1`` and ``slope_view_0/1``, each
    ``(1, 128, 128)`` in [0, 1]; the DEM is shared by both views (the two views'
    tensors are the same values).

    Parameters
    ----------
    url
        Local path or fsspec URL of the cube.
    require_dem
        True (default): the cube must hold ``dem`` and ``slope_deg``. False: a
        cube without them is accepted and the DEM-derived keys are left out.
    dem_range
        Global elevation ``(low, high)`` in metres mapped to [0, 1].
    relief_percentiles
        Patch-local ``(low, high)`` percentiles of the relief channel.
    slope_range
        Slope ``(low, high)`` in degrees mapped to [0, 1].
    storage_options, indices, rtc_gain, rtc_ranges, engine
        As in :class:`RTCDataset`.

    Examples
    --------
    >>> ds = InSARDataset("demo-output/nasar.zarr")               # doctest: +SKIP
    >>> sorted(ds[0])[:3]
    ['coh_view_0', 'coh_view_1', 'dem_relief_view_0']
    """

    def __init__(
        self,
        url: str,
        *,
        require_dem: bool = True,
        dem_range: Sequence[float] = normalize.DEM_RANGE,
        relief_percentiles: Sequence[float] = normalize.RELIEF_PERCENTILES,
        slope_range: Sequence[float] = normalize.SLOPE_RANGE,
        storage_options: Mapping[str, Any] | None = None,
        indices: Any = None,
        rtc_gain: float = normalize.RTC_GAIN,
        rtc_ranges: Mapping[str, Sequence[float]] | None = None,
        engine: str | None = None,
    ) -> None:
        self.dem_range = normalize._check_range("dem_range", dem_range)
        self.slope_range = normalize._check_range("slope_range", slope_range)
        lo, hi = normalize._check_range("relief_percentiles", relief_percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"relief_percentiles must lie in [0, 100], got {relief_percentiles!r}")
        self.relief_percentiles = (lo, hi)
        self.require_dem = bool(require_dem)
        variables: tuple[str, ...] = (*_RTC_VARIABLES, *_PASSTHROUGH)
        with_dem = self.require_dem or self._cube_has(url, storage_options, _DEM_VARIABLES)
        if with_dem:
            variables = (*variables, *_DEM_VARIABLES)
        self.with_dem = with_dem
        super().__init__(
            url,
            variables=variables,
            storage_options=storage_options,
            indices=indices,
            engine=engine,
            rtc_gain=rtc_gain,
            rtc_ranges=rtc_ranges,
        )

    @staticmethod
    def _cube_has(
        url: str, storage_options: Mapping[str, Any] | None, names: Sequence[str]
    ) -> bool:
        group = store.open_group(str(url), dict(storage_options) if storage_options else None)
        return all(name in group for name in names)

    def _absent_message(self, absent: list[str], present: list[str]) -> str:
        hint = (
            " (require_dem=False serves a cube without dem and slope_deg)"
            if set(absent) <= set(_DEM_VARIABLES)
            else ""
        )
        return super()._absent_message(absent, present) + hint

    def _transform(self, data: Mapping[str, np.ndarray], empty: _Empty) -> dict[str, Tensor]:
        out = self._rtc_items(data, empty)
        n = data["rtc"].shape[0]
        for name in _PASSTHROUGH:
            for p in schema.VARIABLES[name].placements:
                batch = empty((n, *schema.SOURCE_SHAPES[p.source_key]))
                batch.numpy()[...] = data[name][_batched(p.index)].reshape(batch.shape)
                out[p.source_key] = batch
        if self.with_dem:
            dem = data["dem"]
            derived = {
                "dem": normalize.clip_and_rescale(dem, *map(_F32.type, self.dem_range)),
                "dem_relief": normalize.relief_kernel(dem, percentiles=self.relief_percentiles),
                "slope": normalize.clip_and_rescale(
                    data["slope_deg"], *map(_F32.type, self.slope_range)
                ),
            }
            for name, values in derived.items():
                batch = empty((n, 1, *values.shape[1:]))
                batch.numpy()[:, 0] = values
                for view in (0, 1):  # the DEM is shared by both views: one buffer
                    out[f"{name}_view_{view}"] = batch
        return out


# ------------------------------------------------------------------ sampler


def shard_aware_order(
    sample_indices: Sequence[int] | np.ndarray,
    *,
    shard: int,
    inner_chunk: int,
    seed: int,
    epoch: int,
    window: int = DEFAULT_WINDOW,
) -> np.ndarray:
    """A shuffled order of items that keeps reads inside a few Zarr shards at a time.

    The shards are shuffled; consecutive groups of ``window`` shards (in that
    shuffled order) are visited one after another, and inside each group the
    inner-chunk blocks (the items sharing one inner Zarr chunk, kept together
    in cube order) are shuffled. A pure function of its arguments.

    Parameters
    ----------
    sample_indices
        Cube position of each item (``dataset.sample_indices``).
    shard, inner_chunk
        The cube's shard and inner chunk, in samples.
    seed, epoch
        Non-negative integers; the order depends on nothing else.
    window
        Shards whose blocks are shuffled together.

    Returns
    -------
    numpy.ndarray
        A permutation of ``range(len(sample_indices))`` (int64).

    Examples
    --------
    >>> shard_aware_order(np.arange(8), shard=4, inner_chunk=2, seed=0, epoch=0)  # doctest: +SKIP
    array([2, 3, 4, 5, 0, 1, 6, 7])
    """
    for name, value in (("seed", seed), ("epoch", epoch)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    for name, value in (("shard", shard), ("inner_chunk", inner_chunk), ("window", window)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    cube = np.asarray(sample_indices, dtype=np.int64).reshape(-1)
    if cube.size == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    shards, shard_of = np.unique(cube // int(shard), return_inverse=True)
    visit = np.empty(shards.size, np.int64)
    visit[rng.permutation(shards.size)] = np.arange(shards.size)  # shard -> its turn
    blocks, block_of = np.unique(cube // int(inner_chunk), return_inverse=True)
    block_key = rng.permutation(blocks.size)
    window_of = visit[shard_of.reshape(-1)] // int(window)
    return np.lexsort((np.arange(cube.size), cube, block_key[block_of.reshape(-1)], window_of))


class ShardAwareSampler(Sampler[int]):
    """Shuffled, shard-aware, rank-split and exactly resumable order of a cube dataset.

    Each epoch's order is :func:`shard_aware_order` of ``(seed, epoch)``: Zarr
    shards are visited in a shuffled order, and inner-chunk blocks are shuffled
    within a window of shards, so a batch reads a few whole inner chunks of a few
    shards. With several replicas (``num_replicas``/``rank``, or the initialised
    process group) the epoch's order is padded (repeating its start) or cut
    (``drop_last``) to a multiple of ``num_replicas``, as ``DistributedSampler``
    does, and rank ``r`` takes the ``r``-th contiguous share: equal lengths,
    disjoint apart from the padding, covering the dataset.

    Parameters
    ----------
    dataset
        A :class:`RTCDataset` or :class:`InSARDataset` (anything with
        ``sample_indices``, ``shard_size`` and ``inner_chunk``).
    shuffle
        False: items in dataset order (still split across ranks).
    seed
        Non-negative integer; the same on every rank.
    num_replicas, rank
        Default: the initialised ``torch.distributed`` process group, else 1 and 0.
    drop_last
        Cut the tail instead of padding when the size is not a multiple of ``num_replicas``.
    window
        Shards whose inner-chunk blocks are shuffled together.

    Examples
    --------
    >>> sampler = ShardAwareSampler(ds, seed=0)                   # doctest: +SKIP
    >>> loader = dataloader(ds, batch_size=64, sampler=sampler, num_workers=2)
    >>> for epoch in range(10):
    ...     sampler.set_epoch(epoch)
    ...     for batch in loader: ...
    """

    def __init__(
        self,
        dataset: Any,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        try:
            indices = np.asarray(dataset.sample_indices, dtype=np.int64)
            shard, inner = int(dataset.shard_size), int(dataset.inner_chunk)
        except AttributeError:
            raise TypeError(
                f"ShardAwareSampler needs a nasar_zarr.torch dataset (RTCDataset, InSARDataset),"
                f" got {type(dataset).__name__}; for other datasets use RandomSampler or"
                " DistributedSampler"
            ) from None
        if num_replicas is None:
            num_replicas = dist.get_world_size() if _distributed() else 1
        if rank is None:
            rank = dist.get_rank() if _distributed() else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                f"num_replicas={num_replicas}, rank={rank}"
            )
        shard_aware_order(
            indices[:1], shard=shard, inner_chunk=inner, seed=seed, epoch=0, window=window
        )  # validates the arguments
        self._cube = indices
        self._shard, self._inner, self.window = shard, inner, int(window)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        n = indices.size
        if self.drop_last and n % self.num_replicas:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._fingerprint = zlib.crc32(indices.tobytes()) ^ zlib.crc32(
            np.array([shard, inner], np.int64).tobytes()
        )
        self.epoch = 0
        self._resume_at = 0  # first position of the next iteration of this epoch
        self._yielded = 0  # positions of this epoch handed out so far (resumed ones included)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (call before each epoch); a new epoch starts at its beginning.

        Setting the epoch that :meth:`load_state_dict` restored keeps its position.
        """
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._resume_at = 0
            self._yielded = 0

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's items (dataset positions) for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self._cube.size
        if self.shuffle:
            order = shard_aware_order(
                self._cube,
                shard=self._shard,
                inner_chunk=self._inner,
                seed=self.seed,
                epoch=epoch,
                window=self.window,
            )
        else:
            order = np.arange(n, dtype=np.int64)
        if self.total_size > n:
            order = np.concatenate([order, np.resize(order, self.total_size - n)])
        else:
            order = order[: self.total_size]
        return order[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]

    def __iter__(self) -> Iterator[int]:
        share = self.epoch_indices()
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        return self._generate(share[start:].tolist())

    def _generate(self, items: list[int]) -> Iterator[int]:
        for item in items:
            self._yielded += 1
            yield item

    def state_dict(self, samples_consumed: int | None = None) -> dict[str, Any]:
        """Where this rank stands, to resume at exactly the next sample.

        Parameters
        ----------
        samples_consumed
            Samples of the current epoch your loop has consumed on this rank. Pass
            it when iterating through a DataLoader, which draws indices ahead of the
            loop (prefetching); default: the indices this sampler has handed out.

        Returns
        -------
        dict
            ``epoch``, ``position`` and the settings a resume must match.

        Examples
        --------
        >>> state = sampler.state_dict(samples_consumed=step * batch_size)  # doctest: +SKIP
        >>> sampler.load_state_dict(state)
        """
        position = self._yielded if samples_consumed is None else int(samples_consumed)
        if not 0 <= position <= self.num_samples:
            raise ValueError(
                f"samples_consumed must lie in [0, {self.num_samples}], got {samples_consumed}"
            )
        return {"epoch": self.epoch, "position": position, **self._settings()}

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window": self.window,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "drop_last": self.drop_last,
            "dataset_size": int(self._cube.size),
            "dataset_fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields this epoch's order from ``state["position"]``.

        Parameters
        ----------
        state
            From :meth:`state_dict` of a sampler with the same settings and dataset.
        """
        mine = self._settings()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            text = ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"cannot resume: the sampler or dataset differs from the saved state ({text})"
            )
        position = int(state["position"])
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"position must lie in [0, {self.num_samples}], got {position}")
        self.epoch = int(state["epoch"])
        self._resume_at = self._yielded = position


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------ loader


def safe_start_method() -> str:
    """``"forkserver"`` where the platform has it, else ``"spawn"``: never ``"fork"``.

    Returns
    -------
    str
        A multiprocessing start method for DataLoader workers.

    Examples
    --------
    >>> safe_start_method()                                        # doctest: +SKIP
    'forkserver'
    """
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def collate(batch: list[Any]) -> Any:
    """``default_collate``, without copying tensors that already are the rows of one batch.

    :meth:`~RTCDataset.__getitems__` writes each output key of a batch into one
    buffer (in shared memory inside a DataLoader worker), so the batch of a key
    is that buffer itself; stacking its rows again would copy every byte. Anything
    else is collated by ``default_collate``, with the same result.

    Parameters
    ----------
    batch
        A list of samples (dicts), as the DataLoader passes it.

    Returns
    -------
    dict
        ``default_collate``'s batch: a tensor per key with the batch axis first,
        a list of ``sample_key`` strings, an int64 tensor of ``index``.

    Examples
    --------
    >>> loader = DataLoader(ds, batch_size=64, collate_fn=collate)  # doctest: +SKIP
    """
    if not batch or not isinstance(batch[0], Mapping):
        return default_collate(batch)
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        rows = _rows_of_one_buffer(values)
        out[key] = rows if rows is not None else default_collate(values)
    return out


def _rows_of_one_buffer(values: list[Any]) -> Tensor | None:
    """The batch tensor whose rows ``values`` are, in order; None if they are not."""
    first = values[0]
    if not isinstance(first, torch.Tensor) or not first.is_contiguous():
        return None
    pointer, step = first.untyped_storage().data_ptr(), first.numel()
    offset, shape = first.storage_offset(), first.shape
    for j, value in enumerate(values):
        if not (
            isinstance(value, torch.Tensor)
            and value.untyped_storage().data_ptr() == pointer
            and value.shape == shape
            and value.dtype == first.dtype
            and value.is_contiguous()
            and value.storage_offset() == offset + j * step
        ):
            return None
    return first.as_strided((len(values), *shape), (step, *first.stride()), offset)


def dataloader(dataset: Any, **kwargs: Any) -> DataLoader:
    """A ``torch.utils.data.DataLoader`` with fork-safe defaults for the cube's datasets.

    With ``num_workers > 0`` and no ``multiprocessing_context`` given, workers start
    with :func:`safe_start_method` (forkserver, whose server preloads this module so
    that each worker starts in a fraction of a second) and ``persistent_workers``
    defaults to True (worker start-up is paid once, not every epoch). ``collate_fn``
    defaults to :func:`collate` (the batch buffers the datasets build, without a
    copy). Every other argument is the DataLoader's.

    Parameters
    ----------
    dataset
        Usually an :class:`RTCDataset` or :class:`InSARDataset`.
    **kwargs
        Passed to ``DataLoader`` (``batch_size``, ``sampler``, ``num_workers``...).

    Returns
    -------
    torch.utils.data.DataLoader

    Examples
    --------
    >>> ds = InSARDataset("demo-output/nasar.zarr")                # doctest: +SKIP
    >>> loader = dataloader(ds, batch_size=64, sampler=ShardAwareSampler(ds), num_workers=2)
    """
    if kwargs.get("num_workers", 0) > 0:
        if kwargs.get("multiprocessing_context") is None:
            method = safe_start_method()
            context = multiprocessing.get_context(method)
            if method == "forkserver":
                context.set_forkserver_preload([__name__])
            kwargs["multiprocessing_context"] = context
        kwargs.setdefault("persistent_workers", True)
    kwargs.setdefault("collate_fn", collate)
    return DataLoader(dataset, **kwargs)
