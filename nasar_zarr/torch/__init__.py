"""PyTorch datasets over the cube: the release loader's outputs, with random access.

The NA-SAR release ships streaming loaders (``NASARWebRTCDataset``,
``NASARWebInSARDataset``) over the WebDataset tars. :class:`RTCDataset` and
:class:`InSARDataset` return the same per-sample dicts (the dataset card's keys,
float32 tensors, the card's transforms) from the cube, as map-style datasets:
exact ``len``, random access, batched reads (``__getitems__``), and
:class:`ShardAwareSampler` for a deterministic, resumable, rank-split order that
keeps reads inside a few Zarr shards.

The transforms are those of :mod:`nasar_zarr.normalize` (the same numpy kernels),
so a sample equals ``ds.nasar.normalized()`` for that sample, bit for bit.
Options: ``precision="fast"`` (torch kernels, :mod:`nasar_zarr.torch.kernels`),
``device=`` (workers only read; the transforms run on that device in the main
process), ``stack=True`` (the model's input as one ``x`` tensor, channel names in
``dataset.channels``) and ``dtype=torch.bfloat16`` / ``torch.float16`` (rounded
to nearest from the float32 values). See docs/TRAINING.md.

Every output key owns its memory: no two keys (and no two items of a batch)
share elements, so an in-place augmentation of one changes nothing else.

Fork safety: local cubes are read through the stateless shard decoder of
:mod:`nasar_zarr.backend` (no threads, handles or event loops), so a
``DataLoader`` with the ``fork`` start method works after the parent read, with
no warning; :func:`dataloader` uses the platform's default start method.
``engine="tensorstore"`` cannot be used in a process forked after tensorstore
started its threads (it aborts such a process): that raises a clear error.

Install with ``pip install 'nasar-zarr[torch]'``.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "nasar_zarr.torch needs PyTorch: pip install 'nasar-zarr[torch]' (CPU-only wheels:"
        " pip install torch --index-url https://download.pytorch.org/whl/cpu)"
    ) from err

from .datasets import DTYPES, PRECISIONS, RAW_PREFIX, InSARDataset, RTCDataset
from .datasets import _plan_reads as _plan_reads  # re-exported for tests and benchmarks
from .datasets import _runs as _runs
from .loader import CubeDataLoader, collate, dataloader, safe_start_method
from .sampler import DEFAULT_WINDOW, ShardAwareSampler, shard_aware_order

__all__ = [
    "DEFAULT_WINDOW",
    "DTYPES",
    "PRECISIONS",
    "RAW_PREFIX",
    "CubeDataLoader",
    "InSARDataset",
    "RTCDataset",
    "ShardAwareSampler",
    "collate",
    "dataloader",
    "safe_start_method",
    "shard_aware_order",
]
