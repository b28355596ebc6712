"""Check a cube: against its source bit for bit, or against its own recorded checksums.

``verify(dest)`` recomputes the CRC-32 of every stored Zarr shard object and
compares it with the task records written at conversion time, so damage to a
stored object is found without the source. ``verify(dest, src=...)`` also
re-reads the source and compares every sample, its status and the metadata
coordinates. Work runs one task per Zarr shard, in parallel, like conversion.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import schema, sharding, store
from .corpus import MetadataColumns
from .cube import metadata_differences, open_cube
from .errors import SourceError
from .plan import ConversionPlan, ShardTask
from .runner import run_calls
from .task import chunk_object, rejected_rows_by_task, task_samples


@dataclass(frozen=True)
class Mismatch:
    """One finding: ``key`` is a sample key, a store object, or a metadata column."""

    key: str
    what: str

    def __str__(self) -> str:
        return f"{self.key}: {self.what}"


@dataclass(frozen=True)
class VerifyReport:
    dest: str
    checked_shards: int
    checked_samples: int
    mismatches: tuple[Mismatch, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def __str__(self) -> str:
        head = (
            f"{self.dest}: {self.checked_shards} shards, {self.checked_samples:,} samples checked: "
        )
        if self.ok:
            return head + "OK"
        lines = [head + f"{len(self.mismatches)} mismatches"]
        lines += [f"  {m}" for m in self.mismatches[:50]]
        if len(self.mismatches) > 50:
            lines.append(f"  ... and {len(self.mismatches) - 50} more")
        return "\n".join(lines)


def verify_store(
    dest: str,
    recorded: Mapping[str, Any],
    *,
    plan: ConversionPlan | None = None,
    client: Any = None,
    workers: int | None = None,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Verify the cube at ``dest`` (``recorded``: its provenance) against its checksums,
    and against the source when ``plan`` (made with ``on_error="skip"``) is given.

    Never raises on a mismatch: the report lists them.
    """
    so = dict(storage_options or {})
    group = store.open_group(dest, so, use_consolidated=False)
    shard = int(recorded["layout"]["shard"])
    n = int(recorded["n_samples"])
    n_shards = -(-n // shard)
    mismatches: list[Mismatch] = []
    # cubes of contract 1 have no per-chunk CRC-32C: only their whole objects are checked
    chunking = (
        (shard, int(recorded["layout"]["inner_chunk"]))
        if int(recorded.get("contract", 1)) >= 2
        else None
    )
    calls: list = [
        ((index,), {"dest": dest, "storage_options": so, "chunking": chunking})
        for index in range(n_shards)
    ]
    fn: Any
    if plan is not None:
        src = plan.source
        if not plan.has_keys(store.read(group, schema.SAMPLE_DIM)):
            mismatches.append(Mismatch("sample", "sample keys differ from the source's"))
            return VerifyReport(dest, 0, 0, tuple(mismatches))
        rejected = rejected_rows_by_task(plan)
        # Each task gets its own keys: the sample coordinate is one chunk of every key.
        calls = [
            (
                (t,),
                {
                    "dest": dest,
                    "src": src,
                    "keys": plan.sample_keys.slice(t.start, t.n_samples).to_pylist(),
                    "storage_options": so,
                    "chunking": chunking,
                    "rejected_rows": sorted(rejected.get(t.index, [])),
                },
            )
            for t in plan.tasks
        ]
        fn = _compare_task
        mismatches += _compare_metadata(dest, src, so)
    else:
        fn = _check_shard
    for found in run_calls(
        fn, calls, client=client, workers=workers, progress=progress, desc="verify"
    ):
        mismatches += [Mismatch(*m) for m in found]
    return VerifyReport(dest, n_shards, n, tuple(mismatches))


def _check_shard(
    index: int, *, dest: str, storage_options=None, chunking: tuple[int, int] | None = None
) -> list[tuple[str, str]]:
    """Each stored object of Zarr shard ``index`` against its recorded CRC-32; a damaged
    one is searched for the chunks that fail their own CRC-32C. ``chunking``: the cube's
    (shard, inner chunk) sizes in samples (None for a cube without chunk checksums)."""
    record = store.read_json(dest, store.task_record_path(index), storage_options)
    if record is None:
        return [
            (
                f"shard {index}",
                "not written (no task record): the conversion did not finish; run convert again",
            )
        ]
    fs, root = store.filesystem(dest, storage_options)
    found = []
    for key, crc in record["crc32"].items():
        try:
            data = store.read_bytes(fs, f"{root}/{key}")
        except FileNotFoundError:
            if crc is not None:
                found.append((key, "stored object is missing"))
            continue
        if crc is None:
            found.append((key, "an object exists where only fill values were written"))
            continue
        if zlib.crc32(data) != crc:
            found.append(
                (
                    key,
                    f"stored object is damaged (CRC-32 {zlib.crc32(data):08x}, recorded {crc:08x})",
                )
            )
            if chunking is not None:
                found += _damaged_chunks(key, data, index, chunking)
    return found


def _damaged_chunks(
    key: str, data: bytes, shard_index: int, chunking: tuple[int, int]
) -> list[tuple[str, str]]:
    """Which chunks of a damaged object fail their own CRC-32C (cube contract 2): a data
    variable's or a sharded flag's inner chunks (named with their samples), or the single
    chunk of a flag written unsharded (cubes before the flags were sharded)."""
    name = key.split("/", 1)[0]
    view = memoryview(data)
    shard, inner = chunking
    if name not in schema.VARIABLES:
        try:
            sharding.checked(view)
            return []
        except sharding.ChecksumMismatch as exc:
            single = exc
        try:  # a flag sharded like the data variables: its index's CRC holds
            sharding.parse_index(view, shard // inner)
        except ValueError:  # a checksum mismatch, or too short for an index
            return [(key, f"the chunk fails its CRC-32C ({single})")]
    try:
        index = sharding.parse_index(view, shard // inner)
    except sharding.ChecksumMismatch as exc:
        return [(key, f"the shard index fails its CRC-32C ({exc})")]
    found = []
    for c, (offset, nbytes) in enumerate(index.tolist()):
        if offset == sharding.EMPTY:
            continue
        try:
            sharding.checked(view[offset : offset + nbytes])
        except sharding.ChecksumMismatch as exc:
            first = shard_index * shard + c * inner
            found.append(
                (
                    key,
                    f"inner chunk {c} (samples {first}-{first + inner - 1})"
                    f" fails its CRC-32C ({exc})",
                )
            )
    return found


def _compare_task(
    task: ShardTask,
    *,
    dest: str,
    src: str,
    keys: list[str],
    rejected_rows=(),
    storage_options=None,
    chunking: tuple[int, int] | None = None,
) -> list[tuple[str, str]]:
    """Compare one Zarr shard's samples (``keys``) with the source, bit for bit."""
    found = _check_shard(task.index, dest=dest, storage_options=storage_options, chunking=chunking)
    group = store.open_group(dest, storage_options, use_consolidated=False)
    region = slice(task.start, task.stop)
    stored: dict[str, np.ndarray] = {}
    for name in schema.VARIABLES:
        try:
            stored[name] = store.read(group, name, region)
        except Exception as exc:  # a damaged object fails in the codec, whatever it is
            found.append(
                (
                    chunk_object(store.array(group, name), task.index),
                    f"stored shard cannot be decoded ({type(exc).__name__}: {exc})",
                )
            )
            stored[name] = np.full(
                (task.n_samples, *schema.VARIABLES[name].sample_shape),
                np.nan,
                dtype=schema.VARIABLES[name].dtype,
            )
    status = store.read(group, schema.STATUS, region)
    present = store.read(group, schema.RTC_PRESENT, region)
    expected_status = np.zeros(task.n_samples, dtype="uint8")
    for row in rejected_rows:
        expected_status[row - task.start] = schema.STATUS_REJECTED
    for row, _, key, arrays in task_samples(task, src=src, storage_options=storage_options):
        i = row - task.start
        if isinstance(arrays, SourceError):
            expected_status[i] = schema.STATUS_REJECTED
            continue
        expected_status[i] = schema.STATUS_WRITTEN
        back = schema.cube_to_source({name: values[i] for name, values in stored.items()})
        for name in schema.SOURCE_KEYS:
            if back[name].tobytes() != arrays[name].tobytes():
                found.append((key, f"{name} differs from the source"))
        if not np.array_equal(present[i], schema.rtc_present(stored["rtc"][i])):
            found.append((key, "rtc_present does not match the data"))
    for i, key in enumerate(keys):
        if status[i] != expected_status[i]:
            found.append((key, f"status is {status[i]}, expected {expected_status[i]}"))
        if expected_status[i] != schema.STATUS_WRITTEN:
            for name, values in stored.items():
                if not np.isnan(values[i]).all():
                    found.append((key, f"{name} holds data but the sample was not written"))
    return found


def _compare_metadata(dest: str, src: str, so) -> list[Mismatch]:
    ds = open_cube(dest, storage_options=so)
    return [Mismatch(*d) for d in metadata_differences(ds, MetadataColumns(src, so))]
