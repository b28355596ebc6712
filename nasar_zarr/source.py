"""The only module that touches tar shards and npz/npy bytes.

A shard is indexed once from its tar headers (``index_shard``); samples are then
read by byte range (``read_samples``), which works the same on local disks and
object stores and never extracts anything to disk. Array members are parsed
without copies and never unpickled: an object dtype is refused before any byte
of its payload is looked at.
"""

from __future__ import annotations

import ast
import functools
import io
import posixpath
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import numpy as np

from . import schema
from .errors import (
    DuplicateSampleError,
    MemberTooLargeError,
    SampleDecodeError,
    SampleSchemaError,
    ShardCorruptError,
    SourceError,
)

DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20  # a sample is ~1.2 MB; 64 MiB is a generous bomb cap
_REMOTE_BLOCK_SIZE = 8 * 2**20


@dataclass(frozen=True)
class Member:
    """One tar member holding arrays: ``array`` is None for ``<key>.npz``."""

    name: str
    offset: int  # byte offset of the member's data in the tar
    size: int
    array: str | None = None


@dataclass(frozen=True)
class SampleEntry:
    """The array-bearing members of one sample in one tar shard."""

    key: str
    members: tuple[Member, ...]

    @property
    def nbytes(self) -> int:
        return sum(m.size for m in self.members)


# ---------------------------------------------------------------------------- files


def join(root: str, relative: str) -> str:
    """Join a local path or fsspec URL with a relative path."""
    return root.rstrip("/") + "/" + relative.lstrip("/")


def is_remote(url: str) -> bool:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return protocol not in ("file", "local")


@contextmanager
def open_binary(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[BinaryIO]:
    """Open a local path or fsspec URL for reading; remote files read ahead in blocks."""
    if not is_remote(url):
        path = url.split("://", 1)[1] if url.startswith("file://") else url
        with open(path, "rb", buffering=0) as f:
            yield f
        return
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    with fs.open(path, "rb", block_size=_REMOTE_BLOCK_SIZE, cache_type="readahead") as f:
        yield f


def file_size(url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return int(fs.size(path))


# ---------------------------------------------------------------------------- index


def member_key(name: str) -> tuple[str, str]:
    """WebDataset grouping: key = path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, suffix


def index_shard(
    url: str,
    *,
    shard: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    problems: list[SourceError] | None = None,
) -> list[SampleEntry]:
    """Index a tar shard's array members from its headers, in archive order.

    With a ``problems`` list, bad samples are recorded there and left out (a
    damaged tar keeps the samples before the damage) instead of raising.

    Raises
    ------
    ShardCorruptError
        The file is not a readable tar, or it ends before a member's data does.
    DuplicateSampleError
        A sample key appears twice in the shard.
    MemberTooLargeError
        A member is larger than ``max_member_bytes``.
    """
    shard = shard or url

    def problem(error: SourceError) -> None:
        if problems is None:
            raise error
        problems.append(error)

    size = file_size(url, storage_options)
    entries: dict[str, list[Member]] = {}
    dropped: set[str] = set()
    last_key: str | None = None
    with open_binary(url, storage_options) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, suffix = member_key(info.name)
                    member = _array_member(info, suffix)
                    if member is None:
                        continue  # extra members (json, txt, ...) are not arrays
                    if key in dropped:
                        continue
                    if key in entries and (
                        key != last_key or member.array in {m.array for m in entries[key]}
                    ):
                        # Two payloads for one key: neither can be trusted over the other.
                        entries.pop(key)
                        dropped.add(key)
                        problem(DuplicateSampleError(
                            f"duplicate sample key: member {info.name!r} repeats it",
                            shard=shard,
                            key=key,
                        ))
                        continue
                    if member.size > max_member_bytes:
                        entries.pop(key, None)
                        dropped.add(key)
                        problem(MemberTooLargeError(
                            f"member {info.name!r} is {member.size:,} bytes, over the cap of"
                            f" {max_member_bytes:,}",
                            shard=shard,
                            key=key,
                            hint="raise max_member_bytes if this is intended",
                        ))
                        continue
                    if member.offset + member.size > size:
                        entries.pop(key, None)
                        problem(ShardCorruptError(
                            f"truncated tar: member {info.name!r} needs bytes up to"
                            f" {member.offset + member.size:,} but the file has {size:,}",
                            shard=shard,
                            key=key,
                        ))
                        break
                    entries.setdefault(key, []).append(member)
                    last_key = key
        except (tarfile.TarError, EOFError, OSError) as exc:
            problem(ShardCorruptError(
                f"not a readable tar archive after {len(entries)} samples ({exc})",
                shard=shard,
                key=last_key,
            ))
    return [SampleEntry(key, tuple(members)) for key, members in entries.items()]


def _array_member(info: tarfile.TarInfo, suffix: str) -> Member | None:
    if suffix == "npz":
        return Member(info.name, info.offset_data, info.size)
    if suffix.endswith(".npy") and suffix.count(".") == 1:
        return Member(info.name, info.offset_data, info.size, array=suffix[: -len(".npy")])
    return None


# ---------------------------------------------------------------------------- read


def read_samples(
    url: str,
    entries: Iterable[SampleEntry],
    *,
    shard: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, dict[str, np.ndarray] | Exception]]:
    """Read and validate samples by byte range, one open file for the lot.

    Yields ``(key, arrays)``, or ``(key, error)`` for a bad sample, so that the
    caller decides the policy. A shard that cannot be read at all raises.
    """
    shard = shard or url
    with open_binary(url, storage_options) as f:
        for entry in entries:
            try:
                payloads = [(m, _read_exact(f, m, shard, entry.key)) for m in entry.members]
            except ShardCorruptError:
                raise
            try:
                yield entry.key, decode_sample(payloads, shard=shard, key=entry.key,
                                               max_member_bytes=max_member_bytes)
            except (SampleDecodeError, SampleSchemaError, MemberTooLargeError,
                    DuplicateSampleError) as exc:
                yield entry.key, exc


def iter_shard(
    url: str,
    *,
    shard: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Every sample of one shard, validated, in archive order; the first bad one raises."""
    shard = shard or url
    entries = index_shard(url, shard=shard, storage_options=storage_options,
                          max_member_bytes=max_member_bytes)
    for key, arrays in read_samples(url, entries, shard=shard, storage_options=storage_options,
                                    max_member_bytes=max_member_bytes):
        if isinstance(arrays, Exception):
            raise arrays
        yield key, arrays


def _read_exact(f: BinaryIO, member: Member, shard: str, key: str) -> bytes:
    f.seek(member.offset)
    data = f.read(member.size)
    if len(data) != member.size:
        raise ShardCorruptError(
            f"truncated tar: member {member.name!r} has {len(data):,} of {member.size:,} bytes",
            shard=shard,
            key=key,
        )
    return data


# ---------------------------------------------------------------------------- decode


def decode_sample(
    payloads: Iterable[tuple[Member, bytes]],
    *,
    shard: str,
    key: str,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> dict[str, np.ndarray]:
    """Decode a sample's members (npz and/or npy) and validate against the schema."""
    arrays: dict[str, np.ndarray] = {}
    for member, data in payloads:
        if member.array is None:
            decoded = decode_npz(data, shard=shard, key=key, max_member_bytes=max_member_bytes)
        else:
            decoded = {member.array: decode_npy(data, shard=shard, key=key, what=member.name)}
        for name, array in decoded.items():
            if name in arrays:
                raise DuplicateSampleError(f"array {name!r} is given twice", shard=shard, key=key)
            arrays[name] = array
    return validate_sample(arrays, shard=shard, key=key)


def decode_npz(
    data: bytes, *, shard: str, key: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> dict[str, np.ndarray]:
    """Parse an ``.npz`` payload; stored members become views on ``data`` (no copy)."""
    view = memoryview(data)
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
        raw = _zip_entry_bytes(zf, info, view, shard=shard, key=key, cap=max_member_bytes)
        arrays[info.filename[: -len(".npy")]] = decode_npy(raw, shard=shard, key=key, what=what)
    return arrays


def _zip_entry_bytes(zf, info, view, *, shard, key, cap) -> memoryview | bytes:
    try:
        if info.compress_type == zipfile.ZIP_STORED:
            start = info.header_offset
            header = bytes(view[start : start + 30])
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            begin = start + 30 + name_len + extra_len
            raw = view[begin : begin + info.compress_size]
            if len(raw) != info.compress_size or zlib.crc32(raw) != info.CRC:
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
    except (zipfile.BadZipFile, NotImplementedError, zlib.error, ValueError, OSError,
            EOFError) as exc:
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
        dtype, shape, fortran = _npy_header(bytes(raw[start : start + header_len]),
                                            "utf8" if major == 3 else "latin1")
    except (ValueError, SyntaxError, KeyError, TypeError, struct.error, IndexError) as exc:
        raise SampleDecodeError(f"corrupt npy header in {what!r}: {exc}", shard=shard,
                                key=key) from None
    if dtype.hasobject:
        raise SampleDecodeError(
            f"{what!r} holds an object array (pickled data); refusing to unpickle it",
            shard=shard,
            key=key,
        )
    offset = start + header_len
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
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


def validate_sample(
    arrays: dict[str, np.ndarray], *, shard: str, key: str
) -> dict[str, np.ndarray]:
    """Check names, shapes and dtypes against the dataset card; return native-order arrays."""
    missing = [k for k in schema.SOURCE_KEYS if k not in arrays]
    if missing:
        raise SampleSchemaError(f"missing arrays {missing}", shard=shard, key=key)
    unexpected = sorted(set(arrays) - set(schema.SOURCE_KEYS))
    if unexpected:
        raise SampleSchemaError(
            f"unexpected arrays {unexpected}; the card defines {len(schema.SOURCE_KEYS)} keys",
            shard=shard,
            key=key,
        )
    out: dict[str, np.ndarray] = {}
    for name in schema.SOURCE_KEYS:
        array = arrays[name]
        expected_shape = schema.SOURCE_SHAPES[name]
        if array.shape != expected_shape:
            raise SampleSchemaError(
                f"array {name!r} has shape {array.shape}, expected {expected_shape}",
                shard=shard,
                key=key,
            )
        if array.dtype.newbyteorder("=") != schema.SOURCE_DTYPE.newbyteorder("="):
            raise SampleSchemaError(
                f"array {name!r} has dtype {array.dtype}, expected {schema.SOURCE_DTYPE}",
                shard=shard,
                key=key,
            )
        if not array.dtype.isnative:
            array = array.astype(schema.SOURCE_DTYPE)  # same values, native byte order
        out[name] = array
    return out


def nonfinite_counts(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Number of NaN/inf values per source array (only those that have any)."""
    counts = {}
    for name, array in arrays.items():
        bad = array.size - int(np.isfinite(array).sum())
        if bad:
            counts[name] = bad
    return counts
