"""A real S3 server on loopback with every request counted, for tests and benchmarks.

:class:`MotoS3` starts moto's ``ThreadedMotoServer`` behind a
:class:`~nasar_zarr.testing.http.CountingProxy`; :func:`request_kind` sorts each
recorded request by what it touches (a listing, a ``zarr.json``, a chunk
object, a task record, the source's tars or metadata, ...), and :func:`tally`
counts them by method and kind, so tests can assert exact request counts and
the benchmark can report where a conversion's requests go.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from .http import CountingProxy, Request

_CHUNK = re.compile(r"/c(/\d+)+$")  # Zarr v3's default chunk key encoding


def request_kind(request: Request) -> str:
    """What a request touches: ``list``, ``zarr.json``, ``chunk``, ``task-record``,
    ``lock``, ``bookkeeping`` (other ``_nasar/`` objects), ``tar``, ``metadata.parquet``,
    ``summary``, ``bucket`` (the bucket itself) or ``other``."""
    path = request.path.rstrip("/")
    if "list-type" in request.query or (request.method == "GET" and path.count("/") == 1):
        return "list"
    if path.count("/") <= 1:
        return "bucket"
    name = path.rsplit("/", 1)[1]
    if name == "zarr.json":
        return "zarr.json"
    if "/_nasar/tasks/" in path:
        return "task-record"
    if path.endswith("/_nasar/lock.json"):
        return "lock"
    if "/_nasar/" in path:
        return "bookkeeping"
    if _CHUNK.search(path):
        return "chunk"
    if name.endswith(".tar"):
        return "tar"
    if name == "metadata.parquet":
        return "metadata.parquet"
    if name == "webdataset_summary.json":
        return "summary"
    return "other"


def tally(requests: Iterable[Request]) -> dict[str, Any]:
    """Counts of ``requests``: ``total``, ``by_method``, ``by_kind`` and ``by_method_kind``
    (``"HEAD zarr.json"`` and so on), each sorted by count."""
    requests = list(requests)
    by_method = Counter(r.method for r in requests)
    by_kind = Counter(request_kind(r) for r in requests)
    both = Counter(f"{r.method} {request_kind(r)}" for r in requests)
    return {
        "total": len(requests),
        "by_method": dict(by_method.most_common()),
        "by_kind": dict(by_kind.most_common()),
        "by_method_kind": dict(both.most_common()),
    }


def objects_written(requests: Iterable[Request]) -> set[str]:
    """Paths of the objects successfully PUT."""
    return {r.path for r in requests if r.method == "PUT" and r.status < 300}


class MotoS3:
    """moto's S3 server on loopback behind a counting proxy.

    ``storage_options`` point fsspec (s3fs) at the proxy; ``proxy.reset()``
    returns the requests so far.

    Examples
    --------
    >>> with MotoS3() as s3:  # doctest: +SKIP
    ...     fs = s3fs.S3FileSystem(**s3.storage_options)
    ...     fs.mkdir("bkt")
    ...     tally(s3.proxy.reset())["by_method"]
    {'PUT': 1}
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.moto: Any = None
        self.proxy: CountingProxy | None = None
        self.storage_options: dict[str, Any] = {}

    def __enter__(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(k, "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.proxy = CountingProxy(f"http://{host}:{port}", delay=self.delay).start()
        self.storage_options = {
            "endpoint_url": self.proxy.url,
            "key": "testing",
            "secret": "testing",
        }
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.moto is not None:
            self.moto.stop()


__all__ = ["MotoS3", "objects_written", "request_kind", "tally"]
