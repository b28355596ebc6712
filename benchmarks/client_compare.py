"""obstore against fsspec for the remote seam: python benchmarks/client_compare.py

Needs obstore (``pip install obstore``; not a dependency of nasar-zarr). Serves a
40 MB object from a loopback Range server in its own process, 20 ms per request,
and times three access patterns with obstore.get_ranges, fsspec's cat_ranges
and nasar_zarr.ranges (docs/REMOTE.md has the figures and the choice).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    from remote_read_bench import Server

    root = Path(tempfile.mkdtemp(prefix="nasar-clients-"))
    (root / "shard.bin").write_bytes(os.urandom(40_000_000))
    srv = Server(root, 0.020)
    url = srv.url
    rng = np.random.default_rng(0)
    for label, n, size in (
        ("scattered 3 x 0.5 MB", 3, 500_000),
        ("one batch 64 x 0.5 MB (scattered)", 64, 500_000),
        ("whole 40 MB in 80 adjacent ranges", 80, 500_000),
    ):
        if label.startswith("whole"):
            starts = [i * 500_000 for i in range(80)]
        else:
            starts = sorted(rng.choice(79, n, replace=False) * 500_000)
        ends = [s + size for s in starts]
        import obstore
        from obstore.store import HTTPStore

        st = HTTPStore.from_url(url + "/", client_options={"allow_http": True})
        obstore.get_ranges(st, "shard.bin", starts=[0], ends=[10])
        t = time.perf_counter()
        for _ in range(5):
            obstore.get_ranges(st, "shard.bin", starts=starts, ends=ends)
        ob = (time.perf_counter() - t) / 5
        import fsspec

        fs = fsspec.filesystem("http")
        fs.cat_ranges([url + "/shard.bin"], [0], [10])
        t = time.perf_counter()
        for _ in range(5):
            fs.cat_ranges([url + "/shard.bin"] * len(starts), starts, ends)
        fsp = (time.perf_counter() - t) / 5
        from nasar_zarr.ranges import Location

        loc = Location.of(url)
        loc.ranges([("shard.bin", 0, 10, None)])
        t = time.perf_counter()
        for _ in range(5):
            loc.ranges([("shard.bin", a, b, None) for a, b in zip(starts, ends, strict=True)])
        ours = (time.perf_counter() - t) / 5
        print(
            f"{label}: obstore.get_ranges {ob * 1e3:.0f} ms,"
            f" fsspec cat_ranges {fsp * 1e3:.0f} ms, nasar_zarr.ranges {ours * 1e3:.0f} ms"
        )
    srv.close()


if __name__ == "__main__":
    main()
