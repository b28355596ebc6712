"""Grow a cube with the samples of new tar shards, at the end of ``sample``.

The grown release's plan (made with the cube's own layout) must list the cube's
samples first, in the same order and with the same metadata, from unchanged
tars. Full Zarr shards are never touched; a partial last shard is rewritten
whole by its single task. An intent object makes an interrupted append resume.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import xarray as xr

from . import coordinates, corpus, layout, schema, store
from . import metadata as meta
from .cube import metadata_differences, open_cube
from .errors import MetadataError, StoreExistsError
from .faults import fault_point
from .lock import store_lock
from .plan import ConversionPlan
from .task import run_plan_tasks


def append_plan(
    plan: ConversionPlan,
    recorded: dict[str, Any],
    *,
    client: Any = None,
    workers: int | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """Add ``plan``'s new samples to the cube at ``plan.dest`` (recorded: its provenance)."""
    src, dest, so = plan.source, plan.dest, plan.storage_options
    n_old, n_new = int(recorded["n_samples"]), plan.n_samples
    intent = store.read_json(dest, store.APPEND_FILE, so)
    resuming = intent is not None and intent.get("to") == n_new
    metadata = corpus.MetadataColumns(src, so)  # one column at a time
    if not resuming:
        layout.check_source_unchanged(
            layout.recorded_tars(recorded),
            plan.tar_shards,
            src=src,
            since=f"the cube at {dest} was made from it",
            hint="append needs the cube's tars unchanged; restore the tar",
            same_location=src == recorded.get("source"),
        )
        if n_new != n_old:
            _check_prefix(plan, metadata, recorded, n_old)
    with store_lock(dest, so) as token:
        if n_new != n_old or resuming:
            start = intent["from"] if resuming else n_old
            store.write_json(
                dest, store.APPEND_FILE, {"from": start, "to": n_new, "source": src}, so
            )
            _extend_store(plan, metadata, n_old=start)
        done = layout.prepare_store(plan, metadata, overwrite=False)
        records = run_plan_tasks(
            plan,
            done=done,
            lock_token=token,
            client=client,
            workers=workers,
            progress=progress,
            desc="append",
        )
        layout.finalize(plan, records)
        store.remove(dest, store.APPEND_FILE, so)
    return open_cube(dest, storage_options=so)


def _check_prefix(
    plan: ConversionPlan, metadata: corpus.MetadataColumns, recorded: dict, n_old: int
) -> None:
    """The cube's samples must be the first ``n_old`` of the grown release, unchanged.

    Compared one metadata column at a time, so a million-sample cube is checked
    without holding its whole table twice.
    """
    src, dest, so = plan.source, plan.dest, plan.storage_options
    group = store.open_group(dest, so, use_consolidated=False)
    old_keys = store.read(group, schema.SAMPLE_DIM)
    if plan.n_samples < n_old or not plan.sample_keys.slice(0, n_old).equals(
        pa.array(old_keys, pa.string())
    ):
        raise StoreExistsError(
            f"{dest}: the cube's {n_old:,} samples are not the first samples of {src} in"
            " release order; append only adds shards after the cube's last one"
        )
    recorded_schema = meta.schema_from_text(recorded["metadata_schema"])
    if recorded_schema.remove_metadata() != metadata.schema.remove_metadata():
        raise MetadataError(
            f"{src}: metadata.parquet columns or types differ from the"
            " cube's; append needs the same table layout"
        )
    differs = metadata_differences(open_cube(dest, storage_options=so), metadata, rows=n_old)
    if differs:
        raise StoreExistsError(
            f"{dest}: the metadata of the cube's {n_old:,} samples differs from the first"
            f" {n_old:,} rows of {src} (column {differs[0][0]!r}); append only adds shards"
            " after the cube's last one"
        )


def _extend_store(plan: ConversionPlan, metadata: corpus.MetadataColumns, *, n_old: int) -> None:
    """Resize every ``sample`` array, rewrite the 1-D coordinates, update provenance."""
    dest, so, n = plan.dest, plan.storage_options, plan.n_samples
    group = store.open_group(dest, so, mode="r+", use_consolidated=False)
    for name in [*schema.VARIABLES, schema.RTC_PRESENT, schema.STATUS]:
        array = store.array(group, name)
        array.resize((n, *array.shape[1:]))
    fault_point("after-resize")
    ds, _ = layout.skeleton(plan, metadata.schema)
    # Rewritten whole: each 1-D coordinate is one chunk.
    coordinates.write_all(plan, metadata)
    # The partial last shard gets new samples: its single task rewrites it whole.
    shard = plan.options.shard
    if n_old % shard:
        store.remove(dest, store.task_record_path(n_old // shard), so)
    attrs = dict(group.attrs)
    new = store.read_provenance(ds.attrs)
    attrs[store.PROVENANCE_ATTR] = json.dumps(
        {
            **store.read_provenance(attrs),
            "n_samples": n,
            "source": plan.source,
            "tar_shards": new["tar_shards"],
            "webdataset_summary": new["webdataset_summary"],
        }
    )
    history = f"{attrs.get('history', '')}\n{ds.attrs['history']}"
    attrs["history"] = f"{history} (append {n_old:,} -> {n:,} samples)".strip()
    group.attrs.put(attrs)
    # The tasks take the arrays' documents from the consolidated metadata: new shapes.
    store.consolidate(dest, so)
