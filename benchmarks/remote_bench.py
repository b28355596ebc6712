"""Converting from object storage (issue 14): bytes and requests, counted at the HTTP level.

A moto S3 server runs on loopback behind :class:`nasar_zarr.testing.http.CountingProxy`,
which records every request (and can add latency to each). Prints one JSON object:

- ``plan_bytes_over_corpus``: bytes planning transferred / corpus bytes (goal <= 0.01);
- ``execute_bytes_over_corpus``: tar bytes execute transferred / tar bytes (goal <= 1.05);
- ``requests_per_shard_object_written``: requests that touch each written Zarr shard
  object (goal <= 3; the PUT that writes it);
- ``execute_requests_per_task``: all execute requests (metadata, records, ...) per task;
- ``plan_s_per_1000_members_20ms``: planning time with 20 ms added to every request,
  per 1,000 tar members (tiny members, two tars), to scale to the release's 1.1 M;
  ``..._http``: the same through a loopback HTTP server with Range (moto's own CPU
  cost per request does not count there);
- ``plan_requests_per_1000_members`` (and ``..._http``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DATA_VARS = ("rtc", "inc_angle", "ifg", "coh", "dem", "slope_deg")


def _tree_bytes(root: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file())


def measure(samples_per_shard: int = 24, latency_members: int = 4000) -> dict:
    import s3fs
    from moto.server import ThreadedMotoServer
    from scale_bench import build_corpus

    from nasar_zarr import plan_conversion
    from nasar_zarr.testing import write_corpus
    from nasar_zarr.testing.http import CountingProxy

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "testing")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    out: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp, CountingProxy(f"http://{host}:{port}") as proxy:
            root = Path(tmp) / "corpus"
            info = write_corpus(root, n_shards=2, samples_per_shard=samples_per_shard, seed=5)
            so = {"endpoint_url": proxy.url, "key": "testing", "secret": "testing"}
            fs = s3fs.S3FileSystem(**so)
            fs.mkdir("bkt")
            fs.put(str(root) + "/", "bkt/corpus/", recursive=True)
            corpus_bytes, tar_bytes = _tree_bytes(root), _tree_bytes(root, "data/*.tar")
            proxy.reset()
            t = time.perf_counter()
            plan = plan_conversion(
                "s3://bkt/corpus", "s3://bkt/cube.zarr", shard=8, storage_options=so
            )
            plan_s = time.perf_counter() - t
            planning = proxy.reset()
            t = time.perf_counter()
            plan.execute(workers=0)
            execute_s = time.perf_counter() - t
            executing = proxy.reset()
            shard_objects = Counter(
                r.path for r in executing if "/c/" in r.path and r.path.split("/")[3] in DATA_VARS
            )
            written = {
                p
                for p in shard_objects
                if any(r.method == "PUT" and r.path == p for r in executing)
            }
            out.update(
                {
                    "corpus_mb": round(corpus_bytes / 1e6, 1),
                    "samples": info.n_samples,
                    "plan_requests": len(planning),
                    "plan_bytes": sum(r.bytes_out for r in planning),
                    "plan_bytes_over_corpus": round(
                        sum(r.bytes_out for r in planning) / corpus_bytes, 5
                    ),
                    "plan_s_loopback": round(plan_s, 3),
                    "execute_bytes_over_corpus": round(
                        sum(r.bytes_out for r in executing if r.path.endswith(".tar")) / tar_bytes,
                        4,
                    ),
                    "execute_tar_gets": sum(
                        r.method == "GET" and r.path.endswith(".tar") for r in executing
                    ),
                    "shard_objects_written": len(written),
                    "requests_per_shard_object_written": round(
                        sum(shard_objects[p] for p in written) / max(1, len(written)), 2
                    ),
                    "execute_requests_per_task": round(len(executing) / len(plan.tasks), 1),
                    "execute_s_loopback": round(execute_s, 2),
                }
            )

            # Latency: tiny members, 20 ms added to every request at the proxy.
            tiny = Path(tmp) / "tiny"
            build_corpus(tiny, latency_members, n_tars=2)
            fs.put(str(tiny) + "/", "bkt/tiny/", recursive=True)
            proxy.reset()
            proxy.delay = 0.02
            t = time.perf_counter()
            plan_conversion(
                "s3://bkt/tiny", "s3://bkt/tiny.zarr", on_error="skip", storage_options=so
            )
            slow_s = time.perf_counter() - t
            slow = proxy.reset()
            proxy.delay = 0.0
            from nasar_zarr.testing.http import RangeServer

            with RangeServer(tiny, delay=0.02) as server:
                t = time.perf_counter()
                plan_conversion(server.url, str(Path(tmp) / "http.zarr"), on_error="skip")
                http_s = time.perf_counter() - t
                http = server.reset()
            out.update(
                {
                    "plan_s_per_1000_members_20ms": round(slow_s / latency_members * 1000, 3),
                    "plan_requests_per_1000_members": round(len(slow) / latency_members * 1000, 1),
                    "plan_s_per_1000_members_20ms_http": round(http_s / latency_members * 1000, 3),
                    "plan_requests_per_1000_members_http": round(
                        len(http) / latency_members * 1000, 1
                    ),
                    "latency_members": latency_members,
                }
            )
    finally:
        moto.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-shard", type=int, default=24)
    parser.add_argument("--latency-members", type=int, default=4000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.samples_per_shard, args.latency_members), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
