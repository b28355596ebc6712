"""Opening a converted cube the recommended way."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import xarray as xr
from dask.base import tokenize as dask_tokenize
from xarray.core import indexing

from . import metadata as meta
from . import schema, store

ATTRS_KEY = store.PROVENANCE_ATTR


# Along sample: a full mean of all 8 variables is ~3 tasks per chunk and variable (read,
# partial mean, and a binary combine tree: dask splits its default split_every=16 over the
# 6 reduced axes), so 200 chunks keep it under 5,000 tasks at 1.1 M samples.
MAX_DASK_CHUNKS = 200
# Encodings that describe the source store's chunk layout; a dataset carrying them cannot be
# written elsewhere (to_zarr refuses dask chunks that straddle them), so open_cube drops them.
LAYOUT_ENCODINGS = (
    "chunks",
    "preferred_chunks",
    "shards",
    "compressors",
    "filters",
    "serializer",
    "compressor",
)
ENGINES = ("auto", "fast", "zarr")


def open_cube(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    chunks: Mapping[str, int] | int | str | None = "shards",
    engine: str = "auto",
    **kwargs: Any,
) -> xr.Dataset:
    """Open a nasar-zarr cube lazily: dask chunks of whole Zarr shards, read fast.

    Every data variable and flag has the same dask chunks along ``sample``
    (``ds.chunks`` is defined), each chunk one or several whole Zarr shards;
    every other dimension is whole. On a local store each dask task reads its
    shards through :mod:`nasar_zarr.backend` (inner chunks decoded straight
    into the task's output: ~4x zarr-python, ~2x tensorstore); a selection of a
    few samples reads only their inner chunks. Remote stores, and arrays in a
    layout that backend cannot decode, are read by zarr-python.

    Parameters
    ----------
    url
        Local path or fsspec URL of the store.
    storage_options
        fsspec options (e.g. ``{"endpoint_url": ...}`` for an S3-compatible server).
    chunks
        ``"shards"`` (default): as many whole shards per dask chunk as keep the
        chunk count along ``sample`` at most :data:`MAX_DASK_CHUNKS` (200), so a
        full-corpus reduction stays under 5,000 tasks: one shard per chunk up to
        102,400 samples (default shard 512), 11 shards (~2.9 GB of ``rtc`` per
        chunk) at the full 1.1 M. ``"shard"``: exactly one shard per chunk (smaller tasks,
        more of them). An int or ``{"sample": n}``: ``n`` samples per chunk for
        every variable. ``"large"`` is the former name of the default. None:
        no dask; lazily indexed arrays (read on ``.values``/``.load()``).
        Either way a contiguous ``isel(sample=slice(i, j))`` and a scattered
        ``isel(sample=[i, j, k])`` (or ``sel`` by key) read only the inner
        chunks of those samples: with the fast reader each dask chunk is a
        :class:`~nasar_zarr.backend.LazyRows` that dask's ``take`` narrows to
        the picked samples before reading (any other use reads the chunk as a
        numpy array). Under zarr-python (``engine="zarr"``, remote stores) dask's
        ``take`` reads each touched dask chunk whole; use ``chunks=None`` there.
    engine
        ``"auto"`` (default): the fast reader where it applies, zarr-python
        elsewhere; ``"fast"``: the fast reader or a ``ValueError``; ``"zarr"``:
        zarr-python only.
    **kwargs
        Passed to :func:`xarray.open_zarr`.

    Returns
    -------
    xarray.Dataset
        Lazy; 1-D coordinates are lazily loaded numpy (one object each), so
        selecting by metadata builds no task graph. The store's chunk-layout
        encodings are dropped (``chunks``, ``shards``, ``compressors``, ...),
        so ``to_zarr``/``to_netcdf`` of the dataset or a selection just work.

    Examples
    --------
    >>> ds = nasar_zarr.open_cube("demo-output/nasar.zarr")  # doctest: +SKIP
    >>> ds.chunks["sample"]                                   # doctest: +SKIP
    (512, 512, 176)
    >>> ds.rtc.mean().compute()                               # doctest: +SKIP
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    ds, group = _open_dataset(url, storage_options, kwargs)
    n = ds.sizes.get(schema.SAMPLE_DIM, 0)
    size = None if chunks is None else _sample_chunk(ds, n, chunks)
    fast = (
        _fast_arrays(url, [str(v) for v in ds.data_vars], engine, storage_options, group)
        if engine != "zarr"
        else {}
    )
    token = dask_tokenize(url, provenance(ds).get("created"), n, size)
    out: dict[Hashable, Any] = {}
    for name, var in ds.data_vars.items():
        variable = var.variable
        if name in fast and var.dims[:1] == (schema.SAMPLE_DIM,):
            if size is not None:
                # each chunk a LazyRows: an isel(sample=[...]) reads only those samples
                out[name] = xr.Variable(
                    var.dims,
                    _fast_dask(fast[name], size, f"open_cube-{name}-{token}"),
                    var.attrs,
                    var.encoding,
                )
                continue
            variable = xr.Variable(
                var.dims, indexing.LazilyIndexedArray(fast[name]), var.attrs, var.encoding
            )
        if size is not None:
            variable = variable.chunk(
                {schema.SAMPLE_DIM: size} if schema.SAMPLE_DIM in var.dims else {},
                name=f"open_cube-{name}-{token}",
            )
        out[name] = variable
    return ds.assign(out)


def _open_dataset(
    url: str, storage_options: Mapping[str, Any] | None, kwargs: dict[str, Any]
) -> tuple[xr.Dataset, Any]:
    """The cube as a lazy Dataset without dask, and its root zarr group, in few requests.

    One read of the consolidated metadata serves both xarray and the fast reader; the
    label coordinates are fixed by the contract (docs/CUBE.md) and taken from schema
    rather than read; time coordinates are decoded when first read (xarray's lazy
    decoding reads their first and last values at open). On a remote store opening
    costs one GET of ``zarr.json`` and one of ``sample`` (the only index read).
    """
    from xarray.backends.zarr import ZarrStore

    group = store.open_group(url, storage_options)  # NotACubeError and the S3 errors
    drop = list(kwargs.pop("drop_variables", None) or ())
    labels = [d for d in schema.LABELS if d not in drop]
    decode_times = kwargs.pop("decode_times", True)
    with warnings.catch_warnings(), store.cube_errors(url, storage_options):
        warnings.simplefilter("ignore", UserWarning)
        ds = xr.open_dataset(
            store.zarr_store(url, storage_options, read_only=True),
            engine="zarr",
            store=ZarrStore(group, mode="r"),
            chunks=None,
            drop_variables=[*drop, *labels],
            decode_times=False,
            **kwargs,
        )
    ds = _drop_layout_encodings(ds).assign_coords(
        {d: (d, schema.LABELS[d], schema.LABEL_ATTRS[d]) for d in labels if d in ds.dims}
    )
    if decode_times:
        times = [
            name
            for name, var in ds.variables.items()
            if var.ndim == 1 and " since " in str(var.attrs.get("units", ""))
        ]
        decoded = {t: _lazy_times(ds.variables[t], decode_times) for t in times}
        ds = ds.assign_coords({t: v for t, v in decoded.items() if t in ds.coords}).assign(
            {t: v for t, v in decoded.items() if t in ds.data_vars}
        )
    return ds, group


def _decode_times(raw: xr.Variable, decode_times: Any) -> xr.Variable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.decode_cf(xr.Dataset({"t": raw}), decode_times=decode_times).variables["t"]


class _LazyTimes(xr.backends.BackendArray):
    """A time coordinate decoded when read, not when opened: xarray's own lazy decoding
    reads its first and last values at open (a request each on object storage)."""

    def __init__(self, raw: xr.Variable, decode_times: Any) -> None:
        self.raw, self.decode_times = raw, decode_times
        empty = raw[:0].copy(deep=True).load()
        self.shape, self.dtype = raw.shape, _decode_times(empty, decode_times).dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read
        )

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        return np.asarray(_decode_times(self.raw[key].load(), self.decode_times).values)


def _lazy_times(raw: xr.Variable, decode_times: Any) -> xr.Variable:
    """``raw`` as the decoded time variable ``xr.decode_cf`` makes, read on first use."""
    like = _decode_times(raw[:0].copy(deep=True).load(), decode_times)
    # cached once read, as xarray caches what it opens without dask (cache=True)
    lazy = indexing.MemoryCachedArray(indexing.LazilyIndexedArray(_LazyTimes(raw, decode_times)))
    return xr.Variable(raw.dims, lazy, like.attrs, like.encoding)


def _fast_dask(array: Any, size: int, name: str) -> Any:
    """The dask array of a fast-readable variable, ``size`` samples per chunk."""
    import dask.array as da

    from .backend import ChunkSource

    source = ChunkSource(array)
    chunks = (size, *source.shape[1:])
    return da.from_array(source, chunks=chunks, name=name, meta=source.meta)


def _drop_layout_encodings(ds: xr.Dataset) -> xr.Dataset:
    for var in ds.variables.values():
        for key in LAYOUT_ENCODINGS:
            var.encoding.pop(key, None)
    return ds


def _sample_chunk(ds: xr.Dataset, n: int, chunks: Mapping[str, int] | int | str) -> int:
    """Samples per dask chunk (the same for every variable)."""
    if isinstance(chunks, Mapping):
        unknown = set(chunks) - {schema.SAMPLE_DIM}
        if unknown:
            raise ValueError(
                f"chunks may only set {schema.SAMPLE_DIM!r} (every other dimension"
                f" is whole in each chunk), got {dict(chunks)!r}"
            )
        chunks = chunks.get(schema.SAMPLE_DIM, "shards")
    widest = max(
        (int(np.prod(v.shape[1:])) * v.dtype.itemsize for v in ds.data_vars.values() if v.ndim),
        default=0,
    )
    return dask_chunk_size(n, shard_size(ds) or max(n, 1), chunks, sample_bytes=widest)


def dask_chunk_size(
    n_samples: int, shard: int, chunks: int | str = "shards", *, sample_bytes: int = 0
) -> int:
    """Samples per dask chunk that :func:`open_cube` uses for a cube.

    Parameters
    ----------
    n_samples
        Samples in the cube.
    shard
        Samples per Zarr shard.
    chunks
        ``"shards"``: whole shards per chunk, as many as fit in dask's
        ``array.chunk-size`` (128 MiB by default) of the widest variable, and at
        least enough to keep the chunk count at most :data:`MAX_DASK_CHUNKS`;
        ``"shard"``: one shard; an int: that many samples.
    sample_bytes
        Bytes of one sample of the widest variable (0: shards only).

    Returns
    -------
    int
        At most ``n_samples`` (and at least 1).

    Examples
    --------
    >>> dask_chunk_size(1_099_604, 512)  # 11 shards: 196 chunks, a full mean < 5,000 tasks
    5632
    >>> dask_chunk_size(4096, 32, sample_bytes=524_288)  # 16 MiB shards: 8 per 128 MiB
    256
    """
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        if chunks < 1:
            raise ValueError(f"chunks must be a positive number of samples, got {chunks!r}")
        return int(min(chunks, max(n_samples, 1)))
    if chunks not in ("shards", "shard", "large"):
        raise ValueError(
            f"chunks must be 'shards', 'shard', an int, {{'sample': int}} or None, got {chunks!r}"
        )
    shards = max(1, -(-n_samples // shard))
    per_chunk = 1 if chunks == "shard" else -(-shards // MAX_DASK_CHUNKS)
    if chunks != "shard" and sample_bytes > 0:
        # Small shards grouped up to dask's own chunk-size target: each task then pays
        # its scheduling and, on object storage, its first request's latency over
        # enough bytes (a 16 MiB shard per task made a remote scan latency-bound).
        import dask

        target = dask.utils.parse_bytes(dask.config.get("array.chunk-size"))
        per_chunk = max(per_chunk, min(shards, target // (shard * sample_bytes)))
    return int(min(per_chunk * shard, max(n_samples, 1)))


def shard_size(ds: xr.Dataset) -> int | None:
    """Samples per Zarr shard of the cube ``ds`` was opened from (None if unknown).

    Parameters
    ----------
    ds
        A dataset opened from a cube.

    Returns
    -------
    int or None
        The ``layout.shard`` recorded in the provenance attribute.
    """
    shard = provenance(ds).get("layout", {}).get("shard")
    return int(shard) if shard else None


def _fast_arrays(
    url: str,
    names: list[str],
    engine: str,
    storage_options: Mapping[str, Any] | None = None,
    group: Any = None,
) -> dict[str, Any]:
    """The :class:`~nasar_zarr.backend.FastBackendArray` of each variable it can read,
    local or remote (``group``: the cube's root group, when it is open already)."""
    from . import backend
    from .ranges import Location

    location = Location.of(url, storage_options)
    if group is None:
        group = store.open_group(url, storage_options)
    out = {}
    for name in names:
        node = backend._array(group, name)
        array = backend.fast_array(node, location.path(name), location)
        if array is None and engine == "fast":
            raise ValueError(
                f"{url}: variable {name!r} is not in a layout the fast reader"
                " decodes; use engine='auto' or 'zarr'"
            )
        if array is not None:
            out[name] = array
    return out


def provenance(ds: xr.Dataset) -> dict[str, Any]:
    """The converter's provenance recorded in the cube (layout, source tars, version, ...).

    Parameters
    ----------
    ds
        A dataset opened from a nasar-zarr cube (``open_cube``, the catalog, ``xr.open_zarr``).

    Returns
    -------
    dict
        The parsed ``nasar_zarr`` root attribute (a JSON string in the store); ``{}``
        for a dataset that does not come from a cube.

    Examples
    --------
    >>> nasar_zarr.cube.provenance(ds)["layout"]  # doctest: +SKIP
    {'inner_chunk': 2, 'shard': 512, 'codec': 'blosc-lz4', 'clevel': 5}
    """
    return store.read_provenance(ds.attrs)


def metadata_table(ds: xr.Dataset) -> pd.DataFrame:
    """The original ``metadata.parquet`` table rebuilt from the coordinates (release order)."""
    schema_text = provenance(ds)["metadata_schema"]
    arrow_schema = meta.schema_from_text(schema_text)
    columns = {}
    for coord in ds.coords.values():
        column = coord.attrs.get("nasar_column")
        if column is not None:
            columns[column] = (coord.values, coord.attrs)
    return meta.decode_table(columns, arrow_schema)


def metadata_differences(
    ds: xr.Dataset, metadata: Any, *, rows: int | None = None
) -> list[tuple[str, str]]:
    """``(column, problem)`` for each column of ``metadata`` the cube does not hold exactly.

    ``metadata`` is a ``pyarrow.Table`` or :class:`nasar_zarr.corpus.MetadataColumns`
    (the release's ``metadata.parquet`` in release order); with ``rows``, only its
    first ``rows`` rows are compared (the cube's, before an append). One column at
    a time, so a million-sample cube is compared without holding either table whole.
    """
    recorded = meta.schema_from_text(provenance(ds)["metadata_schema"])
    coords = {
        c.attrs["nasar_column"]: name for name, c in ds.coords.items() if "nasar_column" in c.attrs
    }
    found = []
    for field in metadata.schema:
        if field.name not in coords:
            found.append((field.name, "metadata column missing from the cube"))
            continue
        stored = ds[coords[field.name]]
        type_ = recorded.field(field.name).type if field.name in recorded.names else field.type
        ours = meta.decode_column(stored.values, stored.attrs, type_)
        theirs = metadata.column(field.name)
        theirs = theirs if rows is None else theirs.slice(0, rows)
        if not _same_values(ours, theirs):
            found.append((field.name, "metadata coordinate differs from metadata.parquet"))
    return found


def _same_values(a: Any, b: Any) -> bool:
    """Arrow arrays with the same type and values; NaN equals NaN, null equals null."""
    a = a.combine_chunks() if hasattr(a, "combine_chunks") else a
    b = b.combine_chunks() if hasattr(b, "combine_chunks") else b
    if a.type != b.type or len(a) != len(b):
        return False
    if pa.types.is_dictionary(a.type):  # the same labels, whatever the dictionaries' order
        return _same_values(a.dictionary_decode(), b.dictionary_decode())
    if pa.types.is_floating(a.type):
        return a.is_null().equals(b.is_null()) and np.array_equal(
            a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False), equal_nan=True
        )
    if pa.types.is_nested(a.type):  # lists from JSON text: floats inside may be NaN
        return bool(a.to_pandas().equals(b.to_pandas()))
    return bool(a.equals(b))
