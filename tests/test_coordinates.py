"""Text coordinates go from Arrow straight into Zarr's vlen-utf8, and read back exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import xarray as xr
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from numcodecs import VLenUTF8

from nasar_zarr import coordinates, store
from nasar_zarr.corpus import MetadataColumns
from nasar_zarr.errors import MetadataError
from nasar_zarr.testing import write_corpus

texts = st.lists(st.text(max_size=12), max_size=40)


@settings(max_examples=200, deadline=None)
@given(texts, st.integers(0, 5))
def test_vlen_utf8_is_what_numcodecs_writes(values, skip):
    """Also for a sliced array (a non-zero offset), as a column read from Parquet can be."""
    array = pa.array(["pad"] * skip + values, pa.large_string()).slice(skip)
    expected = VLenUTF8().encode(np.array(values, dtype=object))
    assert bytes(coordinates.vlen_utf8(array)) == bytes(expected)
    assert VLenUTF8().decode(coordinates.vlen_utf8(array)).tolist() == values


def test_vlen_utf8_refuses_nulls():
    with pytest.raises(ValueError, match="hold nulls"):
        coordinates.vlen_utf8(pa.array(["a", None]))


@pytest.mark.parametrize("n", [0, 1, 5])
def test_write_text_reads_back_with_zarr_and_xarray(tmp_path, n):
    dest = str(tmp_path / "t.zarr")
    zarr.open_group(dest, mode="w", zarr_format=3)
    values = [f"é{i}" * i for i in range(n)]
    coordinates.write_text(dest, None, "words", pa.array(values, pa.large_string()), {"a": "b"})
    array = zarr.open_array(f"{dest}/words", mode="r")
    assert array.metadata.to_dict()["codecs"] == (
        {"name": "vlen-utf8", "configuration": {}},
        {"name": "zstd", "configuration": {"level": 0, "checksum": False}},
        {"name": "crc32c"},
    )
    assert array[:].tolist() == values
    assert array.attrs["a"] == "b"
    ds = xr.open_zarr(dest, consolidated=False)
    assert ds["words"].values.tolist() == values
    assert ds["words"].dims == ("sample",)


def test_write_coordinates_replaces_arrays_of_the_same_name(tmp_path):
    dest = str(tmp_path / "t.zarr")
    zarr.open_group(dest, mode="w", zarr_format=3)
    text = pa.array(["a", "b"], pa.large_string())
    numbers = np.array([1.5, 2.5])
    first = [("x", text, {}, {}), ("y", numbers, {}, {"chunks": (2,)})]
    coordinates.write_coordinates(dest, None, first)
    second = [("x", numbers, {}, {"chunks": (2,)}), ("y", text, {}, {})]
    coordinates.write_coordinates(dest, None, second)
    group = store.open_group(dest, None, use_consolidated=False)
    np.testing.assert_array_equal(group["x"][:], numbers)
    assert group["y"][:].tolist() == ["a", "b"]


def test_metadata_columns_read_one_column_in_release_order(tmp_path):
    """The release's rows may be stored in any order; columns come back in release order."""
    import pyarrow.parquet as pq

    corpus = write_corpus(tmp_path / "c", n_shards=2, samples_per_shard=[3, 4], seed=3)
    path = corpus.root / "metadata.parquet"
    table = pq.read_table(path)
    pq.write_table(table.take(pa.array([6, 0, 5, 1, 4, 2, 3])), path)
    metadata = MetadataColumns(str(corpus.root))
    assert metadata.num_rows == 7
    assert metadata.schema.names == table.schema.names
    assert metadata.column("sample_key").equals(table.column("sample_key").combine_chunks())


def test_metadata_columns_name_the_missing_sharding_column(tmp_path):
    import pyarrow.parquet as pq

    corpus = write_corpus(tmp_path / "c", n_shards=1, samples_per_shard=[2], seed=3)
    path = corpus.root / "metadata.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["shard_index"]), path)
    with pytest.raises(MetadataError, match=r"metadata.parquet: missing columns \['shard_index'\]"):
        MetadataColumns(str(corpus.root))
