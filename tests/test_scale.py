"""The control plane at a small size, on the paths a million samples take: tiny undecodable
members, every sample rejected: a bounded terminal summary with counts by reason, a Parquet
report of every rejection, shards that hold nothing are not written, and verify passes."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import nasar_zarr as nz
from nasar_zarr import schema, store
from nasar_zarr.api import verify
from nasar_zarr.cli import main
from nasar_zarr.layout import REPORT_EXAMPLES, reason_kind
from nasar_zarr.testing import make_metadata

COUNTS = [700, 500, 300]  # 1,500 samples: more than REPORT_EXAMPLES


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """Tars of 1,000-byte members that are not npz files, and their metadata."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "data").mkdir()
    payload = b"\x00not an npz\x00" * 83 + b"\x00" * 4
    key = 0
    for s, count in enumerate(COUNTS):
        with tarfile.open(root / schema.shard_name(s), "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(count):
                info = tarfile.TarInfo(f"nasar_{key:09d}.npz")
                info.size = len(payload)
                tar.addfile(info, __import__("io").BytesIO(payload))
                key += 1
    frame = make_metadata(np.random.default_rng(0), COUNTS)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), root / "metadata.parquet")
    return root


def test_a_cube_of_rejected_samples_is_reported_briefly_and_costs_nothing(
    tiny_corpus, tmp_path, capsys
):
    dest = tmp_path / "cube.zarr"
    code = main(
        [
            "convert",
            str(tiny_corpus),
            str(dest),
            "--on-error",
            "skip",
            "--workers",
            "0",
            "--shard",
            "64",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    n = sum(COUNTS)
    assert f"done: 0 written, {n:,} rejected, 0 pending -> {dest}" in out
    reason = "corrupt npz member: File is not a zip file"
    assert out.count(f"  ... and {n - 20:,} more rejected; by reason:") == 1
    assert f"  {n:>11,}  {reason}" in out
    assert sum(line.startswith("  rejected ") for line in out) == 20
    assert len(out) < 50
    report = json.loads((dest / store.REJECTIONS_FILE).read_text())
    assert report["counts"] == {"rejected": n, "nonfinite": 0}
    assert report["by_reason"] == {reason: n}
    assert len(report["rejected"]) == REPORT_EXAMPLES and report["complete"] is False
    every = pq.read_table(dest / store.REJECTIONS_PARQUET)
    assert every.num_rows == n and every.column("row").to_pylist() == list(range(n))
    assert set(every.column("reason").to_pylist()) == {reason}
    # nothing but fill values: no data shard object was written, and the cube reads NaN
    for name in schema.VARIABLES:
        assert not (dest / name / "c").exists()
    ds = nz.open_cube(str(dest))
    assert np.isnan(ds.dem.values).all()
    assert (ds.status.values == schema.STATUS_REJECTED).all()
    assert verify(str(dest), workers=0).ok
    assert verify(str(dest), src=str(tiny_corpus), workers=0).ok


def test_reasons_are_counted_by_kind():
    assert reason_kind("truncated tar: member 'k1.npz' has 1,024 of 2,048 bytes") == (
        "truncated tar: member '…' has N of N bytes"
    )
    assert reason_kind("metadata.parquet lists this sample but no tar holds it") == (
        "metadata.parquet lists this sample but no tar holds it"
    )
