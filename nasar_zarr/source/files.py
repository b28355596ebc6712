"""Bytes of one file, local or remote: :class:`ByteSource` (``os.pread`` locally,
ranged GETs remotely), a file view of it, and path helpers."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec


def join(root: str, relative: str) -> str:
    """Join a local path or fsspec URL with a relative path."""
    return root.rstrip("/") + "/" + relative.lstrip("/")


def is_remote(url: str) -> bool:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return protocol not in ("file", "local")


class ByteSource:
    """Byte ranges of one file: ``os.pread`` locally, one ranged GET per range remotely.

    Nothing is read ahead: planning reads tar headers (512 bytes each) and
    execution reads the large ranges it asks for, so the bytes transferred are
    the bytes asked for. :meth:`read_many` issues its ranges concurrently on
    filesystems that can (``cat_ranges`` of s3fs, HTTP).
    """

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, *, size: int | None = None
    ) -> None:
        self.url = url
        self.requests = 0  # ranges read through read_many
        self._size: int | None = None
        self._fd: int | None = None
        self._fs: Any = None
        if not is_remote(url):
            path = url.split("://", 1)[1] if url.startswith("file://") else url
            self._fd = os.open(path, os.O_RDONLY)
            self.size = os.fstat(self._fd).st_size
            self._fs = None
            self._path = path
        else:
            self._fs, self._path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
            self._size = size

    @property
    def size(self) -> int:
        """The file's size (remotely one ``HEAD``, asked only when needed)."""
        if self._size is None:
            self._size = int(self._fs.size(self._path))
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        if self._fs is not None:  # without a known size, the server stops at the end
            end = offset + length if self._size is None else min(offset + length, self._size)
            if end <= offset:
                return b""
            return self._fs.cat_file(self._path, start=offset, end=end)
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        return os.pread(self._fd, end - offset, offset)  # type: ignore[arg-type]

    def read_many(self, offsets: Sequence[int], length: int) -> list[bytes]:
        """``length`` bytes at each offset (short at the end of the file).

        Ascending offsets closer than 8 KiB are read as one range of at most
        1 MiB (tiny members: a few requests per thousand headers; members of a
        megabyte or more: one 512-byte range each). Remotely the ranges go out
        concurrently (``cat_ranges``).
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
        if self._fs is None:
            data = [self.read(start, end - start) for _, _, start, end in windows]
        else:
            size = self.size
            ranges = [(start, min(end, size)) for _, _, start, end in windows if start < size]
            starts, ends = [r[0] for r in ranges], [r[1] for r in ranges]
            data = list(self._fs.cat_ranges([self._path] * len(ranges), starts, ends))
            data += [b""] * (len(windows) - len(ranges))
            for item in data:
                if isinstance(item, BaseException):
                    raise item
        self.requests += len(windows)
        out: list[bytes] = []
        for (i, j, start, _), window in zip(windows, data, strict=True):
            out += [window[o - start : o - start + length] for o in offsets[i:j]]
        return out

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
        n = self._src.size - self._pos if n is None or n < 0 else min(n, self._src.size - self._pos)
        data = self._src.read(self._pos, n) if n > 0 else b""
        self._pos += len(data)
        return data


@contextmanager
def open_binary(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[BinaryIO]:
    """Open a local path or fsspec URL for reading (remote: no read-ahead, exact ranges)."""
    with ByteSource(url, storage_options) as src:
        yield io.BufferedReader(_SourceFile(src), buffer_size=_BUFFER)


def file_size(url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return int(fs.size(path))
