"""Samples of a tar by byte range: a few large reads per span, each sample's members
decoded and validated; a bad sample is yielded as its error."""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from itertools import islice
from typing import Any

import numpy as np

from ..errors import (
    DuplicateSampleError,
    MemberTooLargeError,
    SampleDecodeError,
    SampleSchemaError,
    ShardCorruptError,
    SourceError,
)
from .files import ByteSource
from .index import TarIndex, index_tar
from .members import DEFAULT_MAX_MEMBER_BYTES, Member, SampleEntry
from .npz import decode_npy, decode_npz
from .validate import validate_sample

READ_BYTES = 8 * 2**20  # a task reads its span of a tar in ranges of at least this much
_MAX_GAP = 2**20  # bytes of unwanted members read through rather than split the range
READ_AHEAD = 2  # remote ranges in flight while one is decoded (memory: this many ranges more)


def _reads(src: ByteSource, ranges: list[tuple[int, int]]) -> Generator[bytes, None, None]:
    """The ranges' bytes in order; remotely the next :data:`READ_AHEAD` are in flight (on
    threads of this call) while one is decoded, after a first read that records the
    version the others ask for."""
    if not src.remote or len(ranges) < 2:  # local reads come from the page cache
        for a, b in ranges:
            yield src.read(a, b - a)
        return
    todo = iter(ranges)
    first = None
    if src.version is None:
        a, b = next(todo)
        first = src.read(a, b - a)
    with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="nasar-read-ahead") as pool:
        pending = deque(pool.submit(src.read, a, b - a) for a, b in islice(todo, READ_AHEAD))
        try:
            if first is not None:
                yield first
                first = None
            while pending:
                data = pending.popleft().result()
                for a, b in islice(todo, 1):
                    pending.append(pool.submit(src.read, a, b - a))
                yield data
                del data
        finally:
            for future in pending:  # the caller stopped early or a read failed
                future.cancel()


def read_index(
    url: str,
    index: TarIndex,
    *,
    shard: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    read_bytes: int = READ_BYTES,
    version: str | None = None,
) -> Iterator[tuple[str, dict[str, np.ndarray] | SourceError]]:
    """Read and validate the samples of ``index`` in a few large ranged reads.

    Consecutive samples are read together, one range of at least ``read_bytes``
    (or up to the last sample) per request, so each byte is read once; a gap
    over 1 MiB (samples not asked for) starts a new range. Yields
    ``(key, arrays)``, or ``(key, error)`` for a bad sample; a tar that ends
    before a member does raises :class:`ShardCorruptError` (after the samples
    before it). Remotely the next :data:`READ_AHEAD` ranges are fetched while
    a range's samples are decoded; a tar that changes while it is read raises
    :class:`~nasar_zarr.ranges.ObjectChangedError` naming it.

    Parameters
    ----------
    url
        Local path or fsspec URL of the tar.
    index
        The samples to read (a :class:`TarIndex`, or a part of one).
    shard
        The name errors give the tar (default ``url``).
    storage_options
        fsspec options.
    max_member_bytes
        Size cap of an inflated npz entry.
    read_bytes
        Smallest range read at once (the last one of a span may be shorter).
    version
        The tar's version (ETag, as ``If-Match`` takes it) the index was made
        from: every read asks for it. Default: the version of the first read.

    Returns
    -------
    Iterator of (str, dict or SourceError)
        Each sample's key with its arrays (native float32) or its problem.

    Examples
    --------
    >>> url = "corpus/data/nasar-train-000000.tar"  # doctest: +SKIP
    >>> for key, arrays in read_index(url, index_tar(url)):  # doctest: +SKIP
    ...     print(key, arrays["dem"].shape)
    """
    shard = shard or url
    n = len(index)
    if not n:
        return
    start, ends = index.member_start, index.offset + index.size
    first = index.offset[start[:-1]] if len(index.offset) else np.zeros(n, np.int64)
    spans: list[tuple[int, int, int, int]] = []  # (lo, hi, begin, end): samples lo:hi
    lo = 0
    while lo < n:
        begin = int(first[lo])
        end = int(ends[start[lo] : start[lo + 1]].max(initial=begin))
        hi = lo + 1
        while hi < n and end - begin < read_bytes:
            nxt = int(first[hi])
            if nxt < end or nxt - end > _MAX_GAP:
                break
            end = max(end, int(ends[start[hi] : start[hi + 1]].max(initial=nxt)))
            hi += 1
        spans.append((lo, hi, begin, end))
        lo = hi
    with (
        ByteSource(url, storage_options, version=version) as src,
        closing(_reads(src, [(b, e) for _, _, b, e in spans])) as reads,
    ):
        for (lo, hi, begin, _), got in zip(spans, reads, strict=True):
            data = memoryview(got)
            for i in range(lo, hi):
                key = index.keys[i].as_py()
                payloads: list[tuple[Member, Any]] = []
                for j in range(int(start[i]), int(start[i + 1])):
                    suffix = index.suffixes[index.suffix[j]]
                    member = Member(
                        f"{key}.{suffix}",
                        int(index.offset[j]),
                        int(index.size[j]),
                        None if suffix == "npz" else suffix[: -len(".npy")],
                    )
                    rel = member.offset - begin
                    if rel + member.size > len(data):
                        have = max(0, len(data) - rel)
                        raise ShardCorruptError(
                            f"truncated tar: member {member.name!r} has {have:,} of"
                            f" {member.size:,} bytes",
                            shard=shard,
                            key=key,
                        )
                    payloads.append((member, data[rel : rel + member.size]))
                try:
                    yield (
                        key,
                        decode_sample(
                            payloads, shard=shard, key=key, max_member_bytes=max_member_bytes
                        ),
                    )
                except (
                    SampleDecodeError,
                    SampleSchemaError,
                    MemberTooLargeError,
                    DuplicateSampleError,
                ) as exc:
                    yield key, exc
            del data, got


def read_samples(
    url: str,
    entries: Iterable[SampleEntry] | TarIndex,
    *,
    shard: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, dict[str, np.ndarray] | SourceError]]:
    """Read and validate samples by byte range (see :func:`read_index`).

    Yields ``(key, arrays)``, or ``(key, error)`` for a bad sample, so that the
    caller decides the policy. A shard that cannot be read at all raises.
    """
    index = entries if isinstance(entries, TarIndex) else TarIndex.from_entries(entries)
    yield from read_index(
        url, index, shard=shard, storage_options=storage_options, max_member_bytes=max_member_bytes
    )


def iter_shard(
    url: str,
    *,
    shard: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Every sample of one shard, validated, in archive order; the first bad one raises."""
    shard = shard or url
    index = index_tar(
        url, shard=shard, storage_options=storage_options, max_member_bytes=max_member_bytes
    )
    for key, arrays in read_index(
        url, index, shard=shard, storage_options=storage_options, max_member_bytes=max_member_bytes
    ):
        if isinstance(arrays, Exception):
            raise arrays
        yield key, arrays


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
