"""The tar index: a tar's members grouped into samples (:class:`TarIndex`, columnar),
with the problems found on the way (duplicates, oversized or truncated members)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import (
    DuplicateSampleError,
    MemberTooLargeError,
    ShardCorruptError,
    SourceError,
)
from .files import ByteSource
from .members import DEFAULT_MAX_MEMBER_BYTES, Member, SampleEntry
from .tar import TarMembers, scan_tar


def member_key(name: str) -> tuple[str, str]:
    """WebDataset grouping: key = path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, suffix


def _array_suffix(suffix: str) -> bool:
    return suffix == "npz" or (suffix.endswith(".npy") and suffix.count(".") == 1)


@dataclass(frozen=True, eq=False)
class TarIndex:
    """The array members of a tar's samples, columnar (no per-sample Python objects).

    Sample ``i`` (key ``keys[i]``) has members ``member_start[i]:member_start[i+1]``;
    member ``j`` is ``f"{key}.{suffixes[suffix[j]]}"`` with data at ``offset[j]``,
    ``size[j]`` bytes (``suffixes`` holds ``"npz"`` or ``"<array>.npy"``).
    """

    keys: pa.Array  # string
    member_start: np.ndarray  # int64, len(keys) + 1
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    suffix: np.ndarray  # int16 codes into ``suffixes``
    suffixes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TarIndex):
            return NotImplemented
        return (
            self.keys.equals(other.keys)
            and np.array_equal(self.member_start, other.member_start)
            and np.array_equal(self.offset, other.offset)
            and np.array_equal(self.size, other.size)
            and [self.suffixes[c] for c in self.suffix.tolist()]
            == [other.suffixes[c] for c in other.suffix.tolist()]
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        """Bytes of the members' data."""
        return int(self.size.sum())

    @classmethod
    def empty(cls) -> TarIndex:
        z = np.zeros(0, dtype=np.int64)
        return cls(pa.array([], pa.string()), np.zeros(1, np.int64), z, z, z.astype(np.int16))

    @classmethod
    def from_entries(cls, entries: Iterable[SampleEntry]) -> TarIndex:
        """Columnar form of :class:`SampleEntry` objects."""
        keys: list[str] = []
        start = [0]
        offset: list[int] = []
        size: list[int] = []
        codes: list[int] = []
        table: dict[str, int] = {}
        for entry in entries:
            keys.append(entry.key)
            for m in entry.members:
                offset.append(m.offset)
                size.append(m.size)
                suffix = "npz" if m.array is None else f"{m.array}.npy"
                codes.append(table.setdefault(suffix, len(table)))
            start.append(len(offset))
        return cls(
            pa.array(keys, pa.string()),
            np.array(start, np.int64),
            np.array(offset, np.int64),
            np.array(size, np.int64),
            np.array(codes, np.int16),
            tuple(table),
        )

    def entry(self, i: int) -> SampleEntry:
        key = self.keys[i].as_py()
        members = []
        for j in range(int(self.member_start[i]), int(self.member_start[i + 1])):
            suffix = self.suffixes[self.suffix[j]]
            members.append(
                Member(
                    f"{key}.{suffix}",
                    int(self.offset[j]),
                    int(self.size[j]),
                    None if suffix == "npz" else suffix[: -len(".npy")],
                )
            )
        return SampleEntry(key, tuple(members))

    def entries(self) -> list[SampleEntry]:
        """The samples as :class:`SampleEntry` objects (for small indexes)."""
        return [self.entry(i) for i in range(len(self))]

    def take(self, positions: np.ndarray) -> TarIndex:
        """The samples at ``positions``, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        lo, hi = self.member_start[positions], self.member_start[positions + 1]
        counts = hi - lo
        start = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        members = np.repeat(lo - start[:-1], counts) + np.arange(start[-1], dtype=np.int64)
        return TarIndex(
            self.keys.take(pa.array(positions)),
            start,
            self.offset[members],
            self.size[members],
            self.suffix[members],
            self.suffixes,
        )

    def to_table(self) -> pa.Table:
        """One row per member: key, suffix, offset, size (a sample's members are adjacent)."""
        counts = np.diff(self.member_start)
        sample = np.repeat(np.arange(len(self), dtype=np.int64), counts)
        suffixes = pa.array(list(self.suffixes), pa.string())
        return pa.table(
            {
                "key": self.keys.take(pa.array(sample))
                if len(sample)
                else pa.array([], pa.string()),
                "suffix": pa.DictionaryArray.from_arrays(
                    pa.array(self.suffix.astype(np.int32)), suffixes
                ),
                "offset": pa.array(self.offset),
                "size": pa.array(self.size),
            }
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> TarIndex:
        """The inverse of :meth:`to_table`."""
        if not table.num_rows:
            return cls.empty()
        keys = table.column("key").combine_chunks()
        new = np.ones(len(keys), dtype=bool)
        new[1:] = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(
            zero_copy_only=False
        )
        starts = np.flatnonzero(new)
        suffix = table.column("suffix").combine_chunks()
        if not isinstance(suffix, pa.DictionaryArray):
            suffix = suffix.dictionary_encode()
        return cls(
            keys.take(pa.array(starts)),
            np.append(starts, len(keys)).astype(np.int64),
            table.column("offset").to_numpy().astype(np.int64),
            table.column("size").to_numpy().astype(np.int64),
            suffix.indices.to_numpy(zero_copy_only=False).astype(np.int16),
            tuple(suffix.dictionary.to_pylist()),
        )


def index_tar(
    url: str,
    *,
    shard: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    problems: list[SourceError] | None = None,
    size: int | None = None,
) -> TarIndex:
    """Index a tar shard's array members from its headers, in archive order (columnar).

    Reads only the headers: locally through the page cache, remotely with small
    concurrent range reads (see :func:`scan_tar`). With a ``problems`` list, bad
    samples are recorded there and left out (a damaged tar keeps the samples
    before the damage) instead of raising.

    Parameters
    ----------
    url
        Local path or fsspec URL of the tar.
    shard
        The name errors give the tar (default ``url``).
    storage_options
        fsspec options.
    max_member_bytes
        Members larger than this are refused.
    problems
        Where to collect problems instead of raising the first.
    size
        The tar's size when already known (saves a ``HEAD`` remotely).

    Returns
    -------
    TarIndex
        The samples' member byte ranges.

    Raises
    ------
    ShardCorruptError
        The file is not a readable tar, or it ends before a member's data does.
    DuplicateSampleError
        A sample key appears twice in the shard.
    MemberTooLargeError
        A member is larger than ``max_member_bytes``.

    Examples
    --------
    >>> index = index_tar("corpus/data/nasar-train-000000.tar")  # doctest: +SKIP
    >>> len(index), index.keys[0]  # doctest: +SKIP
    """
    shard = shard or url
    with ByteSource(url, storage_options, size=size) as src:
        scanned = scan_tar(src)
        total = src.size
    return _group_members(scanned, total, shard, max_member_bytes, problems)


def _group_members(
    scanned: TarMembers,
    size: int,
    shard: str,
    max_member_bytes: int,
    problems: list[SourceError] | None,
) -> TarIndex:
    if scanned.error is None:
        fast = _group_clean(scanned, size, max_member_bytes)
        if fast is not None:
            return fast

    def problem(error: SourceError) -> None:
        if problems is None:
            raise error
        problems.append(error)

    # samples: key -> [member indexes]; dict order = archive order of first members
    entries: dict[str, list[int]] = {}
    arrays: dict[str, set[str | None]] = {}
    dropped: set[str] = set()
    suffix_of: list[str] = [""] * len(scanned.names)
    last_key: str | None = None
    offsets, sizes = scanned.offsets.tolist(), scanned.sizes.tolist()
    truncated = False
    for j, (name, isfile) in enumerate(zip(scanned.names, scanned.isfile.tolist(), strict=True)):
        if not isfile:
            continue
        if "/" in name:
            key, suffix = member_key(name)
        else:
            key, _, suffix = name.partition(".")
        if not _array_suffix(suffix):
            continue  # extra members (json, txt, ...) are not arrays
        if key in dropped:
            continue
        suffix_of[j] = suffix
        array = None if suffix == "npz" else suffix[: -len(".npy")]
        if key in entries and (key != last_key or array in arrays[key]):
            # Two payloads for one key: neither can be trusted over the other.
            entries.pop(key)
            dropped.add(key)
            problem(
                DuplicateSampleError(
                    f"duplicate sample key: member {name!r} repeats it", shard=shard, key=key
                )
            )
            continue
        if sizes[j] > max_member_bytes:
            entries.pop(key, None)
            dropped.add(key)
            problem(
                MemberTooLargeError(
                    f"member {name!r} is {sizes[j]:,} bytes, over the cap of {max_member_bytes:,}",
                    shard=shard,
                    key=key,
                    hint="raise max_member_bytes if this is intended",
                )
            )
            continue
        if offsets[j] + sizes[j] > size:
            entries.pop(key, None)
            problem(
                ShardCorruptError(
                    f"truncated tar: member {name!r} needs bytes up to"
                    f" {offsets[j] + sizes[j]:,} but the file has {size:,}",
                    shard=shard,
                    key=key,
                )
            )
            truncated = True
            break
        entries.setdefault(key, []).append(j)
        arrays.setdefault(key, set()).add(array)
        last_key = key
    if scanned.error is not None and not truncated:
        problem(
            ShardCorruptError(
                f"not a readable tar archive after {len(entries)} samples ({scanned.error})",
                shard=shard,
                key=last_key,
            )
        )
    keys = list(entries)
    members = [j for key in keys for j in entries[key]]
    start = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum([len(entries[k]) for k in keys], out=start[1:])
    table: dict[str, int] = {}
    codes = np.array([table.setdefault(suffix_of[j], len(table)) for j in members], np.int16)
    idx = np.array(members, dtype=np.int64)
    return TarIndex(
        pa.array(keys, pa.string()),
        start,
        scanned.offsets[idx],
        scanned.sizes[idx],
        codes,
        tuple(table),
    )


_NAME = r"^(?P<key>[^.]*)(?:\.(?P<suffix>.*))?$"


def _group_clean(scanned: TarMembers, size: int, max_member_bytes: int) -> TarIndex | None:
    """Group a tar's members in columns when nothing is wrong (no problem to report), else None.

    Covers the common case (flat names, each sample's members adjacent, no
    duplicates, none over the cap or past the end); the others take the
    member-by-member path, which reports each problem where it happens.
    """
    if not len(scanned.names):
        return TarIndex.empty()
    names = pa.array(scanned.names, pa.string())
    if pc.any(pc.match_substring(names, "/")).as_py():
        return None
    parts = pc.extract_regex(names, _NAME)
    keys, suffix = parts.field("key"), parts.field("suffix")
    is_array = (
        pc.or_(
            pc.equal(suffix, "npz"),
            pc.and_(pc.ends_with(suffix, ".npy"), pc.equal(pc.count_substring(suffix, "."), 1)),
        ).to_numpy(zero_copy_only=False)
        & scanned.isfile
    )
    pick = np.flatnonzero(is_array)
    if not len(pick):
        return TarIndex.empty()
    offsets, sizes = scanned.offsets[pick], scanned.sizes[pick]
    if sizes.max() > max_member_bytes or (offsets + sizes).max() > size:
        return None
    take = pa.array(pick)
    keys, suffix = keys.take(take), suffix.take(take)
    m = len(pick)
    new = np.ones(m, dtype=bool)
    if m > 1:
        new[1:] = pc.not_equal(keys.slice(1), keys.slice(0, m - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(new)
    sample_keys = keys.take(pa.array(starts))
    if pc.count_distinct(sample_keys).as_py() != len(starts):
        return None  # a key in two places
    pairs = pc.binary_join_element_wise(keys, suffix, "\x00")
    if pc.count_distinct(pairs).as_py() != m:
        return None  # one array given twice
    codes = suffix.dictionary_encode()
    return TarIndex(
        sample_keys,
        np.append(starts, m).astype(np.int64),
        offsets,
        sizes,
        codes.indices.to_numpy(zero_copy_only=False).astype(np.int16),
        tuple(codes.dictionary.to_pylist()),
    )


def index_shard(
    url: str,
    *,
    shard: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    problems: list[SourceError] | None = None,
) -> list[SampleEntry]:
    """Index a tar shard's array members as :class:`SampleEntry` objects (small tars).

    :func:`index_tar` gives the same index in columnar form; the raised and
    collected problems are the same.
    """
    return index_tar(
        url,
        shard=shard,
        storage_options=storage_options,
        max_member_bytes=max_member_bytes,
        problems=problems,
    ).entries()
