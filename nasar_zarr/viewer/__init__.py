"""A static web viewer of the cube, and a loopback HTTP server for it (``nasar-zarr view``).

The page (``static/index.html``, ``viewer.js``, ``viewer.css``) reads the cube
straight from its store with zarrita.js, over plain HTTP GET and byte ranges:
no server code. ``viewer.js`` is a build artefact committed to the package
(zarrita.js and ``viewer/src/*.js`` bundled by esbuild; ``make viewer`` rebuilds
it), so nothing is fetched from the network when the page runs.

The page takes ``?store=URL`` (relative or absolute; default ``nasar.zarr``, a
sibling of the page) and ``?sample=KEY``. :func:`make_server` serves the page at
``/`` and a local cube at ``/nasar.zarr/``, with HTTP Range support (the
sharded arrays are read by range: a sample costs a handful of small requests),
to this machine only: what it checks is in ``handler.py`` (which file, which
Host, which range) and ``server.py`` (threads, connections, idle time);
docs/VIEWER.md says what it exposes and to whom.
"""

from __future__ import annotations

import os
import shutil
import socketserver
import threading
import urllib.parse
import webbrowser
from pathlib import Path
from typing import Any

from ..errors import NasarZarrError, StoreError
from .handler import LOCAL_NAMES, ViewerHandler
from .server import PooledHTTPServer

STATIC_DIR = Path(__file__).parent / "static"
STORE_MOUNT = "nasar.zarr"  # the page's default ?store, relative to the page


class ViewerError(NasarZarrError, OSError):
    """The viewer's server cannot start (e.g. the port is taken)."""


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
    workers: int = 16,
    idle_timeout: float = 20.0,
    max_connections: int = 512,
) -> PooledHTTPServer:
    """An HTTP server for the viewer page and a local cube, not yet serving.

    The page is at ``/``, the cube at ``/nasar.zarr/`` (the page's default
    ``?store``); a file is served only if its resolved path (symlinks followed)
    lies inside the page's folder or the cube's, and only to requests whose
    ``Host`` names this server (421 otherwise). ``Range: bytes=a-b`` gets
    ``206 Partial Content``; several ranges or another unit get the whole file.

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
    workers
        Threads answering requests, at most; further requests wait their turn.
    idle_timeout
        Seconds a keep-alive connection may stay idle before it is closed.
    max_connections
        Open connections, at most (the longest-idle one is closed to make room).

    Returns
    -------
    PooledHTTPServer
        Call ``serve_forever()`` (e.g. in a thread), then ``shutdown()`` and
        ``server_close()``.

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
    roots = {"": STATIC_DIR.resolve()}  # resolved once: what every request is held to
    if dest is not None:
        roots[STORE_MOUNT] = _local_store(dest)
    handler: type[ViewerHandler] = type(
        "NasarViewerHandler",
        (ViewerHandler,),
        {"roots": roots, "verbose": verbose, "host_names": _host_names(host)},
    )
    try:
        server = PooledHTTPServer(
            (host, port),
            handler,
            workers=workers,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        )
    except OSError as exc:
        raise ViewerError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port"
            " (0: any free port)"
        ) from None
    handler.port = server.server_address[1]
    return server


def _host_names(host: str) -> tuple[str, ...]:
    """The Host names the server answers to: loopback's, and a specific bound address."""
    name = f"[{host}]" if ":" in host else host
    if name in LOCAL_NAMES or name in ("0.0.0.0", "[::]", ""):
        return LOCAL_NAMES
    return (*LOCAL_NAMES, name.lower())


def viewer_url(
    server: socketserver.TCPServer, *, sample: str | None = None, store: str | None = None
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
