"""Shards built one inner chunk at a time read back through zarr-python, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from nasar_zarr import sharding
from nasar_zarr.layout import compressors
from nasar_zarr.plan import ConvertOptions


def write_with_sharding_module(path, data, options: ConvertOptions):
    n = data.shape[0]
    arr = zarr.create_array(
        str(path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=(options.inner_chunk, *data.shape[1:]),
        shards=(options.shard, *data.shape[1:]),
        compressors=compressors(options),
        fill_value=np.nan,
        zarr_format=3,
    )
    encode = sharding.inner_encoder(options.codec, options.clevel)
    k = options.inner_chunk
    for s, lo in enumerate(range(0, n, options.shard)):
        hi = min(lo + options.shard, n)
        pieces = []
        for c in range(lo, hi, k):
            block = np.full((k, *data.shape[1:]), np.nan, dtype=data.dtype)
            block[: min(k, hi - c)] = data[c : min(c + k, hi)]
            pieces.append(encode(block))
        key = arr.metadata.encode_chunk_key((s,) + (0,) * (data.ndim - 1))
        body = b"".join(pieces) + sharding.shard_index([len(p) for p in pieces], options.shard // k)
        (path / key).parent.mkdir(parents=True, exist_ok=True)
        (path / key).write_bytes(body)
    return zarr.open_array(str(path), mode="r")


@pytest.mark.parametrize("codec", ["blosc-zstd", "blosc-lz4", "zstd", "none"])
def test_each_codec_reads_back(tmp_path, codec):
    data = np.random.default_rng(0).random((13, 3, 5), dtype=np.float32)
    arr = write_with_sharding_module(
        tmp_path / "a.zarr", data, ConvertOptions(inner_chunk=2, shard=8, codec=codec)
    )
    assert arr[:].tobytes() == data.tobytes()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    inner=st.sampled_from([1, 2, 3, 4]),
    per_shard=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_any_layout_reads_back(tmp_path_factory, n, inner, per_shard, seed):
    data = np.random.default_rng(seed).random((n, 4), dtype=np.float32)
    data[::5] = np.nan
    options = ConvertOptions(inner_chunk=inner, shard=inner * per_shard, codec="blosc-lz4")
    arr = write_with_sharding_module(tmp_path_factory.mktemp("s") / "a.zarr", data, options)
    np.testing.assert_array_equal(arr[:], data)
    assert arr[n - 1 :].tobytes() == data[n - 1 :].tobytes()


def test_index_marks_empty_chunks():
    index = sharding.shard_index([10, None, 5], 4)
    pairs = np.frombuffer(index[:-4], dtype="<u8").reshape(4, 2)
    assert pairs.tolist() == [[0, 10], [sharding.EMPTY] * 2, [10, 5], [sharding.EMPTY] * 2]
    with pytest.raises(ValueError, match="5 chunks for a shard of 4"):
        sharding.shard_index([1] * 5, 4)
