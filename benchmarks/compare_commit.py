"""Conversion speed of this checkout against another commit, same corpus, interleaved.

    python benchmarks/compare_commit.py CORPUS --commit 75b5675 [--rounds 3]

Checks the commit out into a temporary git worktree, then converts CORPUS
alternately with each version in a fresh interpreter (``PYTHONPATH`` picks the
version): ``plan_conversion`` + ``execute(workers=0)`` in a non-main thread (one
core, as one worker's tasks), and ``nasar-zarr convert --workers 2`` end to end.
Prints one JSON object with the best time of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

IN_PROCESS = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import nasar_zarr
src, dest = sys.argv[1], sys.argv[2]
t = time.perf_counter()
plan = nasar_zarr.plan_conversion(src, dest)
with ThreadPoolExecutor(1) as pool:
    pool.submit(plan.execute, workers=0).result()
print(json.dumps({"wall_s": time.perf_counter() - t, "n": plan.n_samples,
                  "module": nasar_zarr.__file__}))
"""

CLI = "import sys; from nasar_zarr.cli import main; sys.exit(main())"


def run(code: list[str], pythonpath: Path, dest: Path) -> float:
    if dest.exists():
        shutil.rmtree(dest)
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, *code], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    wall = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    shutil.rmtree(dest)
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("--commit", default="75b5675")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=HERE / "work")
    args = p.parse_args(argv)
    old = Path(tempfile.mkdtemp(prefix="nasar-old-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.commit],
        check=True,
        capture_output=True,
    )
    dest = args.workdir / "compare.zarr"
    versions = {"current": ROOT, args.commit: old}
    times: dict[str, dict[str, list[float]]] = {v: {"in_process": [], "cli": []} for v in versions}
    try:
        for _ in range(args.rounds):
            for name, path in versions.items():
                times[name]["in_process"].append(
                    run(["-c", IN_PROCESS, str(args.corpus), str(dest)], path, dest)
                )
                times[name]["cli"].append(
                    run(
                        ["-c", CLI, "convert", str(args.corpus), str(dest), "--workers", "2"],
                        path,
                        dest,
                    )
                )
                print(
                    name,
                    {k: round(v[-1], 2) for k, v in times[name].items()},
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True
        )
    best = {v: {k: round(min(x), 3) for k, x in t.items()} for v, t in times.items()}
    out = {
        "corpus": str(args.corpus),
        "best_s": best,
        "all_s": times,
        "current_over_old_time": {
            k: round(best["current"][k] / best[args.commit][k], 3) for k in ("in_process", "cli")
        },
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
