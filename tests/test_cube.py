"""open_cube and the catalog entry: chunks, the fast reader, and everyday xarray idioms."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import dask
import intake
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from nasar_zarr import backend, open_cube
from nasar_zarr.cube import MAX_DASK_CHUNKS, dask_chunk_size

from .test_catalog import CATALOG

VARIABLES = ("rtc", "inc_angle", "ifg", "coh", "dem", "slope_deg", "rtc_present", "status")


@pytest.fixture(scope="module")
def reference(small_cube):
    """The cube read by zarr-python alone, in memory: what every path must equal."""
    return open_cube(str(small_cube), engine="zarr").load()


@pytest.fixture(scope="module", params=["open_cube", "catalog"])
def opened(request, small_cube):
    if request.param == "open_cube":
        return open_cube(str(small_cube))
    return intake.open_catalog(str(CATALOG))["nasar"](url=str(small_cube)).to_dask()


def _rchar() -> int:
    """Bytes this process has read through read()/pread() so far (Linux /proc)."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


# ------------------------------------------------------------------------- chunks


def test_every_variable_is_chunked_alike_in_whole_shards(opened):
    # 4 shards of 8 samples (4 MiB of rtc each) fit in dask's 128 MiB chunk-size: one chunk
    assert opened.chunks["sample"] == (32,)
    assert opened.chunksizes["sample"] == (32,)
    for name in VARIABLES:
        chunks = opened[name].chunks
        assert chunks[0] == (32,), name
        assert all(len(c) == 1 for c in chunks[1:]), name  # other dims whole


def test_default_chunks_follow_dasks_chunk_size_in_whole_shards(small_cube):
    import dask

    rtc_shard = 8 * 2 * 2 * 2 * 128 * 128 * 4  # 8 samples of (view, time, pol, y, x) float32
    with dask.config.set({"array.chunk-size": 2 * rtc_shard}):
        assert open_cube(str(small_cube)).chunks["sample"] == (16, 16)
    with dask.config.set({"array.chunk-size": 2 * rtc_shard - 1}):  # never above the target
        assert open_cube(str(small_cube)).chunks["sample"] == (8, 8, 8, 8)
    with dask.config.set({"array.chunk-size": "1 KiB"}):  # at least one whole shard
        assert open_cube(str(small_cube)).chunks["sample"] == (8, 8, 8, 8)


def test_dask_chunk_size_keeps_a_full_reduction_small():
    # one shard per chunk up to MAX_DASK_CHUNKS shards, then several whole shards
    assert dask_chunk_size(32, 8) == 8
    assert dask_chunk_size(32, 8, "shard") == 8
    assert dask_chunk_size(512 * MAX_DASK_CHUNKS, 512) == 512
    assert dask_chunk_size(512 * MAX_DASK_CHUNKS + 1, 512) == 1024
    assert dask_chunk_size(1_099_604, 512) == 11 * 512
    assert -(-1_099_604 // dask_chunk_size(1_099_604, 512)) == 196
    assert dask_chunk_size(1_099_604, 512, "shard") == 512
    assert dask_chunk_size(1_099_604, 512, 1000) == 1000
    assert dask_chunk_size(5, 512) == 5
    with pytest.raises(ValueError, match="chunks must be 'shards', 'shard'"):
        dask_chunk_size(10, 5, "auto")
    with pytest.raises(ValueError, match="positive number of samples"):
        dask_chunk_size(10, 5, 0)


def test_chunk_options(small_cube):
    assert open_cube(str(small_cube), chunks="shard").chunks["sample"] == (8, 8, 8, 8)
    assert open_cube(str(small_cube), chunks={"sample": 12}).chunks["sample"] == (12, 12, 8)
    assert open_cube(str(small_cube), chunks=16).chunks["sample"] == (16, 16)
    lazy = open_cube(str(small_cube), chunks=None)
    assert not lazy.chunks and isinstance(lazy["dem"].variable._data, object)
    with pytest.raises(ValueError, match="may only set 'sample'"):
        open_cube(str(small_cube), chunks={"y": 64})
    with pytest.raises(ValueError, match="engine must be one of"):
        open_cube(str(small_cube), engine="tensorstore")


def test_full_mean_graph_size(small_cube):
    ds = open_cube(str(small_cube))
    # per variable: one read task per chunk, its partial mean, a tree of sums, and the
    # array's own key; nothing per inner chunk
    tasks = len(ds.mean().__dask_graph__())
    assert tasks <= len(VARIABLES) * (1 + 4 * 3)


# ------------------------------------------------------------------------- the fast reader


def test_fast_reader_equals_zarr_python(small_cube, reference):
    fast = open_cube(str(small_cube), engine="fast")
    for name in VARIABLES:
        assert type(fast[name].variable._data).__name__ == "Array"
    xr.testing.assert_identical(fast.load(), reference)


@pytest.mark.parametrize("index", [[5, 17, 3], [0], [31, 31, 2], slice(6, 11), slice(1, 30, 7)])
def test_fast_reader_selections(small_cube, reference, index):
    fast = open_cube(str(small_cube), engine="fast")
    got = fast.isel(sample=index).compute(scheduler="sync")
    xr.testing.assert_identical(got, reference.isel(sample=index))
    one = fast["rtc"].isel(sample=9, view=1, pol=0).values
    np.testing.assert_array_equal(one, reference["rtc"].isel(sample=9, view=1, pol=0).values)


def _expected_bytes(layouts, pieces) -> int:
    """Bytes of the given inner chunks plus each touched shard's index; unsharded: whole."""
    total = 0
    for layout in layouts.values():
        for obj, chunks in pieces:
            path = layout.object_path(obj)
            if not layout.sharded:
                total += os.path.getsize(path)
                continue
            with open(path, "rb") as f:
                index = backend._index(layout, f.read(), path)
            total += sum(int(index[c][1]) for c in chunks) + len(index) * 16 + 4
    return total


@pytest.mark.parametrize("how", ["slice on dask", "list on dask", "list without dask"])
def test_a_few_samples_read_only_their_inner_chunks(small_cube, how):
    """A few samples cost their inner chunks and the shard indexes, not whole shards.

    Counted as the bytes this process reads (``rchar``): the fast reader uses
    ``pread`` for partial objects (a whole object is memory-mapped instead).
    """
    group = backend.zarr.open_group(str(small_cube), mode="r")
    layouts = backend.layouts(group, str(small_cube), VARIABLES)
    if how == "slice on dask":
        ds = open_cube(str(small_cube))
        select, pieces = {"sample": slice(9, 11)}, [(1, (0, 1))]
    elif how == "list on dask":
        # dask chunks of 3 whole shards: dask's take would read each touched chunk whole
        ds = open_cube(str(small_cube), chunks=24)
        assert ds.chunks["sample"] == (24, 8)
        select, pieces = {"sample": [30, 3, 20]}, [(0, (1,)), (2, (2,)), (3, (3,))]
    else:
        ds = open_cube(str(small_cube), chunks=None)
        select, pieces = {"sample": [9, 10, 20]}, [(1, (0, 1)), (2, (2,))]
    ds.isel(sample=[0]).compute(scheduler="sync")  # first-call imports read .pyc files
    before = _rchar()
    got = ds.isel(select).compute(scheduler="sync")
    read = _rchar() - before
    expected = _expected_bytes(layouts, pieces)
    assert got.sizes["sample"] == (2 if how == "slice on dask" else 3)
    assert expected <= read <= expected + 16 * 1024
    touched = sum(
        os.path.getsize(layouts[n].object_path(obj)) for n in VARIABLES for obj, _ in pieces
    )
    assert read < 0.8 * touched  # not the whole shards


def test_sample_selections_on_multi_shard_dask_chunks(small_cube, reference):
    """Lists, masks, keys and chains of selections on chunks of 3 shards equal zarr-python's."""
    ds = open_cube(str(small_cube), chunks=24)
    for index in (
        [5, 17, 3],
        [31, 31, 2, -1],
        np.arange(32)[::-1],
        np.arange(32) % 3 == 0,
        list(range(2, 30)),
        slice(1, 30, 7),
        9,
    ):
        got = ds.isel(sample=index).compute(scheduler="sync")
        xr.testing.assert_identical(got, reference.isel(sample=index))
    chained = ds.isel(sample=slice(4, 30)).isel(sample=[20, 0, 7], view=1, x=slice(3, 9))
    expected = reference.isel(sample=slice(4, 30)).isel(sample=[20, 0, 7], view=1, x=slice(3, 9))
    xr.testing.assert_identical(chained.compute(scheduler="sync"), expected)
    # every other use of a chunk sees the samples read: arithmetic, methods, map_blocks
    rtc = ds["rtc"].data
    np.testing.assert_array_equal((rtc * 2 + 1).compute(), reference["rtc"].values * 2 + 1)
    assert rtc.map_blocks(
        lambda b: np.asarray(b).sum(keepdims=True) * 0 + b.shape[0],
        chunks=(1,) * rtc.ndim,
        drop_axis=[],
    ).compute().ravel().tolist() == [24, 8]
    summed = ds.astype("float64").sum("sample").compute()
    xr.testing.assert_allclose(summed, reference.astype("float64").sum("sample"))


def test_lazy_rows_narrow_before_reading(small_cube, reference):
    group = backend.zarr.open_group(str(small_cube), mode="r")
    layout = backend.array_layout(group["rtc"], str(small_cube / "rtc"))
    chunk = backend.LazyRows(layout, range(0, 24))
    picked = chunk[[20, 3]]
    assert type(picked) is backend.LazyRows and picked.shape == (2, *layout.row_shape)
    assert "not read" in repr(chunk) and "not read" in repr(picked)
    values = reference["rtc"].values
    np.testing.assert_array_equal(np.asarray(picked), values[[20, 3]])
    np.testing.assert_array_equal(chunk[5:9][::2][1], values[7])
    np.testing.assert_array_equal(chunk[-1, 0, 1], values[23, 0, 1])
    np.testing.assert_array_equal(chunk[[1, 2], ..., 0], values[[1, 2], ..., 0])  # read, then cut
    assert "not read" in repr(chunk)
    # pickled, it is the ndarray it reads to; numpy sees it as that ndarray
    back = pickle.loads(pickle.dumps(picked))
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, values[[20, 3]])
    assert np.concatenate([picked, chunk[[0]]]).shape == (3, *layout.row_shape)
    # a reduction streams (nasar_zarr.streaming): equal to float32 rounding, nothing kept
    np.testing.assert_allclose(np.sum(chunk), values[:24].sum(dtype=np.float32), rtol=1e-6)
    assert "not read" in repr(chunk)
    assert chunk.astype(np.float64).dtype == np.float64 and "read" in repr(chunk)
    assert dask.sizeof.sizeof(chunk) == chunk.nbytes == values[:24].nbytes
    with pytest.raises(IndexError):
        chunk[[24]].values()


def test_reading_in_a_forked_child_after_the_parent_read(small_cube, reference):
    ds = open_cube(str(small_cube))
    parent = ds["rtc"].isel(sample=slice(0, 8)).values  # the parent reads first
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_child_read, (ds,))
        child = result.get(timeout=60)
    np.testing.assert_array_equal(child, reference["rtc"].isel(sample=slice(8, 24)).values)
    np.testing.assert_array_equal(parent, reference["rtc"].isel(sample=slice(0, 8)).values)


def _child_read(ds: xr.Dataset) -> np.ndarray:
    # dask's default thread pool does not survive fork (its threads stay in the parent),
    # so a forked child computes with the synchronous scheduler; the reader holds nothing
    with dask.config.set(scheduler="synchronous"):
        return ds["rtc"].isel(sample=slice(8, 24)).values


def test_a_corrupt_shard_index_is_reported(small_cube, tmp_path):
    import shutil

    copy = tmp_path / "cube.zarr"
    shutil.copytree(small_cube, copy)
    group = backend.zarr.open_group(str(copy), mode="r")
    layout = backend.array_layout(group["dem"], str(copy / "dem"))
    path = layout.object_path(0)
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(backend.ShardFormatError, match="fails its CRC-32C"):
        backend.read_rows(layout, slice(0, 8))


# ------------------------------------------------------------------------- idioms


def test_sel_by_sample_key(opened, reference):
    keys = [str(k) for k in reference["sample"].values[[4, 27, 11]]]
    got = opened.sel(sample=keys).compute()
    xr.testing.assert_identical(got, reference.sel(sample=keys))
    assert [str(k) for k in got["sample"].values] == keys


def test_where_drop_on_a_metadata_coordinate(opened, reference):
    cond = opened["quality_score"] > 0.7
    got = opened[["dem", "status"]].where(cond, drop=True).compute()
    keep = reference["quality_score"].values > 0.7
    assert 0 < keep.sum() < reference.sizes["sample"]
    np.testing.assert_array_equal(got["dem"].values, reference["dem"].values[keep])
    np.testing.assert_array_equal(got["status"].values, reference["status"].values[keep])


def test_groupby_a_metadata_coordinate(opened, reference):
    got = opened["dem"].groupby("orbit_direction").mean(...).compute()
    labels = np.array([str(v) for v in reference["orbit_direction"].values])
    assert sorted(str(v) for v in got["orbit_direction"].values) == sorted(set(labels))
    dem = reference["dem"].values.astype(np.float64)
    for label, value in zip(got["orbit_direction"].values, got.values, strict=True):
        np.testing.assert_allclose(value, dem[labels == str(label)].mean(), rtol=1e-6)


def test_to_netcdf_round_trip(opened, reference, tmp_path):
    path = tmp_path / "subset.nc"
    opened.isel(sample=slice(3, 14)).to_netcdf(path, engine="h5netcdf")
    with xr.open_dataset(path, engine="h5netcdf") as back:
        xr.testing.assert_identical(back.load(), reference.isel(sample=slice(3, 14)))
        assert back.attrs == reference.attrs


def test_to_zarr_round_trip(opened, reference, tmp_path):
    path = tmp_path / "subset.zarr"
    opened.isel(sample=[0, 5, 6, 30]).to_zarr(path, zarr_format=3, consolidated=False)
    back = xr.open_zarr(path, consolidated=False)
    xr.testing.assert_identical(back.load(), reference.isel(sample=[0, 5, 6, 30]))
    # and the whole cube, dask chunk by dask chunk
    whole = tmp_path / "whole.zarr"
    opened.to_zarr(whole, zarr_format=3, consolidated=False)
    xr.testing.assert_identical(xr.open_zarr(whole, consolidated=False).load(), reference)


def test_plain_open_zarr_recipe_for_to_zarr(small_cube, reference, tmp_path):
    """What docs/ANALYSIS.md tells plain xr.open_zarr users: drop the encodings."""
    plain = xr.open_zarr(str(small_cube)).drop_encoding()
    plain.isel(sample=slice(0, 9)).to_zarr(tmp_path / "p.zarr", zarr_format=3, consolidated=False)
    back = xr.open_zarr(tmp_path / "p.zarr", consolidated=False).load()
    xr.testing.assert_identical(back, reference.isel(sample=slice(0, 9)))


def test_metadata_to_parquet(opened, table, tmp_path):
    path = tmp_path / "meta.parquet"
    opened.nasar.metadata().to_parquet(path)
    pd.testing.assert_frame_equal(pd.read_parquet(path), table)


def test_pickled_to_dask_workers(opened, reference, dask_client):
    assert pickle.loads(pickle.dumps(opened)).sizes == opened.sizes
    future = dask_client.submit(_worker_sum, opened)
    np.testing.assert_allclose(future.result(), float(reference["coh"].sum()), rtol=1e-6)
    got = dask_client.compute(opened["dem"].mean("sample")).result()
    # float32 sums in another order: equal to float32 rounding
    np.testing.assert_allclose(got.values, reference["dem"].mean("sample").values, rtol=1e-6)
    with dask.config.set(scheduler=dask_client):
        xr.testing.assert_identical(
            opened.isel(sample=[2, 19]).compute(), reference.isel(sample=[2, 19])
        )


def _worker_sum(ds: xr.Dataset) -> float:
    return float(ds["coh"].sum().compute(scheduler="sync"))
