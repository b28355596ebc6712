"""PyTorch loader throughput alone: ``python benchmarks/loader_bench.py [--samples N]``.

Writes a synthetic corpus (default 1,200 samples in 300-sample tars, seed 7, as
``run.py --quick``), converts it with the default layout, and prints
``measure.torch_loaders`` as JSON: ``loader_sps`` (InSARDataset + ShardAwareSampler),
``loader_random_sps`` (RandomSampler), ``wds_loader_sps`` (the release loader's
pattern over the tars) and their ratios. The work directory is reused when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure as m  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1200, help="corpus size (300 per tar)")
    p.add_argument("--workdir", type=Path, default=HERE / "work" / "loader")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader")
    args = p.parse_args(argv)

    from nasar_zarr import plan_conversion
    from nasar_zarr.testing import write_corpus

    n_tars = max(1, round(args.samples / 300))
    corpus = args.workdir / f"corpus-{n_tars}x300"
    cube = args.workdir / f"cube-{n_tars}x300.zarr"
    if not (corpus / "metadata.parquet").exists():
        write_corpus(corpus, n_shards=n_tars, samples_per_shard=300, seed=7)
    if not (cube / "zarr.json").exists():
        plan_conversion(str(corpus), str(cube)).execute(workers=0)
    m.warm_page_cache([*m.tar_paths(corpus), cube])
    print(json.dumps(m.torch_loaders(corpus, cube, epochs=args.epochs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
