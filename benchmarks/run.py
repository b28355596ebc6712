"""nasar-zarr benchmarks: every figure of benchmarks/README.md in one run.

    python benchmarks/run.py            # 4,200 samples (about 9 minutes on 2 cores)
    python benchmarks/run.py --quick    # 1,200 samples (about 3.5 minutes)
    python benchmarks/run.py --sweep    # layout sweep -> benchmarks/results/sweep.json

The machine these run on is shared and noisy, so every goal is a ratio against
a baseline measured in the same run (a decode-only ``webdataset`` pass over the
source tars, measured three times across the run; the best pass is the
baseline), and throughputs are the best of a few passes. All reads see a warm
OS page cache. Results go to ``benchmarks/results/latest.json`` (or
``sweep.json``); the work directory (corpus, stores) is ``benchmarks/work/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure as m  # noqa: E402
from nasar_zarr.cube import provenance  # noqa: E402
from nasar_zarr.store import read_provenance  # noqa: E402

# Samples per source tar: not a multiple of the Zarr shard, so tasks span tars. The main
# run keeps even its N/2 corpus above one default shard (512 samples): a corpus smaller
# than one shard is not what is measured here (and see README.md, "Known issues").
PER_TAR = 300
SWEEP_PER_TAR = 255  # the sweep: 5 x 255 = 1,275 samples
SEED = 7
FULL_COUNTS_1M = [12084] * 90 + [12044]  # 1,099,604 samples in 91 tars, as the release
GOALS = {  # key: (comparison, target)
    "convert_over_wds": (">=", 0.6),
    "speedup_2_workers": (">=", 1.8),
    "peak_rss_mb_per_worker": ("<=", 1000),
    "scan_over_wds": (">=", 1.8),
    "random_p50_ms": ("<=", 2.0),
    "store_over_tar": ("<=", 0.75),
    "open_s_1m": ("<=", 1.0),
    "tasks_full_reduction_1m": ("<=", 5000),
    "normalized_over_raw": (">=", 0.9),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    import psutil

    versions = {}
    for name in ("numpy", "xarray", "zarr", "dask", "distributed", "tensorstore",
                 "webdataset", "numcodecs", "nasar-zarr"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--",
                                "../nasar_zarr"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        versions["nasar_zarr_commit"] = commit + (" (nasar_zarr/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        versions["nasar_zarr_commit"] = None
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "versions": versions,
    }


def ensure_corpus(work: Path, n_tars: int, fresh: bool, per_tar: int = PER_TAR
                  ) -> tuple[Path, int]:
    """Write the synthetic corpus unless the same one is already there (it is deterministic)."""
    from nasar_zarr.testing import write_corpus

    root = work / f"corpus-{n_tars}x{per_tar}"
    marker = root / "benchmark-corpus.json"
    want = {"n_tars": n_tars, "per_tar": per_tar, "seed": SEED}
    if not fresh and marker.exists() and json.loads(marker.read_text()) == want:
        log(f"corpus: reusing {root} ({n_tars * per_tar} samples)")
        return root, n_tars * per_tar
    if root.exists():
        shutil.rmtree(root)
    t = time.perf_counter()
    info = write_corpus(root, n_shards=n_tars, samples_per_shard=per_tar, seed=SEED)
    marker.write_text(json.dumps(want))
    log(f"corpus: wrote {info.n_samples} samples in {n_tars} tars in "
        f"{time.perf_counter() - t:.1f} s")
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
        return "null"
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
        holds = "" if not g else {True: "yes", False: "**no**", None: "n/a"}[g["holds"]]
        label = f"`{key}`" + (f" ({note})" if note else "")
        lines.append(f"| {label} | {fmt(results.get(key))} | {goal} | {holds} |")
    text = "\n".join(lines)
    if echo:
        print(text)
    return text


# ---------------------------------------------------------------------------- main run


def run_main(args) -> dict[str, Any]:
    import nasar_zarr  # noqa: F401  (registers ds.nasar)
    from nasar_zarr.cube import open_cube

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    n_tars = 4 if args.quick else 14
    if args.samples:
        n_tars = max(2, 2 * round(args.samples / PER_TAR / 2))
    if n_tars // 2 * PER_TAR <= 512:
        log("warning: the N/2 corpus is not larger than one default shard (512 samples)")
    t_start = time.perf_counter()
    r: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine_info()}
    notes: dict[str, str] = {}

    corpus, n = ensure_corpus(work, n_tars, args.fresh)
    half = work / "corpus-half"
    n_half = m.half_corpus(corpus, half, n_tars // 2)
    tars = m.tar_paths(corpus)
    tar_bytes = sum(p.stat().st_size for p in tars)
    r.update(n_samples=n, n_samples_half=n_half, n_tars=n_tars, tar_bytes=tar_bytes)
    m.warm_page_cache(tars)

    # -- baseline 1/3
    wds_s, tar_s = [], []
    k, s = m.wds_pass(tars)
    assert k == n
    wds_s.append(s)
    tar_s.append(m.tarfile_pass(tars)[1])
    log(f"baseline: webdataset {n / s:.0f} sps, tarfile {n / tar_s[-1]:.0f} sps")

    # -- conversions: each configuration twice, interleaved; the best wall time counts
    store = work / "cube.zarr"
    scratch = work / "cube-scratch.zarr"
    reps = args.repeats
    cli: dict[int, list] = {1: [], 2: []}
    for rep in range(reps):
        for w in (1, 2):
            dest = store if (w == 2 and rep == reps - 1) else scratch
            cli[w].append(m.run_cli_convert(corpus, dest, workers=w,
                                            log=work / f"cli-{w}w-{rep}.log"))
            log(f"convert CLI {w} worker(s): {cli[w][-1]['wall_s']:.1f} s, workers peak RSS "
                f"{cli[w][-1]['peak_rss_mb_workers']} MB")
    twoh = m.run_cli_convert(half, scratch, workers=2, log=work / "cli-2w-half.log")
    log(f"convert CLI 2 workers, N/2: {twoh['wall_s']:.1f} s, workers peak RSS "
        f"{twoh['peak_rss_mb_workers']} MB")
    one, two = (min(cli[w], key=lambda x: x["wall_s"]) for w in (1, 2))
    warm: dict[int, list] = {1: [], 2: []}
    fix: dict[int, list] = {1: [], 2: []}
    no_trim = {"MALLOC_TRIM_THRESHOLD_": None}
    for _ in range(reps):
        for w in (2, 1):
            warm[w].append(m.convert_with_client(corpus, scratch, workers=w))
            log(f"convert, running cluster, {w} worker(s): {warm[w][-1]['wall_s']:.1f} s")
            if not args.no_experiments:
                fix[w].append(m.convert_with_client_env(corpus, scratch, workers=w,
                                                        environ=no_trim))
                log(f"convert, running cluster without MALLOC_TRIM_THRESHOLD_, {w} worker(s):"
                    f" {fix[w][-1]['wall_s']:.1f} s")
    warm1, warm2 = (min(warm[w], key=lambda x: x["wall_s"]) for w in (1, 2))
    exp: dict[str, Any] = {}
    if fix[1]:
        fix1, fix2 = (min(fix[w], key=lambda x: x["wall_s"]) for w in (1, 2))
        exp["workers_without_malloc_trim_threshold"] = {
            "what": "running LocalCluster as above, with distributed.nanny.pre-spawn-environ."
                    "MALLOC_TRIM_THRESHOLD_ unset (dask sets 65536 by default)",
            "convert_sps_2_workers": round(n / fix2["wall_s"], 1),
            "convert_over_wds_2_workers": None,  # filled in below, with the baseline
            "convert_sps_1_worker": round(n / fix1["wall_s"], 1),
            "speedup_2_workers": round(fix1["wall_s"] / fix2["wall_s"], 3),
            "peak_rss_mb_per_worker": max(max(x["peak_rss_mb_workers"])
                                          for w in (1, 2) for x in fix[w]),
            "runs": fix,
        }
    shutil.rmtree(scratch, ignore_errors=True)

    # -- baseline 2/3
    wds_s.append(m.wds_pass(tars)[1])

    # -- profile of one conversion task (in-process, wrapped timers)
    if not args.no_profile:
        r["profile_convert_task"] = m.profile_convert_task(corpus, work / "cube-profile.zarr")
        shutil.rmtree(work / "cube-profile.zarr")
        log(f"profile: one task {r['profile_convert_task']['ms_per_sample']} ms/sample")

    # -- store size
    store_bytes = m.tree_bytes(store)
    r["store_bytes"] = store_bytes
    r["store_over_tar"] = round(store_bytes / tar_bytes, 4)
    r["store_over_tar_data_only"] = round(m.tree_bytes(store, exclude_prefix="_nasar")
                                          / tar_bytes, 4)
    comp = m.compressed_fraction(corpus, work, 96 if args.quick else 255)
    r["compressed_npz_subset"] = comp
    r["store_over_tar_compressed"] = round(r["store_over_tar"] / comp["fraction"], 4)
    notes["store_over_tar_compressed"] = (
        f"estimated: store bytes over (tar bytes x {comp['fraction']:.4f}), the size ratio of "
        f"np.savez_compressed over np.savez tars of the first {comp['samples']} samples")

    # -- reads (warm)
    m.warm_page_cache([store])
    ds = open_cube(str(store))
    layout = provenance(ds)["layout"]
    r["layout"] = layout
    names = [v for v in m.DATA_VARS if v in ds.data_vars]
    dask_s = [m.scan_dask(ds, names) for _ in range(2)]
    ts_arrays = m.ts_open(store, names)
    ts_s = [m.scan_tensorstore(ts_arrays, layout["shard"]) for _ in range(3)]
    scans = {"xarray_dask_open_cube": best_sps(n, dask_s), "tensorstore": best_sps(n, ts_s)}
    reader = m.cube_reader(store)
    if reader is not None:
        key = f"CubeReader_{reader.engine}"
        scans[key] = best_sps(n, [m.scan_reader(reader, layout["shard"]) for _ in range(3)])
    if not args.no_experiments:
        ds_ts = m.cube_over_tensorstore(ds, store)
        sps = best_sps(n, [m.scan_dask(ds_ts, names) for _ in range(2)])
        exp["dask_over_tensorstore"] = {
            "what": "open_cube's Dataset with each data variable a dask.array.from_array over"
                    " a tensorstore handle (same chunks, threaded scheduler)",
            "scan_sps": round(sps, 1)}
    log("scan: " + ", ".join(f"{k} {v:.0f} sps" for k, v in scans.items()))
    rng = np.random.default_rng(SEED)
    order = rng.permutation(n)
    n_rand = 200 if args.quick else 400
    rand = {
        "tensorstore": m.random_tensorstore(ts_arrays, order[: n_rand + 30], 30),
        "zarr_python": m.random_zarr(store, names, order[: 100 + 10], 10),
        "xarray_dask_open_cube": m.random_xarray(ds, names, order[: 40 + 5], 5),
    }
    if reader is not None:
        rand[key] = m.random_reader(reader, order[: n_rand + 30], 30)
    tar_rand = m.random_tar(corpus, order[: n_rand + 30], 30)
    # The project's own API (CubeReader) is what users are told about when it exists;
    # otherwise the faster of the paths measured.
    best = key if reader is not None else max(scans, key=scans.get)
    r["read_path_recommended"] = best
    notes["scan_sps"] = ("all 8 variables, warm page cache, best of 2-3 passes; the recommended"
                         " path is nasar_zarr.reader.CubeReader when the library has it, else"
                         " the fastest path; every path is in scan_sps_by_path")
    r["scan_sps_by_path"] = {k: round(v, 1) for k, v in scans.items()}
    r["random_by_path"] = rand
    r["random_tar"] = tar_rand
    r["random_p50_ms"] = rand[best]["p50_ms"]
    r["random_p90_ms"] = rand[best]["p90_ms"]
    r["random_tar_p50_ms"] = tar_rand["p50_ms"]
    r["random_tar_p90_ms"] = tar_rand["p90_ms"]
    log("random p50: " + ", ".join(f"{k} {v['p50_ms']} ms" for k, v in rand.items())
        + f", tar {tar_rand['p50_ms']} ms")
    r["profile_read_shard"] = m.profile_read_shard(store, layout["shard"])

    # -- normalized vs raw (same dask chunks, same scheduler, interleaved)
    try:
        normalized = ds.nasar.normalized()
        norm_names = list(normalized.data_vars)
    except Exception as exc:  # noqa: BLE001
        normalized = None
        notes["normalized_over_raw"] = f"ds.nasar.normalized() unavailable: {exc!r}"
    if normalized is not None:
        # Interleaved passes (raw, normalized[, variant]) x 3: the ratio of each adjacent
        # pair, then the median, since the machine's speed drifts between passes.
        raw_s, norm_s, fused_s = [], [], []
        cpu = {"raw": 0.0, "normalized": 0.0, "variant": 0.0}
        fused = None if args.no_experiments else m.normalized_fused(ds)
        for _ in range(3):
            for what, dset, vars_, out in (("raw", ds, names, raw_s),
                                           ("normalized", normalized, norm_names, norm_s),
                                           ("variant", fused, norm_names, fused_s)):
                if dset is None:
                    continue
                c0 = m.cpu_seconds()
                out.append(m.scan_dask(dset, vars_))
                cpu[what] += m.cpu_seconds() - c0
        med = statistics.median
        # CPU seconds of the whole pass (all threads): far less sensitive to the other
        # tenants of the machine than wall time, and both passes are CPU-bound.
        r["normalized_over_raw_cpu"] = round(cpu["raw"] / cpu["normalized"], 3)
        r["cpu_ms_per_sample"] = {k: round(v / 3 / n * 1e3, 3) for k, v in cpu.items() if v}
        if fused is not None:
            exp["normalized_without_mask"] = {
                "what": "same values as ds.nasar.normalized() (checked bit for bit on 64"
                        " samples), rtc computed without the rtc_present input (with the"
                        " default ranges p1 > 0 a zero channel already maps to exactly 0),"
                        " dem_relief with np.percentile when a block has no NaN",
                "identical": m.check_same(normalized, fused),
                "normalized_sps": round(n / med(fused_s), 1),
                "normalized_over_raw": round(med(a / b for a, b in zip(raw_s, fused_s,
                                                                       strict=True)), 3),
                "normalized_over_raw_cpu": round(cpu["raw"] / cpu["variant"], 3)}
        r["raw_dask_sps"] = round(n / med(raw_s), 1)
        r["normalized_sps"] = round(n / med(norm_s), 1)
        pairs = [a / b for a, b in zip(raw_s, norm_s, strict=True)]
        r["normalized_over_raw"] = round(med(pairs), 3)
        r["normalized_over_raw_each"] = [round(x, 3) for x in pairs]
        notes["normalized_over_raw"] = (
            "samples/s of materializing every dask block of ds.nasar.normalized() over the same"
            " for the raw cube (open_cube, threaded scheduler); 3 interleaved pairs, median of"
            " the pair ratios; _cpu: the same from the process's CPU seconds (all threads)")
        r["normalized_variables"] = norm_names
        if not args.no_profile:
            r["profile_normalized"] = m.profile_normalized(ds, normalized, n)
        log(f"normalized: {r['normalized_sps']} sps vs raw {r['raw_dask_sps']} sps")
    else:
        r["normalized_over_raw"] = None
    del ds

    # -- baseline 3/3
    wds_s.append(m.wds_pass(tars)[1])
    tar_s.append(m.tarfile_pass(tars)[1])

    # -- 1 M metadata-only store
    if not args.no_1m:
        path_1m = work / "metadata-1m.zarr"
        build = m.metadata_store_1m(path_1m, FULL_COUNTS_1M)
        g = m.open_and_graph_1m(path_1m)
        r["metadata_1m"] = {**build, **g}
        r["open_s_1m"] = g["open_s_median"]
        r["tasks_full_reduction_1m"] = g["tasks_mean"]
        r["tasks_full_reduction_1m_optimized"] = g["tasks_mean_optimized"]
        r["tasks_full_reduction_1m_chunks_large"] = g.get("tasks_mean_chunks_large")
        if not args.no_experiments:
            exp["tasks_1m_alternatives"] = m.graph_alternatives_1m(path_1m)
        notes["tasks_full_reduction_1m"] = (
            "len(ds.mean().__dask_graph__()) before optimization, all 8 data variables;"
            " after dask.optimize: see tasks_full_reduction_1m_optimized")
        notes["open_s_1m"] = "median of 3 open_cube calls after a first one (open_s_first)"
        log(f"1M: open {g['open_s_median']} s, ds.mean() {g['tasks_mean']} tasks "
            f"({g['tasks_mean_optimized']} optimized)")
        if not args.keep:
            shutil.rmtree(path_1m)

    # -- figures
    wds_sps = best_sps(n, wds_s)
    r["wds_pass_sps"] = round(wds_sps, 1)
    r["wds_pass_sps_each"] = [round(n / s, 1) for s in wds_s]
    r["tarfile_pass_sps"] = round(best_sps(n, tar_s), 1)
    r["convert_sps"] = round(n / two["wall_s"], 1)
    r["convert_over_wds"] = round(r["convert_sps"] / wds_sps, 3)
    if "workers_without_malloc_trim_threshold" in exp:
        e = exp["workers_without_malloc_trim_threshold"]
        e["convert_over_wds_2_workers"] = round(e["convert_sps_2_workers"] / wds_sps, 3)
    r["convert_sps_running_cluster"] = round(n / warm2["wall_s"], 1)
    r["convert_over_wds_running_cluster"] = round(r["convert_sps_running_cluster"] / wds_sps, 3)
    r["convert_1_worker_sps"] = round(n / one["wall_s"], 1)
    r["speedup_2_workers"] = round(warm1["wall_s"] / warm2["wall_s"], 3)
    r["speedup_2_workers_cli"] = round(one["wall_s"] / two["wall_s"], 3)
    notes["speedup_2_workers"] = ("plan + execute with an already running LocalCluster of 1 vs 2"
                                  " worker processes (1 thread each); _cli: end to end")
    peaks = {"N": max(max(x["peak_rss_mb_workers"]) for x in cli[2] + cli[1]),
             "N/2": max(twoh["peak_rss_mb_workers"])}
    r["peak_rss_mb_per_worker"] = max(peaks.values())
    r["peak_rss_mb_per_worker_by_size"] = {f"{n} samples": peaks["N"],
                                           f"{n_half} samples": peaks["N/2"]}
    r["peak_rss_mb_per_worker_library_api"] = max(max(x["peak_rss_mb_workers_vmhwm"])
                                            for w in (1, 2) for x in warm[w])
    notes["peak_rss_mb_per_worker"] = (
        "max over worker processes of their kernel RSS high-water mark (VmHWM, polled from"
        " /proc every 0.25 s while they live) during `nasar-zarr convert"
        " --workers 1 and 2` at N samples and `--workers 2` at N/2; _library_api: the kernel's"
        " high-water mark (VmHWM) read inside each worker (client.run) after the library-API"
        " conversions")
    r["scan_sps"] = round(scans[best], 1)
    r["scan_over_wds"] = round(scans[best] / wds_sps, 3)
    r["scan_over_wds_by_path"] = {k: round(v / wds_sps, 3) for k, v in scans.items()}
    r["experiments"] = exp
    r["runs"] = {"cli_2_workers": cli[2], "cli_1_worker": cli[1], "cli_2_workers_half": twoh,
                 "running_cluster_2_workers": warm[2], "running_cluster_1_worker": warm[1]}
    r["runs_note"] = (f"each configuration ran {reps} times, interleaved; figures use the"
                      " fastest run of each")
    r["notes"] = notes
    r["machine"]["loadavg_end"] = os.getloadavg()
    r["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    r["goals"] = goal_status(r)
    return r


MAIN_ROWS = [
    ("wds_pass_sps", "baseline, samples/s"),
    ("tarfile_pass_sps", "samples/s"),
    ("convert_sps", "CLI, 2 workers, incl. cluster start"),
    ("convert_over_wds", ""),
    ("convert_sps_running_cluster", "library API, 2 workers"),
    ("convert_over_wds_running_cluster", ""),
    ("speedup_2_workers", "running cluster"),
    ("speedup_2_workers_cli", "end to end"),
    ("peak_rss_mb_per_worker", "max at N and N/2"),
    ("peak_rss_mb_per_worker_library_api", "running cluster, VmHWM in the workers"),
    ("scan_sps", "recommended path"),
    ("scan_over_wds", ""),
    ("random_p50_ms", "recommended path"),
    ("random_p90_ms", ""),
    ("random_tar_p50_ms", "tar offsets + np.load"),
    ("store_over_tar", ""),
    ("store_over_tar_compressed", "estimated on a subset"),
    ("open_s_1m", "1,099,604 samples"),
    ("tasks_full_reduction_1m", "ds.mean(), unoptimized"),
    ("tasks_full_reduction_1m_optimized", ""),
    ("tasks_full_reduction_1m_chunks_large", "open_cube(chunks='large')"),
    ("normalized_over_raw", "wall time"),
    ("normalized_over_raw_cpu", "CPU time"),
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
    layouts = [{"inner_chunk": int(i), "shard": int(s)}
               for s in args.shards.split(",") for i in args.inner.split(",")]
    for spec in filter(None, args.codec_rows.split(",")):
        codec, _, level = spec.partition(":")
        layouts.append({"inner_chunk": 1, "shard": 512, "codec": codec,
                        **({"clevel": int(level)} if level else {})})
    for opts in layouts:
        convs = [m.convert_in_subprocess(corpus, store, opts) for _ in range(2)]
        conv = {"wall_s": min(c["wall_s"] for c in convs),
                "maxrss_mb": max(c["maxrss_mb"] for c in convs)}
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
            "inner_chunk": opts["inner_chunk"], "shard": opts["shard"],
            "codec": layout["layout"].get("codec"), "clevel": layout["layout"].get("clevel"),
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
        "n_samples": n, "n_tars": n_tars, "tar_bytes": tar_bytes,
        "wds_pass_sps": round(wds_sps, 1),
        "method": ("write: plan + execute(workers=0) in a fresh interpreter, in a non-main"
                   " thread as in a dask worker (one process, one core for the codec, no"
                   " cluster, glibc malloc defaults), best of 2, maxrss = its VmHWM; reads warm;"
                   " random = all 8 variables of one sample; scans = all 8 variables,"
                   " tensorstore one shard at a time, dask via open_cube (threaded"
                   " scheduler), best of 2 passes"),
        "rows": rows,
    }


def sweep_table(res: dict[str, Any]) -> str:
    cols = ["inner_chunk", "shard", "codec", "write_sps", "write_maxrss_mb", "store_over_tar",
            "random_p50_ms_tensorstore", "random_p50_ms_zarr_python", "scan_sps_tensorstore",
            "scan_sps_dask"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for row in res["rows"]:
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    text = "\n".join(lines)
    print(text)
    return text


# ---------------------------------------------------------------------------- report


def report(path: Path) -> str:
    """Markdown for README.md from a results file (no measuring)."""
    r = json.loads(path.read_text())
    mach = r["machine"]
    out = [f"{r['n_samples']:,} samples ({r['n_tars']} tars, {r['tar_bytes'] / 1e9:.2f} GB),"
           f" layout {r['layout']}, {mach['cpu_count']} cores, {mach['ram_gib']} GiB RAM,"
           f" {mach['date']}, nasar_zarr {mach['versions'].get('nasar_zarr_commit')},"
           f" load average {mach['loadavg_start'][0]:.1f} -> {mach['loadavg_end'][0]:.1f},"
           f" {r['elapsed_s']:.0f} s.", "", print_table(r, MAIN_ROWS, echo=False), ""]
    exp = r.get("experiments", {})
    rows = []
    if "workers_without_malloc_trim_threshold" in exp:
        e = exp["workers_without_malloc_trim_threshold"]
        rows += [("convert, running cluster, 2 workers, MALLOC_TRIM_THRESHOLD_ unset",
                  f"{e['convert_sps_2_workers']} sps = {e['convert_over_wds_2_workers']} x wds",
                  f"{r['convert_sps_running_cluster']} sps"),
                 ("speedup 1 -> 2 workers, MALLOC_TRIM_THRESHOLD_ unset",
                  f"{e['speedup_2_workers']}", f"{r['speedup_2_workers']}"),
                 ("peak RSS per worker, MALLOC_TRIM_THRESHOLD_ unset",
                  f"{e['peak_rss_mb_per_worker']} MB", f"{r['peak_rss_mb_per_worker']} MB")]
    if "dask_over_tensorstore" in exp:
        rows.append(("scan, open_cube's dask graph reading through tensorstore",
                     f"{exp['dask_over_tensorstore']['scan_sps']} sps",
                     f"{r['scan_sps_by_path']['xarray_dask_open_cube']} sps"))
    if "normalized_without_mask" in exp:
        e = exp["normalized_without_mask"]
        rows.append(("normalized over raw (wall; CPU), rtc without the rtc_present input"
                     f" (identical values: {e['identical']})",
                     f"{e['normalized_over_raw']}; {e.get('normalized_over_raw_cpu')}",
                     f"{r['normalized_over_raw']}; {r.get('normalized_over_raw_cpu')}"))
    if "tasks_1m_alternatives" in exp:
        for name, v in exp["tasks_1m_alternatives"].items():
            rows.append((f"ds.mean() tasks at 1.1 M, {name}",
                         f"{v['tasks']:,} ({v['tasks_optimized']:,} optimized)",
                         f"{r['tasks_full_reduction_1m']:,}"))
    if rows:
        out += ["| what-if (measured in the same run) | value | as shipped |",
                "|---|---:|---:|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(out)
    return text


# ---------------------------------------------------------------------------- cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1,200 samples instead of 4,200")
    p.add_argument("--samples", type=int, default=None, help="corpus size (rounded to tars)")
    p.add_argument("--workdir", type=Path, default=HERE / "work")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--sweep", action="store_true", help="run the layout sweep instead")
    p.add_argument("--report", type=Path, nargs="?", const=HERE / "results" / "latest.json",
                   default=None, help="print README tables from a results file and exit")
    p.add_argument("--inner", default="1,2,4,8,16", help="sweep: inner chunks (samples)")
    p.add_argument("--shards", default="256,512,1024", help="sweep: shards (samples)")
    p.add_argument("--codec-rows", default="blosc-zstd:3,zstd:3",
                   help="sweep: extra rows at inner chunk 1, shard 512 with these codec:level")
    p.add_argument("--fresh", action="store_true", help="rewrite the corpus even if present")
    p.add_argument("--no-profile", action="store_true", help="skip the conversion profile")
    p.add_argument("--no-1m", action="store_true", help="skip the 1.1 M-sample metadata store")
    p.add_argument("--keep", action="store_true", help="keep the 1 M metadata store")
    p.add_argument("--repeats", type=int, default=2, help="runs of each conversion setup")
    p.add_argument("--no-experiments", action="store_true",
                   help="skip the what-if measurements behind the recommendations")
    args = p.parse_args(argv)
    if args.report:
        print("\n" + report(args.report))
        return 0
    args.workdir = args.workdir.resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        res = run_sweep(args)
        out = args.results / "sweep.json"
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        sweep_table(res)
    else:
        res = run_main(args)
        out = args.results / "latest.json"
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print()
        print(f"{res['n_samples']:,} samples, layout {res['layout']}, "
              f"{res['machine']['cpu_count']} cores, {res['machine']['date']}, "
              f"{res['elapsed_s']} s")
        print_table(res, MAIN_ROWS)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
