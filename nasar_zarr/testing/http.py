"""Loopback HTTP servers for tests and benchmarks: a counting proxy and a Range file server.

:class:`CountingProxy` sits in front of any HTTP endpoint (a moto S3 server, a
:class:`RangeServer`) and records every request that passes through it (method,
path, ``Range``, bytes in each direction), optionally adding a fixed latency
to each, so request and byte counts are those of real HTTP traffic.
:class:`RangeServer` serves a directory read-only with ``Range`` support and
no listings, like a static file host (or the Hugging Face Hub's resolve URLs).
"""

from __future__ import annotations

import http.client
import os
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    status: int
    range: str | None
    bytes_in: int  # request body
    bytes_out: int  # response body
    query: str = ""  # the URL's query string (an S3 listing is ``list-type=2&prefix=...``)


class _Threading(ThreadingHTTPServer):
    request_queue_size = 512  # clients open many connections at once (the default is 5)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up (a pool closed at exit, a reader that stopped) is
        # routine here; anything else is printed as socketserver does.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self.httpd = _Threading(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def reset(self) -> list[Request]:
        """The requests so far; the count starts again from zero."""
        with self._lock:
            done, self.requests = self.requests, []
        return done

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as real servers set it: without it a response's head and body wait on
    # the client's delayed ACK (~40 ms per lone request), which no real host adds
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    @property
    def owner(self):
        return self.server.owner  # type: ignore[attr-defined]

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if not size:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        return self.rfile.read(length) if length else b""

    def _reply(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        head: bool = False,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class CountingProxy(_Server):
    """A reverse proxy to ``upstream`` that records every request (and adds ``delay`` s).

    Examples
    --------
    >>> with CountingProxy("http://127.0.0.1:5000") as proxy:  # doctest: +SKIP
    ...     fs = s3fs.S3FileSystem(endpoint_url=proxy.url)
    ...     fs.cat_file("bkt/key", start=0, end=512)
    ...     [(r.method, r.bytes_out) for r in proxy.requests]
    [('GET', 512)]
    """

    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.delay = delay
        super().__init__(_ProxyHandler)


class _ProxyHandler(_Handler):
    def _forward(self) -> None:
        proxy: CountingProxy = self.owner
        body = self._body()
        if proxy.delay:
            time.sleep(proxy.delay)
        host = proxy.upstream.hostname or "127.0.0.1"
        conn = http.client.HTTPConnection(host, proxy.upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if "Content-Length" in self.headers or body:
            headers["Content-Length"] = str(len(body))
        headers.pop("Transfer-Encoding", None)
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        head = self.command == "HEAD"
        length = int(resp.getheader("Content-Length") or 0) if head else None
        path, _, query = self.path.partition("?")
        proxy.record(
            Request(
                self.command,
                urllib.parse.unquote(path),
                resp.status,
                self.headers.get("Range"),
                len(body),
                len(data),
                urllib.parse.unquote(query),
            )
        )
        self._reply(resp.status, resp.getheaders(), data, head=head, length=length)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class RangeServer(_Server):
    """Serve the files under ``root`` read-only, with ``Range`` and no directory listings.

    Examples
    --------
    >>> with RangeServer("corpus") as server:  # doctest: +SKIP
    ...     plan = nasar_zarr.plan_conversion(server.url, "nasar.zarr")
    """

    def __init__(self, root: str | os.PathLike, delay: float = 0.0) -> None:
        self.root = Path(root).resolve()
        self.delay = delay
        super().__init__(_FileHandler)


class _FileHandler(_Handler):
    def _serve(self, head: bool) -> None:
        server: RangeServer = self.owner
        if server.delay:
            time.sleep(server.delay)
        rel = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")
        path = (server.root / rel).resolve()
        rng = self.headers.get("Range")
        if server.root not in path.parents or not path.is_file():
            server.record(Request(self.command, "/" + rel, 404, rng, 0, 0))
            self._reply(404, [("Content-Type", "text/plain")], b"not found", head=head)
            return
        size = path.stat().st_size
        start, end, status = 0, size, 200
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes=") :].partition("-")
            if first:
                start, end = int(first), min(int(last) + 1 if last else size, size)
            else:
                start, end = max(0, size - int(last)), size
            if start >= size:
                server.record(Request(self.command, "/" + rel, 416, rng, 0, 0))
                self._reply(416, [("Content-Range", f"bytes */{size}")], b"", head=head)
                return
            status = 206
        stat = path.stat()
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        match = self.headers.get("If-Match")
        if match and match.strip() not in ("*", etag):  # RFC 9110 13.1.1
            server.record(Request(self.command, "/" + rel, 412, rng, 0, 0))
            self._reply(412, [("ETag", etag)], b"", head=head)
            return
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Accept-Ranges", "bytes"),
            ("ETag", etag),
        ]
        if status == 206:
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        server.record(Request(self.command, "/" + rel, status, rng, 0, 0 if head else end - start))
        self._reply(status, headers, b"", head=True, length=end - start)
        if head:
            return
        # the body straight from the page cache to the socket: the server's own CPU should
        # not be what a benchmark of its clients measures
        self.wfile.flush()
        with open(path, "rb") as f:
            offset, left = start, end - start
            while left > 0:
                sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, left)
                if sent == 0:
                    break
                offset, left = offset + sent, left - sent

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)


__all__ = ["CountingProxy", "RangeServer", "Request"]
