"""Planning is pure: property tests over shard layouts, plus JSON round trip and repr."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nasar_zarr import ConversionPlan, plan_conversion, schema
from nasar_zarr.errors import MetadataError, SourceError
from nasar_zarr.plan import (
    ConvertOptions,
    IndexedTar,
    TarShard,
    assemble_plan,
    shard_bounds,
    task_rows,
)
from nasar_zarr.source import Member, SampleEntry


def _indexed(counts, order=None):
    """Fake tar indexes: shard i holds counts[i] samples keyed k<shard>_<i>."""
    keys, shard_of_row, indexed = [], [], []
    for s, count in enumerate(counts):
        path = schema.shard_name(s)
        entries = [
            SampleEntry(f"k{s}_{i}", (Member(f"k{s}_{i}.npz", 512 * (i + 1), 100),))
            for i in range(count)
        ]
        indexed.append(IndexedTar(TarShard(path, 1000, count), tuple(entries)))
        keys += [e.key for e in entries]
        shard_of_row += [path] * count
    return keys, shard_of_row, indexed


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=6), shard=st.integers(1, 32))
def test_every_sample_in_exactly_one_task_aligned_to_shards(counts, shard):
    keys, shard_of_row, indexed = _indexed(counts)
    plan = assemble_plan(
        "src", "dest", ConvertOptions(shard=shard, inner_chunk=1), keys, shard_of_row, indexed
    )
    n = sum(counts)
    assert [(t.start, t.stop) for t in plan.tasks] == shard_bounds(n, shard)
    rows = np.concatenate([task_rows(t) for t in plan.tasks]) if plan.tasks else np.array([])
    np.testing.assert_array_equal(rows, np.arange(n))  # each row once, in release order
    for task in plan.tasks:
        assert task.start % shard == 0 and task.stop - task.start <= shard
        for span in task.spans:
            assert all(task.start <= r < task.stop for r in span.rows)
            assert [e.key for e in span.entries] == [keys[r] for r in span.rows]
            assert all(shard_of_row[r] == span.shard_path for r in span.rows)
        # a task reads each tar it needs in one span
        paths = [s.shard_path for s in task.spans]
        assert len(paths) == len(set(paths))
    assert ConversionPlan.from_json(plan.to_json()) == plan


def test_metadata_row_without_sample_and_orphan_sample():
    keys, shard_of_row, indexed = _indexed([3, 2])
    keys_missing = keys + ["ghost"]
    shard_of_row_missing = shard_of_row + [schema.shard_name(1)]
    with pytest.raises(SourceError) as err:
        assemble_plan("s", "d", ConvertOptions(), keys_missing, shard_of_row_missing, indexed)
    assert str(err.value) == (
        "data/nasar-train-000001.tar: sample 'ghost': metadata.parquet"
        " lists this sample but no tar holds it"
    )
    plan = assemble_plan(
        "s", "d", ConvertOptions(on_error="skip"), keys_missing, shard_of_row_missing, indexed
    )
    assert [(r.key, r.row) for r in plan.rejected] == [("ghost", 5)]
    orphan_plan = assemble_plan(
        "s", "d", ConvertOptions(on_error="skip"), keys[:-1], shard_of_row[:-1], indexed
    )
    assert [(r.shard, r.key, r.reason, r.row) for r in orphan_plan.rejected] == [
        (schema.shard_name(1), "k1_1", "sample is in the tar but not in metadata.parquet", None)
    ]


def test_duplicate_metadata_keys_are_refused():
    keys, shard_of_row, indexed = _indexed([2])
    with pytest.raises(MetadataError, match="sample_key 'k0_0' appears in more than one row"):
        assemble_plan(
            "s", "d", ConvertOptions(), keys + ["k0_0"], shard_of_row + shard_of_row[:1], indexed
        )


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"shard \(10\) must be a multiple of inner_chunk \(4\)"):
        ConvertOptions(shard=10, inner_chunk=4)
    with pytest.raises(ValueError, match="codec must be one of"):
        ConvertOptions(codec="lzma")


def test_real_corpus_plan(small_corpus, tmp_path):
    plan = plan_conversion(str(small_corpus.root), str(tmp_path / "c.zarr"), shard=8, inner_chunk=2)
    assert plan.n_samples == 32
    assert plan.sample_keys.to_pylist() == small_corpus.metadata["sample_key"].tolist()
    assert [(t.start, t.stop) for t in plan.tasks] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    # tar boundaries at 11 and 18 fall inside Zarr shards 1 and 2
    assert [[s.shard_path[-10:-4] for s in t.spans] for t in plan.tasks] == [
        ["000000"],
        ["000000", "000001"],
        ["000001", "000002"],
        ["000002"],
    ]
    assert [t.samples for t in plan.tar_shards] == [11, 7, 14]
    text = repr(plan)
    assert "samples:   32 from 3 tar shards" in text
    assert "tasks:     4 (one per Zarr shard; one writer each)" in text
    assert ConversionPlan.from_json(plan.to_json()) == plan
