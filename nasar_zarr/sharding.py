"""Pure: the bytes of a Zarr v3 ``sharding_indexed`` shard, one inner chunk at a time.

A shard object is its encoded inner chunks back to back, then the index: for
each inner chunk (C order) a little-endian uint64 pair (offset, nbytes), or
(2**64-1, 2**64-1) for an empty chunk, followed by the CRC-32C of those index
bytes (the default ``index_codecs``: bytes + crc32c, ``index_location`` end).

Building it ourselves lets a task compress each inner chunk as soon as its
samples are read and keep only compressed bytes, so a worker holds ~0.7x a
shard instead of a shard of raw buffers plus Zarr's copies; the shard is still
written once, in one piece, by one task. The tests read every such shard back
with zarr-python and tensorstore, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import google_crc32c
import numpy as np

EMPTY = 2**64 - 1


def inner_encoder(codec: str, clevel: int) -> Callable[[np.ndarray], bytes]:
    """The encoder of one inner chunk, matching the array's ``bytes`` + compressor codecs."""
    from numcodecs import Blosc, Zstd

    if codec in ("blosc-zstd", "blosc-lz4"):
        blosc = Blosc(
            cname=codec.split("-")[1], clevel=clevel, shuffle=Blosc.BITSHUFFLE, blocksize=0
        )
        return lambda chunk: blosc.encode(_little_endian(chunk))
    if codec == "zstd":
        zstd = Zstd(level=clevel)
        return lambda chunk: zstd.encode(_little_endian(chunk))
    if codec == "none":
        return lambda chunk: _little_endian(chunk).tobytes()
    raise ValueError(f"unknown codec {codec!r}")


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
    raw = index.tobytes()
    return raw + np.array([google_crc32c.value(raw)], dtype="<u4").tobytes()
