"""The dataset card's transforms as vectorised torch kernels (``precision="fast"``).

The same operations as the numpy kernels of :mod:`nasar_zarr.normalize`, on a
batch of tensors on any device (CPU in the workers, or the GPU the model uses):

- RTC: ``log1p(gain * x)``, clip to the polarization's ``(p1, p99)``, minus
  ``p1``, divided by ``p99 - p1``, in float32. Every step but ``log1p`` is the
  same IEEE float32 operation as numpy's, so the only difference from the exact
  path is ``torch.log1p`` against numpy's float32 ``log1p`` (each library's own
  vectorised implementation, within 1-2 ulp of each other; see docs/TRAINING.md).
- DEM, slope: clip and rescale in float32, bit for bit numpy's.
- Relief: each patch's percentiles with numpy's linear interpolation, from the
  order statistics (``torch.sort``), in float64, then the rescale in float64
  rounded to float32: bit for bit numpy's. On the CPU this is numpy's own
  kernel (its partition is ~10x torch's CPU sort).

Pure functions of their inputs; nothing is kept between calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from nasar_zarr import normalize


def _clip(x: Tensor, low: Tensor, high: Tensor, out: Tensor) -> Tensor:
    """numpy's float clip, signed zeros and NaN included: ``min(max(x, low), high)``
    where ``max(a, b)`` is ``a`` if ``a >= b`` or ``a`` is NaN (numpy's ``_NPY_MAX``).

    ``torch.clamp`` agrees (NaN propagates) except for the sign of a zero ``x``
    clipped at a zero bound, so it is used unless a bound is zero.
    """
    if not (bool((low == 0).any()) or bool((high == 0).any())):
        return torch.clamp(x, low, high, out=out)
    torch.where((x >= low) | torch.isnan(x), x, low, out=out)
    return torch.where((out <= high) | torch.isnan(out), out, high, out=out)


def rtc(
    x: Tensor, present: Tensor, low: Tensor, high: Tensor, *, gain: float, out: Tensor
) -> Tensor:
    """:func:`nasar_zarr.normalize.rtc_kernel` in torch, written into ``out`` (float32).

    ``present``, ``low`` and ``high`` broadcast against ``x`` (pol axis third
    from the end).
    """
    torch.mul(x, torch.tensor(gain, dtype=torch.float32, device=x.device), out=out)
    torch.log1p(out, out=out)
    _clip(out, low, high, out)
    out.sub_(low).div_(high - low)
    if bool((low < 0).any()):  # with p1 >= 0 a zero channel already maps to exactly 0
        missing = ~present.bool() & ~torch.isnan(out[..., :1, :1])
        out.masked_fill_(missing, 0.0)
    return out


def clip_and_rescale(x: Tensor, low: float, high: float, *, out: Tensor) -> Tensor:
    """``(clip(x, low, high) - low) / (high - low)`` in float32, into ``out``."""
    lo = torch.tensor(low, dtype=torch.float32, device=x.device)
    hi = torch.tensor(high, dtype=torch.float32, device=x.device)
    _clip(x, lo, hi, out)
    return out.sub_(lo).div_(hi - lo)


def _virtual_index(n: int, percentile: float) -> tuple[int, float]:
    """numpy's ``linear`` percentile position: the lower order statistic and the weight."""
    q = np.float64(percentile) / np.float64(100)
    virtual = n * q + (1 + q * (1 - 1 - 1)) - 1  # numpy's _compute_virtual_index, alpha=beta=1
    below = np.floor(virtual)
    return int(below), float(virtual - below)


def _lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """numpy's ``_lerp`` (the form it picks by ``t``, for the same rounding)."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def relief(dem: Tensor, *, percentiles: Sequence[float], out: Tensor) -> Tensor:
    """:func:`nasar_zarr.normalize.relief_kernel` (finite patches) in torch, into ``out``.

    ``dem`` is ``(n, y, x)`` float32; percentiles of each patch as
    ``numpy.percentile`` (linear), the rescale in float64, rounded to float32.
    """
    if dem.device.type == "cpu":  # numpy's partition and float64 ops are ~3x torch's here
        out.numpy()[...] = normalize.relief_kernel(dem.numpy(), percentiles=percentiles)
        return out
    n = dem.shape[0]
    flat = dem.reshape(n, -1)
    size = flat.shape[1]
    where = []
    for p in percentiles:
        below, t = _virtual_index(size, p)
        below = min(max(below, 0), size - 1)
        where.append((below, min(below + 1, size - 1), t))
    ranked = torch.sort(flat, dim=1).values
    bounds = []
    for below, above, t in where:
        a = ranked[:, below].double()  # order statistics are exact in float32
        bounds.append(_lerp(a, ranked[:, above].double(), t) if t else a)
    lo, hi = (v[:, None, None] for v in bounds)
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    values = dem.double()
    clipped = _clip(values, lo, hi, torch.empty_like(values))
    out.copy_((clipped - lo) / span)
    return out
