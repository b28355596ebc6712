"""Small helpers to reach a store by local path or fsspec URL (zarr and plain objects)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import fsspec
import numpy as np
import zarr

from . import schema, source
from .errors import (
    EndpointError,
    NasarZarrError,
    NoSuchBucketError,
    NotACubeError,
    StorageOptionsError,
)
from .options import storage_options

INTERNAL_PREFIX = "_nasar"  # converter bookkeeping objects, ignored by Zarr readers
PROVENANCE_ATTR = "nasar_zarr"  # root attribute: the converter's provenance, a JSON string
# Bookkeeping objects under INTERNAL_PREFIX; every writer takes the paths from here.
TASKS_DIR = f"{INTERNAL_PREFIX}/tasks"  # one record per finished task
LOCK_FILE = f"{INTERNAL_PREFIX}/lock.json"
SKELETON_FILE = f"{INTERNAL_PREFIX}/skeleton.json"  # written once the skeleton is complete
REJECTIONS_FILE = f"{INTERNAL_PREFIX}/rejections.json"  # counts, by reason, first examples
REJECTIONS_PARQUET = f"{INTERNAL_PREFIX}/rejections.parquet"  # every rejected sample
APPEND_FILE = f"{INTERNAL_PREFIX}/append.json"  # intent of an append in progress
INDEX_DIR = f"{INTERNAL_PREFIX}/index"  # the source tars' indexes, one Arrow file per tar


def index_path(tar_path: str) -> str:
    """Relative path of the saved index of source tar ``tar_path`` (relative to the source)."""
    return f"{INDEX_DIR}/{tar_path.strip('/')}.arrow"


def task_record_path(index: int) -> str:
    """Relative path of the record of task (Zarr shard) ``index``."""
    return f"{TASKS_DIR}/{index:06d}.json"


def read_provenance(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The converter's provenance from a cube's root attributes (``{}`` if absent).

    It is stored as a JSON string so that every writer (netCDF, Zarr) accepts the
    attributes of a dataset opened from the cube; cubes written before 0.2 hold a dict.
    """
    value = attrs.get(PROVENANCE_ATTR)
    if value is None:
        return {}
    if isinstance(value, str):
        return json.loads(value)
    return dict(value)


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """``(fs, root_path)`` for a local path or fsspec URL."""
    fs, root = fsspec.core.url_to_fs(url, **_options(url, storage_options))
    return fs, root.rstrip("/")


def _options(url: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    return storage_options(url, options)


def zarr_store(
    url: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False
):
    """A zarr v3 store for ``url`` (LocalStore for paths, FsspecStore for URLs)."""
    if source.is_remote(url):
        options = _options(url, storage_options)
        if _protocol(url) in ("s3", "s3a"):
            # zarr reads whole objects with cat_file: s3fs would HEAD each first (its size,
            # to split big ones into concurrent ranges); one GET per object instead.
            options.setdefault("max_concurrency", 1)
        return zarr.storage.FsspecStore.from_url(url, storage_options=options, read_only=read_only)
    path = url.split("://", 1)[1] if url.startswith("file://") else url
    return zarr.storage.LocalStore(path, read_only=read_only)


def open_group(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    mode: Literal["r", "r+", "a", "w", "w-"] = "r",
    use_consolidated: bool | None = None,
    wrap=None,
) -> zarr.Group:
    """The root group of the store at ``url``.

    Raises
    ------
    NotACubeError
        (modes ``r``, ``r+``) Nothing there, or no Zarr v3 group; the message
        says so, naming the path, and says when the path is a corpus to convert.
    """
    store = zarr_store(url, storage_options, read_only=mode == "r")
    if wrap is not None:
        store = wrap(store)
    with warnings.catch_warnings(), cube_errors(url, storage_options, strict=mode in ("r", "r+")):
        warnings.simplefilter("ignore", UserWarning)
        return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=use_consolidated)


@contextlib.contextmanager
def cube_errors(
    url: str, storage_options: Mapping[str, Any] | None = None, *, strict: bool = True
) -> Iterator[None]:
    """Turn zarr's "no group here" (and a missing path) into :class:`NotACubeError`.

    Wraps the opening of a cube (:func:`open_group`, ``open_cube``), so that every
    reader (the datasets, ``CubeReader``, the catalog) says what is wrong with
    the path. ``strict=False`` lets the errors through unchanged.
    """
    try:
        yield
    except (FileNotFoundError, zarr.errors.NodeNotFoundError) as exc:
        if not strict or isinstance(exc, NotACubeError):
            raise
        raise not_a_cube(url, storage_options) from None


def not_a_cube(url: str, storage_options: Mapping[str, Any] | None = None) -> NotACubeError:
    """The error for ``url`` holding no cube: missing, a corpus to convert, or something else."""
    remote = explain_s3(url, storage_options)
    if remote is not None:
        return remote  # type: ignore[return-value]
    try:
        fs, root = filesystem(url, storage_options)
        exists = fs.exists(root)
        corpus = exists and fs.exists(f"{root}/{schema.METADATA_FILE}")
        corpus = corpus and bool(fs.glob(f"{root}/{schema.SHARD_GLOB}"))
    except OSError:
        exists = corpus = False
    if not exists:
        return NotACubeError(f"{url}: no such file or directory")
    if corpus:
        return NotACubeError(
            f"{url}: not a nasar-zarr cube but a corpus to convert (tar shards and"
            f" {schema.METADATA_FILE}); make a cube of it with `nasar-zarr convert {url} DEST`"
        )
    return NotACubeError(
        f"{url}: not a nasar-zarr cube (no Zarr v3 group with {PROVENANCE_ATTR!r}"
        " provenance); make one with `nasar-zarr convert SRC DEST`"
    )


def explain_s3(url: str, options: Mapping[str, Any] | None = None) -> NasarZarrError | None:
    """Why an ``s3://`` URL cannot be used, in one line, or None when its endpoint answers
    as S3 and its bucket exists (then the object itself is what is missing).

    Asked only after something failed: it lists the endpoint's buckets and asks
    for the URL's bucket (two requests).
    """
    if _protocol(url) not in ("s3", "s3a"):
        return None
    options = dict(options or {})
    endpoint = _endpoint(options)
    fs, root = filesystem(url, options)
    bucket = root.split("/", 1)[0]
    try:
        fs.invalidate_cache()
        fs.ls("", detail=False)  # ListBuckets: any S3 answers (or refuses)
    except PermissionError:
        pass
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is not S3 talking
        name = type(exc).__name__
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            return EndpointError(
                f"{url}: cannot connect to {endpoint} ({exc}); check endpoint_url in the"
                " storage options (--storage-options)"
            )
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return None
        return EndpointError(
            f"{url}: {endpoint} does not answer as an S3 endpoint (listing buckets: {name}:"
            f" {exc}); check endpoint_url in the storage options (--storage-options)"
        )
    try:
        found = fs.exists(bucket)
    except PermissionError:
        return None
    if not found:
        return NoSuchBucketError(
            f"{url}: no bucket {bucket!r} at {endpoint}; create it first (or fix the URL)"
        )
    return None


@contextlib.contextmanager
def remote_errors(url: str, options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Say in one line why ``url`` failed when it is an ``s3://`` URL whose endpoint is
    unreachable or not S3, or whose bucket is missing (see :func:`explain_s3`);
    other errors pass unchanged."""
    try:
        yield
    except StorageOptionsError:
        raise
    except (OSError, NasarZarrError) as exc:
        if isinstance(exc, (EndpointError, NoSuchBucketError)) or not _missing(exc):
            raise
        better = explain_s3(url, options)
        if better is None:
            raise
        raise better from None
    except Exception as exc:
        if type(exc).__name__ not in ("EndpointConnectionError", "ConnectTimeoutError"):
            raise
        endpoint = _endpoint(dict(options or {}))
        raise EndpointError(
            f"{url}: cannot connect to {endpoint} ({exc}); check endpoint_url in the"
            " storage options (--storage-options)"
        ) from None


def _endpoint(options: Mapping[str, Any]) -> str:
    client = options.get("client_kwargs") or {}
    return options.get("endpoint_url") or client.get("endpoint_url") or "the AWS S3 endpoint"


def _missing(exc: BaseException) -> bool:
    """A "not found" of any kind (where a wrong endpoint or bucket shows up)."""
    return isinstance(exc, FileNotFoundError) or "no such file or directory" in str(exc)


def array(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]``, which must be an array (zarr types it as array or group)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{name!r} in {group.store} is a group, not an array")
    return node


def read(group: zarr.Group, name: str, region: slice = slice(None)) -> np.ndarray:
    """The values of ``group[name][region]`` as a numpy array."""
    return np.asarray(array(group, name)[region])


def consolidate(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(zarr_store(url, storage_options), zarr_format=3)


def read_bytes(fs, path: str) -> bytes:
    """The whole object at ``path``, in one GET.

    s3fs's ``cat_file`` first asks for the size (a HEAD, or its listings cache,
    which can be stale and then raises FileNotFoundError for an object that
    exists); one request per object read is what this asks for instead.
    """
    if "s3" in _protocols(fs):
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def read_json(url: str, relative: str, storage_options=None, default=None):
    """The JSON object at ``relative`` in the store, read by name; ``default`` if it
    does not exist (callers for which it must exist raise their own error)."""
    fs, root = filesystem(url, storage_options)
    try:
        return json.loads(read_bytes(fs, f"{root}/{relative}"))
    except FileNotFoundError:
        return default


def write_json(url: str, relative: str, value, storage_options=None) -> None:
    fs, root = filesystem(url, storage_options)
    path = f"{root}/{relative}"
    if not source.is_remote(url):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(value, indent=1, sort_keys=True).encode())


def create_json(url: str, relative: str, value, storage_options=None) -> bool:
    """Write ``value`` only if the object does not exist yet, in one atomic step.

    Returns False (writing nothing) when it exists. Locally this is a hard link of
    a complete temporary file (exclusive like ``O_EXCL``, and readers never see a
    partial object); on S3 a conditional ``PutObject`` with ``If-None-Match: *``
    (s3fs ``mode="create"``); other fsspec filesystems get their own
    ``mode="create"`` (an exclusive open where they have one).
    """
    fs, root = filesystem(url, storage_options)
    path = f"{root}/{relative}"
    data = json.dumps(value, indent=1, sort_keys=True).encode()
    if not source.is_remote(url):
        # Not fsspec's "xb": its local writer goes through a temporary file and a move,
        # which two processes can both win (measured: 2 winners of 8 racing threads).
        # A hard link is exclusive like O_EXCL and publishes the whole content at once.
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:  # s3fs reports a failed precondition (HTTP 412) as an OSError
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise
    return True


def remove(url: str, relative: str, storage_options=None) -> None:
    """Delete one object if it exists."""
    fs, root = filesystem(url, storage_options)
    try:
        fs.rm_file(f"{root}/{relative}")
    except FileNotFoundError:
        pass


def fresh_find(fs, path: str) -> list[str]:
    """``fs.find(path)`` from the server, not from fsspec's listings cache.

    s3fs caches listings per process: after another process (a dask worker, a
    previous run) wrote under ``path``, a cached listing misses its objects, or
    lists objects that reading by name then does not find. Every listing of the
    writing side goes through here. A missing ``path`` lists nothing.
    """
    fs.invalidate_cache(path)
    try:
        return list(fs.find(path))
    except FileNotFoundError:
        return []


def list_json(url: str, relative_dir: str, storage_options=None) -> list[str]:
    """Relative paths of the JSON objects under ``relative_dir`` (empty if none)."""
    fs, root = filesystem(url, storage_options)
    found = fresh_find(fs, f"{root}/{relative_dir}")
    return sorted(p[len(root) + 1 :] for p in found if p.endswith(".json"))


def task_records(url: str, storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """Every finished task's record, in task order (listed, then each read by name)."""
    records = []
    for path in list_json(url, TASKS_DIR, storage_options):
        record = read_json(url, path, storage_options)
        if record is not None:  # deleted since the listing (append redoes a partial shard)
            records.append(record)
    return records


def finished_tasks(url: str, storage_options: Mapping[str, Any] | None = None) -> set[int]:
    """Indexes of the tasks whose record exists (their Zarr shards are complete)."""
    return {int(p.rsplit("/", 1)[1][:-5]) for p in list_json(url, TASKS_DIR, storage_options)}


def array_documents(
    url: str, names: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict]:
    """The ``zarr.json`` document of each array in ``names``, read by name.

    One GET of the root ``zarr.json`` when it holds consolidated metadata (every
    cube's skeleton does); otherwise one GET per array (cubes whose skeleton was
    written before 0.4).

    Raises
    ------
    NotACubeError
        An array is missing.
    """
    root = read_json(url, "zarr.json", storage_options) or {}
    found = dict((root.get("consolidated_metadata") or {}).get("metadata") or {})
    out = {}
    for name in names:
        doc = found.get(name) or read_json(url, f"{name}/zarr.json", storage_options)
        if doc is None:
            raise NotACubeError(f"{url}: the cube has no array {name!r} ({name}/zarr.json)")
        out[name] = doc
    return out


def chunk_key(name: str, document: Mapping[str, Any], chunk: int) -> str:
    """Store key of chunk (or shard) ``chunk`` along ``sample`` of array ``name``."""
    from zarr.core.metadata.v3 import ArrayV3Metadata

    meta = ArrayV3Metadata.from_dict(dict(document))
    return f"{name}/{meta.encode_chunk_key((chunk,) + (0,) * (len(meta.shape) - 1))}"


def encode_chunk(document: Mapping[str, Any], values: np.ndarray, start: int) -> dict[str, bytes]:
    """The stored bytes of the chunk(s) that ``values`` fill from row ``start``, keyed
    by chunk key within the array (``c/0``; no key for a chunk of fill values only,
    which Zarr does not store).

    Encoded by zarr-python itself from the array's ``zarr.json``, in memory: what
    ``array[start:start+len(values)] = values`` would write, without a request.
    """
    proto = zarr.core.buffer.default_buffer_prototype()
    doc = {**document, "attributes": {}}
    mem = zarr.storage.MemoryStore({"zarr.json": proto.buffer.from_bytes(json.dumps(doc).encode())})
    array = zarr.open_array(mem, mode="r+", zarr_format=3)
    array[start : start + len(values)] = values
    return {
        key: value.to_bytes()
        for key, value in mem._store_dict.items()  # noqa: SLF001 - the bytes Zarr wrote
        if key != "zarr.json"
    }


class ChecksumStore(zarr.storage.WrapperStore):
    """A store wrapper that records the CRC-32 of every object written through it.

    Checksums are taken from the bytes handed to the store, so recording them costs
    no read-back; ``verify`` later compares them with what the store returns.
    """

    def __init__(self, store, checksums: dict[str, int | None] | None = None) -> None:
        super().__init__(store)
        self.checksums = {} if checksums is None else checksums

    def _with_store(self, store):
        return type(self)(store, self.checksums)

    async def set(self, key: str, value) -> None:
        self.checksums[key] = zlib.crc32(value.as_numpy_array())
        await self._store.set(key, value)

    async def delete(self, key: str) -> None:
        self.checksums[key] = None  # Zarr deletes a chunk that holds only fill values
        await self._store.delete(key)
