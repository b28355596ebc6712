"""The array behind :func:`nasar_zarr.open_cube`'s dask chunks: shards decoded straight into place.

A dask task of the cube reads whole Zarr shards: one ``pread`` of each shard
object, then every inner chunk is decompressed directly into the task's output
array (no intermediate chunk buffers, no copy). This mirrors
:mod:`nasar_zarr.sharding`, which writes those shards, and decodes exactly the
Zarr v3 codecs the converter writes (``sharding_indexed`` with ``bytes`` and
one of ``blosc`` / ``zstd`` inner codecs, then ``crc32c`` (checked before each
chunk is decoded), index ``bytes`` + ``crc32c`` at the end; unsharded ``bytes``
(+ ``blosc`` / ``zstd``, + ``crc32c``) arrays such as ``status``; cubes written
before the chunk checksum decode without it).
Measured on a 2-core machine: about 2x tensorstore and 4x zarr-python inside
dask (benchmarks/README.md).

A selection of a few samples reads only the shard index and the inner chunks
that hold them, however many shards a dask chunk spans: a dask chunk of the cube
is a :class:`LazyRows` (the chunk's samples, not yet read), which an index
along ``sample`` narrows before anything is read (``ds.isel(sample=[i, j, k])``:
dask's ``take`` picks rows out of each touched chunk) and any other use reads.

It keeps no state at all: no open files, handles, event loops or threads
outlive a call, so the arrays pickle to dask workers and keep working in
forked processes (a ``fork`` after a read, e.g. a ``multiprocessing`` pool or
a PyTorch ``DataLoader``). Arrays it cannot decode (another codec, a remote
store) are read by zarr-python; see :func:`fast_array`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from dask.sizeof import sizeof
from xarray.backends import BackendArray
from xarray.core import indexing

from . import sharding
from .errors import CubeDamagedError
from .ranges import Location, ObjectChangedError, Tail
from .streaming import LazyArray

EMPTY = sharding.EMPTY  # index entry of an inner chunk that was never written


class ShardFormatError(CubeDamagedError):
    """A stored object that fails its checksum or does not match the array's metadata."""


@dataclass(frozen=True)
class ArrayLayout:
    """What the fast reader needs to know about one Zarr array (picklable, no handles).

    Parameters
    ----------
    path
        Local directory of the array (holds ``zarr.json`` and the chunk objects).
    shape
        Array shape; chunks and shards run along the first axis only.
    dtype
        numpy dtype string (little-endian on disk).
    shard
        Samples per stored object (the shard; the chunk for an unsharded array).
    inner
        Samples per inner chunk (``== shard`` for an unsharded array).
    compressor
        ``"blosc"``, ``"zstd"`` or ``"none"``.
    sharded
        True for ``sharding_indexed`` objects.
    fill_value
        Value of samples whose object or inner chunk is absent.
    checksum
        True when each stored chunk ends with its CRC-32C (a ``crc32c`` codec after
        the compressor: cube contract 2); checked before decoding.
    key_prefix, separator
        Object key of chunk ``i``: ``key_prefix + i + (separator + "0") * (ndim - 1)``.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    shard: int
    inner: int
    compressor: str
    sharded: bool
    fill_value: Any
    key_prefix: str
    separator: str
    checksum: bool = False
    location: Location | None = None  # a remote store (``path`` is then its URL)

    @property
    def name(self) -> str:
        """The array's name (the last part of its path), for error messages."""
        return os.path.basename(self.path.rstrip("/"))

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def object_path(self, index: int) -> str:
        return os.path.join(self.path, self.chunk_key(index))

    def chunk_key(self, index: int) -> str:
        """Key of object ``index`` relative to the array (``c/3/0/0/0/0/0``)."""
        tail = (self.separator + "0") * (len(self.shape) - 1)
        return f"{self.key_prefix}{index}{tail}"

    def object_key(self, index: int) -> str:
        """Key of object ``index`` relative to the cube's root (``rtc/c/3/0/0/0/0/0``)."""
        return f"{self.name}/{self.chunk_key(index)}"


def _compressor(codecs: list[dict[str, Any]]) -> tuple[str, bool] | None:
    """``("blosc"|"zstd"|"none", checksum)`` for ``[bytes(little), <that>, crc32c?]``,
    else None."""
    if not codecs or codecs[0].get("name") != "bytes":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if endian not in ("little", None):
        return None
    rest = [c.get("name") for c in codecs[1:]]
    checksum = bool(rest) and rest[-1] == "crc32c"
    if checksum:
        rest = rest[:-1]
    if rest == []:
        return "none", checksum
    if rest in (["blosc"], ["zstd"]):
        return rest[0], checksum
    return None


def array_layout(
    array: zarr.Array, path: str, location: Location | None = None
) -> ArrayLayout | None:
    """The :class:`ArrayLayout` of an array, or None if the fast reader cannot decode it.

    Parameters
    ----------
    array
        An open zarr-python array (its metadata is read, not its data).
    path
        The array's local directory, or its URL on a remote store.
    location
        The remote store holding the cube (None: ``path`` is local).

    Returns
    -------
    ArrayLayout or None
        None for anything but the converter's layouts (chunks along the first
        axis only, the codecs listed in the module docstring, a little-endian
        host, a default chunk key encoding).
    """
    meta: Any = array.metadata.to_dict()
    shape = tuple(int(s) for s in meta.get("shape", ()))
    if sys.byteorder != "little" or meta.get("zarr_format") != 3 or not shape:
        return None
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biuf" or meta.get("storage_transformers"):
        return None
    grid = meta.get("chunk_grid", {})
    encoding = meta.get("chunk_key_encoding", {})
    if grid.get("name") != "regular" or encoding.get("name") != "default":
        return None
    outer = tuple(grid["configuration"]["chunk_shape"])
    if tuple(outer[1:]) != shape[1:]:
        return None
    separator = (encoding.get("configuration") or {}).get("separator", "/")
    codecs = meta.get("codecs", [])
    sharded = len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"
    if sharded:
        config = codecs[0]["configuration"]
        inner_shape = tuple(config["chunk_shape"])
        index_codecs = [c.get("name") for c in config.get("index_codecs", [])]
        if (
            tuple(inner_shape[1:]) != shape[1:]
            or outer[0] % inner_shape[0]
            or config.get("index_location", "end") != "end"
            or index_codecs != ["bytes", "crc32c"]
        ):
            return None
        chain = _compressor(config.get("codecs", []))
        inner = int(inner_shape[0])
    else:
        chain = _compressor(codecs)
        inner = int(outer[0])
    if chain is None:
        return None
    compressor, checksum = chain
    fill = array.fill_value
    return ArrayLayout(
        path=str(path),
        shape=shape,
        dtype=dtype.str,
        shard=int(outer[0]),
        inner=inner,
        compressor=compressor,
        sharded=sharded,
        fill_value=None if fill is None else np.asarray(fill, dtype).item(),
        key_prefix="c" + separator,
        separator=separator,
        checksum=checksum,
        location=location if location is not None and location.remote else None,
    )


def _decode_into(
    layout: ArrayLayout, data: memoryview, out: np.ndarray, where: Callable[[], str]
) -> None:
    """Check one stored chunk's CRC-32C (when it has one), then decompress it into the
    C-contiguous ``out`` (exact size); ``where()`` names the chunk in errors."""
    if not out.flags.c_contiguous:
        raise ValueError("decoding needs a C-contiguous destination")
    target = out.reshape(-1).view(np.uint8)
    if not layout.checksum:
        _decompress(layout.compressor, data, target, where)
        return
    problem = sharding.checksum_problem(data)
    if problem is not None:
        raise ShardFormatError(
            f"{where()} fails its CRC-32C ({problem}): the cube is damaged there;"
            " `nasar-zarr verify DEST` lists every damaged chunk"
        )
    # released at once: a view left to the garbage collector (dask's profiler keeps
    # frames alive) would stop the caller from closing its memory map
    with data[: -sharding.CHECKSUM_BYTES] as payload:
        _decompress(layout.compressor, payload, target, where)


def _decompress(
    compressor: str, data: memoryview, target: np.ndarray, where: Callable[[], str]
) -> None:
    if compressor == "blosc":
        from numcodecs import blosc

        blosc.decompress(data, target)
    elif compressor == "zstd":
        from numcodecs import zstd

        zstd.decompress(data, target)
    else:
        if len(data) != target.nbytes:
            raise ShardFormatError(
                f"{where()}: chunk of {len(data)} bytes, expected {target.nbytes}"
            )
        target[...] = np.frombuffer(data, np.uint8)


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:  # pread may return less than asked on some filesystems
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise ShardFormatError(
                f"object ends at {offset + len(data)}, expected {offset + size} bytes"
            )
        data += more
    return data


def _index(layout: ArrayLayout, tail: bytes | memoryview, name: str) -> np.ndarray:
    """The shard index from the object's last bytes, its CRC-32C checked."""
    try:
        return sharding.parse_index(tail, layout.shard // layout.inner)
    except sharding.ChecksumMismatch as exc:
        raise ShardFormatError(
            f"{name}: the shard index fails its CRC-32C ({exc}; corrupt object)"
        ) from None


def _map_whole(fd: int, size: int) -> mmap.mmap | None:
    """The whole object mapped read-only and pre-faulted (no copy out of the page cache)."""
    if size == 0:
        return None
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)


def _read_object(
    layout: ArrayLayout,
    obj: int,
    chunks: np.ndarray,
    sink: Callable[[int, memoryview | None], None],
) -> None:
    """Decode inner chunks ``chunks`` (indices within object ``obj``) through ``sink``.

    ``sink(chunk, data)`` gets each chunk's encoded bytes, or None for a chunk
    that holds no data (fill value). A whole object is memory-mapped (one
    system call, no copy); a few inner chunks are read with ``pread`` after the
    index. Nothing stays open after the call.
    """
    path = layout.object_path(obj)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        for c in chunks:
            sink(int(c), None)
        return
    mapped = None
    try:
        size = os.fstat(fd).st_size
        per_shard = layout.shard // layout.inner
        if not layout.sharded:
            sink(0, memoryview(_pread(fd, size, 0)))
            return
        tail = sharding.index_size(per_shard)
        rows_here = layout.shape[0] - obj * layout.shard  # the last shard may be partial
        if len(chunks) >= min(per_shard, -(-rows_here // layout.inner)):
            mapped = _map_whole(fd, size)
        if mapped is not None:
            with memoryview(mapped) as data:
                index = _index(layout, bytes(data[max(0, size - tail) :]), path)
                for c in chunks:
                    with _chunk_bytes(index, int(c), size, path, data=data) as view:
                        sink(int(c), view)
        else:
            index = _index(layout, _pread(fd, min(tail, size), max(0, size - tail)), path)
            for c in chunks:
                with _chunk_bytes(index, int(c), size, path, fd=fd) as view:
                    sink(int(c), view)
    finally:
        if mapped is not None:
            mapped.close()
        os.close(fd)


@contextlib.contextmanager
def _chunk_bytes(
    index: np.ndarray,
    c: int,
    size: int,
    path: str,
    *,
    data: memoryview | None = None,
    fd: int | None = None,
) -> Iterator[memoryview | None]:
    offset, nbytes = (int(v) for v in index[c])
    if offset == EMPTY and nbytes == EMPTY:
        yield None
        return
    if offset + nbytes > size:
        raise ShardFormatError(f"{path}: inner chunk {c} runs past the object's end")
    if data is not None:
        with data[offset : offset + nbytes] as view:
            yield view
    else:
        assert fd is not None
        yield memoryview(_pread(fd, nbytes, offset))


def read_rows(layout: ArrayLayout, rows: Any) -> np.ndarray:
    """Samples ``rows`` of the array (every other axis whole), decoded straight into place.

    Parameters
    ----------
    layout
        The array, from :func:`array_layout`.
    rows
        A slice (step 1 is the fast case) or integer positions along the first
        axis (any order, repeats allowed).

    Returns
    -------
    numpy.ndarray
        ``(len(rows), *shape[1:])``. Only the objects and inner chunks that hold
        the rows are read: whole objects in one ``pread`` when every inner chunk
        is needed, else the index and each needed inner chunk.

    Examples
    --------
    >>> read_rows(layout, slice(0, 512)).shape  # doctest: +SKIP
    (512, 2, 2, 2, 128, 128)
    """
    return read_many([(layout, rows)])[0]


def read_many(requests: Sequence[tuple[ArrayLayout, Any]]) -> list[np.ndarray]:
    """:func:`read_rows` of several arrays at once (e.g. every variable of a batch).

    On a remote store the shard indexes all of them need are fetched in one
    concurrent round, then all their inner chunks in another (ranges coalesced),
    so a batch costs two round trips of latency, not two per variable.
    """
    prepared = [(layout, *_wanted(layout, rows)) for layout, rows in requests]
    remote = [
        (i, layout, _needed(layout, wanted))
        for i, (layout, wanted, _) in enumerate(prepared)
        if layout.location is not None and len(wanted)
    ]
    fetched: dict[int, Fetched] = {}
    if remote:
        for (i, _, _), got in zip(
            remote, _fetch([(layout, needed) for _, layout, needed in remote]), strict=True
        ):
            fetched[i] = got
    results = []
    for i, (layout, wanted, order) in enumerate(prepared):
        out = np.empty((len(wanted), *layout.row_shape), dtype=np.dtype(layout.dtype))
        if len(wanted):
            _fill(layout, wanted, out, fetched.get(i))
        results.append(out if order is None else out[order])
    return results


def _wanted(layout: ArrayLayout, rows: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted unique positions of ``rows`` and the order that gives ``rows`` back."""
    n = layout.shape[0]
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n)
        if step == 1:
            return np.arange(start, max(start, stop)), None
        rows = np.arange(start, stop, step)
    positions = np.asarray(rows, dtype=np.int64).reshape(-1)
    if positions.size and (positions.min() < -n or positions.max() >= n):
        raise IndexError(f"sample index out of range for {n} samples")
    positions = np.where(positions < 0, positions + n, positions)
    wanted, order = np.unique(positions, return_inverse=True)
    return wanted, order


def _needed(layout: ArrayLayout, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """``{object: inner chunks within it}`` that hold the (sorted, unique) ``wanted`` rows."""
    per_shard = layout.shard // layout.inner
    chunk_of = wanted // layout.inner  # global inner chunk of each wanted sample
    return {
        obj: np.unique(chunk_of[chunk_of // per_shard == obj]) - obj * per_shard
        for obj in np.unique(chunk_of // per_shard).tolist()
    }


Fetched = dict[int, dict[int, "bytes | memoryview | None"]]  # object -> chunk -> bytes


def _fill(
    layout: ArrayLayout, wanted: np.ndarray, out: np.ndarray, fetched: Fetched | None = None
) -> None:
    """Fill ``out[k]`` with sample ``wanted[k]`` (sorted, unique); ``fetched``: the
    chunks' bytes already read from a remote store (:func:`_fetch`)."""
    n, inner = layout.shape[0], layout.inner
    per_shard = layout.shard // inner
    contiguous = bool(wanted[-1] - wanted[0] + 1 == len(wanted))
    first = int(wanted[0])
    scratch: list[np.ndarray] = []
    needed = _needed(layout, wanted)
    if fetched is None and layout.location is not None:
        fetched = _fetch([(layout, needed)])[0]

    for obj, in_obj in needed.items():

        def sink(c: int, data: memoryview | None, obj: int = obj) -> None:
            lo = (obj * per_shard + c) * inner  # first sample of this inner chunk
            hi = min(lo + inner, n)

            def where() -> str:
                return _chunk_name(layout, obj, c, lo, hi)

            if contiguous:
                a, b = max(lo, first), min(hi, first + len(out))
                dest = out[a - first : b - first]
                if data is None:
                    dest[...] = layout.fill_value
                    return
                if a == lo and b == lo + inner:  # whole chunk in place: no copy
                    _decode_into(layout, data, dest, where)
                    return
                src_rows: Any = slice(a - lo, b - lo)
            else:
                k0, k1 = np.searchsorted(wanted, [lo, hi])
                dest_idx = np.arange(k0, k1)
                if data is None:
                    out[dest_idx] = layout.fill_value
                    return
                src_rows = wanted[k0:k1] - lo
            if not scratch:
                scratch.append(np.empty((inner, *layout.row_shape), dtype=out.dtype))
            _decode_into(layout, data, scratch[0], where)
            if contiguous:
                dest[...] = scratch[0][src_rows]
            else:
                out[dest_idx] = scratch[0][src_rows]

        if fetched is None:
            _read_object(layout, obj, in_obj, sink)
            continue
        for c in in_obj.tolist():
            data = fetched[obj][c]
            sink(c, None if data is None else memoryview(data))


@dataclass(frozen=True)
class _IndexEntry:
    """A remote shard's index as read, with the object's size and version (immutable)."""

    index: np.ndarray  # read-only (chunks_per_shard, 2) offsets and sizes
    size: int
    version: str | None


class _IndexCache:
    """Shard indexes of remote objects, read once per process: bounded (least recently
    used out), entries immutable, a lock around the map, emptied in a forked child."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], _IndexEntry] = OrderedDict()

    def get(self, key: tuple[str, str]) -> _IndexEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, str], entry: _IndexEntry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._entries.pop(key, None)


# 8,192 indexes: every shard of the full release's 8 variables at shard 512 is ~17,200;
# an index of 256 inner chunks is 4 KiB, so the cache holds at most ~32 MiB.
INDEX_CACHE = _IndexCache(8192)
os.register_at_fork(after_in_child=INDEX_CACHE._reset)


def _fetch(jobs: Sequence[tuple[ArrayLayout, dict[int, np.ndarray]]]) -> list[Fetched]:
    """The encoded bytes of the inner chunks ``jobs`` need, from their remote store.

    Objects whose index is not cached yet are read first (a suffix range for the
    index, or the whole object when all its chunks are needed), all at once;
    then every needed chunk of an indexed object (ranges coalesced, concurrent,
    each with the object's ETag as ``If-Match``). Unsharded objects are read
    whole. With every index cached, all of it is one concurrent round: one round
    trip of latency for a batch of any number of variables.
    """
    results: list[Fetched] = [{} for _ in jobs]
    location = next(layout.location for layout, _ in jobs if layout.location is not None)
    tails: list[tuple[int, int, str]] = []  # (job, object, key) needing their index
    wholes: list[tuple[int, int, str]] = []
    for j, (layout, needed) in enumerate(jobs):
        per_shard = layout.shard // layout.inner
        for obj, chunks in needed.items():
            key = layout.object_key(obj)
            if not layout.sharded:
                wholes.append((j, obj, key))
            elif INDEX_CACHE.get((location.url, key)) is None:
                rows_here = layout.shape[0] - obj * layout.shard
                everything = len(chunks) >= min(per_shard, -(-rows_here // layout.inner))
                (wholes if everything else tails).append((j, obj, key))
    if tails:  # the indexes first: the chunks' ranges are in them
        got_tails, got_wholes, _ = location.round(
            [k for _, _, k in tails], _index_bytes(jobs, tails), [k for _, _, k in wholes], []
        )
        for (j, _, key), tail in zip(tails, got_tails, strict=True):
            _remember_index(jobs[j][0], key, tail, location)
        requests, slots = _chunk_requests(jobs, results, location, whole=wholes)
        data = _ranges(location, requests)
    else:  # every index known: the objects and the chunks in the same round
        requests, slots = _chunk_requests(jobs, results, location, whole=wholes)
        try:
            _, got_wholes, data = location.round([], 0, [k for _, _, k in wholes], requests)
        except ObjectChangedError:
            _forget(location, requests)
            raise
    for (j, obj, key), whole in zip(wholes, got_wholes, strict=True):
        layout, needed = jobs[j]
        if whole is None:
            results[j][obj] = {c: None for c in needed[obj].tolist()}
        elif not layout.sharded:
            results[j][obj] = {0: whole.data}
        else:
            entry = _remember_index(layout, key, whole, location)
            assert entry is not None
            view = memoryview(whole.data)
            results[j][obj] = {c: _slice(entry, c, view, layout, obj) for c in needed[obj].tolist()}
    for (j, obj, c), chunk in zip(slots, data, strict=True):
        results[j][obj][c] = chunk
    return results


def _chunk_requests(
    jobs: Sequence[tuple[ArrayLayout, dict[int, np.ndarray]]],
    results: list[Fetched],
    location: Location,
    *,
    whole: list[tuple[int, int, str]],
) -> tuple[list[tuple[str, int, int, str | None]], list[tuple[int, int, int]]]:
    """The byte ranges of the needed chunks of indexed objects (fill values recorded in
    ``results`` for empty chunks and absent objects); objects in ``whole`` are skipped."""
    skip = {(j, obj) for j, obj, _ in whole}
    requests: list[tuple[str, int, int, str | None]] = []
    slots: list[tuple[int, int, int]] = []
    for j, (layout, needed) in enumerate(jobs):
        if not layout.sharded:
            continue
        for obj, chunks in needed.items():
            if (j, obj) in skip:
                continue
            key = layout.object_key(obj)
            entry = INDEX_CACHE.get((location.url, key))
            results[j][obj] = {}
            for c in chunks.tolist():
                if entry is None:  # no such object: fill values
                    results[j][obj][c] = None
                    continue
                offset, nbytes = (int(v) for v in entry.index[c])
                if offset == EMPTY and nbytes == EMPTY:
                    results[j][obj][c] = None
                    continue
                if offset + nbytes > entry.size:
                    raise ShardFormatError(
                        f"{layout.object_path(obj)}: inner chunk {c} runs past the object's end"
                    )
                requests.append((key, offset, offset + nbytes, entry.version))
                slots.append((j, obj, c))
    return requests, slots


def _ranges(
    location: Location, requests: list[tuple[str, int, int, str | None]]
) -> list[bytes | memoryview]:
    try:
        return location.ranges(requests)
    except ObjectChangedError:
        _forget(location, requests)
        raise


def _forget(location: Location, requests: list[tuple[str, int, int, str | None]]) -> None:
    for key, *_ in requests:  # the next read starts from the new version's index
        INDEX_CACHE.drop((location.url, key))


def _index_bytes(
    jobs: Sequence[tuple[ArrayLayout, dict[int, np.ndarray]]], tails: list[tuple[int, int, str]]
) -> int:
    return max(
        (sharding.index_size(jobs[j][0].shard // jobs[j][0].inner) for j, _, _ in tails),
        default=0,
    )


def _remember_index(
    layout: ArrayLayout, key: str, tail: Tail | None, location: Location
) -> _IndexEntry | None:
    """Parse (CRC checked) and cache the index at the end of ``tail``; None if absent."""
    if tail is None:
        return None
    index = _index(layout, tail.data, location.path(key)).copy()
    index.flags.writeable = False
    entry = _IndexEntry(index, tail.size, tail.version)
    INDEX_CACHE.put((location.url, key), entry)
    return entry


def _slice(
    entry: _IndexEntry, c: int, view: memoryview, layout: ArrayLayout, obj: int
) -> memoryview | None:
    offset, nbytes = (int(v) for v in entry.index[c])
    if offset == EMPTY and nbytes == EMPTY:
        return None
    if offset + nbytes > len(view):
        raise ShardFormatError(f"{layout.object_path(obj)}: inner chunk {c} runs past its end")
    return view[offset : offset + nbytes]


def _chunk_name(layout: ArrayLayout, obj: int, c: int, lo: int, hi: int) -> str:
    """``rtc: inner chunk 3 of object c/1/0/0/0/0/0 (samples 1030-1031)``: for errors."""
    key = os.path.relpath(layout.object_path(obj), layout.path)
    what = f"inner chunk {c} of object {key}" if layout.sharded else f"chunk {key}"
    return f"{layout.name}: {what} (samples {lo}-{hi - 1}) at {layout.path}"


class FastBackendArray(BackendArray):
    """xarray backend array reading through :func:`read_rows` (outer indexing).

    Parameters
    ----------
    layout
        The array, from :func:`array_layout`.
    """

    def __init__(self, layout: ArrayLayout) -> None:
        self.layout = layout
        self.shape = layout.shape
        self.dtype = np.dtype(layout.dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER_1VECTOR, self._getitem
        )

    def _getitem(self, key: tuple) -> np.ndarray:
        first, rest = key[0], tuple(key[1:])
        if isinstance(first, (int, np.integer)):
            values = read_rows(self.layout, np.array([int(first)]))[0]
        else:
            values = read_rows(self.layout, first)
            rest = (slice(None), *rest)
        if all(isinstance(k, slice) and k == slice(None) for k in rest):
            return values
        return values[rest]

    def __repr__(self) -> str:
        return f"FastBackendArray({self.layout.path!r}, shape={self.shape}, dtype={self.dtype})"


def _is_whole(key: Any) -> bool:
    return isinstance(key, slice) and key == slice(None)


class LazyRows(LazyArray):
    """Samples ``rows`` of an array (every other axis whole), read on first use as an array.

    What a dask task of :func:`nasar_zarr.open_cube` returns for its chunk (see
    :class:`ChunkSource`). Indexing along the first axis (a slice, an integer,
    a list or array of positions or a boolean mask, other axes whole or taken
    with slices and integers) narrows the selection without reading; anything
    else (a numpy function or ufunc, arithmetic, an ndarray method or
    attribute, ``numpy.asarray``) reads the selection once through
    :func:`read_rows` and works on that ndarray, kept for later uses (so a
    ``persist()``-ed cube holds these and reads each on its first use). It
    pickles as that ndarray, so what crosses processes is plain numpy; dask's
    ``sizeof`` counts it at its full size.

    Parameters
    ----------
    layout
        The array, from :func:`array_layout`.
    rows
        The samples: a ``range`` or sorted-or-not integer positions (in bounds).

    Examples
    --------
    >>> chunk = LazyRows(layout, range(0, 5632))  # doctest: +SKIP
    >>> chunk[[3, 4000]].shape    # nothing read yet                  # doctest: +SKIP
    (2, 2, 2, 2, 128, 128)
    >>> float(chunk[[3, 4000]].sum())  # reads 2 inner chunks, not 11 shards  # doctest: +SKIP
    """

    def __init__(self, layout: ArrayLayout, rows: range | np.ndarray) -> None:
        self.layout = layout
        self.rows = rows
        self.dtype = np.dtype(layout.dtype)
        self.shape: tuple[int, ...] = (len(rows), *layout.row_shape)
        self._values: np.ndarray | None = None
        self._lock = threading.Lock()  # dask's threads may share one chunk: read it once

    # --- the array, read once
    def values(self) -> np.ndarray:
        """The selection read as a numpy array (read on the first call, then kept)."""
        if self._values is None:
            with self._lock:
                if self._values is None:
                    rows = self.rows
                    if isinstance(rows, range) and rows.step == 1:
                        key: Any = slice(rows.start, rows.stop)
                    else:
                        key = np.asarray(rows, dtype=np.int64)
                    self._values = read_rows(self.layout, key)
        return self._values

    @staticmethod
    def _unwrap(value: Any) -> Any:
        if isinstance(value, LazyRows):
            return value.values()
        if isinstance(value, (list, tuple)):
            return type(value)(LazyRows._unwrap(v) for v in value)
        if isinstance(value, dict):
            return {k: LazyRows._unwrap(v) for k, v in value.items()}
        return value

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        from . import streaming  # reductions and the steps before them: a piece at a time

        done = streaming.array_ufunc(ufunc, method, inputs, kwargs)
        if done is not NotImplemented:
            return done
        return getattr(ufunc, method)(*self._unwrap(inputs), **self._unwrap(kwargs))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        from . import streaming

        done = streaming.array_function(func, args, kwargs)
        if done is not NotImplemented:
            return done
        return func(*self._unwrap(args), **self._unwrap(kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("layout", "rows", "_values", "_lock"):
            raise AttributeError(name)
        from . import streaming

        streamed = streaming.method(self, name)
        return streamed if streamed is not None else getattr(self.values(), name)

    def __repr__(self) -> str:
        state = "read" if self._values is not None else "not read"
        return f"LazyRows({self.layout.path!r}, shape={self.shape}, dtype={self.dtype}, {state})"

    # --- narrowing
    def __getitem__(self, key: Any) -> Any:
        if self._values is not None:
            return self._values[key]
        parts = key if isinstance(key, tuple) else (key,)
        first, rest = (parts[0], parts[1:]) if parts else (slice(None), ())
        narrow = (
            sum(k is not Ellipsis for k in parts) <= self.ndim
            and sum(k is Ellipsis for k in rest) <= 1
            and all(k is Ellipsis or isinstance(k, (slice, int, np.integer)) for k in rest)
        )
        if narrow and not isinstance(first, (slice, int, np.integer)):
            first = np.asarray(first)
            narrow = first.ndim == 1 and first.dtype.kind in "biu"
        if not narrow:
            return self.values()[key]
        rows: range | np.ndarray
        if isinstance(first, slice):
            rows = self.rows[first]
        elif isinstance(first, (int, np.integer)):
            rows = np.asarray([self._positions()[first]])
        else:
            rows = self._positions()[first]
        picked = LazyRows(self.layout, rows)
        if isinstance(first, (int, np.integer)):
            return picked.values()[(0, *rest)]
        if all(k is Ellipsis or _is_whole(k) for k in rest):
            return picked
        return picked.values()[(slice(None), *rest)]

    def _positions(self) -> np.ndarray:
        if isinstance(self.rows, range):
            return np.arange(self.rows.start, self.rows.stop, self.rows.step, dtype=np.int64)
        return self.rows


@sizeof.register(LazyRows)
def _sizeof_lazy_rows(chunk: LazyRows) -> int:
    # as much as it holds once read: what dask's memory accounting should plan for
    return chunk.nbytes


class ChunkSource:
    """What :func:`dask.array.from_array` reads a fast-readable array's chunks from.

    ``source[region]`` is a :class:`LazyRows` of the region's samples (every
    other axis whole), read when the chunk is used as an array; a region that
    cuts another axis is read at once. Picklable (the layout only).

    Parameters
    ----------
    array
        The array, a :class:`FastBackendArray`.

    Examples
    --------
    >>> source = ChunkSource(fast_array(group["rtc"], path))  # doctest: +SKIP
    >>> x = da.from_array(source, (5632, *source.shape[1:]), meta=source.meta)  # doctest: +SKIP
    >>> x[[3, 600_000]].compute()  # reads two inner chunks                 # doctest: +SKIP
    """

    def __init__(self, array: FastBackendArray) -> None:
        self.layout = array.layout
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = len(self.shape)
        self.meta = np.empty((0,) * self.ndim, dtype=self.dtype)

    def __getitem__(self, region: tuple[Any, ...]) -> LazyRows | np.ndarray:
        region = region if isinstance(region, tuple) else (region,)
        first, rest = region[0], region[1:]
        whole = all(
            isinstance(k, slice) and k.step in (None, 1) and range(n)[k] == range(n)
            for k, n in zip(rest, self.shape[1:], strict=False)
        )
        if isinstance(first, slice) and whole:
            return LazyRows(self.layout, range(self.shape[0])[first])
        return FastBackendArray(self.layout)._getitem(region)


def fast_array(
    array: zarr.Array, path: str, location: Location | None = None
) -> FastBackendArray | None:
    """A :class:`FastBackendArray` for a zarr array, or None where it cannot decode it.

    Parameters
    ----------
    array
        The zarr-python array (metadata only is read).
    path
        Its local directory, or its URL on a remote store.
    location
        The cube's remote store (None for a local one).

    Returns
    -------
    FastBackendArray or None
    """
    layout = array_layout(array, path, location)
    return None if layout is None else FastBackendArray(layout)


def layouts(
    group: zarr.Group, root: str, names: Mapping[str, Any] | list[str]
) -> dict[str, ArrayLayout | None]:
    """:func:`array_layout` of each named array of ``group`` stored under the local ``root``."""
    return {name: array_layout(_array(group, name), os.path.join(root, name)) for name in names}


def _array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{name!r} is a group, not an array")
    return node
