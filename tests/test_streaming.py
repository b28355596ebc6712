"""Reductions of open_cube's lazy chunks, a few inner chunks at a time (nasar_zarr.streaming).

Every result is compared with numpy's on the materialized array: exact for
min/max, counts, integer sums and ``any``/``all``; float sums and means to
float32 rounding (the pieces' sums are added in another order than numpy's
pairwise sum of the whole chunk).
"""

from __future__ import annotations

import pickle
import shutil
import tracemalloc
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

from nasar_zarr import backend, open_cube, streaming
from nasar_zarr.testing.http import CountingProxy, RangeServer

FLOATS = ["rtc", "inc_angle", "ifg", "coh", "dem", "slope_deg"]
FLAGS = ["rtc_present", "status"]


@pytest.fixture(scope="module")
def nan_cube(small_cube, tmp_path_factory):
    """``small_cube`` with unwritten samples: coh's second shard object gone (samples 8-15
    read as NaN), rtc sample 5 partly NaN and sample 20 all NaN (rewritten by zarr-python)."""
    dest = tmp_path_factory.mktemp("streaming") / "nasar.zarr"
    shutil.copytree(small_cube, dest)
    (shard,) = [p for p in (dest / "coh" / "c" / "1").rglob("*") if p.is_file()]
    shard.unlink()
    rtc = zarr.open_array(str(dest / "rtc"), mode="r+")
    sample = rtc[5]
    sample[0, 0, 0, :3] = np.nan
    rtc[5] = sample
    rtc[20] = np.nan
    return dest


@pytest.fixture(scope="module")
def materialized(nan_cube):
    """Every variable read whole (numpy), the reference."""
    return {name: np.asarray(v.values) for name, v in open_cube(str(nan_cube)).data_vars.items()}


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of one inner chunk (2 samples), so each dask chunk streams in several."""
    monkeypatch.setattr(streaming, "PIECE_BYTES", 1)
    monkeypatch.setattr(streaming, "REMOTE_PIECE_BYTES", 1)


def _chunk(path, name, rows=range(0, 8)):
    group = zarr.open_group(str(path), mode="r")
    layout = backend.array_layout(group[name], str(path / name))
    return backend.LazyRows(layout, rows)


def _close(got, want, exact):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        scale = np.abs(want[np.isfinite(want)]).max(initial=0.0)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-4 * scale)


def test_the_fixture_has_nan_where_intended(materialized):
    assert np.isnan(materialized["coh"][8:16]).all() and not np.isnan(materialized["coh"][:8]).any()
    assert np.isnan(materialized["rtc"][5]).sum() == 3 * 128
    assert np.isnan(materialized["rtc"][20]).all()


@pytest.mark.parametrize("name", FLOATS + FLAGS)
@pytest.mark.parametrize("op", ["sum", "mean", "min", "max", "count"])
def test_dataset_reductions_equal_numpy(nan_cube, materialized, small_pieces, name, op):
    ds = open_cube(str(nan_cube), chunks="shard")
    assert len(ds.chunks["sample"]) == 4
    values = materialized[name]
    nan = values.dtype.kind == "f"
    want_fn = {
        "sum": np.nansum if nan else np.sum,
        "mean": np.nanmean if nan else np.mean,
        "min": np.nanmin if nan else np.min,
        "max": np.nanmax if nan else np.max,
    }
    dims = [None, "sample"] + (["pol"] if "pol" in ds[name].dims else [])
    for dim in dims:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = getattr(ds[name], op)(dim).compute(scheduler="threads").values
            axis = None if dim is None else ds[name].dims.index(dim)
            if op == "count":
                want = np.sum(~np.isnan(values) if nan else np.ones_like(values, bool), axis=axis)
            else:
                want = want_fn[op](values, axis=axis)
        if op == "mean" or (op == "sum" and nan):
            want = np.asarray(want).astype(got.dtype)
        _close(got, want, exact=op in ("min", "max", "count") or not nan)


@pytest.mark.parametrize(
    "func",
    [np.sum, np.nansum, np.min, np.max, np.nanmin, np.nanmax, np.any, np.all],
)
@pytest.mark.parametrize("axis", [None, 0, (0, 2), (1, -1), (3, 4, 5)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_numpy_functions_on_a_chunk_stream_and_match(nan_cube, small_pieces, func, axis, keepdims):
    chunk = _chunk(nan_cube, "rtc", range(2, 24))  # starts inside an inner chunk, 3 objects
    want_input = backend.read_rows(chunk.layout, slice(2, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = func(chunk, axis=axis, keepdims=keepdims)
        want = func(want_input, axis=axis, keepdims=keepdims)
    assert chunk._values is None  # streamed, never read whole
    assert type(got) is type(want)
    exact = func not in (np.sum, np.nansum)
    _close(got, want, exact)


def test_dtype_and_the_ndarray_methods(nan_cube, small_pieces):
    chunk = _chunk(nan_cube, "rtc", range(0, 16))
    values = backend.read_rows(chunk.layout, slice(0, 16))
    _close(
        chunk.sum(axis=(0, 4), dtype=np.float64), values.sum(axis=(0, 4), dtype=np.float64), False
    )
    _close(np.nansum(chunk, dtype="f8"), np.nansum(values, dtype="f8"), False)
    _close(chunk.max(axis=1), values.max(axis=1), True)
    status = _chunk(nan_cube, "status", range(0, 32))
    _close(status.sum(), np.asarray(status).sum(), True)  # uint8 -> uint64, exact
    assert np.sum(status).dtype == np.uint64
    present = _chunk(nan_cube, "rtc_present", range(3, 29))
    _close(np.sum(present, axis=(0, 1)), np.sum(np.asarray(present), axis=(0, 1)), True)
    assert chunk._values is None and present._values is not None


def test_unhandled_arguments_read_the_chunk_whole_and_match(nan_cube, small_pieces):
    chunk = _chunk(nan_cube, "rtc", range(0, 8))
    values = backend.read_rows(chunk.layout, slice(0, 8))
    mask = np.zeros(values.shape, bool)
    mask[1] = True
    assert np.sum(chunk, where=mask) == np.sum(values, where=mask)
    assert np.nanmin(chunk, initial=-5.0) == -5.0
    assert np.isnan(np.min(chunk, initial=-5.0))  # sample 5 holds NaN
    out = np.empty((), np.float32)
    np.nansum(chunk, out=out)
    assert out == np.nansum(values)
    assert np.sum(chunk, axis=()).shape == values.shape  # nothing reduced: elementwise


def test_elementwise_steps_are_lazy_and_behave_as_arrays(nan_cube, small_pieces):
    chunk = _chunk(nan_cube, "rtc", range(0, 8))
    values = backend.read_rows(chunk.layout, slice(0, 8))
    nan = np.isnan(chunk)
    assert isinstance(nan, streaming.LazyMap) and nan.dtype == bool and nan.shape == chunk.shape
    filled = np.where(nan, np.zeros((), np.float32), chunk)
    assert isinstance(filled, streaming.LazyMap) and chunk._values is None
    assert repr(filled).startswith("LazyMap(where, shape=(8, 2, 2, 2, 128, 128)")
    scaled = chunk * 2 + 1
    assert isinstance(scaled, streaming.LazyMap)
    # used as an array, an expression is evaluated as numpy would: the chunk read whole
    # (once, kept), every step on whole arrays
    np.testing.assert_array_equal(np.asarray(filled), np.where(np.isnan(values), 0, values))
    assert "read" in repr(chunk) and "not evaluated" in repr(nan)
    np.testing.assert_array_equal(scaled.copy(), values * 2 + 1)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(~nan)), ~np.isnan(values))
    assert type(np.isnan(chunk)) is np.ndarray  # a chunk already read: plain numpy
    # an input that does not line up with the samples: numpy's own error
    with pytest.raises(ValueError, match="could not be broadcast"):
        np.add(chunk, np.ones(3))
    # a single dask chunk comes back from compute() as numpy, not as the lazy object
    x = da.from_array(backend.ChunkSource(backend.FastBackendArray(chunk.layout)), chunks=8)
    got = da.isnan(x[:8]).compute(scheduler="sync")
    assert type(got) is np.ndarray and np.array_equal(got, np.isnan(values))


def test_a_mean_reads_each_chunk_once_and_never_whole(nan_cube, small_pieces):
    """Peak numpy memory of a whole-cube mean stays far below one dask chunk: the
    chunks are read a piece at a time, never allocated whole (tracemalloc counts
    numpy's buffers)."""
    ds = open_cube(str(nan_cube), chunks={"sample": 32})
    chunk_bytes = ds.rtc.data.blocks[0].nbytes  # 32 samples (4 shards), ~17 MB
    ds.rtc.mean().compute(scheduler="sync")  # warm imports and caches
    tracemalloc.start()
    try:
        got = ds.rtc.mean().compute(scheduler="sync")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a piece (1 MB), its encoded bytes and a NaN mask: ~3 MB
    assert peak < chunk_bytes / 4, (peak, chunk_bytes)
    assert np.isfinite(float(got))


def test_histogram_streams_and_equals_the_whole_block_kernel(nan_cube, small_pieces):
    ds = open_cube(str(nan_cube))
    whole = open_cube(str(nan_cube), chunks=None).load()
    np.testing.assert_array_equal(ds.nasar.histogram().values, whole.nasar.histogram().values)
    np.testing.assert_array_equal(
        ds.nasar.histogram("coh", by=None).values, whole.nasar.histogram("coh", by=None).values
    )


def test_reductions_on_a_local_cluster(dask_client, nan_cube, materialized):
    ds = open_cube(str(nan_cube))
    got = dask_client.compute(
        [ds.rtc.mean(), ds.coh.max(), ds.status.sum(), ds.coh.count("sample")], sync=True
    )
    _close(got[0].values, np.float32(np.nanmean(materialized["rtc"])), False)
    assert got[1].values == np.nanmax(materialized["coh"])
    assert got[2].values == materialized["status"].sum()
    np.testing.assert_array_equal(got[3].values, (~np.isnan(materialized["coh"])).sum(axis=0))


def test_a_scattered_isel_still_reads_only_its_inner_chunks(nan_cube, materialized):
    picked = [3, 17, 30]
    with RangeServer(nan_cube.parent) as server, CountingProxy(server.url) as proxy:
        backend.INDEX_CACHE._reset()
        ds = open_cube(f"{proxy.url}/{nan_cube.name}")
        proxy.reset()
        got = ds.rtc.isel(sample=picked).mean().compute(scheduler="sync")
        requests = proxy.reset()
    _close(got.values, np.float32(np.nanmean(materialized["rtc"][picked])), False)
    ranged = [r for r in requests if "/rtc/" in r.path]
    assert ranged and all(r.range for r in ranged)  # no whole shard object
    chunk_bytes = {r.bytes_out for r in ranged if r.bytes_out > 10_000}
    assert sum(r.bytes_out for r in ranged) < 3 * 2 * 524_288 + 3 * 200  # 3 inner chunks + indexes
    assert len(chunk_bytes) >= 1


def test_remote_streamed_reductions_equal_local(nan_cube, materialized, small_pieces):
    with RangeServer(nan_cube.parent) as server:
        backend.INDEX_CACHE._reset()
        ds = open_cube(f"{server.url}/{nan_cube.name}")
        mean, top, count = dask.compute(
            ds.rtc.mean(), ds.rtc.max(), ds.coh.count(), scheduler="threads"
        )
    _close(mean.values, np.float32(np.nanmean(materialized["rtc"])), False)
    assert top.values == np.nanmax(materialized["rtc"])
    assert count.values == (~np.isnan(materialized["coh"])).sum()
