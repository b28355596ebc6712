"""Shared fixtures: synthetic corpora, a converted cube, a real dask cluster, a real S3 server."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from nasar_zarr import plan_conversion
from nasar_zarr.testing import write_corpus


def release_order(frame):
    """A metadata frame sorted into release order, index reset (what the cube holds)."""
    return frame.sort_values(["shard_index", "sample_index_in_shard"]).reset_index(drop=True)


def decode_with_card(corpus_root: Path) -> dict[str, dict[str, np.ndarray]]:
    """An independent reader that follows only the dataset card: tarfile + numpy."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for tar_path in sorted((Path(corpus_root) / "data").glob("nasar-train-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.name.endswith(".npz"):
                    continue
                key = member.name.split(".", 1)[0]
                with np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False) as npz:
                    out[key] = {name: npz[name] for name in npz.files}
    return out


def cli(
    *args: str,
    fault: str | None = None,
    signal: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run ``nasar-zarr`` in a fresh process; ``fault`` stops it at a named point
    (SIGKILL, or ``signal``: e.g. "INT" as from Ctrl-C)."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NASAR_ZARR_FAULT", "NASAR_ZARR_FAULT_SIGNAL")
    }
    full_env.update(env or {})
    if fault:
        full_env["NASAR_ZARR_FAULT"] = fault
    if signal:
        full_env["NASAR_ZARR_FAULT_SIGNAL"] = signal
    return subprocess.run(
        [sys.executable, "-m", "nasar_zarr", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_store_equals_source(dest: Path, corpus_root: Path, expected=None) -> None:
    """Every variable of every sample, status and rtc_present equal the card reader's
    arrays (tarfile + numpy), bit for bit."""
    import pandas as pd
    import zarr

    from nasar_zarr import schema

    expected = decode_with_card(corpus_root) if expected is None else expected
    table = release_order(pd.read_parquet(Path(corpus_root) / "metadata.parquet"))
    group = zarr.open_group(str(dest), mode="r")
    keys = group["sample"][:].tolist()
    assert keys == table["sample_key"].tolist()
    loaded = {name: group[name][:] for name in schema.VARIABLES}
    for i, key in enumerate(keys):
        back = schema.cube_to_source({name: values[i] for name, values in loaded.items()})
        for name in schema.SOURCE_KEYS:
            assert back[name].tobytes() == expected[key][name].tobytes(), (key, name)
    assert (group["status"][:] == schema.STATUS_WRITTEN).all()
    present = np.array(
        [
            [
                [
                    [expected[k][f"{t}_rtc_view_{v}"][p].any() for p in range(2)]
                    for t in ("prime", "secondary")
                ]
                for v in range(2)
            ]
            for k in keys
        ]
    )
    np.testing.assert_array_equal(group["rtc_present"][:], present)


@pytest.fixture
def collect_garbage():
    """Collect cyclic garbage after the test, so what it left (a DataLoader's worker
    shutdown, a thread pool) is finalized here, not on a later test's server thread."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """3 uneven tar shards (11, 7, 14 samples), mixed npz compression, extra members,
    shuffled metadata rows: what anyone following only the card might write."""
    root = tmp_path_factory.mktemp("corpus")
    info = write_corpus(
        root,
        n_shards=3,
        samples_per_shard=[11, 7, 14],
        seed=7,
        compressed="mixed",
        extra_members=True,
        shuffle_metadata=True,
    )
    return info


@pytest.fixture(scope="session")
def small_cube(small_corpus, tmp_path_factory):
    """``small_corpus`` converted in-process with shards of 8 samples (boundaries inside tars)."""
    dest = tmp_path_factory.mktemp("cube") / "nasar.zarr"
    plan = plan_conversion(str(small_corpus.root), str(dest), shard=8, inner_chunk=2)
    plan.execute(workers=0)
    return dest


@pytest.fixture(scope="session")
def cube(small_cube):
    """``small_cube`` opened the recommended way (lazy, dask chunks = shards)."""
    from nasar_zarr import open_cube

    return open_cube(str(small_cube))


@pytest.fixture(scope="session")
def table(small_corpus):
    """``small_corpus``'s metadata.parquet (rows shuffled on disk), in release order."""
    import pandas as pd

    return release_order(pd.read_parquet(small_corpus.root / "metadata.parquet"))


@pytest.fixture(scope="session")
def dask_client():
    """A real 2-worker LocalCluster with processes."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on loopback; yields its storage_options."""
    import os

    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    yield options
    server.stop()
