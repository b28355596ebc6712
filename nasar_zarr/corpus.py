"""Reading a release as a whole: its metadata, its summary, its tar list and tar indexes.

:mod:`nasar_zarr.source` reads the bytes of one tar; this module reads the
release around it (``metadata.parquet``, ``webdataset_summary.json``, the
``data/`` listing) and takes each tar's fingerprint (size and modification time,
or ETag on object stores), so that a tar that changes under a cube is noticed.
Everything the planner needs comes from here; the planner itself stays pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema, source
from .errors import MetadataError, SourceError
from .plan import IndexedTar, TarShard


def read_metadata(src: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The metadata table in release order (rows sorted by shard, then index in shard)."""
    url = source.join(src, schema.METADATA_FILE)
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        fs, root = fsspec.core.url_to_fs(src, **dict(storage_options or {}))
        if not fs.exists(root):
            raise MetadataError(f"{src}: no such file or directory") from None
        raise MetadataError(
            f"{url}: metadata.parquet not found; is {src!r} an NA-SAR "
            "release root (data/, metadata.parquet)?"
        ) from None
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise MetadataError(f"{url}: cannot read parquet: {exc}") from None
    missing = [c for c in schema.SHARDING_COLUMNS if c not in table.column_names]
    if missing:
        raise MetadataError(f"{url}: missing sharding columns {missing}")
    for col in schema.SHARDING_COLUMNS:
        if table.column(col).null_count:
            raise MetadataError(f"{url}: column {col!r} has missing values")
    order = pc.sort_indices(
        table,
        sort_keys=[
            (schema.SHARD_INDEX_COLUMN, "ascending"),
            (schema.INDEX_IN_SHARD_COLUMN, "ascending"),
        ],
    )
    return table.take(order)


def read_summary(src: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """``webdataset_summary.json`` as a dict (``{}`` when the release has none)."""
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


def fingerprint(
    src: str, path: str, storage_options: Mapping[str, Any] | None = None, *, samples: int = 0
) -> TarShard:
    """The tar's size, modification time and ETag as the filesystem reports them.

    Raises FileNotFoundError when the tar does not exist.
    """
    fs, root = fsspec.core.url_to_fs(source.join(src, path), **dict(storage_options or {}))
    info = fs.info(root)
    mtime = next(
        (info[k] for k in ("mtime", "LastModified", "last_modified", "Last-Modified") if info.get(k)),
        None,
    )
    etag = next((info[k] for k in ("ETag", "etag") if info.get(k)), None)
    return TarShard(
        path=path,
        size=int(info["size"]),
        samples=samples,
        mtime=None if mtime is None else str(mtime),
        etag=None if etag is None else str(etag).strip('"'),
    )


def index_tars(
    src: str,
    paths: Sequence[str],
    *,
    on_error: str = "raise",
    max_member_bytes: int = source.DEFAULT_MAX_MEMBER_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    threads: int = 8,
) -> list[IndexedTar]:
    """Fingerprint and index each tar (member byte ranges per sample), in a thread pool.

    A missing tar, or with ``on_error="skip"`` a damaged one, becomes a problem of
    its :class:`IndexedTar` instead of an exception.
    """

    def index_one(path: str) -> IndexedTar:
        try:
            before = fingerprint(src, path, storage_options)
        except FileNotFoundError:
            problem = SourceError("tar shard not found", shard=path)
            return IndexedTar(TarShard(path, 0, 0), (), (problem,))
        problems: list[SourceError] = []
        entries = source.index_shard(
            source.join(src, path),
            shard=path,
            storage_options=storage_options,
            max_member_bytes=max_member_bytes,
            problems=None if on_error == "raise" else problems,
        )
        shard = TarShard(path, before.size, len(entries), before.mtime, before.etag)
        return IndexedTar(shard, tuple(entries), tuple(problems))

    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        return list(pool.map(index_one, paths))


def current_tars(
    src: str, tars: Sequence[TarShard], storage_options: Mapping[str, Any] | None = None
) -> list[TarShard]:
    """The same tars as they are now (one ``stat`` or ``HEAD`` each); missing ones left out."""
    found = []
    for tar in tars:
        try:
            found.append(fingerprint(src, tar.path, storage_options, samples=tar.samples))
        except FileNotFoundError:
            continue
    return found
