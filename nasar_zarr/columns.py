"""Which metadata columns play which role (latitude, footprint, acquisition time, ...).

The dataset card fixes only the four sharding columns of ``metadata.parquet``;
the columns holding the patch centre, its footprint and the acquisition times
may be spelled ``center_lat``, ``lat``, ``Latitude``, ``prime_datetime``,
``acquisition_time``, ... This module recognises the usual spellings
(case-insensitive, ``-`` and blanks read as ``_``), lets explicit names win,
and derives the CF attributes that make the roles visible to CF tools
(cf-xarray finds ``ds.cf["latitude"]``, ``ds.cf["longitude"]``, ``ds.cf["time"]``).

Pure: names in, a :class:`ColumnRoles` out. Nothing here reads a store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import xarray as xr

from .errors import MetadataError
from .store import read_provenance

ROLES_ATTR = "nasar_columns"  # root attribute (JSON string) naming the recognised columns
ROLE_ATTR = "nasar_role"  # coordinate attribute: the role of that column, if any

# Usual spellings per role, most specific first: where several columns of a table
# match one role, the earliest spelling in this list wins.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "lat": (
        "center_lat",
        "centre_lat",
        "lat_center",
        "lat_centre",
        "center_latitude",
        "centre_latitude",
        "latitude_center",
        "latitude_centre",
        "patch_lat",
        "patch_latitude",
        "latitude",
        "lat",
        "latitude_deg",
        "lat_deg",
    ),
    "lon": (
        "center_lon",
        "centre_lon",
        "lon_center",
        "lon_centre",
        "center_lng",
        "centre_lng",
        "center_longitude",
        "centre_longitude",
        "longitude_center",
        "longitude_centre",
        "patch_lon",
        "patch_longitude",
        "longitude",
        "lon",
        "lng",
        "long",
        "longitude_deg",
        "lon_deg",
    ),
    "footprint": (
        "footprint_wkt",
        "footprint",
        "geometry_wkt",
        "geom_wkt",
        "polygon_wkt",
        "boundary_wkt",
        "wkt",
    ),
    "time": (
        "prime_datetime",
        "prime_time",
        "prime_acquisition_time",
        "prime_date",
        "reference_datetime",
        "reference_time",
        "reference_acquisition_time",
        "reference_date",
        "acquisition_datetime",
        "acquisition_time",
        "acquisition_date",
        "sensing_time",
        "start_datetime",
        "start_time",
        "datetime",
        "timestamp",
        "time",
        "date",
    ),
    "secondary_time": (
        "secondary_datetime",
        "secondary_time",
        "secondary_acquisition_time",
        "secondary_date",
    ),
    "orbit_direction": (
        "orbit_direction",
        "orbit_pass",
        "pass_direction",
        "flight_direction",
        "orbit_state",
        "ascending_descending",
        "pass",
    ),
    "track": (
        "track",
        "relative_orbit",
        "relative_orbit_number",
        "track_number",
        "rel_orbit",
    ),
    "co_pol": ("co_pol_available", "copol_available", "co_pol_present", "has_co_pol"),
    "cross_pol": (
        "cross_pol_available",
        "crosspol_available",
        "cross_pol_present",
        "has_cross_pol",
    ),
    "epsg": ("epsg", "epsg_code", "crs_epsg", "utm_epsg"),
    "burst_id": ("burst_id", "burst"),
    "granule_id": ("opera_granule_id", "granule_id", "granule", "opera_id", "product_id"),
    "quality": ("quality_score", "quality"),
}

# Readable names of the roles, used as CF long_name of the recognised coordinates.
# None of them equals a CF standard name except where the role *is* one (cf-xarray
# also matches long_name against standard names).
ROLE_LONG_NAMES: dict[str, str] = {
    "lat": "latitude",
    "lon": "longitude",
    "footprint": "footprint polygon (WKT, longitude latitude in degrees)",
    "time": "prime acquisition time",
    "secondary_time": "secondary acquisition time",
    "orbit_direction": "orbit direction (ascending / descending)",
    "track": "relative orbit (track) number",
    "co_pol": "co-polarization channel available",
    "cross_pol": "cross-polarization channel available",
    "epsg": "EPSG code of the patch projection",
    "burst_id": "burst identifier",
    "granule_id": "source granule identifier",
    "quality": "quality score",
}


@dataclass(frozen=True)
class ColumnRoles:
    """The metadata column playing each role, or None where the table has none.

    ``lat``/``lon`` are the patch centre in degrees, ``footprint`` a WKT polygon,
    ``time``/``secondary_time`` the prime and secondary acquisition times; the
    others are used for STAC properties and summaries.
    """

    lat: str | None = None
    lon: str | None = None
    footprint: str | None = None
    time: str | None = None
    secondary_time: str | None = None
    orbit_direction: str | None = None
    track: str | None = None
    co_pol: str | None = None
    cross_pol: str | None = None
    epsg: str | None = None
    burst_id: str | None = None
    granule_id: str | None = None
    quality: str | None = None

    def as_dict(self) -> dict[str, str]:
        """``role -> column`` for the roles that were found (JSON-safe).

        Examples
        --------
        >>> ColumnRoles(lat="lat", lon="lon").as_dict()
        {'lat': 'lat', 'lon': 'lon'}
        """
        return {role: column for role, column in asdict(self).items() if column is not None}

    def role_of(self, column: str) -> str | None:
        """The role that ``column`` plays, or None.

        Examples
        --------
        >>> ColumnRoles(lat="y").role_of("y")
        'lat'
        """
        for role, name in self.as_dict().items():
            if name == column:
                return role
        return None


ROLES: tuple[str, ...] = tuple(f.name for f in fields(ColumnRoles))


def normalize_name(name: str) -> str:
    """The spelling used for matching: lower case, ``-`` and blanks as ``_``.

    Examples
    --------
    >>> normalize_name(" Center-Lat ")
    'center_lat'
    """
    return re.sub(r"[\s\-]+", "_", str(name).strip()).lower()


def recognise(
    names: Iterable[str],
    *,
    lat: str | None = None,
    lon: str | None = None,
    footprint: str | None = None,
    time: str | None = None,
    secondary_time: str | None = None,
    **overrides: str | None,
) -> ColumnRoles:
    """Find the columns playing each role among ``names``.

    Parameters
    ----------
    names
        The metadata table's column names.
    lat, lon, footprint, time, secondary_time
        Explicit column names; they win over recognition. Each must be one of
        ``names`` (exactly as spelled there).
    **overrides
        The same for the other roles (``orbit_direction``, ``track``, ``co_pol``,
        ``cross_pol``, ``epsg``, ``burst_id``, ``granule_id``, ``quality``).

    Returns
    -------
    ColumnRoles
        A column per role; None where no column matches. A column plays at most
        one role; where several columns match a role, the spelling earliest in
        :data:`SPELLINGS` wins, then the earliest column.

    Raises
    ------
    MetadataError
        An override names a column that is not in ``names``, names an unknown
        role, or gives one column two roles.

    Examples
    --------
    >>> recognise(["sample_key", "Lat", "lng", "acquisition_time"]).as_dict()
    {'lat': 'Lat', 'lon': 'lng', 'time': 'acquisition_time'}
    >>> recognise(["y0", "x0"], lat="y0", lon="x0").lat
    'y0'
    """
    available = [str(n) for n in names]
    unknown = sorted(set(overrides) - set(ROLES))
    if unknown:
        raise MetadataError(f"unknown column role(s) {unknown}; the roles are {list(ROLES)}")
    given = {
        "lat": lat,
        "lon": lon,
        "footprint": footprint,
        "time": time,
        "secondary_time": secondary_time,
        **overrides,
    }
    chosen: dict[str, str] = {}
    for role, column in given.items():
        if column is None:
            continue
        if column not in available:
            raise MetadataError(
                f"the {role} column {column!r} is not in the metadata table; its columns are"
                f" {available}"
            )
        other = next((r for r, c in chosen.items() if c == column), None)
        if other is not None:
            raise MetadataError(
                f"column {column!r} was given as both the {other} and the {role} column"
            )
        chosen[role] = column
    by_spelling: dict[str, str] = {}
    for name in available:
        by_spelling.setdefault(normalize_name(name), name)
    for role in ROLES:
        if role in chosen:
            continue
        taken = set(chosen.values())
        for spelling in SPELLINGS[role]:
            column = by_spelling.get(spelling)
            if column is not None and column not in taken:
                chosen[role] = column
                break
    return ColumnRoles(**chosen)


def roles_attr(roles: ColumnRoles) -> str:
    """The recognised columns as a JSON string, for the cube's root attributes.

    Parameters
    ----------
    roles
        What :func:`recognise` found.

    Returns
    -------
    str
        ``{"role": "column", ...}`` with the found roles only, keys sorted.

    Examples
    --------
    >>> roles_attr(ColumnRoles(lat="center_lat", time="prime_datetime"))
    '{"lat": "center_lat", "time": "prime_datetime"}'
    """
    return json.dumps(roles.as_dict(), sort_keys=True)


def roles_from_attr(text: str | Mapping[str, Any]) -> ColumnRoles:
    """Undo :func:`roles_attr` (accepts the JSON string or the parsed mapping).

    Parameters
    ----------
    text
        The recorded roles.

    Returns
    -------
    ColumnRoles
        Roles not in :data:`ROLES` (from a newer writer) are ignored.

    Examples
    --------
    >>> roles_from_attr('{"lat": "lat"}').lat
    'lat'
    """
    mapping = json.loads(text) if isinstance(text, str) else dict(text)
    return ColumnRoles(**{k: str(v) for k, v in mapping.items() if k in ROLES and v})


def readable(column: str) -> str:
    """A readable long_name from a column name: ``quality_score`` -> ``quality score``.

    Examples
    --------
    >>> readable("cross_pol_available")
    'cross pol available'
    """
    text = re.sub(r"[_\s]+", " ", str(column)).strip()
    return text or str(column)


def cf_attrs(column: str, values: np.ndarray | pa.Array, roles: ColumnRoles) -> dict[str, str]:
    """CF attributes of the coordinate holding ``column``.

    Every column gets a ``long_name``. Latitude and longitude (numeric) get
    ``standard_name`` and ``units`` (``degrees_north``/``degrees_east``); the
    prime acquisition time (datetime) gets ``standard_name: time`` (its
    ``units`` are the CF time encoding that xarray writes). The secondary time
    has no CF standard name of its own: a second ``time`` would make
    ``ds.cf["time"]`` ambiguous, so it only gets a long_name. Footprints (WKT
    text) have no standard name either.

    Parameters
    ----------
    column
        The column name.
    values
        The coordinate's stored values (their kind decides whether a role's CF
        attributes apply: a latitude stored as text gets none).
    roles
        The recognised roles.

    Returns
    -------
    dict
        Attributes to merge into the coordinate's attributes, including
        ``nasar_role`` for a recognised column.

    Examples
    --------
    >>> attrs = cf_attrs("lat", np.zeros(2), ColumnRoles(lat="lat"))
    >>> attrs["standard_name"], attrs["units"]
    ('latitude', 'degrees_north')
    """
    role = roles.role_of(column)
    if role is None:
        return {"long_name": readable(column)}
    kind = "O" if isinstance(values, pa.Array) else np.asarray(values).dtype.kind  # text: Arrow
    cf: dict[str, str] = {}
    if role == "lat" and kind in "iuf":
        cf = {"standard_name": "latitude", "units": "degrees_north"}
    elif role == "lon" and kind in "iuf":
        cf = {"standard_name": "longitude", "units": "degrees_east"}
    elif role == "time" and kind == "M":
        cf = {"standard_name": "time"}
    # A role's long_name only where its values fit the role: cf-xarray also matches
    # long_name against standard names, so a text "latitude" must not be called so.
    fits = bool(cf) or role not in ("lat", "lon", "time")
    long_name = ROLE_LONG_NAMES.get(role, readable(column)) if fits else readable(column)
    return {"long_name": long_name, ROLE_ATTR: role, **cf}


def dataset_roles(ds: xr.Dataset) -> ColumnRoles:
    """The metadata roles of a cube: as recorded at conversion, else recognised.

    Parameters
    ----------
    ds
        A cube (``open_cube``).

    Returns
    -------
    ColumnRoles
        From the root attribute ``nasar_columns`` or the provenance's ``columns``
        where the converter recorded them, else from the coordinates' ``nasar_role``
        attributes, else recognised from the metadata column names.

    Examples
    --------
    >>> dataset_roles(ds).lat  # doctest: +SKIP
    'center_lat'
    """
    recorded = ds.attrs.get(ROLES_ATTR) or read_provenance(ds.attrs).get("columns")
    if recorded:
        return roles_from_attr(recorded)
    tagged = {
        c.attrs[ROLE_ATTR]: c.attrs["nasar_column"]
        for c in ds.coords.values()
        if ROLE_ATTR in c.attrs and "nasar_column" in c.attrs
    }
    if tagged:
        return roles_from_attr(tagged)
    names = [c.attrs["nasar_column"] for c in ds.coords.values() if "nasar_column" in c.attrs]
    return recognise(names)


def role_coordinate(ds: xr.Dataset, role: str, default: str | None = None) -> str | None:
    """The coordinate of ``ds`` holding the column that plays ``role`` (or ``default``).

    Examples
    --------
    >>> role_coordinate(ds, "lat")  # doctest: +SKIP
    'center_lat'
    """
    column = getattr(dataset_roles(ds), role) or default
    if column is None:
        return None
    for name, coord in ds.coords.items():
        if coord.attrs.get("nasar_column") == column:
            return str(name)
    return column if column in ds.coords else None


__all__ = [
    "ROLES",
    "ROLES_ATTR",
    "dataset_roles",
    "role_coordinate",
    "ROLE_ATTR",
    "SPELLINGS",
    "ColumnRoles",
    "cf_attrs",
    "normalize_name",
    "readable",
    "recognise",
    "roles_attr",
    "roles_from_attr",
]
