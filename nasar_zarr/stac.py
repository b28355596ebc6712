"""STAC for a cube: a Collection describing the Zarr store, and one Item per sample.

``write_stac(cube_url, out_dir)`` writes

- ``collection.json``: a STAC Collection (pystac) with one data asset for the
  Zarr store (``application/vnd.zarr``, zarr extension fields, the datacube
  extension's ``cube:dimensions``/``cube:variables``), the SAR fields that hold
  for the whole corpus as summaries (sar extension), summaries of the
  categorical metadata, the spatial and temporal extent of the samples, and an
  asset pointing to the items;
- ``items.parquet``: one STAC Item per written sample as stac-geoparquet:
  ``id`` = sample key, geometry = footprint, ``datetime`` = prime acquisition,
  ``start_datetime``/``end_datetime`` spanning the pair, every other metadata
  column as a ``nasar:<column>`` property, and ``nasar:index``, the sample's
  position in the cube (``ds.isel(sample=item.properties["nasar:index"])``).

Which columns hold the geometry and the times is what :mod:`nasar_zarr.columns`
recognised (the same recognition as ``convert``). Fields whose column is absent
stay empty, see :data:`FIELDS_BY_ROLE`.

pystac, stac-geoparquet and shapely are optional: ``pip install 'nasar-zarr[stac]'``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import xarray as xr

from . import schema
from .columns import ColumnRoles, dataset_roles
from .errors import MetadataError

if TYPE_CHECKING:
    import pystac

COLLECTION_FILE = "collection.json"
ITEMS_FILE = "items.parquet"
ZARR_MEDIA_TYPE = "application/vnd.zarr"  # what xpystac and the zarr extension expect
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
PREFIX = "nasar:"
INDEX_PROPERTY = "nasar:index"

SCHEMAS: dict[str, str] = {
    "cube": "https://stac-extensions.github.io/datacube/v2.2.0/schema.json",
    "sar": "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
    "sat": "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "zarr": "https://stac-extensions.github.io/zarr/v1.0.0/schema.json",
    "xarray": "https://stac-extensions.github.io/xarray-assets/v1.0.0/schema.json",
}

# OPERA RTC-S1 is made from Sentinel-1 Interferometric Wide swath acquisitions
# (C band, 5.405 GHz). Over North America Sentinel-1 acquires VV+VH; the cube
# labels the channels only "co"/"cross", so pass ``polarizations`` for another mode.
SAR_FIELDS: dict[str, Any] = {
    "sar:instrument_mode": "IW",
    "sar:frequency_band": "C",
    "sar:center_frequency": 5.405,
    "sar:product_type": "RTC",
}
DEFAULT_POLARIZATIONS: tuple[str, ...] = ("VV", "VH")
OPERA_RTC_S1_DOI = "https://doi.org/10.5067/SNWG/OPERA_L2_RTC-S1_V1"
NASAR_RELEASE_URL = "https://huggingface.co/datasets/GFM-Bench/NA-SAR"

# What stays empty when a role's column is absent (documented in the README).
FIELDS_BY_ROLE: dict[str, str] = {
    "footprint": "item geometry falls back to the centre point; collection bbox from centres",
    "lat": "proj:centroid (and, without a footprint too, geometry, bbox and spatial extent)",
    "lon": "proj:centroid (and, without a footprint too, geometry, bbox and spatial extent)",
    "time": "required: items cannot be written without an acquisition time",
    "secondary_time": "start_datetime/end_datetime (only datetime is set)",
    "orbit_direction": "sat:orbit_state and its summary",
    "track": "sat:relative_orbit and its summary",
    "epsg": "proj:code and its summary",
    "granule_id": "the derived_from link to OPERA RTC-S1",
}
_SAT_STATES = ("ascending", "descending", "geostationary")


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"nasar_zarr.stac needs {module.split('.')[0]}: pip install 'nasar-zarr[stac]'"
        ) from exc


# ---------------------------------------------------------------------------- roles


# ---------------------------------------------------------------------------- values


def _iso(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    stamp = pd.Timestamp(value)
    if stamp is pd.NaT:
        return None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_value(value: Any) -> Any:
    """A metadata value as JSON (timestamps as ISO 8601 UTC, NaN as null)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime | pd.Timestamp | np.datetime64):
        return _iso(value)
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dt.date | dt.time | dt.timedelta):
        return str(value)
    return value


def _geometries(frame: pd.DataFrame, roles: ColumnRoles) -> list[dict | None]:
    """GeoJSON geometry per row: the footprint, else the centre point, else None."""
    shapely = _need("shapely")
    n = len(frame)
    out: list[dict | None] = [None] * n
    if roles.footprint is not None:
        wkt = frame[roles.footprint].astype(object).where(frame[roles.footprint].notna(), None)
        try:
            shapes = shapely.from_wkt(np.asarray(wkt, dtype=object), on_invalid="raise")
        except Exception as exc:  # shapely.errors.GEOSException and friends
            raise MetadataError(
                f"footprint column {roles.footprint!r} holds text that is not WKT: {exc}"
            ) from None
        for i, shape in enumerate(shapes):
            if shape is not None and not shape.is_empty:
                out[i] = json.loads(shapely.to_geojson(shape))
    if roles.lat is not None and roles.lon is not None:
        lat = pd.to_numeric(frame[roles.lat], errors="coerce").to_numpy(dtype=float)
        lon = pd.to_numeric(frame[roles.lon], errors="coerce").to_numpy(dtype=float)
        for i in range(n):
            if out[i] is None and np.isfinite(lat[i]) and np.isfinite(lon[i]):
                out[i] = {"type": "Point", "coordinates": [float(lon[i]), float(lat[i])]}
    return out


def _bounds(geometry: Mapping[str, Any]) -> list[float]:
    shapely = _need("shapely")
    return [float(b) for b in shapely.bounds(shapely.from_geojson(json.dumps(geometry)))]


# ---------------------------------------------------------------------------- items


def _written(ds: xr.Dataset) -> np.ndarray:
    if schema.STATUS not in ds:
        return np.arange(ds.sizes[schema.SAMPLE_DIM])
    return np.flatnonzero(np.asarray(ds[schema.STATUS].values) == schema.STATUS_WRITTEN)


def _time_bounds(prime: str | None, secondary: str | None) -> dict[str, str]:
    if prime is None or secondary is None:
        return {}
    return {"start_datetime": min(prime, secondary), "end_datetime": max(prime, secondary)}


def _orbit_state(value: Any) -> str | None:
    text = str(value).strip().lower() if value is not None else ""
    aliases = {"asc": "ascending", "a": "ascending", "desc": "descending", "d": "descending"}
    text = aliases.get(text, text)
    return text if text in _SAT_STATES else None


def _int_or_none(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number == int(number) else None


def _role_fields(record: Mapping[Any, Any], roles: ColumnRoles) -> dict[str, Any]:
    """The standard (sat:, proj:) fields a sample's metadata fills."""
    out: dict[str, Any] = {}
    if roles.orbit_direction is not None:
        state = _orbit_state(record.get(roles.orbit_direction))
        if state is not None:
            out["sat:orbit_state"] = state
    if roles.track is not None:
        track = _int_or_none(record.get(roles.track))
        if track is not None and track >= 0:
            out["sat:relative_orbit"] = track
    if roles.epsg is not None:
        code = _int_or_none(record.get(roles.epsg))
        if code is not None and code > 0:
            out["proj:code"] = f"EPSG:{code}"
    if roles.lat is not None and roles.lon is not None:
        lat, lon = _json_value(record.get(roles.lat)), _json_value(record.get(roles.lon))
        if isinstance(lat, float | int) and isinstance(lon, float | int):
            out["proj:centroid"] = {"lat": float(lat), "lon": float(lon)}
    return out


def _extensions_for(keys: Sequence[str]) -> list[str]:
    prefixes = {k.split(":", 1)[0] for k in keys if ":" in k}
    return [SCHEMAS[p] for p in sorted(prefixes) if p in SCHEMAS]


def iter_items(
    ds: xr.Dataset,
    *,
    roles: ColumnRoles | None = None,
    collection_id: str = "nasar",
    batch_size: int = 8192,
) -> Iterator[dict[str, Any]]:
    """One STAC Item (as a dict) per written sample, in cube order.

    Parameters
    ----------
    ds
        A cube.
    roles
        Geometry and time columns; by default :func:`dataset_roles`.
    collection_id
        The ``collection`` of every item.
    batch_size
        Rows turned into Python objects at a time.

    Yields
    ------
    dict
        A STAC Item: ``id`` = sample key; geometry = footprint (or centre point);
        ``datetime`` = prime acquisition, ``start_datetime``/``end_datetime`` the
        pair; ``nasar:index`` = position along ``sample``; every other metadata
        column as ``nasar:<column>``; ``sat:orbit_state``, ``sat:relative_orbit``,
        ``proj:code`` and ``proj:centroid`` where the columns exist.

    Raises
    ------
    MetadataError
        No acquisition time column (pass ``time=`` to :func:`columns.recognise`).

    Examples
    --------
    >>> next(iter_items(ds))["properties"]["nasar:index"]  # doctest: +SKIP
    0
    """
    from .cube import metadata_table

    roles = dataset_roles(ds) if roles is None else roles
    if roles.time is None:
        raise MetadataError(
            "no acquisition time column was recognised in the metadata, and a STAC item"
            " needs a datetime; name it explicitly (columns.recognise(..., time=NAME))"
        )
    frame = metadata_table(ds)
    keep = _written(ds)
    frame = frame.iloc[keep].reset_index(drop=True)
    keys = np.asarray(ds[schema.SAMPLE_DIM].values)[keep]
    skip = {schema.KEY_COLUMN, roles.time, roles.secondary_time, roles.footprint}
    for start in range(0, len(frame), batch_size):  # bounded memory: Python objects per batch
        part = frame.iloc[start : start + batch_size]
        geometries = _geometries(part, roles)
        records = pa.Table.from_pandas(part, preserve_index=False).to_pylist()
        rows = zip(keep[start:], keys[start:], geometries, records, strict=False)
        yield from _items(rows, roles, roles.time, skip, collection_id)


def _items(
    rows: Iterator[tuple[Any, Any, dict | None, dict[str, Any]]],
    roles: ColumnRoles,
    time: str,
    skip: set[str | None],
    collection_id: str,
) -> Iterator[dict[str, Any]]:
    for index, key, geometry, record in rows:
        prime = _iso(record[time])
        if prime is None:
            raise MetadataError(f"sample {key!r} has no {time!r} (acquisition time)")
        secondary = _iso(record[roles.secondary_time]) if roles.secondary_time else None
        properties: dict[str, Any] = {
            "datetime": prime,
            **_time_bounds(prime, secondary),
            INDEX_PROPERTY: int(index),
        }
        properties.update(_role_fields(record, roles))
        properties.update(
            {
                PREFIX + name: _json_value(value)
                for name, value in record.items()
                if name not in skip
            }
        )
        item: dict[str, Any] = {
            "type": "Feature",
            "stac_version": "1.1.0",
            "stac_extensions": _extensions_for(list(properties)),
            "id": str(key),
            "collection": collection_id,
            "geometry": geometry,
            "properties": properties,
            "links": [
                {"rel": "collection", "href": f"./{COLLECTION_FILE}", "type": "application/json"}
            ],
            "assets": {},
        }
        if geometry is not None:
            item["bbox"] = _bounds(geometry)
        yield item


# ---------------------------------------------------------------------------- collection


def _dimensions(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    n = ds.sizes[schema.SAMPLE_DIM]
    types = {
        "view": "view",
        "time": "acquisition",
        "pol": "polarization",
        "component": "component",
        "y": "pixel",
        "x": "pixel",
    }
    dims: dict[str, dict[str, Any]] = {
        schema.SAMPLE_DIM: {
            "type": "sample",
            "extent": [0, max(n - 1, 0)],
            "step": 1,
            "description": "sample position in release order; the coordinate 'sample'"
            " holds the WebDataset sample key",
        },
    }
    for dim, values in schema.LABELS.items():
        entry: dict[str, Any] = {
            "type": types[dim],
            "description": schema.LABEL_ATTRS[dim]["long_name"],
        }
        if dim in ("y", "x"):
            entry.update(extent=[int(values[0]), int(values[-1])], step=1, unit="1")
        else:
            entry["values"] = [v.item() if hasattr(v, "item") else str(v) for v in values]
        dims[dim] = entry
    return dims


def _variables(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        entry: dict[str, Any] = {
            "dimensions": [str(d) for d in var.dims],
            "type": "data" if name in schema.VARIABLES else "auxiliary",
            "description": str(var.attrs.get("description") or var.attrs.get("long_name", "")),
        }
        units = var.attrs.get("units")
        if units:
            entry["unit"] = str(units)
        out[str(name)] = entry
    for name, coord in ds.coords.items():
        if "nasar_column" not in coord.attrs:
            continue
        entry = {
            "dimensions": [str(d) for d in coord.dims],
            "type": "auxiliary",
            "description": f"metadata column {coord.attrs['nasar_column']!r}:"
            f" {coord.attrs.get('long_name', '')}",
        }
        if coord.attrs.get("units"):
            entry["unit"] = str(coord.attrs["units"])
        out[str(name)] = entry
    return out


def _extent(frame: pd.DataFrame, roles: ColumnRoles) -> tuple[list[float], list[str | None]]:
    """(bbox, [start, end]) over the written samples."""
    shapely = _need("shapely")
    lows, highs = [], []
    for start in range(0, len(frame), 8192):
        geometries = [g for g in _geometries(frame.iloc[start : start + 8192], roles) if g]
        if geometries:
            bounds = shapely.bounds(shapely.from_geojson([json.dumps(g) for g in geometries]))
            lows.append(bounds[:, :2].min(axis=0))
            highs.append(bounds[:, 2:].max(axis=0))
    if lows:  # the bbox of the union of the geometries
        low, high = np.min(lows, axis=0), np.max(highs, axis=0)
        bbox = [float(low[0]), float(low[1]), float(high[0]), float(high[1])]
    else:
        bbox = [-180.0, -90.0, 180.0, 90.0]
    times: list[pd.Timestamp] = []
    for role in (roles.time, roles.secondary_time):
        if role is not None:
            stamps = pd.to_datetime(frame[role], utc=True).dropna()
            times.extend([stamps.min(), stamps.max()] if len(stamps) else [])
    interval: list[str | None] = [_iso(min(times)), _iso(max(times))] if times else [None, None]
    return bbox, interval


def _summaries(
    frame: pd.DataFrame, roles: ColumnRoles, polarizations: Sequence[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {"constellation": ["sentinel-1"]}
    # Numbers are summarised as ranges, the rest as lists (what pystac reads them as).
    out.update(
        {
            k: {"minimum": v, "maximum": v} if isinstance(v, float) else [v]
            for k, v in SAR_FIELDS.items()
        }
    )
    out["sar:polarizations"] = list(polarizations)
    # Categorical columns have few distinct values: map those, not the rows.
    fields = [
        _role_fields({column: value}, roles)
        for column in (roles.orbit_direction, roles.track, roles.epsg)
        if column is not None
        for value in pd.unique(frame[column].astype(object))
    ]
    states = sorted({f["sat:orbit_state"] for f in fields if "sat:orbit_state" in f})
    if states:
        out["sat:orbit_state"] = states
    tracks = [f["sat:relative_orbit"] for f in fields if "sat:relative_orbit" in f]
    if tracks:
        out["sat:relative_orbit"] = {"minimum": min(tracks), "maximum": max(tracks)}
    codes = sorted(
        {f["proj:code"] for f in fields if "proj:code" in f}, key=lambda c: int(c.split(":")[1])
    )
    if codes:
        out["proj:code"] = codes
    for role in ("co_pol", "cross_pol"):
        column = getattr(roles, role)
        if column is not None:
            values = {_json_value(v) for v in pd.unique(frame[column].astype(object))}
            out[PREFIX + column] = sorted(v for v in values if v is not None)
    return out


def build_collection(
    ds: xr.Dataset,
    *,
    href: str,
    roles: ColumnRoles | None = None,
    collection_id: str = "nasar",
    license: str | None = None,
    polarizations: Sequence[str] = DEFAULT_POLARIZATIONS,
    items_href: str | None = f"./{ITEMS_FILE}",
) -> pystac.Collection:
    """The STAC Collection of a cube.

    Parameters
    ----------
    ds
        A cube (``open_cube``).
    href
        Where the Zarr asset points (the store URL readers will open).
    roles
        Geometry, time and categorical columns; by default :func:`dataset_roles`.
    collection_id
        The collection's id.
    license
        SPDX identifier; by default the cube's ``license`` attribute, else ``"other"``
        (the dataset card states none).
    polarizations
        ``sar:polarizations`` of the corpus (co-pol first).
    items_href
        The items file, as a ``stac-items`` asset; None for none.

    Returns
    -------
    pystac.Collection
        ``stac_extensions`` lists exactly the extensions whose fields it uses.

    Examples
    --------
    >>> build_collection(ds, href="s3://bucket/nasar.zarr").extent.temporal  # doctest: +SKIP
    """
    pystac = _need("pystac")
    from .cube import metadata_table, provenance

    roles = dataset_roles(ds) if roles is None else roles
    info = provenance(ds)
    frame = metadata_table(ds).iloc[_written(ds)].reset_index(drop=True)
    bbox, interval = _extent(frame, roles)
    title = str(ds.attrs.get("title") or "NA-SAR Zarr cube")
    n = ds.sizes[schema.SAMPLE_DIM]
    description = (
        f"{title}. {len(frame):,} of {n:,} samples written: 128 x 128 patches of"
        " radiometrically terrain corrected Sentinel-1 backscatter (two views, prime and"
        " secondary acquisitions, co- and cross-pol), interferometric phase and coherence,"
        " incidence angle, DEM and slope, from NASA OPERA products over North America, with"
        " every metadata.parquet column as a per-sample coordinate."
        f" {ds.attrs.get('source', '')}".rstrip()
    )
    temporal = [[None if t is None else pd.Timestamp(t).to_pydatetime() for t in interval]]
    collection = pystac.Collection(
        id=collection_id,
        title=title,
        description=description,
        license=license or str(ds.attrs.get("license") or info.get("license") or "other"),
        extent=pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent(temporal)),
        providers=[
            pystac.Provider(
                "NASA JPL OPERA project",
                roles=[pystac.ProviderRole.PRODUCER],
                url="https://www.jpl.nasa.gov/go/opera",
            ),
            pystac.Provider(
                "nasar-zarr",
                roles=[pystac.ProviderRole.PROCESSOR],
                description=str(ds.attrs.get("history", "")),
            ),
        ],
        summaries=pystac.Summaries(_summaries(frame, roles, polarizations)),
    )
    collection.clear_links()
    granules = frame[roles.granule_id].astype(str) if roles.granule_id else pd.Series([], dtype=str)
    if granules.str.startswith("OPERA_L2_RTC-S1").any():
        collection.add_link(
            pystac.Link(
                "derived_from",
                OPERA_RTC_S1_DOI,
                media_type="text/html",
                title="OPERA L2 RTC-S1 (source products)",
            )
        )
    collection.add_link(
        pystac.Link(
            "cite-as", NASAR_RELEASE_URL, media_type="text/html", title="NA-SAR WebDataset release"
        )
    )
    open_kwargs = xarray_open_kwargs(ds)
    asset = pystac.Asset(
        href=href,
        title="NA-SAR cube (Zarr v3)",
        description=f"Open with xarray.open_zarr(href, chunks={open_kwargs['chunks']!r})"
        " (dask chunks of one shard: xarray:open_kwargs) or nasar_zarr.open_cube(href);"
        " dimensions and variables in cube:dimensions / cube:variables.",
        media_type=ZARR_MEDIA_TYPE,
        roles=["data"],
        extra_fields={
            "zarr:zarr_format": 3,
            "zarr:consolidated": True,
            "zarr:node_type": "group",
            "xarray:open_kwargs": open_kwargs,
            "cube:dimensions": _dimensions(ds),
            "cube:variables": _variables(ds),
        },
    )
    collection.add_asset("zarr", asset)
    if items_href is not None:
        collection.add_asset(
            "geoparquet-items",
            pystac.Asset(
                href=items_href,
                title="one STAC item per written sample (stac-geoparquet)",
                media_type=PARQUET_MEDIA_TYPE,
                roles=["stac-items"],
            ),
        )
    used = [
        *collection.summaries.lists,
        *collection.summaries.ranges,
        *collection.summaries.schemas,
    ]
    for a in collection.assets.values():
        used.extend(a.extra_fields)
    collection.stac_extensions = _extensions_for(used)
    return collection


def xarray_open_kwargs(ds: xr.Dataset) -> dict[str, Any]:
    """The arguments of :func:`xarray.open_dataset` that open the cube with dask chunks of
    one Zarr shard along ``sample`` (every variable and flag alike).

    Without them plain xarray (and xpystac, intake's zarr driver) makes one dask chunk
    per inner chunk: 2 samples, ~550,000 chunks per variable at full size.

    Parameters
    ----------
    ds
        A cube (``open_cube``): its shard size comes from the provenance.

    Returns
    -------
    dict
        ``{"engine": "zarr", "chunks": {"sample": shard}, "consolidated": True,
        "zarr_format": 3}``, as the ``xarray:open_kwargs`` of the STAC asset.

    Examples
    --------
    >>> xr.open_dataset(url, **xarray_open_kwargs(ds)).chunks["sample"][:2]  # doctest: +SKIP
    (512, 512)
    """
    from .cube import shard_size

    shard = shard_size(ds) or max(int(ds.sizes.get(schema.SAMPLE_DIM, 1)), 1)
    return {
        "engine": "zarr",
        "chunks": {schema.SAMPLE_DIM: shard},
        "consolidated": True,
        "zarr_format": 3,
    }


# ---------------------------------------------------------------------------- files


@dataclass(frozen=True)
class StacOutput:
    """What :func:`write_stac` wrote."""

    collection: str
    items: str
    n_items: int
    stac_extensions: tuple[str, ...]
    empty: tuple[str, ...]  # fields left empty because their column is absent

    def __str__(self) -> str:
        text = f"wrote {self.collection} and {self.items} ({self.n_items:,} items)"
        if self.empty:
            text += "; empty: " + "; ".join(self.empty)
        return text


def empty_fields(roles: ColumnRoles) -> tuple[str, ...]:
    """Which STAC fields stay empty because a role's column is absent.

    Parameters
    ----------
    roles
        The recognised columns.

    Returns
    -------
    tuple of str
        ``"<role>: <fields>"`` for each absent role in :data:`FIELDS_BY_ROLE`.

    Examples
    --------
    >>> empty_fields(ColumnRoles(time="t"))[0]
    'footprint: item geometry falls back to the centre point; collection bbox from centres'
    """
    found = roles.as_dict()
    return tuple(f"{role}: {text}" for role, text in FIELDS_BY_ROLE.items() if role not in found)


def write_stac(
    url: str,
    out_dir: str,
    *,
    href: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    roles: ColumnRoles | None = None,
    collection_id: str = "nasar",
    license: str | None = None,
    polarizations: Sequence[str] = DEFAULT_POLARIZATIONS,
    chunk_size: int = 8192,
) -> StacOutput:
    """Write ``out_dir/collection.json`` and ``out_dir/items.parquet`` for a cube.

    Parameters
    ----------
    url
        The cube (local path or fsspec URL).
    out_dir
        Local directory to write into (created if missing).
    href
        The store URL the Zarr asset points to; default ``url`` (a local path made
        absolute).
    storage_options
        fsspec options to open the cube.
    roles
        Geometry and time columns; by default what the converter recorded or recognised.
    collection_id, license, polarizations
        See :func:`build_collection`.
    chunk_size
        Items per Arrow batch (memory stays bounded by a batch).

    Returns
    -------
    StacOutput
        Paths, item count, extensions, and the fields left empty.

    Examples
    --------
    >>> print(write_stac("demo-output/nasar.zarr", "demo-output/stac"))  # doctest: +SKIP
    wrote demo-output/stac/collection.json and demo-output/stac/items.parquet (120 items)
    """
    sga = _need("stac_geoparquet.arrow")
    from .cube import open_cube

    ds = open_cube(url, storage_options=storage_options)
    roles = dataset_roles(ds) if roles is None else roles
    if href is None:
        href = os.path.abspath(url) if "://" not in url else url
    os.makedirs(out_dir, exist_ok=True)
    collection = build_collection(
        ds,
        href=href,
        roles=roles,
        collection_id=collection_id,
        license=license,
        polarizations=polarizations,
    )
    collection_dict = collection.to_dict(include_self_link=False, transform_hrefs=False)
    collection_path = os.path.join(out_dir, COLLECTION_FILE)
    items_path = os.path.join(out_dir, ITEMS_FILE)
    count = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal count
        for item in iter_items(ds, roles=roles, collection_id=collection_id):
            count += 1
            yield item

    if _written(ds).size == 0:
        raise MetadataError(f"{url}: the cube has no written sample to describe")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        reader = sga.parse_stac_items_to_arrow(
            counted(), chunk_size=chunk_size, schema="ChunksToDisk", tmpdir=tmp
        )
        sga.to_parquet(reader, items_path, collections={collection_id: collection_dict})
    with open(collection_path, "w") as f:
        json.dump(collection_dict, f, indent=2)
    return StacOutput(
        collection_path, items_path, count, tuple(collection.stac_extensions), empty_fields(roles)
    )


def read_items(path: str) -> list[pystac.Item]:
    """The items of an ``items.parquet`` as pystac Items.

    Parameters
    ----------
    path
        An ``items.parquet`` written by :func:`write_stac`.

    Returns
    -------
    list of pystac.Item

    Examples
    --------
    >>> read_items("stac/items.parquet")[0].id  # doctest: +SKIP
    'nasar_000000000'
    """
    pystac = _need("pystac")
    sga = _need("stac_geoparquet.arrow")
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [pystac.Item.from_dict(d) for d in sga.stac_table_to_items(table)]


def search_items(
    path: str,
    *,
    bbox: Sequence[float] | None = None,
    time: Sequence[Any] | None = None,
) -> pa.Table:
    """Filter ``items.parquet`` with pyarrow, by the rules of ``ds.nasar.select``.

    Parameters
    ----------
    path
        An ``items.parquet`` written by :func:`write_stac`.
    bbox
        ``(lon_min, lat_min, lon_max, lat_max)``, inclusive, on the patch centre
        (``proj:centroid``); ``lon_min > lon_max`` crosses the antimeridian. Items
        without a centroid are matched on their bbox intersecting it.
    time
        ``(start, end)``, inclusive, on ``datetime`` (the prime acquisition, UTC);
        either may be None.

    Returns
    -------
    pyarrow.Table
        The matching rows, in cube order; ``nasar:index`` joins back to
        ``ds.isel(sample=...)``.

    Examples
    --------
    >>> hits = search_items("stac/items.parquet", bbox=(-125, 30, -100, 50))  # doctest: +SKIP
    >>> ds.isel(sample=hits["nasar:index"].to_numpy())  # doctest: +SKIP
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    keep = pa.array(np.ones(table.num_rows, dtype=bool))
    if bbox is not None:
        try:
            w, s, e, n = (float(b) for b in bbox)
        except (TypeError, ValueError):
            raise ValueError(
                f"bbox must be (lon_min, lat_min, lon_max, lat_max), got {bbox!r}"
            ) from None
        if "proj:centroid" in table.column_names:
            centroid = table["proj:centroid"].combine_chunks()
            lon, lat = centroid.field("lon"), centroid.field("lat")
            in_lon = (
                pc.and_(pc.greater_equal(lon, w), pc.less_equal(lon, e))
                if w <= e
                else pc.or_(pc.greater_equal(lon, w), pc.less_equal(lon, e))
            )
            inside = pc.and_(in_lon, pc.and_(pc.greater_equal(lat, s), pc.less_equal(lat, n)))
        else:
            box = table["bbox"].combine_chunks()
            in_lon = (
                pc.and_(pc.less_equal(box.field("xmin"), e), pc.greater_equal(box.field("xmax"), w))
                if w <= e
                else pc.or_(
                    pc.greater_equal(box.field("xmax"), w), pc.less_equal(box.field("xmin"), e)
                )
            )
            inside = pc.and_(
                in_lon,
                pc.and_(
                    pc.less_equal(box.field("ymin"), n), pc.greater_equal(box.field("ymax"), s)
                ),
            )
        keep = pc.and_(keep, pc.fill_null(inside, False))
    if time is not None:
        try:
            start, end = time
        except (TypeError, ValueError):
            raise ValueError(f"time must be (start, end), got {time!r}") from None
        when = table["datetime"]
        for bound, op in ((start, pc.greater_equal), (end, pc.less_equal)):
            if bound is not None:
                stamp = pd.Timestamp(bound)
                stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp
                scalar = pa.scalar(stamp.to_pydatetime(), type=when.type)
                keep = pc.and_(keep, pc.fill_null(op(when, scalar), False))
    return table.filter(keep).sort_by(INDEX_PROPERTY)


__all__ = [
    "FIELDS_BY_ROLE",
    "SCHEMAS",
    "StacOutput",
    "build_collection",
    "dataset_roles",
    "empty_fields",
    "iter_items",
    "read_items",
    "search_items",
    "write_stac",
]
