"""A static web viewer of the cube, and a loopback HTTP server for it (``nasar-zarr view``).

The page (``static/index.html``, ``viewer.js``, ``viewer.css``) reads the cube
straight from its store with zarrita.js, over plain HTTP GET and byte ranges:
no server code. ``viewer.js`` is a build artefact committed to the package
(zarrita.js and ``viewer/src/*.js`` bundled by esbuild; ``make viewer`` rebuilds
it), so nothing is fetched from the network when the page runs.

The page takes ``?store=URL`` (relative or absolute; default ``nasar.zarr``, a
sibling of the page) and ``?sample=KEY``. :func:`make_server` serves the page at
``/`` and a local cube at ``/nasar.zarr/``, with HTTP Range support (the
sharded arrays are read by range: a sample costs a handful of small requests).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import threading
import urllib.parse
import webbrowser
from pathlib import Path
from typing import Any

from ..errors import NasarZarrError, StoreError

STATIC_DIR = Path(__file__).parent / "static"
STORE_MOUNT = "nasar.zarr"  # the page's default ?store, relative to the page


class ViewerError(NasarZarrError, OSError):
    """The viewer's server cannot start (e.g. the port is taken)."""


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_TYPES = {
    ".json": "application/json",
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from two roots, with single byte ranges (RFC 9110 ``bytes=a-b``,
    ``a-``, ``-n``), no directory listings, nothing outside the roots."""

    static_dir: Path = STATIC_DIR
    store_dir: Path | None = None
    verbose = False

    def translate_path(self, path: str) -> str:
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
            return ""
        if parts[:1] == [STORE_MOUNT]:
            if self.store_dir is None:
                return ""
            base, parts = self.store_dir, parts[1:]
        else:
            base = self.static_dir
            parts = parts or ["index.html"]
        return str(base.joinpath(*parts))

    def send_head(self) -> Any:
        path = self.translate_path(self.path)
        if not path or not os.path.isfile(path):
            self.send_error(404, "not found")
            return None
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
        except OSError:
            self.send_error(404, "not found")
            return None
        size = os.fstat(f.fileno()).st_size
        ctype = _TYPES.get(Path(path).suffix, "application/octet-stream")
        header = self.headers.get("Range")
        start, end = 0, size - 1
        status = 200
        if header:
            match = _RANGE.match(header.strip())
            if match is None or match.groups() == ("", ""):
                f.close()
                self.send_error(416, "only single byte ranges are supported")
                return None
            first, last = match.groups()
            if first == "":  # suffix: the last n bytes
                start, end = max(size - int(last), 0), size - 1
            else:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            if start >= size or start > end:
                f.close()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", "no-cache")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        f.seek(start)
        self._remaining = end - start + 1
        return f

    def copyfile(self, source: Any, outputfile: Any) -> None:
        remaining = self._remaining
        while remaining > 0:
            block = source.read(min(remaining, 1 << 20))
            if not block:
                break
            outputfile.write(block)
            remaining -= len(block)

    def log_message(self, format: str, *args: Any) -> None:
        if self.verbose:
            super().log_message(format, *args)


def _local_store(dest: str | os.PathLike[str]) -> Path:
    text = str(dest)
    if "://" in text and not text.startswith("file://"):
        raise StoreError(
            f"view serves a local cube, got {text!r}; for a store on HTTP(S) or S3, open the"
            " page with ?store=URL (see the README, 'The viewer')"
        )
    path = Path(text.removeprefix("file://")).expanduser().resolve()
    if not (path / "zarr.json").is_file():
        raise StoreError(
            f"{text} is not a Zarr store (no zarr.json there); convert a corpus first:"
            f" nasar-zarr convert SRC {text}"
        )
    return path


def make_server(
    dest: str | os.PathLike[str] | None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    verbose: bool = False,
) -> http.server.ThreadingHTTPServer:
    """An HTTP server for the viewer page and a local cube, not yet serving.

    The page is at ``/``, the cube at ``/nasar.zarr/`` (the page's default
    ``?store``). Requests with a ``Range`` header get ``206 Partial Content``.

    Parameters
    ----------
    dest
        Local path of the cube (or ``file://`` URL); None serves only the page
        (open it with ``?store=URL``).
    host
        Interface to bind; loopback by default.
    port
        TCP port; 0 picks a free one (see ``server.server_address``).
    verbose
        Log every request to stderr.

    Returns
    -------
    http.server.ThreadingHTTPServer
        Call ``serve_forever()`` (e.g. in a thread) and ``shutdown()``.

    Raises
    ------
    StoreError
        ``dest`` is a remote URL or holds no Zarr store.
    ViewerError
        The address cannot be bound (port taken, bad host).

    Examples
    --------
    >>> server = make_server("demo-output/nasar.zarr")  # doctest: +SKIP
    >>> threading.Thread(target=server.serve_forever, daemon=True).start()  # doctest: +SKIP
    >>> viewer_url(server)  # doctest: +SKIP
    'http://127.0.0.1:40123/'
    """
    store_dir = None if dest is None else _local_store(dest)
    handler = type("NasarViewerHandler", (_Handler,), {"store_dir": store_dir, "verbose": verbose})
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise ViewerError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port"
            " (0: any free port)"
        ) from None
    server.daemon_threads = True
    return server


def viewer_url(
    server: http.server.HTTPServer, *, sample: str | None = None, store: str | None = None
) -> str:
    """The page's URL on a running :func:`make_server`.

    Parameters
    ----------
    server
        From :func:`make_server`.
    sample
        A sample key to open (``?sample=KEY``).
    store
        Another store URL (``?store=URL``); default: the served cube.

    Returns
    -------
    str
        ``http://HOST:PORT/`` plus the query.

    Examples
    --------
    >>> viewer_url(server, sample="nasar-000000_00003")  # doctest: +SKIP
    'http://127.0.0.1:40123/?sample=nasar-000000_00003'
    """
    address: tuple[Any, ...] = tuple(server.server_address)
    host, port = address[0], address[1]
    if isinstance(host, bytes):
        host = host.decode()
    query = {k: v for k, v in {"store": store, "sample": sample}.items() if v is not None}
    suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"http://{host}:{port}/{suffix}"


def serve(
    dest: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    open_browser: bool = True,
    sample: str | None = None,
    verbose: bool = False,
) -> None:
    """Serve the viewer over a local cube until interrupted (``nasar-zarr view``).

    Parameters
    ----------
    dest
        Local path of the cube.
    host, port
        Where to listen (loopback, 8765 by default; 0 picks a free port).
    open_browser
        Open the page in the default web browser.
    sample
        A sample key to open first.
    verbose
        Log every request.

    Returns
    -------
    None
        Runs until interrupted (Ctrl-C, SIGINT).

    Examples
    --------
    >>> serve("demo-output/nasar.zarr", open_browser=False)  # doctest: +SKIP
    nasar-zarr viewer of demo-output/nasar.zarr at http://127.0.0.1:8765/ (Ctrl-C stops it)
    """
    server = make_server(dest, host=host, port=port, verbose=verbose)
    url = viewer_url(server, sample=sample)
    print(f"nasar-zarr viewer of {dest} at {url} (Ctrl-C stops it)", flush=True)
    if open_browser:
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("nasar-zarr viewer stopped", flush=True)
    finally:
        server.server_close()


def export_static(out: str | os.PathLike[str]) -> list[Path]:
    """Copy the page's files into ``out`` (to publish them next to a cube).

    Parameters
    ----------
    out
        Folder to write ``index.html``, ``viewer.js`` and ``viewer.css`` into.

    Returns
    -------
    list of pathlib.Path
        The files written.

    Examples
    --------
    >>> export_static("site/")  # doctest: +SKIP
    [PosixPath('site/index.html'), PosixPath('site/viewer.css'), PosixPath('site/viewer.js')]
    """
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sorted(STATIC_DIR.iterdir()):
        if src.is_file():
            written.append(Path(shutil.copy2(src, target / src.name)))
    return written


__all__ = [
    "STATIC_DIR",
    "STORE_MOUNT",
    "ViewerError",
    "export_static",
    "make_server",
    "serve",
    "viewer_url",
]
