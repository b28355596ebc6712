"""Measurements for ``benchmarks/run.py``: one function per figure, no policy.

Every function returns plain numbers (seconds, samples per second, bytes) so
that ``run.py`` decides what is a baseline, what is a goal and what is printed.
All reads run with a warm OS page cache (the corpus and the stores fit in RAM):
the figures are the CPU cost of decoding, not disk speed.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

DATA_VARS = ("rtc", "inc_angle", "ifg", "coh", "dem", "slope_deg", "rtc_present", "status")
FLOAT_VARS = DATA_VARS[:6]


def now() -> float:
    return time.perf_counter()


# ---------------------------------------------------------------------------- files


def tar_paths(corpus: Path) -> list[Path]:
    return sorted((corpus / "data").glob("nasar-train-*.tar"))


def warm_page_cache(paths: Iterable[Path]) -> int:
    """Read every byte once so that all later passes see the same (warm) cache."""
    total = 0
    for p in paths:
        if p.is_dir():
            total += warm_page_cache(q for q in p.rglob("*") if q.is_file())
            continue
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total


def tree_bytes(path: Path, *, exclude_prefix: str | None = None) -> int:
    total = 0
    for p in path.rglob("*"):
        if p.is_file():
            if exclude_prefix and p.relative_to(path).parts[0] == exclude_prefix:
                continue
            total += p.stat().st_size
    return total


def half_corpus(corpus: Path, out: Path, n_tars: int) -> int:
    """A corpus of the first ``n_tars`` tars (hard links) with filtered metadata."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    keep = tar_paths(corpus)[:n_tars]
    for p in keep:
        os.link(p, out / "data" / p.name)
    table = pq.read_table(corpus / "metadata.parquet")
    names = [f"data/{p.name}" for p in keep]
    table = table.filter(pc.is_in(table["shard_path"], value_set=pa.array(names)))
    pq.write_table(table, out / "metadata.parquet")
    summary = json.loads((corpus / "webdataset_summary.json").read_text())
    summary["num_shards"] = n_tars
    summary["samples_per_shard"] = summary["samples_per_shard"][:n_tars]
    summary["num_samples"] = int(table.num_rows)
    (out / "webdataset_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return int(table.num_rows)


# ---------------------------------------------------------------------------- baselines


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def wds_pass(urls: Sequence[Path]) -> tuple[int, float]:
    """Decode-only pass with the ``webdataset`` library (np.load of each npz member)."""
    import webdataset as wds

    t = now()
    n = 0
    ds = wds.WebDataset([str(u) for u in urls], shardshuffle=False, empty_check=False)
    for sample in ds:
        arrays = _load_npz(sample["npz"])
        assert len(arrays) == 12
        n += 1
    return n, now() - t


def tarfile_pass(urls: Sequence[Path]) -> tuple[int, float]:
    """Decode-only pass with the standard library's tarfile + np.load."""
    t = now()
    n = 0
    for url in urls:
        with tarfile.open(url, "r:") as tar:
            for info in tar:
                if info.isfile() and info.name.endswith(".npz"):
                    arrays = _load_npz(tar.extractfile(info).read())
                    assert len(arrays) == 12
                    n += 1
    return n, now() - t


# ---------------------------------------------------------------------------- processes


def _vmhwm(pid: int) -> int | None:
    """Peak RSS (bytes) of a live process from ``/proc/PID/status`` (``VmHWM``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ProcSampler(threading.Thread):
    """Peak RSS and CPU time of a process tree (or of given pids).

    The peak is the kernel's high-water mark (``VmHWM``), read every
    ``interval`` seconds while the process lives, so it misses nothing between
    polls; polling is kept light (the machine has 2 cores): the process tree is
    re-listed once a second. Worker processes of a LocalCluster are the spawned
    children (``spawn_main`` in their command line); the resource tracker is left
    out.
    """

    def __init__(
        self, *, root: int | None = None, pids: Sequence[int] = (), interval: float = 0.25
    ):
        super().__init__(daemon=True)
        import psutil

        self._psutil = psutil
        self.root = root
        self.fixed = list(pids)
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.cpu0: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self.samples = 0
        self._procs: dict[int, Any] = {}
        self._halt = threading.Event()

    def _refresh(self) -> None:
        ps = self._psutil
        pids = list(self.fixed)
        if self.root is not None:
            try:
                root = ps.Process(self.root)
                pids = [root.pid, *(c.pid for c in root.children(recursive=True))]
            except ps.NoSuchProcess:
                pids = []
        for pid in pids:
            if pid not in self._procs:
                with contextlib.suppress(ps.NoSuchProcess):
                    self._procs[pid] = ps.Process(pid)

    def _classify(self, p) -> str:
        if p.pid == self.root:
            return "main"
        if self.root is None:
            return "worker"
        try:
            cmd = " ".join(p.cmdline())
        except self._psutil.Error:
            return "other"
        if "resource_tracker" in cmd or "forkserver" in cmd:
            return "other"
        return "worker" if "spawn_main" in cmd or "multiprocessing" in cmd else "other"

    def run(self) -> None:
        ps = self._psutil
        every = max(1, round(1.0 / self.interval))
        while not self._halt.is_set():
            if self.samples % every == 0:
                self._refresh()
            for pid, p in list(self._procs.items()):
                if self.kind.get(pid) not in ("worker", "main"):
                    # re-check: a child seen between fork and exec still shows the
                    # parent's command line
                    self.kind[pid] = self._classify(p)
                hwm = _vmhwm(pid)
                try:
                    t = p.cpu_times()
                except ps.Error:
                    continue
                if hwm is not None:
                    self.peak[pid] = max(self.peak.get(pid, 0), hwm)
                self.cpu[pid] = t.user + t.system
                self.cpu0.setdefault(pid, t.user + t.system)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def report(self, wall: float) -> dict[str, Any]:
        workers = [pid for pid, k in self.kind.items() if k == "worker" and pid in self.peak]
        main = [pid for pid, k in self.kind.items() if k == "main" and pid in self.peak]
        cpu = sum(self.cpu[p] - self.cpu0[p] for p in workers if p in self.cpu)
        return {
            "peak_rss_mb_workers": sorted(round(self.peak[p] / 2**20, 1) for p in workers),
            "peak_rss_mb_main": round(self.peak[main[0]] / 2**20, 1) if main else None,
            "worker_cpu_s": round(cpu, 2),
            "worker_cores_busy": round(cpu / wall, 2),
            "polls": self.samples,
        }


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (``VmHWM``), in MiB.

    Not ``ru_maxrss``: Linux carries that over from the parent across fork + exec,
    so a child started by a big process would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cli_executable() -> list[str]:
    exe = Path(sys.executable).parent / "nasar-zarr"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from nasar_zarr.cli import main; sys.exit(main())"]


def run_cli_convert(
    src: Path, dest: Path, *, workers: int, log: Path, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """``nasar-zarr convert`` end to end in a subprocess, RSS sampled with psutil."""
    if dest.exists():
        shutil.rmtree(dest)
    cmd = [*cli_executable(), "convert", str(src), str(dest), "--workers", str(workers), *extra]
    with open(log, "w") as out:
        t = now()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        sampler = ProcSampler(root=proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = now() - t
        sampler.stop()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {log}:\n" + log.read_text()[-3000:])
    return {"wall_s": wall, **sampler.report(wall), "cmd": " ".join(cmd[-6:])}


def convert_with_client(
    src: Path, dest: Path, *, workers: int, options: dict | None = None
) -> dict[str, Any]:
    """Plan + execute through the library with an already running LocalCluster.

    The cluster is started (and every worker has imported nasar_zarr) before the
    clock starts; peak RSS is taken with psutil sampling and, inside each worker,
    as the kernel's high-water mark (``VmHWM``, :func:`peak_rss_mb`) at the end.
    """
    from distributed import Client, LocalCluster

    from nasar_zarr.plan import plan_conversion

    if dest.exists():
        shutil.rmtree(dest)
    environ = dict(os.environ)  # the nanny writes its pre-spawn-environ into os.environ
    t0 = now()
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        memory_limit=0,
    )
    client = Client(cluster)
    try:
        client.run(lambda: __import__("nasar_zarr.execute"))
        start_s = now() - t0
        pids = list(client.run(os.getpid).values())
        trim = sorted(
            set(client.run(lambda: str(os.environ.get("MALLOC_TRIM_THRESHOLD_"))).values())
        )
        sampler = ProcSampler(pids=pids)
        sampler.start()
        t = now()
        plan = plan_conversion(str(src), str(dest), **(options or {}))
        plan_s = now() - t
        plan.execute(client=client)
        wall = now() - t
        sampler.stop()
        maxrss = client.run(peak_rss_mb)
    finally:
        client.close()
        cluster.close()
        os.environ.clear()
        os.environ.update(environ)
    return {
        "wall_s": wall,
        "plan_s": plan_s,
        "cluster_start_s": start_s,
        **sampler.report(wall),
        "peak_rss_mb_workers_vmhwm": sorted(round(v, 1) for v in maxrss.values()),
        "worker_env_MALLOC_TRIM_THRESHOLD_": trim,
    }


def convert_in_subprocess(src: Path, dest: Path, options: dict) -> dict[str, Any]:
    """Plan + execute with ``workers=0`` in a fresh interpreter; returns time and VmHWM."""
    if dest.exists():
        shutil.rmtree(dest)
    # execute() runs in a non-main thread, as tasks do in a dask worker (numcodecs'
    # Blosc would use extra threads in the main thread only)
    code = (
        "import json, resource, sys, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from nasar_zarr.plan import plan_conversion\n"
        "t = time.perf_counter()\n"
        f"plan = plan_conversion({str(src)!r}, {str(dest)!r}, **{options!r})\n"
        "with ThreadPoolExecutor(1) as pool:\n"
        "    pool.submit(plan.execute, workers=0).result()\n"
        "wall = time.perf_counter() - t\n"
        "hwm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')]\n"
        "print(json.dumps({'wall_s': wall, 'n': plan.n_samples, 'maxrss_mb': hwm[0] / 1024}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- reads


def _block_nbytes(block: np.ndarray) -> np.ndarray:
    # np.asarray: open_cube's chunks are lazy (LazyRows) until something needs the values;
    # ``block.nbytes`` alone would not read them.
    values = np.asarray(block)
    return np.full((1,) * values.ndim, values.nbytes, dtype="int64")


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def scan_dask(ds, names: Sequence[str]) -> float:
    """Seconds to materialize every dask block of ``names`` (threaded scheduler)."""
    import dask

    parts = []
    for name in names:
        a = ds[name].data
        parts.append(
            a.map_blocks(
                _block_nbytes, chunks=tuple((1,) * len(c) for c in a.chunks), dtype="int64"
            ).sum()
        )
    t = now()
    dask.compute(*parts, scheduler="threads")
    return now() - t


def ts_open(store: Path, names: Sequence[str], context=None) -> dict[str, Any]:
    import tensorstore as ts

    ctx = context if context is not None else ts.Context()
    return {
        name: ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store.resolve() / name)}},
            read=True,
            context=ctx,
        ).result()
        for name in names
    }


def scan_tensorstore(arrays: dict[str, Any], step: int) -> float:
    """Seconds to read every variable, one Zarr shard (``step`` samples) at a time.

    The reads of all variables of a shard are issued together; tensorstore
    decodes them on its own thread pool.
    """
    n = next(iter(arrays.values())).shape[0]
    t = now()
    for lo in range(0, n, step):
        futures = [a[lo : min(n, lo + step)].read() for a in arrays.values()]
        for f in futures:
            f.result()
    return now() - t


def cube_reader(store: Path):
    """The project's fast read API (``nasar_zarr.reader.CubeReader``), or None if absent."""
    try:
        from nasar_zarr.reader import CubeReader
    except ImportError:
        return None
    return CubeReader(str(store))


def scan_reader(reader, step: int) -> float:
    """Seconds to read every sample through ``reader[lo:hi]``, one Zarr shard at a time."""
    n = len(reader)
    t = now()
    for lo in range(0, n, step):
        reader[lo : min(n, lo + step)]
    return now() - t


def random_reader(reader, indices, warm: int) -> dict[str, float]:
    return pct_ms(timed_calls(lambda i: reader[i], indices, warm))


def timed_calls(fn: Callable[[int], Any], indices: Sequence[int], warm: int) -> np.ndarray:
    for i in indices[:warm]:
        fn(int(i))
    out = []
    for i in indices[warm:]:
        t = now()
        fn(int(i))
        out.append(now() - t)
    return np.array(out)


def pct_ms(times: np.ndarray) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
        "p90_ms": round(float(np.percentile(times, 90)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3),
        "n": int(times.size),
    }


def random_tensorstore(arrays: dict[str, Any], indices, warm: int) -> dict[str, float]:
    def one(i):
        futures = [a[i].read() for a in arrays.values()]
        return [f.result() for f in futures]

    return pct_ms(timed_calls(one, indices, warm))


def random_zarr(store: Path, names: Sequence[str], indices, warm: int) -> dict[str, float]:
    from nasar_zarr import store as nstore

    group = nstore.open_group(str(store))
    arrays = [group[n] for n in names]
    return pct_ms(timed_calls(lambda i: [a[i] for a in arrays], indices, warm))


def random_xarray(ds, names: Sequence[str], indices, warm: int) -> dict[str, float]:
    sub = ds[list(names)]
    return pct_ms(timed_calls(lambda i: sub.isel(sample=i).load(), indices, warm))


def random_tar(corpus: Path, indices, warm: int) -> dict[str, Any]:
    """Seek to a member by an index of (tar, offset, size), read it, np.load every array."""
    from nasar_zarr import source

    t = now()
    index = []
    for path in tar_paths(corpus):
        for entry in source.index_shard(str(path)):
            m = entry.members[0]
            index.append((str(path), m.offset, m.size))
    index_s = now() - t
    handles: dict[str, Any] = {}
    try:

        def one(i):
            path, offset, size = index[i]
            f = handles.get(path) or handles.setdefault(path, open(path, "rb", buffering=0))
            f.seek(offset)
            return _load_npz(f.read(size))

        res = pct_ms(timed_calls(one, indices, warm))
    finally:
        for f in handles.values():
            f.close()
    return {**res, "index_build_s": round(index_s, 3)}


# ---------------------------------------------------------------------------- store size


def compressed_fraction(corpus: Path, workdir: Path, k: int) -> dict[str, Any]:
    """Bytes of a tar of ``k`` samples as ``np.savez_compressed`` over the same as ``np.savez``.

    Both tars are written the same way (``nasar_zarr.testing.write_tar``) from
    the first ``k`` samples of the first source tar, so the ratio isolates the
    npz compression.
    """
    from nasar_zarr import source
    from nasar_zarr.testing import sample_members, write_tar

    url = str(tar_paths(corpus)[0])
    entries = source.index_shard(url)[:k]
    samples = [
        (key, {n: np.array(a) for n, a in arrays.items()})
        for key, arrays in source.read_samples(url, entries)
    ]
    sizes = {}
    for compressed in (False, True):
        path = workdir / f"subset-{'z' if compressed else 'raw'}.tar"
        members = (
            m for key, arrays in samples for m in sample_members(key, arrays, compressed=compressed)
        )
        sizes[compressed] = write_tar(path, members)
        path.unlink()
    return {
        "samples": len(samples),
        "tar_bytes": sizes[False],
        "tar_compressed_bytes": sizes[True],
        "fraction": sizes[True] / sizes[False],
    }


# ---------------------------------------------------------------------------- 1 M metadata


def metadata_store_1m(path: Path, counts: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """A metadata-only cube (no data chunks) of ``sum(counts)`` samples.

    The plan comes from :func:`nasar_zarr.plan.assemble_plan` with fake tar
    indexes (one npz member per sample); the store is written by the
    converter's own ``prepare_store`` (skeleton + ``to_zarr(compute=False)``)
    and ``finalize`` (consolidated metadata), i.e. exactly as a real
    conversion leaves it before any task has run.
    """
    import pyarrow as pa

    from nasar_zarr import layout, schema, source
    from nasar_zarr.plan import ConvertOptions, IndexedTar, TarShard, assemble_plan
    from nasar_zarr.testing import make_metadata

    timings = {}
    t = now()
    df = make_metadata(np.random.default_rng(seed), list(counts))
    table = pa.Table.from_pandas(df, preserve_index=False)
    timings["make_metadata_s"] = now() - t
    t = now()
    keys = table.column(schema.KEY_COLUMN).to_pylist()
    shard_of_row = table.column(schema.SHARD_PATH_COLUMN).to_pylist()
    indexed, pos = [], 0
    member_bytes = schema.PER_SAMPLE_BYTES + 2_000
    for s, c in enumerate(counts):
        entries = tuple(
            source.SampleEntry(
                k, (source.Member(f"{k}.npz", 512 + j * (member_bytes + 1024), member_bytes),)
            )
            for j, k in enumerate(keys[pos : pos + c])
        )
        indexed.append(
            IndexedTar(
                TarShard(schema.shard_name(s), c * (member_bytes + 1024), c),
                source.TarIndex.from_entries(entries),
            )
        )
        pos += c
    plan = assemble_plan(
        "fake://nasar-release", str(path), ConvertOptions(), keys, shard_of_row, indexed
    )
    timings["assemble_plan_s"] = now() - t
    if path.exists():
        shutil.rmtree(path)
    t = now()
    layout.prepare_store(plan, table, overwrite=True)
    layout.finalize(plan)
    timings["write_skeleton_s"] = now() - t
    return {k: round(v, 2) for k, v in timings.items()} | {
        "n_samples": plan.n_samples,
        "tasks": len(plan.tasks),
    }


def open_and_graph_1m(path: Path, repeats: int = 3) -> dict[str, Any]:
    import dask

    from nasar_zarr.cube import open_cube

    opens = []
    for _ in range(repeats + 1):
        t = now()
        ds = open_cube(str(path))
        opens.append(now() - t)
    mean = ds.mean()
    graph = mean.__dask_graph__()
    layers = collections.Counter()
    for key in graph:
        name = key[0] if isinstance(key, tuple) else key
        layers[name.rsplit("-", 1)[0]] += 1
    (optimized,) = dask.optimize(mean)
    by_sample = ds.mean("sample")  # reduce the one chunked axis first
    (by_sample_opt,) = dask.optimize(by_sample)
    extra: dict[str, Any] = {}
    try:  # newer open_cube: chunks="large" for full-corpus reductions
        large = open_cube(str(path), chunks="large").mean()
        (large_opt,) = dask.optimize(large)
        extra = {
            "tasks_mean_chunks_large": len(large.__dask_graph__()),
            "tasks_mean_chunks_large_optimized": len(large_opt.__dask_graph__()),
        }
    except (TypeError, ValueError) as exc:
        extra = {"tasks_mean_chunks_large": None, "chunks_large_error": repr(exc)}
    return {
        **extra,
        "open_s_first": round(opens[0], 3),
        "open_s_median": round(float(np.median(opens[1:])), 3),
        "chunks_per_variable": {n: ds[n].data.numblocks[0] for n in ds.data_vars},
        "tasks_mean": len(graph),
        "tasks_mean_optimized": len(optimized.__dask_graph__()),
        "tasks_mean_by_layer": dict(layers),
        "tasks_mean_over_sample": len(by_sample.__dask_graph__()),
        "tasks_mean_over_sample_optimized": len(by_sample_opt.__dask_graph__()),
    }


# ---------------------------------------------------------------------------- profiles


def profile_convert_task(
    src: Path, dest: Path, options: dict | None = None, tasks: int = 2
) -> dict[str, Any]:
    """Wall-time and RSS breakdown of real ``run_task`` calls, in this process.

    The first ``tasks`` tasks run one after the other in a non-main thread, as
    in a fresh dask worker (buffers the library keeps per process are dropped
    first), but without dask's ``MALLOC_TRIM_THRESHOLD_``. The library's
    functions are wrapped with timers where they exist, never modified: buffer
    allocation, reading + npz decoding (time inside ``source.read_samples``'
    iterator), the copy into the buffers (``schema.fill_batch``), non-finite
    counting, ``rtc_present``, each Zarr write (``zarr.Array.__setitem__``:
    encode + compress + store, checksums included), and any read-back
    (``LocalFileSystem.cat_file``). RSS is sampled every 10 ms.
    """
    import fsspec.implementations.local as fl
    import zarr

    from nasar_zarr import execute, schema, source

    try:
        from nasar_zarr import sharding
    except ImportError:
        sharding = None
    from nasar_zarr.plan import plan_conversion, read_metadata

    if dest.exists():
        shutil.rmtree(dest)
    plan = plan_conversion(str(src), str(dest), **(options or {}))
    execute.prepare_store(plan, read_metadata(str(src)), overwrite=True)
    acc: dict[str, float] = collections.defaultdict(float)
    phases: list[tuple[str, float, float]] = []

    def timer(name, fn):
        def wrapped(*a, **k):
            t = now()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += now() - t
                phases.append((name, t, now()))

        return wrapped

    def timed_iter(name, fn):
        def wrapped(*a, **k):
            it = fn(*a, **k)
            while True:
                t = now()
                try:
                    item = next(it)
                except StopIteration:
                    acc[name] += now() - t
                    return
                acc[name] += now() - t
                yield item

        return wrapped

    def timed_setitem(orig):
        def wrapped(self, key, value):
            t = now()
            try:
                return orig(self, key, value)
            finally:
                acc[f"zarr write {self.basename}"] += now() - t
                phases.append((f"zarr write {self.basename}", t, now()))

        return wrapped

    def factory(name, fn):  # a function that returns the function to time
        def wrapped(*a, **k):
            return timer(name, fn(*a, **k))

        return wrapped

    targets = [
        (schema, "empty_batch", "allocate buffers (schema.empty_batch)", timer),
        (execute, "_task_buffers", "get buffers (execute._task_buffers)", timer),
        (execute, "_chunk_buffers", "get buffers (execute._chunk_buffers)", timer),
        (sharding, "inner_encoder", "compress inner chunks (sharding.inner_encoder)", factory),
        (execute, "_write_shard", "write shard objects (execute._write_shard)", timer),
        (schema, "fill_batch", "copy into buffers (schema.fill_batch)", timer),
        (schema, "rtc_present", "rtc_present", timer),
        (source, "read_samples", "read + npz decode (source.read_samples)", timed_iter),
        (source, "nonfinite_counts", "nonfinite_counts", timer),
        (fl.LocalFileSystem, "cat_file", "read-back (cat_file)", timer),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _, _ in targets if hasattr(obj, attr)]
    saved.append((zarr.Array, "__setitem__", zarr.Array.__setitem__))
    targets = [t for t in targets if t[0] is not None]
    saved = [x for x in saved if x[0] is not None]
    for obj, attr, label, wrap in targets:
        if hasattr(obj, attr):
            setattr(obj, attr, wrap(label, getattr(obj, attr)))
    zarr.Array.__setitem__ = timed_setitem(zarr.Array.__setitem__)
    for name in ("_BUFFERS", "_CHUNK_BUFFERS"):  # as in a fresh worker
        if isinstance(getattr(execute, name, None), dict):
            getattr(execute, name).clear()
    results = []
    try:
        for task in plan.tasks[:tasks]:
            acc.clear()
            phases.clear()
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            rss = RssTimeline()
            rss.start()
            try:
                t = now()
                # in a non-main thread, like a dask worker's task (numcodecs' Blosc only
                # uses its own threads when called from the main thread)
                with ThreadPoolExecutor(1) as pool:
                    pool.submit(
                        execute.run_task,
                        task,
                        src=plan.source,
                        dest=plan.dest,
                        options=plan.options,
                    ).result()
                total = now() - t
            finally:
                rss.stop()
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            results.append(_task_profile(task.n_samples, total, ru0, ru1, acc, phases, rss))
    finally:
        for obj, attr, orig in saved:
            setattr(obj, attr, orig)
        for name in ("_BUFFERS", "_CHUNK_BUFFERS"):
            if isinstance(getattr(execute, name, None), dict):
                getattr(execute, name).clear()
    first = results[0]
    return {
        **first,
        "next_tasks": results[1:],
        "buffer_mb_expected": round(first["samples"] * schema.PER_SAMPLE_BYTES / 2**20, 1),
    }


def _task_profile(n, total, ru0, ru1, acc, phases, rss) -> dict[str, Any]:
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    acc = dict(acc)
    acc["other (record, open group, NaN marking, ...)"] = total - sum(acc.values())
    base = rss.points[0][1] if rss.points else 0
    by_phase: dict[str, float] = {}
    for name, t0, t1 in phases:
        inside = [v for tt, v in rss.points if t0 <= tt <= t1]
        if inside:
            by_phase[name] = max(by_phase.get(name, 0.0), (max(inside) - base) / 2**20)
    first_write = min(
        (t0 for name, t0, _ in phases if name.startswith(("zarr", "write"))), default=None
    )
    before_writes = [v for tt, v in rss.points if first_write is None or tt <= first_write]
    return {
        "samples": n,
        "total_s": round(total, 3),
        "ms_per_sample": round(total / n * 1e3, 3),
        "process_cpu_over_wall": round(cpu / total, 2),
        "minor_page_faults": ru1.ru_minflt - ru0.ru_minflt,
        "breakdown_ms_per_sample": {
            k: round(v / n * 1e3, 3) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])
        },
        "rss_mb_before_task": round(base / 2**20, 1),
        "rss_mb_peak": round(max(v for _, v in rss.points) / 2**20, 1),
        "rss_mb_peak_over_before": round((max(v for _, v in rss.points) - base) / 2**20, 1),
        "rss_mb_over_before_at_first_write": round(
            (max(before_writes, default=base) - base) / 2**20, 1
        ),
        "rss_mb_peak_over_before_by_phase": {k: round(v, 1) for k, v in by_phase.items()},
    }


class RssTimeline(threading.Thread):
    """This process's RSS every 10 ms, as (perf_counter, bytes) points."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.points: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.points.append((now(), self.proc.memory_info().rss))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def profile_normalized(ds, normalized, n: int) -> dict[str, Any]:
    """Samples/s of each normalized variable alone next to a raw read of its inputs."""
    inputs = {
        "rtc": ["rtc", "rtc_present"],
        "dem": ["dem"],
        "dem_relief": ["dem"],
        "slope": ["slope_deg"],
        "inc_angle": ["inc_angle"],
        "ifg": ["ifg"],
        "coh": ["coh"],
    }
    out = {}
    for name in normalized.data_vars:
        raw = inputs.get(name, [name])
        out[name] = {
            "normalized_sps": round(n / scan_dask(normalized, [name]), 1),
            "raw_inputs_sps": round(n / scan_dask(ds, raw), 1),
        }
    return out


def profile_read_shard(store: Path, shard: int) -> dict[str, Any]:
    """Time to read the first Zarr shard of ``rtc`` with zarr-python vs tensorstore."""
    from nasar_zarr import store as nstore

    arr = nstore.open_group(str(store))["rtc"]
    stop = min(shard, arr.shape[0])
    t = now()
    arr[:stop]
    zarr_s = now() - t
    ts_arr = ts_open(store, ["rtc"])["rtc"]
    t = now()
    ts_arr[:stop].read().result()
    ts_s = now() - t
    return {
        "samples": stop,
        "zarr_python_ms_per_sample": round(zarr_s / stop * 1e3, 3),
        "tensorstore_ms_per_sample": round(ts_s / stop * 1e3, 3),
        "inner_chunks_per_shard": stop // max(1, arr.chunks[0]),
    }


# ---------------------------------------------------------------------------- what-ifs
# Measured alternatives that back the recommendations in README.md; the library
# is not changed, these build the alternative in the benchmark itself.


def convert_with_client_env(src: Path, dest: Path, *, workers: int, environ: dict) -> dict:
    """:func:`convert_with_client` with ``distributed.nanny.pre-spawn-environ`` overridden.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker; setting it
    (to anything) also turns off glibc's dynamic mmap threshold, so every
    ~1.2 MB sample buffer is a fresh ``mmap`` + page faults. ``None`` unsets it.
    """
    import dask

    saved = {k: os.environ.pop(k) for k in environ if k in os.environ}
    try:
        with dask.config.set(
            {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()}
        ):
            return convert_with_client(src, dest, workers=workers)
    finally:
        os.environ.update(saved)


class TSArray:
    """A minimal array wrapper so ``dask.array.from_array`` reads through tensorstore."""

    def __init__(self, arr):
        self.arr = arr
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype.numpy_dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        return self.arr[key].read().result()


def cube_over_tensorstore(ds, store: Path):
    """``ds`` (from open_cube) with every data variable read by tensorstore, same chunks."""
    import dask.array as da

    arrays = ts_open(store, list(ds.data_vars))
    return ds.assign(
        {
            name: (
                ds[name].dims,
                da.from_array(
                    TSArray(arrays[name]),
                    chunks=ds[name].data.chunks,
                    asarray=False,
                    lock=False,
                    meta=np.empty((0,) * ds[name].ndim, dtype=ds[name].dtype),
                ),
                ds[name].attrs,
            )
            for name in ds.data_vars
        }
    )


def _rtc_block(x, low, high, gain):
    y = np.multiply(x, gain, dtype=np.float32)
    np.log1p(y, out=y)
    np.clip(y, low, high, out=y)
    y -= low
    y /= high - low
    return y


def _relief_block(dem, percentiles):
    from nasar_zarr.normalize import relief_kernel

    if np.isnan(dem).any():
        return relief_kernel(dem, percentiles=percentiles)
    values = dem.astype(np.float64)
    flat = values.reshape(*values.shape[:-2], -1)
    lo, hi = np.percentile(flat, list(percentiles), axis=-1)
    lo, hi = lo[..., None, None], hi[..., None, None]
    span = hi - lo
    span = np.where(span > 0, span, 1.0)
    return ((np.clip(values, lo, hi) - lo) / span).astype(np.float32)


def normalized_fused(ds):
    """The same values as ``ds.nasar.normalized()`` (default options), fewer passes.

    rtc: ``log1p``, clip, subtract, divide in place on one float32 buffer, and no
    ``rtc_present`` mask (with the default ranges p1 > 0 a zero channel already
    maps to exactly 0); dem_relief: ``np.percentile`` when the block has no NaN.
    """
    import xarray as xr

    from nasar_zarr import normalize

    out = dict(ds.nasar.normalized().data_vars)
    pol_axis = ds["rtc"].dims.index("pol")
    shape = [1] * ds["rtc"].ndim
    shape[pol_axis] = 2
    bounds = np.array([normalize.RTC_RANGES[str(p)] for p in ds["pol"].values], np.float32)
    low, high = bounds[:, 0].reshape(shape), bounds[:, 1].reshape(shape)
    rtc = ds["rtc"].data.map_blocks(
        _rtc_block, low, high, np.float32(normalize.RTC_GAIN), dtype=np.float32
    )
    out["rtc"] = out["rtc"].copy(data=rtc)
    relief = ds["dem"].data.map_blocks(
        _relief_block, normalize.RELIEF_PERCENTILES, dtype=np.float32
    )
    out["dem_relief"] = out["dem_relief"].copy(data=relief)
    return xr.Dataset(out, coords=ds.coords, attrs=ds.attrs)


def check_same(a, b, n: int = 64) -> bool:
    """Bit-identical (NaN where NaN) on the first ``n`` samples of every variable."""
    for name in a.data_vars:
        x = a[name].isel(sample=slice(0, n)).values
        y = b[name].isel(sample=slice(0, n)).values
        if not np.array_equal(x, y, equal_nan=True):
            return False
    return True


def graph_alternatives_1m(path: Path) -> dict[str, Any]:
    """Task counts of a full ``mean()`` at 1.1 M samples under other chunkings (graph only)."""
    import warnings

    import dask
    import xarray as xr

    from nasar_zarr import store as nstore
    from nasar_zarr.cube import open_cube

    def count(obj):
        (opt,) = dask.optimize(obj)
        return {"tasks": len(obj.__dask_graph__()), "tasks_optimized": len(opt.__dask_graph__())}

    ds = open_cube(str(path))
    out = {}
    with dask.config.set(split_every={0: 32}):
        out["one shard per chunk, split_every={0: 32}"] = count(ds.mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = xr.open_zarr(nstore.zarr_store(str(path), read_only=True), chunks=None, zarr_format=3)
    shard = nstore.read_provenance(ds.attrs)["layout"]["shard"]
    for target_mb in (256, 512):
        sizes = {}
        for name, var in raw.data_vars.items():
            per_sample = var.dtype.itemsize * int(np.prod(var.shape[1:]))
            k = max(shard, (target_mb * 2**20 // per_sample) // shard * shard)
            sizes[name] = int(min(k, var.shape[0]))
        alt = raw.assign(
            {
                name: var.variable.chunk({"sample": sizes[name]})
                for name, var in raw.data_vars.items()
            }
        )
        with dask.config.set(split_every={0: 32}):
            out[f"per-variable chunks of ~{target_mb} MB (whole shards), split_every={{0: 32}}"] = {
                **count(alt.mean()),
                "samples_per_chunk": sizes,
            }
    return out


# ---------------------------------------------------------------------------- PyTorch loaders


def release_loader_item(sample: dict[str, Any]) -> dict[str, Any]:
    """The release InSAR loader's pattern for one WebDataset sample: npz decode, the card's
    transforms (the same numpy kernels as ``nasar_zarr.normalize``), torch tensors."""
    import torch

    from nasar_zarr import normalize as nn

    arrays = _load_npz(sample["npz"])
    low = np.array([r[0] for r in nn.RTC_RANGES.values()], np.float32)[:, None, None]
    high = np.array([r[1] for r in nn.RTC_RANGES.values()], np.float32)[:, None, None]
    out = {}
    for view in (0, 1):
        for t in ("prime", "secondary"):
            x = arrays[f"{t}_rtc_view_{view}"]
            present = x.any(axis=(1, 2))[:, None, None]
            out[f"{t}_rtc_view_{view}"] = nn.rtc_kernel(
                x, present, low, high, gain=np.float32(nn.RTC_GAIN)
            )
        for name in ("inc_angle", "ifg", "coh"):
            out[f"{name}_view_{view}"] = arrays[f"{name}_view_{view}"]
    dem, slope = arrays["dem"], arrays["slope_deg"]
    derived = {
        "dem": nn.clip_and_rescale(dem, *map(np.float32, nn.DEM_RANGE)),
        "dem_relief": nn.relief_kernel(dem, percentiles=nn.RELIEF_PERCENTILES),
        "slope": nn.clip_and_rescale(slope, *map(np.float32, nn.SLOPE_RANGE)),
    }
    for name, values in derived.items():
        for view in (0, 1):
            out[f"{name}_view_{view}"] = values
    item = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in out.items()}
    item["sample_key"] = sample["__key__"]
    return item


def release_wds_dataset(urls: Sequence[Path]):
    """WebDataset over the tars in streaming order, one tar per worker at a time."""
    import webdataset as wds

    return wds.WebDataset([str(u) for u in urls], shardshuffle=False, empty_check=False).map(
        release_loader_item
    )


def wds2_pass(urls: Sequence[Path]) -> tuple[int, float]:
    """:func:`wds_pass` in two spawned processes, tars split between them (warm imports).

    Returns the samples decoded and the wall seconds from the start of both passes
    to the end of the slower one.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    halves = [list(urls[0::2]), list(urls[1::2])]
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_import_webdataset, range(2)))  # start both, import, before the clock
        t = now()
        results = list(pool.map(wds_pass, halves))
        wall = now() - t
    return sum(r[0] for r in results), wall


def _import_webdataset(_: int) -> bool:
    import webdataset  # noqa: F401

    return True


def analysis_scan(store: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the mean of every variable through ``open_cube``.

    The default ``open_cube`` (dask chunks of whole shards, the fast reader), one
    ``dask.compute`` of ``ds[v].mean()`` for every data variable, threaded
    scheduler: what an analysis does with the cube (each chunk streamed through
    :mod:`nasar_zarr.streaming`, never held whole).
    """
    import dask

    from nasar_zarr import open_cube

    ds = open_cube(str(store))
    means = [ds[name].mean() for name in ds.data_vars]
    c = cpu_seconds()
    t = now()
    dask.compute(*means, scheduler="threads")
    return now() - t, cpu_seconds() - c


def materialize_scan(store: Path) -> tuple[float, float]:
    """Wall and CPU seconds to read every dask block of every variable of ``open_cube``
    as numpy (:func:`scan_dask`): the floor a reduction is compared with."""
    from nasar_zarr import open_cube

    ds = open_cube(str(store))
    c = cpu_seconds()
    wall = scan_dask(ds, list(ds.data_vars))
    return wall, cpu_seconds() - c


def reduction_scan(store: Path, op: str) -> float:
    """Wall seconds of ``ds[v].<op>()`` for every variable (one threaded compute)."""
    import dask

    from nasar_zarr import open_cube

    ds = open_cube(str(store))
    results = [getattr(ds[name], op)() for name in ds.data_vars]
    t = now()
    dask.compute(*results, scheduler="threads")
    return now() - t


def analysis_histogram(store: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``ds.nasar.histogram()`` (rtc, per pol) over the whole cube."""
    import dask

    from nasar_zarr import open_cube

    ds = open_cube(str(store))
    counts = ds.nasar.histogram()
    c = cpu_seconds()
    t = now()
    dask.compute(counts, scheduler="threads")
    return now() - t, cpu_seconds() - c


def normalized_cpu(store: Path) -> dict[str, float]:
    """CPU seconds of materializing ``ds.nasar.normalized()`` and of the raw read under it.

    The raw read is every variable normalized() reads (rtc, rtc_present, dem, slope_deg,
    inc_angle, ifg, coh); CPU time (all threads) rather than wall time, since the
    machine is shared.
    """
    from nasar_zarr import open_cube

    ds = open_cube(str(store))
    norm = ds.nasar.normalized()
    raw_names = ["rtc", "rtc_present", "dem", "slope_deg", "inc_angle", "ifg", "coh"]
    c = cpu_seconds()
    scan_dask(ds, raw_names)
    raw = cpu_seconds() - c
    c = cpu_seconds()
    scan_dask(norm, list(norm.data_vars))
    return {"raw_cpu_s": raw, "normalized_cpu_s": cpu_seconds() - c}


def tasks_full_reduction(path: Path) -> int:
    """``len(ds.mean().__dask_graph__())`` for the default ``open_cube`` of ``path``."""
    from nasar_zarr import open_cube

    return len(open_cube(str(path)).mean().__dask_graph__())


def analysis_figures(
    corpus: Path, store: Path, *, repeats: int = 2, path_1m: Path | None = None
) -> dict[str, Any]:
    """The analysis read figures, each pass interleaved with a two-process wds pass.

    Keys: ``analysis_scan_sps`` (the mean of every variable), ``wds2_pass_sps``,
    ``analysis_scan_over_wds2``, ``materialize_scan_sps`` (every block read as numpy),
    ``reduction_over_materialize`` (the mean's rate over that; goal >= 0.8), the same
    for ``sum`` and ``max`` (``sum_scan_over_materialize``, ...),
    ``histogram_sps``, ``histogram_over_wds2``, ``normalized_over_raw_cpu``
    (normalized CPU / raw-read CPU; goal <= 1.1), ``tasks_full_reduction_1m`` (with
    ``path_1m``, a metadata-only store from :func:`metadata_store_1m`), and the CPU
    milliseconds per sample of each pass. Best of ``repeats`` for each rate.
    """
    tars = tar_paths(corpus)
    warm_page_cache([*tars, store])
    wds2, scans, mats, hists, norms = [], [], [], [], []
    ops: dict[str, list[float]] = {"sum": [], "max": []}
    n = 0
    for _ in range(repeats):
        n, s = wds2_pass(tars)
        wds2.append(s)
        mats.append(materialize_scan(store))
        scans.append(analysis_scan(store))
        for op in ops:
            ops[op].append(reduction_scan(store, op))
        hists.append(analysis_histogram(store))
        norms.append(normalized_cpu(store))
    wds2_sps = n / min(wds2)
    scan_sps = n / min(w for w, _ in scans)
    mat_sps = n / min(w for w, _ in mats)
    hist_sps = n / min(w for w, _ in hists)
    out: dict[str, Any] = {
        "samples": n,
        "wds2_pass_sps": round(wds2_sps, 1),
        "wds2_pass_sps_each": [round(n / s, 1) for s in wds2],
        "analysis_scan_sps": round(scan_sps, 1),
        "analysis_scan_sps_each": [round(n / w, 1) for w, _ in scans],
        "analysis_scan_cpu_ms_per_sample": round(min(c for _, c in scans) / n * 1e3, 3),
        "analysis_scan_over_wds2": round(scan_sps / wds2_sps, 3),
        "materialize_scan_sps": round(mat_sps, 1),
        "materialize_scan_sps_each": [round(n / w, 1) for w, _ in mats],
        "materialize_scan_cpu_ms_per_sample": round(min(c for _, c in mats) / n * 1e3, 3),
        "reduction_over_materialize": round(scan_sps / mat_sps, 3),
        "reduction_over_materialize_each": [
            round(m / r, 3) for (r, _), (m, _) in zip(scans, mats, strict=True)
        ],
        **{
            f"{op}_scan_over_materialize": round(min(w for w, _ in mats) / min(t), 3)
            for op, t in ops.items()
        },
        "histogram_sps": round(hist_sps, 1),
        "histogram_sps_each": [round(n / w, 1) for w, _ in hists],
        "histogram_cpu_ms_per_sample": round(min(c for _, c in hists) / n * 1e3, 3),
        "histogram_over_wds2": round(hist_sps / wds2_sps, 3),
        "histogram_over_materialize": round(hist_sps / mat_sps, 3),
        "normalized_over_raw_cpu": round(
            min(d["normalized_cpu_s"] / d["raw_cpu_s"] for d in norms), 3
        ),
        "normalized_over_raw_cpu_each": [
            round(d["normalized_cpu_s"] / d["raw_cpu_s"], 3) for d in norms
        ],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "notes": {
            "analysis_scan_over_wds2": "the mean of every variable (default open_cube, one"
            " threaded dask.compute) over wds2_pass_sps; best of interleaved rounds",
            "reduction_over_materialize": "samples/s of that mean over samples/s of reading"
            " every dask block of every variable as numpy (same open_cube, same scheduler),"
            " best of interleaved rounds of each",
        },
    }
    if path_1m is not None:
        out["tasks_full_reduction_1m"] = tasks_full_reduction(path_1m)
    return out
