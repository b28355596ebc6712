"""Pure planning: metadata rows and tar indexes become a :class:`ConversionPlan`.

No I/O here (:mod:`nasar_zarr.corpus` reads the release; :func:`nasar_zarr.api.
plan_conversion` composes the two). Samples go in release order,
(shard_index, sample_index_in_shard); each Zarr shard (``options.shard``
samples along ``sample``) becomes exactly one :class:`ShardTask`, which carries
the byte ranges of every tar member it needs, so a task may read the tail of
one tar and the head of the next without any other task touching its Zarr shard.

This module imports nothing above it (tests/test_layers.py holds that). The
writing side sits above, so :meth:`ConversionPlan.execute` runs whatever
:func:`register_executor` was given: the package's ``__init__`` hands it
:func:`nasar_zarr.execute.execute` once, when ``nasar_zarr`` is imported (which
any import of this module does first), the way xarray's accessors are plugged in.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import source
from .errors import MetadataError, SourceError

if TYPE_CHECKING:
    import xarray as xr

Codec = Literal["blosc-lz4", "blosc-zstd", "zstd", "none"]
OnError = Literal["raise", "skip"]
CODECS: tuple[str, ...] = get_args(Codec)
ON_ERROR: tuple[str, ...] = get_args(OnError)


@dataclass(frozen=True)
class ConvertOptions:
    """Layout and policy choices of a conversion (recorded in the store)."""

    # Measured (docs/LAYOUT.md): inner 2 keeps single-sample reads ~1 ms and makes
    # dask scans 1.2-1.7x faster than inner 1; shard 512 keeps a worker near 600 MB.
    inner_chunk: int = 2
    shard: int = 512
    # blosc-lz4 + bitshuffle: 0.70x the tar bytes vs 0.69x for blosc-zstd, at 2-3x the
    # write speed and faster reads (docs/LAYOUT.md).
    codec: Codec = "blosc-lz4"
    clevel: int = 5
    on_error: OnError = "raise"
    max_member_bytes: int = source.DEFAULT_MAX_MEMBER_BYTES
    # Metadata columns named explicitly for a role (``("lat", "y0")``, ...); the
    # others are recognised by their usual spellings (nasar_zarr.columns).
    columns: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.inner_chunk < 1 or self.shard < 1:
            raise ValueError(
                f"inner_chunk and shard must be >= 1, got {self.inner_chunk}, {self.shard}"
            )
        if self.shard % self.inner_chunk:
            raise ValueError(
                f"shard ({self.shard}) must be a multiple of inner_chunk ({self.inner_chunk})"
            )
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")

    def layout(self) -> dict[str, Any]:
        """The choices that fix the bytes of the store (a rerun must match them)."""
        return {
            "inner_chunk": self.inner_chunk,
            "shard": self.shard,
            "codec": self.codec,
            "clevel": self.clevel,
        }


@dataclass(frozen=True)
class Rejection:
    """A sample left out as bad input; ``row`` is its cube index, None if not in the cube."""

    shard: str
    key: str | None
    reason: str
    row: int | None = None


@dataclass(frozen=True, eq=False)
class ReadSpan:
    """Samples one task reads from one tar: ``rows[i]`` is where sample ``i`` of ``index`` goes.

    Columnar (numpy arrays and one Arrow string array), so a task carries no
    per-sample Python objects to the scheduler.
    """

    shard_path: str
    rows: np.ndarray  # int64 cube rows, ascending
    index: source.TarIndex

    @property
    def entries(self) -> tuple[source.SampleEntry, ...]:
        """The samples as :class:`~nasar_zarr.source.SampleEntry` objects."""
        return tuple(self.index.entries())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReadSpan):
            return NotImplemented
        return (
            self.shard_path == other.shard_path
            and np.array_equal(self.rows, other.rows)
            and self.index == other.index
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ShardTask:
    """Write Zarr shard ``index`` (samples ``start:stop``) in one piece."""

    index: int
    start: int
    stop: int
    spans: tuple[ReadSpan, ...]

    @property
    def n_samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TarShard:
    """One tar of the release as it was when indexed.

    ``mtime`` and ``etag`` are whatever the filesystem reports (None where it
    reports nothing); together with ``size`` they tell whether the tar changed.
    """

    path: str  # relative to the source root
    size: int
    samples: int
    mtime: str | None = None
    etag: str | None = None

    def differs_from(self, other: TarShard) -> str | None:
        """How ``other`` (the same path, seen later) differs from this one, or None."""
        if self.size != other.size:
            return f"size {self.size:,} -> {other.size:,} bytes"
        if self.etag and other.etag and self.etag != other.etag:
            return f"ETag {self.etag} -> {other.etag}"
        if self.mtime and other.mtime and self.mtime != other.mtime:
            return f"modified {self.mtime} -> {other.mtime}"
        return None


@dataclass(frozen=True)
class IndexedTar:
    """A tar's fingerprint, its samples' member ranges, and the problems found in it.

    ``entries`` is a :class:`~nasar_zarr.source.TarIndex` (a sequence of
    :class:`~nasar_zarr.source.SampleEntry` is converted to one).
    """

    shard: TarShard
    entries: source.TarIndex
    problems: tuple[SourceError, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.entries, source.TarIndex):
            object.__setattr__(self, "entries", source.TarIndex.from_entries(self.entries))

    @property
    def index(self) -> source.TarIndex:
        return self.entries


@dataclass(frozen=True, eq=False)
class PlanIndex:
    """Where each cube row's sample is: tar ``row_tar[r]`` (-1: nowhere), sample
    ``row_pos[r]`` of that tar's index ``tars[row_tar[r]]``."""

    tars: tuple[source.TarIndex, ...]
    row_tar: np.ndarray  # int32
    row_pos: np.ndarray  # int64

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlanIndex):
            return NotImplemented
        return (
            self.tars == other.tars
            and np.array_equal(self.row_tar, other.row_tar)
            and np.array_equal(self.row_pos, other.row_pos)
        )

    __hash__ = None  # type: ignore[assignment]


class TaskList(Sequence[ShardTask]):
    """The plan's tasks, each built when asked for from the columnar index."""

    def __init__(self, plan: ConversionPlan) -> None:
        self._plan = plan
        self._n = -(-plan.n_samples // plan.options.shard)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> ShardTask: ...

    @overload
    def __getitem__(self, i: slice) -> list[ShardTask]: ...

    def __getitem__(self, i: int | slice) -> ShardTask | list[ShardTask]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return _task(self._plan, i)

    def __repr__(self) -> str:
        return f"<{self._n} shard tasks>"


def _task(plan: ConversionPlan, i: int) -> ShardTask:
    shard = plan.options.shard
    lo, hi = i * shard, min((i + 1) * shard, plan.n_samples)
    tar = plan.index.row_tar[lo:hi]
    located = np.flatnonzero(tar >= 0)
    spans = []
    if len(located):
        tars = tar[located]
        cuts = np.flatnonzero(tars[1:] != tars[:-1]) + 1
        for run in np.split(located, cuts):
            t = int(tar[run[0]])
            spans.append(
                ReadSpan(
                    plan.tar_shards[t].path,
                    (run + lo).astype(np.int64),
                    plan.index.tars[t].take(plan.index.row_pos[lo + run]),
                )
            )
    return ShardTask(i, lo, hi, tuple(spans))


@dataclass(frozen=True)
class ConversionPlan:
    """What a conversion will do: the cube's rows, where each sample's bytes are, the tasks.

    The index is columnar (:class:`PlanIndex`), the sample keys an Arrow string
    array (a sequence of str is converted); :attr:`tasks` builds each
    :class:`ShardTask` (with only its own spans) when it is asked for.
    """

    source: str
    dest: str
    options: ConvertOptions
    sample_keys: pa.StringArray
    tar_shards: tuple[TarShard, ...]
    index: PlanIndex
    rejected: tuple[Rejection, ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_keys", _strings(self.sample_keys))

    @property
    def n_samples(self) -> int:
        return len(self.sample_keys)

    def has_keys(self, keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> bool:
        """Whether ``keys`` are the plan's sample keys, in the same order."""
        return _strings(keys).equals(self.sample_keys)

    @property
    def tasks(self) -> TaskList:
        """One :class:`ShardTask` per Zarr shard, built on access."""
        return TaskList(self)

    def spanning_tasks(self) -> int:
        """Tasks that read more than one tar."""
        rows = np.flatnonzero(self.index.row_tar >= 0)
        tars = self.index.row_tar[rows]
        task = rows // self.options.shard
        change = (tars[1:] != tars[:-1]) & (task[1:] == task[:-1])
        return int(np.unique(task[1:][change]).size)

    def rejections_by_reason(self) -> dict[str, int]:
        """How many samples planning rejected, by reason, most frequent first."""
        return dict(Counter(r.reason for r in self.rejected).most_common())

    def __repr__(self) -> str:
        o = self.options
        nbytes = sum(t.size for t in self.tar_shards)
        lines = [
            f"<ConversionPlan {self.source} -> {self.dest}>",
            f"  samples:   {self.n_samples:,} from {len(self.tar_shards)} tar shards"
            f" ({nbytes / 1e9:.2f} GB)",
            f"  layout:    inner chunk {o.inner_chunk}, shard {o.shard} samples,"
            f" codec {o.codec} (level {o.clevel})",
            f"  tasks:     {len(self.tasks)} (one per Zarr shard; one writer each)",
            f"  on error:  {o.on_error}",
        ]
        if self.rejected:
            lines.append(f"  rejected:  {len(self.rejected)} samples at planning")
            lines += [f"    {r.shard}: {r.key!r}: {r.reason}" for r in self.rejected[:5]]
            reasons = self.rejections_by_reason()
            if len(self.rejected) > 5:
                lines.append("  by reason:")
                lines += [f"    {n:>9,}  {reason}" for reason, n in list(reasons.items())[:10]]
                if len(reasons) > 10:
                    lines.append(f"    ... and {len(reasons) - 10} other reasons")
        lines.append(f"  tasks reading more than one tar: {self.spanning_tasks()}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """A JSON text that :meth:`from_json` turns back into an equal plan (no credentials).

        The index and the sample keys are stored columnar and compressed (zlib,
        base64), so the text stays small at a million samples.
        """
        r = self.rejected
        d = {
            "format": PLAN_FORMAT,
            "source": self.source,
            "dest": self.dest,
            "options": asdict(self.options),
            "tar_shards": [asdict(t) for t in self.tar_shards],
            "summary": dict(self.summary),
            "sample_keys": _pack_json(self.sample_keys.to_pylist()),
            "rejected": _pack_json(
                {
                    "shard": [x.shard for x in r],
                    "key": [x.key for x in r],
                    "reason": [x.reason for x in r],
                    "row": [x.row for x in r],
                }
            ),
            "row_tar": _pack_array(self.index.row_tar),
            "row_pos": _pack_array(self.index.row_pos, delta=True),
            "tars": [_pack_index(t) for t in self.index.tars],
        }
        return json.dumps(d)

    @classmethod
    def from_json(
        cls, text: str, *, storage_options: Mapping[str, Any] | None = None
    ) -> ConversionPlan:
        """The plan :meth:`to_json` wrote.

        Raises
        ------
        ValueError
            The text is not a plan of this version's format.
        """
        d = json.loads(text)
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"not a nasar-zarr plan of format {PLAN_FORMAT!r} (plan again with this version)"
            )
        r = _unpack_json(d["rejected"])
        return cls(
            source=d["source"],
            dest=d["dest"],
            options=ConvertOptions(
                **{**d["options"], "columns": tuple(map(tuple, d["options"].get("columns", ())))}
            ),
            sample_keys=pa.array(_unpack_json(d["sample_keys"]), pa.string()),
            tar_shards=tuple(TarShard(**s) for s in d["tar_shards"]),
            index=PlanIndex(
                tuple(_unpack_index(t) for t in d["tars"]),
                _unpack_array(d["row_tar"]),
                _unpack_array(d["row_pos"]),
            ),
            rejected=tuple(
                Rejection(*x) for x in zip(r["shard"], r["key"], r["reason"], r["row"], strict=True)
            ),
            summary=d["summary"],
            storage_options=dict(storage_options or {}),
        )

    def execute(
        self,
        *,
        client: Any = None,
        workers: int | None = None,
        progress: bool = False,
        overwrite: bool = False,
    ) -> xr.Dataset:
        """Write the store (see :func:`nasar_zarr.execute.execute`); returns the dataset.

        Parameters
        ----------
        client
            A ``distributed.Client``; without one a LocalCluster of ``workers``
            single-threaded processes is started (``workers=0``: in this process).
        workers
            Worker processes of the LocalCluster (default one per core).
        progress
            Show a progress bar on stderr.
        overwrite
            Replace a cube made with other options instead of refusing.

        Returns
        -------
        xarray.Dataset
            The cube, opened lazily.

        Examples
        --------
        >>> plan = nasar_zarr.plan_conversion("corpus", "nasar.zarr")  # doctest: +SKIP
        >>> ds = plan.execute(workers=2)  # doctest: +SKIP
        """
        if not _EXECUTOR:
            raise RuntimeError(
                "ConversionPlan.execute has no writer: import nasar_zarr (its __init__"
                " registers nasar_zarr.execute.execute), or call nasar_zarr.execute(plan)"
            )
        return _EXECUTOR[0](
            self, client=client, workers=workers, progress=progress, overwrite=overwrite
        )


class Executor(Protocol):
    """What writes a plan's store: :func:`nasar_zarr.execute.execute`'s signature."""

    def __call__(
        self,
        plan: ConversionPlan,
        *,
        client: Any = ...,
        workers: int | None = ...,
        progress: bool = ...,
        overwrite: bool = ...,
    ) -> xr.Dataset: ...


# The writer of :meth:`ConversionPlan.execute`: set once while ``nasar_zarr`` is imported
# (under the import lock, before any thread or task exists), only read after that.
_EXECUTOR: list[Executor] = []


def register_executor(executor: Executor) -> None:
    """Make :meth:`ConversionPlan.execute` run ``executor`` (the package does this on import).

    The writing side imports this module, so this module cannot import it: the
    dependency is handed down instead. Registering the same function again is a
    no-op; another one is refused, so what ``plan.execute`` runs never changes.

    Raises
    ------
    RuntimeError
        A different executor is already registered.
    """
    if _EXECUTOR and _EXECUTOR[0] is not executor:
        current = _EXECUTOR[0]
        name = f"{current.__module__}.{getattr(current, '__qualname__', current)}"
        raise RuntimeError(
            f"ConversionPlan.execute already runs {name}; call your writer as writer(plan) instead"
        )
    _EXECUTOR[:] = [executor]


PLAN_FORMAT = "nasar-zarr-plan/2"


def _pack_json(value: Any) -> str:
    return base64.b64encode(zlib.compress(json.dumps(value).encode(), 6)).decode()


def _unpack_json(text: str) -> Any:
    return json.loads(zlib.decompress(base64.b64decode(text)))


def _pack_array(a: np.ndarray, *, delta: bool = False) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    raw = np.diff(a, prepend=a.dtype.type(0)) if delta and a.size else a
    return {
        "dtype": a.dtype.str,
        "delta": delta,
        "data": base64.b64encode(zlib.compress(raw.tobytes(), 6)).decode(),
    }


def _unpack_array(d: Mapping[str, Any]) -> np.ndarray:
    a = np.frombuffer(zlib.decompress(base64.b64decode(d["data"])), dtype=np.dtype(d["dtype"]))
    return np.cumsum(a, dtype=a.dtype) if d.get("delta") else a.copy()


def _pack_index(t: source.TarIndex) -> dict[str, Any]:
    return {
        "keys": _pack_json(t.keys.to_pylist()),
        "member_start": _pack_array(t.member_start, delta=True),
        "offset": _pack_array(t.offset, delta=True),
        "size": _pack_array(t.size),
        "suffix": _pack_array(t.suffix),
        "suffixes": list(t.suffixes),
    }


def _unpack_index(d: Mapping[str, Any]) -> source.TarIndex:
    return source.TarIndex(
        pa.array(_unpack_json(d["keys"]), pa.string()),
        _unpack_array(d["member_start"]),
        _unpack_array(d["offset"]),
        _unpack_array(d["size"]),
        _unpack_array(d["suffix"]),
        tuple(d["suffixes"]),
    )


# ---------------------------------------------------------------------------- planning


def assemble_plan(
    src: str,
    dest: str,
    options: ConvertOptions,
    keys: Sequence[str] | pa.Array | pa.ChunkedArray,
    shard_of_row: Sequence[str] | pa.Array | pa.ChunkedArray,
    indexed: Sequence[IndexedTar],
    *,
    summary: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ConversionPlan:
    """The pure core of planning: metadata rows (release order) + tar indexes -> plan.

    ``indexed`` holds one :class:`IndexedTar` per tar shard. Matching is
    columnar (Arrow hash joins over the keys), so a million samples cost no
    per-sample Python objects.

    Parameters
    ----------
    src, dest
        Source and destination, as the plan records them.
    options
        Layout and policy.
    keys, shard_of_row
        Each metadata row's sample key and tar path, in release order.
    indexed
        The tars' indexes.
    summary, storage_options
        Recorded in the plan.

    Returns
    -------
    ConversionPlan
        The plan.

    Raises
    ------
    MetadataError
        A sample key appears in more than one metadata row.
    SourceError
        The first problem, under ``on_error="raise"``.

    Examples
    --------
    >>> plan = assemble_plan("src", "dest", ConvertOptions(), [], [], [])
    >>> plan.n_samples
    0
    """
    strict = options.on_error == "raise"
    rejected: list[Rejection] = []

    def reject(error: SourceError, row: int | None = None) -> None:
        if strict:
            raise error
        rejected.append(Rejection(error.shard, error.key, error.reason, row))

    key_arr = _strings(keys)
    n = len(key_arr)
    if n and pc.count_distinct(key_arr).as_py() != n:
        seen: set[str] = set()
        for key in key_arr.to_pylist():
            if key in seen:
                raise MetadataError(
                    f"metadata.parquet: sample_key {key!r} appears in more than one row"
                )
            seen.add(key)
    paths = [tar.shard.path for tar in indexed]
    path_arr = _strings(shard_of_row)
    code = pc.index_in(path_arr, value_set=pa.array(paths, pa.string()))
    row_code = code.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    row_tar = np.full(n, -1, dtype=np.int32)
    row_pos = np.zeros(n, dtype=np.int64)
    rejected_row = np.zeros(n, dtype=bool)

    # One hash join for every tar's keys (a join per tar would rebuild the hash table).
    tar_keys = [tar.entries.keys.cast(pa.string()) for tar in indexed]
    every = pa.concat_arrays(tar_keys) if tar_keys else pa.array([], pa.string())
    if every.equals(key_arr):
        all_rows = np.arange(n, dtype=np.int64)  # the tars hold the rows in release order
    else:
        all_rows = (
            pc.index_in(every, value_set=key_arr)
            .fill_null(-1)
            .to_numpy(zero_copy_only=False)
            .astype(np.int64)
        )
    del every
    bounds = np.cumsum([0] + [len(k) for k in tar_keys])
    for t, tar in enumerate(indexed):
        path, index = tar.shard.path, tar.entries
        found = (
            pc.index_in(
                pa.array([p.key or "" for p in tar.problems], pa.string()), value_set=key_arr
            ).to_pylist()
            if tar.problems
            else []
        )
        for problem, row in zip(tar.problems, found, strict=True):
            row = row if problem.key else None
            reject(problem, row)
            if row is not None:
                rejected_row[row] = True
        if not len(index):
            continue
        rows = all_rows[bounds[t] : bounds[t + 1]]
        known = rows >= 0
        safe = np.where(known, rows, 0)
        duplicate = known & (row_tar[safe] >= 0)
        elsewhere = known & ~duplicate & (row_code[safe] != t)
        good = known & ~duplicate & ~elsewhere
        for pos in np.flatnonzero(~good).tolist():
            key = index.keys[pos].as_py()
            row = int(rows[pos])
            if row < 0:
                reject(
                    SourceError(
                        "sample is in the tar but not in metadata.parquet", shard=path, key=key
                    )
                )
            elif duplicate[pos]:
                reject(
                    SourceError(
                        f"duplicate sample key: also in {paths[row_tar[row]]}", shard=path, key=key
                    ),
                    row,
                )
                rejected_row[row] = True
            else:
                reject(
                    SourceError(
                        f"metadata.parquet places this sample in {path_arr[row].as_py()}",
                        shard=path,
                        key=key,
                    ),
                    None,
                )
        ok = np.flatnonzero(good)
        row_tar[rows[ok]] = t
        row_pos[rows[ok]] = ok
    row_tar[rejected_row] = -1  # e.g. a key in two tars: neither copy is trusted
    for row in np.flatnonzero((row_tar < 0) & ~rejected_row).tolist():
        reject(
            SourceError(
                "metadata.parquet lists this sample but no tar holds it",
                shard=path_arr[row].as_py(),
                key=key_arr[row].as_py(),
            ),
            row,
        )
    row_pos[row_tar < 0] = 0
    return ConversionPlan(
        source=src,
        dest=dest,
        options=options,
        sample_keys=key_arr,
        tar_shards=tuple(tar.shard for tar in indexed),
        index=PlanIndex(tuple(tar.entries for tar in indexed), row_tar, row_pos),
        rejected=tuple(rejected),
        summary=dict(summary or {}),
        storage_options=dict(storage_options or {}),
    )


def _strings(values: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.StringArray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if values.type == pa.string() else values.cast(pa.string())
    if isinstance(values, np.ndarray) and values.dtype.kind in "TU":  # no Python objects
        return pa.array(values.ravel(), pa.string())
    return pa.array(list(values), pa.string())


def shard_bounds(n_samples: int, shard: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each Zarr shard along ``sample``; the last may be short."""
    return [(lo, min(lo + shard, n_samples)) for lo in range(0, n_samples, shard)]


def task_rows(task: ShardTask) -> np.ndarray:
    """Cube rows a task has data for."""
    if not task.spans:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([span.rows for span in task.spans]).astype(np.int64)


__all__ = [
    "Codec",
    "ConversionPlan",
    "ConvertOptions",
    "Executor",
    "IndexedTar",
    "OnError",
    "PlanIndex",
    "ReadSpan",
    "Rejection",
    "ShardTask",
    "TarShard",
    "TaskList",
    "assemble_plan",
    "register_executor",
    "shard_bounds",
]
