"""A test hook: stop this process at a named point of a conversion.

The crash tests set ``NASAR_ZARR_FAULT=point`` (or ``point:N``, the N-th time
that point is reached) and the process is SIGKILLed there, or interrupted as by
Ctrl-C with ``NASAR_ZARR_FAULT_SIGNAL=INT``. ``NASAR_ZARR_FAULT_SCOPE=group``
signals the whole process group instead: the command and the dask workers it
started, as when a machine goes away mid-run (the test starts the command in a
session of its own). Without the variable this is a
dictionary lookup. The hit counter is the only mutable module state in the
writing side, guarded by a lock, and only ever counts when a test asks for it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

FAULT_ENV = "NASAR_ZARR_FAULT"
SIGNAL_ENV = "NASAR_ZARR_FAULT_SIGNAL"
SCOPE_ENV = "NASAR_ZARR_FAULT_SCOPE"

_hits: Counter[str] = Counter()
_hits_lock = threading.Lock()


def fault_point(name: str) -> None:
    """Kill (or interrupt) this process if the environment asks for it at ``name``."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    with _hits_lock:
        _hits[name] += 1
        reached = _hits[name] >= int(count or 1)
    if reached:
        how = getattr(signal, f"SIG{os.environ.get(SIGNAL_ENV, 'KILL')}")
        if os.environ.get(SCOPE_ENV) == "group":
            os.killpg(os.getpgid(0), how)
        os.kill(os.getpid(), how)
