"""The one seam for bytes of stored objects: "these ranges of this object", local or remote.

Every reader of the cube's shards asks this module for byte ranges, as
zarr-python's ``Store.get(key, byte_range=...)`` does: the shard index is a
suffix range of its object, the inner chunks are ranges inside it. Decoding
(:mod:`nasar_zarr.sharding`, :mod:`nasar_zarr.backend`) never knows where the
bytes came from.

- **Local** paths: ``os.pread`` on a descriptor opened for the call (the
  backend's whole-shard scans memory-map instead; same seam, same decoding).
- **s3://** (s3fs), **http(s)://** (:mod:`nasar_zarr.httpranges`: urllib3,
  bodies received straight into their buffers) and **hf://** (translated to
  the Hub's ``resolve`` URL): ranges closer than
  :data:`COALESCE_BYTES` are merged into one request, and up to
  :data:`MAX_IN_FLIGHT` requests run concurrently (s3fs's event loop, or
  httpranges' per-process threads). The
  first read of an object (its index, a suffix range: no HEAD) records its
  ETag; every later range of it is sent with ``If-Match``, so an object
  replaced under a reader fails with :class:`ObjectChangedError`, never a mix
  of two versions.
- Other fsspec URLs (``memory://``, ``gs://`` ...): ``fs.cat_ranges``, without
  the ETag check.

Nothing here survives a call but fsspec's per-process filesystem instances and
httpranges' per-process pool, both rebuilt after ``fork``; a :class:`Location`
is a frozen, picklable description (URL + options), so readers pickle to dask
workers and into forked DataLoader workers. Why not obstore: its Rust runtime
hangs in a child forked after the parent used it (obstore 0.12.1; PyTorch's
default DataLoader forks); docs/REMOTE.md has the comparison.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import httpranges
from .errors import CubeDamagedError, EndpointError, NasarZarrError

COALESCE_BYTES = 1 << 16  # ranges closer than this are fetched as one (64 KiB)
MAX_REQUEST_BYTES = 32 << 20  # ...up to this many bytes per request
MAX_IN_FLIGHT = 32  # concurrent requests per call


class ObjectChangedError(NasarZarrError, RuntimeError):
    """A stored object was replaced while a reader held what it read of it before."""


@dataclass(frozen=True)
class Tail:
    """The last bytes of an object, its total size and its version (ETag, or None)."""

    data: bytes
    size: int
    version: str | None


@dataclass(frozen=True)
class Location:
    """Where a cube's objects live: a local directory or an fsspec URL, with its options.

    Frozen and picklable; the clients it uses are made in each process that reads.
    """

    url: str
    storage_options: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def of(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> Location:
        return cls(url.rstrip("/"), tuple(sorted(dict(storage_options or {}).items())))

    @property
    def remote(self) -> bool:
        return "://" in self.url and not self.url.startswith("file://")

    def path(self, key: str) -> str:
        """The object ``key`` (relative to the cube's root) as a path or URL."""
        base = self.url.split("://", 1)[1] if self.url.startswith("file://") else self.url
        return f"{base}/{key}"

    def _fs(self) -> Any:
        import fsspec

        from .options import storage_options  # the defaults every client of ours gets

        url = _http_url(self.url)
        protocol = url.split("://", 1)[0]
        return fsspec.filesystem(protocol, **storage_options(url, dict(self.storage_options)))

    # -- the seam ---------------------------------------------------------------------
    def tails(self, keys: Sequence[str], nbytes: int) -> list[Tail | None]:
        """The last ``nbytes`` of each object (fewer if it is shorter); None if absent."""
        if not self.remote:
            return [_local_tail(self.path(k), nbytes) for k in keys]
        if not keys:
            return []
        return self._run(self._tails, list(keys), nbytes)

    def ranges(
        self, requests: Sequence[tuple[str, int, int, str | None]]
    ) -> list[bytes | memoryview]:
        """``[start, end)`` of each ``(key, start, end, version)``, coalesced and concurrent.

        Raises
        ------
        ObjectChangedError
            An object's version is no longer ``version`` (remote stores with ETags).
        CubeDamagedError
            An object is shorter than a range in it.
        """
        if not requests:
            return []
        if not self.remote:
            return [_local_range(self.path(k), a, b) for k, a, b, _ in requests]
        return self._run(self._ranges, list(requests))

    def fetch(self, requests: Sequence[tuple[str, int, int, str | None]]) -> list[Tail]:
        """Each ``[start, end)`` of ``(key, start, end, version)`` as asked, with its object's
        size and version: for readers that find an object's end by reading (the converter's
        tar reads).

        Unlike :meth:`ranges`, nothing is coalesced (the caller's ranges are the
        requests, up to :data:`MAX_IN_FLIGHT` at once) and a range that runs past
        the end of its object is short (empty past the end), not an error. A
        ``Tail.size`` of -1 means the store did not say (filesystems without
        ``Content-Range``); ``Tail.version`` is the ETag (locally size and mtime).

        Raises
        ------
        ObjectChangedError
            An object's version is no longer ``version`` (If-Match remotely).
        FileNotFoundError
            An object does not exist.
        """
        if not requests:
            return []
        if not self.remote:
            return _local_fetch(self, list(requests))
        return self._run(self._fetch, list(requests))

    def round(
        self,
        tail_keys: Sequence[str],
        nbytes: int,
        whole_keys: Sequence[str],
        requests: Sequence[tuple[str, int, int, str | None]],
    ) -> tuple[list[Tail | None], list[Tail | None], list[bytes | memoryview]]:
        """:meth:`tails`, :meth:`whole` and :meth:`ranges` at once: one round trip."""
        if not self.remote:
            return self.tails(tail_keys, nbytes), self.whole(whole_keys), self.ranges(requests)
        return self._run(self._round, list(tail_keys), nbytes, list(whole_keys), list(requests))

    async def _round(
        self,
        fs: Any,
        tail_keys: list[str],
        nbytes: int,
        whole_keys: list[str],
        requests: list[tuple[str, int, int, str | None]],
    ) -> tuple[list[Tail | None], list[Tail | None], list[bytes | memoryview]]:
        limit = asyncio.Semaphore(MAX_IN_FLIGHT)  # one bound for the whole round
        tails, wholes, data = await asyncio.gather(
            self._tails(fs, tail_keys, nbytes, limit),
            self._wholes(fs, whole_keys, limit),
            self._ranges(fs, requests, limit),
        )
        return tails, wholes, data

    def whole(self, keys: Sequence[str]) -> list[Tail | None]:
        """Each object whole (one GET each) with its size and version; None if absent."""
        if not self.remote:
            return [_local_tail(self.path(k), -1) for k in keys]
        if not keys:
            return []
        return self._run(self._wholes, list(keys))

    # -- remote -----------------------------------------------------------------------
    def _run(self, method: Any, *args: Any) -> Any:
        from fsspec.asyn import sync

        if _http_url(self.url).split("://", 1)[0] in ("http", "https"):
            return _web(method.__name__, self, *args)
        fs = self._fs()
        if not getattr(fs, "async_impl", False):
            return _blocking(method.__name__, fs, self, *args)
        return sync(fs.loop, method, fs, *args)

    async def _tails(
        self, fs: Any, keys: list[str], nbytes: int, limit: asyncio.Semaphore | None = None
    ) -> list[Tail | None]:
        limit = limit or asyncio.Semaphore(MAX_IN_FLIGHT)

        async def one(key: str) -> Tail | None:
            async with limit:
                return await _get(fs, self, key, f"bytes=-{nbytes}", None, missing_ok=True)

        return list(await asyncio.gather(*(one(k) for k in keys)))

    async def _wholes(
        self, fs: Any, keys: list[str], limit: asyncio.Semaphore | None = None
    ) -> list[Tail | None]:
        limit = limit or asyncio.Semaphore(MAX_IN_FLIGHT)

        async def one(key: str) -> Tail | None:
            async with limit:
                return await _get(fs, self, key, None, None, missing_ok=True)

        return list(await asyncio.gather(*(one(k) for k in keys)))

    async def _fetch(self, fs: Any, requests: list[tuple[str, int, int, str | None]]) -> list[Tail]:
        limit = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def one(key: str, start: int, end: int, version: str | None) -> Tail:
            if end <= start:
                return Tail(b"", -1, version)
            async with limit:
                got = await _get(fs, self, key, f"bytes={start}-{end - 1}", version)
            assert got is not None
            return got

        return list(await asyncio.gather(*(one(*r) for r in requests)))

    async def _ranges(
        self,
        fs: Any,
        requests: list[tuple[str, int, int, str | None]],
        limit: asyncio.Semaphore | None = None,
    ) -> list[bytes | memoryview]:
        merged = coalesce(requests)
        limit = limit or asyncio.Semaphore(MAX_IN_FLIGHT)

        async def one(key: str, start: int, end: int, version: str | None) -> bytes:
            async with limit:
                got = await _get(fs, self, key, f"bytes={start}-{end - 1}", version)
            assert got is not None
            if len(got.data) != end - start:
                raise CubeDamagedError(
                    f"{self.path(key)}: ends before byte {end} (got {len(got.data)} bytes"
                    f" from {start}); the object is truncated"
                )
            return got.data

        fetched = await asyncio.gather(*(one(*m.request) for m in merged))
        out: list[bytes | memoryview] = [b""] * len(requests)
        for m, data in zip(merged, fetched, strict=True):
            view = memoryview(data)
            for i in m.members:
                _, a, b, _ = requests[i]
                start = m.request[1]
                out[i] = view[a - start : b - start] if len(m.members) > 1 else data
        return out


@dataclass(frozen=True)
class Merged:
    request: tuple[str, int, int, str | None]
    members: tuple[int, ...]


def coalesce(requests: Sequence[tuple[str, int, int, str | None]]) -> list[Merged]:
    """Requests of one object closer than :data:`COALESCE_BYTES` merged (up to
    :data:`MAX_REQUEST_BYTES` each); pure."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i][0], requests[i][1]))
    merged: list[Merged] = []
    for i in order:
        key, a, b, version = requests[i]
        if merged:
            last = merged[-1]
            k, start, end, v = last.request
            if k == key and a - end <= COALESCE_BYTES and max(b, end) - start <= MAX_REQUEST_BYTES:
                merged[-1] = Merged((k, start, max(end, b), v), (*last.members, i))
                continue
        merged.append(Merged((key, a, b, version), (i,)))
    return merged


async def _get(
    fs: Any,
    where: Location,
    key: str,
    byte_range: str | None,
    version: str | None,
    *,
    missing_ok: bool = False,
) -> Tail | None:
    """One GET of ``key`` (a Range header when ``byte_range``; If-Match when ``version``)."""
    path = where.path(key)
    protocol = type(fs).protocol
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    if protocol in ("s3", "s3a"):
        return await _get_s3(fs, path, byte_range, version, missing_ok=missing_ok)
    if protocol in ("http", "https"):
        return await _get_http(fs, _http_url(path), byte_range, version, missing_ok=missing_ok)
    return await _get_generic(fs, path, byte_range, missing_ok=missing_ok)


async def _get_s3(
    fs: Any, path: str, byte_range: str | None, version: str | None, *, missing_ok: bool
) -> Tail | None:
    bucket, key, _ = fs.split_path(path)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if byte_range:
        kwargs["Range"] = byte_range
    if version:
        kwargs["IfMatch"] = version
    try:
        response = await fs._call_s3("get_object", **kwargs)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    except OSError as exc:
        text = str(exc)
        if "PreconditionFailed" in text or "412" in text or _code(exc) == "PreconditionFailed":
            raise _changed(f"s3://{bucket}/{key}") from None
        if "InvalidRange" in text or "416" in text:
            return Tail(b"", 0, None)
        raise
    body = response["Body"]
    try:
        data = await body.read()
    finally:
        body.close()
    return Tail(data, _total_size(response.get("ContentRange"), len(data)), response.get("ETag"))


async def _get_http(
    fs: Any, url: str, byte_range: str | None, version: str | None, *, missing_ok: bool
) -> Tail | None:
    session = await fs.set_session()
    headers = dict(fs.kwargs.get("headers") or {})
    if byte_range:
        headers["Range"] = byte_range
    if version:
        headers["If-Match"] = version
    kwargs = {k: v for k, v in fs.kwargs.items() if k != "headers"}
    async with session.get(url, headers=headers, **kwargs) as response:
        if response.status == 404 and missing_ok:
            return None
        if response.status == 412:
            raise _changed(url)
        if response.status == 416:
            return Tail(b"", 0, response.headers.get("ETag"))
        if response.status >= 400:
            raise FileNotFoundError(f"{url}: HTTP {response.status} {response.reason}")
        data = await response.read()
        etag = response.headers.get("ETag")
        if version and etag and etag != version:  # a server that ignores If-Match
            raise _changed(url)
        if byte_range and response.status == 200 and not byte_range.startswith("bytes=-"):
            start, _, last = byte_range[len("bytes=") :].partition("-")
            data = data[int(start) : int(last) + 1]  # a server that ignores Range
        size = _total_size(response.headers.get("Content-Range"), len(data))
        if byte_range and byte_range.startswith("bytes=-") and response.status == 200:
            size = len(data)
            data = data[-int(byte_range[len("bytes=-") :]) :]
        return Tail(data, size, etag)


async def _get_generic(
    fs: Any, path: str, byte_range: str | None, *, missing_ok: bool
) -> Tail | None:
    try:
        if byte_range is None:
            data = await fs._cat_file(path)
            return Tail(data, len(data), None)
        first, _, last = byte_range[len("bytes=") :].partition("-")
        if not first:
            size = await fs._size(path)
            start = max(0, size - int(last))
            return Tail(await fs._cat_file(path, start=start, end=size), size, None)
        data = await fs._cat_file(path, start=int(first), end=int(last) + 1)
        return Tail(data, -1, None)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise


def _web(method: str, where: Location, *args: Any) -> Any:
    """The seam over HTTP(S): :mod:`nasar_zarr.httpranges` (blocking ``readinto`` on a
    per-process pool) with the same semantics as the fsspec path: Range, If-Match,
    suffix ranges for tails, 404 as absent, 412 as a changed object."""
    headers = httpranges.request_headers(dict(where.storage_options))
    if method == "_round":
        tail_keys, nbytes, whole_keys, requests = args
        jobs: list[tuple[Any, ...]] = [
            *((where, k, f"bytes=-{nbytes}", None, headers) for k in tail_keys),
            *((where, k, None, None, headers) for k in whole_keys),
        ]
        merged = coalesce(requests)
        jobs += [
            (where, k, f"bytes={a}-{b - 1}", v, headers)
            for k, a, b, v in (m.request for m in merged)
        ]
        got = httpranges.map_requests(_web_get, jobs)
        tails = got[: len(tail_keys)]
        wholes = got[len(tail_keys) : len(tail_keys) + len(whole_keys)]
        bodies = got[len(tail_keys) + len(whole_keys) :]
        return tails, wholes, _split(where, requests, merged, bodies)
    if method == "_fetch":  # each range as asked, short past the end
        asked = args[0]
        got = httpranges.map_requests(
            _web_get,
            [(where, k, f"bytes={a}-{b - 1}", v, headers) for k, a, b, v in asked if b > a],
        )
        out: list[Tail] = []
        fetched = iter(got)
        for key, a, b, version in asked:
            if b <= a:
                out.append(Tail(b"", -1, version))
                continue
            tail = next(fetched)
            if tail is None:
                raise FileNotFoundError(f"{_http_url(where.path(key))}: HTTP 404")
            out.append(tail)
        return out
    if method == "_tails":
        keys, nbytes = args
        return _web("_round", where, keys, nbytes, [], [])[0]
    if method == "_wholes":
        return _web("_round", where, [], 0, args[0], [])[1]
    return _web("_round", where, [], 0, [], args[0])[2]


def _web_get(
    where: Location, key: str, byte_range: str | None, version: str | None, headers: Any
) -> Tail | None:
    url = _http_url(where.path(key))
    try:
        response = httpranges.get(url, byte_range, version, headers)
    except httpranges.HTTPError as exc:  # connection refused, reset, timed out (after retries)
        raise EndpointError(f"{url}: {httpranges.reason(exc)}") from None
    if response.status == 404:
        return None
    if response.status == 412:
        raise _changed(url)
    if response.status == 416:
        return Tail(b"", 0, response.etag)
    if response.status in (401, 403):
        raise PermissionError(
            f"{url}: HTTP {response.status}, not allowed (credentials: the headers or, for"
            " the Hub, the token storage option)"
        )
    if response.status >= 500:
        raise EndpointError(f"{url}: HTTP {response.status} from the server, after retries")
    if response.status >= 400:
        raise FileNotFoundError(f"{url}: HTTP {response.status}")
    data: bytes | memoryview = response.body
    if version and response.etag and response.etag != version:  # a server ignoring If-Match
        raise _changed(url)
    size = response.total if response.total is not None else len(data)
    if byte_range and response.status == 200:  # a server that ignores Range
        first, _, last = byte_range[len("bytes=") :].partition("-")
        size = len(data)
        data = data[-int(last) :] if not first else memoryview(data)[int(first) : int(last) + 1]
    return Tail(data, size, response.etag)  # type: ignore[arg-type]


def _split(
    where: Location,
    requests: Sequence[tuple[str, int, int, str | None]],
    merged: Sequence[Merged],
    fetched: Sequence[Tail | None],
) -> list[bytes | memoryview]:
    """Each request's bytes out of the merged responses (views, no copies)."""
    out: list[bytes | memoryview] = [b""] * len(requests)
    for m, got in zip(merged, fetched, strict=True):
        key, start, end, _ = m.request
        if got is None:
            raise FileNotFoundError(f"{_http_url(where.path(key))}: HTTP 404")
        if len(got.data) != end - start:
            raise CubeDamagedError(
                f"{where.path(key)}: ends before byte {end} (got {len(got.data)} bytes"
                f" from {start}); the object is truncated"
            )
        view = memoryview(got.data)
        for i in m.members:
            _, a, b, _ = requests[i]
            out[i] = view[a - start : b - start]
    return out


def _blocking(method: str, fs: Any, where: Location, *args: Any) -> Any:
    """The seam over a synchronous fsspec filesystem (no concurrency, no ETag check)."""
    if method == "_round":
        tail_keys, nbytes, whole_keys, requests = args
        return (
            _blocking("_tails", fs, where, tail_keys, nbytes),
            _blocking("_wholes", fs, where, whole_keys),
            _blocking("_ranges", fs, where, requests),
        )
    if method == "_tails":
        keys, nbytes = args
        out: list[Tail | None] = []
        for key in keys:
            path = where.path(key)
            try:
                size = fs.size(path)
            except FileNotFoundError:
                out.append(None)
                continue
            start = max(0, size - nbytes)
            out.append(Tail(fs.cat_file(path, start=start, end=size), size, None))
        return out
    if method == "_wholes":
        result: list[Tail | None] = []
        for key in args[0]:
            try:
                data = fs.cat_file(where.path(key))
            except FileNotFoundError:
                result.append(None)
                continue
            result.append(Tail(data, len(data), None))
        return result
    if method == "_fetch":
        return [
            Tail(fs.cat_file(where.path(k), start=a, end=b) if b > a else b"", -1, None)
            for k, a, b, _ in args[0]
        ]
    return [fs.cat_file(where.path(k), start=a, end=b) for k, a, b, _ in args[0]]


def _code(exc: BaseException) -> str | None:
    """The S3 error code behind an s3fs error (s3fs words some without it: 412 is
    "[Errno 22] At least one of the pre-conditions you specified did not hold")."""
    response = getattr(exc.__cause__, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _changed(url: str) -> ObjectChangedError:
    return ObjectChangedError(
        f"{url}: the object changed while it was being read (its ETag no longer matches"
        " the version whose index was read); reopen the cube to read the new version"
    )


def _total_size(content_range: str | None, fallback: int) -> int:
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return fallback


def _http_url(url: str) -> str:
    """``hf://datasets/org/name@rev/path`` as the Hub's ``resolve`` URL; others unchanged."""
    if not url.startswith("hf://"):
        return url
    rest = url[len("hf://") :]
    kind, _, rest = rest.partition("/")
    if kind not in ("datasets", "spaces", "models"):
        kind, rest = "models", f"{kind}/{rest}"
    org, name, *path = rest.split("/")
    name, _, revision = name.partition("@")
    prefix = "" if kind == "models" else f"{kind}/"
    return f"https://huggingface.co/{prefix}{org}/{name}/resolve/{revision or 'main'}/" + "/".join(
        path
    )


# -- local ------------------------------------------------------------------------------
def _local_tail(path: str, nbytes: int) -> Tail | None:
    """The last ``nbytes`` of a local file (all of it for -1), its size and identity."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        stat = os.fstat(fd)
        start = 0 if nbytes < 0 else max(0, stat.st_size - nbytes)
        data = os.pread(fd, stat.st_size - start, start)
        return Tail(data, stat.st_size, f"{stat.st_size:x}-{stat.st_mtime_ns:x}")
    finally:
        os.close(fd)


def _local_range(path: str, start: int, end: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, end - start, start)
        while len(data) < end - start:
            more = os.pread(fd, end - start - len(data), start + len(data))
            if not more:
                raise CubeDamagedError(
                    f"{path}: ends at byte {start + len(data)}, before {end}; truncated"
                )
            data += more
        return data
    finally:
        os.close(fd)


def _local_fetch(where: Location, requests: list[tuple[str, int, int, str | None]]) -> list[Tail]:
    """:meth:`Location.fetch` of local files: each file opened once per call."""
    out: list[Tail] = []
    fds: dict[str, tuple[int, int, str]] = {}  # key -> (descriptor, size, version)
    try:
        for key, start, end, version in requests:
            if key not in fds:
                fd = os.open(where.path(key), os.O_RDONLY)
                stat = os.fstat(fd)
                fds[key] = fd, stat.st_size, f"{stat.st_size:x}-{stat.st_mtime_ns:x}"
            fd, size, now = fds[key]
            if version is not None and version != now:
                raise _changed(where.path(key))
            n = max(0, min(end, size) - start)
            out.append(Tail(os.pread(fd, n, start) if n else b"", size, now))
        return out
    finally:
        for fd, _, _ in fds.values():
            os.close(fd)
