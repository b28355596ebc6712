"""A shuffled, shard-aware, rank-split and exactly resumable order of a cube dataset."""

from __future__ import annotations

import math
import sys
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

DEFAULT_WINDOW = 4  # ShardAwareSampler: shards whose blocks are shuffled together


def shard_aware_order(
    sample_indices: Sequence[int] | np.ndarray,
    *,
    shard: int,
    inner_chunk: int,
    seed: int,
    epoch: int,
    window: int = DEFAULT_WINDOW,
    block_chunks: int = 1,
) -> np.ndarray:
    """A shuffled order of items that keeps reads inside a few Zarr shards at a time.

    The shards are shuffled; consecutive groups of ``window`` shards (in that
    shuffled order) are visited one after another, and inside each group the
    inner-chunk blocks (the items sharing one inner Zarr chunk, kept together
    in cube order) are shuffled. A pure function of its arguments.

    Parameters
    ----------
    sample_indices
        Cube position of each item (``dataset.sample_indices``).
    shard, inner_chunk
        The cube's shard and inner chunk, in samples.
    seed, epoch
        Non-negative integers; the order depends on nothing else.
    window
        Shards whose blocks are shuffled together.
    block_chunks
        Inner chunks per block (consecutive in the cube, inside one shard): 1
        shuffles single inner chunks; more gives fewer, larger reads (on object
        storage, fewer requests per sample) and less mixing inside a batch.

    Returns
    -------
    numpy.ndarray
        A permutation of ``range(len(sample_indices))`` (int64).

    Examples
    --------
    >>> shard_aware_order(np.arange(8), shard=4, inner_chunk=2, seed=0, epoch=0)  # doctest: +SKIP
    array([2, 3, 4, 5, 0, 1, 6, 7])
    """
    for name, value in (("seed", seed), ("epoch", epoch)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    named = (("shard", shard), ("inner_chunk", inner_chunk), ("window", window))
    for name, value in (*named, ("block_chunks", block_chunks)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    cube = np.asarray(sample_indices, dtype=np.int64).reshape(-1)
    if cube.size == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    shards, shard_of = np.unique(cube // int(shard), return_inverse=True)
    visit = np.empty(shards.size, np.int64)
    visit[rng.permutation(shards.size)] = np.arange(shards.size)  # shard -> its turn
    span = int(inner_chunk) * int(block_chunks)
    # a block never straddles two shards: blocks are counted from each shard's start
    block_id = (cube // int(shard)) * -(-int(shard) // span) + (cube % int(shard)) // span
    blocks, block_of = np.unique(block_id, return_inverse=True)
    block_key = rng.permutation(blocks.size)
    window_of = visit[shard_of.reshape(-1)] // int(window)
    return np.lexsort((np.arange(cube.size), cube, block_key[block_of.reshape(-1)], window_of))


class ShardAwareSampler(Sampler[int]):
    """Shuffled, shard-aware, rank-split and exactly resumable order of a cube dataset.

    Each epoch's order is :func:`shard_aware_order` of ``(seed, epoch)``: Zarr
    shards are visited in a shuffled order, and inner-chunk blocks are shuffled
    within a window of shards, so a batch reads a few whole inner chunks of a few
    shards. With several replicas (``num_replicas``/``rank``, or the initialised
    process group) the epoch's order is padded (repeating its start) or cut
    (``drop_last``) to a multiple of ``num_replicas``, as ``DistributedSampler``
    does, and rank ``r`` takes the ``r``-th contiguous share: equal lengths,
    disjoint apart from the padding, covering the dataset.

    Parameters
    ----------
    dataset
        A :class:`RTCDataset` or :class:`InSARDataset` (anything with
        ``sample_indices``, ``shard_size`` and ``inner_chunk``).
    shuffle
        False: items in dataset order (still split across ranks).
    seed
        Non-negative integer; the same on every rank.
    num_replicas, rank
        Default: the initialised ``torch.distributed`` process group, else 1 and 0.
    drop_last
        Cut the tail instead of padding when the size is not a multiple of ``num_replicas``.
    window
        Shards whose inner-chunk blocks are shuffled together.
    block_chunks
        Inner chunks kept together as one shuffled block (see
        :func:`shard_aware_order`): 4 reads a 32-sample batch of a 2-sample-chunk
        cube as 4 runs of 8 samples, about a quarter of the requests of 1.

    Examples
    --------
    >>> sampler = ShardAwareSampler(ds, seed=0)                   # doctest: +SKIP
    >>> loader = dataloader(ds, batch_size=64, sampler=sampler, num_workers=2)
    >>> for epoch in range(10):
    ...     sampler.set_epoch(epoch)
    ...     for batch in loader: ...
    """

    def __init__(
        self,
        dataset: Any,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        window: int = DEFAULT_WINDOW,
        block_chunks: int = 1,
    ) -> None:
        try:
            indices = np.asarray(dataset.sample_indices, dtype=np.int64)
            shard, inner = int(dataset.shard_size), int(dataset.inner_chunk)
        except AttributeError:
            raise TypeError(
                f"ShardAwareSampler needs a nasar_zarr.torch dataset (RTCDataset, InSARDataset),"
                f" got {type(dataset).__name__}; for other datasets use RandomSampler or"
                " DistributedSampler"
            ) from None
        if num_replicas is None:
            num_replicas = dist.get_world_size() if _distributed() else 1
        if rank is None:
            rank = dist.get_rank() if _distributed() else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                f"num_replicas={num_replicas}, rank={rank}"
            )
        shard_aware_order(
            indices[:1],
            shard=shard,
            inner_chunk=inner,
            seed=seed,
            epoch=0,
            window=window,
            block_chunks=block_chunks,
        )  # validates the arguments
        self.block_chunks = int(block_chunks)
        self._cube = indices
        self._shard, self._inner, self.window = shard, inner, int(window)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        n = indices.size
        if self.drop_last and n % self.num_replicas:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._fingerprint = zlib.crc32(indices.tobytes()) ^ zlib.crc32(
            np.array([shard, inner], np.int64).tobytes()
        )
        self.epoch = 0
        self._resume_at = 0  # first position of the next iteration of this epoch
        self._yielded = 0  # positions of this epoch handed out so far (resumed ones included)
        self._iter_start = 0  # position the current iteration started at
        self._delivered: int | None = None  # samples a CubeDataLoader delivered since then
        self._reader_ahead: str | None = None  # the multi-worker loader drawing from us, if any

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (call before each epoch); a new epoch starts at its beginning.

        Setting the epoch that :meth:`load_state_dict` restored keeps its position.
        """
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._resume_at = 0
            self._yielded = 0
            self._iter_start = 0
            self._delivered = 0 if self._delivered is not None else None

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's items (dataset positions) for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self._cube.size
        if self.shuffle:
            order = shard_aware_order(
                self._cube,
                shard=self._shard,
                inner_chunk=self._inner,
                seed=self.seed,
                epoch=epoch,
                window=self.window,
                block_chunks=self.block_chunks,
            )
        else:
            order = np.arange(n, dtype=np.int64)
        if self.total_size > n:
            order = np.concatenate([order, np.resize(order, self.total_size - n)])
        else:
            order = order[: self.total_size]
        return order[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]

    def __iter__(self) -> Iterator[int]:
        share = self.epoch_indices()
        start, self._resume_at = self._resume_at, 0
        self._yielded = self._iter_start = start
        self._reader_ahead = _loader_reading_ahead()
        return self._generate(share[start:].tolist())

    def _generate(self, items: list[int]) -> Iterator[int]:
        for item in items:
            self._yielded += 1
            yield item

    def state_dict(self, samples_consumed: int | None = None) -> dict[str, Any]:
        """Where this rank stands, to resume at exactly the next sample.

        Parameters
        ----------
        samples_consumed
            Samples of the current epoch your loop has consumed on this rank.
            Default: what the :class:`CubeDataLoader` iterating this sampler has
            delivered (exact, whatever the workers read ahead), else the positions
            handed out. Without it, a state taken while a plain multi-worker
            ``DataLoader`` draws from the sampler raises (it read ahead of the loop).

        Returns
        -------
        dict
            ``epoch``, ``position`` and the settings a resume must match.

        Examples
        --------
        >>> state = sampler.state_dict(samples_consumed=step * batch_size)  # doctest: +SKIP
        >>> sampler.load_state_dict(state)
        """
        if samples_consumed is not None:
            position = int(samples_consumed)
        elif self._delivered is not None:  # a CubeDataLoader counts what it delivered
            position = self._iter_start + self._delivered
        elif self._reader_ahead and self._yielded > self._iter_start and not _torchdata_snapshot():
            raise ValueError(
                "ShardAwareSampler.state_dict() without samples_consumed while"
                f" {self._reader_ahead} draws from it: it has handed out {self._yielded}"
                " positions, more than your loop has consumed (the workers read ahead), and"
                " resuming there would skip samples. Use the loader's state"
                " (nasar_zarr.torch.dataloader(...).state_dict(), or torchdata's"
                " StatefulDataLoader), or pass"
                " samples_consumed=<samples your loop consumed this epoch>"
            )
        else:
            position = self._yielded
        if not 0 <= position <= self.num_samples:
            raise ValueError(
                f"samples_consumed must lie in [0, {self.num_samples}], got {samples_consumed}"
            )
        return {"epoch": self.epoch, "position": position, **self._settings()}

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window": self.window,
            "block_chunks": self.block_chunks,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "drop_last": self.drop_last,
            "dataset_size": int(self._cube.size),
            "dataset_fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields this epoch's order from ``state["position"]``.

        Parameters
        ----------
        state
            From :meth:`state_dict` of a sampler with the same settings and dataset.
        """
        mine = self._settings()
        saved = {"block_chunks": 1, **state}  # states saved before block_chunks existed
        differ = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if differ:
            text = ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"cannot resume: the sampler or dataset differs from the saved state ({text})"
            )
        position = int(state["position"])
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"position must lie in [0, {self.num_samples}], got {position}")
        self.epoch = int(state["epoch"])
        self._resume_at = self._yielded = self._iter_start = position
        self._delivered = 0 if self._delivered is not None else None


class HintedBatch(list):
    """A batch of item positions that also names the batch the same DataLoader worker is
    given next (``then``, None at the end), so the dataset can read that one while this
    one is transformed. A plain list to everything else."""

    def __init__(self, items: Iterable[int], then: Sequence[int] | None = None) -> None:
        super().__init__(items)
        self.then = None if then is None else list(then)

    def __reduce__(self) -> tuple[Any, ...]:  # to the worker with its hint
        return (HintedBatch, (list(self), self.then))


class HintedBatches:
    """The batches of ``batches``, each a :class:`HintedBatch` naming the batch ``workers``
    places later: a DataLoader hands its batches to its workers in turn, so that is the
    next batch of the worker that gets this one. Drawn ``workers`` batches ahead of the
    loader; a wrong guess (a worker skipped) costs one wasted read, never a wrong batch:
    the dataset uses what it read ahead only for exactly the positions it was asked."""

    def __init__(self, batches: Iterable[Sequence[int]], workers: int) -> None:
        self.batches, self.workers = batches, max(1, int(workers))

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[HintedBatch]:
        window: deque[list[int]] = deque()
        for batch in self.batches:
            window.append(list(batch))
            if len(window) > self.workers:
                yield HintedBatch(window.popleft(), window[-1])
        while window:
            yield HintedBatch(window.popleft())


def _loader_reading_ahead() -> str | None:
    """The multi-worker DataLoader iterator calling this (it prefetches), described; else None."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    frame: Any = sys._getframe(2)
    for _ in range(8):  # sampler <- BatchSampler <- the loader iterator's _next_index
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, _BaseDataLoaderIter):
            workers = int(getattr(owner, "_num_workers", 0))
            return f"a DataLoader with {workers} workers" if workers else None
        frame = frame.f_back
    return None


def _torchdata_snapshot() -> bool:
    """Whether torchdata's stateful batch sampler asks (it does so as it sends a batch's
    indices, so the positions handed out are exact for its snapshot)."""
    frame = sys._getframe(2)
    owner = frame.f_locals.get("self") if frame is not None else None
    return type(owner).__module__.startswith("torchdata.")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
