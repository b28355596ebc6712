"""Every metadata column, whatever its type, becomes a coordinate and rebuilds exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from nasar_zarr import metadata as meta
from nasar_zarr.errors import MetadataError


def awkward_frame(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "text_with_missing": pd.array(["a", None, "", "<NA>", "ü", "x"][:n], dtype="string"),
            "py_str": pd.Series(["p", "q", "r", "s", "t", "u"][:n], dtype="str"),
            "nullable_int": pd.array([1, None, -3, 2**40, 0, None][:n], dtype="Int64"),
            "nullable_small": pd.array([1, 2, None, 4, 5, 6][:n], dtype="Int16"),
            "nullable_bool": pd.array([True, None, False, True, None, False][:n], dtype="boolean"),
            "when_utc": pd.to_datetime(
                [
                    "2020-01-01T00:00:00.123456",
                    None,
                    "2021-06-01",
                    "2022-01-01",
                    "2023-01-01",
                    "2024-02-29",
                ][:n],
                utc=True,
                format="ISO8601",
            ),
            "when_local": pd.date_range(
                "2020-03-01", periods=n, freq="37min", tz="America/Denver", unit="ns"
            ),
            "naive": pd.date_range("2020-01-01", periods=n, freq="D", unit="s"),
            "category": pd.Categorical(["asc", "desc", None, "asc", "desc", "asc"][:n]),
            "lists": [[1, 2], [], None, [3], [4, 5, 6], [7]][:n],
            "floats": rng.random(n).astype("float32"),
            "float_nan": [1.5, np.nan, 2.5, 3.0, np.nan, 0.0][:n],
            "ints": np.arange(n, dtype="uint16"),
            "flags": np.arange(n) % 2 == 0,
        }
    )


def roundtrip(df: pd.DataFrame) -> pd.DataFrame:
    table = pa.Table.from_pandas(df, preserve_index=False)
    original = table.to_pandas()
    encoded = meta.encode_table(table)
    for values, _ in encoded.values():  # what Zarr v3 holds: numbers, or text without nulls
        if isinstance(values, pa.Array):
            assert values.type == pa.large_string() and values.null_count == 0
        else:
            assert values.dtype.kind in "biufM"
    # Text comes back from Zarr as an object array.
    stored = {
        name: (np.array(v.to_pylist(), dtype=object) if isinstance(v, pa.Array) else v, attrs)
        for name, (v, attrs) in encoded.items()
    }
    rebuilt = meta.decode_table(stored, meta.schema_from_text(meta.schema_to_text(table.schema)))
    pd.testing.assert_frame_equal(rebuilt, original)
    return rebuilt


def test_awkward_columns_rebuild_exactly():
    rebuilt = roundtrip(awkward_frame())
    assert str(rebuilt["nullable_int"].dtype) == "Int64"
    assert rebuilt["nullable_int"].tolist()[:4] == [1, pd.NA, -3, 2**40]
    assert str(rebuilt["when_local"].dtype) == "datetime64[ns, America/Denver]"
    assert rebuilt["text_with_missing"].tolist()[:4] == ["a", pd.NA, "", "<NA>"]


def test_encodings_are_recorded():
    table = pa.Table.from_pandas(awkward_frame(), preserve_index=False)
    encoded = meta.encode_table(table)
    kinds = {name: attrs[meta.ENCODING_ATTR] for name, (_, attrs) in encoded.items()}
    assert kinds == {
        "text_with_missing": "string",
        "py_str": "string",
        "nullable_int": "nullable_int",
        "nullable_small": "nullable_int",
        "nullable_bool": "nullable_bool",
        "when_utc": "timestamp",
        "when_local": "timestamp",
        "naive": "timestamp",
        "category": "string",
        "lists": "json",
        "floats": "native",
        "float_nan": "native",
        "ints": "native",
        "flags": "native",
    }
    values, attrs = encoded["text_with_missing"]
    assert attrs["nasar_missing"] == "<NA>~"  # "<NA>" is a real value in this column
    values, attrs = encoded["when_local"]
    assert attrs["nasar_timezone"] == "America/Denver"
    assert values.dtype == np.dtype("datetime64[ns]")
    assert values[0] == np.datetime64("2020-03-01T07:00:00")  # stored in UTC
    values, _ = encoded["nullable_bool"]
    np.testing.assert_array_equal(values, [1, np.nan, 0, 1, np.nan, 0])


def test_huge_nullable_integers_are_refused():
    df = pd.DataFrame({"big": pd.array([2**60, None], dtype="Int64")})
    with pytest.raises(MetadataError, match="'big' holds nullable integers beyond 2\\*\\*53"):
        meta.encode_table(pa.Table.from_pandas(df, preserve_index=False))


def test_empty_table():
    roundtrip(awkward_frame().iloc[:0])
