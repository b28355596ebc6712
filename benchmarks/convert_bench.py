"""Conversion measurements, like with like: ``python benchmarks/convert_bench.py CORPUS``.

Used by ``run.py``; alone it prints one JSON object for a corpus (stored or
deflated npz) with ``--workers 1,2``:

- ``wds_pass`` over the tars in as many processes as the converter has workers
  (a pool started before the clock; each process decodes a contiguous half of the
  tars with ``webdataset`` + ``np.load``), with the CPU seconds of every process;
- ``convert``: ``plan_conversion`` + ``plan.execute(client=...)`` on the cluster
  nasar-zarr ships (``nasar_zarr.runner.local_cluster``), already running, with
  the wall time of the task phase alone and the CPU seconds of the workers and of
  this process (scheduler, client, planning, skeleton);
- ``rss_growth``: one worker running hundreds of small tasks, its peak RSS after
  the first 20 tasks and at the end;
- ``profile``: one task under cProfile, next to the floor (read + parse,
  fill + compress, write) measured on the same samples.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure as m  # noqa: E402


def now() -> float:
    return time.perf_counter()


def cpu_s() -> float:
    """CPU seconds of this process, all threads."""
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------- webdataset


def _wds_part(urls: list[str]) -> tuple[int, float, float]:
    """In a pool process: one decode-only webdataset pass; (samples, seconds, CPU s)."""
    c = cpu_s()
    n, seconds = m.wds_pass([Path(u) for u in urls])
    return n, seconds, cpu_s() - c


def _warm(_: int = 0) -> int:
    import webdataset  # noqa: F401

    time.sleep(0.05)
    return os.getpid()


class WdsPool:
    """``procs`` started processes that run :func:`_wds_part` on contiguous tar groups."""

    def __init__(self, procs: int):
        import multiprocessing as mp

        self.procs = procs
        self.pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"))
        pids = set()
        while len(pids) < procs:  # every process started and has imported webdataset
            pids |= set(self.pool.map(_warm, range(procs * 4)))

    def run(self, tars: list[Path]) -> dict[str, Any]:
        k = self.procs
        size = -(-len(tars) // k)
        groups = [[str(p) for p in tars[i * size : (i + 1) * size]] for i in range(k)]
        t = now()
        parts = list(self.pool.map(_wds_part, [g for g in groups if g]))
        wall = now() - t
        n = sum(p[0] for p in parts)
        cpu = sum(p[2] for p in parts)
        return {
            "n": n,
            "wall_s": wall,
            "sps": n / wall,
            "cpu_s": cpu,
            "cpu_ms_per_sample": cpu / n * 1e3,
            "procs": k,
        }

    def close(self) -> None:
        self.pool.shutdown()


# ---------------------------------------------------------------------------- conversion


def _worker_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _worker_hwm_mb() -> float:
    return m.peak_rss_mb()


class ShippedCluster:
    """The LocalCluster nasar-zarr starts (``runner.local_cluster``) and a client on it."""

    def __init__(self, workers: int):
        from distributed import Client

        from nasar_zarr.runner import local_cluster

        t = now()
        self.workers = workers
        self.cluster = local_cluster(workers)
        self.client = Client(self.cluster)
        self.client.run(lambda: __import__("nasar_zarr.task"))
        self.start_s = now() - t
        self.pids = list(self.client.run(os.getpid).values())

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def convert(cluster: ShippedCluster, src: Path, dest: Path, **options: Any) -> dict[str, Any]:
    """``plan_conversion`` + ``plan.execute(client=...)`` on a running shipped cluster.

    ``tasks_s`` is the task phase alone (``execute``'s call of ``run_plan_tasks``: from
    the first submission to the last record), timed by wrapping that function.
    """
    import importlib

    import nasar_zarr

    ex = importlib.import_module("nasar_zarr.execute")  # the module, not nasar_zarr.execute()
    if dest.exists():
        shutil.rmtree(dest)
    client = cluster.client
    phase: dict[str, float] = {}
    original = ex.run_plan_tasks

    def timed(*a, **k):
        t = now()
        try:
            return original(*a, **k)
        finally:
            phase["tasks_s"] = now() - t

    w0 = sum(client.run(_worker_cpu).values())
    c0 = cpu_s()
    sampler = m.ProcSampler(pids=cluster.pids)
    sampler.start()
    ex.run_plan_tasks = timed
    try:
        t = now()
        plan = nasar_zarr.plan_conversion(str(src), str(dest), **options)
        plan_s = now() - t
        plan.execute(client=client)
        wall = now() - t
    finally:
        ex.run_plan_tasks = original
        sampler.stop()
    main_cpu = cpu_s() - c0
    worker_cpu = sum(client.run(_worker_cpu).values()) - w0
    n = plan.n_samples
    return {
        "n": n,
        "workers": cluster.workers,
        "wall_s": wall,
        "plan_s": plan_s,
        "tasks_s": phase["tasks_s"],
        "serial_s": wall - phase["tasks_s"],
        "sps": n / wall,
        "tasks": len(plan.tasks),
        "worker_cpu_ms_per_sample": worker_cpu / n * 1e3,
        "main_cpu_ms_per_sample": main_cpu / n * 1e3,
        "cpu_ms_per_sample": (worker_cpu + main_cpu) / n * 1e3,
        "peak_rss_mb_workers": sorted(round(v, 1) for v in client.run(_worker_hwm_mb).values()),
        "polls": sampler.samples,
    }


# ---------------------------------------------------------------------------- memory


def _vm(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_growth(
    src: Path, dest: Path, *, shard: int = 8, inner_chunk: int = 2, after: int = 20
) -> dict[str, Any]:
    """One shipped worker running every task of a small-shard conversion.

    The worker's RSS high-water mark (``VmHWM``) is polled every 20 ms together
    with the number of task records in the store; ``growth`` is the final peak
    over the peak when ``after`` tasks had finished, minus 1.
    """
    from nasar_zarr import store

    cluster = ShippedCluster(1)
    (pid,) = cluster.pids
    records = dest / store.TASKS_DIR
    points: list[tuple[int, int, int]] = []  # (tasks done, VmHWM, VmRSS)
    halt = threading.Event()

    def poll() -> None:
        while not halt.is_set():
            done = len(os.listdir(records)) if records.is_dir() else 0
            hwm, rss = _vm(pid, "VmHWM"), _vm(pid, "VmRSS")
            if hwm is not None and rss is not None:
                points.append((done, hwm, rss))
            halt.wait(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    try:
        hwm0 = _vm(pid, "VmHWM") or 0
        poller.start()
        res = convert(cluster, src, dest, shard=shard, inner_chunk=inner_chunk)
        halt.set()
        poller.join()
        final_hwm = _vm(pid, "VmHWM") or 0
    finally:
        halt.set()
        cluster.close()
    at = [hwm for done, hwm, _ in points if done >= after]
    first = at[0] if at else None
    return {
        "tasks": res["tasks"],
        "shard": shard,
        "inner_chunk": inner_chunk,
        "worker_hwm_mb_before": round(hwm0 / 2**20, 1),
        f"worker_hwm_mb_after_{after}_tasks": None if first is None else round(first / 2**20, 1),
        "worker_hwm_mb_end": round(final_hwm / 2**20, 1),
        "worker_rss_mb_end": round(points[-1][2] / 2**20, 1) if points else None,
        "growth": None if not first else round(final_hwm / first - 1, 4),
        "wall_s": round(res["wall_s"], 2),
        "polls": len(points),
    }


# ---------------------------------------------------------------------------- profile


def _in_thread(fn, *a, **k):
    # a non-main thread, as a dask worker's task (numcodecs' Blosc uses its own
    # threads only when called from the main thread)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *a, **k).result()


def profile_task(src: Path, dest: Path, top: int = 14) -> dict[str, Any]:
    """One conversion task under cProfile next to the floor on the same samples.

    All figures are CPU time of the thread that runs them (``time.thread_time``), which
    other tenants of the machine inflate far less than wall time. The floor:
    ``read_parse`` (read each member's bytes + ``source.decode_npz``, which checks
    every CRC-32), ``fill_compress`` (``schema.fill_batch`` into one inner
    chunk + the codec on every variable) and ``write`` (the compressed bytes into a
    new file), each timed alone on the task's samples.
    """
    import nasar_zarr
    from nasar_zarr import corpus, layout, schema, sharding, source, task

    plans = []
    for i in range(3):
        d = dest.with_name(f"{dest.name}-{i}")
        if d.exists():
            shutil.rmtree(d)
        plan = nasar_zarr.plan_conversion(str(src), str(d))
        layout.prepare_store(plan, corpus.read_metadata(str(src)), overwrite=True)
        plans.append(plan)
    first = plans[0].tasks[0]
    n = first.n_samples

    def run(plan, prof=None):
        t, c = now(), cpu_s()
        if prof:
            prof.enable()
        task.run_task(plan.tasks[0], src=plan.source, dest=plan.dest, options=plan.options)
        if prof:
            prof.disable()
        return now() - t, cpu_s() - c

    _in_thread(run, plans[0])  # warm: imports, caches
    wall, cpu = _in_thread(run, plans[1])
    prof = cProfile.Profile()
    _in_thread(run, plans[2], prof)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    by_function = {
        f"{Path(fn).name}:{line}({name})": round(tt / n * 1e3, 3)
        for (fn, line, name), (_, _, tt, _, _) in rows
    }

    # the floor, on the same samples
    opts = plans[0].options
    members: list[list[tuple[Any, Any]]] = []

    def floor() -> dict[str, float]:
        t = time.thread_time()
        samples = []
        for group in members:
            payloads = []
            for f, mem in group:
                f.seek(mem.offset)
                payloads.append((mem, f.read(mem.size)))
            samples.append(source.decode_sample(payloads, shard="s", key="k"))
        read_s = time.thread_time() - t
        encode = sharding.inner_encoder(opts.codec, opts.clevel)
        chunk = schema.empty_batch(opts.inner_chunk)
        pieces = []
        t = time.thread_time()
        for lo in range(0, len(samples), opts.inner_chunk):
            for j, arrays in enumerate(samples[lo : lo + opts.inner_chunk]):
                schema.fill_batch(chunk, j, arrays)
            pieces += [encode(v) for v in chunk.values()]
        compress_s = time.thread_time() - t
        path = dest.with_name(f"{dest.name}-floor.bin")
        t = time.thread_time()
        with open(path, "wb") as f:
            for p in pieces:
                f.write(p)
        write_s = time.thread_time() - t
        path.unlink()
        k = len(samples)
        return {
            "read_parse": read_s / k * 1e3,
            "fill_compress": compress_s / k * 1e3,
            "write": write_s / k * 1e3,
        }

    handles = {}
    try:
        members.clear()
        for span in first.spans:
            url = source.join(str(src), span.shard_path)
            f = handles.setdefault(url, open(url, "rb"))  # noqa: SIM115
            for entry in span.entries:
                members.append([(f, mem) for mem in entry.members])
        floors = [_in_thread(floor) for _ in range(2)]
    finally:
        for f in handles.values():
            f.close()
    best = {k: round(min(x[k] for x in floors), 3) for k in floors[0]}
    for p in plans:
        shutil.rmtree(p.dest, ignore_errors=True)
    return {
        "samples": n,
        "task_wall_ms_per_sample": round(wall / n * 1e3, 3),
        "task_cpu_ms_per_sample": round(cpu / n * 1e3, 3),
        "floor_ms_per_sample": best,
        "floor_total_ms_per_sample": round(sum(best.values()), 3),
        "cprofile_tottime_ms_per_sample": by_function,
        "inflater": source.INFLATER,
    }


# ---------------------------------------------------------------------------- cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("--workdir", type=Path, default=HERE / "work")
    p.add_argument("--workers", default="1,2")
    args = p.parse_args(argv)
    tars = m.tar_paths(args.corpus)
    m.warm_page_cache(tars)
    out: dict[str, Any] = {"corpus": str(args.corpus)}
    dest = args.workdir / "convert-bench.zarr"
    for w in (int(x) for x in args.workers.split(",")):
        pool = WdsPool(w)
        out[f"wds{w}"] = pool.run(tars)
        pool.close()
        cluster = ShippedCluster(w)
        try:
            out[f"convert_{w}_workers"] = convert(cluster, args.corpus, dest)
        finally:
            cluster.close()
    out["rss_growth"] = rss_growth(args.corpus, dest)
    out["profile"] = profile_task(args.corpus, dest)
    shutil.rmtree(dest, ignore_errors=True)
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
