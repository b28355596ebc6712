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
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq

from . import schema, source
from .errors import MetadataError, SourceError
from .plan import IndexedTar, TarShard

NO_LISTING = ("http", "https")  # protocols whose directories cannot be listed


def open_metadata(src: str, storage_options: Mapping[str, Any] | None = None) -> pq.ParquetFile:
    """``metadata.parquet`` opened once: memory-mapped locally, fetched whole (one GET)
    from a remote store, so that its schema and every column are then read from
    the same bytes (one request per run step, not one per column).

    Raises
    ------
    MetadataError
        It does not exist or is not Parquet.
    """
    url = source.join(src, schema.METADATA_FILE)
    try:
        if source.is_remote(src):
            from . import store

            fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
            data: Any = pa.py_buffer(store.read_bytes(fs, path))
        else:
            data = pa.memory_map(url.split("://", 1)[1] if url.startswith("file://") else url)
        return pq.ParquetFile(data)
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


def read_metadata(
    src: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
    parquet: pq.ParquetFile | None = None,
) -> pa.Table:
    """The metadata table in release order (rows sorted by shard, then index in shard).

    ``columns`` reads only those (the sharding columns are always read); planning
    needs no more, which keeps a million rows' footprints and granule names out
    of memory until the skeleton is written (:class:`MetadataColumns` reads
    them there one at a time). ``parquet``: the file from :func:`open_metadata`.
    """
    url = source.join(src, schema.METADATA_FILE)
    if columns is not None:
        columns = list(dict.fromkeys([*schema.SHARDING_COLUMNS, *columns]))
    if parquet is None:
        parquet = open_metadata(src, storage_options)
    table = _read_parquet(url, parquet, columns)
    _check_sharding(url, table)
    order = _release_order(table)
    return table if order is None else table.take(order)


class MetadataColumns:
    """``metadata.parquet`` read one column at a time, in release order.

    Writing the skeleton needs every column, but only one at a time: the
    release's whole table (~400 MB in Arrow) is never in memory at once. Has the
    ``schema`` and ``column(name)`` of a ``pyarrow.Table``. The file is opened
    once (:func:`open_metadata`).

    Examples
    --------
    >>> metadata = MetadataColumns("release")  # doctest: +SKIP
    >>> metadata.column("center_lat")  # doctest: +SKIP
    """

    def __init__(
        self,
        src: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        parquet: pq.ParquetFile | None = None,
    ) -> None:
        self.src = src
        self.storage_options = dict(storage_options or {})
        self.url = source.join(src, schema.METADATA_FILE)
        self._parquet = open_metadata(src, storage_options) if parquet is None else parquet
        sharding = _read_parquet(self.url, self._parquet, list(schema.SHARDING_COLUMNS))
        _check_sharding(self.url, sharding)
        self._order = _release_order(sharding)
        self.num_rows = sharding.num_rows
        self.schema = self._parquet.schema_arrow

    def column(self, name: str) -> pa.Array:
        """One column, in release order."""
        values = _read_parquet(self.url, self._parquet, [name]).column(0).combine_chunks()
        return values if self._order is None else values.take(self._order)


def _check_sharding(url: str, table: pa.Table) -> None:
    missing = [c for c in schema.SHARDING_COLUMNS if c not in table.column_names]
    if missing:
        raise MetadataError(f"{url}: missing sharding columns {missing}")
    for col in schema.SHARDING_COLUMNS:
        if table.column(col).null_count:
            raise MetadataError(f"{url}: column {col!r} has missing values")


def _read_parquet(url: str, parquet: pq.ParquetFile, columns: Sequence[str] | None) -> pa.Table:
    missing = [c for c in columns or () if c not in parquet.schema_arrow.names]
    if missing:
        raise MetadataError(f"{url}: missing columns {missing}")
    try:
        return parquet.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MetadataError(f"{url}: cannot read parquet: {exc}") from None


def _release_order(table: pa.Table) -> pa.Array | None:
    """Indices that sort ``table`` into release order; None when it is in it already."""
    shard_index = table.column(schema.SHARD_INDEX_COLUMN).to_numpy()
    in_shard = table.column(schema.INDEX_IN_SHARD_COLUMN).to_numpy()
    if np.all(
        (shard_index[1:] > shard_index[:-1])
        | ((shard_index[1:] == shard_index[:-1]) & (in_shard[1:] >= in_shard[:-1]))
    ):
        return None
    return pc.sort_indices(
        table,
        sort_keys=[
            (schema.SHARD_INDEX_COLUMN, "ascending"),
            (schema.INDEX_IN_SHARD_COLUMN, "ascending"),
        ],
    )


def metadata_columns(
    src: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    parquet: pq.ParquetFile | None = None,
) -> list[str]:
    """The column names of ``metadata.parquet`` (its footer only)."""
    if parquet is None:
        parquet = open_metadata(src, storage_options)
    return list(parquet.schema_arrow.names)


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
    """Relative paths of the tar shards under ``src/data``, sorted.

    HTTP(S) servers cannot list: there the tars are those ``metadata.parquet``
    names (its ``shard_path`` column), and this returns an empty list.
    """
    if src.split("://", 1)[0] in NO_LISTING:
        return []
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
        (
            info[k]
            for k in ("mtime", "LastModified", "last_modified", "Last-Modified")
            if info.get(k)
        ),
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
    cache: str | None = None,
    client: Any = None,
) -> list[IndexedTar]:
    """Fingerprint and index each tar (member byte ranges per sample).

    A tar whose index is saved in the cube at ``cache`` (see :func:`save_indexes`)
    with the same size and modification time or ETag is not read again. The
    others are indexed in a thread pool here, or with ``client`` (a
    ``distributed.Client``) as one task per tar on the cluster's workers.
    A missing tar, or with ``on_error="skip"`` a damaged one, becomes a problem of
    its :class:`IndexedTar` instead of an exception.

    Parameters
    ----------
    src
        The release root.
    paths
        Tar paths relative to ``src``.
    on_error
        ``raise`` (the first problem raises) or ``skip`` (problems are collected).
    max_member_bytes
        Members larger than this are problems.
    storage_options
        fsspec options for ``src`` and ``cache``.
    threads
        Tars indexed at once in this process.
    cache
        A cube (path or URL) whose saved indexes may be reused.
    client
        Index on this cluster instead of in this process.

    Returns
    -------
    list of IndexedTar
        In the order of ``paths``.

    Examples
    --------
    >>> tars = index_tars("corpus", list_tar_shards("corpus"))  # doctest: +SKIP
    """
    so = dict(storage_options or {})
    saved = saved_indexes(cache, so) if cache else {}
    found: dict[str, IndexedTar] = {}

    def reuse(path: str) -> IndexedTar | None:
        if path not in saved:
            return None
        try:
            now = fingerprint(src, path, so)
        except FileNotFoundError:
            return None
        return load_index(cache, path, now, max_member_bytes, so)  # type: ignore[arg-type]

    if saved:
        with ThreadPoolExecutor(max(1, min(threads, len(saved)))) as pool:
            for path, tar in zip(paths, pool.map(reuse, paths), strict=True):
                if tar is not None:
                    found[path] = tar
    todo = [p for p in paths if p not in found]
    kwargs: dict[str, Any] = {
        "on_error": on_error,
        "max_member_bytes": max_member_bytes,
        "storage_options": so,
    }
    if client is not None and todo:
        from .runner import run_calls

        calls = [((src, path), kwargs) for path in todo]
        for tar in run_calls(index_tar_task, calls, client=client, desc="index"):
            found[tar.shard.path] = tar
    elif todo:
        with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
            for tar in pool.map(lambda p: index_tar_task(src, p, **kwargs), todo):
                found[tar.shard.path] = tar
    return [found[p] for p in paths]


def index_tar_task(
    src: str,
    path: str,
    *,
    on_error: str = "raise",
    max_member_bytes: int = source.DEFAULT_MAX_MEMBER_BYTES,
    storage_options: Mapping[str, Any] | None = None,
) -> IndexedTar:
    """Fingerprint and index one tar (a task of its own on a cluster)."""
    try:
        before = fingerprint(src, path, storage_options)
    except FileNotFoundError:
        problem = SourceError("tar shard not found", shard=path)
        return IndexedTar(TarShard(path, 0, 0), source.TarIndex.empty(), (problem,))
    problems: list[SourceError] = []
    index = source.index_tar(
        source.join(src, path),
        shard=path,
        storage_options=storage_options,
        max_member_bytes=max_member_bytes,
        problems=None if on_error == "raise" else problems,
        size=before.size,
    )
    shard = TarShard(path, before.size, len(index), before.mtime, before.etag)
    return IndexedTar(shard, index, tuple(problems))


# ---------------------------------------------------------------------------- saved indexes

_INDEX_FORMAT = "nasar-zarr-tar-index/1"


def saved_indexes(dest: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Tar paths whose index the cube at ``dest`` holds (one listing)."""
    from . import store

    fs, root = store.filesystem(dest, storage_options)
    prefix = f"{root}/{store.INDEX_DIR}/"
    try:
        found = store.fresh_find(fs, prefix)
    except OSError:
        return set()
    return {p[len(prefix) : -len(".arrow")] for p in found if p.endswith(".arrow")}


def save_index(
    dest: str,
    tar: TarShard,
    index: source.TarIndex,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Save one tar's index in the cube (an Arrow IPC file keyed by the tar's fingerprint)."""
    from . import store

    table = index.to_table().replace_schema_metadata(
        {
            "nasar_zarr": json.dumps(
                {
                    "format": _INDEX_FORMAT,
                    "tar": vars(tar),
                    "max_size": int(index.size.max(initial=0)),
                }
            ),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    fs, root = store.filesystem(dest, storage_options)
    path = f"{root}/{store.index_path(tar.path)}"
    if not source.is_remote(dest):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, sink.getvalue().to_pybytes())


def load_index(
    dest: str,
    path: str,
    now: TarShard,
    max_member_bytes: int,
    storage_options: Mapping[str, Any] | None = None,
) -> IndexedTar | None:
    """The saved index of tar ``path`` if it is still valid for the tar as it is ``now``."""
    from . import store

    fs, root = store.filesystem(dest, storage_options)
    try:
        data = store.read_bytes(fs, f"{root}/{store.index_path(path)}")
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        meta = json.loads((table.schema.metadata or {})[b"nasar_zarr"])
    except (FileNotFoundError, KeyError, ValueError, pa.ArrowInvalid):
        return None
    if meta.get("format") != _INDEX_FORMAT:
        return None
    then = TarShard(**meta["tar"])
    if then.differs_from(now) or (now.mtime or now.etag) is None:
        return None  # changed (or nothing to tell): index it again
    if meta["max_size"] > max_member_bytes:
        return None  # members now over the cap: their problems come from a new index
    index = source.TarIndex.from_table(table.replace_schema_metadata(None))
    return IndexedTar(TarShard(path, now.size, len(index), now.mtime, now.etag), index, ())


def save_indexes(
    dest: str,
    tars: Sequence[TarShard],
    indexes: Sequence[source.TarIndex],
    *,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
    storage_options: Mapping[str, Any] | None = None,
    have: set[str] | None = None,
) -> int:
    """Save the indexes the cube does not hold yet (tars in ``skip`` are left out);
    returns how many were written. ``have``: the tars whose index the cube holds,
    when the caller knows (else one listing)."""
    if have is None:
        have = saved_indexes(dest, storage_options)
    todo = [
        (t, i)
        for t, i in zip(tars, indexes, strict=True)
        if t.path not in have and t.path not in skip and t.size and (t.mtime or t.etag)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ti: save_index(dest, ti[0], ti[1], storage_options), todo))
    return len(todo)


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
