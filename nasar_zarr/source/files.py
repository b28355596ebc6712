"""Bytes of one file, local or remote: :class:`ByteSource` (an adapter over the one
byte seam, :class:`nasar_zarr.ranges.Location`), a file view of it, and path helpers."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec

from ..ranges import Location, ObjectChangedError, Tail


def join(root: str, relative: str) -> str:
    """Join a local path or fsspec URL with a relative path."""
    return root.rstrip("/") + "/" + relative.lstrip("/")


def is_remote(url: str) -> bool:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return protocol not in ("file", "local")


def if_match(etag: str | None) -> str | None:
    """An ETag as reported by a listing (quotes stripped) in the form ``If-Match`` takes,
    or None where it cannot be used (none, or a weak one, which never matches)."""
    if not etag or etag.startswith("W/"):
        return None
    return '"' + etag.strip('"') + '"'


class ByteSource:
    """Byte ranges of one file through the byte seam (:class:`~nasar_zarr.ranges.Location`):
    ``os.pread`` locally, one ranged GET per range remotely.

    Nothing is read ahead: planning reads tar headers (512 bytes each) and
    execution reads the large ranges it asks for, so the bytes transferred are
    the bytes asked for. :meth:`read_many` issues its ranges concurrently.
    Ranges past the end of the file come back short (truncated-tar detection
    relies on that). The size is not asked with a ``HEAD``: it is given, or
    it comes with the first ranged read (``Content-Range``).

    Remotely the first read records the file's ETag unless ``version`` gives
    it, and every later read asks for it (``If-Match``), so a tar replaced
    while it is read raises :class:`~nasar_zarr.ranges.ObjectChangedError`
    naming it, never a mix. Locally the descriptor opened here is read (a
    ``version`` given is its size and mtime, as :class:`Location` words it).
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        size: int | None = None,
        version: str | None = None,
    ) -> None:
        self.url = url
        self.requests = 0  # ranges read through read_many
        self._size = size
        self.version = version
        self._head: bytes | None = None  # the first block, kept when the size was asked first
        folder, _, self._key = url.rpartition("/")
        if not folder and not url.startswith("/"):
            folder = "."
        self._where = Location(folder, tuple(sorted(dict(storage_options or {}).items())))
        self.remote = self._where.remote
        self._fd: int | None = None
        if not self.remote:
            # The seam's local reads are os.pread; the descriptor is held here, as a
            # header walk makes one read per member (opening the tar for each read
            # made index_tar 1.3-1.5x slower, measured). A tar replaced by a rename
            # does not reach an open descriptor; execute checks size and mtime first.
            self._fd = os.open(self._where.path(self._key), os.O_RDONLY)
            self._size = os.fstat(self._fd).st_size
            now = self._local_version()
            if version is not None and version != now:
                self.close()
                raise self._changed()
            self.version = now

    @property
    def size(self) -> int:
        """The file's size (remotely from the first block's response when not given)."""
        if self._size is None:
            (first,) = self._fetch([(0, _BUFFER)])
            if self._size is None:  # a store that does not say (no Content-Range)
                tail = self._where.tails([self._key], 1)[0]
                if tail is None:
                    raise FileNotFoundError(self.url)
                self._size = tail.size
            self._head = first
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        end = offset + length if self._size is None else min(offset + length, self._size)
        if end <= offset:
            return b""
        if self._fd is not None:  # kept short: a header walk makes a read per member
            return os.pread(self._fd, end - offset, offset)
        head = self._head
        if head is not None and (end <= len(head) or len(head) < _BUFFER):
            return head[offset:end]
        return self._fetch([(offset, end)])[0]

    def read_many(self, offsets: Sequence[int], length: int) -> list[bytes]:
        """``length`` bytes at each offset (short at the end of the file).

        Ascending offsets closer than 8 KiB are read as one range of at most
        1 MiB (tiny members: a few requests per thousand headers; members of a
        megabyte or more: one 512-byte range each). Remotely the ranges go out
        concurrently.
        """
        windows: list[tuple[int, int, int, int]] = []  # (first, last + 1, start, end)
        i, n = 0, len(offsets)
        while i < n:
            j, start = i + 1, offsets[i]
            while (
                j < n
                and 0 <= offsets[j] - offsets[j - 1] <= _WINDOW_GAP
                and offsets[j] + length - start <= _WINDOW
            ):
                j += 1
            windows.append((i, j, start, offsets[j - 1] + length))
            i = j
        size = self._size
        wanted = [(a, b if size is None else min(b, size)) for _, _, a, b in windows]
        asked = [r for r in wanted if r[1] > r[0]]
        got = iter(self._fetch(asked))
        data = [next(got) if b > a else b"" for a, b in wanted]
        self.requests += len(asked)
        out: list[bytes] = []
        for (i, j, start, _), window in zip(windows, data, strict=True):
            out += [window[o - start : o - start + length] for o in offsets[i:j]]
        return out

    def _fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The ranges through the seam, each asking for the recorded version."""
        if self._fd is not None:
            return [os.pread(self._fd, max(0, min(b, self.size) - a), a) for a, b in ranges]
        try:
            tails = self._where.fetch([(self._key, a, b, self.version) for a, b in ranges])
        except ObjectChangedError:
            raise self._changed() from None
        self._note(tails)
        return [bytes(t.data) for t in tails]

    def _note(self, tails: Sequence[Tail]) -> None:
        """Record the size and version the responses give; two versions are a change."""
        versions = {t.version for t in tails if t.version is not None}
        if len(versions) > 1 or (self.version is not None and versions - {self.version}):
            raise self._changed()
        if versions and self.version is None:
            self.version = versions.pop()
        if self._size is None:
            self._size = next((t.size for t in tails if t.data and t.size >= 0), None)

    def _changed(self) -> ObjectChangedError:
        return ObjectChangedError(
            f"{self.url}: the tar changed while it was being read (it is no longer the"
            f" version {self.version or 'first read'}); plan the conversion again"
        )

    def _local_version(self) -> str:
        stat = os.fstat(self._fd)  # type: ignore[arg-type]
        return f"{stat.st_size:x}-{stat.st_mtime_ns:x}"  # what Location gives local files

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_WINDOW_GAP = 8 * 2**10
_WINDOW = 2**20
_BUFFER = 512  # open_binary reads ahead at most one tar header block


class _SourceFile(io.RawIOBase):
    """A seekable file view of a :class:`ByteSource` (for ``tarfile``'s slow path)."""

    def __init__(self, src: ByteSource) -> None:
        self._src, self._pos = src, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = (
            offset
            if whence == 0
            else self._pos + offset
            if whence == 1
            else (self._src.size + offset)
        )
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        # a bounded read needs no size: the source stops at the end of the file
        n = self._src.size - self._pos if n is None or n < 0 else n
        data = self._src.read(self._pos, n) if n > 0 else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        # what io.BufferedReader (open_binary) reads with; RawIOBase has no default
        data = self.read(len(memoryview(buffer).cast("B")))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)


@contextmanager
def open_binary(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[BinaryIO]:
    """Open a local path or fsspec URL for reading (remote: no read-ahead, exact ranges)."""
    with ByteSource(url, storage_options) as src:
        yield io.BufferedReader(_SourceFile(src), buffer_size=_BUFFER)


def file_size(url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return int(fs.size(path))
