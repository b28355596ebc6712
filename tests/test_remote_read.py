"""One read path for local and remote cubes: the same bytes, only the needed ones.

The session cube is served read-only over loopback HTTP (range GETs, ETags, a
static host like the Hub's resolve URLs) and uploaded to a real S3 server
(moto) behind a counting proxy; every read is compared bit for bit with the
local cube, and requests and bytes are counted.
"""

from __future__ import annotations

import os
import pickle
import shutil

import dask
import numpy as np
import pytest
import xarray as xr

from nasar_zarr import backend, open_cube, ranges, sharding
from nasar_zarr.testing.http import CountingProxy, RangeServer

pytestmark = pytest.mark.usefixtures("collect_garbage")  # see conftest

VARIABLES = ["rtc", "inc_angle", "ifg", "coh", "dem", "slope_deg", "rtc_present", "status"]


@pytest.fixture(scope="module")
def http_cube(small_cube):
    """The session cube behind a Range server: yields (url, server)."""
    with RangeServer(small_cube.parent) as server:
        yield f"{server.url}/{small_cube.name}", server


@pytest.fixture(scope="module")
def s3_cube(s3_server, small_cube):
    """The session cube in s3://remote-read/nasar.zarr behind a counting proxy."""
    import s3fs

    with CountingProxy(s3_server["endpoint_url"]) as proxy:
        options = {**s3_server, "endpoint_url": proxy.url}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("remote-read")
        fs.put(str(small_cube) + "/", "remote-read/nasar.zarr/", recursive=True)
        yield "s3://remote-read/nasar.zarr", options, proxy


@pytest.fixture(scope="module")
def local(small_cube):
    return open_cube(str(small_cube)).compute()


def _remote(request, http_cube, s3_cube):
    if request.param == "http":
        url, _ = http_cube
        return url, None
    url, options, _ = s3_cube
    return url, options


@pytest.fixture(params=["http", "s3"])
def remote(request, http_cube, s3_cube):
    backend.INDEX_CACHE._reset()
    return _remote(request, http_cube, s3_cube)


def test_open_cube_remote_equals_local_bit_for_bit(remote, local):
    url, options = remote
    ds = open_cube(url, storage_options=options)
    for name in VARIABLES:
        got = ds[name].values
        assert got.tobytes() == local[name].values.tobytes(), name
    for name in ("rtc", "coh", "status"):
        picked = ds[name].isel(sample=[30, 2, 17]).values
        assert picked.tobytes() == local[name].values[[30, 2, 17]].tobytes()
    lazy = open_cube(url, storage_options=options, chunks=None)
    assert lazy.rtc.isel(sample=5).values.tobytes() == local.rtc.values[5].tobytes()


def test_opening_a_remote_cube_takes_two_gets(http_cube, s3_cube, local):
    url, server = http_cube
    server.reset()
    ds = open_cube(url)
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in server.reset()] == [
        ("GET", "zarr.json"),  # the consolidated metadata
        ("GET", "0"),  # the sample coordinate (the only index)
    ]
    # the time coordinates are decoded when first read (one GET), as xarray would decode
    # them, and kept
    _ = ds.prime_datetime.values, ds.prime_datetime.isel(sample=[3]).values
    assert [r.path.split("/")[-3] for r in server.reset()] == ["prime_datetime"]
    for name in ("prime_datetime", "secondary_datetime"):
        assert ds[name].dtype == local[name].dtype
        assert ds[name].values.tobytes() == local[name].values.tobytes()
        assert ds[name].isel(sample=[7, 2]).values.tobytes() == (
            local[name].values[[7, 2]].tobytes()
        )
    s3_url, options, proxy = s3_cube
    proxy.reset()
    open_cube(s3_url, storage_options=options)
    assert [r.method for r in proxy.reset()] == ["GET", "GET"]


def test_remote_arrays_pickle_and_read_in_a_fresh_index_cache(remote, local):
    url, options = remote
    ds = open_cube(url, storage_options=options)
    back = pickle.loads(pickle.dumps(ds))
    backend.INDEX_CACHE._reset()
    assert back.dem.isel(sample=[4]).values.tobytes() == local.dem.values[[4]].tobytes()


def test_scattered_isel_over_http_reads_only_the_picked_chunks(http_cube, local):
    url, server = http_cube
    backend.INDEX_CACHE._reset()
    ds = open_cube(url, chunks=16)  # dask chunks of two shards
    server.reset()
    with dask.config.set(scheduler="threads"):  # this process's index cache, not a worker's
        got = ds.rtc.isel(sample=[1, 12, 29]).values
    requests = server.reset()
    assert got.tobytes() == local.rtc.values[[1, 12, 29]].tobytes()
    assert {r.method for r in requests} == {"GET"}  # no HEAD, no listing
    index_bytes = sharding.index_size(4)
    tails = [r for r in requests if r.range == f"bytes=-{index_bytes}"]
    chunks = [r for r in requests if r not in tails]
    assert len(tails) == 3  # the index of each of the 3 shards touched
    assert len(chunks) == 3  # one inner chunk each
    needed = 0
    for row in (1, 12, 29):
        shard, c = divmod(row // 2, 4)
        data = (url_path(url, server) / "rtc" / f"c/{shard}/0/0/0/0/0").read_bytes()
        offset, nbytes = sharding.parse_index(data, 4)[c]
        needed += int(nbytes)
    assert sum(r.bytes_out for r in chunks) == needed
    # the indexes are cached: the same selection again reads the chunks only
    server.reset()
    with dask.config.set(scheduler="threads"):
        _ = ds.rtc.isel(sample=[1, 12, 29]).values
    assert len(server.reset()) == 3


def url_path(url, server):
    return server.root / url.rsplit("/", 1)[1]


def test_s3_reads_are_gets_only(s3_cube, local):
    url, options, proxy = s3_cube
    backend.INDEX_CACHE._reset()
    ds = open_cube(url, storage_options=options)
    proxy.reset()
    with dask.config.set(scheduler="threads"):
        got = ds.coh.isel(sample=[3, 20]).values
    requests = proxy.reset()
    assert got.tobytes() == local.coh.values[[3, 20]].tobytes()
    assert {r.method for r in requests} == {"GET"}
    assert len(requests) == 4  # 2 indexes + 2 inner chunks


def test_an_object_replaced_under_a_reader_is_an_error(small_cube, tmp_path, local):
    cube = tmp_path / "nasar.zarr"
    shutil.copytree(small_cube, cube)
    backend.INDEX_CACHE._reset()
    with RangeServer(tmp_path) as server:
        ds = open_cube(f"{server.url}/nasar.zarr", chunks=None)
        assert ds.rtc.isel(sample=1).values.tobytes() == local.rtc.values[1].tobytes()
        # another shard object of the same size takes its place: index cached, ETag differs
        target = cube / "rtc" / "c/0/0/0/0/0/0"
        data = target.read_bytes()
        os.utime(target, ns=(0, 10**9))
        target.write_bytes(data)
        with pytest.raises(ranges.ObjectChangedError, match=r"rtc/c/0/0/0/0/0/0: the object"):
            _ = ds.rtc.isel(sample=3).values
        # the cache let go of the old index: the next read is of the new version
        assert ds.rtc.isel(sample=3).values.tobytes() == local.rtc.values[3].tobytes()


def test_coalesce_merges_neighbours_only():
    requests = [
        ("a", 0, 10, None),
        ("a", 20, 30, None),
        ("b", 0, 5, None),
        ("a", 10**6, 10**6 + 1, None),
    ]
    merged = ranges.coalesce(requests)
    assert [m.request for m in merged] == [
        ("a", 0, 30, None),
        ("a", 10**6, 10**6 + 1, None),
        ("b", 0, 5, None),
    ]
    assert [m.members for m in merged] == [(0, 1), (3,), (2,)]


def test_hf_urls_become_resolve_urls():
    assert (
        ranges._http_url("hf://datasets/org/nasar@v1/nasar.zarr/rtc/zarr.json")
        == "https://huggingface.co/datasets/org/nasar/resolve/v1/nasar.zarr/rtc/zarr.json"
    )


def test_plain_xarray_reads_the_http_cube(http_cube, local):
    url, _ = http_cube
    ds = xr.open_zarr(url)
    np.testing.assert_array_equal(ds.dem.values, local.dem.values)


def test_a_one_worker_two_thread_cluster_reduces_a_remote_cube(remote, local):
    """The fast remote reader inside a real dask worker process (its own clients and
    index cache, made there), over S3 and HTTP: the sums equal the local ones."""
    from distributed import Client, LocalCluster

    url, options = remote
    ds = open_cube(url, storage_options=options)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        got = client.compute([ds[v].astype("float64").sum() for v in ("rtc", "coh", "dem")])
        values = [float(f.result()) for f in got]
    expected = [float(local[v].astype("float64").sum()) for v in ("rtc", "coh", "dem")]
    assert values == expected


def test_cube_reader_remote_equals_local_in_two_round_trips(http_cube, small_cube):
    from nasar_zarr import CubeReader

    url, server = http_cube
    backend.INDEX_CACHE._reset()
    remote, here = CubeReader(url), CubeReader(str(small_cube))
    assert remote.engine == "shards" and remote.fork_safe
    server.reset()
    got = remote[[30, 2, 17, 3]]
    requests = server.reset()
    want = here[[30, 2, 17, 3]]
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    # round 1: the index of each touched shard of each variable; round 2: the chunks
    assert {r.method for r in requests} == {"GET"}
    assert remote[5]["rtc"].tobytes() == here[5]["rtc"].tobytes()
    assert len(server.reset()) == 8  # indexes cached: one range per variable


@pytest.mark.parametrize("kind", ["RTCDataset", "InSARDataset"])
def test_datasets_on_a_remote_cube_equal_the_local_ones(kind, remote, small_cube):
    torch = pytest.importorskip("torch")
    from nasar_zarr import torch as nz_torch

    url, options = remote
    cls = getattr(nz_torch, kind)
    far, near = cls(url, storage_options=options), cls(str(small_cube))
    assert len(far) == len(near)
    for got, want in zip(far.__getitems__([0, 9, 31]), near.__getitems__([0, 9, 31]), strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if torch.is_tensor(value):
                assert torch.equal(got[key], value), key
            else:
                assert got[key] == value, key


def test_a_forked_dataloader_reads_a_remote_cube(http_cube, small_cube):
    """PyTorch's default start method on Linux, after the parent read the remote cube."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from nasar_zarr.torch import InSARDataset

    url, _ = http_cube
    far, near = InSARDataset(url), InSARDataset(str(small_cube))
    _ = far[0]  # the parent read first: index cache and fsspec client made here
    loader = DataLoader(
        far, batch_size=8, num_workers=2, multiprocessing_context="fork", shuffle=False
    )
    seen = 0
    for batch in loader:
        want = near.__getitems__(batch["index"].tolist())
        for k, item in enumerate(want):
            assert torch.equal(batch["coh_view_0"][k], item["coh_view_0"])
            assert torch.equal(batch["prime_rtc_view_1"][k], item["prime_rtc_view_1"])
        seen += len(batch["index"])
    assert seen == len(near)


def test_our_loader_reads_each_workers_next_batch_ahead(http_cube, small_cube):
    """dataloader() hints each batch's successor on the same worker; the remote dataset
    reads it while the batch is transformed: same batches, no extra request."""
    torch = pytest.importorskip("torch")
    from nasar_zarr.torch import InSARDataset, ShardAwareSampler, dataloader

    url, server = http_cube
    near = InSARDataset(str(small_cube))
    counts = {}
    for ahead in (False, None):  # None: the default, on for a remote cube
        far = InSARDataset(url, read_ahead=ahead)
        sampler = ShardAwareSampler(far, seed=3)
        backend.INDEX_CACHE._reset()
        server.reset()
        order = []
        with dataloader(far, batch_size=4, sampler=sampler, num_workers=2) as loader:
            for batch in loader:
                want = near.__getitems__(batch["index"].tolist())
                for k, item in enumerate(want):
                    for key in ("prime_rtc_view_0", "ifg_view_1", "slope_view_0"):
                        assert torch.equal(batch[key][k], item[key]), key
                order += batch["index"].tolist()
        assert order == sampler.epoch_indices(0).tolist()
        counts[ahead] = sorted((r.path, r.range) for r in server.reset())
    assert counts[None] == counts[False]  # every hint was right: nothing read twice


def test_a_wrong_hint_reads_the_asked_batch(http_cube, small_cube):
    torch = pytest.importorskip("torch")
    from nasar_zarr.torch import InSARDataset
    from nasar_zarr.torch.sampler import HintedBatch

    url, server = http_cube
    far, near = InSARDataset(url), InSARDataset(str(small_cube))
    assert far._read_ahead() is not None and near._read_ahead() is None
    far.__getitems__(HintedBatch([0, 1], then=[5, 6]))  # reads 5, 6 ahead
    got = far.__getitems__(HintedBatch([9, 2], then=None))  # not what was hinted
    for item, want in zip(got, near.__getitems__([9, 2]), strict=True):
        assert item["index"] == want["index"]
        assert torch.equal(item["coh_view_1"], want["coh_view_1"])
    assert far._ahead is not None and far._ahead.pending is None  # the guess was dropped


def test_hinted_batches_name_the_same_workers_next_batch():
    from nasar_zarr.torch.sampler import HintedBatch, HintedBatches

    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    got = list(HintedBatches(batches, 2))
    assert got == batches and all(isinstance(b, HintedBatch) for b in got)
    assert [b.then for b in got] == [[4, 5], [6, 7], [8], None, None]
    assert [b.then for b in HintedBatches(batches, 0)] == [[2, 3], [4, 5], [6, 7], [8], None]
    assert len(HintedBatches(batches, 3)) == 5
    back = pickle.loads(pickle.dumps(got[0]))
    assert back == [0, 1] and back.then == [4, 5]


def test_a_host_that_stops_answering_is_one_line(small_cube):
    from nasar_zarr import CubeReader
    from nasar_zarr.errors import EndpointError

    server = RangeServer(small_cube.parent).start()
    url = f"{server.url}/{small_cube.name}"
    ds, reader = open_cube(url), CubeReader(url)
    server.stop()
    backend.INDEX_CACHE._reset()
    for read in (lambda: ds.rtc.isel(sample=[3]).values, lambda: reader[5]):
        with pytest.raises(EndpointError) as err, dask.config.set(scheduler="threads"):
            read()
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"{url}/rtc/c/")
        assert "no answer (NewConnectionError" in text and "Connection refused" in text


def test_ranges_over_one_kept_alive_connection_are_exact(http_cube, small_cube):
    from nasar_zarr import httpranges

    url, _ = http_cube
    data = (small_cube / "rtc" / "c/1/0/0/0/0/0").read_bytes()
    rng = np.random.default_rng(1)
    for _ in range(50):  # sequential: each reuses the connection the last one read through
        a = int(rng.integers(0, len(data) - 1))
        b = int(rng.integers(a + 1, min(len(data), a + 300_000) + 1))
        got = httpranges.get(f"{url}/rtc/c/1/0/0/0/0/0", f"bytes={a}-{b - 1}")
        assert got.status == 206 and bytes(got.body) == data[a:b] and got.total == len(data)


def test_fetch_is_short_at_the_end_and_never_coalesces(tmp_path):
    """Location.fetch (the converter's tar reads): ranges as asked, short past the end."""
    data = bytes(range(256)) * 40  # 10,240 bytes
    (tmp_path / "obj").write_bytes(data)
    asked = [("obj", 0, 10, None), ("obj", 12, 20, None), ("obj", 10_230, 10_250, None)]
    with RangeServer(tmp_path) as server:
        remote = ranges.Location.of(server.url).fetch(asked)
        requests = server.reset()
        past = ranges.Location.of(server.url).fetch([("obj", 20_000, 20_512, None)])
    local = ranges.Location.of(str(tmp_path)).fetch(asked)
    expected = [data[0:10], data[12:20], data[10_230:]]
    assert [bytes(t.data) for t in remote] == [bytes(t.data) for t in local] == expected
    assert {t.size for t in remote} == {t.size for t in local} == {len(data)}
    assert sorted(r.range for r in requests) == ["bytes=0-9", "bytes=10230-10249", "bytes=12-19"]
    assert bytes(past[0].data) == b""
    # a version asked for that the object no longer has
    with pytest.raises(ranges.ObjectChangedError, match=r"/obj: the object changed"):
        ranges.Location.of(str(tmp_path)).fetch([("obj", 0, 1, "0-0")])


def test_request_headers_carry_a_hub_token():
    from nasar_zarr.httpranges import request_headers

    assert request_headers({}) == {}
    assert request_headers({"token": "hf_x"}) == {"Authorization": "Bearer hf_x"}
    given = {"headers": {"Authorization": "Bearer mine", "X-A": 1}, "token": "hf_x"}
    assert request_headers(given) == {"Authorization": "Bearer mine", "X-A": "1"}


def test_a_forked_child_builds_its_own_http_client(http_cube, small_cube):
    from nasar_zarr import httpranges

    url, _ = http_cube
    httpranges.get(f"{url}/zarr.json")  # the parent's client and pool
    parent = httpranges._CLIENT
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new client, and it reads
        try:
            fresh = httpranges._CLIENT is None
            body = httpranges.get(f"{url}/zarr.json").body
            ok = fresh and bytes(body) == (small_cube / "zarr.json").read_bytes()
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    assert httpranges._CLIENT is parent  # the parent's is untouched


@pytest.mark.parametrize(
    "status,error,text",
    [
        (403, PermissionError, "HTTP 403, not allowed (credentials"),
        (404, FileNotFoundError, "HTTP 404"),
        (503, ConnectionError, "HTTP 503 from the server, after retries"),
    ],
)
def test_http_refusals_are_one_line_and_typed(status, error, text):
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cube"
        with pytest.raises(error) as err:
            ranges.Location.of(url).ranges([("rtc/c/0", 0, 10, None)])
        message = str(err.value)
        assert message.startswith(f"{url}/rtc/c/0: {text}") and "\n" not in message
    finally:
        server.shutdown()
        server.server_close()
