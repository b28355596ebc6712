"""Batch buffers: numpy-backed private memory, shared memory, and each worker's pool."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_}

_Empty = Callable[..., "Tensor"]


def _empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU tensor in numpy's memory where numpy has the dtype: numpy asks the kernel for
    transparent huge pages on large arrays, torch does not (first touch of a fresh batch
    buffer ~4x cheaper here); bfloat16 has no numpy dtype."""
    if dtype == torch.bfloat16:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(shape, _NUMPY_DTYPES[dtype]))


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A tensor in shared memory: a DataLoader worker sends it without a copy.

    What ``default_collate`` does in a worker (torch's storage ``_new_shared``).
    """
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).view(shape)


POOL_KEY = "_buffer"  # an item's pooled buffer: worker * POOL_SLOTS + slot, or -1
POOL_SLOTS = 8  # pooled batch buffers per worker (prefetch + batches the loop still holds)


class _Pool:
    """Shared-memory batch buffers of one worker of a :class:`CubeDataLoader`, reused.

    A fresh shared-memory segment per batch costs the kernel a zeroed 4 KiB page
    at a time (~0.6 ms per sample of float32 outputs on the benchmark machine).
    A buffer is reused only after the main process has marked its slot free in
    ``flags`` (shared, one row per worker), which it does once nothing there
    references the batch any more; a worker that finds no free slot allocates a
    fresh, unpooled buffer. The pool lives in the worker's own copy of the dataset.
    """

    def __init__(self, flags: Tensor, worker: int) -> None:
        self.flags = flags
        self.worker = worker
        self.buffers: dict[int, Tensor] = {}
        self._scratch: Tensor | None = None

    def scratch(self, numel: int) -> Tensor:
        """This worker's private float32 scratch (half-precision batches are computed in
        it, then rounded into a shared buffer); never sent, so reused freely."""
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = _empty((numel,), torch.float32)
        return self._scratch[:numel]

    def take(self, numel: int, dtype: torch.dtype) -> tuple[int, Tensor]:
        row = self.flags[self.worker]
        free = [slot for slot, flag in enumerate(row.tolist()) if flag]
        for slot in free:
            buffer = self.buffers.get(slot)
            if buffer is not None and buffer.dtype == dtype and buffer.numel() >= numel:
                row[slot] = 0
                return self.worker * POOL_SLOTS + slot, buffer[:numel]
        unused = [s for s in range(POOL_SLOTS) if s not in self.buffers]
        slot = unused[0] if unused else (free[0] if free else -1)
        buffer = _shared_empty((numel,), dtype)
        if slot < 0:
            return -1, buffer
        row[slot] = 0
        self.buffers[slot] = buffer
        return self.worker * POOL_SLOTS + slot, buffer


class _Block:
    """Where a batch's flat output buffer comes from: a worker's pool, or ``empty``."""

    def __init__(self, pool: _Pool | None, empty: _Empty) -> None:
        self.pool = pool
        self.empty = empty
        self.tag = -1

    def take(self, numel: int, dtype: torch.dtype) -> Tensor:
        if self.pool is None:
            return self.empty((numel,), dtype)
        self.tag, buffer = self.pool.take(numel, dtype)
        return buffer


def _start_pool(flags: Tensor, user_init: Callable[[int], None] | None, worker_id: int) -> None:
    """``worker_init_fn`` of a :class:`CubeDataLoader`: this worker's buffer pool."""
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "_pool"):  # a dataset of nasar_zarr.torch
        info.dataset._pool = _Pool(flags, worker_id)
    if user_init is not None:
        user_init(worker_id)
