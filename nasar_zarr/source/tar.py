"""Tar headers: :func:`scan_tar` walks every member's header (batched and checked
in numpy, ``tarfile``'s own parser for anything unusual) without reading data."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

import numpy as np

from .files import ByteSource, _SourceFile

_BLOCK = 512
# tarfile's header errors (private names; what TarFile.next makes of each is mirrored)
_EOF_HEADER: type[Exception] = getattr(tarfile, "EOFHeaderError")  # noqa: B009
_EMPTY_HEADER: type[Exception] = getattr(tarfile, "EmptyHeaderError")  # noqa: B009
_BAD_FIRST_HEADER: tuple[type[Exception], ...] = (
    getattr(tarfile, "InvalidHeaderError"),  # noqa: B009
    _EMPTY_HEADER,
    getattr(tarfile, "TruncatedHeaderError"),  # noqa: B009
)
_SUBSEQUENT_HEADER: type[Exception] = getattr(tarfile, "SubsequentHeaderError")  # noqa: B009
_NUMERIC_FIELDS = ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (329, 8), (337, 8))
_DIGITS = np.zeros(256, dtype=bool)
_DIGITS[ord("0") : ord("8")] = True


@dataclass(frozen=True)
class TarMembers:
    """Every member of a tar as its headers say, in archive order (columnar).

    ``error`` is what stopped the walk early (``tarfile``'s words), else None.
    """

    names: list[str]
    offsets: np.ndarray  # int64: where each member's data starts
    sizes: np.ndarray  # int64
    isfile: np.ndarray  # bool: a regular file (what tarfile's ``isfile`` says)
    error: str | None = None
    requests: int = 0  # reads issued (one range each)


def scan_tar(src: ByteSource, *, max_batch: int | None = None) -> TarMembers:
    """Walk a tar's headers without ``tarfile``'s per-member objects.

    Plain headers (ustar/v7 regular files with octal fields) are read in batches
    at offsets predicted from the recent members' strides (members of one
    release have near-constant sizes, so the stride pattern repeats), checked
    in numpy (checksum, field syntax, type) and chained (each header's size
    must lead exactly to the next prediction); the first header that fails
    sends the walk back to ``tarfile``'s own header parser for that member
    (pax, GNU long names, sparse files, odd fields, end of archive), so the
    result is the same as iterating ``tarfile`` over the file.

    Parameters
    ----------
    src
        The tar's bytes.
    max_batch
        Most headers predicted at once (default 16,384 locally, 256 remotely).

    Returns
    -------
    TarMembers
        Names, data offsets, sizes and file flags of every member, and the error
        (``tarfile``'s words) that ended the walk early, if any.

    Examples
    --------
    >>> with ByteSource("corpus/data/nasar-train-000000.tar") as src:  # doctest: +SKIP
    ...     members = scan_tar(src)
    >>> members.names[:2], members.offsets[:2]  # doctest: +SKIP
    """
    remote = src.remote
    src.requests = 0
    max_batch = max_batch or (256 if remote else 16384)
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    isfile: list[bool] = []
    strides: list[int] = []  # header-to-header distances of recent plain members
    shim = _TarShim(src)
    pos, batch, requests = 0, 8, 0
    error: str | None = None
    while True:
        pattern = _period(strides) if not shim.pax_headers else None
        if pattern is not None:
            planned = np.cumsum(np.tile(pattern, -(-batch // len(pattern)))[:batch])
            planned += pos - pattern[0]
            planned = planned[planned + _BLOCK <= src.size]
            blocks = src.read_many(planned.tolist(), _BLOCK) if len(planned) else []
            n_ok, (got_names, got_offsets, got_sizes) = _plain_headers(blocks, planned, src.size)
            names += got_names
            offsets += got_offsets
            sizes += got_sizes
            isfile += [True] * n_ok
            if n_ok:
                nxt = int(planned[n_ok - 1]) + _BLOCK + _padded(got_sizes[-1])
                strides += np.diff(np.append(planned[:n_ok], nxt)).tolist()
                del strides[:-64]
                pos = nxt
            if n_ok == len(planned) and n_ok == batch:
                batch = min(batch * 2, max_batch)
                continue
            batch = 8
        # One member the slow, exact way.
        if pos > src.size:
            error = "unexpected end of data"
            break
        shim.fileobj.seek(pos)
        start = shim.reads
        try:
            info = tarfile.TarInfo.fromtarfile(shim)  # type: ignore[arg-type]
        except _EOF_HEADER:
            break
        except _BAD_FIRST_HEADER as exc:
            if pos == 0:
                error = "empty file" if isinstance(exc, _EMPTY_HEADER) else str(exc)
            break
        except _SUBSEQUENT_HEADER as exc:
            error = str(exc)
            break
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            error = str(exc)
            break
        finally:
            requests += shim.reads - start
        names.append(info.name)
        offsets.append(info.offset_data)
        sizes.append(info.size)
        isfile.append(info.isfile())
        if (
            info.type in (tarfile.REGTYPE, tarfile.AREGTYPE)
            and info.offset == pos
            and (shim.offset == info.offset_data + _padded(info.size))
            and info.offset_data == pos + _BLOCK
        ):
            strides.append(shim.offset - pos)
        else:
            strides.clear()  # pax, long names, other types: no prediction across them
        pos = shim.offset
    return TarMembers(
        names,
        np.array(offsets, dtype=np.int64),
        np.array(sizes, dtype=np.int64),
        np.array(isfile, dtype=bool),
        error,
        requests + src.requests,
    )


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _period(strides: list[int]) -> list[int] | None:
    """The shortest pattern (1-8 members) the last strides repeat twice, or None."""
    for p in range(1, 9):
        if len(strides) >= 2 * p and strides[-p:] == strides[-2 * p : -p]:
            return strides[-p:]
    return None


def _plain_headers(
    blocks: list[bytes], planned: np.ndarray, size: int
) -> tuple[int, tuple[list[str], list[int], list[int]]]:
    """How many leading blocks are plain, chained regular-file headers, and their
    names, data offsets and sizes."""
    k = 0
    while k < len(blocks) and len(blocks[k]) == _BLOCK:
        k += 1
    if not k:
        return 0, ([], [], [])
    h = np.frombuffer(b"".join(blocks[:k]), dtype=np.uint8).reshape(k, _BLOCK)
    ok = (h[:, 156] == ord("0")) | (h[:, 156] == 0)
    ok &= _canonical(h, _DIGITS_7, _NUL_AT_7)  # mode, uid, gid, devmajor, devminor
    ok &= _canonical(h, _DIGITS_11, _NUL_AT_11)  # size, mtime
    ok &= _DIGITS[h[:, 148:154]].all(axis=1) & (h[:, 154] == 0) & (h[:, 155] == 32)
    chksum = (h[:, 148:154].astype(np.int64) - 48) @ _POWERS[-6:]
    sizes = (h[:, 124:135].astype(np.int64) - 48) @ _POWERS[-11:]
    total = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    ok &= total == chksum
    nxt = planned[:k] + _BLOCK + (sizes + _BLOCK - 1) // _BLOCK * _BLOCK
    ok[:-1] &= nxt[:-1] == planned[1:k]
    ok &= planned[:k] + _BLOCK + sizes <= size
    # Names: nothing after the first NUL of the name field (tarfile would cut there).
    name = np.ascontiguousarray(h[:, :100]).view("S100").ravel()
    ok &= np.char.str_len(name) == (h[:, :100] != 0).sum(axis=1)
    bad = np.flatnonzero(~ok)
    n = int(bad[0]) if len(bad) else k
    raw = name[:n].tolist()
    names = [b.decode("utf-8", "surrogateescape") for b in raw]
    for i in np.flatnonzero(h[:n, 345]).tolist():  # a ustar prefix
        row = blocks[i]
        end = row.find(b"\0", 345, 500)
        names[i] = row[345 : 500 if end < 0 else end].decode("utf-8", "surrogateescape") + (
            "/" + names[i]
        )
    for i in np.flatnonzero(h[:n, 156] == 0).tolist():
        if names[i].endswith("/"):  # an old-style directory: tarfile's path decides
            n = i
            break
    return n, (names[:n], (planned[:n] + _BLOCK).tolist(), sizes[:n].tolist())


def _canonical(h: np.ndarray, digits: np.ndarray, nul: np.ndarray) -> np.ndarray:
    """Rows whose fields are written the usual way (``%0*o`` and a NUL) or all NULs.

    Anything else (spaces, base-256, stray bytes) is left to tarfile's own parser.
    """
    k, n = len(h), len(nul)
    field = h[:, digits].reshape(k, n, -1)
    ends = h[:, nul] == 0
    written = _DIGITS[field].all(axis=2) & ends
    empty = (field == 0).all(axis=2) & ends
    return (written | empty).all(axis=1)


_POWERS = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_DIGITS_7 = np.concatenate([np.arange(o, o + 7) for o in (100, 108, 116, 329, 337)])
_NUL_AT_7 = np.array([107, 115, 123, 336, 344])
_DIGITS_11 = np.concatenate([np.arange(o, o + 11) for o in (124, 136)])
_NUL_AT_11 = np.array([135, 147])


class _TarShim:
    """What ``tarfile.TarInfo.fromtarfile`` needs of a TarFile, over a ByteSource."""

    encoding = tarfile.ENCODING
    errors = "surrogateescape"

    def __init__(self, src: ByteSource) -> None:
        self.fileobj = _CountingFile(src)
        self.pax_headers: dict[str, str] = {}
        self.offset = 0

    @property
    def reads(self) -> int:
        return self.fileobj.reads


class _CountingFile(_SourceFile):
    def __init__(self, src: ByteSource) -> None:
        super().__init__(src)
        self.reads = 0

    def read(self, n: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(n)
