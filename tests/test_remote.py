"""Converting from where a release lives: S3 (a real moto server) and HTTPS-like hosts (a
loopback server with Range), with every HTTP request counted at a proxy in front of them.

Planning reads tar headers only (<= 1% of the corpus), execute reads each byte once in
a few large ranges and writes each shard object with one PUT, a kept index makes
a second plan read no headers, and the cubes are byte-identical to the local one.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from nasar_zarr import plan_conversion, store
from nasar_zarr.testing import write_corpus
from nasar_zarr.testing.http import CountingProxy, RangeServer

N_SAMPLES = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(
        tmp_path_factory.mktemp("remote-corpus"), n_shards=2, samples_per_shard=[7, 5], seed=3
    )


@pytest.fixture(scope="module")
def local_cube(corpus, tmp_path_factory):
    dest = tmp_path_factory.mktemp("local") / "cube.zarr"
    plan_conversion(str(corpus.root), str(dest), shard=4, inner_chunk=2).execute(workers=0)
    return dest


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    """The corpus in ``s3://bkt/corpus`` behind a counting proxy; yields (options, proxy)."""
    import s3fs

    with CountingProxy(s3_server["endpoint_url"]) as proxy:
        options = {**s3_server, "endpoint_url": proxy.url}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bkt")
        fs.put(str(corpus.root) + "/", "bkt/corpus/", recursive=True)
        yield options, proxy


def _corpus_bytes(root: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file())


def _objects(fs, root: str) -> dict[str, bytes]:
    """Every data object of a cube (not the root's attributes, not the bookkeeping)."""
    root = root.rstrip("/")
    return {
        p[len(root) + 1 :]: fs.cat_file(p)
        for p in fs.find(root)
        if p[len(root) + 1 :] != "zarr.json" and not p[len(root) + 1 :].startswith("_nasar")
    }


def test_s3_plan_reads_headers_execute_reads_once_and_puts_once(s3, corpus, local_cube):
    import s3fs

    options, proxy = s3
    proxy.reset()
    plan = plan_conversion(
        "s3://bkt/corpus", "s3://bkt/cube.zarr", shard=4, inner_chunk=2, storage_options=options
    )
    planning = proxy.reset()
    tar_gets = [r for r in planning if r.method == "GET" and r.path.endswith(".tar")]
    assert {r.bytes_out for r in tar_gets} == {512}  # headers only, no read-ahead
    assert len(tar_gets) <= 2 * N_SAMPLES + 6
    plan_bytes = sum(r.bytes_out for r in planning)
    assert plan_bytes <= 0.01 * _corpus_bytes(corpus.root)

    plan.execute(workers=0)
    executing = proxy.reset()
    tar_bytes = _corpus_bytes(corpus.root, "data/*.tar")
    read = sum(r.bytes_out for r in executing if r.path.endswith(".tar"))
    assert tar_bytes * 0.99 <= read <= 1.05 * tar_bytes
    # besides the reads, one HEAD per tar: the check that it did not change since planning
    assert Counter(
        (r.method, r.path) for r in executing if r.path.endswith(".tar") and r.method != "GET"
    ) == {("HEAD", f"/bkt/corpus/{path}"): 1 for path in corpus.shard_paths}
    # one Zarr shard object per variable and task: written with one PUT, never HEAD/LIST/GET
    shard_objects = Counter(
        (r.method, r.path)
        for r in executing
        if "/c/" in r.path
        and r.path.split("/")[3] in {"rtc", "inc_angle", "ifg", "coh", "dem", "slope_deg"}
    )
    assert len(shard_objects) == 6 * 3
    assert set(shard_objects.values()) == {1} and {m for m, _ in shard_objects} == {"PUT"}

    fs = s3fs.S3FileSystem(**options)
    assert _objects(fs, "bkt/cube.zarr") == _objects(
        __import__("fsspec").filesystem("file"), str(local_cube)
    )

    # The index was kept with the cube: planning again reads no tar header.
    assert fs.exists(f"bkt/cube.zarr/{store.index_path(plan.tar_shards[0].path)}")
    proxy.reset()
    again = plan_conversion(
        "s3://bkt/corpus", "s3://bkt/cube.zarr", shard=4, inner_chunk=2, storage_options=options
    )
    replanning = proxy.reset()
    assert again == plan
    assert [r for r in replanning if r.method == "GET" and r.path.endswith(".tar")] == []


def test_https_source_lists_from_metadata_and_gives_the_same_cube(corpus, local_cube, tmp_path):
    import fsspec

    with RangeServer(corpus.root) as server:
        dest = tmp_path / "cube.zarr"
        plan = plan_conversion(server.url, str(dest), shard=4, inner_chunk=2)
        planning = server.reset()
        assert [t.path for t in plan.tar_shards] == list(corpus.shard_paths)
        tar_gets = [r for r in planning if r.method == "GET" and r.path.endswith(".tar")]
        assert tar_gets and {r.bytes_out for r in tar_gets} == {512}
        assert not [r for r in planning if r.path.endswith("/data") or r.path.endswith("/")]
        plan.execute(workers=0)
        read = sum(r.bytes_out for r in server.reset() if r.path.endswith(".tar"))
    assert read <= 1.05 * _corpus_bytes(corpus.root, "data/*.tar")
    local = fsspec.filesystem("file")
    assert _objects(local, str(dest)) == _objects(local, str(local_cube))


def test_indexing_over_a_slow_link_batches_requests(tmp_path):
    """With 20 ms per request, header reads go out concurrently once sizes repeat."""
    import time

    from nasar_zarr import source
    from nasar_zarr.testing import write_tar

    write_tar(tmp_path / "s.tar", [(f"k{i:04d}.npz", b"x" * 1000) for i in range(300)])
    with RangeServer(tmp_path, delay=0.02) as server:
        start = time.perf_counter()
        index = source.index_tar(f"{server.url}/s.tar")
        elapsed = time.perf_counter() - start
        requests = server.reset()
    assert index.keys.to_pylist() == [f"k{i:04d}" for i in range(300)]
    # tiny members: the headers of neighbours come in one range (up to 1 MiB) each; the
    # size comes with the first block (Content-Range), not a HEAD
    gets = [r for r in requests if r.method == "GET"]
    assert [r.method for r in requests if r.method != "GET"] == []
    assert len(gets) <= 12
    assert sum(r.bytes_out for r in gets) <= 2 * (tmp_path / "s.tar").stat().st_size
    assert elapsed < 0.02 * 300 / 2  # one header at a time: >= 6 s (20 ms each)


def test_a_truncated_tar_reads_the_same_over_http(corpus, tmp_path):
    """Short reads at the end of a tar are what finds it truncated, locally and remotely."""
    from nasar_zarr import source
    from nasar_zarr.errors import ShardCorruptError

    tar = tmp_path / "a.tar"
    data = (corpus.root / corpus.shard_paths[0]).read_bytes()
    tar.write_bytes(data)
    whole = source.index_tar(str(tar))
    tar.write_bytes(data[: len(data) - 600_000])
    found: dict[str, tuple] = {}
    with RangeServer(tmp_path) as server:
        for where, url in (("local", str(tar)), ("http", f"{server.url}/a.tar")):
            problems: list = []
            index = source.index_tar(url, shard="a.tar", problems=problems)
            with pytest.raises(ShardCorruptError) as caught:
                list(source.read_index(url, whole, shard="a.tar"))
            found[where] = (index, [str(p) for p in problems], str(caught.value))
        requests = server.reset()
    assert found["http"] == found["local"]
    index, problems, error = found["local"]
    assert len(index) == 6 and problems == [
        "a.tar: sample 'nasar_000000006': truncated tar: member 'nasar_000000006.npz' needs"
        f" bytes up to {int(whole.offset[-1] + whole.size[-1]):,} but the file has"
        f" {len(data) - 600_000:,}"
    ]
    assert error.startswith("a.tar: sample 'nasar_000000006': truncated tar: member")
    assert {r.method for r in requests} == {"GET"}  # no HEAD for the size


def test_open_binary_reads_a_remote_tar_with_tarfile(corpus):
    """tarfile's own reader over HTTP: header blocks only, no HEAD for the size."""
    import tarfile

    from nasar_zarr import source

    path = corpus.shard_paths[0]
    with tarfile.open(corpus.root / path) as tf:
        names = tf.getnames()
        first = tf.extractfile(tf.getmembers()[0]).read()  # type: ignore[union-attr]
    with RangeServer(corpus.root) as server:
        with (
            source.open_binary(f"{server.url}/{path}") as f,
            tarfile.open(fileobj=f, mode="r:") as tf,
        ):
            assert tf.getnames() == names
            listing = server.reset()
            assert tf.extractfile(tf.getmembers()[0]).read() == first  # type: ignore[union-attr]
    assert {(r.method, r.status) for r in listing} == {("GET", 206)}
    assert {r.bytes_out for r in listing} == {512}


def _rewrite(path: Path) -> None:
    """The same bytes written again as a new file put in place at once (a new ETag), as
    an upload replaces an object: a server never serves half of it."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(path.read_bytes())
    os.utime(new, ns=(0, 10**9))
    os.replace(new, path)


def test_a_tar_replaced_between_two_reads_fails_naming_it(corpus, tmp_path):
    """A tar's first read records its version (ETag); the later ones ask for it (If-Match)."""
    from nasar_zarr import source
    from nasar_zarr.ranges import ObjectChangedError

    tar = tmp_path / "a.tar"
    shutil.copyfile(corpus.root / corpus.shard_paths[0], tar)
    before = tar.stat()
    with RangeServer(tmp_path) as server, source.ByteSource(f"{server.url}/a.tar") as src:
        assert src.read(0, 512) == tar.read_bytes()[:512]
        assert src.version == f'"{before.st_size:x}-{before.st_mtime_ns:x}"'
        _rewrite(tar)
        with pytest.raises(ObjectChangedError) as caught:
            src.read(512, 512)
        assert [(r.method, r.status) for r in server.reset()] == [("GET", 206), ("GET", 412)]
    assert str(caught.value) == (
        f"{server.url}/a.tar: the tar changed while it was being read (it is no longer the"
        f" version {src.version}); plan the conversion again"
    )


def test_read_index_gives_one_version_then_the_error(corpus, tmp_path):
    """Ranges are fetched ahead while samples are decoded; a change mid-tar stops the
    samples at the last range of the old version."""
    from nasar_zarr import source
    from nasar_zarr.ranges import ObjectChangedError

    tar = tmp_path / "a.tar"
    shutil.copyfile(corpus.root / corpus.shard_paths[0], tar)
    index = source.index_tar(str(tar))
    local = [arrays["dem"].tobytes() for _, arrays in source.read_index(str(tar), index)]
    assert len(local) == 7
    with RangeServer(tmp_path) as server:
        # one sample per range: the first 3 ranges are asked for before one is decoded
        samples = source.read_index(f"{server.url}/a.tar", index, read_bytes=1)
        got = [next(samples)[1]["dem"].tobytes()]
        _rewrite(tar)
        with pytest.raises(ObjectChangedError, match=r"/a.tar: the tar changed while it was"):
            for _, arrays in samples:
                got.append(arrays["dem"].tobytes())
        statuses = [r.status for r in server.reset()]
    assert 1 <= len(got) <= 3 and got == local[: len(got)]  # the old version only
    # the first range alone (its ETag is the one asked for), then 2 in flight at a time:
    # those asked for after the change fail the precondition
    assert statuses[0] == 206 and 412 in statuses and set(statuses) == {206, 412}
    assert statuses.count(206) >= len(got)


@pytest.mark.parametrize("where", ["http", "s3"])
def test_a_tar_replaced_after_planning_fails_the_tasks_reading_it(where, corpus, s3, tmp_path):
    """A task reads each tar at the version the plan saw (If-Match with the planned ETag):
    a tar replaced after execute's check fails the task by name before it writes."""
    import s3fs

    from nasar_zarr import corpus as corpus_mod
    from nasar_zarr import layout, task
    from nasar_zarr.ranges import ObjectChangedError

    replaced = corpus.shard_paths[0]
    other = (corpus.root / corpus.shard_paths[1]).read_bytes()
    if where == "http":
        root = tmp_path / "corpus"
        shutil.copytree(corpus.root, root)
        server = RangeServer(root).start()
        src, options = server.url, {}
    else:
        options, _ = s3
        fs = s3fs.S3FileSystem(**options)
        fs.put(str(corpus.root) + "/", "bkt/replaced/", recursive=True)
        src = "s3://bkt/replaced"
    try:
        dest = tmp_path / "cube.zarr"
        plan = plan_conversion(src, str(dest), shard=4, inner_chunk=2, storage_options=options)
        # another tar takes its place once execute has checked the tars (as a worker sees it)
        if where == "http":
            (root / (replaced + ".new")).write_bytes(other)
            os.replace(root / (replaced + ".new"), root / replaced)
        else:
            fs.pipe(f"bkt/replaced/{replaced}", other)
        metadata = corpus_mod.MetadataColumns(plan.source, plan.storage_options)
        layout.prepare_store(plan, metadata, overwrite=False)
        with pytest.raises(ObjectChangedError) as caught:
            task.run_plan_tasks(plan, done=set(), lock_token=None, workers=0)
    finally:
        if where == "http":
            server.stop()
    etag = task.planned_versions(plan)[replaced]
    assert str(caught.value) == (
        f"{src}/{replaced}: the tar changed while it was being read (it is no longer the"
        f" version {etag}); plan the conversion again"
    )
    # the first task reads the replaced tar: it wrote nothing, so a rerun redoes it
    assert not (dest / store.task_record_path(0)).exists()
    assert not (dest / "rtc/c/0/0/0/0/0/0").exists()


@pytest.mark.skipif(
    not os.environ.get("NASAR_ZARR_HF_DATASET"),
    reason="set NASAR_ZARR_HF_DATASET=hf://datasets/<org>/<name> (network)",
)
def test_hub_dataset_plans():  # pragma: no cover - needs the network
    plan = plan_conversion(os.environ["NASAR_ZARR_HF_DATASET"], "memory://nasar.zarr")
    assert plan.n_samples > 0
