"""The release's full sample count on the control plane (issue 15): plan, run, report.

Builds (once, under ``benchmarks/work/scale``) a corpus of 91 tars holding
1,099,644 members, the release's count, with tiny undecodable payloads (so
only the control plane is exercised) and a matching ``metadata.parquet``
(~1.7 GB), then measures in fresh processes:

- ``plan_s_1m``, ``plan_rss_mb_1m``: ``plan_conversion`` wall time and the
  process's peak RSS (headers in the page cache);
- ``plan_json_mb_1m``: the size of ``plan.to_json()``;
- ``run_client_rss_mb_1m``, ``terminal_lines_1m_rejected``, ``run_s_1m``:
  ``nasar-zarr convert --on-error skip`` on a LocalCluster: the client
  process's peak RSS (scheduler included, workers not), the lines it printed,
  whether it exited cleanly (no traceback).

Prints one JSON object. ``--samples N`` scales the corpus down for a quick look.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RELEASE_SAMPLES = 1_099_644
RELEASE_TARS = 91
PAYLOAD = 1000  # bytes of each (undecodable) npz member: 1.5 KB per member in the tar


def build_corpus(
    root: Path, n_samples: int = RELEASE_SAMPLES, n_tars: int = RELEASE_TARS, seed: int = 0
) -> dict:
    """Write the tiny-member corpus (skipped when a complete one is there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nasar_zarr import schema
    from nasar_zarr.testing import make_metadata

    marker = root / "complete.json"
    counts = [n_samples // n_tars + (i < n_samples % n_tars) for i in range(n_tars)]
    if marker.exists() and json.loads(marker.read_text()).get("counts") == counts:
        return json.loads(marker.read_text())
    if root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True)
    t = time.perf_counter()
    payload = b"\x00not an npz\x00" * (PAYLOAD // 12) + b"\x00" * (PAYLOAD % 12)
    pad = b"\0" * (-len(payload) % 512)
    key = 0
    for s, count in enumerate(counts):
        with open(root / schema.shard_name(s), "wb") as f:
            for _ in range(count):
                info = tarfile.TarInfo(f"nasar_{key:09d}.npz")
                info.size, info.mtime, info.mode = len(payload), 1_700_000_000, 0o644
                f.write(info.tobuf(tarfile.USTAR_FORMAT))
                f.write(payload)
                f.write(pad)
                key += 1
            f.write(b"\0" * 1024)
    frame = make_metadata(np.random.default_rng(seed), counts)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), root / "metadata.parquet")
    info = {
        "counts": counts,
        "n_samples": n_samples,
        "build_s": round(time.perf_counter() - t, 1),
        "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
    }
    marker.write_text(json.dumps(info))
    return info


PLAN_SCRIPT = """
import json, resource, sys, time
t = time.perf_counter()
from nasar_zarr import plan_conversion
plan = plan_conversion(sys.argv[1], sys.argv[2], on_error="skip")
plan_s = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
text = plan.to_json()
print(json.dumps({"plan_s": plan_s, "plan_rss_mb": rss, "plan_json_mb": len(text) / 1e6,
                  "tasks": len(plan.tasks), "n_samples": plan.n_samples,
                  "plan_lines": len(repr(plan).splitlines())}))
"""

RUN_SCRIPT = """
import resource, sys
from nasar_zarr.cli import main
code = main(sys.argv[1:])
print("RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)
sys.exit(code)
"""


def measure_plan(root: Path, dest: Path) -> dict:
    """Plan in a fresh process, headers in the page cache (a warm-up plan first)."""
    subprocess.run(
        [sys.executable, "-c", PLAN_SCRIPT, str(root), str(dest)], check=True, capture_output=True
    )
    out = subprocess.run(
        [sys.executable, "-c", PLAN_SCRIPT, str(root), str(dest)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def measure_run(root: Path, dest: Path, workers: int = 2) -> dict:
    """``nasar-zarr convert --on-error skip`` in a fresh process; client RSS and output."""
    if dest.exists():
        shutil.rmtree(dest)
    t = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_SCRIPT,
            "convert",
            str(root),
            str(dest),
            "--on-error",
            "skip",
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
    )
    run_s = time.perf_counter() - t
    rss = [float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("RSS_MB")]
    stderr = [
        line
        for line in proc.stderr.splitlines()
        if not line.startswith("RSS_MB")
        and "it/s]" not in line
        and "s/shard]" not in line
        and "shard/s]" not in line
    ]
    return {
        "run_s": round(run_s, 1),
        "exit_code": proc.returncode,
        "run_client_rss_mb": round(rss[0], 1) if rss else None,
        "terminal_lines": len(proc.stdout.splitlines()) + len(stderr),
        "traceback": "Traceback" in proc.stderr,
        "stdout_tail": proc.stdout.splitlines()[-12:],
        "stderr_lines": stderr[-12:],
        "store_mb": round(sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 1e6, 1)
        if dest.exists()
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=RELEASE_SAMPLES)
    parser.add_argument("--workdir", type=Path, default=HERE / "work" / "scale")
    parser.add_argument("--no-run", action="store_true", help="plan only")
    args = parser.parse_args(argv)
    root = args.workdir / f"corpus-{args.samples}"
    built = build_corpus(root, args.samples)
    plan = measure_plan(root, args.workdir / "plan-only.zarr")
    result = {
        "n_samples": args.samples,
        "corpus_gb": round(built["bytes"] / 1e9, 2),
        "build_s": built.get("build_s"),
        "plan_s_1m": round(plan["plan_s"], 2),
        "plan_rss_mb_1m": round(plan["plan_rss_mb"], 1),
        "plan_json_mb_1m": round(plan["plan_json_mb"], 2),
        "plan_printed_lines": plan["plan_lines"],
        "tasks": plan["tasks"],
    }
    if not args.no_run:
        run = measure_run(root, args.workdir / "scale.zarr")
        result.update(
            {
                "run_s_1m": run["run_s"],
                "run_client_rss_mb_1m": run["run_client_rss_mb"],
                "terminal_lines_1m_rejected": run["terminal_lines"],
                "run_exit_code": run["exit_code"],
                "run_traceback": run["traceback"],
                "run_store_mb": run["store_mb"],
                "run_output_tail": run["stdout_tail"] + run["stderr_lines"],
            }
        )
        shutil.rmtree(args.workdir / "scale.zarr", ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
