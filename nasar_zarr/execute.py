"""Run a :class:`~nasar_zarr.plan.ConversionPlan`: the only module that writes the store.

Order of writes, which is what makes a killed run safe to rerun:

1. the store skeleton (all arrays, coordinates, attributes; no data chunks), once;
2. per task, in one piece each: the Zarr shard of every data variable, then
   ``rtc_present``, then ``status``, then the task record
   ``_nasar/tasks/NNNNNN.json`` (counts, rejections, checksums of the objects);
3. at the end, ``_nasar/rejections.json`` and the consolidated metadata.

A task without a record is rewritten whole on the next run, so no half-written
Zarr shard survives; a task with a record is never touched again.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dask.array as da
import numpy as np
import pyarrow as pa
import xarray as xr

from . import __version__, schema, sharding, source, store
from . import metadata as meta
from .cube import ATTRS_KEY
from .errors import MetadataError, SourceError, StoreExistsError, StoreLockedError
from .plan import ConversionPlan, ConvertOptions, ShardTask, read_metadata

TASKS_DIR = f"{store.INTERNAL_PREFIX}/tasks"
LOCK_FILE = f"{store.INTERNAL_PREFIX}/lock.json"
SKELETON_FILE = f"{store.INTERNAL_PREFIX}/skeleton.json"
REJECTIONS_FILE = f"{store.INTERNAL_PREFIX}/rejections.json"
FAULT_ENV = "NASAR_ZARR_FAULT"  # testing hook: "point" or "point:N" -> SIGKILL there


def _fault_point(name: str) -> None:
    """Kill this process with SIGKILL at a named point (crash tests set NASAR_ZARR_FAULT).

    ``NASAR_ZARR_FAULT=after-record:2`` dies the 2nd time ``after-record`` is reached.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_HITS: dict[str, int] = {}


# ---------------------------------------------------------------------------- layout


def compressors(options: ConvertOptions) -> list:
    """Zarr v3 core codecs only, so tensorstore and other readers open every array."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if options.codec == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=options.clevel, shuffle="bitshuffle")]
    if options.codec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=options.clevel, shuffle="bitshuffle")]
    if options.codec == "zstd":
        return [ZstdCodec(level=options.clevel)]
    return []


def skeleton(plan: ConversionPlan, table: pa.Table) -> tuple[xr.Dataset, dict]:
    """The cube as a lazy Dataset (data never computed) plus its Zarr encoding."""
    n, o = plan.n_samples, plan.options
    # The configured shard even when the cube is smaller: tasks build shard objects
    # of exactly this size, and append can grow the cube into it.
    shard, inner = o.shard, o.inner_chunk
    coords: dict[str, Any] = {
        schema.SAMPLE_DIM: (schema.SAMPLE_DIM, np.array(plan.sample_keys, dtype=object),
                            {"long_name": "WebDataset sample key"}),
    }
    coords.update({d: (d, v, schema.LABEL_ATTRS[d]) for d, v in schema.LABELS.items()})
    encoding: dict[str, dict] = {schema.SAMPLE_DIM: {"chunks": (max(n, 1),)}}
    for name, (values, attrs) in meta.encode_table(table).items():
        coord = name if name != schema.KEY_COLUMN else schema.KEY_COLUMN
        if coord in coords:
            coord = f"metadata_{name}"
        if coord in schema.VARIABLES or coord in (schema.STATUS, schema.RTC_PRESENT):
            coord = f"metadata_{name}"
        coords[coord] = (schema.SAMPLE_DIM, values, {**attrs, "nasar_column": name})
        enc: dict[str, Any] = {"chunks": (max(n, 1),)}
        if attrs[meta.ENCODING_ATTR] == "timestamp":
            unit = {"s": "seconds", "ms": "milliseconds", "us": "microseconds",
                    "ns": "nanoseconds"}[np.datetime_data(values.dtype)[0]]
            enc.update(units=f"{unit} since 1970-01-01", dtype="int64")
        elif values.dtype.kind == "f":
            enc["_FillValue"] = np.nan
        coords[coord][2]["nasar_column"] = name
        encoding[coord] = enc
    ds = xr.Dataset(coords=coords)
    data_enc = {"chunks": None, "shards": None, "compressors": compressors(o)}
    for spec in schema.DATA_VARIABLES:
        shape = (n, *spec.sample_shape)
        ds[spec.name] = (spec.dims, da.empty(shape, chunks=(shard, *spec.sample_shape),
                                             dtype=spec.dtype), spec.attrs)
        encoding[spec.name] = {
            **data_enc,
            "chunks": (inner, *spec.sample_shape),
            "shards": (shard, *spec.sample_shape),
            "_FillValue": np.nan,
        }
    present_shape = (n, *(schema.DIM_SIZES[d] for d in schema.RTC_PRESENT_DIMS[1:]))
    ds[schema.RTC_PRESENT] = (schema.RTC_PRESENT_DIMS,
                              da.zeros(present_shape, chunks=(shard, 2, 2, 2), dtype=bool),
                              schema.RTC_PRESENT_ATTRS)
    encoding[schema.RTC_PRESENT] = {"chunks": (shard, 2, 2, 2), "_FillValue": None}
    ds[schema.STATUS] = ((schema.SAMPLE_DIM,), da.zeros((n,), chunks=shard, dtype="uint8"),
                         schema.STATUS_ATTRS)
    encoding[schema.STATUS] = {"chunks": (shard,), "_FillValue": None}
    ds.attrs = provenance(plan, table)
    return ds, encoding


def provenance(plan: ConversionPlan, table: pa.Table) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "title": "NA-SAR: North America SAR pretraining corpus (Zarr cube)",
        "source": f"NA-SAR WebDataset release at {plan.source}",
        "Conventions": "CF-1.11",
        "history": f"{now}: converted by nasar-zarr {__version__}",
        ATTRS_KEY: {
            "version": __version__,
            "created": now,
            "layout": plan.options.layout(),
            "codec_detail": f"{plan.options.codec} (bitshuffle)"
            if plan.options.codec.startswith("blosc") else plan.options.codec,
            "source": plan.source,
            "webdataset_summary": dict(plan.summary),
            "tar_shards": [{"path": t.path, "size": t.size, "samples": t.samples}
                           for t in plan.tar_shards],
            "n_samples": plan.n_samples,
            "metadata_schema": meta.schema_to_text(table.schema),
        },
    }


# ---------------------------------------------------------------------------- lock


@contextmanager
def store_lock(dest: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Refuse a second converter on the same store; recover a lock left by a killed run."""
    token = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
             "since": dt.datetime.now(dt.UTC).isoformat()}
    held = store.read_json(dest, LOCK_FILE, storage_options)
    if held and not _stale(held):
        raise StoreLockedError(
            f"{dest}: another conversion (pid {held.get('pid')} on {held.get('host')}, since"
            f" {held.get('since')}) holds the lock; wait for it, or delete"
            f" {LOCK_FILE} in the store if that process is gone"
        )
    store.write_json(dest, LOCK_FILE, token, storage_options)
    try:
        yield
    finally:
        current = store.read_json(dest, LOCK_FILE, storage_options)
        if current and current.get("token") == token["token"]:
            fs, root = store.filesystem(dest, storage_options)
            fs.rm_file(f"{root}/{LOCK_FILE}")


def _stale(held: Mapping[str, Any]) -> bool:
    if held.get("host") != socket.gethostname():
        return False  # cannot see other machines' processes: trust the lock
    pid = int(held.get("pid", -1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ---------------------------------------------------------------------------- store


def prepare_store(plan: ConversionPlan, table: pa.Table, *, overwrite: bool) -> set[int]:
    """Create the store, or check that the existing one matches; returns finished tasks."""
    dest, so = plan.dest, plan.storage_options
    # A skeleton without its marker was interrupted while being written: redo it.
    complete = store.read_json(dest, SKELETON_FILE, so) is not None
    existing = _existing_attrs(dest, so) if complete else None
    if existing is not None and not overwrite:
        recorded = existing.get(ATTRS_KEY, {})
        if recorded.get("layout") != plan.options.layout() or \
                recorded.get("n_samples") != plan.n_samples or \
                recorded.get("source") != plan.source:
            raise StoreExistsError(
                f"{dest} already holds a cube made with different options"
                f" ({_describe(recorded)}; now {_describe(_planned(plan))});"
                " pass --overwrite to replace it, or convert into a new destination"
            )
        return {int(p.rsplit("/", 1)[1][:-5]) for p in store.list_json(dest, TASKS_DIR, so)}
    if _has_content(dest, so):
        if not complete and _existing_attrs(dest, so) is None and not _only_internal(dest, so):
            raise StoreExistsError(
                f"{dest} exists and is not a nasar-zarr cube; refusing to write into it"
                " (choose an empty or new destination)"
            )
        _clear(dest, so)
    ds, encoding = skeleton(plan, table)
    _fault_point("skeleton")
    # mode "a" on the cleared store: mode "w" would also delete the lock this run holds.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(store.zarr_store(dest, so), mode="a", compute=False, zarr_format=3,
                   encoding=encoding, consolidated=False)
    store.write_json(dest, SKELETON_FILE, {"created": ds.attrs[ATTRS_KEY]["created"]}, so)
    return set()


def _clear(dest: str, so) -> None:
    """Remove everything in the store but the lock (which this run holds)."""
    fs, root = store.filesystem(dest, so)
    lock = f"{root}/{LOCK_FILE}"
    for path in fs.find(root):
        if path != lock:
            fs.rm_file(path)


def _only_internal(dest: str, so) -> bool:
    fs, root = store.filesystem(dest, so)
    return all(p[len(root) + 1 :].startswith(store.INTERNAL_PREFIX) for p in fs.find(root))


def _planned(plan: ConversionPlan) -> dict:
    return {"layout": plan.options.layout(), "n_samples": plan.n_samples, "source": plan.source}


def _describe(recorded: Mapping[str, Any]) -> str:
    layout = recorded.get("layout", {})
    parts = [f"{k}={v}" for k, v in layout.items()]
    parts.append(f"samples={recorded.get('n_samples')}")
    parts.append(f"source={recorded.get('source')}")
    return ", ".join(parts)


def _existing_attrs(dest: str, so) -> dict | None:
    doc = store.read_json(dest, "zarr.json", so)
    return None if doc is None else doc.get("attributes", {})


def _has_content(dest: str, so) -> bool:
    fs, root = store.filesystem(dest, so)
    try:
        return bool(fs.ls(root, detail=False))
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------- tasks


def run_task(
    task: ShardTask,
    *,
    src: str,
    dest: str,
    options: ConvertOptions,
    rejected_rows: Iterable[int] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a task's samples, write its Zarr shard of every variable once, record it.

    Samples are compressed one inner chunk at a time as they are read (see
    :mod:`nasar_zarr.sharding`): the task holds compressed bytes, not raw buffers.
    """
    from numcodecs import blosc

    # One task per core: blosc's own threads would only oversubscribe the cores.
    threads = blosc.set_nthreads(1)
    try:
        return _run_task(task, src=src, dest=dest, options=options,
                         rejected_rows=rejected_rows, storage_options=storage_options)
    finally:
        blosc.set_nthreads(threads)


def _run_task(task, *, src, dest, options, rejected_rows, storage_options) -> dict[str, Any]:
    n, k = task.n_samples, options.inner_chunk
    status = np.zeros(n, dtype="uint8")
    present = np.zeros((n, *(schema.DIM_SIZES[d] for d in schema.RTC_PRESENT_DIMS[1:])),
                       dtype=bool)
    rejections: list[dict] = []
    nonfinite: list[dict] = []
    encode = sharding.inner_encoder(options.codec, options.clevel)
    chunk = _chunk_buffers(k)
    pieces: dict[str, list[bytes]] = {name: [] for name in schema.VARIABLES}
    samples = task_samples(task, src=src, max_member_bytes=options.max_member_bytes,
                           storage_options=storage_options)
    pending = next(samples, None)
    for chunk_start in range(task.start, task.start + -(-n // k) * k, k):
        for j in range(k):
            row = chunk_start + j
            if pending is None or pending[0] != row:  # rejected at planning, or past the end
                _set_row(chunk, j, np.nan)
                continue
            _, shard_path, key, arrays = pending
            pending = next(samples, None)
            if isinstance(arrays, SourceError):
                if options.on_error == "raise":
                    raise arrays
                rejections.append({"shard": shard_path, "key": key,
                                   "reason": arrays.reason, "row": row})
                _set_row(chunk, j, np.nan)
                continue
            schema.fill_batch(chunk, j, arrays)
            counts = source.nonfinite_counts(arrays)
            if counts:
                nonfinite.append({"shard": shard_path, "key": key, "row": row,
                                  "nonfinite_values": counts})
            status[row - task.start] = schema.STATUS_WRITTEN
            present[row - task.start] = schema.rtc_present(chunk["rtc"][j])
        for name, values in chunk.items():
            pieces[name].append(encode(values))
    for row in rejected_rows:
        status[row - task.start] = schema.STATUS_REJECTED
    for r in rejections:
        status[r["row"] - task.start] = schema.STATUS_REJECTED

    checksums: dict[str, int | None] = {}
    group = store.open_group(dest, storage_options, mode="r+", use_consolidated=False,
                             wrap=lambda s: store.ChecksumStore(s, checksums))
    for name in schema.VARIABLES:
        key = chunk_object(group[name], task.index)
        checksums[key] = _write_shard(dest, key, pieces.pop(name), options, storage_options)
        _fault_point(f"after-{name}")
    region = slice(task.start, task.stop)
    group[schema.RTC_PRESENT][region] = present
    group[schema.STATUS][region] = status
    _fault_point("after-status")
    # An object Zarr did not write holds only fill values (no object): None.
    checksums = {key: checksums.get(key) for key in (
        chunk_object(group[name], task.index)
        for name in [*schema.VARIABLES, schema.RTC_PRESENT, schema.STATUS])}
    record = {
        "index": task.index, "start": task.start, "stop": task.stop,
        "written": int((status == schema.STATUS_WRITTEN).sum()),
        "rejected": int((status == schema.STATUS_REJECTED).sum()),
        "rejections": rejections, "nonfinite": nonfinite, "crc32": checksums,
    }
    store.write_json(dest, task_record_path(task.index), record, storage_options)
    _fault_point("after-record")
    return record


def task_samples(task: ShardTask, *, src: str,
                 max_member_bytes: int = source.DEFAULT_MAX_MEMBER_BYTES,
                 storage_options: Mapping[str, Any] | None = None):
    """``(row, shard_path, key, arrays | error)`` for the task's samples, rows ascending."""
    for span in task.spans:
        samples = source.read_samples(source.join(src, span.shard_path), span.entries,
                                      shard=span.shard_path, storage_options=storage_options,
                                      max_member_bytes=max_member_bytes)
        for row, (key, arrays) in zip(span.rows, samples, strict=True):
            yield row, span.shard_path, key, arrays


def _set_row(chunk: Mapping[str, np.ndarray], j: int, value: float) -> None:
    for values in chunk.values():
        values[j] = value


def _write_shard(dest: str, key: str, pieces: list[bytes], options: ConvertOptions,
                 storage_options) -> int:
    """Write one shard object (inner chunks + index) in one piece; returns its CRC-32."""
    index = sharding.shard_index([len(p) for p in pieces], options.shard // options.inner_chunk)
    fs, root = store.filesystem(dest, storage_options)
    path = f"{root}/{key}"
    if not source.is_remote(dest):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    crc = 0
    with fs.open(path, "wb") as f:
        for piece in [*pieces, index]:
            f.write(piece)
            crc = zlib.crc32(piece, crc)
    return crc


_CHUNK_BUFFERS: dict[int, dict[str, np.ndarray]] = {}


def _chunk_buffers(k: int) -> dict[str, np.ndarray]:
    """Per-variable buffers of one inner chunk, reused (no page faults per task)."""
    if k not in _CHUNK_BUFFERS:
        _CHUNK_BUFFERS.clear()
        _CHUNK_BUFFERS[k] = schema.empty_batch(k)
    return _CHUNK_BUFFERS[k]



def chunk_object(array, shard_index: int) -> str:
    """Store key of the object holding Zarr shard ``shard_index`` of ``array``."""
    coords = (shard_index,) + (0,) * (array.ndim - 1)
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def task_record_path(index: int) -> str:
    return f"{TASKS_DIR}/{index:06d}.json"


def task_records(dest: str, storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    return [store.read_json(dest, p, storage_options)
            for p in store.list_json(dest, TASKS_DIR, storage_options)]


# ---------------------------------------------------------------------------- execute


def execute(
    plan: ConversionPlan,
    *,
    client=None,
    workers: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> xr.Dataset:
    """Write the cube described by ``plan`` and return it opened lazily.

    Parameters
    ----------
    client
        A ``distributed.Client`` to run on. Without one, a LocalCluster of
        ``workers`` processes (default: one per core) is started and closed.
    workers
        ``0`` runs every task in this process, one after the other.
    progress
        Show a progress bar (tasks) on stderr.
    overwrite
        Replace a store made with other options instead of refusing.
    """
    so = plan.storage_options
    table = read_metadata(plan.source, so)
    keys = tuple(table.column(schema.KEY_COLUMN).to_pylist())
    if keys != plan.sample_keys:
        raise MetadataError(
            f"{plan.source}: metadata.parquet changed since the plan was made; plan again"
        )
    with store_lock(plan.dest, so):
        done = prepare_store(plan, table, overwrite=overwrite)
        todo = [t for t in plan.tasks if t.index not in done]
        rejected_rows: dict[int, list[int]] = {}
        for r in plan.rejected:
            if r.row is not None:
                rejected_rows.setdefault(r.row // plan.options.shard, []).append(r.row)
        kwargs = {"src": plan.source, "dest": plan.dest, "options": plan.options,
                  "storage_options": so}
        calls = [((t,), {**kwargs, "rejected_rows": rejected_rows.get(t.index, [])})
                 for t in todo]
        for _ in run_calls(run_task, calls, client=client, workers=workers,
                           progress=progress, total=len(plan.tasks),
                           initial=len(plan.tasks) - len(todo), desc="convert"):
            pass
        finalize(plan)
    from .cube import open_cube

    return open_cube(plan.dest, storage_options=so)


def finalize(plan: ConversionPlan) -> None:
    """Write the rejection report (plan + tasks) and consolidate the metadata."""
    so = plan.storage_options
    records = task_records(plan.dest, so)
    report = [
        {"shard": r.shard, "key": r.key, "reason": r.reason, "row": r.row}
        for r in plan.rejected
    ] + [rej for rec in records for rej in rec["rejections"]]
    nonfinite = [nf for rec in records for nf in rec["nonfinite"]]
    store.write_json(plan.dest, REJECTIONS_FILE,
                     {"rejected": report, "nonfinite": nonfinite}, so)
    _fault_point("before-consolidate")
    store.consolidate(plan.dest, so)


def _local_cluster(cluster_class, n_workers: int):
    """A LocalCluster of single-threaded worker processes with glibc's malloc defaults.

    dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which disables
    glibc's dynamic mmap threshold: every shard-sized buffer is then fresh memory
    and page-faults again (measured: 5x the page faults, conversion 443 -> 719
    samples/s with the default restored). The nanny also writes the variable into
    this process's environment, so it is removed again for the next cluster.
    """
    import dask

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    with dask.config.set({key: None}):
        cluster = cluster_class(n_workers=n_workers, threads_per_worker=1, processes=True,
                                dashboard_address=":0", memory_limit=0)
    if before is None:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return cluster


def run_calls(fn, calls, *, client=None, workers=None, progress=False, total=None,
              initial=0, desc=""):
    """Run ``fn(*args, **kwargs)`` for each call, yielding results as they finish.

    On ``client``; else on a LocalCluster of ``workers`` processes (default one
    per core) started here; ``workers=0`` runs them one by one in this process.
    The first failure cancels what is still queued and is raised.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(calls) + initial if total is None else total, initial=initial,
               unit="shard", disable=None if progress else True, desc=desc)
    try:
        if client is None and workers == 0:
            for args, kwargs in calls:
                yield fn(*args, **kwargs)
                bar.update()
            return
        from distributed import Client, LocalCluster, as_completed

        owned = None
        if client is None:
            owned = _local_cluster(LocalCluster, workers or os.cpu_count() or 1)
            client = Client(owned)
        try:
            futures = [client.submit(fn, *args, **kwargs, pure=False,
                                     key=f"nasar-{desc}-{i}-{uuid.uuid4().hex[:8]}")
                       for i, (args, kwargs) in enumerate(calls)]
            try:
                for future in as_completed(futures):
                    yield future.result()
                    bar.update()
            except BaseException:
                client.cancel(futures)
                raise
        finally:
            if owned is not None:
                client.close()
                owned.close()
    finally:
        bar.close()


# ---------------------------------------------------------------------------- append

APPEND_FILE = f"{store.INTERNAL_PREFIX}/append.json"


def append(
    src: str,
    dest: str,
    *,
    client=None,
    workers: int | None = None,
    progress: bool = False,
    on_error: str = "raise",
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Add the samples of new tar shards of ``src`` at the end of the cube at ``dest``.

    ``src`` is the grown release (its metadata lists the cube's samples first, in
    the same release order, then the new ones). Existing Zarr shards are not
    touched, except a partial last shard, which its single task rewrites whole
    (from the same source bytes). Interrupted appends resume when run again.
    """
    from .plan import plan_conversion

    so = dict(storage_options or {})
    if store.read_json(dest, SKELETON_FILE, so) is None:
        raise StoreExistsError(f"{dest}: no complete nasar-zarr cube to append to;"
                               " run `nasar-zarr convert` first")
    recorded = _existing_attrs(dest, so)[ATTRS_KEY]
    layout = recorded["layout"]
    plan = plan_conversion(src, dest, on_error=on_error, storage_options=so, **layout)
    n_old, n_new = int(recorded["n_samples"]), plan.n_samples
    intent = store.read_json(dest, APPEND_FILE, so)
    resuming = intent is not None and intent.get("to") == n_new
    if not resuming and n_new != n_old:
        group = store.open_group(dest, so, use_consolidated=False)
        old_keys = group[schema.SAMPLE_DIM][:].tolist()
        if list(plan.sample_keys[:n_old]) != old_keys or n_new < n_old:
            raise StoreExistsError(
                f"{dest}: the cube's {n_old:,} samples are not the first samples of {src} in"
                " release order; append only adds shards after the cube's last one"
            )
        table = read_metadata(src, so)
        if meta.schema_from_text(recorded["metadata_schema"]).remove_metadata() != \
                table.schema.remove_metadata():
            raise MetadataError(f"{src}: metadata.parquet columns or types differ from the"
                                " cube's; append needs the same table layout")
        from .cube import metadata_table, open_cube

        if not metadata_table(open_cube(dest, storage_options=so)).equals(
                table.slice(0, n_old).to_pandas()):
            raise StoreExistsError(
                f"{dest}: the metadata of the cube's {n_old:,} samples differs from the first"
                f" {n_old:,} rows of {src}; append only adds shards after the cube's last one"
            )
    if n_new != n_old or resuming:
        table = read_metadata(src, so)
        with store_lock(dest, so):
            store.write_json(dest, APPEND_FILE, {"from": intent["from"] if resuming else n_old,
                                                 "to": n_new, "source": src}, so)
            _extend_store(plan, table, n_old=intent["from"] if resuming else n_old)
    result = execute(plan, client=client, workers=workers, progress=progress)
    fs, root = store.filesystem(dest, so)
    if fs.exists(f"{root}/{APPEND_FILE}"):
        fs.rm_file(f"{root}/{APPEND_FILE}")
    return result


def _extend_store(plan: ConversionPlan, table: pa.Table, *, n_old: int) -> None:
    """Resize every ``sample`` array, rewrite the 1-D coordinates, update provenance."""
    dest, so, n = plan.dest, plan.storage_options, plan.n_samples
    group = store.open_group(dest, so, mode="r+", use_consolidated=False)
    for name in [*schema.VARIABLES, schema.RTC_PRESENT, schema.STATUS]:
        array = group[name]
        array.resize((n, *array.shape[1:]))
    _fault_point("after-resize")
    ds, encoding = skeleton(plan, table)
    coords = [c for c in ds.coords if c not in schema.LABELS]
    for name in coords:
        if name in group:
            del group[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[coords].drop_vars(list(schema.LABELS), errors="ignore").to_zarr(
            store.zarr_store(dest, so), mode="a", zarr_format=3, consolidated=False,
            encoding={c: encoding[c] for c in coords})
    # The partial last shard gets new samples: its single task rewrites it whole.
    shard = plan.options.shard
    if n_old % shard:
        fs, root = store.filesystem(dest, so)
        record = f"{root}/{task_record_path(n_old // shard)}"
        if fs.exists(record):
            fs.rm_file(record)
    attrs = dict(group.attrs)
    new = ds.attrs[ATTRS_KEY]
    attrs[ATTRS_KEY] = {**attrs[ATTRS_KEY], "n_samples": n, "source": plan.source,
                        "tar_shards": new["tar_shards"],
                        "webdataset_summary": new["webdataset_summary"]}
    attrs["history"] = f"{attrs.get('history', '')}\n{ds.attrs['history']} (append {n_old:,}" \
                       f" -> {n:,} samples)".strip()
    group.attrs.put(attrs)
