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
Options: ``precision="fast"`` (torch kernels, :mod:`nasar_zarr.torch_transforms`),
``device=`` (workers only read; the transforms run on that device in the main
process), ``stack=True`` (the model's input as one ``x`` tensor, channel names in
``dataset.channels``) and ``dtype=torch.bfloat16`` / ``torch.float16`` (rounded
to nearest from the float32 values). See docs/TRAINING.md.

Every output key owns its memory: no two keys (and no two items of a batch)
share elements, so an in-place augmentation of one changes nothing else.

Fork safety: local cubes are read through the stateless shard decoder of
:mod:`nasar_zarr.backend` (no threads, handles or event loops), so a
``DataLoader`` with the ``fork`` start method works after the parent read, with
no warning; :func:`dataloader` uses the platform's default start method.
``engine="tensorstore"`` cannot be used in a process forked after tensorstore
started its threads (it aborts such a process): that raises a clear error.

Install with ``pip install 'nasar-zarr[torch]'``.
"""

from __future__ import annotations

import functools
import glob
import math
import multiprocessing
import operator
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
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

from nasar_zarr import errors, normalize, schema, source, store
from nasar_zarr import torch_transforms as fast_kernels
from nasar_zarr.reader import ENGINES, CubeReader

__all__ = [
    "CubeDataLoader",
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
_DERIVED = ("dem", "dem_relief", "slope")  # the card's DEM channels, one per view
DEFAULT_WINDOW = 4  # ShardAwareSampler: shards whose blocks are shuffled together
PRECISIONS = ("exact", "fast")
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RAW_PREFIX = "raw/"  # keys of a batch read with device=: transformed by dataset.finish()


# ------------------------------------------------------------------ fork safety


class _ForkGuard:
    """Is tensorstore usable in this process?

    tensorstore aborts a process forked after its thread pool started. Before each
    ``os.fork`` the parent notes whether those threads run; the child inherits the
    note (and keeps it for its own children). Only ``engine="tensorstore"`` cares.
    """

    unsafe = False  # this process descends from a fork taken while tensorstore ran
    opened = False  # a dataset of this module opened tensorstore in this process
    _threads_at_fork = False

    @classmethod
    def before(cls) -> None:
        cls._threads_at_fork = cls.opened or _tensorstore_threads_running()

    @classmethod
    def after_in_child(cls) -> None:
        cls.unsafe = cls.unsafe or cls._threads_at_fork
        cls.opened = False


def _tensorstore_threads_running() -> bool:
    """Whether tensorstore's thread pool (threads named ``ts_pool_worker``) runs (Linux)."""
    if "tensorstore" not in sys.modules:
        return False
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
    " Use the default engine (engine=None, the fork-safe shard reader), or start workers"
    " with DataLoader(..., multiprocessing_context='forkserver')"
)


# ------------------------------------------------------------------ datasets


def _open_cube(url: str, storage_options: Mapping[str, Any] | None) -> Any:
    """The cube's root group, or :class:`~nasar_zarr.errors.NotACubeError` with a hint."""
    try:
        group = store.open_group(url, storage_options)
    except errors.NotACubeError:
        raise
    except FileNotFoundError as err:  # zarr's GroupNotFoundError is one too
        raise errors.NotACubeError(_not_a_cube_message(url)) from err
    if "rtc" not in group or schema.STATUS not in group or schema.SAMPLE_DIM not in group:
        raise errors.NotACubeError(_not_a_cube_message(url))
    return group


def _not_a_cube_message(url: str) -> str:
    message = f"{url} holds no nasar-zarr cube (no Zarr group with rtc, status and sample)"
    folder = Path(url.split("://", 1)[1] if url.startswith("file://") else url)
    if not source.is_remote(url) and (folder / "metadata.parquet").exists():
        if any(folder.glob("*.tar")) or any(folder.glob("*/*.tar")):
            return (
                f"{message}; it looks like the NA-SAR WebDataset corpus (tars and"
                f" metadata.parquet): convert it first with `nasar-zarr convert {url} DEST`"
                " and pass DEST"
            )
    return f"{message}; pass the output of `nasar-zarr convert SRC DEST`"


def _item_index(index: Any) -> int:
    """An item position from an int-like (int, numpy integer, integer tensor); no booleans."""
    dtype = getattr(index, "dtype", None)
    if isinstance(index, (bool, np.bool_)) or dtype in (torch.bool, np.dtype(bool)):
        raise TypeError(
            f"index must be an integer, got the boolean {index!r}; booleans are not positions"
        )
    try:
        return operator.index(index)
    except TypeError:
        raise TypeError(
            f"index must be an integer (int, numpy integer or one-element integer tensor),"
            f" got {type(index).__name__}; use __getitems__ for a batch"
        ) from None


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


_Empty = Callable[..., "Tensor"]


def _empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU tensor in numpy's memory where numpy has the dtype: numpy asks the kernel for
    transparent huge pages on large arrays, torch does not (first touch of a fresh batch
    buffer ~4x cheaper here); bfloat16 has no numpy dtype."""
    if dtype == torch.bfloat16:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(shape, _NUMPY_DTYPES[dtype]))


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A tensor in shared memory: a DataLoader worker sends it without a copy.

    What ``default_collate`` does in a worker (torch's storage ``_new_shared``).
    """
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).view(shape)


def _batched(index: tuple[int, ...]) -> tuple[Any, ...]:
    """A placement's per-sample slot index, for every sample of a batch."""
    return (slice(None), *index)


def _as_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}"
        )
    return dtype


POOL_KEY = "_buffer"  # an item's pooled buffer: worker * POOL_SLOTS + slot, or -1
POOL_SLOTS = 8  # pooled batch buffers per worker (prefetch + batches the loop still holds)


class _Pool:
    """Shared-memory batch buffers of one worker of a :class:`CubeDataLoader`, reused.

    A fresh shared-memory segment per batch costs the kernel a zeroed 4 KiB page
    at a time (~0.6 ms per sample of float32 outputs on the benchmark machine).
    A buffer is reused only after the main process has marked its slot free in
    ``flags`` (shared, one row per worker), which it does once nothing there
    references the batch any more; a worker that finds no free slot allocates a
    fresh, unpooled buffer. The pool lives in the worker's own copy of the dataset.
    """

    def __init__(self, flags: Tensor, worker: int) -> None:
        self.flags = flags
        self.worker = worker
        self.buffers: dict[int, Tensor] = {}
        self._scratch: Tensor | None = None

    def scratch(self, numel: int) -> Tensor:
        """This worker's private float32 scratch (half-precision batches are computed in
        it, then rounded into a shared buffer); never sent, so reused freely."""
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = _empty((numel,), torch.float32)
        return self._scratch[:numel]

    def take(self, numel: int, dtype: torch.dtype) -> tuple[int, Tensor]:
        row = self.flags[self.worker]
        free = [slot for slot, flag in enumerate(row.tolist()) if flag]
        for slot in free:
            buffer = self.buffers.get(slot)
            if buffer is not None and buffer.dtype == dtype and buffer.numel() >= numel:
                row[slot] = 0
                return self.worker * POOL_SLOTS + slot, buffer[:numel]
        unused = [s for s in range(POOL_SLOTS) if s not in self.buffers]
        slot = unused[0] if unused else (free[0] if free else -1)
        buffer = _shared_empty((numel,), dtype)
        if slot < 0:
            return -1, buffer
        row[slot] = 0
        self.buffers[slot] = buffer
        return self.worker * POOL_SLOTS + slot, buffer


class _Block:
    """Where a batch's flat output buffer comes from: a worker's pool, or ``empty``."""

    def __init__(self, pool: _Pool | None, empty: _Empty) -> None:
        self.pool = pool
        self.empty = empty
        self.tag = -1

    def take(self, numel: int, dtype: torch.dtype) -> Tensor:
        if self.pool is None:
            return self.empty((numel,), dtype)
        self.tag, buffer = self.pool.take(numel, dtype)
        return buffer


def _start_pool(flags: Tensor, user_init: Callable[[int], None] | None, worker_id: int) -> None:
    """``worker_init_fn`` of a :class:`CubeDataLoader`: this worker's buffer pool."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, _CubeDataset):
        info.dataset._pool = _Pool(flags, worker_id)
    if user_init is not None:
        user_init(worker_id)


class _CubeDataset(Dataset):
    """Shared machinery: selection, layout, lazy per-process reader, batched reads, outputs."""

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
        precision: str,
        device: Any,
        stack: bool,
        dtype: Any,
        group: Any,
    ) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options) if storage_options else None
        if engine not in (None, *ENGINES):
            raise ValueError(
                f"engine must be one of {', '.join(map(repr, ENGINES))} or None, got {engine!r}"
            )
        self.engine = engine
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
        if device is not None and precision != "fast":
            raise ValueError(
                f"device={device!r} runs the fast transforms on that device; pass"
                " precision='fast' with it (the exact transforms are numpy's, on the CPU)"
            )
        self.precision = precision
        self.device = None if device is None else torch.device(device)
        self.stack = bool(stack)
        self.dtype = _as_dtype(dtype)
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
        self._pool: _Pool | None = None  # set in the workers of a CubeDataLoader

    # --- what the outputs are
    def _output_keys(self) -> list[tuple[str, tuple[str, ...]]]:
        """Each output key with the names of its channels, in output order."""
        pols = tuple(str(p) for p in schema.LABELS["pol"])
        return [(p.source_key, pols) for p in schema.VARIABLES["rtc"].placements]

    @property
    def output_keys(self) -> tuple[str, ...]:
        """The per-sample tensor keys of an item (without ``stack``), in order."""
        return tuple(key for key, _ in self._output_keys())

    @property
    def channels(self) -> tuple[str, ...]:
        """Names of the channels of ``x`` (``stack=True``), in order.

        ``key`` for a one-channel key, ``key/label`` otherwise (``prime_rtc_view_0/co``,
        ``ifg_view_1/sin``): ``x`` is ``torch.cat([item[key] for key in output_keys])``.
        """
        return tuple(
            f"{key}/{label}" if len(labels) > 1 else key
            for key, labels in self._output_keys()
            for label in labels
        )

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
        options = [f"precision={self.precision!r}"]
        if self.device is not None:
            options.append(f"device={str(self.device)!r}")
        if self.stack:
            options.append("stack=True")
        if self.dtype != torch.float32:
            options.append(f"dtype={self.dtype}")
        return (
            f"{type(self).__name__}({self.url!r}, {len(self)} of {self.cube_size} samples,"
            f" shard {self.shard_size}, inner chunk {self.inner_chunk}, {', '.join(options)})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # no open handles cross a process boundary
        state["_reader_pid"] = None
        state["_pool"] = None
        return state

    @property
    def reader(self) -> CubeReader:
        """This process's reader: opened on first use; a fork-safe one is kept across fork."""
        pid = os.getpid()
        reader = self._reader
        if reader is not None and (self._reader_pid == pid or reader.fork_safe):
            return reader
        if _ForkGuard.unsafe and self.engine == "tensorstore":
            raise RuntimeError(f"{type(self).__name__}(engine='tensorstore'): {_FORKED_HINT}.")
        reader = CubeReader(
            self.url,
            variables=self._variables,
            engine=self.engine,
            storage_options=self.storage_options,
        )
        if reader.engine == "tensorstore":
            _ForkGuard.opened = True
        self._reader, self._reader_pid = reader, pid
        return reader

    def _cube_positions(self, items: Sequence[int]) -> np.ndarray:
        raw = np.asarray(items.cpu() if isinstance(items, torch.Tensor) else items)
        if raw.size and not np.issubdtype(raw.dtype, np.integer):
            raise TypeError(
                f"indices must be integer item positions, got {raw.dtype} values"
                + (" (booleans are not positions)" if raw.dtype == bool else "")
            )
        items_arr = raw.astype(np.int64).reshape(-1)
        n = len(self)
        if items_arr.size and (items_arr.min() < -n or items_arr.max() >= n):
            bad = items_arr[(items_arr < -n) | (items_arr >= n)]
            raise IndexError(f"index {int(bad[0])} is out of range for a dataset of {n} samples")
        return self._sample_indices[items_arr]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: a dict of tensors plus ``sample_key`` and ``index``.

        ``index`` is an int, a numpy integer or a one-element integer tensor;
        booleans are refused.
        """
        return self.__getitems__([_item_index(index)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several samples in as few reads as possible (what a DataLoader asks per batch).

        The items are read together (the shard decoder reads each inner chunk
        once, :func:`nasar_zarr.backend.read_rows`); the card's transforms then
        run once over the batch, into one buffer per output key (in shared
        memory inside a DataLoader worker), or into ``x`` with ``stack=True``.
        With ``device=`` a worker only reads: the batch carries the raw arrays
        (``raw/<variable>``) and :meth:`finish` transforms them on the device
        (:func:`dataloader` calls it).

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
        data = self._read(cube)
        in_worker = torch.utils.data.get_worker_info() is not None
        pool = self._pool if in_worker else None
        block = _Block(pool, _shared_empty if in_worker else _empty)
        if self.device is not None and in_worker:
            arrays = self._raw_tensors(data, block)
        elif self.device is not None:
            moved = {k: torch.from_numpy(v).to(self.device) for k, v in data.items()}
            arrays = self._outputs(moved, None)
        else:
            arrays = self._outputs(data, block)
        keys = np.asarray(self.reader.keys)[cube]
        tag = {} if pool is None else {POOL_KEY: block.tag}
        return [
            {
                **{key: values[j] for key, values in arrays.items()},
                "sample_key": str(keys[j]),
                "index": int(cube[j]),
                **tag,
            }
            for j in range(cube.size)
        ]

    def _read(self, cube: np.ndarray) -> dict[str, np.ndarray]:
        reader = self.reader
        if reader.engine == "shards":  # request order and repeats handled by the decoder
            return reader[cube]
        runs, take = _plan_reads(cube, self.inner_chunk)
        data = reader.read_runs(runs)
        if take is not None:
            data = {name: values[take] for name, values in data.items()}
        return data

    def _raw_tensors(self, data: Mapping[str, np.ndarray], block: _Block) -> dict[str, Tensor]:
        """The raw arrays in (shared) tensors, for :meth:`finish` on the device: the float
        arrays carved out of one block, the masks (a few bytes) apart."""
        floats = {k: v for k, v in data.items() if v.dtype != np.bool_}
        flat = block.take(sum(v.size for v in floats.values()), torch.float32)
        out = {}
        offset = 0
        for name, values in data.items():
            if values.dtype == np.bool_:
                tensor = _shared_empty(values.shape, torch.bool)
            else:
                tensor = flat[offset : offset + values.size].view(values.shape)
                offset += values.size
            tensor.numpy()[...] = values
            out[RAW_PREFIX + name] = tensor
        return out

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Transform a batch read with ``device=`` on that device (no-op for others).

        :func:`dataloader` calls this on every batch; call it yourself on the
        batches of a plain ``DataLoader``.

        Parameters
        ----------
        batch
            A collated batch whose raw arrays are under ``raw/<variable>``.

        Returns
        -------
        dict
            The batch with the output keys (or ``x``) on ``self.device``.

        Examples
        --------
        >>> for batch in DataLoader(ds, batch_size=64, num_workers=4):   # doctest: +SKIP
        ...     batch = ds.finish(batch)
        """
        raw = {k[len(RAW_PREFIX) :]: v for k, v in batch.items() if k.startswith(RAW_PREFIX)}
        if not raw or self.device is None:
            return batch
        device = self.device
        moved = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
        rest = {k: v for k, v in batch.items() if not k.startswith(RAW_PREFIX)}
        return {**self._outputs(moved, None), **rest}

    # --- the card's transforms into the output buffers
    def _outputs(self, data: Mapping[str, Any], block: _Block | None) -> dict[str, Tensor]:
        """The outputs of a batch: ``data`` numpy (exact or fast on the CPU) or tensors on
        ``self.device`` (fast). Every output is carved out of one flat buffer from ``block``
        (None: on the device), each key a disjoint region; a half-precision batch is computed
        in float32 and rounded into that buffer in one pass."""
        n = int(data["rtc"].shape[0])
        shape = tuple(data["rtc"].shape[-2:])
        pixels = math.prod(shape)
        device = self.device or torch.device("cpu")
        keys = self._output_keys()
        sizes = {key: len(labels) for key, labels in keys}
        numel = n * sum(sizes.values()) * pixels
        if block is None:
            final = torch.empty(numel, dtype=self.dtype, device=device)
        else:
            final = block.take(numel, self.dtype)
        if self.dtype == torch.float32:
            flat = final
        elif block is not None and block.pool is not None:
            flat = block.pool.scratch(numel)
        elif device.type == "cpu":
            flat = _empty((numel,), torch.float32)
        else:
            flat = torch.empty(numel, dtype=torch.float32, device=device)
        views, rtc_out = self._carve(flat, n, shape, sizes)
        self._fill(data, views, rtc_out)
        if flat is not final:
            final.copy_(flat)  # round to nearest even, once
            views, _ = self._carve(final, n, shape, sizes)
        if self.stack:
            return {"x": final.view(n, sum(sizes.values()), *shape)}
        return views

    def _carve(
        self, flat: Tensor, n: int, shape: tuple[int, ...], sizes: Mapping[str, int]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-key views (n, channels, y, x) of ``flat`` and the rtc destination
        (sample, view, time, pol, y, x)."""
        views: dict[str, Tensor] = {}
        if self.stack:
            whole = flat.view(n, sum(sizes.values()), *shape)
            c = 0
            for key, size in sizes.items():
                views[key] = whole[:, c : c + size]
                c += size
            return views, whole[:, :8].unflatten(1, (2, 2, 2))
        # rtc laid out (view, time, sample, pol, y, x): each rtc key one contiguous batch
        rtc = flat[: 8 * n * math.prod(shape)].view(2, 2, n, 2, *shape)
        for p in schema.VARIABLES["rtc"].placements:
            views[p.source_key] = rtc[p.index]
        offset = rtc.numel()
        for key, size in sizes.items():
            if key not in views:
                count = n * size * math.prod(shape)
                views[key] = flat[offset : offset + count].view(n, size, *shape)
                offset += count
        return views, rtc.permute(2, 0, 1, 3, 4, 5)

    def _fill(self, data: Mapping[str, Any], views: dict[str, Tensor], rtc_out: Tensor) -> None:
        if self.precision == "exact":
            out = rtc_out.numpy()
            # numpy's vectorised log1p wants a contiguous destination; a sample's rtc block
            # is one (stacked: the rows between are other channels), the batch's may not be
            parts = range(len(out)) if not out.flags.c_contiguous else [slice(None)]
            for j in parts:
                normalize.rtc_kernel(
                    data["rtc"][j],
                    data[schema.RTC_PRESENT][j][..., None, None],
                    self._rtc_low,
                    self._rtc_high,
                    gain=self._rtc_gain,
                    out=out[j],
                )
            return
        device = rtc_out.device
        fast_kernels.rtc(
            _tensor(data["rtc"], device),
            _tensor(data[schema.RTC_PRESENT], device)[..., None, None],
            torch.from_numpy(self._rtc_low).to(device),
            torch.from_numpy(self._rtc_high).to(device),
            gain=float(self._rtc_gain),
            out=rtc_out,
        )


def _tensor(values: Any, device: torch.device) -> Tensor:
    return values if isinstance(values, torch.Tensor) else torch.from_numpy(values).to(device)


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
        ``"shards"``, ``"tensorstore"``, ``"zarr"`` or None (the shard decoder for
        local stores, zarr-python for remote ones); see
        :class:`nasar_zarr.reader.CubeReader`.
    precision
        ``"exact"`` (default: numpy's kernels, bit for bit ``ds.nasar.normalized()``)
        or ``"fast"`` (torch kernels; the RTC values may differ from the exact ones
        in the last bits of ``log1p``, see docs/TRAINING.md).
    device
        With ``precision="fast"``: DataLoader workers only read, and the
        transforms run on this device (``"cuda"``, ``"cpu"``) in the main process
        (:meth:`finish`, which :func:`dataloader` calls on every batch).
    stack
        True: each item is ``{"x": (C, 128, 128), "sample_key", "index"}``, the
        output keys concatenated along the channel axis in the order of
        :attr:`channels` (written once, in the worker's shared memory).
    dtype
        ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16``:
        the float32 values rounded to nearest (even) once.

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
        precision: str = "exact",
        device: Any = None,
        stack: bool = False,
        dtype: Any = torch.float32,
    ) -> None:
        super().__init__(
            url,
            variables=_RTC_VARIABLES,
            storage_options=storage_options,
            indices=indices,
            engine=engine,
            rtc_gain=rtc_gain,
            rtc_ranges=rtc_ranges,
            precision=precision,
            device=device,
            stack=stack,
            dtype=dtype,
            group=_open_cube(str(url), storage_options),
        )


class InSARDataset(_CubeDataset):
    """The release's InSAR loader (``NASARWebInSARDataset``) over the cube, map-style.

    Everything :class:`RTCDataset` returns, plus ``inc_angle_view_0/1``
    ``(1, 128, 128)``, ``ifg_view_0/1`` ``(2, 128, 128)`` and ``coh_view_0/1``
    ``(1, 128, 128)`` as stored, and the card's DEM-derived channels
    ``dem_view_0/1``, ``dem_relief_view_0/1`` and ``slope_view_0/1``, each
    ``(1, 128, 128)`` in [0, 1]; the DEM is shared by both views (the two views'
    tensors hold the same values, in separate memory). With ``stack=True``,
    ``x`` has the 22 channels of :attr:`channels`.

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
    storage_options, indices, rtc_gain, rtc_ranges, engine, precision, device, stack, dtype
        As in :class:`RTCDataset`.

    Examples
    --------
    >>> ds = InSARDataset("demo-output/nasar.zarr")               # doctest: +SKIP
    >>> sorted(ds[0])[:3]
    ['coh_view_0', 'coh_view_1', 'dem_relief_view_0']
    >>> fast = InSARDataset("demo-output/nasar.zarr", stack=True, dtype=torch.bfloat16)
    >>> fast[0]["x"].shape, len(fast.channels)                     # doctest: +SKIP
    (torch.Size([22, 128, 128]), 22)
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
        precision: str = "exact",
        device: Any = None,
        stack: bool = False,
        dtype: Any = torch.float32,
    ) -> None:
        self.dem_range = normalize._check_range("dem_range", dem_range)
        self.slope_range = normalize._check_range("slope_range", slope_range)
        lo, hi = normalize._check_range("relief_percentiles", relief_percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"relief_percentiles must lie in [0, 100], got {relief_percentiles!r}")
        self.relief_percentiles = (lo, hi)
        self.require_dem = bool(require_dem)
        group = _open_cube(str(url), storage_options)
        variables: tuple[str, ...] = (*_RTC_VARIABLES, *_PASSTHROUGH)
        with_dem = self.require_dem or all(name in group for name in _DEM_VARIABLES)
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
            precision=precision,
            device=device,
            stack=stack,
            dtype=dtype,
            group=group,
        )

    def _absent_message(self, absent: list[str], present: list[str]) -> str:
        hint = (
            " (require_dem=False serves a cube without dem and slope_deg)"
            if set(absent) <= set(_DEM_VARIABLES)
            else ""
        )
        return super()._absent_message(absent, present) + hint

    def _output_keys(self) -> list[tuple[str, tuple[str, ...]]]:
        out = super()._output_keys()
        for name in _PASSTHROUGH:
            labels: tuple[str, ...] = (name,)
            if name == "ifg":
                labels = tuple(str(c) for c in schema.LABELS["component"])
            out += [(p.source_key, labels) for p in schema.VARIABLES[name].placements]
        if self.with_dem:
            out += [(f"{name}_view_{view}", (name,)) for name in _DERIVED for view in (0, 1)]
        return out

    def _fill(self, data: Mapping[str, Any], views: dict[str, Tensor], rtc_out: Tensor) -> None:
        super()._fill(data, views, rtc_out)
        exact = self.precision == "exact"
        for name in _PASSTHROUGH:
            values = data[name]
            for p in schema.VARIABLES[name].placements:
                dest = views[p.source_key]
                src = values[_batched(p.index)].reshape(dest.shape)
                if exact:
                    dest.numpy()[...] = src
                else:
                    dest.copy_(_tensor(src, dest.device))
        if not self.with_dem:
            return
        first = {name: views[f"{name}_view_0"][:, 0] for name in _DERIVED}
        if exact:
            dem, slope = data["dem"], data["slope_deg"]
            first["dem"].numpy()[...] = normalize.clip_and_rescale(
                dem, *map(_F32.type, self.dem_range)
            )
            first["dem_relief"].numpy()[...] = normalize.relief_kernel(
                dem, percentiles=self.relief_percentiles
            )
            first["slope"].numpy()[...] = normalize.clip_and_rescale(
                slope, *map(_F32.type, self.slope_range)
            )
        else:
            device = rtc_out.device
            dem, slope = _tensor(data["dem"], device), _tensor(data["slope_deg"], device)
            fast_kernels.clip_and_rescale(dem, *self.dem_range, out=first["dem"])
            fast_kernels.relief(dem, percentiles=self.relief_percentiles, out=first["dem_relief"])
            fast_kernels.clip_and_rescale(slope, *self.slope_range, out=first["slope"])
        for name in _DERIVED:  # the DEM is shared by both views: a copy, not one buffer
            views[f"{name}_view_1"].copy_(views[f"{name}_view_0"])


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
        self._iter_start = 0  # position the current iteration started at
        self._delivered: int | None = None  # samples a CubeDataLoader delivered since then
        self._reader_ahead: str | None = None  # the multi-worker loader drawing from us, if any

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
            self._iter_start = 0
            self._delivered = 0 if self._delivered is not None else None

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
        self._yielded = self._iter_start = start
        self._reader_ahead = _loader_reading_ahead()
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
            Samples of the current epoch your loop has consumed on this rank.
            Default: what the :class:`CubeDataLoader` iterating this sampler has
            delivered (exact, whatever the workers read ahead), else the positions
            handed out. Without it, a state taken while a plain multi-worker
            ``DataLoader`` draws from the sampler raises (it read ahead of the loop).

        Returns
        -------
        dict
            ``epoch``, ``position`` and the settings a resume must match.

        Examples
        --------
        >>> state = sampler.state_dict(samples_consumed=step * batch_size)  # doctest: +SKIP
        >>> sampler.load_state_dict(state)
        """
        if samples_consumed is not None:
            position = int(samples_consumed)
        elif self._delivered is not None:  # a CubeDataLoader counts what it delivered
            position = self._iter_start + self._delivered
        elif self._reader_ahead and self._yielded > self._iter_start and not _torchdata_snapshot():
            raise ValueError(
                "ShardAwareSampler.state_dict() without samples_consumed while"
                f" {self._reader_ahead} draws from it: it has handed out {self._yielded}"
                " positions, more than your loop has consumed (the workers read ahead), and"
                " resuming there would skip samples. Use the loader's state"
                " (nasar_zarr.torch.dataloader(...).state_dict(), or torchdata's"
                " StatefulDataLoader), or pass"
                " samples_consumed=<samples your loop consumed this epoch>"
            )
        else:
            position = self._yielded
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
        self._resume_at = self._yielded = self._iter_start = position
        self._delivered = 0 if self._delivered is not None else None


def _loader_reading_ahead() -> str | None:
    """The multi-worker DataLoader iterator calling this (it prefetches), described; else None."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    frame: Any = sys._getframe(2)
    for _ in range(8):  # sampler <- BatchSampler <- the loader iterator's _next_index
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, _BaseDataLoaderIter):
            workers = int(getattr(owner, "_num_workers", 0))
            return f"a DataLoader with {workers} workers" if workers else None
        frame = frame.f_back
    return None


def _torchdata_snapshot() -> bool:
    """Whether torchdata's stateful batch sampler asks (it does so as it sends a batch's
    indices, so the positions handed out are exact for its snapshot)."""
    frame = sys._getframe(2)
    owner = frame.f_locals.get("self") if frame is not None else None
    return type(owner).__module__.startswith("torchdata.")


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
        if key == POOL_KEY:  # the batch's pooled buffer: one tag for the whole batch
            out[key] = values[0] if len(set(values)) == 1 else -1
            continue
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


class CubeDataLoader(DataLoader):
    """A ``DataLoader`` that knows what it has delivered: an exact resume state.

    Returned by :func:`dataloader`. Iterating it counts the samples of every
    batch handed to the loop, so :meth:`state_dict` (and the sampler's own
    ``state_dict()``) points at exactly the next undelivered sample, whatever the
    workers read ahead. Batches of a dataset made with ``device=`` are
    transformed on that device (``dataset.finish``) before they are handed out.
    With persistent workers (the default of :func:`dataloader`) each worker
    reuses its shared-memory batch buffers, each only after nothing in this
    process references the batch any more (see :class:`_Pool`).

    Examples
    --------
    >>> loader = dataloader(ds, batch_size=64, sampler=ShardAwareSampler(ds), num_workers=4)
    >>> state = loader.state_dict()          # save with the model    # doctest: +SKIP
    >>> loader.load_state_dict(state)        # resume: the next batch is the next sample
    """

    def __init__(self, dataset: Any, **kwargs: Any) -> None:
        workers = int(kwargs.get("num_workers") or 0)
        flags = None
        if isinstance(dataset, _CubeDataset) and workers > 0 and kwargs.get("persistent_workers"):
            # the workers' batch buffer pools: reused once nothing here holds the batch
            flags = torch.zeros((workers, POOL_SLOTS), dtype=torch.uint8).share_memory_()
            kwargs["worker_init_fn"] = functools.partial(
                _start_pool, flags, kwargs.get("worker_init_fn")
            )
        super().__init__(dataset, **kwargs)
        self._pool_flags = flags
        self._pooled: list[tuple[int, Tensor]] = []  # (tag, a view of the batch's buffer)

    def __iter__(self) -> Any:  # a _Delivering, not a _BaseDataLoaderIter
        return _Delivering(super().__iter__(), self)

    def _hold(self, batch: Any) -> None:
        """Note a delivered batch's pooled buffer (and drop the tag from the batch)."""
        if not isinstance(batch, dict) or POOL_KEY not in batch:
            return
        tag = batch.pop(POOL_KEY)
        tag = int(tag if isinstance(tag, int) else torch.as_tensor(tag).reshape(-1)[0])
        if tag < 0 or self._pool_flags is None:
            return
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.is_shared():
                # an empty tensor of our own on the same storage (not a view: a view keeps
                # its base alive); the batch's tensors are the user's to keep or drop
                ref = torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage(), 0, (0,), (1,))
                self._pooled.append((tag, ref))
                return

    def _release(self) -> None:
        """Hand back the buffers of batches nothing in this process references any more."""
        if not self._pooled or self._pool_flags is None:
            return
        flags = self._pool_flags.view(-1)
        kept = []
        for tag, view in self._pooled:
            # our view and the temporary storage object: no one else holds the storage
            if torch._C._storage_Use_Count(view.untyped_storage()._cdata) <= 2:
                flags[tag] = 1
            else:
                kept.append((tag, view))
        self._pooled = kept

    def _shard_sampler(self) -> ShardAwareSampler | None:
        for candidate in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if isinstance(candidate, ShardAwareSampler):
                return candidate
        return None

    def _need_sampler(self) -> ShardAwareSampler:
        sampler = self._shard_sampler()
        if sampler is None:
            raise TypeError(
                "CubeDataLoader.state_dict needs sampler=ShardAwareSampler(dataset) (the"
                f" resumable order); this loader samples with {type(self.sampler).__name__}"
            )
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the next sample this loader has not delivered.

        Returns
        -------
        dict
            ``{"sampler": ShardAwareSampler.state_dict()}``, JSON-serialisable.
        """
        return {"sampler": self._need_sampler().state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration starts at the saved sample (same sampler settings).

        Parameters
        ----------
        state
            From :meth:`state_dict`.
        """
        self._need_sampler().load_state_dict(state["sampler"])


class _Delivering:
    """A DataLoader iterator that counts what it hands out and finishes device batches."""

    def __init__(self, iterator: Any, loader: CubeDataLoader) -> None:
        self._iterator = iterator
        self._loader = loader
        self._sampler = loader._shard_sampler()
        self._finish = getattr(loader.dataset, "finish", None)
        if self._sampler is not None:
            self._sampler._delivered = 0

    def __iter__(self) -> _Delivering:
        return self

    def __len__(self) -> int:
        return len(self._iterator)

    def __next__(self) -> Any:
        self._loader._release()
        batch = next(self._iterator)
        self._loader._hold(batch)
        sampler = self._sampler
        if sampler is not None:
            size = _batch_size(batch)
            if size is None:
                left = sampler.num_samples - sampler._iter_start - (sampler._delivered or 0)
                size = min(int(self._loader.batch_size or 1), left)
            sampler._delivered = (sampler._delivered or 0) + size
        if self._finish is not None and isinstance(batch, dict):
            batch = self._finish(batch)
        return batch


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Mapping) and "index" in batch:
        return len(batch["index"])
    return None


def dataloader(dataset: Any, **kwargs: Any) -> CubeDataLoader:
    """A :class:`CubeDataLoader` with good defaults for the cube's datasets.

    With ``num_workers > 0``, workers start with the platform's default method
    (``fork`` on Linux: the datasets read through the fork-safe shard decoder,
    so scripts need no ``if __name__ == "__main__":`` guard) and
    ``persistent_workers`` defaults to True (worker start-up is paid once, not
    every epoch). ``multiprocessing_context="forkserver"`` stays an option (its
    server preloads this module); a dataset with ``engine="tensorstore"`` gets
    forkserver by default. ``collate_fn`` defaults to :func:`collate` (the batch
    buffers the datasets build, without a copy). Every other argument is the
    DataLoader's.

    Parameters
    ----------
    dataset
        Usually an :class:`RTCDataset` or :class:`InSARDataset`.
    **kwargs
        Passed to ``DataLoader`` (``batch_size``, ``sampler``, ``num_workers``...).

    Returns
    -------
    CubeDataLoader
        A ``DataLoader`` with an exact ``state_dict()`` / ``load_state_dict()``.

    Examples
    --------
    >>> ds = InSARDataset("demo-output/nasar.zarr")                # doctest: +SKIP
    >>> loader = dataloader(ds, batch_size=64, sampler=ShardAwareSampler(ds), num_workers=2)
    """
    if kwargs.get("num_workers", 0) > 0:
        context = kwargs.get("multiprocessing_context")
        if context is None and getattr(dataset, "engine", None) == "tensorstore":
            context = safe_start_method()
        if isinstance(context, str):
            context = multiprocessing.get_context(context)
        if context is not None and context.get_start_method() == "forkserver":
            context.set_forkserver_preload([__name__])
        kwargs["multiprocessing_context"] = context
        kwargs.setdefault("persistent_workers", True)
    kwargs.setdefault("collate_fn", collate)
    return CubeDataLoader(dataset, **kwargs)
