"""The store lock is one atomic exclusive create: of simultaneous takers exactly one wins."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from nasar_zarr import store
from nasar_zarr.errors import StoreLockedError
from nasar_zarr.lock import store_lock
from nasar_zarr.testing import write_corpus
from tests.conftest import assert_store_equals_source, cli


def _race(url: str, storage_options=None, n: int = 8) -> list[bool]:
    """``n`` threads released by one barrier all try to create the lock object."""
    barrier = threading.Barrier(n)
    results: list[bool] = [False] * n

    def take(i: int) -> None:
        barrier.wait()
        results[i] = store.create_json(url, store.LOCK_FILE, {"who": i}, storage_options)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_exclusive_create_local(tmp_path):
    for attempt in range(5):
        assert sum(_race(str(tmp_path / f"cube{attempt}.zarr"))) == 1


def test_exclusive_create_s3_conditional_write(s3_server):
    import s3fs

    s3fs.S3FileSystem(**s3_server).mkdir("lock-race")
    for attempt in range(3):
        url = f"s3://lock-race/cube{attempt}.zarr"
        results = _race(url, s3_server)
        assert sum(results) == 1
        winner = results.index(True)
        assert store.read_json(url, store.LOCK_FILE, s3_server) == {"who": winner}


def test_lock_refuses_a_live_holder_and_is_released(tmp_path):
    dest = str(tmp_path / "cube.zarr")
    with store_lock(dest) as token:
        held = store.read_json(dest, store.LOCK_FILE)
        assert held["token"] == token and held["pid"] == os.getpid()
        # The same process cannot take it twice either: one writer, whoever it is.
        with (
            pytest.raises(StoreLockedError, match=r"holds the lock; wait for it"),
            store_lock(dest),
        ):
            pass
    assert store.read_json(dest, store.LOCK_FILE) is None


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dest = str(tmp_path / "cube.zarr")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    store.write_json(
        dest,
        store.LOCK_FILE,
        {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "old"},
    )
    with store_lock(dest) as token:
        assert store.read_json(dest, store.LOCK_FILE)["token"] == token != "old"


def test_two_converters_at_once_exactly_one_proceeds(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_shards=2, samples_per_shard=[5, 6], seed=5)
    dest = tmp_path / "cube.zarr"
    args = [
        sys.executable,
        "-m",
        "nasar_zarr",
        "convert",
        str(corpus.root),
        str(dest),
        "--shard",
        "4",
        "--workers",
        "0",
    ]
    # Whoever takes the lock stops itself (SIGSTOP) right after, still holding it,
    # so the other one meets a live holder whatever the interleaving.
    env = {**os.environ, "NASAR_ZARR_FAULT": "skeleton", "NASAR_ZARR_FAULT_SIGNAL": "STOP"}
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        states = {
            p.pid: os.waitid(os.P_PID, p.pid, os.WEXITED | os.WSTOPPED | os.WNOWAIT) for p in procs
        }
        stopped = [p for p in procs if states[p.pid].si_code == os.CLD_STOPPED]
        refused = [p for p in procs if states[p.pid].si_code == os.CLD_EXITED]
        assert len(stopped) == 1 and len(refused) == 1
        winner, loser = stopped[0], refused[0]
        _, err = loser.communicate(timeout=60)
        assert loser.returncode == 2
        since = store.read_json(str(dest), store.LOCK_FILE)["since"]
        assert err == (
            f"nasar-zarr convert: error: {dest}: another conversion (pid {winner.pid} on"
            f" {socket.gethostname()}, since {since})"
            f" holds the lock; wait for it, or delete {store.LOCK_FILE} in the store if that"
            " process is gone\n"
        )
        os.kill(winner.pid, signal.SIGCONT)
        out, err = winner.communicate(timeout=120)
        assert winner.returncode == 0, err
        assert "done: 11 written, 0 rejected, 0 pending" in out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert store.read_json(str(dest), store.LOCK_FILE) is None
    assert_store_equals_source(dest, corpus.root)
    assert cli("verify", str(corpus.root), str(dest), "--workers", "0").returncode == 0
