"""The shard task: read one Zarr shard's samples, write its objects once, record it.

A task is a pure function of its arguments plus I/O: it allocates its own
buffers, changes no process-wide setting and keeps nothing after it returns, so
any number of tasks can run on the threads of one worker (``dask worker``
starts several) or in separate processes. blosc compresses on one thread when
called off the main thread (numcodecs' context API), so one task per core never
oversubscribes the cores; in-process runs (main thread) use blosc's threads.

Order of writes, which is what makes a killed run safe to rerun: the Zarr shard
of every data variable, then ``rtc_present``, then ``status``, then the task
record ``_nasar/tasks/NNNNNN.json`` (counts, rejections, checksums). A task
without a record is rewritten whole on the next run; a task with a record is
never touched again.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from . import schema, sharding, source, store
from .errors import SourceError, StoreLockedError
from .faults import fault_point
from .plan import ConversionPlan, ConvertOptions, ShardTask
from .runner import run_calls


def run_task(
    task: ShardTask,
    *,
    src: str,
    dest: str,
    options: ConvertOptions,
    rejected_rows: Iterable[int] = (),
    lock_token: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    documents: Mapping[str, Mapping[str, Any]] | None = None,
    versions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Read a task's samples, write its Zarr shard of every variable once, record it.

    Samples are compressed one inner chunk at a time as they are read (see
    :mod:`nasar_zarr.sharding`): the task holds compressed bytes, not raw buffers.
    ``lock_token`` is the token of the run that submitted the task: a task that
    finds another token in the store's lock (its run was interrupted and another
    took over) writes nothing. ``documents`` holds the ``zarr.json`` document of each
    array the task writes (read from the store when not given). ``versions`` holds
    the ETag (as ``If-Match`` takes it) the plan saw of each tar it reads: a tar
    replaced since raises :class:`~nasar_zarr.ranges.ObjectChangedError`, so the
    cube never mixes two versions of a tar.
    """
    n, k = task.n_samples, options.inner_chunk
    status = np.zeros(n, dtype="uint8")
    present = np.zeros((n, *(schema.DIM_SIZES[d] for d in schema.RTC_PRESENT_DIMS[1:])), dtype=bool)
    rejections: list[dict] = []
    nonfinite: list[dict] = []
    encode = sharding.inner_encoder(options.codec, options.clevel)
    chunk = schema.empty_batch(k)  # this task's own buffers: one inner chunk
    # None: an inner chunk of fill values only, left out of its shard (marked empty)
    pieces: dict[str, list[bytes | None]] = {name: [] for name in schema.VARIABLES}
    samples = task_samples(
        task,
        src=src,
        max_member_bytes=options.max_member_bytes,
        storage_options=storage_options,
        versions=versions,
    )
    pending = next(samples, None)
    for chunk_start in range(task.start, task.start + -(-n // k) * k, k):
        filled = False
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
                rejections.append(
                    {"shard": shard_path, "key": key, "reason": arrays.reason, "row": row}
                )
                _set_row(chunk, j, np.nan)
                continue
            schema.fill_batch(chunk, j, arrays)
            filled = True
            counts = {} if _all_finite(arrays) else source.nonfinite_counts(arrays)
            if counts:
                nonfinite.append(
                    {"shard": shard_path, "key": key, "row": row, "nonfinite_values": counts}
                )
            status[row - task.start] = schema.STATUS_WRITTEN
            present[row - task.start] = schema.rtc_present(chunk["rtc"][j])
        for name, values in chunk.items():
            pieces[name].append(encode(values) if filled else None)
    for row in rejected_rows:
        status[row - task.start] = schema.STATUS_REJECTED
    for r in rejections:
        status[r["row"] - task.start] = schema.STATUS_REJECTED

    if lock_token is not None:
        _check_lock(dest, lock_token, storage_options)
    # Written by name from the arrays' zarr.json documents: no group is opened, no
    # metadata read, no object asked for before it is written (one PUT each).
    if documents is None:
        documents = store.array_documents(dest, WRITTEN_ARRAYS, storage_options)
    checksums: dict[str, int | None] = {}
    for name in schema.VARIABLES:
        key = store.chunk_key(name, documents[name], task.index)
        checksums[key] = write_shard(dest, key, pieces.pop(name), options, storage_options)
        fault_point(f"after-{name}")
    for name, values in ((schema.RTC_PRESENT, present), (schema.STATUS, status)):
        key = store.chunk_key(name, documents[name], task.index)
        data = store.encode_chunk(documents[name], values, task.start).get(key[len(name) + 1 :])
        checksums[key] = write_object(dest, key, data, storage_options)
    fault_point("after-status")
    record = {
        "index": task.index,
        "start": task.start,
        "stop": task.stop,
        "written": int((status == schema.STATUS_WRITTEN).sum()),
        "rejected": int((status == schema.STATUS_REJECTED).sum()),
        "rejections": rejections,
        "nonfinite": nonfinite,
        "crc32": checksums,
    }
    store.write_json(dest, store.task_record_path(task.index), record, storage_options)
    fault_point("after-record")
    return record


WRITTEN_ARRAYS = (*schema.VARIABLES, schema.RTC_PRESENT, schema.STATUS)
# A record's rejection and non-finite lists travel back to the client when they are
# this short (the report is then written without reading the record back); longer
# ones stay in the store only, so a million rejections never fill the client.
RETURNED_LIST_LENGTH = 16


def run_tasks(
    tasks: Iterable[ShardTask],
    *,
    src: str,
    dest: str,
    options: ConvertOptions,
    rejected_rows: Mapping[int, list[int]],
    lock_token: str | None,
    storage_options: Mapping[str, Any] | None,
    client: Any = None,
    workers: int | None = None,
    progress: bool = False,
    total: int | None = None,
    desc: str = "convert",
    versions: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run :func:`run_task` for each task on the runner; returns the records (counts and
    checksums; their rejection lists too when short, else only in the store).
    ``versions``: the planned ETag of each tar (each task gets those of its spans)."""
    kwargs = {
        "src": src,
        "dest": dest,
        "options": options,
        "lock_token": lock_token,
        "storage_options": dict(storage_options or {}),
        "documents": store.array_documents(dest, WRITTEN_ARRAYS, storage_options),
    }
    # Tasks are built here one by one from the plan's columns; each carries only its spans.
    versions = versions or {}
    calls = [
        (
            (t,),
            {
                **kwargs,
                "rejected_rows": rejected_rows.get(t.index, []),
                "versions": _span_versions(t, versions),
            },
        )
        for t in tasks
    ]
    total = len(calls) if total is None else total
    return [
        _light(record)
        for record in run_calls(
            run_task,
            calls,
            client=client,
            workers=workers,
            progress=progress,
            total=total,
            initial=total - len(calls),
            desc=desc,
        )
    ]


def _span_versions(task: ShardTask, versions: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``versions`` for the tars ``task`` reads (what travels with it)."""
    return {s.shard_path: versions[s.shard_path] for s in task.spans if s.shard_path in versions}


def _light(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its long lists (those stay in the store, read by name)."""
    lists = ("rejections", "nonfinite")
    if all(len(record[k]) <= RETURNED_LIST_LENGTH for k in lists):
        return record
    return {k: v for k, v in record.items() if k not in lists}


def run_plan_tasks(
    plan: ConversionPlan,
    *,
    done: set[int],
    lock_token: str | None,
    client: Any = None,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "convert",
) -> list[dict[str, Any]]:
    """Run every task of ``plan`` that is not in ``done`` (finished already) into its store."""
    return run_tasks(
        [t for t in plan.tasks if t.index not in done],
        src=plan.source,
        dest=plan.dest,
        options=plan.options,
        rejected_rows=rejected_rows_by_task(plan),
        lock_token=lock_token,
        storage_options=plan.storage_options,
        client=client,
        workers=workers,
        progress=progress,
        total=len(plan.tasks),
        desc=desc,
        versions=planned_versions(plan),
    )


def planned_versions(plan: ConversionPlan) -> dict[str, str]:
    """The ETag (as ``If-Match`` takes it) the plan saw of each tar that has one."""
    found = {t.path: source.if_match(t.etag) for t in plan.tar_shards}
    return {path: etag for path, etag in found.items() if etag}


def rejected_rows_by_task(plan: ConversionPlan) -> dict[int, list[int]]:
    """Cube rows rejected at planning, grouped by the task (Zarr shard) that holds them."""
    rows: dict[int, list[int]] = {}
    for r in plan.rejected:
        if r.row is not None:
            rows.setdefault(r.row // plan.options.shard, []).append(r.row)
    return rows


def task_samples(
    task: ShardTask,
    *,
    src: str,
    max_member_bytes: int = source.DEFAULT_MAX_MEMBER_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, str, str, dict[str, np.ndarray] | SourceError]]:
    """``(row, shard_path, key, arrays | error)`` for the task's samples, rows ascending
    (each tar read at its ``versions`` entry, when given)."""
    for span in task.spans:
        samples = source.read_index(
            source.join(src, span.shard_path),
            span.index,
            shard=span.shard_path,
            storage_options=storage_options,
            max_member_bytes=max_member_bytes,
            version=(versions or {}).get(span.shard_path),
        )
        for row, (key, arrays) in zip(span.rows.tolist(), samples, strict=True):
            yield row, span.shard_path, key, arrays


def write_shard(
    dest: str,
    key: str,
    pieces: list[bytes | None],
    options: ConvertOptions,
    storage_options: Mapping[str, Any] | None,
) -> int | None:
    """Write one shard object (inner chunks + index) in one piece; returns its CRC-32.

    ``None`` pieces (inner chunks of fill values only) are left out and marked
    empty in the index; a shard of nothing but those is not written at all (a
    leftover of an interrupted run is removed) and its checksum is None, as for
    any object that holds only fill values.
    """
    fs, root = store.filesystem(dest, storage_options)
    path = f"{root}/{key}"
    if all(p is None for p in pieces):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        return None
    index = sharding.shard_index(
        [None if p is None else len(p) for p in pieces], options.shard // options.inner_chunk
    )
    if not source.is_remote(dest):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    crc = 0
    with fs.open(path, "wb") as f:
        for piece in [*pieces, index]:
            if piece is not None:
                f.write(piece)
                crc = source.crc32(piece, crc)
    return crc


def write_object(
    dest: str, key: str, data: bytes | None, storage_options: Mapping[str, Any] | None
) -> int | None:
    """Write one chunk object (one PUT); returns its CRC-32. ``None`` (a chunk of fill
    values only, which Zarr does not store) removes a leftover instead and returns None."""
    fs, root = store.filesystem(dest, storage_options)
    path = f"{root}/{key}"
    if data is None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        return None
    if not source.is_remote(dest):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
    return zlib.crc32(data)


def chunk_object(array: Any, shard_index: int) -> str:
    """Store key of the object holding Zarr shard ``shard_index`` of ``array``."""
    coords = (shard_index,) + (0,) * (array.ndim - 1)
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def _all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    """True when no array holds NaN or inf (a quick check before counting them).

    A NaN or an inf makes its array's sum NaN or inf; a sum that overflows on finite
    values only sends the sample to the exact count.
    """
    return all(np.isfinite(np.add.reduce(a, axis=None)) for a in arrays.values())


def _set_row(chunk: Mapping[str, np.ndarray], j: int, value: float) -> None:
    for values in chunk.values():
        values[j] = value


def _check_lock(dest: str, token: str, storage_options: Mapping[str, Any] | None) -> None:
    held = store.read_json(dest, store.LOCK_FILE, storage_options)
    if not held or held.get("token") != token:
        raise StoreLockedError(
            f"{dest}: this task's conversion no longer holds the store's lock (it was"
            " interrupted or another run took over); nothing was written by this task"
        )
