"""RTCDataset and InSARDataset: the release loader's outputs from the cube, map-style."""

from __future__ import annotations

import math
import operator
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

import nasar_zarr.torch.kernels as fast_kernels
from nasar_zarr import normalize, schema, source, store
from nasar_zarr.reader import ENGINES, CubeReader

from .buffers import POOL_KEY, _Block, _empty, _Pool, _shared_empty
from .forking import _FORKED_HINT, _ForkGuard

_F32 = np.dtype("float32")
_RTC_VARIABLES = ("rtc", schema.RTC_PRESENT)
_DEM_VARIABLES = ("dem", "slope_deg")
_PASSTHROUGH = ("inc_angle", "ifg", "coh")  # returned as stored
_DERIVED = ("dem", "dem_relief", "slope")  # the card's DEM channels, one per view
PRECISIONS = ("exact", "fast")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RAW_PREFIX = "raw/"  # keys of a batch read with device=: transformed by dataset.finish()


def _open_cube(url: str, storage_options: Mapping[str, Any] | None) -> Any:
    """The cube's root group, or :class:`~nasar_zarr.errors.NotACubeError` with a hint
    (:func:`nasar_zarr.store.not_a_cube`: a missing path, a corpus to convert, ...)."""
    group = store.open_group(url, storage_options)
    if "rtc" not in group or schema.STATUS not in group or schema.SAMPLE_DIM not in group:
        raise store.not_a_cube(url, storage_options)
    return group


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
        metadata: Sequence[str],
        group: Any,
        read_ahead: bool | None = None,
    ) -> None:
        self.url = str(url)
        # None: on remote stores only, where a batch waits for a round trip
        self.read_ahead = read_ahead
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
        self._ahead: _ReadAhead | None = None  # this process's read of the next batch
        self._metadata = self._read_metadata(group, metadata)

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
        state["_ahead"] = None
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
        ahead = self._read_ahead()
        data = ahead.take(cube) if ahead is not None else None
        if data is None:
            data = self._read(cube)
        then = getattr(indices, "then", None)  # a CubeDataLoader's hint: our next batch
        if ahead is not None and then:
            ahead.start(self._cube_positions(then))
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
        meta = {name: column[cube].tolist() for name, column in self._metadata.items()}
        return [
            {
                **{key: values[j] for key, values in arrays.items()},
                "sample_key": str(keys[j]),
                "index": int(cube[j]),
                **{name: values[j] for name, values in meta.items()},
                **tag,
            }
            for j in range(cube.size)
        ]

    def _read_metadata(self, group: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The asked per-sample metadata columns of the cube, read once (read-only)."""
        names = [str(name) for name in ([names] if isinstance(names, str) else names)]
        taken = {*self.output_keys, "x", "sample_key", "index"}
        columns = sorted(
            k for k in group.array_keys() if group[k].shape == (self.cube_size,) and k != "status"
        )
        out = {}
        for name in names:
            if name in taken or name not in columns:
                raise ValueError(
                    f"metadata={name!r}: not a per-sample column of the cube at {self.url}"
                    + (" (an item already has that key)" if name in taken else "")
                    + f"; its per-sample columns are {columns}"
                )
            column = np.asarray(group[name][:])
            column.flags.writeable = False
            out[name] = column
        return out

    def _read_ahead(self) -> _ReadAhead | None:
        """This process's read-ahead, if this dataset reads ahead (see ``read_ahead``)."""
        wanted = self.read_ahead
        if wanted is None:
            wanted = source.is_remote(self.url)
        if not wanted or self.reader.engine != "shards":  # the thread-safe reader only
            return None
        ahead = self._ahead
        if ahead is None or ahead.pid != os.getpid():
            ahead = self._ahead = _ReadAhead(self._read)
        return ahead

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


class _ReadAhead:
    """One batch read ahead on one thread of this process: bounded to one batch's
    decoded arrays (plus its stored bytes while they arrive)."""

    def __init__(self, read: Any) -> None:
        self.pid = os.getpid()
        self.read = read
        self.lock = threading.Lock()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="nasar-read-ahead")
        self.pending: tuple[bytes, Future[dict[str, np.ndarray]]] | None = None

    def start(self, cube: np.ndarray) -> None:
        with self.lock:
            if self.pending is None:
                self.pending = (cube.tobytes(), self.thread.submit(self.read, cube))

    def take(self, cube: np.ndarray) -> dict[str, np.ndarray] | None:
        """The batch read ahead if it is exactly ``cube`` (its errors raise here), else
        None (and a wrong guess is dropped)."""
        with self.lock:
            pending, self.pending = self.pending, None
        if pending is None:
            return None
        key, future = pending
        if key != cube.tobytes():
            future.cancel()
            return None
        return future.result()


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
    metadata
        Per-sample columns of the cube (``quality_score``, ``track``,
        ``prime_datetime``, ...) to add to each item under their names (numbers
        collate to tensors, text to lists); read once, at construction.
    read_ahead
        Read the next batch of this DataLoader worker while this one is
        transformed (the batches of :func:`dataloader` name it): one batch's
        arrays more in memory per worker. Default None: on remote stores only.

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
        metadata: Sequence[str] = (),
        read_ahead: bool | None = None,
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
            metadata=metadata,
            group=_open_cube(str(url), storage_options),
            read_ahead=read_ahead,
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
    storage_options, indices, rtc_gain, rtc_ranges, engine, precision, device, stack, dtype,
    metadata, read_ahead
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
        metadata: Sequence[str] = (),
        read_ahead: bool | None = None,
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
            metadata=metadata,
            group=group,
            read_ahead=read_ahead,
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
