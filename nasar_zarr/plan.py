"""Pure planning: a corpus and options become a :class:`ConversionPlan`.

The only I/O is reading ``metadata.parquet``, ``webdataset_summary.json`` and
the tar headers. Samples go in release order, (shard_index,
sample_index_in_shard); each Zarr shard (``options.shard`` samples along
``sample``) becomes exactly one :class:`ShardTask`, which carries the byte
ranges of every tar member it needs, so a task may read the tail of one tar
and the head of the next without any other task touching its Zarr shard.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema, source
from .errors import MetadataError, NasarZarrError, SourceError

ON_ERROR = ("raise", "skip")
CODECS = ("blosc-zstd", "blosc-lz4", "zstd", "none")


@dataclass(frozen=True)
class ConvertOptions:
    """Layout and policy choices of a conversion (recorded in the store)."""

    # Measured (docs/LAYOUT.md): inner 2 keeps single-sample reads ~1 ms and makes
    # dask scans 1.2-1.7x faster than inner 1; shard 512 keeps a worker near 600 MB.
    inner_chunk: int = 2
    shard: int = 512
    # blosc-lz4 + bitshuffle: 0.70x the tar bytes vs 0.69x for blosc-zstd, at 2-3x the
    # write speed and faster reads (docs/LAYOUT.md).
    codec: str = "blosc-lz4"
    clevel: int = 5
    on_error: str = "raise"
    max_member_bytes: int = source.DEFAULT_MAX_MEMBER_BYTES

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
    path: str  # relative to the source root
    size: int
    samples: int


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
            options=ConvertOptions(**d["options"]),
            sample_keys=tuple(d["sample_keys"]),
            tasks=tasks,
            tar_shards=tuple(TarShard(**s) for s in d["tar_shards"]),
            rejected=tuple(Rejection(**r) for r in d["rejected"]),
            summary=d["summary"],
            storage_options=dict(storage_options or {}),
        )

    def execute(self, *, client=None, workers: int | None = None, progress: bool = False,
                overwrite: bool = False):
        """Write the store (see :func:`nasar_zarr.execute.execute`); returns the dataset."""
        from .execute import execute

        return execute(self, client=client, workers=workers, progress=progress,
                       overwrite=overwrite)


# ---------------------------------------------------------------------------- reading


def read_metadata(
    src: str, storage_options: Mapping[str, Any] | None = None
) -> pa.Table:
    """The metadata table in release order (rows sorted by shard, then index in shard)."""
    url = source.join(src, schema.METADATA_FILE)
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise MetadataError(f"{url}: metadata.parquet not found; is {src!r} an NA-SAR "
                            "release root (data/, metadata.parquet)?") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise MetadataError(f"{url}: cannot read parquet: {exc}") from None
    missing = [c for c in schema.SHARDING_COLUMNS if c not in table.column_names]
    if missing:
        raise MetadataError(f"{url}: missing sharding columns {missing}")
    for col in schema.SHARDING_COLUMNS:
        if table.column(col).null_count:
            raise MetadataError(f"{url}: column {col!r} has missing values")
    order = pc.sort_indices(
        table, sort_keys=[(schema.SHARD_INDEX_COLUMN, "ascending"),
                          (schema.INDEX_IN_SHARD_COLUMN, "ascending")]
    )
    return table.take(order)


def read_summary(src: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    url = source.join(src, schema.SUMMARY_FILE)
    try:
        with fsspec.open(url, "rt", **dict(storage_options or {})) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{url}: not valid JSON: {exc}") from None


def list_tar_shards(src: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Relative paths of the tar shards under ``src/data``, sorted."""
    fs, root = fsspec.core.url_to_fs(src, **dict(storage_options or {}))
    root = root.rstrip("/")
    found = fs.glob(f"{root}/{schema.SHARD_GLOB}")
    return sorted(p[len(root) + 1 :] for p in found)


# ---------------------------------------------------------------------------- planning


def plan_conversion(
    src: str,
    dest: str,
    *,
    inner_chunk: int = ConvertOptions.inner_chunk,
    shard: int = ConvertOptions.shard,
    codec: str = ConvertOptions.codec,
    clevel: int = ConvertOptions.clevel,
    on_error: str = "raise",
    max_member_bytes: int = source.DEFAULT_MAX_MEMBER_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    index_threads: int = 8,
) -> ConversionPlan:
    """Plan the conversion of the corpus at ``src`` into a cube at ``dest``.

    Parameters
    ----------
    src, dest
        Local paths or fsspec URLs (``s3://...``).
    inner_chunk, shard
        Samples per inner Zarr chunk and per Zarr shard (one task each).
    codec, clevel
        ``blosc-lz4`` (default) or ``blosc-zstd`` (both bitshuffle), ``zstd`` or ``none``;
        and the compression level.
    on_error
        ``raise`` stops at the first bad sample; ``skip`` rejects it (status 2).
    storage_options
        fsspec options for both ``src`` and ``dest`` (e.g. ``endpoint_url``).

    Raises
    ------
    SourceError, MetadataError
        Bad input under ``on_error="raise"``, naming the shard file and sample key.
    """
    options = ConvertOptions(inner_chunk=inner_chunk, shard=shard, codec=codec, clevel=clevel,
                             on_error=on_error, max_member_bytes=max_member_bytes)
    table = read_metadata(src, storage_options)
    summary = read_summary(src, storage_options)
    keys = table.column(schema.KEY_COLUMN).to_pylist()
    shard_of_row = table.column(schema.SHARD_PATH_COLUMN).to_pylist()
    tar_paths = sorted(set(list_tar_shards(src, storage_options)) | set(shard_of_row))

    def index_one(path: str):
        problems: list[SourceError] = []
        url = source.join(src, path)
        try:
            size = source.file_size(url, storage_options)
        except FileNotFoundError:
            problems.append(SourceError("tar shard not found", shard=path))
            return path, 0, [], problems
        entries = source.index_shard(url, shard=path, storage_options=storage_options,
                                     max_member_bytes=max_member_bytes,
                                     problems=None if on_error == "raise" else problems)
        return path, size, entries, problems

    with ThreadPoolExecutor(max(1, min(index_threads, len(tar_paths)))) as pool:
        indexed = list(pool.map(index_one, tar_paths))
    return assemble_plan(
        src, dest, options, keys, shard_of_row, indexed, summary=summary,
        storage_options=storage_options,
    )


def assemble_plan(
    src: str,
    dest: str,
    options: ConvertOptions,
    keys: Sequence[str],
    shard_of_row: Sequence[str],
    indexed: Sequence[tuple[str, int, Sequence[source.SampleEntry], Sequence[SourceError]]],
    *,
    summary: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ConversionPlan:
    """The pure core of planning: metadata rows (release order) + tar indexes -> plan.

    ``indexed`` holds ``(tar_path, size, entries, problems)`` per tar shard.
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
    for path, size, entries, problems in indexed:
        tar_shards.append(TarShard(path, size, len(entries)))
        for problem in problems:
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
    "ConversionPlan",
    "ConvertOptions",
    "NasarZarrError",
    "ReadSpan",
    "Rejection",
    "ShardTask",
    "assemble_plan",
    "plan_conversion",
    "read_metadata",
    "shard_bounds",
]
