"""Intake glue, confined to this module: catalog drivers and a catalog writer.

``catalogs/nasar.yaml`` (and what :func:`write_catalog` writes) is a classic
intake YAML catalog that intake 2.0.x opens with :func:`intake.open_catalog`:

- ``nasar``: the cube, opened by :func:`nasar_zarr.open_cube` (dask chunks of
  whole Zarr shards, every variable alike, the fast local reader). The entry
  names two drivers, ``nasar_zarr.catalog.NasarZarrSource`` then ``zarr``;
  intake uses the first one it can import. :class:`NasarZarrSource` is
  intake-xarray's ``ZarrSource`` whose ``to_dask`` is ``open_cube`` and whose
  call goes back to the catalog entry (in intake-xarray 2.0.0 calling a source
  returns it unchanged, so ``cat["nasar"](url=...)`` would silently ignore
  ``url``). ``describe()`` gives the entry's description; ``read()`` loads the
  cube into memory only when its data variables hold at most
  :data:`READ_LIMIT_BYTES` (2 GiB; the full release is about 1 TB) and
  otherwise refuses, pointing at ``to_dask()``. Without nasar_zarr installed the
  plain ``zarr`` driver still opens the default store (numpy-backed, lazily).
- ``url`` and ``metadata_url`` are jinja template variables of the entries, not
  declared intake parameters: intake 2.0.x warns ("Shell command not executed")
  twice for every string parameter each time an entry is opened.
- ``nasar_metadata``: the metadata table as a pandas DataFrame, through
  :class:`NasarMetadataSource`. No parquet driver ships with intake 2.0.x
  (intake-parquet is not installed), and the cube holds the table exactly, so
  by default it is rebuilt from the cube's coordinates
  (:func:`nasar_zarr.metadata_table`); with ``metadata_url`` it reads that
  parquet file instead (e.g. the source corpus' ``metadata.parquet``), sorted
  into release order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
import zarr
from intake.source.base import DataSource, Schema
from intake_xarray.xzarr import ZarrSource

from . import schema
from .errors import ReadTooLargeError, StoreError

DEFAULT_SHARD = 512  # ConvertOptions.shard: the project's default Zarr shard size
URL_ENV = "NASAR_ZARR_URL"
# ``cat["nasar"].read()`` loads the whole cube into memory (about 1 TB at full size):
# above this many bytes of data variables it refuses and points at ``to_dask()``.
READ_LIMIT_BYTES = 2 * 2**30


class NasarZarrSource(ZarrSource):
    """intake-xarray's ``zarr`` source whose call applies user parameters.

    ``cat["nasar"](url=...)`` re-creates the source from its catalog entry with
    the new parameters (intake-xarray 2.0.0's adapter returns itself unchanged).
    """

    name = "nasar_zarr"

    def __call__(self, *args: Any, **kwargs: Any) -> ZarrSource:
        entry = getattr(self, "_entry", None)
        if entry is None or not (args or kwargs):
            return self
        if args:
            raise TypeError("catalog sources take keyword parameters only, e.g. url=...")
        return entry(**kwargs)

    get = __call__

    def __init__(
        self,
        urlpath: str,
        storage_options: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(urlpath, storage_options=storage_options, metadata=metadata, **kwargs)
        self._nasar_args = (urlpath, dict(storage_options or {}), dict(kwargs))

    def to_dask(self):
        """The cube as :func:`nasar_zarr.open_cube` opens it (lazy, dask, fast reads).

        Returns
        -------
        xarray.Dataset
            Dask chunks of whole Zarr shards, every variable chunked alike.
        """
        from .cube import open_cube

        urlpath, storage_options, kwargs = self._nasar_args
        kwargs.pop("consolidated", None)  # open_cube reads the consolidated metadata anyway
        return open_cube(urlpath, storage_options=storage_options or None, **kwargs)

    read_chunked = to_dask

    def read(self):
        """The cube loaded into memory: only a small one.

        Raises
        ------
        ReadTooLargeError
            Its data variables hold more than :data:`READ_LIMIT_BYTES` (2 GiB); use
            :meth:`to_dask` (lazy) and load a selection.
        """
        ds = self.to_dask()
        size = sum(int(v.nbytes) for v in ds.data_vars.values())
        if size > READ_LIMIT_BYTES:
            raise ReadTooLargeError(
                f"{self._nasar_args[0]}: read() would load {_size(size)} of data"
                f" variables into memory (limit {_size(READ_LIMIT_BYTES)},"
                " nasar_zarr.catalog.READ_LIMIT_BYTES); use .to_dask() for the lazy cube"
                " and load a selection"
            )
        return ds.load()

    def discover(self) -> dict[str, Any]:
        """Dimensions, variables and sizes of the cube, without reading data."""
        ds = self.to_dask()
        return {
            "dims": dict(ds.sizes),
            "data_vars": {k: [str(d) for d in v.dims] for k, v in ds.data_vars.items()},
            "coords": sorted(str(c) for c in ds.coords),
            "nbytes": sum(int(v.nbytes) for v in ds.data_vars.values()),
        }

    def describe(self) -> dict[str, Any]:
        """The catalog entry's description (intake's ``describe()``), or the source's own."""
        entry = getattr(self, "_entry", None)
        if entry is not None:
            return entry.describe()
        urlpath, storage_options, kwargs = self._nasar_args
        return {
            "name": self.name,
            "container": self.container,
            "plugin": [self.name],
            "description": "NA-SAR cube (nasar_zarr.open_cube)",
            "args": {"urlpath": urlpath, "storage_options": storage_options, **kwargs},
            "metadata": dict(getattr(self.reader, "metadata", None) or {}),
        }


def _size(n: int) -> str:
    """``n`` bytes for people: ``1.5 GiB``, ``18.0 MiB``, ``512 B``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


class NasarMetadataSource(DataSource):
    """The cube's metadata table (one row per sample, release order) as a DataFrame.

    Parameters
    ----------
    urlpath
        The cube (local path or fsspec URL); the catalog's ``url``.
    parquet_url
        Optional ``metadata.parquet`` to read instead of rebuilding the table
        from the cube's coordinates; empty or None for the cube. The catalog's
        ``metadata_url``.
    storage_options
        fsspec options for both.
    metadata
        Intake entry metadata.
    """

    name = "nasar_metadata"
    container = "dataframe"
    version = "0.1.0"
    partition_access = False

    def __init__(
        self,
        urlpath: str,
        parquet_url: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(storage_options=dict(storage_options or {}), metadata=metadata)
        self.url = urlpath
        self.metadata_url = parquet_url or None
        self._table: pd.DataFrame | None = None

    def _read_table(self) -> pd.DataFrame:
        if self._table is None:
            if self.metadata_url:
                table = pd.read_parquet(
                    self.metadata_url, storage_options=self.storage_options or None
                )
                order = [schema.SHARD_INDEX_COLUMN, schema.INDEX_IN_SHARD_COLUMN]
                table = table.sort_values(order, kind="stable").reset_index(drop=True)
            else:
                from .cube import metadata_table, open_cube

                ds = open_cube(self.url, storage_options=self.storage_options)
                table = metadata_table(ds)
            self._table = table
        return self._table

    def _get_schema(self) -> Schema:
        table = self._read_table()
        return Schema(
            dtype={c: str(t) for c, t in table.dtypes.items()},
            shape=table.shape,
            npartitions=1,
            extra_metadata={},
        )

    def _get_partition(self, i: int) -> pd.DataFrame:
        return self._read_table()

    def read(self) -> pd.DataFrame:
        """The whole table as a pandas DataFrame."""
        return self._read_table().copy()

    def to_dask(self):
        """The table as a one-partition dask DataFrame."""
        import dask
        import dask.dataframe as dd

        # Keep the table's own dtypes (dask would turn strings into string[pyarrow]).
        with dask.config.set({"dataframe.convert-string": False}):
            return dd.from_pandas(self._read_table(), npartitions=1)

    def _close(self) -> None:
        self._table = None


def store_shard_size(store_url: str, *, storage_options: Mapping[str, Any] | None = None) -> int:
    """Samples per Zarr shard of a cube, from its ``nasar_zarr`` layout attributes.

    Parameters
    ----------
    store_url
        The cube (local path or fsspec URL).
    storage_options
        fsspec options.

    Returns
    -------
    int
        The recorded shard size, else the ``sample`` chunk of the ``rtc`` array.
    """
    from .store import PROVENANCE_ATTR, open_group, read_provenance

    try:
        group = open_group(store_url, storage_options)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise StoreError(
            f"{store_url}: cannot open a Zarr v3 cube there ({exc}); pass the path or URL of a"
            " store written by `nasar-zarr convert`"
        ) from exc
    layout = read_provenance(group.attrs).get("layout", {})
    if layout.get("shard"):
        return int(layout["shard"])
    arr = group.get("rtc")
    if isinstance(arr, zarr.Array):
        return int((arr.shards or arr.chunks)[0])
    raise StoreError(
        f"{store_url}: no {PROVENANCE_ATTR!r} layout attributes and no 'rtc' array;"
        " is this a nasar-zarr cube?"
    )


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def catalog_spec(
    store_url: str,
    *,
    shard: int | None = None,
    metadata_url: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """The catalog as a dict (what :func:`write_catalog` dumps to YAML).

    ``url`` (and ``metadata_url``) are template variables, not declared intake
    parameters: intake 2.0.x warns twice for every string parameter value each
    time an entry is opened. ``cat["nasar"](url=...)`` still works.

    Parameters
    ----------
    store_url
        The default cube.
    shard
        Samples per Zarr shard, for the description only (None: not stated).
    metadata_url
        Default ``metadata_url`` of ``nasar_metadata`` (None: the cube).
    description
        Catalog description.

    Returns
    -------
    dict
        The YAML document.
    """
    url = "{{ url if url else " + json.dumps(store_url) + " }}"
    parquet = "{{ metadata_url if metadata_url else " + json.dumps(metadata_url or "") + " }}"
    chunks = f" ({shard} samples per shard)" if shard else ""
    return {
        "metadata": {
            "version": 1,
            "description": description or f"NA-SAR Zarr cube at {store_url}",
        },
        "sources": {
            "nasar": {
                "description": "The NA-SAR cube, lazy, dask chunks of whole Zarr shards"
                f"{chunks} along sample, every variable alike. Pass"
                " url=... for another cube.",
                "driver": ["nasar_zarr.catalog.NasarZarrSource", "zarr"],
                "args": {"urlpath": url},
            },
            "nasar_metadata": {
                "description": "The metadata table (one row per sample, release order),"
                " rebuilt from the cube or read from metadata_url=... .",
                "driver": "nasar_zarr.catalog.NasarMetadataSource",
                "args": {"urlpath": url, "parquet_url": parquet},
            },
        },
    }


def write_catalog(
    store_url: str,
    path: str | os.PathLike[str],
    *,
    metadata_url: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write an intake catalog pointing at a cube, with dask chunks of its shard size.

    Parameters
    ----------
    store_url
        The cube: local path (written as an absolute path) or fsspec URL.
    path
        The YAML file to write (parent directories are created).
    metadata_url
        Default ``metadata_url`` of the ``nasar_metadata`` entry (a parquet
        file); None rebuilds the table from the cube.
    storage_options
        fsspec options used to read the cube's shard size (not written to the
        catalog: pass them when opening, ``cat["nasar"](storage_options=...)``).

    Returns
    -------
    pathlib.Path
        The catalog file. ``intake.open_catalog(path)["nasar"].to_dask()``
        opens the cube; ``["nasar"](url=...)`` opens another one.
    """
    shard = store_shard_size(store_url, storage_options=storage_options)
    if not _is_url(store_url):
        local = store_url.split("://", 1)[1] if store_url.startswith("file://") else store_url
        store_url = str(Path(local).resolve())
    spec = catalog_spec(store_url, shard=shard, metadata_url=metadata_url)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Written by nasar_zarr.write_catalog; open with intake.open_catalog().\n"
        + yaml.safe_dump(spec, sort_keys=False)
    )
    return out
