"""Synthetic NA-SAR corpora for tests, demos and benchmarks (shipped with the package)."""

from .corpus import (
    CorpusInfo,
    encode_npy,
    encode_npz,
    make_batch,
    make_metadata,
    sample_members,
    write_corpus,
    write_metadata,
    write_tar,
)

__all__ = [
    "CorpusInfo",
    "encode_npy",
    "encode_npz",
    "make_batch",
    "make_metadata",
    "sample_members",
    "write_corpus",
    "write_metadata",
    "write_tar",
]
