"""The viewer's request handler: which file a request may read, and how much of it.

Three checks, each a pure function with its own tests:

- :func:`resolve_inside`: a path is served only if its fully resolved file
  (every symlink followed) lies under the root of its mount, resolved once at
  start: a cube received from elsewhere cannot link to ``/etc/passwd``.
- :func:`host_names_server`: the ``Host`` must name this server (DNS
  rebinding: a web page whose name now resolves to 127.0.0.1 sends its own
  name, and is refused).
- :func:`byte_range`: RFC 9110 ranges: one range is 206, several ranges or
  another unit are ignored (200, the whole file), an unsatisfiable set is 416.
"""

from __future__ import annotations

import http.server
import os
import re
import stat
import urllib.parse
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO

LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
_TYPES = {
    ".json": "application/json",
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
}
_RANGE_SPEC = re.compile(r"(\d*)-(\d*)")
_PORT = re.compile(r"\d{1,5}")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def byte_range(header: str | None, size: int) -> tuple[int, int, int]:
    """How to answer a ``Range`` header on a file of ``size`` bytes (RFC 9110 §14).

    Parameters
    ----------
    header
        The ``Range`` field's value, or None when the request has none (or it
        must be ignored: HEAD, ``If-Range``).
    size
        The file's length in bytes.

    Returns
    -------
    tuple of int
        ``(status, start, stop)``: 206 with the half-open byte span
        ``[start, stop)``; 200 with ``(0, size)`` (no range, another unit,
        several ranges, or an invalid set: RFC 9110 lets a server ignore
        them); 416 with ``(0, 0)`` when no range overlaps the file.

    Examples
    --------
    >>> byte_range("bytes=10-19", 100), byte_range("bytes=-5", 100)
    ((206, 10, 20), (206, 95, 100))
    >>> byte_range("bytes=0-1,3-4", 100), byte_range("items=0-5", 100)
    ((200, 0, 100), (200, 0, 100))
    >>> byte_range("bytes=100-", 100)
    (416, 0, 0)
    """
    whole = (200, 0, size)
    if header is None:
        return whole
    unit, sep, range_set = header.partition("=")
    if not sep or unit.lower() != "bytes":
        return whole  # another unit (or none): "MUST ignore"
    specs = []
    for item in range_set.split(","):
        if not item.strip(" \t"):
            continue  # empty list elements are allowed (RFC 9110 §5.6.1)
        match = _RANGE_SPEC.fullmatch(item.strip(" \t"))
        if match is None or match.groups() == ("", ""):
            return whole  # an invalid ranges-specifier: "MAY ignore"
        first, last = (None if g == "" else int(g) for g in match.groups())
        if first is not None and last is not None and last < first:
            return whole
        specs.append((first, last))
    if not specs:
        return whole
    satisfiable = [(f, v) for f, v in specs if (f is not None and f < size) or (f is None and v)]
    if not satisfiable:
        return (416, 0, 0)
    if len(specs) > 1 or size == 0:
        return whole  # no multipart/byteranges: the whole file answers every range
    first, last = specs[0]
    if first is None:  # a suffix: the last `last` bytes
        assert last is not None
        return (206, max(size - last, 0), size)
    return (206, first, size if last is None else min(last + 1, size))


def host_names_server(value: str, port: int, names: tuple[str, ...] = LOCAL_NAMES) -> bool:
    """Whether a ``Host`` value (or an absolute URL's authority) names this server.

    Parameters
    ----------
    value
        ``host`` or ``host:port``; an IPv6 host in brackets.
    port
        The port this server listens on: a port in ``value`` must be this one.
    names
        The host names (lower case) the server answers to.

    Returns
    -------
    bool

    Examples
    --------
    >>> host_names_server("localhost:8765", 8765), host_names_server("[::1]", 8765)
    (True, True)
    >>> host_names_server("evil.example.com:8765", 8765), host_names_server("localhost:1", 8765)
    (False, False)
    """
    text = value.strip().lower()
    if text.startswith("["):
        host, bracket, rest = text.partition("]")
        host += bracket
    else:
        host, colon, rest = text.partition(":")
        rest = colon + rest
    if rest:
        if not rest.startswith(":") or _PORT.fullmatch(rest[1:]) is None:
            return False
        if int(rest[1:]) != port:
            return False
    return host in names


def resolve_inside(root: Path, parts: list[str]) -> Path | None:
    """The path ``root/parts...`` resolved (symlinks followed), if it lies under ``root``.

    Parameters
    ----------
    root
        A resolved folder (``Path.resolve()``).
    parts
        The URL path's components, percent-decoded.

    Returns
    -------
    pathlib.Path or None
        None when a component is ``.``, ``..``, holds a backslash or NUL, the
        path does not exist, or its resolved path leaves ``root`` (a symlink to
        a file or folder outside, however relative).
    """
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        return None
    try:
        real = Path(os.path.realpath(root.joinpath(*parts), strict=True))
    except (OSError, ValueError):
        return None
    return real if real.is_relative_to(root) else None


def open_regular(path: Path) -> tuple[BinaryIO, int] | None:
    """``path`` opened for reading, and its size, if it is a regular file (no
    folders, FIFOs or devices: opening never blocks, listing never happens)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb"), info.st_size


def _either(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class ViewerHandler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the files under two roots: the page at ``/``, the cube at
    ``/<mount>/``; HTTP/1.1 keep-alive, one per connection (see
    :class:`~nasar_zarr.viewer.server.PooledHTTPServer`).

    Subclassed per server (:func:`~nasar_zarr.viewer.make_server`) with the
    class attributes below.
    """

    protocol_version = "HTTP/1.1"
    server_version = "nasar-zarr-viewer"
    timeout = 10.0  # seconds a client may pause in the middle of a request
    roots: dict[str, Path] = {}  # first path component -> resolved root; "" is the page
    host_names: tuple[str, ...] = LOCAL_NAMES
    port = 0
    verbose = False

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        # socketserver's handlers serve the whole connection in __init__; the pooled
        # server calls serve_ready() each time the connection has bytes to read.
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()

    def serve_ready(self) -> bool:
        """Answer the requests the client has sent; True to keep the connection."""
        while True:
            self.handle_one_request()
            if self.close_connection:
                return False
            if not self._buffered():
                return True

    def _buffered(self) -> bool:
        """Whether the next request's bytes are already here (pipelined): the
        selector sees the socket, not the bytes in ``rfile``'s buffer."""
        self.connection.setblocking(False)
        try:
            return bool(self.rfile.peek(1))  # type: ignore[attr-defined]
        except OSError:
            return False
        finally:
            self.connection.settimeout(self.timeout)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body we do not read must not become a request
        path = self._authorized_path()
        if path is None:
            return  # refused, and answered
        target = self._file(path)
        opened = None if target is None else open_regular(target)
        if target is None or opened is None:
            # Kept alive: zarr readers ask for absent keys (missing shards) as a matter of course.
            self._refuse(HTTPStatus.NOT_FOUND, "not found", close=False)
            return
        f, size = opened
        with f:
            ranges = self.headers.get_all("Range") or []
            # Ranges are defined for GET only; If-Range names a validator we never sent.
            header = (
                ranges[0] if body and len(ranges) == 1 and "If-Range" not in self.headers else None
            )
            status, start, stop = byte_range(header, size)
            if status == 416:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(status)
            self.send_header("Content-Type", _TYPES.get(target.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Cache-Control", "no-cache")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            if body:
                f.seek(start)
                remaining = stop - start
                while remaining > 0:
                    block = f.read(min(remaining, 1 << 20))
                    if not block:  # the file shrank: the client sees a short body
                        self.close_connection = True
                        break
                    self.wfile.write(block)
                    remaining -= len(block)

    def _authorized_path(self) -> str | None:
        """The request's path once its Host names this server; None: refused (answered)."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1 or (not hosts and self.request_version == "HTTP/1.1"):
            self._refuse(HTTPStatus.BAD_REQUEST, "an HTTP/1.1 request needs one Host header")
            return None
        path = self.path
        if not path.startswith("/"):  # absolute form: its authority replaces Host
            url = urllib.parse.urlsplit(path)
            if url.scheme.lower() != "http" or not url.netloc:
                self._refuse(HTTPStatus.BAD_REQUEST, f"cannot serve {path!r}: not an http URL")
                return None
            hosts, path = [url.netloc], url.path or "/"
        if hosts and not host_names_server(hosts[0], self.port, self.host_names):
            self._refuse(
                HTTPStatus.MISDIRECTED_REQUEST,
                f"this server answers to Host {_either(self.host_names)} (port {self.port}),"
                f" not {hosts[0]!r}; open http://127.0.0.1:{self.port}/",
            )
            return None
        return path

    def _file(self, path: str) -> Path | None:
        """The file a URL path names, resolved inside its root; None if none."""
        parts = [p for p in urllib.parse.unquote(path.partition("?")[0]).split("/") if p]
        if parts and parts[0] in self.roots and parts[0]:
            root, parts = self.roots[parts[0]], parts[1:]
            if not parts:
                return None  # the mount itself: no listings
        else:
            root, parts = self.roots[""], parts or ["index.html"]
        return resolve_inside(root, parts)

    def _refuse(self, status: HTTPStatus, reason: str, *, close: bool = True) -> None:
        """A one-line plain-text answer; the connection closed unless ``close`` is False."""
        body = f"{reason}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.verbose:
            super().log_message(format, *args)


__all__ = [
    "LOCAL_NAMES",
    "ViewerHandler",
    "byte_range",
    "host_names_server",
    "open_regular",
    "resolve_inside",
]
