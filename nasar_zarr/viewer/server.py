"""An HTTP server whose threads serve requests, not connections.

socketserver's ``ThreadingMixIn`` gives each connection a thread that blocks
until the client sends its next request or hangs up: 200 idle keep-alive
sockets are 200 threads, and a bounded pool of such threads is used up by
idle clients. Here one loop thread owns the listening socket and every
connection that is between requests ("parked", in a selector). A connection
with bytes to read goes to a bounded :class:`~concurrent.futures.ThreadPoolExecutor`,
which answers the requests it finds and hands the connection back to be
parked. The executor's queue is unbounded: requests past the bound wait, none
is dropped.

Parked connections idle longer than ``idle_timeout`` are closed. Past
``max_connections`` open connections, the longest-idle parked one is closed to
make room; when none is parked, accepting pauses and new connections wait in
the kernel's listen backlog.
"""

from __future__ import annotations

import selectors
import socket
import socketserver
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

_LISTEN = object()  # selector keys' data: the listening socket,
_WAKE = object()  # the loop's wake-up socket; a parked connection's data is the connection


class ConnectionHandler(Protocol):
    """What :class:`PooledHTTPServer` asks of its handler class, one per connection."""

    def __init__(self, request: socket.socket, client_address: Any, server: Any) -> None: ...

    def serve_ready(self) -> bool:
        """Answer the requests at hand; True to keep the connection for the next."""
        ...

    def finish(self) -> None:
        """Flush and release the connection's files (not the socket)."""
        ...


class _Connection:
    __slots__ = ("address", "handler", "idle_since", "sock")

    def __init__(self, sock: socket.socket, address: Any, handler: ConnectionHandler) -> None:
        self.sock = sock
        self.address = address
        self.handler = handler
        self.idle_since = 0.0


class PooledHTTPServer(socketserver.TCPServer):
    """A TCP server answering on a bounded pool of threads, with idle keep-alive
    connections parked in a selector (see the module's docstring).

    Parameters
    ----------
    server_address
        ``(host, port)`` to bind; port 0 picks a free one.
    handler_class
        Built once per connection (``handler_class(sock, address, server)``);
        its ``serve_ready()`` answers what the client sent, and returns True
        to keep the connection open for its next request.
    workers
        Threads answering requests, at most.
    idle_timeout
        Seconds a connection may wait between requests before it is closed.
    max_connections
        Open connections, at most (parked and in service).
    """

    allow_reuse_address = True
    # The listen backlog: a browser opens several connections at once, and a page's
    # burst of fetches must not meet SYN retransmits (the kernel caps it at somaxconn).
    request_queue_size = 1024

    def __init__(
        self,
        server_address: tuple[str, int],
        handler_class: type[ConnectionHandler],
        *,
        workers: int = 16,
        idle_timeout: float = 20.0,
        max_connections: int = 512,
    ) -> None:
        if ":" in server_address[0]:
            self.address_family = socket.AF_INET6
        self._handler_class = handler_class
        self.workers = workers
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        # Set before binding: TCPServer.__init__ calls server_close() when bind fails.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nasar-viewer")
        self._lock = threading.Lock()
        self._open: set[_Connection] = set()  # every open connection; under _lock
        self._returned: deque[_Connection] = deque()  # workers -> loop, to park again
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()
        # The loop thread's own state (no lock): the selector and the parked
        # connections, oldest first (all share one idle timeout).
        self._selector: selectors.BaseSelector | None = None
        self._parked: OrderedDict[_Connection, None] = OrderedDict()
        self._accepting = True
        super().__init__(server_address, handler_class)  # type: ignore[arg-type]
        self.socket.setblocking(False)

    # ------------------------------------------------------------ the loop

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept, park and dispatch connections until :meth:`shutdown`.

        Parameters
        ----------
        poll_interval
            Longest wait in one ``select`` while accepting is paused.
        """
        self._done.clear()
        selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ, _LISTEN)
        selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._selector, self._accepting = selector, True
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(self._select_timeout(poll_interval)):
                    if key.data is _LISTEN:
                        self._accept()
                    elif key.data is _WAKE:
                        self._take_returned()
                    else:
                        self._dispatch(key.data)
                self._take_returned()
                self._close_idle()
                if not self._accepting and self._count() < self.max_connections:
                    selector.register(self.socket, selectors.EVENT_READ, _LISTEN)
                    self._accepting = True
        finally:
            selector.close()
            self._selector = None
            self._stop.clear()
            self._done.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` (from another thread) and wait for it."""
        self._stop.set()
        self._wake()
        self._done.wait()

    def server_close(self) -> None:
        """Close the listening socket and every connection; wait for the workers."""
        super().server_close()
        for conn in list(self._parked):
            self._close(conn)
        self._parked.clear()
        with self._lock:
            busy = list(self._open)
        for conn in busy:  # unblocks a worker waiting on its client; the worker closes it
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)
        for conn in busy:
            self._close(conn)
        self._wake_r.close()
        self._wake_w.close()

    def _select_timeout(self, poll_interval: float) -> float | None:
        timeout = None if self._accepting else poll_interval
        if self._parked:
            oldest = next(iter(self._parked))
            due = max(oldest.idle_since + self.idle_timeout - time.monotonic(), 0.0)
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def _accept(self) -> None:
        for _ in range(64):  # a burst, then serve the parked ones too
            full = self._count() >= self.max_connections
            if full and not self._parked:  # all in service: the rest wait in the backlog
                self._pause_accepting()
                return
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: retry after poll_interval
                self._pause_accepting()
                return
            if full:  # a new client waits: the longest-idle one makes room
                self._close_oldest_parked()
            try:
                handler = self._handler_class(sock, address, self)
            except OSError:
                sock.close()
                continue
            conn = _Connection(sock, address, handler)
            with self._lock:
                self._open.add(conn)
            self._park(conn)

    def _pause_accepting(self) -> None:
        if self._accepting and self._selector is not None:
            self._selector.unregister(self.socket)
            self._accepting = False

    def _park(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._parked[conn] = None
        assert self._selector is not None
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _unpark(self, conn: _Connection) -> None:
        del self._parked[conn]
        assert self._selector is not None
        self._selector.unregister(conn.sock)

    def _dispatch(self, conn: _Connection) -> None:
        self._unpark(conn)
        self._pool.submit(self._work, conn)

    def _take_returned(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._returned:
            conn = self._returned.popleft()
            if self._stop.is_set():
                self._close(conn)
            else:
                self._park(conn)

    def _close_idle(self) -> None:
        now = time.monotonic()
        while self._parked:
            oldest = next(iter(self._parked))
            if oldest.idle_since + self.idle_timeout > now:
                return
            self._unpark(oldest)
            self._close(oldest)

    def _close_oldest_parked(self) -> bool:
        if not self._parked:
            return False
        oldest = next(iter(self._parked))
        self._unpark(oldest)
        self._close(oldest)
        return True

    # ------------------------------------------------------------ workers

    def _work(self, conn: _Connection) -> None:
        keep = False
        try:
            keep = conn.handler.serve_ready()
        except OSError:  # the client went away, or server_close shut the socket
            pass
        except Exception:
            self.handle_error(conn.sock, conn.address)
        if keep and not self._stop.is_set():
            self._returned.append(conn)
            self._wake()
        else:
            self._close(conn)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (the loop will drain it) or closed
            pass

    def _count(self) -> int:
        with self._lock:
            return len(self._open)

    def _close(self, conn: _Connection) -> None:
        with self._lock:
            if conn not in self._open:
                return
            self._open.discard(conn)
        try:
            conn.handler.finish()
        except OSError:
            pass
        self.shutdown_request(conn.sock)


__all__ = ["ConnectionHandler", "PooledHTTPServer"]
