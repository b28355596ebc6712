"""Proving laziness: a dask scheduler that refuses to compute (as in xarray's tests)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask


class CountingScheduler:
    """A dask scheduler callable that counts computes and raises past ``max_computes``.

    Parameters
    ----------
    max_computes
        Number of computes allowed before raising.
    """

    def __init__(self, max_computes: int = 0) -> None:
        self.total_computes = 0
        self.max_computes = max_computes

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(
                f"Too many dask computations were scheduled: {self.total_computes} >"
                f" {self.max_computes}; something that should stay lazy computed"
                " (a hidden .values, bool(), len() of a dask array, ...)"
            )
        return dask.get(dsk, keys, **kwargs)


@contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[CountingScheduler]:
    """Within the block, any dask compute beyond ``max_computes`` raises ``RuntimeError``.

    Parameters
    ----------
    max_computes
        Number of computes allowed (0: none).

    Yields
    ------
    CountingScheduler
        Its ``total_computes`` tells how many computes ran.

    Examples
    --------
    >>> with raise_if_dask_computes():
    ...     out = ds.nasar.normalized()  # builds a graph, reads nothing
    """
    scheduler = CountingScheduler(max_computes)
    with dask.config.set(scheduler=scheduler):
        yield scheduler
