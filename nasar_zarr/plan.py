"""Pure planning: metadata rows and tar indexes become a :class:`ConversionPlan`.

No I/O here (:mod:`nasar_zarr.corpus` reads the release; :func:`nasar_zarr.api.
plan_conversion` composes the two). Samples go in release order,
(shard_index, sample_index_in_shard); each Zarr shard (``options.shard``
samples along ``sample``) becomes exactly one :class:`ShardTask`, which carries
the byte ranges of every tar member it needs, so a task may read the tail of
one tar and the head of the next without any other task touching its Zarr shard.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

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
            raise ValueError(f"inner_chunk and shard must be >= 1, got {self.inner_chunk}, "
                             f"{self.shard}")
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
        return {"inner_chunk": self.inner_chunk, "shard": self.shard, "codec": self.codec,
                "clevel": self.clevel}


@dataclass(frozen=True)
class Rejection:
    """A sample left out as bad input; ``row`` is its cube index, None if not in the cube."""

    shard: str
    key: str | None
    reason: str
    row: int | None = None


@dataclass(frozen=True)
class ReadSpan:
    """Samples one task reads from one tar: ``rows[i]`` is where ``entries[i]`` goes."""

    shard_path: str
    rows: tuple[int, ...]
    entries: tuple[source.SampleEntry, ...]


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
    """A tar's fingerprint, its samples' member ranges, and the problems found in it."""

    shard: TarShard
    entries: tuple[source.SampleEntry, ...]
    problems: tuple[SourceError, ...] = ()


@dataclass(frozen=True)
class ConversionPlan:
    source: str
    dest: str
    options: ConvertOptions
    sample_keys: tuple[str, ...]
    tasks: tuple[ShardTask, ...]
    tar_shards: tuple[TarShard, ...]
    rejected: tuple[Rejection, ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_samples(self) -> int:
        return len(self.sample_keys)

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
        spanning = sum(len(t.spans) > 1 for t in self.tasks)
        lines.append(f"  tasks reading more than one tar: {spanning}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """A JSON text that :meth:`from_json` turns back into an equal plan (no credentials)."""
        d = asdict(self)
        d.pop("storage_options")
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str, *, storage_options: Mapping[str, Any] | None = None):
        d = json.loads(text)
        tasks = tuple(
            ShardTask(
                t["index"], t["start"], t["stop"],
                tuple(
                    ReadSpan(
                        s["shard_path"], tuple(s["rows"]),
                        tuple(
                            source.SampleEntry(
                                e["key"], tuple(source.Member(**m) for m in e["members"])
                            )
                            for e in s["entries"]
                        ),
                    )
                    for s in t["spans"]
                ),
            )
            for t in d["tasks"]
        )
        return cls(
            source=d["source"],
            dest=d["dest"],
            options=ConvertOptions(
                **{**d["options"], "columns": tuple(map(tuple, d["options"].get("columns", ())))}
            ),
            sample_keys=tuple(d["sample_keys"]),
            tasks=tasks,
            tar_shards=tuple(TarShard(**s) for s in d["tar_shards"]),
            rejected=tuple(Rejection(**r) for r in d["rejected"]),
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
        """Write the store (see :func:`nasar_zarr.api.execute`); returns the dataset.

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
        # Deferred: the plan stays importable without the writing side.
        from .api import execute

        return execute(
            self, client=client, workers=workers, progress=progress, overwrite=overwrite
        )


# ---------------------------------------------------------------------------- planning


def assemble_plan(
    src: str,
    dest: str,
    options: ConvertOptions,
    keys: Sequence[str],
    shard_of_row: Sequence[str],
    indexed: Sequence[IndexedTar],
    *,
    summary: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ConversionPlan:
    """The pure core of planning: metadata rows (release order) + tar indexes -> plan.

    ``indexed`` holds one :class:`IndexedTar` per tar shard.
    """
    strict = options.on_error == "raise"
    rejected: list[Rejection] = []

    def reject(error: SourceError, row: int | None = None) -> None:
        if strict:
            raise error
        rejected.append(Rejection(error.shard, error.key, error.reason, row))

    row_of_key: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key in row_of_key:
            raise MetadataError(
                f"metadata.parquet: sample_key {key!r} appears in more than one row"
            )
        row_of_key[key] = row
    located: dict[int, tuple[str, source.SampleEntry]] = {}
    tar_shards = []
    for tar in indexed:
        path, entries = tar.shard.path, tar.entries
        tar_shards.append(tar.shard)
        for problem in tar.problems:
            reject(problem, row_of_key.get(problem.key) if problem.key else None)
        for entry in entries:
            row = row_of_key.get(entry.key)
            if row is None:
                reject(SourceError("sample is in the tar but not in metadata.parquet",
                                   shard=path, key=entry.key))
            elif row in located:
                reject(SourceError(f"duplicate sample key: also in {located[row][0]}",
                                   shard=path, key=entry.key), row)
            elif shard_of_row[row] != path:
                reject(SourceError(
                    f"metadata.parquet places this sample in {shard_of_row[row]}",
                    shard=path, key=entry.key), None)
            else:
                located[row] = (path, entry)
    rejected_rows = {r.row for r in rejected if r.row is not None}
    for row in rejected_rows:
        located.pop(row, None)  # e.g. a key in two tars: neither copy is trusted
    for row, key in enumerate(keys):
        if row not in located and row not in rejected_rows:
            reject(SourceError("metadata.parquet lists this sample but no tar holds it",
                               shard=shard_of_row[row], key=key), row)
    tasks = tuple(_tasks(len(keys), options.shard, located))
    return ConversionPlan(
        source=src, dest=dest, options=options, sample_keys=tuple(keys), tasks=tasks,
        tar_shards=tuple(tar_shards), rejected=tuple(rejected), summary=dict(summary or {}),
        storage_options=dict(storage_options or {}),
    )


def shard_bounds(n_samples: int, shard: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each Zarr shard along ``sample``; the last may be short."""
    return [(lo, min(lo + shard, n_samples)) for lo in range(0, n_samples, shard)]


def _tasks(n: int, shard: int, located: Mapping[int, tuple[str, source.SampleEntry]]):
    for index, (lo, hi) in enumerate(shard_bounds(n, shard)):
        spans: list[ReadSpan] = []
        rows: list[int] = []
        entries: list[source.SampleEntry] = []
        current = None
        for row in range(lo, hi):
            if row not in located:
                continue
            path, entry = located[row]
            if path != current and rows:
                spans.append(ReadSpan(current, tuple(rows), tuple(entries)))
                rows, entries = [], []
            current = path
            rows.append(row)
            entries.append(entry)
        if rows:
            spans.append(ReadSpan(current, tuple(rows), tuple(entries)))
        yield ShardTask(index, lo, hi, tuple(spans))


def task_rows(task: ShardTask) -> np.ndarray:
    """Cube rows a task has data for."""
    return np.array([r for span in task.spans for r in span.rows], dtype=np.int64)


__all__ = [
    "Codec",
    "ConversionPlan",
    "ConvertOptions",
    "IndexedTar",
    "OnError",
    "ReadSpan",
    "Rejection",
    "ShardTask",
    "TarShard",
    "assemble_plan",
    "shard_bounds",
]
