"""Pure: the bytes of a Zarr v3 ``sharding_indexed`` shard, one inner chunk at a time.

A shard object is its encoded inner chunks back to back, then the index: for
each inner chunk (C order) a little-endian uint64 pair (offset, nbytes), or
(2**64-1, 2**64-1) for an empty chunk, followed by the CRC-32C of those index
bytes (the default ``index_codecs``: bytes + crc32c, ``index_location`` end).
Each inner chunk is ``bytes`` + compressor + ``crc32c``: its compressed bytes
followed by their CRC-32C (little-endian uint32), so any reader of the core
codecs refuses a damaged chunk (cube contract 2; cubes of contract 1 have no
chunk checksum and still decode: ``checksum=False``).

Both directions live here: the encoders the converter writes with, and the
checks and index parsing every reader (local or remote) decodes with.

Building it ourselves lets a task compress each inner chunk as soon as its
samples are read and keep only compressed bytes, so a worker holds ~0.7x a
shard instead of a shard of raw buffers plus Zarr's copies; the shard is still
written once, in one piece, by one task. The tests read every such shard back
with zarr-python and tensorstore, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import google_crc32c
import numpy as np

EMPTY = 2**64 - 1
CHECKSUM_BYTES = 4  # a crc32c codec's trailer (and the shard index's)


class ChecksumMismatch(ValueError):
    """Encoded bytes whose CRC-32C trailer does not match them (readers add the context)."""


def inner_encoder(
    codec: str, clevel: int, *, checksum: bool = True
) -> Callable[[np.ndarray], bytes]:
    """The encoder of one inner chunk, matching the array's ``bytes`` + compressor
    (+ ``crc32c`` with ``checksum``) codecs."""
    from numcodecs import Blosc, Zstd

    compress: Callable[[np.ndarray], bytes]
    if codec in ("blosc-zstd", "blosc-lz4"):
        blosc = Blosc(
            cname=codec.split("-")[1], clevel=clevel, shuffle=Blosc.BITSHUFFLE, blocksize=0
        )
        compress = lambda chunk: blosc.encode(_little_endian(chunk))  # noqa: E731
    elif codec == "zstd":
        zstd = Zstd(level=clevel)
        compress = lambda chunk: zstd.encode(_little_endian(chunk))  # noqa: E731
    elif codec == "none":
        compress = lambda chunk: _little_endian(chunk).tobytes()  # noqa: E731
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if not checksum:
        return compress
    return lambda chunk: with_checksum(compress(chunk))


def compressors(codec: str, clevel: int) -> list:
    """The bytes-to-bytes codecs of a data variable's inner chunks (core v3 codecs only,
    so tensorstore and zarrita open every array): the compressor, then ``crc32c``."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    chain: list = []
    if codec in ("blosc-zstd", "blosc-lz4"):
        cname: Any = codec.split("-")[1]
        chain = [BloscCodec(cname=cname, clevel=clevel, shuffle="bitshuffle")]
    elif codec == "zstd":
        chain = [ZstdCodec(level=clevel)]
    return [*chain, Crc32cCodec()]


def unsharded_compressors() -> list:
    """The codecs of every unsharded array (flags, coordinates): zarr-python's default
    ``zstd``, then ``crc32c``, so each of their chunks is checked on read too."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0, checksum=False), Crc32cCodec()]


def with_checksum(data: bytes) -> bytes:
    """``data`` followed by its CRC-32C, as Zarr v3's ``crc32c`` codec encodes it."""
    return data + google_crc32c.value(data).to_bytes(CHECKSUM_BYTES, "little")


def checksum_problem(data: memoryview) -> str | None:
    """What is wrong with ``crc32c``-encoded bytes' trailer, or None when they match.

    Returns a message rather than raising, so a reader holding a memory map can
    raise after letting go of every view into it.
    """
    if len(data) < CHECKSUM_BYTES:
        return f"{len(data)} bytes, shorter than a CRC-32C"
    stored = int.from_bytes(data[-CHECKSUM_BYTES:], "little")
    # google_crc32c takes numpy views of any buffer (bytes, mmap) but not memoryviews
    actual = google_crc32c.value(np.frombuffer(data, np.uint8, len(data) - CHECKSUM_BYTES))
    return None if actual == stored else f"CRC-32C {actual:08x}, stored {stored:08x}"


def checked(data: memoryview) -> memoryview:
    """The payload of ``crc32c``-encoded bytes, after checking its trailer.

    Raises
    ------
    ChecksumMismatch
        The bytes do not match their CRC-32C (or are shorter than it).
    """
    problem = checksum_problem(data)
    if problem is not None:
        raise ChecksumMismatch(problem)
    return data[:-CHECKSUM_BYTES]


def _little_endian(chunk: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<"))


def shard_index(lengths: Sequence[int | None], chunks_per_shard: int) -> bytes:
    """Index bytes (with CRC-32C) for chunks of ``lengths`` stored back to back.

    ``None`` (or a missing tail, up to ``chunks_per_shard``) marks an empty chunk.
    """
    if len(lengths) > chunks_per_shard:
        raise ValueError(f"{len(lengths)} chunks for a shard of {chunks_per_shard}")
    index = np.full((chunks_per_shard, 2), EMPTY, dtype="<u8")
    offset = 0
    for i, length in enumerate(lengths):
        if length is None:
            continue
        index[i] = (offset, length)
        offset += length
    return with_checksum(index.tobytes())


def index_size(chunks_per_shard: int) -> int:
    """Bytes of a shard's index (at the object's end), its CRC-32C included."""
    return chunks_per_shard * 16 + CHECKSUM_BYTES


def parse_index(tail: bytes | memoryview, chunks_per_shard: int) -> np.ndarray:
    """The ``(chunks_per_shard, 2)`` (offset, nbytes) index from an object's last bytes.

    Raises
    ------
    ChecksumMismatch
        The index fails its CRC-32C, or ``tail`` is shorter than an index.
    """
    size = index_size(chunks_per_shard)
    if len(tail) < size:
        raise ChecksumMismatch(f"{len(tail)} bytes, shorter than its index ({size})")
    raw = checked(memoryview(tail)[len(tail) - size :])
    return np.frombuffer(bytes(raw), "<u8").reshape(chunks_per_shard, 2)
