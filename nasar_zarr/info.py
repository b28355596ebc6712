"""What ``nasar-zarr info`` reports about a cube."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from . import schema, store
from .cube import open_cube, provenance
from .layout import require_cube


def status_counts(ds: xr.Dataset) -> dict[str, int]:
    counts = np.bincount(np.asarray(ds[schema.STATUS].values, dtype=np.int64), minlength=3)
    return {"pending": int(counts[0]), "written": int(counts[1]), "rejected": int(counts[2])}


def describe(url: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Dimensions, variables with chunking, stored bytes/objects, status counts, provenance.

    Raises NotACubeError when ``url`` does not exist or holds no nasar-zarr cube.
    """
    require_cube(url, storage_options)
    ds = open_cube(url, storage_options=storage_options)
    group = store.open_group(url, storage_options)
    fs, root = store.filesystem(url, storage_options)
    sizes = fs.du(root, total=False)
    variables = {}
    for name in map(str, ds.data_vars):
        arr = store.array(group, name)
        variables[name] = {
            "dims": list(ds[name].dims),
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "inner_chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None,
            "codecs": [type(c).__name__ for c in arr.compressors],
            "stored_bytes": int(
                sum(v for k, v in sizes.items() if k[len(root) + 1 :].startswith(f"{name}/"))
            ),
        }
    internal = f"{root}/{store.INTERNAL_PREFIX}/"
    return {
        "url": url,
        "dims": dict(ds.sizes),
        "variables": variables,
        "coordinates": [c for c in ds.coords if c not in ds.dims],
        "stored_bytes": int(sum(sizes.values())),
        "objects": sum(1 for k in sizes if not k.startswith(internal)),
        "status": status_counts(ds),
        "provenance": {k: v for k, v in provenance(ds).items() if k != "metadata_schema"},
        "history": ds.attrs.get("history"),
    }


def format_report(report: Mapping[str, Any]) -> str:
    prov = report["provenance"]
    lines = [
        f"cube: {report['url']}",
        "dims: " + ", ".join(f"{d}={n}" for d, n in report["dims"].items()),
        f"stored: {report['stored_bytes'] / 1e6:,.1f} MB in {report['objects']} objects",
        "status: " + ", ".join(f"{k} {v:,}" for k, v in report["status"].items()),
        "variables:",
    ]
    for name, v in report["variables"].items():
        lines.append(
            f"  {name:<12} {v['dtype']:<8} {tuple(v['shape'])} inner {tuple(v['inner_chunks'])}"
            f" shard {tuple(v['shards']) if v['shards'] else '-'} {'+'.join(v['codecs']) or '-'}"
            f" {v['stored_bytes'] / 1e6:,.1f} MB"
        )
    lines.append(f"coordinates: {', '.join(report['coordinates'])}")
    lines.append(f"layout: {prov.get('layout')}")
    lines.append(f"source: {prov.get('source')} ({len(prov.get('tar_shards', []))} tar shards)")
    lines.append(f"created: {prov.get('created')} by nasar-zarr {prov.get('version')}")
    return "\n".join(lines)
