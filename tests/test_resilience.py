"""Never lose data: kill -9 and rerun, locks, options mismatch, append, verify."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

import nasar_zarr as nz
from nasar_zarr import schema
from nasar_zarr.api import append, verify
from nasar_zarr.errors import StoreExistsError, StoreLockedError
from nasar_zarr.store import LOCK_FILE, task_record_path, write_json
from nasar_zarr.testing import write_corpus
from tests.conftest import cli

ARRAYS = [*schema.VARIABLES, schema.STATUS, schema.RTC_PRESENT]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c"), n_shards=2, samples_per_shard=[5, 6], seed=21)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ref") / "ref.zarr"
    nz.plan_conversion(str(corpus.root), str(dest), shard=4).execute(workers=0)
    return dest


def assert_same_arrays(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        assert ga[name][:].tobytes() == gb[name][:].tobytes(), name


@pytest.mark.parametrize(
    "fault",
    [
        "skeleton",
        "after-rtc:2",
        "after-dem:1",
        "after-status:2",
        "after-record:1",
        "before-consolidate",
    ],
)
def test_kill_9_then_rerun_gives_the_same_store(corpus, reference, tmp_path, fault):
    dest = tmp_path / "cube.zarr"
    args = ["convert", str(corpus.root), str(dest), "--shard", "4", "--workers", "0"]
    killed = cli(*args, fault=fault)
    assert killed.returncode == -9, killed.stderr
    assert (dest / LOCK_FILE).exists()  # a stale lock from the dead run
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "done: 11 written, 0 rejected, 0 pending" in rerun.stdout
    assert not (dest / LOCK_FILE).exists()
    assert_same_arrays(dest, reference)
    report = verify(str(dest), src=str(corpus.root), workers=0)
    assert report.ok, str(report)


def test_rerun_of_a_finished_store_does_nothing(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    plan = nz.plan_conversion(str(corpus.root), str(dest), shard=4)
    plan.execute(workers=0)
    record = dest / task_record_path(0)
    stamp = record.stat().st_mtime_ns
    shard_object = dest / "rtc" / "c" / "0" / "0" / "0" / "0" / "0" / "0"
    content = shard_object.read_bytes()
    plan.execute(workers=0)
    assert record.stat().st_mtime_ns == stamp
    assert shard_object.read_bytes() == content


def test_other_options_are_refused_unless_overwrite(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    nz.plan_conversion(str(corpus.root), str(dest), shard=4).execute(workers=0)
    other = nz.plan_conversion(str(corpus.root), str(dest), shard=8)
    with pytest.raises(StoreExistsError) as err:
        other.execute(workers=0)
    assert str(err.value) == (
        f"{dest} already holds a cube made with different options (inner_chunk=2, shard=4,"
        f" codec=blosc-lz4, clevel=5, samples=11, source={corpus.root}; now inner_chunk=2,"
        f" shard=8, codec=blosc-lz4, clevel=5, samples=11, source={corpus.root}); pass"
        " --overwrite to replace it, or convert into a new destination"
    )
    ds = other.execute(workers=0, overwrite=True)
    assert ds.rtc.data.chunks[0] == (11,)
    assert verify(str(dest), workers=0).ok


def test_foreign_destination_is_never_cleared(corpus, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    with pytest.raises(StoreExistsError, match="exists and is not a nasar-zarr cube"):
        nz.plan_conversion(str(corpus.root), str(dest), shard=4).execute(workers=0, overwrite=True)
    assert (dest / "thesis.tex").read_text() == "precious"


def test_second_converter_is_refused(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    # A live process holds the lock (this one: pid alive on this host).
    import socket

    write_json(
        str(dest),
        LOCK_FILE,
        {
            "host": socket.gethostname(),
            "pid": os.getppid(),
            "token": "x",
            "since": "2026-01-01T00:00:00",
        },
    )
    result = cli("convert", str(corpus.root), str(dest), "--shard", "4", "--workers", "0")
    assert result.returncode == 2
    assert result.stderr == (
        f"nasar-zarr convert: error: {dest}: another conversion (pid {os.getppid()} on"
        f" {socket.gethostname()}, since 2026-01-01T00:00:00) holds the lock; wait for it, or"
        f" delete {LOCK_FILE} in the store if that process is gone\n"
    )
    with pytest.raises(StoreLockedError):
        nz.plan_conversion(str(corpus.root), str(dest), shard=4).execute(workers=0)


def test_verify_finds_a_damaged_object(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    shutil.copytree(corpus.root, tmp_path / "src")
    nz.plan_conversion(str(tmp_path / "src"), str(dest), shard=4).execute(workers=0)
    assert cli("verify", str(dest)).returncode == 0
    target = dest / "dem" / "c" / "1" / "0" / "0"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    result = cli("verify", str(dest))
    assert result.returncode == 1
    assert "dem/c/1/0/0: stored object is damaged (CRC-32" in result.stdout
    with_source = verify(str(dest), src=str(tmp_path / "src"), workers=0)
    assert not with_source.ok
    assert any(m.key == "dem/c/1/0/0" for m in with_source.mismatches)


def test_verify_with_source_names_mismatching_samples(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    nz.plan_conversion(str(corpus.root), str(dest), shard=4).execute(workers=0)
    group = zarr.open_group(str(dest), mode="r+", use_consolidated=False)
    slope = group["slope_deg"][4:8]
    slope[1, 0, 0] += 1.0
    group["slope_deg"][4:8] = slope  # a consistent (re-encoded) shard with a wrong value
    result = cli("verify", str(corpus.root), str(dest), "--workers", "0")
    assert result.returncode == 1
    key = corpus.metadata["sample_key"][5]
    assert f"{key}: slope_deg differs from the source" in result.stdout
    assert "slope_deg/c/1/0/0: stored object is damaged" in result.stdout


def test_verify_with_source_names_a_changed_metadata_column(tmp_path):
    """Compared column by column; equal NaNs and nulls are equal, a changed value is not."""
    import pyarrow as pa

    corpus = write_corpus(tmp_path / "c", n_shards=2, samples_per_shard=[3, 4], seed=21)
    path = corpus.root / "metadata.parquet"
    table = pq.read_table(path)
    quality = table.column("quality_score").to_numpy().copy()
    quality[1] = np.nan
    table = table.set_column(
        table.schema.get_field_index("quality_score"), "quality_score", pa.array(quality)
    )
    table = table.append_column("note", pa.array(["a", None, "b", "", None, "c", "d"]))
    pq.write_table(table, path)
    dest = tmp_path / "cube.zarr"
    nz.plan_conversion(str(corpus.root), str(dest), shard=4).execute(workers=0)
    assert verify(str(dest), src=str(corpus.root), workers=0).ok
    quality[2] += 0.5
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("quality_score"), "quality_score", pa.array(quality)
        ),
        path,
    )
    report = verify(str(dest), src=str(corpus.root), workers=0)
    assert [str(m) for m in report.mismatches] == [
        "quality_score: metadata coordinate differs from metadata.parquet"
    ]


def test_verify_reports_an_unfinished_conversion(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    killed = cli(
        "convert",
        str(corpus.root),
        str(dest),
        "--shard",
        "4",
        "--workers",
        "0",
        fault="after-record:1",
    )
    assert killed.returncode == -9
    report = verify(str(dest), workers=0)
    assert [str(m) for m in report.mismatches] == [
        "shard 1: not written (no task record): the conversion did not finish; run convert again",
        "shard 2: not written (no task record): the conversion did not finish; run convert again",
    ]


def test_append_new_shards(tmp_path):
    full = write_corpus(tmp_path / "full", n_shards=3, samples_per_shard=[5, 6, 7], seed=4)
    part = tmp_path / "part"
    (part / "data").mkdir(parents=True)
    for path in full.shard_paths[:2]:
        shutil.copy(full.root / path, part / path)
    table = pq.read_table(full.root / "metadata.parquet")
    pq.write_table(table.slice(0, 11), part / "metadata.parquet")
    dest = tmp_path / "cube.zarr"
    nz.plan_conversion(str(part), str(dest), shard=4).execute(workers=0)
    first_shards = {
        p: p.read_bytes() for p in (dest / "rtc" / "c").glob("[01]/**/*") if p.is_file()
    }
    result = cli("append", str(full.root), str(dest), "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert "done: 18 written, 0 rejected, 0 pending" in result.stdout
    for p, content in first_shards.items():  # full shards before the end are untouched
        assert p.read_bytes() == content
    reference = tmp_path / "ref.zarr"
    nz.plan_conversion(str(full.root), str(reference), shard=4).execute(workers=0)
    assert_same_arrays(dest, reference)
    ds = nz.open_cube(str(dest))
    assert ds.sizes["sample"] == 18
    assert (
        ds.quality_score.values.tobytes()
        == nz.open_cube(str(reference)).quality_score.values.tobytes()
    )
    assert verify(str(dest), src=str(full.root), workers=0).ok
    assert zarr.open_group(str(dest), mode="r")["sample"].chunks == (18,)


def test_append_refuses_a_different_history(tmp_path):
    a = write_corpus(tmp_path / "a", n_shards=1, samples_per_shard=3, seed=1)
    b = write_corpus(tmp_path / "b", n_shards=2, samples_per_shard=3, seed=2)
    dest = tmp_path / "cube.zarr"
    nz.plan_conversion(str(a.root), str(dest), shard=2).execute(workers=0)
    with pytest.raises(StoreExistsError, match="the metadata of the cube's 3 samples differs") as e:
        append(str(b.root), str(dest), workers=0)
    assert "(column 'opera_granule_id')" in str(e.value)
    assert verify(str(dest), workers=0).ok


def test_append_killed_midway_resumes(tmp_path):
    full = write_corpus(tmp_path / "full", n_shards=2, samples_per_shard=[5, 6], seed=8)
    part = tmp_path / "part"
    (part / "data").mkdir(parents=True)
    shutil.copy(full.root / full.shard_paths[0], part / full.shard_paths[0])
    pq.write_table(
        pq.read_table(full.root / "metadata.parquet").slice(0, 5), part / "metadata.parquet"
    )
    dest = tmp_path / "cube.zarr"
    nz.plan_conversion(str(part), str(dest), shard=4).execute(workers=0)
    killed = cli("append", str(full.root), str(dest), "--workers", "0", fault="after-resize")
    assert killed.returncode == -9
    rerun = cli("append", str(full.root), str(dest), "--workers", "0")
    assert rerun.returncode == 0, rerun.stderr
    assert verify(str(dest), src=str(full.root), workers=0).ok
    np.testing.assert_array_equal(nz.open_cube(str(dest)).status.values, 1)


# ---------------------------------------------------------------------------- on S3


S3_FAULTS = [
    "skeleton",
    "after-rtc",
    "after-slope_deg",
    "after-status",
    "after-record",
    "before-consolidate",
]


@pytest.fixture(scope="module")
def s3_corpus(s3_server, corpus):
    """``corpus`` in ``s3://kill/corpus`` on the moto server; yields (src, options JSON)."""
    import json

    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("kill")
    fs.put(str(corpus.root) + "/", "kill/corpus/", recursive=True)
    return "s3://kill/corpus", json.dumps(s3_server)


def _killed_group(*args: str, fault: str) -> subprocess.CompletedProcess:
    """``nasar-zarr ARGS`` in a session of its own, the whole group (the command and
    the LocalCluster's workers) SIGKILLed at ``fault``, wherever that runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASAR_ZARR_FAULT")}
    env.update(NASAR_ZARR_FAULT=fault, NASAR_ZARR_FAULT_SCOPE="group")
    return subprocess.run(
        [sys.executable, "-m", "nasar_zarr", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )


@pytest.mark.parametrize("fault", S3_FAULTS)
def test_kill_9_on_s3_resumes_at_the_first_rerun(s3_corpus, s3_server, corpus, reference, fault):
    """The default cluster (a LocalCluster), the whole run killed at each fault point:
    the first rerun finishes, and the cube equals the local one and its source."""
    import s3fs

    src, options = s3_corpus
    dest = f"s3://kill/{fault}.zarr"
    args = ["convert", src, dest, "--shard", "4", "--storage-options", options]
    killed = _killed_group(*args, fault=fault)
    assert killed.returncode == -9, killed.stderr
    fs = s3fs.S3FileSystem(**s3_server)
    assert fs.exists(f"kill/{fault}.zarr/{LOCK_FILE}")  # a stale lock from the dead run
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "done: 11 written, 0 rejected, 0 pending" in rerun.stdout
    fs.invalidate_cache()
    assert not fs.exists(f"kill/{fault}.zarr/{LOCK_FILE}")
    group = zarr.open_group(
        zarr.storage.FsspecStore.from_url(dest, storage_options=s3_server, read_only=True),
        mode="r",
    )
    reference_group = zarr.open_group(str(reference), mode="r")
    for name in ARRAYS:
        assert group[name][:].tobytes() == reference_group[name][:].tobytes(), name
    checked = cli("verify", src, dest, "--workers", "0", "--storage-options", options)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip().endswith("11 samples checked: OK")


def test_append_on_s3_killed_after_resize_resumes(s3_corpus, s3_server, corpus, tmp_path):
    import s3fs

    src, options = s3_corpus
    part = tmp_path / "part"
    (part / "data").mkdir(parents=True)
    shutil.copy(corpus.root / corpus.shard_paths[0], part / corpus.shard_paths[0])
    pq.write_table(
        pq.read_table(corpus.root / "metadata.parquet").slice(0, 5), part / "metadata.parquet"
    )
    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(part) + "/", "kill/part/", recursive=True)
    dest = "s3://kill/append.zarr"
    nz.plan_conversion("s3://kill/part", dest, shard=4, storage_options=s3_server).execute(
        workers=0
    )
    args = ["append", src, dest, "--storage-options", options]
    killed = _killed_group(*args, fault="after-resize")
    assert killed.returncode == -9, killed.stderr
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "done: 11 written, 0 rejected, 0 pending" in rerun.stdout
    report = verify(dest, src=src, workers=0, storage_options=s3_server)
    assert report.ok, str(report)
