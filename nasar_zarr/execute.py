"""Execute a :class:`~nasar_zarr.plan.ConversionPlan`: lock, skeleton, tasks, report.

Composes the writing side's pieces in order: the store lock (:mod:`.lock`), the
skeleton and its checks (:mod:`.layout`), one shard task per Zarr shard on the
runner (:mod:`.task`, :mod:`.runner`), then the report and the consolidated
metadata. Rerunning the same plan after any interruption does only the missing
tasks.
"""

from __future__ import annotations

from typing import Any

import xarray as xr

from . import corpus, layout, schema, store
from .cube import open_cube
from .errors import MetadataError
from .lock import store_lock
from .plan import ConversionPlan
from .task import run_plan_tasks


def execute(
    plan: ConversionPlan,
    *,
    client: Any = None,
    workers: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> xr.Dataset:
    """Write the cube described by ``plan`` and return it opened lazily.

    Parameters
    ----------
    plan
        From :func:`nasar_zarr.plan_conversion` (or :meth:`ConversionPlan.from_json`).
    client
        A ``distributed.Client`` to run on. Without one, a LocalCluster of
        ``workers`` single-threaded processes (default: one per core) is started
        and closed.
    workers
        ``0`` runs every task in this process, one after the other.
    progress
        Show a progress bar (tasks) on stderr.
    overwrite
        Replace a store made with other options instead of refusing.

    Returns
    -------
    xarray.Dataset
        The cube, opened with :func:`nasar_zarr.open_cube`.

    Raises
    ------
    SourceChangedError
        A tar changed since the plan was made, or since the cube being resumed
        was made from it.
    StoreLockedError, StoreExistsError
        Another conversion holds the store, or it holds something else.

    Examples
    --------
    >>> plan = nasar_zarr.plan_conversion("corpus", "nasar.zarr")  # doctest: +SKIP
    >>> ds = nasar_zarr.execute(plan, workers=2)  # doctest: +SKIP
    """
    so = plan.storage_options
    with store.remote_errors(plan.dest, so):
        metadata = corpus.MetadataColumns(plan.source, so)
        if not plan.has_keys(metadata.column(schema.KEY_COLUMN)):
            raise MetadataError(
                f"{plan.source}: metadata.parquet changed since the plan was made; plan again"
            )
        # A saved plan may be older than the tars it points into.
        layout.check_source_unchanged(
            plan.tar_shards,
            corpus.current_tars(plan.source, plan.tar_shards, so),
            src=plan.source,
            since="the plan was made",
            hint="plan again: the plan's byte ranges may no longer hold",
        )
        with store_lock(plan.dest, so) as token:
            done = layout.prepare_store(plan, metadata, overwrite=overwrite)
            records = run_plan_tasks(
                plan, done=done, lock_token=token, client=client, workers=workers, progress=progress
            )
            layout.finalize(plan, records)
    return open_cube(plan.dest, storage_options=so)
