"""Where tasks run: in this process, on a LocalCluster started here, or on a given client.

The runner knows nothing about conversion: it calls ``fn(*args, **kwargs)`` for
each call and yields the results as they finish, with a progress bar. Tasks are
submitted with ``pure=False`` and unique keys, so a rerun never reuses a result
cached on a long-lived cluster.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Call = tuple[tuple[Any, ...], dict[str, Any]]


def local_cluster(n_workers: int) -> Any:
    """A LocalCluster of single-threaded worker processes with glibc's malloc defaults.

    dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which disables
    glibc's dynamic mmap threshold: every shard-sized buffer is then fresh memory
    and page-faults again (measured: 5x the page faults, conversion 443 -> 719
    samples/s with the default restored). The nanny also writes the variable into
    this process's environment, so it is removed again for the next cluster.
    """
    import dask
    from distributed import LocalCluster

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    with dask.config.set({key: None}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            memory_limit=0,
            # Only this cluster's own logs: a failing task still reaches the caller as
            # its exception (one line on the CLI), a lost worker as KilledWorker; what
            # is silenced is the shutdown chatter (heartbeat tracebacks at the end of
            # long runs).
            silence_logs=logging.CRITICAL,
        )
    if before is None:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return cluster


def run_calls(
    fn: Callable[..., Any],
    calls: Sequence[Call],
    *,
    client: Any = None,
    workers: int | None = None,
    progress: bool = False,
    total: int | None = None,
    initial: int = 0,
    desc: str = "",
) -> Iterator[Any]:
    """Run ``fn(*args, **kwargs)`` for each call, yielding results as they finish.

    On ``client``; else on a LocalCluster of ``workers`` processes (default one
    per core) started here; ``workers=0`` runs them one by one in this process.
    The first failure cancels what is still queued and is raised; so does an
    interrupt (Ctrl-C), after which the cluster started here is closed in order.
    """
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(calls) + initial if total is None else total,
        initial=initial,
        unit="shard",
        disable=None if progress else True,
        desc=desc,
    )
    try:
        if client is None and workers == 0:
            for args, kwargs in calls:
                yield fn(*args, **kwargs)
                bar.update()
            return
        from distributed import Client, as_completed

        owned = None
        if client is None:
            owned = local_cluster(workers or os.cpu_count() or 1)
            client = Client(owned)
        try:
            run = uuid.uuid4().hex[:8]
            futures = [
                client.submit(fn, *args, **kwargs, pure=False, key=f"nasar-{desc}-{i}-{run}")
                for i, (args, kwargs) in enumerate(calls)
            ]
            try:
                for future in as_completed(futures):
                    yield future.result()
                    bar.update()
            except BaseException:
                client.cancel(futures)
                raise
        finally:
            if owned is not None:
                _close_in_order(client, owned)
    finally:
        bar.close()


def _close_in_order(client: Any, cluster: Any) -> None:
    """Workers leave while the scheduler still answers, then the scheduler closes.

    Closing the cluster with its workers still attached can make a worker's
    heartbeat meet a closed scheduler and log a traceback ("Failed to communicate
    with scheduler during heartbeat") at the end of a long, successful run.
    """
    try:
        client.retire_workers(close_workers=True, remove=True)
    except Exception:  # noqa: BLE001 - shutting down: closing below is what matters
        pass
    client.close()
    cluster.close()
