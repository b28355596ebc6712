"""Ranged GETs over HTTP(S), read straight into buffers: the seam's client for web hosts.

:mod:`nasar_zarr.ranges` sends ``http(s)://`` (and the Hub's ``resolve`` URLs)
here rather than through fsspec's aiohttp filesystem, because the body of a
range is most of what a cube read costs and aiohttp spends 2-3x the CPU per
megabyte of a blocking ``readinto`` (measured here, loopback, 1-4 MB ranges:
0.58-0.86 ms/MB against 0.27 ms/MB, client user + system time), all of it on
one event-loop thread. urllib3 gives pooled keep-alive connections, TLS,
redirects (the Hub answers with a redirect to its CDN, and ``Authorization``
is dropped when the host changes) and retries; each body is read with
``readinto`` into one buffer per request, so a range is copied once, from the
socket.

Concurrency is a small thread pool per process: ``recv_into`` releases the GIL,
so the requests of one call overlap each other and the caller's decoding.
The pool and its connections belong to the process that made them: a forked
child (PyTorch's DataLoader workers, dask's process pools) finds the parent's
pid on them and builds its own, never touching an inherited socket.
"""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import urllib3

T = TypeVar("T")
HTTPError = urllib3.exceptions.HTTPError  # what a request that never got an answer raises

MAX_IN_FLIGHT = 32  # requests at once per process (connections kept per host)
CONNECT_TIMEOUT = 3.0  # seconds, as the S3 client's (store.S3_CONFIG)
READ_TIMEOUT = 60.0


@dataclass(frozen=True)
class Response:
    """What a ranged GET returned: status, body, ETag and the object's total size."""

    status: int
    body: memoryview  # bytes, writable, owned by the response
    etag: str | None
    total: int | None  # from Content-Range, or the length of a whole (200) body


class _Client:
    """One process's connection pool and threads (made on first use, never shared)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        retries = urllib3.Retry(
            total=4,
            connect=2,
            read=1,
            redirect=5,
            status=3,
            status_forcelist=(429, 500, 502, 503, 504),
            backoff_factor=0.2,
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
        )
        self.pool = urllib3.PoolManager(
            num_pools=16,
            maxsize=MAX_IN_FLIGHT,
            retries=retries,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
        )
        self.threads = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="nasar-http")


_LOCK = threading.Lock()
_CLIENT: _Client | None = None


def _forget_after_fork() -> None:
    """A forked child starts with no client and a fresh lock (a parent thread may have
    held it at the fork)."""
    global _LOCK, _CLIENT
    _LOCK, _CLIENT = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_after_fork)


def _client() -> _Client:
    global _CLIENT
    with _LOCK:
        if _CLIENT is None or _CLIENT.pid != os.getpid():  # new process: a new client
            _CLIENT = _Client()
        return _CLIENT


def get(
    url: str,
    byte_range: str | None = None,
    version: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """One GET of ``url`` (``Range: byte_range``, ``If-Match: version`` when given).

    A 2xx body is read whole into one buffer; other statuses come back with an
    empty body for the caller to name. Connection failures raise urllib3's errors
    (``MaxRetryError``), which the caller turns into one line.
    """
    sent = {"Accept-Encoding": "identity", **dict(headers or {})}
    if byte_range:
        sent["Range"] = byte_range
    if version:
        sent["If-Match"] = version
    response = _client().pool.request(
        "GET", url, headers=sent, preload_content=False, decode_content=False
    )
    try:
        etag = response.headers.get("ETag")
        if response.status >= 300:
            return Response(response.status, memoryview(b""), etag, None)
        length = response.headers.get("Content-Length")
        body = _read_into(response, int(length) if length and length.isdigit() else None)
        total = _total(response.headers.get("Content-Range"))
        return Response(response.status, body, etag, len(body) if total is None else total)
    finally:
        response.release_conn()


def request_headers(options: Mapping[str, Any]) -> dict[str, str]:
    """The headers every request of a store gets: its ``headers`` option, and a
    ``token`` option (the Hub's, as ``hf://`` URLs take it) as a bearer token."""
    headers = {str(k): str(v) for k, v in dict(options.get("headers") or {}).items()}
    token = options.get("token")
    if isinstance(token, str) and token and "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def map_requests(function: Callable[..., T], jobs: Sequence[tuple[Any, ...]]) -> list[T]:
    """``function(*job)`` for each job, concurrently on this process's threads (one job
    runs in the caller's thread: no hand-off for a lone request)."""
    if len(jobs) == 1:
        return [function(*jobs[0])]
    futures = [_client().threads.submit(function, *job) for job in jobs]
    return [f.result() for f in futures]


def reason(exc: BaseException) -> str:
    """Why a request failed, in a few words (urllib3 nests the cause in its retries)."""
    cause = getattr(exc, "reason", None) or exc
    text = str(cause).split(": ", 1)[-1] if isinstance(cause, Exception) else str(cause)
    return f"no answer ({type(cause).__name__}: {text})"


def _read_into(response: Any, length: int | None) -> memoryview:
    if length is None:  # no Content-Length (chunked): let urllib3 assemble it
        return memoryview(response.read())
    # urllib3's own readinto reads into a temporary and copies; the http.client response
    # under it receives straight into our buffer (recv_into), once. The buffer is numpy's:
    # not zeroed first (bytearray(n) writes every page before the socket does), and
    # large ones on huge pages where the kernel allows
    raw = getattr(response, "_fp", None)
    readinto = raw.readinto if isinstance(raw, http.client.HTTPResponse) else response.readinto
    body = np.empty(length, np.uint8).data
    got = 0
    while got < length:
        n = readinto(body[got:])
        if not n:
            break
        got += n
    return body[:got]  # short if the connection ended early: the caller checks the length


def _total(content_range: str | None) -> int | None:
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return None
