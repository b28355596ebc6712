"""One writer per cube: the store lock ``_nasar/lock.json``, taken in one atomic step.

Taking the lock is a single exclusive create (:func:`nasar_zarr.store.create_json`):
an ``O_EXCL`` open on local disks, a conditional ``PutObject`` (``If-None-Match: *``)
on S3 and S3-compatible servers that honour it, and the filesystem's own
``mode="create"`` elsewhere. Of two converters started at the same moment exactly
one creates the object; the other is refused with the holder's host and pid.

A lock left behind by a killed run on the same host (its pid is gone) is stale:
it is removed, if it still holds the same token, and the exclusive create is
tried again, so two runs that both find the stale lock still cannot both win.
A lock held on another host is trusted; the message says how to remove it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from . import store
from .errors import StoreLockedError


@contextmanager
def store_lock(dest: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[str]:
    """Hold the store's lock for the block; yields this run's token.

    Raises
    ------
    StoreLockedError
        Another live conversion holds the lock.
    """
    token: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    for _ in range(3):
        if store.create_json(dest, store.LOCK_FILE, token, storage_options):
            break
        held = store.read_json(dest, store.LOCK_FILE, storage_options)
        if held is None:
            continue  # released between our create and our read: try again
        if not _stale(held):
            raise StoreLockedError(_held_message(dest, held))
        again = store.read_json(dest, store.LOCK_FILE, storage_options)
        if again and again.get("token") == held.get("token"):
            store.remove(dest, store.LOCK_FILE, storage_options)
    else:
        held = store.read_json(dest, store.LOCK_FILE, storage_options) or {}
        raise StoreLockedError(_held_message(dest, held))
    try:
        yield token["token"]
    finally:
        current = store.read_json(dest, store.LOCK_FILE, storage_options)
        if current and current.get("token") == token["token"]:
            store.remove(dest, store.LOCK_FILE, storage_options)


def _held_message(dest: str, held: Mapping[str, Any]) -> str:
    return (
        f"{dest}: another conversion (pid {held.get('pid')} on {held.get('host')}, since"
        f" {held.get('since')}) holds the lock; wait for it, or delete"
        f" {store.LOCK_FILE} in the store if that process is gone"
    )


def _stale(held: Mapping[str, Any]) -> bool:
    if held.get("host") != socket.gethostname():
        return False  # cannot see other machines' processes: trust the lock
    pid = int(held.get("pid", -1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
