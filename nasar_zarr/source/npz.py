"""npz (zip) and npy payloads: the zip central directory, entries inflated under a
cap and CRC-checked, npy headers parsed safely; arrays are views, never unpickled."""

from __future__ import annotations

import ast
import functools
import io
import math
import struct
import zipfile
import zlib
from typing import Any, NamedTuple

import numpy as np

from ..errors import (
    MemberTooLargeError,
    SampleDecodeError,
    SampleSchemaError,
)
from .deflate import crc32, inflate
from .members import DEFAULT_MAX_MEMBER_BYTES


def decode_npz(
    data: bytes,
    *,
    shard: str,
    key: str,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    inflater: str | None = None,
) -> dict[str, np.ndarray]:
    """Parse an ``.npz`` payload; stored members become views on ``data`` (no copy).

    Deflated members are inflated by ``inflater`` (default :data:`INFLATER`), never
    past ``max_member_bytes``; every member's CRC-32 is checked.
    """
    view = memoryview(data)
    zf = None
    infos: list[Any] | None = _central_directory(view)
    if infos is None:  # anything but a plain zip: zipfile parses it (and names what is wrong)
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
            raise SampleDecodeError(f"corrupt npz member: {exc}", shard=shard, key=key) from None
    arrays: dict[str, np.ndarray] = {}
    for info in infos:
        what = f"{key}.npz/{info.filename}"
        if not info.filename.endswith(".npy"):
            raise SampleSchemaError(
                f"npz entry {info.filename!r} is not an .npy array", shard=shard, key=key
            )
        if info.file_size > max_member_bytes:
            raise MemberTooLargeError(
                f"npz entry {info.filename!r} inflates to {info.file_size:,} bytes, over the cap"
                f" of {max_member_bytes:,}",
                shard=shard,
                key=key,
            )
        raw = _zip_entry_bytes(
            zf, info, view, shard=shard, key=key, cap=max_member_bytes, inflater=inflater
        )
        arrays[info.filename[: -len(".npy")]] = decode_npy(raw, shard=shard, key=key, what=what)
    return arrays


class _ZipEntry(NamedTuple):
    """The fields of ``zipfile.ZipInfo`` that decoding uses."""

    filename: str
    header_offset: int
    compress_type: int
    flag_bits: int
    compress_size: int
    file_size: int
    CRC: int


_EOCD = struct.Struct("<4s4H2IH")  # end of central directory record, 22 bytes
_CDFH = struct.Struct("<4s6H3I5H2I")  # central directory file header, 46 bytes
_NO_32BIT = 0xFFFFFFFF  # a zip64 value lives in the extra field


def _central_directory(view: memoryview) -> list[_ZipEntry] | None:
    """Entries of a plain zip (what ``np.savez`` writes), read straight from its
    central directory; None for anything else (a comment, zip64 sizes or offsets,
    encryption, another compression method, non-ASCII names, bytes before the
    archive), which :mod:`zipfile` then parses. Saves ~0.1 ms per sample."""
    end = len(view) - _EOCD.size
    if end < 0:
        return None
    sig, disk, cd_disk, n_here, n, cd_size, cd_offset, comment = _EOCD.unpack(view[end:])
    if sig != b"PK\x05\x06" or disk or cd_disk or n_here != n or comment:
        return None
    if cd_offset + cd_size != end:
        return None
    entries = []
    pos = cd_offset
    for _ in range(n):
        if pos + _CDFH.size > end:
            return None
        (
            sig,
            _,
            _,
            flags,
            method,
            _,
            _,
            crc,
            csize,
            usize,
            name_len,
            extra_len,
            comment_len,
            _,
            _,
            _,
            offset,
        ) = _CDFH.unpack(view[pos : pos + _CDFH.size])
        name = bytes(view[pos + _CDFH.size : pos + _CDFH.size + name_len])
        if (
            sig != b"PK\x01\x02"
            or method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
            or flags & 0x1
            or _NO_32BIT in (csize, usize, offset)
            or offset >= cd_offset
            or not name.isascii()
            or b"\x00" in name
        ):
            return None
        entries.append(_ZipEntry(name.decode("ascii"), offset, method, flags, csize, usize, crc))
        pos += _CDFH.size + name_len + extra_len + comment_len
    if pos != end:
        return None
    return entries


def _zip_entry_bytes(zf, info, view, *, shard, key, cap, inflater=None) -> memoryview | bytes:
    try:
        if info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) and not (
            info.flag_bits & 0x1  # encrypted: zipfile says so
        ):
            start = info.header_offset
            header = bytes(view[start : start + 30])
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            begin = start + 30 + name_len + extra_len
            raw = view[begin : begin + info.compress_size]
            if len(raw) != info.compress_size:
                raise zipfile.BadZipFile(f"bad CRC-32 for {info.filename!r}")
            if info.compress_type == zipfile.ZIP_DEFLATED:
                try:
                    raw = inflate(raw, cap, inflater=inflater)
                except OverflowError:
                    raise MemberTooLargeError(
                        f"npz entry {info.filename!r} inflates past the cap of {cap:,} bytes",
                        shard=shard,
                        key=key,
                    ) from None
                if len(raw) != info.file_size:
                    raise zipfile.BadZipFile(
                        f"{info.filename!r} inflates to {len(raw):,} bytes, its header says"
                        f" {info.file_size:,}"
                    )
            if crc32(raw) != info.CRC:
                raise zipfile.BadZipFile(f"bad CRC-32 for {info.filename!r}")
            return raw
        with zf.open(info) as fh:  # zipfile checks the CRC when it reaches the end
            raw = fh.read(cap + 1)
        if len(raw) > cap:
            raise MemberTooLargeError(
                f"npz entry {info.filename!r} inflates past the cap of {cap:,} bytes",
                shard=shard,
                key=key,
            )
        return raw
    except MemberTooLargeError:
        raise
    except (
        zipfile.BadZipFile,
        NotImplementedError,
        zlib.error,
        ValueError,
        OSError,
        EOFError,
    ) as exc:
        raise SampleDecodeError(f"corrupt npz member: {exc}", shard=shard, key=key) from None


def decode_npy(data: bytes | memoryview, *, shard: str, key: str, what: str) -> np.ndarray:
    """Parse an ``.npy`` payload into a read-only view, refusing object dtypes."""
    raw = memoryview(data)
    try:
        if bytes(raw[:6]) != b"\x93NUMPY":
            raise ValueError("missing .npy magic")
        major = raw[6]
        if major == 1:
            (header_len,), start = struct.unpack("<H", raw[8:10]), 10
        elif major in (2, 3):
            (header_len,), start = struct.unpack("<I", raw[8:12]), 12
        else:
            raise ValueError(f"unknown .npy version {major}")
        dtype, shape, fortran = _npy_header(
            bytes(raw[start : start + header_len]), "utf8" if major == 3 else "latin1"
        )
    except (ValueError, SyntaxError, KeyError, TypeError, struct.error, IndexError) as exc:
        raise SampleDecodeError(
            f"corrupt npy header in {what!r}: {exc}", shard=shard, key=key
        ) from None
    if dtype.hasobject:
        raise SampleDecodeError(
            f"{what!r} holds an object array (pickled data); refusing to unpickle it",
            shard=shard,
            key=key,
        )
    offset = start + header_len
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - offset != expected:
        raise SampleDecodeError(
            f"{what!r} holds {len(raw) - offset:,} payload bytes but its header says"
            f" {dtype} {shape} ({expected:,} bytes)",
            shard=shard,
            key=key,
        )
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=256)
def _npy_header(text: bytes, encoding: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """Parse an .npy header dict safely (literal_eval); the release repeats a few headers."""
    header = ast.literal_eval(text.decode(encoding))
    dtype = np.lib.format.descr_to_dtype(header["descr"])
    return dtype, tuple(int(n) for n in header["shape"]), bool(header["fortran_order"])
