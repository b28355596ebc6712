"""The library's front door: plan, execute, append and verify, composed from the pieces.

Like rechunker's ``api.py``: each function here reads what it needs through
:mod:`.corpus` (the release) and :mod:`.layout` (the cube), builds a pure
:class:`~nasar_zarr.plan.ConversionPlan`, and hands it to the writing side
(:mod:`.execute`, :mod:`.append`) or the checker (:mod:`.verify`). The CLI calls
only these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import xarray as xr

from . import corpus, layout, schema, source, store
from .append import append_plan
from .columns import recognise
from .errors import NotACubeError
from .execute import execute
from .plan import Codec, ConversionPlan, ConvertOptions, OnError, assemble_plan
from .verify import VerifyReport, verify_store


def plan_conversion(
    src: str,
    dest: str,
    *,
    inner_chunk: int = ConvertOptions.inner_chunk,
    shard: int = ConvertOptions.shard,
    codec: Codec = ConvertOptions.codec,
    clevel: int = ConvertOptions.clevel,
    on_error: OnError = "raise",
    max_member_bytes: int = source.DEFAULT_MAX_MEMBER_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    index_threads: int = 8,
    columns: Mapping[str, str] | None = None,
    client: Any = None,
) -> ConversionPlan:
    """Plan the conversion of the corpus at ``src`` into a cube at ``dest``.

    Reads ``metadata.parquet``, ``webdataset_summary.json`` and the tar headers
    (with each tar's size and modification time or ETag); writes nothing.

    Parameters
    ----------
    src, dest
        Local paths or fsspec URLs (``s3://...``).
    inner_chunk, shard
        Samples per inner Zarr chunk and per Zarr shard (one task each).
    codec, clevel
        ``blosc-lz4`` (default) or ``blosc-zstd`` (both bitshuffle), ``zstd`` or
        ``none``; and the compression level.
    on_error
        ``raise`` stops at the first bad sample; ``skip`` rejects it (status 2).
    max_member_bytes
        Size cap of one tar or npz member, against decompression bombs.
    storage_options
        fsspec options for both ``src`` and ``dest`` (e.g. ``endpoint_url``).
    index_threads
        Tars indexed at once.
    columns
        Metadata columns for the roles ``lat``, ``lon``, ``footprint``, ``time``,
        ``secondary_time`` (and the others of :class:`nasar_zarr.columns.ColumnRoles`)
        where recognition by name would not find them; they get CF attributes.
    client
        A ``distributed.Client``: the tars are indexed there, one task per tar
        (tars whose index the cube at ``dest`` already holds are not read again).

    Returns
    -------
    ConversionPlan
        Printable, JSON-serialisable (:meth:`~ConversionPlan.to_json`); run it with
        :meth:`~ConversionPlan.execute`.

    Raises
    ------
    SourceError, MetadataError
        Bad input under ``on_error="raise"``, naming the shard file and sample key.
    ValueError
        Invalid options (checked before any I/O).

    Examples
    --------
    >>> plan = nasar_zarr.plan_conversion("corpus", "nasar.zarr", shard=512)  # doctest: +SKIP
    >>> print(plan)  # doctest: +SKIP
    >>> ds = plan.execute()  # doctest: +SKIP
    """
    options = ConvertOptions(
        inner_chunk=inner_chunk,
        shard=shard,
        codec=codec,
        clevel=clevel,
        on_error=on_error,
        max_member_bytes=max_member_bytes,
        columns=tuple(sorted((columns or {}).items())),
    )
    storage_options = store.storage_options(dest, store.storage_options(src, storage_options))
    with store.remote_errors(src, storage_options):
        return _plan(src, dest, options, storage_options, index_threads, client)


def _plan(
    src: str,
    dest: str,
    options: ConvertOptions,
    storage_options: dict[str, Any],
    index_threads: int,
    client: Any,
) -> ConversionPlan:
    # Only the sharding columns: the others are read when the skeleton is written.
    parquet = corpus.open_metadata(src, storage_options)  # one read for the whole plan
    table = corpus.read_metadata(src, storage_options, columns=(), parquet=parquet)
    recognise(corpus.metadata_columns(src, parquet=parquet), **dict(options.columns))
    summary = corpus.read_summary(src, storage_options)
    keys = table.column(schema.KEY_COLUMN)
    shard_of_row = table.column(schema.SHARD_PATH_COLUMN)
    tar_paths = sorted(
        set(corpus.list_tar_shards(src, storage_options)) | set(shard_of_row.unique().to_pylist())
    )
    indexed = corpus.index_tars(
        src,
        tar_paths,
        on_error=options.on_error,
        max_member_bytes=options.max_member_bytes,
        storage_options=storage_options,
        threads=index_threads,
        cache=dest,
        client=client,
    )
    plan = assemble_plan(
        src,
        dest,
        options,
        keys,
        shard_of_row,
        indexed,
        summary=summary,
        storage_options=storage_options,
    )
    del table, keys, shard_of_row, indexed, parquet
    # Indexing and joining leave Arrow's allocator holding freed pages (~480 MB at
    # 1.1 M samples, measured); hand them back before the conversion runs.
    pa.default_memory_pool().release_unused()
    return plan


def append(
    src: str,
    dest: str,
    *,
    client: Any = None,
    workers: int | None = None,
    progress: bool = False,
    on_error: OnError = "raise",
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Add the samples of new tar shards of ``src`` at the end of the cube at ``dest``.

    Parameters
    ----------
    src
        The grown release: its metadata lists the cube's samples first, in the
        same release order, then the new ones.
    dest
        The cube.
    client, workers, progress
        As for :meth:`ConversionPlan.execute`.
    on_error
        ``raise`` or ``skip`` for bad samples in the new shards.
    storage_options
        fsspec options for both.

    Returns
    -------
    xarray.Dataset
        The grown cube, opened lazily.

    Notes
    -----
    Existing Zarr shards are not touched, except a partial last shard, which its
    single task rewrites whole (from the same source bytes: the tars the cube was
    made from must be unchanged). Interrupted appends resume when run again.

    Examples
    --------
    >>> ds = nasar_zarr.append("release-v2", "nasar.zarr")  # doctest: +SKIP
    """
    so = store.storage_options(dest, store.storage_options(src, storage_options))
    with store.remote_errors(dest, so):
        recorded = layout.require_cube(dest, so)
        if layout.read_recorded(dest, so) is None:
            raise NotACubeError(
                f"{dest}: the cube's conversion never finished its skeleton; run"
                " `nasar-zarr convert` again first"
            )
    plan = plan_conversion(
        src, dest, on_error=on_error, storage_options=so, client=client, **recorded["layout"]
    )
    with store.remote_errors(dest, so):
        return append_plan(plan, recorded, client=client, workers=workers, progress=progress)


def verify(
    dest: str,
    *,
    src: str | None = None,
    client: Any = None,
    workers: int | None = None,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check the cube at ``dest``: its recorded checksums, and its source when given.

    Parameters
    ----------
    dest
        The cube.
    src
        The release it was made from: every sample, status, ``rtc_present`` and
        metadata coordinate is then compared bit for bit.
    client, workers, progress
        As for :meth:`ConversionPlan.execute` (one task per Zarr shard).
    storage_options
        fsspec options for both.

    Returns
    -------
    VerifyReport
        ``report.ok`` is True when nothing differs; ``print(report)`` lists the
        mismatches (the CLI exits 1 then).

    Examples
    --------
    >>> print(nasar_zarr.verify("nasar.zarr", src="corpus"))  # doctest: +SKIP
    nasar.zarr: 3 shards, 1,200 samples checked: OK
    """
    so = store.storage_options(dest, dict(storage_options or {}))
    if src is not None:
        so = store.storage_options(src, so)
    with store.remote_errors(dest, so):
        recorded = layout.require_cube(dest, so)
    plan = None
    if src is not None:
        plan = plan_conversion(
            src, dest, on_error="skip", storage_options=so, client=client, **recorded["layout"]
        )
    return verify_store(
        dest,
        recorded,
        plan=plan,
        client=client,
        workers=workers,
        progress=progress,
        storage_options=so,
    )


__all__ = ["append", "execute", "plan_conversion", "verify"]
