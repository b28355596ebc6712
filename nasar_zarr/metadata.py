"""metadata.parquet <-> per-sample coordinates, type by type, exactly rebuildable.

Zarr v3 holds numbers, booleans and strings; Arrow/pandas also have nulls in
integer, boolean and string columns, time zones, dictionaries and lists. Each
column is mapped explicitly, the mapping is written into the coordinate's
attributes (``nasar_encoding`` and friends) and the table's Arrow schema is kept
in the root attributes, so :func:`decode_table` rebuilds the original table.

| Arrow type                    | stored as                     | attributes                     |
|-------------------------------|-------------------------------|--------------------------------|
| int/uint/float, no nulls      | same dtype                    | ``nasar_encoding: native``     |
| int/uint with nulls           | float64, null -> NaN          | ``nullable_int``, _FillValue   |
| bool, no nulls                | bool                          | ``native``                     |
| bool with nulls               | float32 1/0, null -> NaN      | ``nullable_bool``, _FillValue  |
| timestamp (any unit, any tz)  | datetime64 UTC, null -> NaT   | ``timestamp``, nasar_timezone  |
| string / large_string         | variable-length UTF-8         | ``string``, nasar_missing      |
| dictionary of strings         | the labels as strings         | ``string``, nasar_categories   |
| anything else (lists, ...)    | JSON text per row             | ``json``                       |
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import columns
from .columns import ColumnRoles
from .errors import MetadataError

ENCODING_ATTR = "nasar_encoding"
_EXACT_FLOAT_INT = 2**53


def schema_to_text(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def encode_column(
    name: str, column: pa.ChunkedArray | pa.Array
) -> tuple[np.ndarray | pa.Array, dict]:
    """One Arrow column as values Zarr v3 can hold, plus the attributes to undo it.

    Numbers, booleans and times become numpy arrays; text (strings, categories,
    JSON) stays an Arrow ``large_string`` array without nulls, written as Zarr's
    variable-length UTF-8 by :func:`nasar_zarr.coordinates.vlen_utf8`.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    has_nulls = column.null_count > 0
    if pa.types.is_dictionary(t) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    ):
        values, attrs = encode_column(name, column.cast(pa.string()))
        return values, {**attrs, "nasar_categories": column.dictionary.to_pylist()}
    if pa.types.is_integer(t):
        if not has_nulls:
            return column.to_numpy(zero_copy_only=False), {ENCODING_ATTR: "native"}
        values = column.to_numpy(zero_copy_only=False)  # float64 with NaN
        valid = column.drop_null().to_numpy().astype(np.int64, copy=False)
        if valid.size and np.abs(valid).max(initial=0) > _EXACT_FLOAT_INT:
            raise MetadataError(
                f"metadata column {name!r} holds nullable integers beyond 2**53, which a"
                " float64 coordinate cannot hold exactly"
            )
        return values.astype("float64"), {ENCODING_ATTR: "nullable_int"}
    if pa.types.is_floating(t):
        return column.to_numpy(zero_copy_only=False), {ENCODING_ATTR: "native"}
    if pa.types.is_boolean(t):
        if not has_nulls:
            return column.to_numpy(zero_copy_only=False), {ENCODING_ATTR: "native"}
        values = np.where(
            column.is_null().to_numpy(zero_copy_only=False),
            np.nan,
            column.fill_null(False).to_numpy(zero_copy_only=False),
        )
        return values.astype("float32"), {ENCODING_ATTR: "nullable_bool"}
    if pa.types.is_timestamp(t):
        utc = column.cast(pa.timestamp(t.unit, tz="UTC")) if t.tz else column
        values = utc.cast(pa.timestamp(t.unit)).to_numpy(zero_copy_only=False)
        return values, {ENCODING_ATTR: "timestamp", "nasar_timezone": t.tz or ""}
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        # Strings stay Arrow: a million footprints as Python objects would be ~1 GB.
        text = column.cast(pa.large_string())
        attrs = {ENCODING_ATTR: "string"}
        if has_nulls:
            missing = _sentinel(text)
            text = text.fill_null(missing)
            attrs["nasar_missing"] = missing
        return text, attrs
    text = pa.array([json.dumps(v, default=str) for v in column.to_pylist()], pa.large_string())
    return text, {ENCODING_ATTR: "json"}


def _sentinel(values: pa.Array) -> str:
    """A marker for missing strings that no value in the column equals."""
    marker = "<NA>"
    while pc.any(pc.equal(values, marker)).as_py():
        marker += "~"
    return marker


def decode_column(
    values: np.ndarray | pa.Array, attrs: Mapping[str, Any], type_: pa.DataType
) -> pa.Array:
    """Undo :func:`encode_column`, giving an Arrow array of the original type."""
    how = attrs.get(ENCODING_ATTR, "native")
    if how == "native":
        return (
            pa.array(np.asarray(values), type=type_)
            if not pa.types.is_dictionary(type_)
            else pa.array(np.asarray(values)).dictionary_encode().cast(type_)
        )
    if how in ("nullable_int", "nullable_bool"):
        values = np.asarray(values, dtype="float64")
        mask = np.isnan(values)
        filled = np.where(mask, 0, values)
        plain = filled.astype("int64") if how == "nullable_int" else filled.astype(bool)
        return pa.array(plain, mask=mask).cast(type_)
    if how == "timestamp":
        naive = pa.array(np.asarray(values).astype(f"datetime64[{type_.unit}]"))
        tz = attrs.get("nasar_timezone") or None
        return (
            naive.cast(pa.timestamp(type_.unit, tz="UTC")).cast(type_) if tz else naive.cast(type_)
        )
    if how == "string":
        text = _as_text(values)
        missing = attrs.get("nasar_missing")
        if missing is not None:
            text = pc.if_else(pc.equal(text, missing), pa.scalar(None, text.type), text)
        if pa.types.is_dictionary(type_):
            categories = pa.array(list(attrs["nasar_categories"]), type=type_.value_type)
            indices = pc.index_in(text, value_set=categories.cast(text.type))
            return pa.DictionaryArray.from_arrays(
                indices.cast(type_.index_type), categories, ordered=type_.ordered
            )
        return text.cast(type_)
    if how == "json":
        return pa.array([json.loads(v) for v in _as_text(values).to_pylist()], type=type_)
    raise MetadataError(f"unknown {ENCODING_ATTR} {how!r} in a metadata coordinate")


def encode_table(
    table: pa.Table, *, roles: ColumnRoles | None = None
) -> dict[str, tuple[np.ndarray | pa.Array, dict]]:
    """Every column of ``table`` as ``name -> (values, attrs)``, with CF attributes.

    Parameters
    ----------
    table
        The metadata table.
    roles
        Which columns are latitude, longitude, footprint and acquisition times
        (:func:`nasar_zarr.columns.recognise`); by default recognised from the
        column names.

    Returns
    -------
    dict
        ``name -> (values, attrs)``: the values Zarr v3 holds (text as Arrow
        strings, see :func:`encode_column`), and attributes that
        undo the encoding plus a CF ``long_name`` (and ``standard_name``/``units``
        for the recognised roles, see :func:`nasar_zarr.columns.cf_attrs`).
        :func:`decode_table` ignores the CF attributes.

    Examples
    --------
    >>> t = pa.table({"lat": [45.0], "lon": [-100.0]})
    >>> encode_table(t)["lat"][1]["standard_name"]
    'latitude'
    """
    if roles is None:
        roles = columns.recognise(table.column_names)
    out = {}
    for name in table.column_names:
        values, attrs = encode_column(name, table.column(name))
        out[name] = (values, {**columns.cf_attrs(name, values, roles), **attrs})
    return out


def _as_text(values: np.ndarray | pa.Array) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values.cast(pa.large_string())
    values = np.asarray(values)
    if values.dtype.kind == "T":  # numpy's StringDType (zarr 3's strings): no Python objects
        return pa.array(values.ravel(), pa.large_string())
    return pa.array(values.astype(object).ravel(), pa.large_string())


def decode_table(
    columns: Mapping[str, tuple[np.ndarray | pa.Array, Mapping]], schema: pa.Schema
) -> pd.DataFrame:
    """Rebuild the metadata DataFrame (same columns, values and dtypes as read from parquet)."""
    arrays = [decode_column(*columns[f.name], f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema).to_pandas()
