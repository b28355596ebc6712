"""The only package that touches tar shards and npz/npy bytes.

A shard is indexed once from its tar headers (``index_tar``); samples are then
read by byte range (``read_index``), which works the same on local disks and
object stores and never extracts anything to disk. Array members are parsed
without copies and never unpickled: an object dtype is refused before any byte
of its payload is looked at.

One module per job, lowest first (each imports only those above it):

- :mod:`~nasar_zarr.source.members`: :class:`Member`, :class:`SampleEntry`, the
  member size cap.
- :mod:`~nasar_zarr.source.files`: bytes of one file, local or remote
  (:class:`ByteSource`, ``open_binary``, ``file_size``, ``if_match``, ``is_remote``,
  ``join``).
- :mod:`~nasar_zarr.source.tar`: tar headers (:func:`scan_tar`, :class:`TarMembers`).
- :mod:`~nasar_zarr.source.index`: members grouped into samples
  (:class:`TarIndex`, :func:`index_tar`, :func:`index_shard`, :func:`member_key`).
- :mod:`~nasar_zarr.source.deflate`: raw deflate streams and CRC-32 (:func:`inflate`,
  :data:`INFLATERS`, :data:`INFLATER`, ``crc32``).
- :mod:`~nasar_zarr.source.npz`: the zip central directory and npz/npy decoding
  (:func:`decode_npz`, :func:`decode_npy`).
- :mod:`~nasar_zarr.source.validate`: a sample against the dataset card
  (:func:`validate_sample`, :func:`nonfinite_counts`).
- :mod:`~nasar_zarr.source.samples`: samples by byte range (:func:`read_index`,
  :func:`read_samples`, :func:`iter_shard`, :func:`decode_sample`).

Everything public is re-exported here, so ``from nasar_zarr import source`` and
``source.<name>`` keep working; private helpers stay in their module.
"""

from __future__ import annotations

from .deflate import INFLATER, INFLATERS, crc32, inflate
from .files import ByteSource, file_size, if_match, is_remote, join, open_binary
from .index import TarIndex, index_shard, index_tar, member_key
from .members import DEFAULT_MAX_MEMBER_BYTES, Member, SampleEntry
from .npz import decode_npy, decode_npz
from .samples import READ_BYTES, decode_sample, iter_shard, read_index, read_samples
from .tar import TarMembers, scan_tar
from .validate import nonfinite_counts, validate_sample

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "INFLATER",
    "INFLATERS",
    "READ_BYTES",
    "ByteSource",
    "Member",
    "SampleEntry",
    "TarIndex",
    "TarMembers",
    "crc32",
    "decode_npy",
    "decode_npz",
    "decode_sample",
    "file_size",
    "if_match",
    "index_shard",
    "index_tar",
    "inflate",
    "is_remote",
    "iter_shard",
    "join",
    "member_key",
    "nonfinite_counts",
    "open_binary",
    "read_index",
    "read_samples",
    "scan_tar",
    "validate_sample",
]
