"""nasar-zarr benchmarks: every figure of benchmarks/README.md in one run.

    python benchmarks/run.py            # 4,092 samples per corpus
    python benchmarks/run.py --quick    # 2,046 samples per corpus (under 10 minutes)
    python benchmarks/run.py --sweep    # layout sweep -> benchmarks/results/sweep.json
    python benchmarks/readme_table.py   # README.md's table from results/latest.json

Like with like: every goal is a ratio against a baseline measured in the same run
on the same cores. The converter runs as shipped (``plan_conversion`` +
``plan.execute`` on the LocalCluster nasar-zarr starts: one single-threaded worker
process per core) and the webdataset baseline runs in as many processes
(``wds2_pass_sps``: two processes, each decoding half of the tars). Both sides
report CPU milliseconds per sample. The corpus exists twice, with stored npz
members (``np.savez``) and with deflated ones (``np.savez_compressed``), and both
are measured side by side. The machine is shared and noisy: each configuration
runs several times, interleaved with the others, and the best run counts. All
reads see a warm OS page cache. Results go to ``benchmarks/results/latest.json``
(each goal as ``{value, goal, holds}`` under ``goals``); the work directory
(corpora, stores) is ``benchmarks/work/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import convert_bench as cb  # noqa: E402
import measure as m  # noqa: E402

from nasar_zarr.cube import provenance  # noqa: E402
from nasar_zarr.store import read_provenance  # noqa: E402

# Samples per source tar: not a multiple of the Zarr shard (512), so tasks span tars,
# and 6 x 341 = 2,046 samples make 4 tasks of (almost) equal size, so that two
# workers are not limited by an odd task left over.
PER_TAR = 341
SWEEP_PER_TAR = 255  # the sweep: 5 x 255 = 1,275 samples
SEED = 7
FULL_COUNTS_1M = [12084] * 90 + [12044]  # 1,099,604 samples in 91 tars, as the release
GOALS: dict[str, tuple[str, float]] = {  # key: (comparison, target)
    "convert_over_wds2": (">=", 0.8),
    "convert_over_wds2_deflated": (">=", 1.2),
    "speedup_2_workers": (">=", 1.8),
    "peak_rss_mb_per_worker": ("<=", 1000),
    "rss_growth_200_tasks": ("<=", 0.10),
    "random_p50_ms": ("<=", 1.0),
    "random_p99_ms": ("<=", 3.0),
    "store_over_tar": ("<=", 0.75),
    "store_over_tar_deflated": ("<=", 0.95),
    "open_s_1m": ("<=", 1.0),
    # read keys (issue 10), loader keys (issue 11), remote keys (issue 14), scale keys
    # (issue 15): filled in by their scripts when present
    "analysis_scan_over_wds2": (">=", 2.0),
    "histogram_over_wds2": (">=", 2.0),
    "reduction_over_materialize": (">=", 0.8),  # issue 20: reductions stream
    "tasks_full_reduction_1m": ("<=", 5000),
    "normalized_over_raw_cpu": ("<=", 1.1),
    "loader_over_wds_loader": (">=", 2.0),
    "loader_random_over_wds_loader": (">=", 1.0),
    # trainer keys (issues 23, 24): benchmarks/loader_bench.py
    "loader_fast_over_wds_loader": (">=", 3.5),
    "loader_fork_over_forkserver": (">=", 0.9),
    "first_batch_s": ("<=", 1.0),
    "train_over_min_loader_model": (">=", 0.85),
    "loader_raw_ms_per_sample_worker": ("<=", 1.5),
    "loader_stacked_over_dict": (">=", 2.0),
    "gpu_train_vit_s_sps": (">=", 5000),
    "plan_bytes_over_corpus": ("<=", 0.01),
    "execute_bytes_over_corpus": ("<=", 1.05),
    "requests_per_shard_object_written": ("<=", 3),
    # S3 write requests (issue 21): s3_requests_bench.py
    "s3_requests_per_object_written": ("<=", 1.2),
    "s3_fixed_requests": ("<=", 150),
    # the cube where it lives (issue 20): remote_read_bench.py
    "remote_scan_over_local_scan": (">=", 0.8),
    "remote_scan_over_wds_stream_20ms": (">=", 4.0),
    "remote_isel_bytes_over_needed": ("<=", 1.2),
    "remote_random_p50_ms_20ms": ("<=", 60),
    "remote_random_p99_ms_20ms": ("<=", 150),
    "remote_loader_over_wds_stream_loader_20ms": (">=", 1.5),
    "remote_loader_over_local_loader": (">=", 0.9),
    "plan_s_1m": ("<=", 20),
    "plan_rss_mb_1m": ("<=", 1000),
    "run_client_rss_mb_1m": ("<=", 1500),
    "plan_json_mb_1m": ("<=", 50),
    "terminal_lines_1m_rejected": ("<=", 50),
}
# Scripts of other parts of the benchmark, each printing one JSON object; run when the
# file exists. (script, arguments, modes it runs in, seconds allowed)
SCRIPTS = [
    ("analysis_bench.py", [str(HERE / "work" / "analysis")], ("quick", "full"), 240),
    ("loader_bench.py", [], ("quick", "full"), 240),
    ("remote_bench.py", [], ("quick", "full"), 180),
    ("s3_requests_bench.py", [], ("quick", "full"), 180),
    ("remote_read_bench.py", [], ("quick", "full"), 600),
    ("scale_bench.py", [], ("scale",), 900),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    import psutil

    versions = {}
    for name in (
        "numpy",
        "xarray",
        "zarr",
        "dask",
        "distributed",
        "tensorstore",
        "webdataset",
        "numcodecs",
        "isal",
        "zlib-ng",
        "nasar-zarr",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--", "../nasar_zarr"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        versions["nasar_zarr_commit"] = commit + (" (nasar_zarr/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        versions["nasar_zarr_commit"] = None
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None
            )
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "versions": versions,
    }


def ensure_corpus(
    work: Path, n_tars: int, fresh: bool, per_tar: int = PER_TAR, compressed: bool = False
) -> tuple[Path, int]:
    """Write the synthetic corpus unless the same one is already there (it is deterministic)."""
    from nasar_zarr.testing import write_corpus

    root = work / f"corpus-{n_tars}x{per_tar}{'-deflated' if compressed else ''}"
    marker = root / "benchmark-corpus.json"
    want = {"n_tars": n_tars, "per_tar": per_tar, "seed": SEED, "compressed": compressed}
    if not fresh and marker.exists() and json.loads(marker.read_text()) == want:
        log(f"corpus: reusing {root} ({n_tars * per_tar} samples)")
        return root, n_tars * per_tar
    if root.exists():
        shutil.rmtree(root)
    t = time.perf_counter()
    info = write_corpus(
        root, n_shards=n_tars, samples_per_shard=per_tar, seed=SEED, compressed=compressed
    )
    marker.write_text(json.dumps(want))
    log(
        f"corpus: wrote {info.n_samples} samples in {n_tars} tars"
        f"{' (deflated npz)' if compressed else ''} in {time.perf_counter() - t:.1f} s"
    )
    return root, info.n_samples


def best_sps(n: int, seconds: list[float]) -> float:
    return n / min(seconds)


def goal_status(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (op, target) in GOALS.items():
        value = results.get(key)
        holds = None if value is None else (value >= target if op == ">=" else value <= target)
        out[key] = {"value": value, "goal": f"{op} {target}", "holds": holds}
    return out


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_table(results: dict[str, Any], rows: list[tuple[str, str]], echo: bool = True) -> str:
    goals = results.get("goals", {})
    lines = ["| figure | value | goal | holds |", "|---|---:|---|---|"]
    for key, note in rows:
        g = goals.get(key)
        goal = g["goal"] if g else ""
        holds = "" if not g else {True: "yes", False: "**no**", None: "not measured"}[g["holds"]]
        label = f"`{key}`" + (f" ({note})" if note else "")
        lines.append(f"| {label} | {fmt(results.get(key))} | {goal} | {holds} |")
    text = "\n".join(lines)
    if echo:
        print(text)
    return text


def merge_script(results: Path, name: str) -> dict[str, Any]:
    """Run one part's script on its own and merge its keys into an earlier results file.

    The merge is recorded under ``merged`` (script, time, load average), since those
    keys then come from another run than the rest of the file.
    """
    (sargs, _, timeout) = next((a, m, t) for n, a, m, t in SCRIPTS if n == name)
    r = json.loads(results.read_text())
    load_start = os.getloadavg()
    data = run_script(name, sargs, timeout)
    if data is None or "error" in data:
        raise SystemExit(f"{name}: {data}")
    r.setdefault("scripts", {})[name] = data
    for k in GOALS:
        if k in data and not isinstance(data[k], dict):
            r[k] = data[k]
    if isinstance(data.get("notes"), dict):
        r.setdefault("notes", {}).update(data["notes"])
    r.setdefault("merged", {})[name] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": machine_info()["versions"]["nasar_zarr_commit"],
        "loadavg": [load_start, os.getloadavg()],
    }
    r["goals"] = goal_status(r)
    return r


def run_script(name: str, args: list[str], timeout: int) -> dict[str, Any] | None:
    """Run ``benchmarks/NAME`` and parse the JSON object it prints; None if absent."""
    path = HERE / name
    if not path.exists():
        return None
    t = time.perf_counter()
    try:
        res = subprocess.run(
            [sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        log(f"{name}: no result within {timeout} s")
        return {"error": f"timed out after {timeout} s"}
    if res.returncode:
        log(f"{name}: failed ({res.returncode}): {res.stderr.strip()[-500:]}")
        return {"error": res.stderr.strip()[-2000:]}
    out = res.stdout
    try:
        data = json.loads(out[out.index("{") : out.rindex("}") + 1])
    except ValueError:
        return {"error": "no JSON object in its output: " + out[-500:]}
    log(f"{name}: {time.perf_counter() - t:.0f} s")
    return data


# ---------------------------------------------------------------------------- main run


def run_main(args) -> dict[str, Any]:
    import nasar_zarr  # noqa: F401  (registers ds.nasar)
    from nasar_zarr import source
    from nasar_zarr.cube import open_cube

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    n_tars = 6 if args.quick else 12
    if args.samples:
        n_tars = max(2, 2 * round(args.samples / PER_TAR / 2))
    t_start = time.perf_counter()
    r: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine_info()}
    notes: dict[str, str] = {}
    reps = args.repeats or (2 if args.quick else 3)

    corpora = {}
    for kind, compressed in (("stored", False), ("deflated", True)):
        root, n = ensure_corpus(work, n_tars, args.fresh, compressed=compressed)
        tars = m.tar_paths(root)
        corpora[kind] = {
            "root": root,
            "n": n,
            "tars": tars,
            "tar_bytes": sum(p.stat().st_size for p in tars),
        }
        m.warm_page_cache(tars)
    n = corpora["stored"]["n"]
    r.update(
        n_samples=n,
        n_tars=n_tars,
        tar_bytes=corpora["stored"]["tar_bytes"],
        tar_bytes_deflated=corpora["deflated"]["tar_bytes"],
        inflater=source.INFLATER,
    )

    # -- conversions and their baselines, interleaved: each round runs the webdataset
    # pass in 2 and 1 processes and the library conversion on the shipped cluster with
    # 2 and 1 workers, on both corpora; the best of the rounds counts.
    store = {"stored": work / "cube.zarr", "deflated": work / "cube-deflated.zarr"}
    scratch = work / "cube-scratch.zarr"
    pools = {w: cb.WdsPool(w) for w in (2, 1)}
    clusters = {w: cb.ShippedCluster(w) for w in (2, 1)}
    r["cluster_start_s"] = {f"{w}_workers": round(c.start_s, 2) for w, c in clusters.items()}
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(reps):
            for kind in ("stored", "deflated"):
                c = corpora[kind]
                for w in (2, 1):
                    # the 1-process pass is for reference only: once in --quick
                    if not (w == 1 and rep and args.quick):
                        res = pools[w].run(c["tars"])
                        assert res["n"] == c["n"], res
                        runs.setdefault(f"wds{w}_{kind}", []).append(res)
                    if w == 1 and kind == "deflated":
                        continue  # the deflated speedup is not a goal; save the time
                    dest = store[kind] if (w == 2 and rep == reps - 1) else scratch
                    res = cb.convert(clusters[w], c["root"], dest)
                    runs.setdefault(f"convert_{w}w_{kind}", []).append(res)
                    log(
                        f"{kind}: webdataset {w} proc {runs[f'wds{w}_{kind}'][-1]['sps']:.0f}"
                        f" sps, convert {w} worker(s) {res['sps']:.0f} sps (tasks"
                        f" {res['tasks_s']:.2f} s of {res['wall_s']:.2f} s)"
                    )
    finally:
        for pool in pools.values():
            pool.close()
        for cluster in clusters.values():
            cluster.close()
    shutil.rmtree(scratch, ignore_errors=True)

    def best(key: str, by: str = "wall_s") -> dict[str, Any]:
        return min(runs[key], key=lambda x: x[by])

    for kind, suffix in (("stored", ""), ("deflated", "_deflated")):
        wds2, wds1 = best(f"wds2_{kind}"), best(f"wds1_{kind}")
        conv = best(f"convert_2w_{kind}")
        r[f"wds2_pass_sps{suffix}"] = round(wds2["sps"], 1)
        r[f"wds_pass_sps{suffix}"] = round(wds1["sps"], 1)
        r[f"wds2_cpu_ms_per_sample{suffix}"] = round(wds2["cpu_ms_per_sample"], 3)
        r[f"convert_sps{suffix}"] = round(conv["sps"], 1)
        r[f"convert_over_wds2{suffix}"] = round(conv["sps"] / wds2["sps"], 3)
        r[f"convert_cpu_ms_per_sample{suffix}"] = round(conv["cpu_ms_per_sample"], 3)
        r[f"convert_worker_cpu_ms_per_sample{suffix}"] = round(conv["worker_cpu_ms_per_sample"], 3)
        r[f"convert_serial_s{suffix}"] = round(conv["serial_s"], 2)
    one, two = best("convert_1w_stored", "tasks_s"), best("convert_2w_stored", "tasks_s")
    r["speedup_2_workers"] = round(one["tasks_s"] / two["tasks_s"], 3)
    r["speedup_2_workers_execute"] = round(
        best("convert_1w_stored")["wall_s"] / best("convert_2w_stored")["wall_s"], 3
    )
    r["convert_1_worker_sps"] = round(n / best("convert_1w_stored")["wall_s"], 1)
    notes["convert_over_wds2"] = (
        "samples/s of plan_conversion + plan.execute(client=...) on the shipped LocalCluster"
        " (nasar_zarr.runner.local_cluster, 2 single-threaded worker processes, started"
        " before the clock) over samples/s of a decode-only webdataset pass in 2 processes"
        " (a pool started before the clock, each decoding half of the tars); best of"
        f" {reps} interleaved runs each. _cpu_ms_per_sample: CPU of every process involved"
        " (workers + this process for the converter; both pool processes for webdataset)"
    )
    notes["speedup_2_workers"] = (
        "the task phase (execute's run_plan_tasks: first submission to last record) on the shipped"
        " cluster with 1 vs 2 workers; _execute: plan + execute, which adds the serial part"
        " (plan, skeleton, consolidated metadata: convert_serial_s) that does not depend on"
        " the workers"
    )

    # -- the CLI, end to end, as a user runs it (default workers: one per core)
    cli = {}
    for kind in ("stored", "deflated"):
        c = corpora[kind]
        cli[kind] = m.run_cli_convert(
            c["root"], scratch, workers=os.cpu_count() or 1, log=work / f"cli-{kind}.log"
        )
        log(
            f"CLI convert {kind}: {cli[kind]['wall_s']:.1f} s, workers peak RSS"
            f" {cli[kind]['peak_rss_mb_workers']} MB"
        )
    shutil.rmtree(scratch, ignore_errors=True)
    r["convert_sps_cli"] = round(n / cli["stored"]["wall_s"], 1)
    r["convert_over_wds2_cli"] = round(r["convert_sps_cli"] / r["wds2_pass_sps"], 3)
    r["convert_sps_cli_deflated"] = round(n / cli["deflated"]["wall_s"], 1)
    r["convert_over_wds2_cli_deflated"] = round(
        r["convert_sps_cli_deflated"] / r["wds2_pass_sps_deflated"], 3
    )
    notes["convert_sps_cli"] = (
        "`nasar-zarr convert SRC DEST` end to end (interpreter start,"
        " LocalCluster start and close included)"
    )
    peaks = [v for x in cli.values() for v in x["peak_rss_mb_workers"]]
    peaks += [
        v
        for k, xs in runs.items()
        if k.startswith("convert")
        for x in xs
        for v in x["peak_rss_mb_workers"]
    ]
    r["peak_rss_mb_per_worker"] = max(peaks)
    notes["peak_rss_mb_per_worker"] = (
        "max over worker processes of their kernel RSS high-water mark (VmHWM): read inside"
        " each worker after every library conversion, polled from /proc during the CLI runs"
    )

    # -- memory over a long run: one worker, hundreds of tasks
    growth = cb.rss_growth(corpora["stored"]["root"], scratch, shard=8)
    shutil.rmtree(scratch, ignore_errors=True)
    r["rss_growth"] = growth
    r["rss_growth_200_tasks"] = growth["growth"] if growth["tasks"] >= 200 else None
    notes["rss_growth_200_tasks"] = (
        f"one shipped worker converting the stored corpus at shard 8 ({growth['tasks']} tasks):"
        " its VmHWM at the end over its VmHWM when 20 task records existed, minus 1"
    )
    log(f"rss growth: {growth}")

    # -- profile of one task, and the floor on the same samples
    if not args.no_profile:
        for kind in ("stored", "deflated"):
            prof = cb.profile_task(corpora[kind]["root"], work / "cube-profile.zarr")
            r[f"profile_convert_task_{kind}"] = prof
            log(
                f"profile {kind}: task {prof['task_cpu_ms_per_sample']} CPU ms/sample, floor"
                f" {prof['floor_total_ms_per_sample']} ms/sample {prof['floor_ms_per_sample']}"
            )

    # -- store size
    for kind, suffix in (("stored", ""), ("deflated", "_deflated")):
        r[f"store_over_tar{suffix}"] = round(
            m.tree_bytes(store[kind]) / corpora[kind]["tar_bytes"], 4
        )
    r["store_bytes"] = m.tree_bytes(store["stored"])

    # -- reads (warm)
    path = store["stored"]
    m.warm_page_cache([path])
    ds = open_cube(str(path))
    layout = provenance(ds)["layout"]
    r["layout"] = layout
    names = [v for v in m.DATA_VARS if v in ds.data_vars]
    dask_s = [m.scan_dask(ds, names) for _ in range(2)]
    ts_arrays = m.ts_open(path, names)
    scans = {
        "xarray_dask_open_cube": best_sps(n, dask_s),
        "tensorstore": best_sps(
            n, [m.scan_tensorstore(ts_arrays, layout["shard"]) for _ in range(2)]
        ),
    }
    reader = m.cube_reader(path)
    if reader is not None:
        key = f"CubeReader_{reader.engine}"
        scans[key] = best_sps(n, [m.scan_reader(reader, layout["shard"]) for _ in range(2)])
    r["scan_sps_by_path"] = {k: round(v, 1) for k, v in scans.items()}
    r["scan_over_wds2_by_path"] = {k: round(v / r["wds2_pass_sps"], 3) for k, v in scans.items()}
    r["analysis_scan_sps"] = round(scans["xarray_dask_open_cube"], 1)
    r["analysis_scan_over_wds2"] = r["scan_over_wds2_by_path"]["xarray_dask_open_cube"]
    notes["analysis_scan_over_wds2"] = (
        "all 8 variables through open_cube + dask (threaded scheduler), best of 2 passes,"
        " over wds2_pass_sps; replaced by benchmarks/analysis_bench.py's figure when present"
    )
    log("scan: " + ", ".join(f"{k} {v:.0f} sps" for k, v in scans.items()))
    rng = np.random.default_rng(SEED)
    order = rng.permutation(n)
    n_rand = 400 if args.quick else 1000
    rand = {
        "tensorstore": m.random_tensorstore(ts_arrays, order[: n_rand + 30], 30),
        "zarr_python": m.random_zarr(path, names, order[: 100 + 10], 10),
    }
    if reader is not None:
        rand[key] = m.random_reader(reader, order[: n_rand + 30], 30)
    tar_rand = m.random_tar(corpora["stored"]["root"], order[: n_rand + 30], 30)
    best_path = key if reader is not None else "tensorstore"
    r["read_path_recommended"] = best_path
    r["random_by_path"] = rand
    r["random_tar"] = tar_rand
    for q in ("p50", "p90", "p99"):
        r[f"random_{q}_ms"] = rand[best_path].get(f"{q}_ms")
        r[f"random_tar_{q}_ms"] = tar_rand.get(f"{q}_ms")
    notes["random_p50_ms"] = (
        f"one whole sample (all 8 variables) at a random index through"
        f" {best_path}, {n_rand} reads after 30 warm-up reads"
    )
    log(
        "random p50/p99: "
        + ", ".join(f"{k} {v['p50_ms']}/{v.get('p99_ms')} ms" for k, v in rand.items())
    )

    # -- normalized vs raw, CPU (same dask chunks, same scheduler, interleaved)
    try:
        normalized = ds.nasar.normalized()
        norm_names = list(normalized.data_vars)
        cpu = {"raw": [], "normalized": []}
        for _ in range(3):
            for what, dset, vs in (("raw", ds, names), ("normalized", normalized, norm_names)):
                c0 = m.cpu_seconds()
                m.scan_dask(dset, vs)
                cpu[what].append(m.cpu_seconds() - c0)
        r["normalized_over_raw_cpu"] = round(min(cpu["normalized"]) / min(cpu["raw"]), 3)
        notes["normalized_over_raw_cpu"] = (
            "CPU seconds (this process, all threads) of materializing every dask block of"
            " ds.nasar.normalized() over the same for the raw cube it reads, best of 3"
            " interleaved passes; replaced by benchmarks/analysis_bench.py's figure when"
            " present"
        )
    except Exception as exc:  # noqa: BLE001
        notes["normalized_over_raw_cpu"] = f"ds.nasar.normalized() unavailable: {exc!r}"
    del ds

    # -- 1 M metadata-only store
    if not args.no_1m:
        path_1m = work / "metadata-1m.zarr"
        build = m.metadata_store_1m(path_1m, FULL_COUNTS_1M)
        g = m.open_and_graph_1m(path_1m)
        r["metadata_1m"] = {**build, **g}
        r["open_s_1m"] = g["open_s_median"]
        r["tasks_full_reduction_1m"] = g["tasks_mean"]
        r["tasks_full_reduction_1m_optimized"] = g["tasks_mean_optimized"]
        notes["tasks_full_reduction_1m"] = (
            "len(ds.mean().__dask_graph__()) with the default open_cube, before optimization,"
            " all 8 data variables"
        )
        notes["open_s_1m"] = "median of 3 open_cube calls after a first one (open_s_first)"
        log(f"1M: open {g['open_s_median']} s, ds.mean() {g['tasks_mean']} tasks")
        if not args.keep:
            shutil.rmtree(path_1m)

    # -- the other parts' scripts
    mode = "quick" if args.quick else "full"
    for name, sargs, modes, timeout in SCRIPTS:
        if mode not in modes and not (args.scale and "scale" in modes):
            continue
        data = run_script(name, sargs, timeout)
        if data is None:
            continue
        r.setdefault("scripts", {})[name] = data
        for k in GOALS:
            if k in data and not isinstance(data[k], dict):
                r[k] = data[k]
        for k, v in data.get("notes", {}).items() if isinstance(data.get("notes"), dict) else ():
            notes[k] = v

    r["runs"] = runs
    r["runs_cli"] = cli
    r["runs_note"] = (
        f"conversions and webdataset passes ran {reps} rounds, interleaved;"
        " figures use the best run of each"
    )
    r["notes"] = notes
    r["machine"]["loadavg_end"] = os.getloadavg()
    r["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    r["goals"] = goal_status(r)
    return r


MAIN_ROWS = [
    ("wds2_pass_sps", "baseline: webdataset, 2 processes, stored npz"),
    ("wds2_cpu_ms_per_sample", ""),
    ("convert_sps", "library, shipped cluster, 2 workers"),
    ("convert_cpu_ms_per_sample", ""),
    ("convert_over_wds2", ""),
    ("wds2_pass_sps_deflated", "baseline, deflated npz"),
    ("wds2_cpu_ms_per_sample_deflated", ""),
    ("convert_sps_deflated", ""),
    ("convert_cpu_ms_per_sample_deflated", ""),
    ("convert_over_wds2_deflated", ""),
    ("convert_over_wds2_cli", "`nasar-zarr convert`, end to end"),
    ("convert_over_wds2_cli_deflated", ""),
    ("speedup_2_workers", "task phase, shipped cluster"),
    ("speedup_2_workers_execute", "plan + execute"),
    ("peak_rss_mb_per_worker", ""),
    ("rss_growth_200_tasks", "one worker, shard 8"),
    ("random_p50_ms", "CubeReader, one whole sample"),
    ("random_p99_ms", ""),
    ("store_over_tar", ""),
    ("store_over_tar_deflated", ""),
    ("open_s_1m", "1,099,604 samples"),
    ("analysis_scan_over_wds2", "open_cube + dask"),
    ("histogram_over_wds2", ""),
    ("reduction_over_materialize", "mean of every variable / reading its blocks"),
    ("tasks_full_reduction_1m", "ds.mean(), default open_cube"),
    ("normalized_over_raw_cpu", "CPU of normalized() over raw"),
    ("loader_over_wds_loader", ""),
    ("loader_random_over_wds_loader", ""),
    ("loader_fast_over_wds_loader", "precision='fast'"),
    ("loader_fork_over_forkserver", ""),
    ("first_batch_s", ""),
    ("train_over_min_loader_model", "small CPU model"),
    ("loader_raw_ms_per_sample_worker", ""),
    ("loader_stacked_over_dict", "stacked bf16 over dict f32"),
    ("gpu_train_vit_s_sps", "GPU machine, ViT-S/16"),
]


# ---------------------------------------------------------------------------- sweep


def run_sweep(args) -> dict[str, Any]:
    import nasar_zarr  # noqa: F401
    from nasar_zarr.cube import open_cube

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    n_tars = 5
    corpus, n = ensure_corpus(work, n_tars, args.fresh, SWEEP_PER_TAR)
    tars = m.tar_paths(corpus)
    tar_bytes = sum(p.stat().st_size for p in tars)
    m.warm_page_cache(tars)
    wds = [m.wds_pass(tars)[1]]
    rows = []
    order = np.random.default_rng(SEED).permutation(n)
    store = work / "sweep.zarr"
    layouts = [
        {"inner_chunk": int(i), "shard": int(s)}
        for s in args.shards.split(",")
        for i in args.inner.split(",")
    ]
    for spec in filter(None, args.codec_rows.split(",")):
        codec, _, level = spec.partition(":")
        layouts.append(
            {
                "inner_chunk": 1,
                "shard": 512,
                "codec": codec,
                **({"clevel": int(level)} if level else {}),
            }
        )
    for opts in layouts:
        convs = [m.convert_in_subprocess(corpus, store, opts) for _ in range(2)]
        conv = {
            "wall_s": min(c["wall_s"] for c in convs),
            "maxrss_mb": max(c["maxrss_mb"] for c in convs),
        }
        layout = read_provenance(json.loads((store / "zarr.json").read_text())["attributes"])
        size = m.tree_bytes(store)
        m.warm_page_cache([store])
        arrays = m.ts_open(store, list(m.DATA_VARS))
        ts_scan = best_sps(n, [m.scan_tensorstore(arrays, opts["shard"]) for _ in range(2)])
        ts_rand = m.random_tensorstore(arrays, order[:230], 30)
        zarr_rand = m.random_zarr(store, list(m.DATA_VARS), order[:60], 10)
        ds = open_cube(str(store))
        dask_scan = best_sps(n, [m.scan_dask(ds, list(m.DATA_VARS)) for _ in range(2)])
        del ds, arrays
        row = {
            "inner_chunk": opts["inner_chunk"],
            "shard": opts["shard"],
            "codec": layout["layout"].get("codec"),
            "clevel": layout["layout"].get("clevel"),
            "write_sps": round(n / conv["wall_s"], 1),
            "write_maxrss_mb": round(conv["maxrss_mb"], 1),
            "store_over_tar": round(size / tar_bytes, 4),
            "random_p50_ms_tensorstore": ts_rand["p50_ms"],
            "random_p90_ms_tensorstore": ts_rand["p90_ms"],
            "random_p50_ms_zarr_python": zarr_rand["p50_ms"],
            "scan_sps_tensorstore": round(ts_scan, 1),
            "scan_sps_dask": round(dask_scan, 1),
        }
        rows.append(row)
        log(json.dumps(row))
        shutil.rmtree(store)
    wds.append(m.wds_pass(tars)[1])
    wds_sps = best_sps(n, wds)
    for row in rows:
        row["scan_over_wds_tensorstore"] = round(row["scan_sps_tensorstore"] / wds_sps, 3)
        row["scan_over_wds_dask"] = round(row["scan_sps_dask"] / wds_sps, 3)
        row["write_over_wds"] = round(row["write_sps"] / wds_sps, 3)
    return {
        "machine": {**machine, "loadavg_end": os.getloadavg()},
        "n_samples": n,
        "n_tars": n_tars,
        "tar_bytes": tar_bytes,
        "wds_pass_sps": round(wds_sps, 1),
        "method": (
            "write: plan + execute(workers=0) in a fresh interpreter, in a non-main"
            " thread as in a dask worker (one process, one core for the codec, no"
            " cluster, glibc malloc defaults), best of 2, maxrss = its VmHWM; reads warm;"
            " random = all 8 variables of one sample; scans = all 8 variables,"
            " tensorstore one shard at a time, dask via open_cube (threaded"
            " scheduler), best of 2 passes"
        ),
        "rows": rows,
    }


def sweep_table(res: dict[str, Any]) -> str:
    cols = [
        "inner_chunk",
        "shard",
        "codec",
        "write_sps",
        "write_maxrss_mb",
        "store_over_tar",
        "random_p50_ms_tensorstore",
        "random_p50_ms_zarr_python",
        "scan_sps_tensorstore",
        "scan_sps_dask",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for row in res["rows"]:
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    text = "\n".join(lines)
    print(text)
    return text


# ---------------------------------------------------------------------------- report


def report(path: Path) -> str:
    """Markdown for README.md from a results file (no measuring): see readme_table.py."""
    import readme_table

    return readme_table.table(json.loads(path.read_text()))


# ---------------------------------------------------------------------------- cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="2,046 samples instead of 4,092")
    p.add_argument(
        "--scale", action="store_true", help="also run scale_bench.py (1.1 M-sample control plane)"
    )
    p.add_argument(
        "--merge",
        metavar="SCRIPT",
        default=None,
        help="run only SCRIPT (e.g. scale_bench.py) and merge its keys into latest.json",
    )
    p.add_argument("--samples", type=int, default=None, help="corpus size (rounded to tars)")
    p.add_argument("--workdir", type=Path, default=HERE / "work")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--sweep", action="store_true", help="run the layout sweep instead")
    p.add_argument(
        "--report",
        type=Path,
        nargs="?",
        const=HERE / "results" / "latest.json",
        default=None,
        help="print README tables from a results file and exit",
    )
    p.add_argument("--inner", default="1,2,4,8,16", help="sweep: inner chunks (samples)")
    p.add_argument("--shards", default="256,512,1024", help="sweep: shards (samples)")
    p.add_argument(
        "--codec-rows",
        default="blosc-zstd:3,zstd:3",
        help="sweep: extra rows at inner chunk 1, shard 512 with these codec:level",
    )
    p.add_argument("--fresh", action="store_true", help="rewrite the corpus even if present")
    p.add_argument("--no-profile", action="store_true", help="skip the conversion profile")
    p.add_argument("--no-1m", action="store_true", help="skip the 1.1 M-sample metadata store")
    p.add_argument("--keep", action="store_true", help="keep the 1 M metadata store")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="rounds of conversions and passes (default: 2 with --quick, else 3)",
    )
    args = p.parse_args(argv)
    if args.report:
        print("\n" + report(args.report))
        return 0
    args.workdir = args.workdir.resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    if args.merge:
        out = args.results / "latest.json"
        res = merge_script(out, args.merge)
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(json.dumps(res["scripts"][args.merge], indent=1, default=str))
    elif args.sweep:
        res = run_sweep(args)
        out = args.results / "sweep.json"
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        sweep_table(res)
    else:
        res = run_main(args)
        out = args.results / "latest.json"
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print()
        print(
            f"{res['n_samples']:,} samples, layout {res['layout']}, "
            f"{res['machine']['cpu_count']} cores, {res['machine']['date']}, "
            f"{res['elapsed_s']} s"
        )
        print_table(res, MAIN_ROWS)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
