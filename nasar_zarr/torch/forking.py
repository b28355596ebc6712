"""Is tensorstore usable in this process? (Only ``engine="tensorstore"`` cares.)"""

from __future__ import annotations

import glob
import os
import sys


class _ForkGuard:
    """Is tensorstore usable in this process?

    tensorstore aborts a process forked after its thread pool started. Before each
    ``os.fork`` the parent notes whether those threads run; the child inherits the
    note (and keeps it for its own children). Only ``engine="tensorstore"`` cares.
    """

    unsafe = False  # this process descends from a fork taken while tensorstore ran
    opened = False  # a dataset of this module opened tensorstore in this process
    _threads_at_fork = False

    @classmethod
    def before(cls) -> None:
        cls._threads_at_fork = cls.opened or _tensorstore_threads_running()

    @classmethod
    def after_in_child(cls) -> None:
        cls.unsafe = cls.unsafe or cls._threads_at_fork
        cls.opened = False


def _tensorstore_threads_running() -> bool:
    """Whether tensorstore's thread pool (threads named ``ts_pool_worker``) runs (Linux)."""
    if "tensorstore" not in sys.modules:
        return False
    for comm in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(comm) as f:
                if f.read().startswith("ts_pool"):
                    return True
        except OSError:  # the thread ended meanwhile
            continue
    return False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_ForkGuard.before, after_in_child=_ForkGuard.after_in_child)

_FORKED_HINT = (
    "this process was forked after tensorstore started its threads (multiprocessing start"
    " method 'fork' after the parent read the cube), and tensorstore aborts such a process."
    " Use the default engine (engine=None, the fork-safe shard reader), or start workers"
    " with DataLoader(..., multiprocessing_context='forkserver')"
)
