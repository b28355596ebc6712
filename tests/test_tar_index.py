"""The columnar tar index: the fast header walk agrees with tarfile member for member
(every format and damage), the index round-trips, plans stay columnar and small, and the
index kept in the cube is reused only while its tar is unchanged."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from nasar_zarr import ConversionPlan, plan_conversion, source, store
from nasar_zarr.corpus import index_tars, load_index, saved_indexes
from nasar_zarr.errors import SourceChangedError
from nasar_zarr.layout import check_destination
from nasar_zarr.plan import TarShard


def _tar(
    n, fmt=tarfile.USTAR_FORMAT, name=lambda i: f"k{i:05d}.npz", size=lambda i: 1000, dirs=False
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for i in range(n):
            if dirs and i % 7 == 3:
                d = tarfile.TarInfo(f"dir{i}")
                d.type = tarfile.DIRTYPE
                t.addfile(d)
            data = bytes([i % 251]) * size(i)
            info = tarfile.TarInfo(name(i))
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


USTAR = _tar(300)


def _space_padded(data: bytes, every: int) -> bytes:
    """Every ``every``-th header's mode written as other tars do ("   644 "): tarfile's path."""
    out = bytearray(data)
    for i in range(0, 300, every):
        h = i * 1536
        out[h + 100 : h + 108] = b"   644 \0"
        out[h + 148 : h + 156] = b" " * 8
        out[h + 148 : h + 156] = b"%06o\0 " % sum(out[h : h + 512])
    return bytes(out)


CASES = {
    "ustar": USTAR,
    "pax_long_names": _tar(
        200,
        tarfile.PAX_FORMAT,
        name=lambda i: "d/" * 60 + f"k{i}.npz" if i % 5 == 0 else f"k{i}.npz",
    ),
    "gnu_long_names": _tar(
        200,
        tarfile.GNU_FORMAT,
        name=lambda i: "x" * 120 + f"/k{i}.npz" if i % 9 == 0 else f"k{i}.npz",
    ),
    "ustar_prefix": _tar(40, name=lambda i: "p" * 90 + "/" + "q" * 30 + f"/k{i}.npy"),
    "varying_sizes_and_dirs": _tar(200, size=lambda i: 1000 + (i % 3) * 700, dirs=True),
    "two_members_per_sample": _tar(
        200,
        name=lambda i: f"k{i // 2}." + ("npz" if i % 2 else "json"),
        size=lambda i: 3000 if i % 2 else 10,
    ),
    "empty_file": b"",
    "only_zeros": b"\0" * 10240,
    "garbage": b"garbage" * 1000,
    "cut_in_data": USTAR[: 100_000 + 700],
    "cut_in_padding": USTAR[: 512 + 1000 + 3],
    "cut_in_header": USTAR[: 1536 * 5 + 300],
    "bad_header_midway": USTAR[: 1536 * 7] + b"x" * 512 + USTAR[1536 * 8 :],
    "no_end_blocks": USTAR[: 1536 * 300],
    "space_padded_fields": _space_padded(USTAR, 37),
}


def _tarfile_members(path):
    out, error = [], None
    try:
        with tarfile.open(path, "r:") as t:
            for m in t:
                out.append((m.name, m.offset_data, m.size, m.isfile()))
    except tarfile.TarError as exc:
        error = str(exc)
    return out, error


@pytest.mark.parametrize("case", sorted(CASES))
def test_header_walk_agrees_with_tarfile(case, tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(CASES[case])
    expected, error = _tarfile_members(path)
    with source.ByteSource(str(path)) as src:
        got = source.scan_tar(src)
    members = list(
        zip(got.names, got.offsets.tolist(), got.sizes.tolist(), got.isfile.tolist(), strict=True)
    )
    assert members == expected
    assert got.error == error


def test_index_is_columnar_and_round_trips(small_corpus):
    path = str(small_corpus.root / small_corpus.shard_paths[0])
    index = source.index_tar(path)
    entries = source.index_shard(path)
    assert len(index) == 11 and [e.key for e in entries] == index.keys.to_pylist()
    assert source.TarIndex.from_entries(entries) == index
    assert source.TarIndex.from_table(index.to_table()) == index
    assert index.entries() == entries
    picked = index.take(np.array([3, 1]))
    assert picked.entries() == [entries[3], entries[1]]
    with tarfile.open(path) as t:
        npz = [m for m in t if m.name.endswith(".npz")]
    assert index.offset.tolist() == [m.offset_data for m in npz]
    assert index.size.tolist() == [m.size for m in npz]


def test_plan_is_columnar_small_and_round_trips(small_corpus, tmp_path):
    plan = plan_conversion(str(small_corpus.root), str(tmp_path / "c.zarr"), shard=8, inner_chunk=2)
    text = plan.to_json()
    back = ConversionPlan.from_json(text)
    assert back == plan
    assert [t.spans for t in back.tasks] == [t.spans for t in plan.tasks]
    assert len(text) < 6000  # 32 samples: columns, compressed
    task = plan.tasks[1]
    assert [s.rows.tolist() for s in task.spans] == [[8, 9, 10], list(range(11, 16))]
    assert all(isinstance(s.index, source.TarIndex) for s in task.spans)
    with pytest.raises(ValueError, match="not a nasar-zarr plan of format"):
        ConversionPlan.from_json(json.dumps({"format": "other"}))


def test_rejections_print_counts_by_reason(tmp_path):
    from nasar_zarr.testing import write_corpus

    info = write_corpus(tmp_path / "c", n_shards=1, samples_per_shard=8, seed=1)
    import pyarrow.parquet as pq

    table = pq.read_table(info.root / "metadata.parquet")
    keys = [f"ghost{i}" for i in range(len(table))]
    pq.write_table(
        table.set_column(0, "sample_key", __import__("pyarrow").array(keys)),
        info.root / "metadata.parquet",
    )
    plan = plan_conversion(str(info.root), str(tmp_path / "d.zarr"), on_error="skip")
    text = repr(plan).splitlines()
    assert "  rejected:  16 samples at planning" in text
    assert "  by reason:" in text
    assert "            8  metadata.parquet lists this sample but no tar holds it" in text
    assert "            8  sample is in the tar but not in metadata.parquet" in text
    assert len(text) < 20


def test_index_is_kept_with_the_cube_and_reused_only_while_unchanged(small_corpus, tmp_path):
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(small_corpus.root, root)
    dest = tmp_path / "cube.zarr"
    plan = plan_conversion(str(root), str(dest), shard=8, inner_chunk=2)
    plan.execute(workers=0)
    assert saved_indexes(str(dest)) == set(small_corpus.shard_paths)
    for i, tar in enumerate(plan.tar_shards):
        assert (dest / store.index_path(tar.path)).is_file()
        reused = load_index(str(dest), tar.path, tar, plan.options.max_member_bytes)
        assert reused is not None and reused.entries == plan.index.tars[i]
        # over the cap now: indexed again (its problems come from a fresh index)
        assert load_index(str(dest), tar.path, tar, 1000) is None
    first = plan.tar_shards[0]
    touched = TarShard(first.path, first.size, first.samples, "2030-01-01", None)
    assert load_index(str(dest), first.path, touched, 2**26) is None
    again = index_tars(str(root), [t.path for t in plan.tar_shards], cache=str(dest))
    assert [t.entries for t in again] == list(plan.index.tars)
    # a changed tar is indexed again, then refused against the cube's record
    os.utime(root / first.path, (1e9, 1e9))
    replan = plan_conversion(str(root), str(dest), shard=8, inner_chunk=2)
    assert replan.tar_shards[0].mtime != first.mtime
    with pytest.raises(
        SourceChangedError,
        match=r"nasar-train-000000.tar: changed since the cube"
        r" at .* was made from it \(modified ",
    ):
        check_destination(replan, overwrite=False)


def test_indexing_on_the_cluster_gives_the_same_plan(small_corpus, tmp_path, dask_client):
    dest = str(tmp_path / "c.zarr")
    here = plan_conversion(str(small_corpus.root), dest, shard=8, inner_chunk=2)
    there = plan_conversion(
        str(small_corpus.root), dest, shard=8, inner_chunk=2, client=dask_client
    )
    assert there == here
