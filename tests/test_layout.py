"""A cube never mixes two versions of its source: changed tars are refused, naming the tar."""

from __future__ import annotations

import shutil

import pytest

import nasar_zarr as nz
from nasar_zarr import store
from nasar_zarr.errors import SourceChangedError
from nasar_zarr.plan import ConversionPlan
from nasar_zarr.testing import write_corpus
from tests.conftest import cli


def _snapshot(root):
    return {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", n_shards=2, samples_per_shard=[5, 6], seed=17)


def _rewrite_tar(corpus, tmp_path, index: int = 0) -> str:
    """Replace tar ``index`` with one of the same name, keys and size but other pixels."""
    other = write_corpus(tmp_path / "other", n_shards=2, samples_per_shard=[5, 6], seed=99)
    path = corpus.shard_paths[index]
    assert (other.root / path).stat().st_size == (corpus.root / path).stat().st_size
    shutil.copyfile(other.root / path, corpus.root / path)
    return path


def test_resume_refuses_a_tar_rewritten_after_the_first_task(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    args = ["convert", str(corpus.root), str(dest), "--shard", "4", "--workers", "0"]
    assert cli(*args, fault="after-record:1").returncode == -9
    assert (dest / store.task_record_path(0)).exists()
    before = _snapshot(dest)
    path = _rewrite_tar(corpus, tmp_path)
    result = cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"nasar-zarr convert: error: {corpus.root / path}: changed since the cube at {dest} was"
        " made from it (modified "
    )
    assert result.stderr.endswith(
        "; restore the tar, or convert into a new destination (or --overwrite)\n"
    )
    assert result.stderr.count("\n") == 1
    assert _snapshot(dest) == before  # nothing written, not even a lock


def test_a_saved_plan_refuses_a_changed_tar(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    plan = nz.plan_conversion(str(corpus.root), str(dest), shard=4)
    saved = ConversionPlan.from_json(plan.to_json())
    assert saved.tar_shards == plan.tar_shards and plan.tar_shards[0].mtime is not None
    path = _rewrite_tar(corpus, tmp_path, index=1)
    with pytest.raises(SourceChangedError, match="changed since the plan was made") as err:
        saved.execute(workers=0)
    assert str(err.value).startswith(f"{corpus.root / path}: changed since the plan was made")
    assert not dest.exists()


def test_unchanged_source_resumes(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    args = ["convert", str(corpus.root), str(dest), "--shard", "4", "--workers", "0"]
    assert cli(*args, fault="after-record:2").returncode == -9
    assert cli(*args).returncode == 0
    assert cli("verify", str(corpus.root), str(dest), "--workers", "0").returncode == 0


def test_object_store_changes_are_seen_by_etag(small_corpus, s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("etag-src")
    fs.put(str(small_corpus.root) + "/", "etag-src/corpus/", recursive=True)
    src = "s3://etag-src/corpus"
    plan = nz.plan_conversion(src, str(tmp_path / "cube.zarr"), shard=8, storage_options=s3_server)
    first = plan.tar_shards[0]
    assert first.etag and first.size == (small_corpus.root / first.path).stat().st_size
    data = fs.cat_file(f"etag-src/corpus/{first.path}")
    middle = len(data) // 2
    changed = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
    fs.pipe_file(f"etag-src/corpus/{first.path}", changed)  # same size, other bytes
    with pytest.raises(SourceChangedError, match=r"\(ETag [0-9a-f]+ -> [0-9a-f]+\)"):
        plan.execute(workers=0)


def test_skeleton_is_written_consolidated_and_leaves_nothing_in_memory(small_corpus, tmp_path):
    """The skeleton is built in memory and written once, with consolidated metadata
    (tasks change no metadata); the staging area is emptied."""
    import json

    import fsspec

    from nasar_zarr import corpus, layout, plan_conversion, schema

    dest = tmp_path / "cube.zarr"
    plan = plan_conversion(str(small_corpus.root), str(dest), shard=8, inner_chunk=2)
    layout.prepare_store(plan, corpus.MetadataColumns(plan.source), overwrite=False)
    root = json.loads((dest / "zarr.json").read_text())
    arrays = set(root["consolidated_metadata"]["metadata"])
    assert {*schema.VARIABLES, schema.STATUS, schema.RTC_PRESENT, "sample"} <= arrays
    assert all((dest / name / "zarr.json").exists() for name in arrays)
    memory = fsspec.filesystem("memory")
    assert not [k for k in memory.store if "nasar-zarr-skeleton" in k]


def test_finalize_names_a_task_without_its_record(small_corpus, tmp_path):
    """Records are read by name from the plan's task ids, never from a listing, and
    a missing one is an error, not a silent None."""
    from nasar_zarr import layout, plan_conversion
    from nasar_zarr.errors import StoreError

    dest = tmp_path / "cube.zarr"
    plan = plan_conversion(str(small_corpus.root), str(dest), shard=8, inner_chunk=2)
    plan.execute(workers=0)
    (dest / store.task_record_path(2)).unlink()
    with pytest.raises(StoreError) as caught:
        layout.finalize(plan)
    assert str(caught.value) == (
        f"{dest}: task 2 has no record (_nasar/tasks/000002.json): it did not finish;"
        " run the same command again to resume"
    )


def test_flags_are_sharded_like_the_data_variables(small_cube):
    """status and rtc_present: the data variables' inner chunk and shard (zstd + crc32c
    inside), so plain xarray chunks every variable alike; the fast reader decodes them
    to zarr-python's values."""
    import numpy as np
    import xarray as xr
    import zarr

    from nasar_zarr import backend

    group = zarr.open_group(str(small_cube), mode="r")
    for name in ("status", "rtc_present"):
        array = group[name]
        assert (array.shards[0], array.chunks[0]) == (group["rtc"].shards[0], 2) == (8, 2)
        layout = backend.array_layout(array, str(small_cube / name))
        assert layout is not None and layout.sharded and layout.checksum
        assert (layout.shard, layout.inner, layout.compressor) == (8, 2, "zstd")
        np.testing.assert_array_equal(backend.read_rows(layout, slice(None)), array[:])
    # the 1-D metadata coordinates are one stored chunk each: xarray warns that it splits
    # them (docs/ANALYSIS.md: what that costs)
    with pytest.warns(UserWarning, match="separate the stored chunks"):
        plain = xr.open_zarr(str(small_cube), chunks={"sample": 8})
    assert plain.chunks["sample"] == (8, 8, 8, 8)
    stored = xr.open_zarr(str(small_cube), chunks={})  # the stored (inner) chunks
    assert stored.status.chunks[0] == stored.rtc.chunks[0] == (2,) * 16
