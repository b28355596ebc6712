"""Requests of a conversion on S3, counted at a proxy in front of moto: each object written
with one PUT and nothing else, zarr.json written once and never read back but the
root's, metadata.parquet one GET per step, and the fixed part bounded."""

from __future__ import annotations

from collections import Counter

import pytest

from nasar_zarr import plan_conversion
from nasar_zarr.testing import write_corpus
from nasar_zarr.testing.s3 import MotoS3, objects_written, request_kind, tally

N_TARS, PER_TAR = 2, 8


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import s3fs

    root = tmp_path_factory.mktemp("req-corpus")
    write_corpus(root, n_shards=N_TARS, samples_per_shard=PER_TAR, seed=11)
    with MotoS3() as server:
        fs = s3fs.S3FileSystem(**server.storage_options)
        fs.mkdir("req")
        fs.put(str(root) + "/", "req/corpus/", recursive=True)
        yield server


def _convert(s3, dest: str, shard: int) -> list:
    s3.proxy.reset()
    plan = plan_conversion(
        "s3://req/corpus", dest, shard=shard, inner_chunk=4, storage_options=s3.storage_options
    )
    plan.execute(workers=0)
    return s3.proxy.reset()


def test_each_object_is_one_put_and_nothing_else(s3):
    requests = _convert(s3, "s3://req/four.zarr", shard=4)  # 4 tasks
    cube = [r for r in requests if r.path.startswith("/req/four.zarr/")]
    per_object = Counter((r.method, r.path) for r in cube if request_kind(r) == "chunk")
    data_chunks = {p for m, p in per_object if "/c/" in p and p.split("/")[3] != "sample"}
    # every chunk object the tasks wrote (8 arrays x 4 tasks): one PUT, no HEAD, no GET
    task_chunks = {
        p
        for p in data_chunks
        if p.split("/")[3]
        in {"rtc", "inc_angle", "ifg", "coh", "dem", "slope_deg", "rtc_present", "status"}
    }
    assert len(task_chunks) == 8 * 4
    for path in task_chunks:
        assert [r.method for r in cube if r.path == path] == ["PUT"], path
    # every zarr.json written once; only the root's read (by the tasks' client, finalize
    # and open_cube), none asked for with HEAD
    docs = Counter((r.method, r.path) for r in cube if request_kind(r) == "zarr.json")
    written = [p for (m, p) in docs if m == "PUT"]
    assert len(written) == len(set(written)) == 33  # root, 8 arrays, 24 coordinates
    root = "/req/four.zarr/zarr.json"
    assert {k for k in docs if k[0] != "PUT"} <= {("GET", root), ("HEAD", root)}
    # read by the tasks' client, finalize, and open_cube
    assert docs[("GET", root)] + docs[("HEAD", root)] <= 5
    assert all(docs[("PUT", p)] == 1 for p in written)
    assert ("HEAD", "/req/four.zarr/zarr.json") not in docs
    # task records: one PUT each, never read back (the tasks returned them)
    records = [r for r in cube if request_kind(r) == "task-record"]
    assert sorted((r.method, r.path) for r in records) == [
        ("PUT", f"/req/four.zarr/_nasar/tasks/{i:06d}.json") for i in range(4)
    ]
    # metadata.parquet: one GET to plan, one to execute; no HEAD
    meta = Counter(r.method for r in requests if request_kind(r) == "metadata.parquet")
    assert meta == {"GET": 2}
    # the lock: taken (1 PUT), checked by each task (4 GETs), released (1 GET, 1 DELETE)
    lock = Counter(r.method for r in requests if request_kind(r) == "lock")
    assert lock == {"PUT": 1, "GET": 5, "DELETE": 1}
    # listings: the saved tar indexes while planning, the tar listing, and the
    # destination (empty? leftovers to clear?), nothing per task
    assert Counter(request_kind(r) for r in requests)["list"] <= 6


def test_requests_grow_by_little_more_than_one_per_object(s3):
    one = _convert(s3, "s3://req/one.zarr", shard=16)  # 1 task
    four = _convert(s3, "s3://req/four-b.zarr", shard=4)  # 4 tasks
    extra_objects = len(objects_written(four)) - len(objects_written(one))
    assert extra_objects == 3 * 9  # 8 chunk objects + 1 record per extra task
    extra = Counter(f"{r.method} {request_kind(r)}" for r in four)
    extra.subtract(Counter(f"{r.method} {request_kind(r)}" for r in one))
    # each extra task: 8 chunk PUTs, its record, its lock check; 2 tars read in 4
    # pieces instead of 2
    assert +extra == {"PUT chunk": 24, "PUT task-record": 3, "GET lock": 3, "GET tar": 2}
    marginal = (len(four) - len(one)) / extra_objects
    assert marginal == 32 / 27 <= 1.2
    fixed = len(one) - marginal * len(objects_written(one))
    assert fixed <= 150, tally(one)
