"""obstore against fsspec for the remote seam: python benchmarks/client_compare.py

Needs obstore (``pip install obstore``; not a dependency of nasar-zarr). Serves a
40 MB object from a loopback Range server in its own process, 20 ms per request,
and times three access patterns with obstore.get_ranges, fsspec's cat_ranges
and nasar_zarr.ranges (docs/REMOTE.md has the figures and the choice): wall
time per call, and this process's CPU time (user + system, every thread) per call.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(call, repeats=5):
    """(wall ms, client CPU ms) per call."""
    c0, t = os.times(), time.perf_counter()
    for _ in range(repeats):
        call()
    wall, c1 = time.perf_counter() - t, os.times()
    cpu = (c1.user + c1.system) - (c0.user + c0.system)
    return wall * 1e3 / repeats, cpu * 1e3 / repeats


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
        ob = timed(lambda: obstore.get_ranges(st, "shard.bin", starts=starts, ends=ends))  # noqa: B023
        import fsspec

        fs = fsspec.filesystem("http")
        fs.cat_ranges([url + "/shard.bin"], [0], [10])
        fsp = timed(lambda: fs.cat_ranges([url + "/shard.bin"] * len(starts), starts, ends))  # noqa: B023
        from nasar_zarr.ranges import Location

        loc = Location.of(url)
        loc.ranges([("shard.bin", 0, 10, None)])
        wanted = [("shard.bin", a, b, None) for a, b in zip(starts, ends, strict=True)]
        ours = timed(lambda: loc.ranges(wanted))  # noqa: B023 - called in this iteration
        print(
            f"{label}: obstore.get_ranges {ob[0]:.0f} ms (CPU {ob[1]:.0f} ms),"
            f" fsspec cat_ranges {fsp[0]:.0f} ms (CPU {fsp[1]:.0f} ms),"
            f" nasar_zarr.ranges {ours[0]:.0f} ms (CPU {ours[1]:.0f} ms)"
        )
    srv.close()


if __name__ == "__main__":
    main()
