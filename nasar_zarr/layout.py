"""The store's layout and provenance: the skeleton every task writes into.

:func:`prepare_store` writes the skeleton once (all arrays, coordinates and
attributes, no data chunks) and, on a rerun, checks that the cube it finds was
made with the same options from the same, unchanged source; :func:`finalize`
writes the rejection report and consolidates the metadata at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import pyarrow as pa
import xarray as xr

from . import columns, coordinates, schema, sharding, source, store
from . import metadata as meta
from ._version import __version__
from .errors import SourceChangedError, StoreError, StoreExistsError
from .faults import fault_point
from .plan import ConversionPlan, ConvertOptions, TarShard

# ---------------------------------------------------------------------------- skeleton

# The cube contract (docs/CUBE.md) this converter writes: 2 adds a crc32c codec after the
# compressor of every stored chunk. Cubes of contract 1 (no "contract" recorded) still read.
CONTRACT = 2


def compressors(options: ConvertOptions) -> list:
    """Zarr v3 core codecs only, so tensorstore and other readers open every array; the
    last is ``crc32c`` (see :mod:`nasar_zarr.sharding`)."""
    return sharding.compressors(options.codec, options.clevel)


def skeleton(plan: ConversionPlan, metadata_schema: pa.Schema) -> tuple[xr.Dataset, dict]:
    """The cube as a lazy Dataset (data never computed) plus its Zarr encoding.

    The 1-D coordinates along ``sample`` are not in it (:mod:`nasar_zarr.coordinates`
    writes them one at a time), but every data variable's ``coordinates``
    encoding already names the metadata ones.
    """
    n, o = plan.n_samples, plan.options
    # The configured shard even when the cube is smaller: tasks build shard objects
    # of exactly this size, and append can grow the cube into it.
    shard, inner = o.shard, o.inner_chunk
    coords = {d: (d, v, schema.LABEL_ATTRS[d]) for d, v in schema.LABELS.items()}
    flags_enc = {"compressors": sharding.unsharded_compressors()}
    encoding: dict[str, dict] = {d: dict(flags_enc) for d in coords}
    names = " ".join(coordinates.coordinate_names(metadata_schema.names))
    ds = xr.Dataset(coords=coords)
    data_enc = {"chunks": None, "shards": None, "compressors": compressors(o)}
    for spec in schema.DATA_VARIABLES:
        shape = (n, *spec.sample_shape)
        ds[spec.name] = (
            spec.dims,
            da.empty(shape, chunks=(shard, *spec.sample_shape), dtype=spec.dtype),
            spec.attrs,
        )
        encoding[spec.name] = {
            **data_enc,
            "chunks": (inner, *spec.sample_shape),
            "shards": (shard, *spec.sample_shape),
            "_FillValue": np.nan,
        }
    present_shape = (n, *(schema.DIM_SIZES[d] for d in schema.RTC_PRESENT_DIMS[1:]))
    ds[schema.RTC_PRESENT] = (
        schema.RTC_PRESENT_DIMS,
        da.zeros(present_shape, chunks=(shard, 2, 2, 2), dtype=bool),
        schema.RTC_PRESENT_ATTRS,
    )
    # The flags are sharded like the data variables (same inner chunk and shard, zstd +
    # crc32c inside), so plain xr.open_zarr gives every variable the same chunks.
    encoding[schema.RTC_PRESENT] = {
        "chunks": (inner, 2, 2, 2),
        "shards": (shard, 2, 2, 2),
        "_FillValue": None,
        **flags_enc,
    }
    ds[schema.STATUS] = (
        (schema.SAMPLE_DIM,),
        da.zeros((n,), chunks=shard, dtype="uint8"),
        schema.STATUS_ATTRS,
    )
    encoding[schema.STATUS] = {
        "chunks": (inner,),
        "shards": (shard,),
        "_FillValue": None,
        **flags_enc,
    }
    for var in ds.data_vars.values():
        var.encoding["coordinates"] = names  # written one by one after the skeleton
    roles = columns.recognise(metadata_schema.names, **dict(o.columns))
    ds.attrs = {
        **provenance(plan, metadata_schema),
        columns.ROLES_ATTR: columns.roles_attr(roles),
    }
    return ds, encoding


def provenance(plan: ConversionPlan, metadata_schema: pa.Schema) -> dict[str, Any]:
    """Root attributes: CF globals plus the converter's record, as a JSON string."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    codec = plan.options.codec
    record = {
        "version": __version__,
        "contract": CONTRACT,
        "created": now,
        "layout": plan.options.layout(),
        "codec_detail": f"{codec} (bitshuffle)" if codec.startswith("blosc") else codec,
        "source": plan.source,
        "webdataset_summary": dict(plan.summary),
        "tar_shards": [_tar_record(t) for t in plan.tar_shards],
        "n_samples": plan.n_samples,
        "metadata_schema": meta.schema_to_text(metadata_schema),
    }
    return {
        "title": "NA-SAR: North America SAR pretraining corpus (Zarr cube)",
        "source": f"NA-SAR WebDataset release at {plan.source}",
        "Conventions": "CF-1.11",
        "history": f"{now}: converted by nasar-zarr {__version__}",
        store.PROVENANCE_ATTR: json.dumps(record),
    }


def _tar_record(tar: TarShard) -> dict[str, Any]:
    return {k: v for k, v in vars(tar).items() if v is not None}


def recorded_tars(recorded: Mapping[str, Any]) -> list[TarShard]:
    """The source tars a cube's provenance lists (older cubes record no mtime/ETag)."""
    return [TarShard(**t) for t in recorded.get("tar_shards", [])]


# ---------------------------------------------------------------------------- checks


def read_recorded(dest: str, storage_options: Mapping[str, Any] | None = None) -> dict | None:
    """The provenance of the complete cube at ``dest``, or None if there is none."""
    if store.read_json(dest, store.SKELETON_FILE, storage_options) is None:
        return None
    attrs = _root_attrs(dest, storage_options)
    return None if attrs is None else store.read_provenance(attrs)


def require_cube(dest: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The provenance of the cube at ``dest``; a clear error if there is no cube there."""
    attrs = _root_attrs(dest, storage_options)
    recorded = None if attrs is None else store.read_provenance(attrs)
    if not recorded:
        raise store.not_a_cube(dest, storage_options)
    return recorded


def check_destination(plan: ConversionPlan, *, overwrite: bool) -> set[int] | None:
    """Check ``plan.dest`` before anything is written (and before the plan is printed).

    Returns the finished tasks of a cube this plan resumes, or None when the
    store is to be written from scratch.

    Raises
    ------
    StoreExistsError
        The destination holds something else: another cube (without
        ``overwrite``), or content that is not a cube (always).
    SourceChangedError
        A tar the existing cube was made from has changed since.
    PermissionError
        A local destination that cannot be written.
    """
    dest, so = plan.dest, plan.storage_options
    if not source.is_remote(dest):
        _check_writable(dest)
    recorded = read_recorded(dest, so)
    if recorded is not None and not overwrite:
        if _planned(plan) != {k: recorded.get(k) for k in _planned(plan)}:
            raise StoreExistsError(
                f"{dest} already holds a cube made with different options"
                f" ({_describe(recorded)}; now {_describe(_planned(plan))});"
                " pass --overwrite to replace it, or convert into a new destination"
            )
        check_source_unchanged(
            recorded_tars(recorded),
            plan.tar_shards,
            src=plan.source,
            since=f"the cube at {dest} was made from it",
        )
        return store.finished_tasks(dest, so)
    if recorded is None and _has_content(dest, so) and not _is_our_leftover(dest, so):
        raise StoreExistsError(
            f"{dest} exists and is not a nasar-zarr cube; refusing to write into it"
            " (choose an empty or new destination)"
        )
    return None


def check_source_unchanged(
    recorded: Sequence[TarShard],
    current: Sequence[TarShard],
    *,
    src: str,
    since: str,
    hint: str = "restore the tar, or convert into a new destination (or --overwrite)",
    same_location: bool = True,
) -> None:
    """Refuse when a tar that holds samples differs from what was recorded ``since``.

    ``since`` completes the message, e.g. "the cube at DEST was made from it".
    A release read from another location (a copy, a mirror) has other
    modification times and ETags for the same bytes: there only sizes are compared.
    """
    seen = {t.path: t for t in current}
    for old in recorded:
        new = seen.get(old.path)
        if new is None:
            difference = "no longer exists" if old.samples else None
        elif same_location:
            difference = old.differs_from(new)
        else:
            difference = TarShard(old.path, old.size, 0).differs_from(new)
        if difference:
            raise SourceChangedError(
                f"{source.join(src, old.path)}: changed since {since} ({difference}); {hint}"
            )


def _check_writable(dest: str) -> None:
    path = dest.split("://", 1)[1] if dest.startswith("file://") else dest
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise StoreExistsError(f"{dest}: {probe} is a file, not a directory")
    try:  # os.access says yes to root even on read-only filesystems: try it for real
        os.rmdir(tempfile.mkdtemp(prefix=".nasar-zarr-probe-", dir=probe))
    except OSError as exc:
        raise PermissionError(f"{dest}: cannot write in {probe} ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------- writing


def prepare_store(
    plan: ConversionPlan, metadata: coordinates.MetadataSource, *, overwrite: bool
) -> set[int]:
    """Create the store, or check that the existing one matches; returns finished tasks.

    ``metadata`` is read one column at a time. The caller holds the store lock.
    """
    dest, so = plan.dest, plan.storage_options
    done = check_destination(plan, overwrite=overwrite)
    if done is not None:
        save_indexes(plan)  # tars that are new since (append), or a cube made before 0.3
        return done
    # A skeleton without its marker was interrupted while being written: redo it.
    _clear(dest, so)
    ds, encoding = skeleton(plan, metadata.schema)
    fault_point("skeleton")
    objects = build_skeleton(plan, metadata, ds, encoding)
    upload(dest, objects, so)
    created = store.read_provenance(ds.attrs)["created"]
    store.write_json(dest, store.SKELETON_FILE, {"created": created}, so)
    save_indexes(plan, fresh=True)
    return set()


def build_skeleton(
    plan: ConversionPlan,
    metadata: coordinates.MetadataSource,
    ds: xr.Dataset,
    encoding: Mapping[str, Any],
) -> dict[str, bytes]:
    """Every object of the skeleton (``zarr.json`` documents, coordinate chunks), built
    in memory with consolidated metadata: relative path -> bytes.

    Zarr and xarray check, read back and rewrite metadata as they build a
    hierarchy (measured on S3: 894 requests on ``zarr.json`` for 72 written);
    in memory that costs nothing, and the store then gets each object once.
    """
    import dataclasses
    import uuid

    staging = f"memory://nasar-zarr-skeleton-{uuid.uuid4().hex}"
    fs, root = store.filesystem(staging)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.to_zarr(
                store.zarr_store(staging),
                mode="w-",
                compute=False,
                zarr_format=3,
                encoding=encoding,
                consolidated=False,
            )
        coordinates.write_all(dataclasses.replace(plan, dest=staging, storage_options={}), metadata)
        # Writing a lone coordinate leaves a root "coordinates" attribute: put back ours.
        store.open_group(staging, mode="r+", use_consolidated=False).attrs.put(ds.attrs)
        store.consolidate(staging)
        objects = {}
        for path in fs.find(root):  # moved out one by one: never two copies of it all
            objects[path[len(root) + 1 :]] = fs.cat_file(path)
            fs.rm_file(path)
        return objects
    finally:
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass  # moved out whole


def upload(dest: str, objects: Mapping[str, bytes], so: Mapping[str, Any] | None) -> None:
    """Write ``objects`` (relative path -> bytes) into the store, one PUT each, the root
    ``zarr.json`` first (with its provenance, a half-written skeleton is then
    recognised as ours and cleared on the next run)."""
    fs, root = store.filesystem(dest, so)
    paths = {f"{root}/{k}": v for k, v in objects.items()}
    first = {f"{root}/zarr.json": paths.pop(f"{root}/zarr.json")}
    if not source.is_remote(dest):
        for folder in {p.rsplit("/", 1)[0] for p in [*first, *paths]}:
            fs.makedirs(folder, exist_ok=True)
    fs.pipe(first)
    fs.pipe(paths)


def save_indexes(plan: ConversionPlan, *, fresh: bool = False) -> int:
    """Keep the plan's tar indexes in the cube, so that a resume, ``append`` or
    ``verify SRC DEST`` reads only the headers of tars that are new or changed.

    Tars with samples rejected at planning are left out (they are indexed again).
    ``fresh``: the store was just cleared, so it holds none (no listing needed).
    """
    from . import corpus

    return corpus.save_indexes(
        plan.dest,
        plan.tar_shards,
        plan.index.tars,
        skip={r.shard for r in plan.rejected},
        storage_options=plan.storage_options,
        have=set() if fresh else None,
    )


REPORT_EXAMPLES = 1000  # rejections.json lists this many of each kind; the Parquet report all
REPORT_ROW_GROUP = 65_536
REJECTION_SCHEMA = pa.schema(
    [("shard", pa.string()), ("key", pa.string()), ("reason", pa.string()), ("row", pa.int64())]
)


def finalize(plan: ConversionPlan, records: Sequence[Mapping[str, Any]] = ()) -> None:
    """Write the rejection report (plan + tasks) and make sure the metadata is consolidated.

    ``_nasar/rejections.parquet`` holds every rejected sample (shard, key,
    reason, row); ``_nasar/rejections.json`` the counts, the counts by reason
    and the first :data:`REPORT_EXAMPLES` rejected and non-finite samples (all of
    them in a small run). ``records`` are those the tasks of this run returned;
    every other task's record (finished by an earlier run, or too long to
    return) is read by name, one at a time, so a million rejections never sit in
    memory as Python objects, and no listing is trusted.

    Raises
    ------
    StoreError
        A task of the plan has no record (it did not finish).
    """
    import pyarrow.parquet as pq

    so = plan.storage_options
    sink = pa.BufferOutputStream()  # compressed: ~10 MB for a million rejections
    writer = pq.ParquetWriter(sink, REJECTION_SCHEMA, compression="zstd")
    batch: list[pa.Table] = []  # written in row groups of REPORT_ROW_GROUP rows
    examples: list[dict] = []
    nonfinite: list[dict] = []
    by_reason: Counter[str] = Counter()
    n_rejected = n_nonfinite = 0

    def add(rows: list[dict]) -> None:
        nonlocal n_rejected
        if rows:
            columns = {name: [r[name] for r in rows] for name in REJECTION_SCHEMA.names}
            batch.append(pa.table(columns, schema=REJECTION_SCHEMA))
            by_reason.update(reason_kind(r["reason"]) for r in rows)
            examples.extend(rows[: max(0, REPORT_EXAMPLES - len(examples))])
            n_rejected += len(rows)
        if batch and (not rows or sum(t.num_rows for t in batch) >= REPORT_ROW_GROUP):
            writer.write_table(pa.concat_tables(batch))
            batch.clear()

    add([{"shard": r.shard, "key": r.key, "reason": r.reason, "row": r.row} for r in plan.rejected])
    returned = {int(r["index"]): r for r in records if "rejections" in r}
    for index in range(len(plan.tasks)):
        record = returned.pop(index, None) or _task_record(plan.dest, index, so)
        add(record["rejections"])
        n_nonfinite += len(record["nonfinite"])
        nonfinite.extend(record["nonfinite"][: max(0, REPORT_EXAMPLES - len(nonfinite))])
    add([])  # the last row group
    writer.close()
    if n_rejected:
        fs, root = store.filesystem(plan.dest, so)
        fs.pipe_file(f"{root}/{store.REJECTIONS_PARQUET}", sink.getvalue().to_pybytes())
    else:
        store.remove(plan.dest, store.REJECTIONS_PARQUET, so)
    store.write_json(
        plan.dest,
        store.REJECTIONS_FILE,
        {
            "rejected": examples,
            "nonfinite": nonfinite,
            "counts": {"rejected": n_rejected, "nonfinite": n_nonfinite},
            "by_reason": dict(by_reason.most_common()),
            "complete": n_rejected <= REPORT_EXAMPLES and n_nonfinite <= REPORT_EXAMPLES,
            "all_rejected": store.REJECTIONS_PARQUET if n_rejected else None,
        },
        so,
    )
    fault_point("before-consolidate")
    # The skeleton is written consolidated and tasks change no metadata: only a
    # skeleton written by an older version, or an append, needs it done here.
    root = store.read_json(plan.dest, "zarr.json", so) or {}
    if not root.get("consolidated_metadata"):
        store.consolidate(plan.dest, so)


def _task_record(dest: str, index: int, so: Mapping[str, Any] | None) -> dict:
    record = store.read_json(dest, store.task_record_path(index), so)
    if record is None:
        raise StoreError(
            f"{dest}: task {index} has no record ({store.task_record_path(index)}): it did"
            " not finish; run the same command again to resume"
        )
    return record


def reason_kind(reason: str) -> str:
    """A rejection reason with its names and numbers left out, for counting by kind.

    Examples
    --------
    >>> reason_kind("truncated tar: member 'k.npz' has 1,024 of 2,048 bytes")
    "truncated tar: member '…' has N of N bytes"
    """
    return _NUMBER.sub("N", _QUOTED.sub("'…'", reason))


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d[\d,.]*")


# ---------------------------------------------------------------------------- helpers


def _clear(dest: str, so: Mapping[str, Any] | None) -> None:
    """Remove everything in the store but the lock (which this run holds)."""
    fs, root = store.filesystem(dest, so)
    lock = f"{root}/{store.LOCK_FILE}"
    found = [p for p in store.fresh_find(fs, root) if p != lock]
    if found:
        fs.rm(found)
        fs.invalidate_cache(root)


def _is_our_leftover(dest: str, so: Mapping[str, Any] | None) -> bool:
    """An interrupted skeleton or bookkeeping only: safe to clear."""
    attrs = _root_attrs(dest, so)
    if attrs is not None and store.PROVENANCE_ATTR in attrs:
        return True
    fs, root = store.filesystem(dest, so)
    found = store.fresh_find(fs, root)
    return all(p[len(root) + 1 :].startswith(store.INTERNAL_PREFIX) for p in found)


def _planned(plan: ConversionPlan) -> dict[str, Any]:
    return {"layout": plan.options.layout(), "n_samples": plan.n_samples, "source": plan.source}


def _describe(recorded: Mapping[str, Any]) -> str:
    layout = recorded.get("layout", {})
    parts = [f"{k}={v}" for k, v in layout.items()]
    parts.append(f"samples={recorded.get('n_samples')}")
    parts.append(f"source={recorded.get('source')}")
    return ", ".join(parts)


def _root_attrs(dest: str, so: Mapping[str, Any] | None) -> dict | None:
    doc = store.read_json(dest, "zarr.json", so)
    return None if doc is None else doc.get("attributes", {})


def _has_content(dest: str, so: Mapping[str, Any] | None) -> bool:
    fs, root = store.filesystem(dest, so)
    fs.invalidate_cache(root)
    try:
        return bool(fs.ls(root, detail=False))
    except FileNotFoundError:
        return False
