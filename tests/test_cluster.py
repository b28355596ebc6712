"""Safe on any dask cluster: every worker shape, many small tasks, bit-exact cubes.

The tasks share no mutable state, so threads of one worker (what ``dask worker``
starts by default) and processes alike give the same cube. Each cube is compared
with an independent reader (tarfile + numpy) and with ``verify SRC DEST``.
"""

from __future__ import annotations

import pytest

import nasar_zarr as nz
from nasar_zarr.testing import write_corpus
from tests.conftest import assert_store_equals_source, cli, decode_with_card

SHAPES = [(1, 2), (2, 2), (2, 1)]  # (workers, threads per worker)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """264 samples in 4 uneven tars: 33 Zarr shards of 8, so every worker runs many tasks."""
    return write_corpus(
        tmp_path_factory.mktemp("cluster-corpus"),
        n_shards=4,
        samples_per_shard=[70, 61, 64, 69],
        seed=9,
    )


@pytest.fixture(scope="module")
def expected(corpus):
    return decode_with_card(corpus.root)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def cluster(request):
    from distributed import LocalCluster

    workers, threads = request.param
    with LocalCluster(
        n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster


def test_convert_through_scheduler(cluster, corpus, expected, tmp_path):
    dest = tmp_path / "cube.zarr"
    result = cli(
        "convert",
        str(corpus.root),
        str(dest),
        "--shard",
        "8",
        "--scheduler",
        cluster.scheduler_address,
    )
    assert result.returncode == 0, result.stderr
    assert "tasks:     33 (one per Zarr shard; one writer each)" in result.stdout
    assert "done: 264 written, 0 rejected, 0 pending" in result.stdout
    assert_store_equals_source(dest, corpus.root, expected)
    checked = cli("verify", str(corpus.root), str(dest), "--scheduler", cluster.scheduler_address)
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.strip().endswith("33 shards, 264 samples checked: OK")


def test_plan_execute_with_client(cluster, corpus, expected, tmp_path):
    from distributed import Client

    dest = tmp_path / "cube.zarr"
    plan = nz.plan_conversion(str(corpus.root), str(dest), shard=8)
    with Client(cluster) as client:
        ds = plan.execute(client=client)
        assert int((ds.status == 1).sum()) == 264
        report = nz.verify(str(dest), src=str(corpus.root), client=client)
    assert report.ok, str(report)
    assert (report.checked_shards, report.checked_samples) == (33, 264)
    assert_store_equals_source(dest, corpus.root, expected)
