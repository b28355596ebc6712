"""Opening a converted cube the recommended way."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import pandas as pd
import xarray as xr

from . import metadata as meta
from . import schema, store

ATTRS_KEY = "nasar_zarr"


def open_cube(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    chunks: Mapping[str, int] | str | None = "shard",
    **kwargs: Any,
) -> xr.Dataset:
    """Open a nasar-zarr cube lazily, with dask chunks of one Zarr shard along ``sample``.

    Parameters
    ----------
    url
        Local path or fsspec URL of the store.
    storage_options
        fsspec options (e.g. ``{"endpoint_url": ...}`` for an S3-compatible server).
    chunks
        ``"shard"`` (default) gives one dask chunk per Zarr shard, which keeps a
        full-corpus reduction in the low thousands of tasks; anything else is
        passed to :func:`xarray.open_zarr`.
    **kwargs
        Passed to :func:`xarray.open_zarr`.
    """
    zstore = store.zarr_store(url, storage_options, read_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if chunks != "shard":
            return xr.open_zarr(zstore, chunks=chunks, zarr_format=3, **kwargs)
        ds = xr.open_zarr(zstore, chunks=None, zarr_format=3, **kwargs)
    shard = ds.attrs.get(ATTRS_KEY, {}).get("layout", {}).get("shard")
    n = ds.sizes[schema.SAMPLE_DIM]
    size = {schema.SAMPLE_DIM: min(shard or n, n) or 1}
    # Data variables get one dask chunk per Zarr shard; 1-D coordinates stay lazy
    # numpy-backed (one object each) so selecting by metadata builds no task graph.
    return ds.assign(
        {name: var.variable.chunk(size) for name, var in ds.data_vars.items()}
    )


def metadata_table(ds: xr.Dataset) -> pd.DataFrame:
    """The original ``metadata.parquet`` table rebuilt from the coordinates (release order)."""
    schema_text = ds.attrs[ATTRS_KEY]["metadata_schema"]
    arrow_schema = meta.schema_from_text(schema_text)
    columns = {}
    for coord in ds.coords.values():
        column = coord.attrs.get("nasar_column")
        if column is not None:
            columns[column] = (coord.values, coord.attrs)
    return meta.decode_table(columns, arrow_schema)
