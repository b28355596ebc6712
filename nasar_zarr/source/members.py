"""What a sample is made of: its array-bearing tar members, and the size cap on one."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20  # a sample is ~1.2 MB; 64 MiB is a generous bomb cap


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
