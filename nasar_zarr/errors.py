"""One error hierarchy. Every subclass also inherits the matching built-in, so
callers can catch ``ValueError`` / ``FileExistsError`` as they are used to.

Where that built-in has its own constructor (the ``OSError`` family,
``MemoryError``) it comes first among the bases: dask.distributed pickles a
task's exception with tblib, which rebuilds it with the first base's
``__new__``, and any other order came back to the client as a bare
``Exception`` holding the text.
"""

from __future__ import annotations


class NasarZarrError(Exception):
    """Base class of every error nasar-zarr raises on purpose."""


class SourceError(NasarZarrError, ValueError):
    """Bad input in the source corpus, located by shard file and sample key.

    ``reason`` is the short, key-free description used in rejection reports.
    """

    def __init__(self, reason: str, *, shard: str, key: str | None = None, hint: str = ""):
        self.reason = reason
        self.shard = shard
        self.key = key
        self.hint = hint
        where = f"{shard}: sample {key!r}" if key is not None else f"{shard}"
        message = f"{where}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self):  # keep attributes across dask's process boundary
        return (_rebuild_source_error, (type(self), self.reason, self.shard, self.key, self.hint))


def _rebuild_source_error(cls, reason, shard, key, hint):
    return cls(reason, shard=shard, key=key, hint=hint)


class ShardCorruptError(SourceError):
    """A tar shard cannot be read as a tar archive (truncated, damaged)."""


class SampleDecodeError(SourceError):
    """A sample's array member cannot be decoded (corrupt npz/npy, pickled objects)."""


class SampleSchemaError(SourceError):
    """A sample's arrays do not match the dataset card (names, shapes, dtypes)."""


class DuplicateSampleError(SourceError):
    """The same sample key appears twice."""


class MemberTooLargeError(SourceError):
    """A member exceeds the size cap (a guard against decompression bombs)."""


class MetadataError(NasarZarrError, ValueError):
    """metadata.parquet or webdataset_summary.json disagree with the shards."""


class StoreError(NasarZarrError, RuntimeError):
    """The destination store cannot be used as asked."""


class StoreExistsError(FileExistsError, StoreError):
    """The destination holds a store made with different options."""


class StoreLockedError(StoreError):
    """Another conversion holds the store's lock."""


class NotACubeError(FileNotFoundError, StoreError):
    """The path does not exist, or holds no cube written by nasar-zarr."""


class CubeDamagedError(NasarZarrError, ValueError):
    """A stored object of the cube fails its CRC-32C or does not match its array's layout."""


class StorageOptionsError(NasarZarrError, TypeError):
    """A storage option the filesystem of a URL does not take."""


class EndpointError(ConnectionError, StoreError):
    """The endpoint of a URL cannot be reached, or does not answer as that kind of store."""


class NoSuchBucketError(FileNotFoundError, StoreError):
    """The bucket of an ``s3://`` URL does not exist at its endpoint."""


class ReadTooLargeError(MemoryError, NasarZarrError):
    """Loading would put more in memory than the stated limit; read lazily instead."""


class SourceChangedError(NasarZarrError, ValueError):
    """A tar the cube (or a saved plan) was made from has changed since."""


class VerificationError(NasarZarrError, AssertionError):
    """The store does not match its source or its recorded checksums."""
