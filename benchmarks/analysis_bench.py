"""The analysis read figures in one small run: python benchmarks/analysis_bench.py [WORKDIR].

Writes a synthetic corpus (6 tars x 200 samples), converts it in-process, builds a
1,099,604-sample metadata-only store for the task count, and prints the figures of
``measure.analysis_figures`` as JSON (analysis_scan_sps: the mean of every
variable; wds2_pass_sps, analysis_scan_over_wds2, materialize_scan_sps,
reduction_over_materialize, histogram_over_wds2, tasks_full_reduction_1m,
normalized_over_raw_cpu).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure as m  # noqa: E402

FULL_COUNTS_1M = [12_084] * 90 + [12_044]  # 1,099,604 samples in 91 tars, as the release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--tars", type=int, default=6)
    parser.add_argument("--per-tar", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-1m", action="store_true", help="skip the 1.1 M task count")
    args = parser.parse_args(argv)
    from nasar_zarr import plan_conversion
    from nasar_zarr.testing import write_corpus

    work = Path(args.workdir or tempfile.mkdtemp(prefix="nasar-analysis-"))
    corpus, store = work / "corpus", work / "nasar.zarr"
    if not (corpus / "metadata.parquet").exists():
        write_corpus(corpus, n_shards=args.tars, samples_per_shard=args.per_tar, seed=1)
    if not (store / "zarr.json").exists():
        plan_conversion(str(corpus), str(store)).execute(workers=0)
    path_1m = None
    if not args.no_1m:
        path_1m = work / "metadata-1m.zarr"
        if not (path_1m / "zarr.json").exists():
            m.metadata_store_1m(path_1m, FULL_COUNTS_1M)
    res = m.analysis_figures(corpus, store, repeats=args.repeats, path_1m=path_1m)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
