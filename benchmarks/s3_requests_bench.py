"""Requests of a conversion on S3 (issue 21): in proportion to what it writes.

One synthetic corpus in ``s3://bkt/corpus`` on a moto server behind
:class:`nasar_zarr.testing.s3.MotoS3`'s counting proxy, converted to S3 twice,
as ``nasar-zarr convert`` does it (plan, then execute on the default
LocalCluster), with two shard sizes. Every request of each convert is counted
(plan and execute, all worker processes). Prints one JSON object:

- ``s3_requests_per_object_written``: the marginal cost of an object, from the two
  runs: (requests_a - requests_b) / (objects_a - objects_b) (goal <= 1.2: its
  PUT, and a little of the task that writes it);
- ``s3_fixed_requests``: the rest of a convert, requests_a - marginal * objects_a
  (goal <= 150 for the 8 arrays and 20-odd coordinates);
- per run: the total, objects written, and the counts by method and by what they
  touch (``HEAD zarr.json``, ``GET list``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def convert_counted(s3, src: str, dest: str, *, shard: int, inner: int, workers: int | None):
    from nasar_zarr import plan_conversion
    from nasar_zarr.testing.s3 import objects_written, tally

    s3.proxy.reset()
    t = time.perf_counter()
    plan = plan_conversion(
        src, dest, shard=shard, inner_chunk=inner, storage_options=s3.storage_options
    )
    plan.execute(workers=workers)
    wall = time.perf_counter() - t
    requests = s3.proxy.reset()
    counts = tally(requests)
    return {
        "shard": shard,
        "tasks": len(plan.tasks),
        "requests": counts["total"],
        "objects_written": len(objects_written(requests)),
        "wall_s": round(wall, 2),
        **{k: counts[k] for k in ("by_method", "by_kind", "by_method_kind")},
    }


def measure(
    n_shards: int = 4, per_shard: int = 8, shards: tuple[int, int] = (64, 8), workers=None
) -> dict:
    import s3fs

    from nasar_zarr.testing import write_corpus
    from nasar_zarr.testing.s3 import MotoS3

    with tempfile.TemporaryDirectory() as tmp, MotoS3() as s3:
        root = Path(tmp) / "corpus"
        info = write_corpus(root, n_shards=n_shards, samples_per_shard=per_shard, seed=5)
        fs = s3fs.S3FileSystem(**s3.storage_options)
        fs.mkdir("bkt")
        fs.put(str(root) + "/", "bkt/corpus/", recursive=True)
        runs = [
            convert_counted(
                s3,
                "s3://bkt/corpus",
                f"s3://bkt/cube-{shard}.zarr",
                shard=shard,
                inner=min(shard, 8),
                workers=workers,
            )
            for shard in shards
        ]
    a, b = runs[1], runs[0]  # a: more objects (the smaller shard)
    marginal = (a["requests"] - b["requests"]) / (a["objects_written"] - b["objects_written"])
    return {
        "samples": info.n_samples,
        "metadata_columns": len(info.metadata.columns),
        "s3_requests_per_object_written": round(marginal, 2),
        "s3_fixed_requests": round(a["requests"] - marginal * a["objects_written"], 1),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--samples-per-tar", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="default: the LocalCluster")
    args = parser.parse_args(argv)
    out = measure(args.tars, args.samples_per_tar, workers=args.workers)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
