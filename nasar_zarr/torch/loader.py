"""The DataLoader side: start method, collation, and a loader that knows what it delivered."""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from .buffers import POOL_KEY, POOL_SLOTS, _start_pool
from .datasets import _CubeDataset
from .sampler import HintedBatches, ShardAwareSampler


def safe_start_method() -> str:
    """``"forkserver"`` where the platform has it, else ``"spawn"``: never ``"fork"``.

    Returns
    -------
    str
        A multiprocessing start method for DataLoader workers.

    Examples
    --------
    >>> safe_start_method()                                        # doctest: +SKIP
    'forkserver'
    """
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def collate(batch: list[Any]) -> Any:
    """``default_collate``, without copying tensors that already are the rows of one batch.

    :meth:`~RTCDataset.__getitems__` writes each output key of a batch into one
    buffer (in shared memory inside a DataLoader worker), so the batch of a key
    is that buffer itself; stacking its rows again would copy every byte. Anything
    else is collated by ``default_collate``, with the same result.

    Parameters
    ----------
    batch
        A list of samples (dicts), as the DataLoader passes it.

    Returns
    -------
    dict
        ``default_collate``'s batch: a tensor per key with the batch axis first,
        a list of ``sample_key`` strings, an int64 tensor of ``index``.

    Examples
    --------
    >>> loader = DataLoader(ds, batch_size=64, collate_fn=collate)  # doctest: +SKIP
    """
    if not batch or not isinstance(batch[0], Mapping):
        return default_collate(batch)
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key == POOL_KEY:  # the batch's pooled buffer: one tag for the whole batch
            out[key] = values[0] if len(set(values)) == 1 else -1
            continue
        rows = _rows_of_one_buffer(values)
        out[key] = rows if rows is not None else default_collate(values)
    return out


def _rows_of_one_buffer(values: list[Any]) -> Tensor | None:
    """The batch tensor whose rows ``values`` are, in order; None if they are not."""
    first = values[0]
    if not isinstance(first, torch.Tensor) or not first.is_contiguous():
        return None
    pointer, step = first.untyped_storage().data_ptr(), first.numel()
    offset, shape = first.storage_offset(), first.shape
    for j, value in enumerate(values):
        if not (
            isinstance(value, torch.Tensor)
            and value.untyped_storage().data_ptr() == pointer
            and value.shape == shape
            and value.dtype == first.dtype
            and value.is_contiguous()
            and value.storage_offset() == offset + j * step
        ):
            return None
    return first.as_strided((len(values), *shape), (step, *first.stride()), offset)


class CubeDataLoader(DataLoader):
    """A ``DataLoader`` that knows what it has delivered: an exact resume state.

    Returned by :func:`dataloader`. Iterating it counts the samples of every
    batch handed to the loop, so :meth:`state_dict` (and the sampler's own
    ``state_dict()``) points at exactly the next undelivered sample, whatever the
    workers read ahead. Batches of a dataset made with ``device=`` are
    transformed on that device (``dataset.finish``) before they are handed out.
    With persistent workers (the default of :func:`dataloader`) each worker
    reuses its shared-memory batch buffers, each only after nothing in this
    process references the batch any more (see :class:`_Pool`).

    Examples
    --------
    >>> loader = dataloader(ds, batch_size=64, sampler=ShardAwareSampler(ds), num_workers=4)
    >>> state = loader.state_dict()          # save with the model    # doctest: +SKIP
    >>> loader.load_state_dict(state)        # resume: the next batch is the next sample
    """

    def __init__(self, dataset: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._pool_flags: Tensor | None = None
        self._pooled: list[tuple[int, list[Tensor]]] = []  # (tag, the batch's storages)
        if isinstance(dataset, _CubeDataset) and self.num_workers > 0 and self.persistent_workers:
            # the workers' batch buffer pools: reused once nothing here holds the batch
            flags = torch.zeros((self.num_workers, POOL_SLOTS), dtype=torch.uint8)
            self._pool_flags = flags.share_memory_()
            self.worker_init_fn = functools.partial(_start_pool, flags, self.worker_init_fn)

    def __iter__(self) -> Any:  # a _Delivering, not a _BaseDataLoaderIter
        return _Delivering(super().__iter__(), self)

    def close(self) -> None:
        """Stop the persistent workers now (the next iteration starts new ones).

        A loader with persistent workers holds its worker processes until it is
        freed. Freed by reference counting, that is immediate; freed by the
        cyclic garbage collector (a loader held in a reference cycle: an
        exception's traceback, an object that refers back to its owner), the
        workers' queues are finalized first and PyTorch waits up to 5 s per
        worker for each to notice, on whichever thread triggered the
        collection. ``close()``, or ``with dataloader(...) as loader:``, makes
        the shutdown immediate and deterministic.
        """
        iterator, self._iterator = self._iterator, None  # set only with persistent workers
        if iterator is not None:
            iterator._shutdown_workers()  # type: ignore[attr-defined]  # a multiprocess one

    def __enter__(self) -> CubeDataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _index_sampler(self) -> Any:
        """The batches, each hinting the next batch of the same worker (the datasets read
        it ahead on remote stores, see ``read_ahead``)."""
        batches = super()._index_sampler
        if self._auto_collation and isinstance(self.dataset, _CubeDataset):
            return HintedBatches(batches, self.num_workers)
        return batches

    def _hold(self, batch: Any) -> None:
        """Note a delivered batch's pooled buffer (and drop the tag from the batch)."""
        if not isinstance(batch, dict) or POOL_KEY not in batch:
            return
        tag = batch.pop(POOL_KEY)
        tag = int(tag if isinstance(tag, int) else torch.as_tensor(tag).reshape(-1)[0])
        if tag < 0 or self._pool_flags is None:
            return
        # Empty tensors of our own on each storage the batch's tensors use (not views: a
        # view keeps its base alive); the batch's tensors are the user's to keep or drop.
        refs: dict[int, Tensor] = {}
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.is_shared():
                storage = value.untyped_storage()
                if storage.data_ptr() not in refs:
                    ref = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (0,), (1,))
                    refs[storage.data_ptr()] = ref
        if refs:
            self._pooled.append((tag, list(refs.values())))

    def _release(self) -> None:
        """Hand back the buffers of batches nothing in this process references any more."""
        if not self._pooled or self._pool_flags is None:
            return
        flags = self._pool_flags.view(-1)
        kept = []
        for tag, refs in self._pooled:
            # our tensor and the temporary storage object: no one else holds the storage
            if all(torch._C._storage_Use_Count(r.untyped_storage()._cdata) <= 2 for r in refs):
                flags[tag] = 1
            else:
                kept.append((tag, refs))
        self._pooled = kept

    def _shard_sampler(self) -> ShardAwareSampler | None:
        for candidate in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if isinstance(candidate, ShardAwareSampler):
                return candidate
        return None

    def _need_sampler(self) -> ShardAwareSampler:
        sampler = self._shard_sampler()
        if sampler is None:
            raise TypeError(
                "CubeDataLoader.state_dict needs sampler=ShardAwareSampler(dataset) (the"
                f" resumable order); this loader samples with {type(self.sampler).__name__}"
            )
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the next sample this loader has not delivered.

        Returns
        -------
        dict
            ``{"sampler": ShardAwareSampler.state_dict()}``, JSON-serialisable.
        """
        return {"sampler": self._need_sampler().state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration starts at the saved sample (same sampler settings).

        Parameters
        ----------
        state
            From :meth:`state_dict`.
        """
        self._need_sampler().load_state_dict(state["sampler"])


class _Delivering:
    """A DataLoader iterator that counts what it hands out and finishes device batches."""

    def __init__(self, iterator: Any, loader: CubeDataLoader) -> None:
        self._iterator = iterator
        self._loader = loader
        self._sampler = loader._shard_sampler()
        self._finish = getattr(loader.dataset, "finish", None)
        if self._sampler is not None:
            self._sampler._delivered = 0

    def __iter__(self) -> _Delivering:
        return self

    def __len__(self) -> int:
        return len(self._iterator)

    def __next__(self) -> Any:
        self._loader._release()
        batch = next(self._iterator)
        self._loader._hold(batch)
        sampler = self._sampler
        if sampler is not None:
            size = _batch_size(batch)
            if size is None:
                left = sampler.num_samples - sampler._iter_start - (sampler._delivered or 0)
                size = min(int(self._loader.batch_size or 1), left)
            sampler._delivered = (sampler._delivered or 0) + size
        if self._finish is not None and isinstance(batch, dict):
            batch = self._finish(batch)
        return batch


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Mapping) and "index" in batch:
        return len(batch["index"])
    return None


def dataloader(dataset: Any, **kwargs: Any) -> CubeDataLoader:
    """A :class:`CubeDataLoader` with good defaults for the cube's datasets.

    With ``num_workers > 0``, workers start with the platform's default method
    (``fork`` on Linux: the datasets read through the fork-safe shard decoder,
    so scripts need no ``if __name__ == "__main__":`` guard) and
    ``persistent_workers`` defaults to True (worker start-up is paid once, not
    every epoch). ``multiprocessing_context="forkserver"`` stays an option (its
    server preloads this module); a dataset with ``engine="tensorstore"`` gets
    forkserver by default. ``collate_fn`` defaults to :func:`collate` (the batch
    buffers the datasets build, without a copy). Every other argument is the
    DataLoader's.

    Parameters
    ----------
    dataset
        Usually an :class:`RTCDataset` or :class:`InSARDataset`.
    **kwargs
        Passed to ``DataLoader`` (``batch_size``, ``sampler``, ``num_workers``...).

    Returns
    -------
    CubeDataLoader
        A ``DataLoader`` with an exact ``state_dict()`` / ``load_state_dict()``.

    Examples
    --------
    >>> ds = InSARDataset("demo-output/nasar.zarr")                # doctest: +SKIP
    >>> loader = dataloader(ds, batch_size=64, sampler=ShardAwareSampler(ds), num_workers=2)
    """
    if kwargs.get("num_workers", 0) > 0:
        context = kwargs.get("multiprocessing_context")
        if context is None and getattr(dataset, "engine", None) == "tensorstore":
            context = safe_start_method()
        if isinstance(context, str):
            context = multiprocessing.get_context(context)
        if context is not None and context.get_start_method() == "forkserver":
            context.set_forkserver_preload(["nasar_zarr.torch"])
        kwargs["multiprocessing_context"] = context
        kwargs.setdefault("persistent_workers", True)
    kwargs.setdefault("collate_fn", collate)
    return CubeDataLoader(dataset, **kwargs)
