"""Every stored chunk carries a CRC-32C: one flipped byte is refused by every reader.

A byte inside a compressed inner chunk of ``rtc`` (not its shard index) is
flipped in a copy of the session cube; each reader users reach for must raise
rather than return wrong pixels: ``open_cube`` (dask chunks and ``chunks=None``),
plain ``xr.open_zarr``, zarr-python, ``CubeReader`` (each engine), tensorstore,
and ``nasar-zarr verify DEST``.
"""

from __future__ import annotations

import shutil
import warnings

import dask
import numpy as np
import pytest
import xarray as xr
import zarr

from nasar_zarr import CubeReader, backend, open_cube, sharding, verify
from nasar_zarr.errors import CubeDamagedError

from .conftest import cli


def _object_and_index(array_dir, key="c/0/0/0/0/0/0", per_shard=4):
    path = array_dir / key
    data = path.read_bytes()
    index = sharding.parse_index(data, per_shard)
    return path, data, index


@pytest.fixture(scope="module")
def damaged(small_cube, tmp_path_factory):
    """A copy of the session cube with one byte flipped inside rtc's inner chunk 1
    of shard object 0 (samples 2-3), away from the chunk's checksum trailer."""
    dest = tmp_path_factory.mktemp("damaged") / "nasar.zarr"
    shutil.copytree(small_cube, dest)
    path, data, index = _object_and_index(dest / "rtc")
    offset, nbytes = (int(v) for v in index[1])
    flip = offset + nbytes // 2
    damaged_bytes = bytearray(data)
    damaged_bytes[flip] ^= 0x01
    path.write_bytes(bytes(damaged_bytes))
    return dest


EXPECTED = (
    r"rtc: inner chunk 1 of object c/0/0/0/0/0/0 \(samples 2-3\) at .*rtc fails its CRC-32C"
    r" \(CRC-32C [0-9a-f]{8}, stored [0-9a-f]{8}\): the cube is damaged there;"
    r" `nasar-zarr verify DEST` lists every damaged chunk$"
)


def test_every_chunk_of_a_new_cube_ends_with_crc32c(small_cube):
    group = zarr.open_group(str(small_cube), mode="r")
    for name, array in group.arrays():
        codecs = array.metadata.to_dict()["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            inner = codecs[0]["configuration"]["codecs"]
            assert inner[-1] == {"name": "crc32c"}, name
            assert [c["name"] for c in codecs[0]["configuration"]["index_codecs"]] == [
                "bytes",
                "crc32c",
            ]
        else:
            assert codecs[-1] == {"name": "crc32c"}, name


def test_fast_reader_refuses_with_the_chunk_named(damaged):
    ds = open_cube(str(damaged))
    with pytest.raises(CubeDamagedError, match=EXPECTED):
        _ = ds.rtc.isel(sample=[2]).values
    with pytest.raises(CubeDamagedError, match=EXPECTED):
        float(ds.rtc.mean())
    # other samples and variables of the same shard still read
    assert np.isfinite(ds.rtc.isel(sample=[0, 1, 4]).values).all()
    assert np.isfinite(ds.coh.isel(sample=slice(0, 8)).values).all()


def test_chunks_none_refuses(damaged):
    ds = open_cube(str(damaged), chunks=None)
    with pytest.raises(CubeDamagedError, match=EXPECTED):
        _ = ds.rtc.isel(sample=3).values


def test_zarr_python_and_plain_xarray_refuse(damaged):
    array = zarr.open_array(str(damaged / "rtc"), mode="r")
    with pytest.raises(ValueError, match="Stored and computed checksum do not match"):
        array[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = xr.open_zarr(str(damaged))
    with pytest.raises(ValueError, match="Stored and computed checksum do not match"):
        _ = plain.rtc.isel(sample=2).values


def test_tensorstore_refuses(damaged):
    ts = pytest.importorskip("tensorstore")
    array = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(damaged / "rtc")}},
        read=True,
    ).result()
    with pytest.raises(ValueError, match="DATA_LOSS: .* Digest mismatch"):
        array[2].read().result()
    assert np.isfinite(array[0:2].read().result()).all()


@pytest.mark.parametrize(
    "engine, error, message",
    [
        (None, CubeDamagedError, EXPECTED),
        ("shards", CubeDamagedError, EXPECTED),
        ("tensorstore", ValueError, "DATA_LOSS: .* Digest mismatch"),
        ("zarr", ValueError, "Stored and computed checksum do not match"),
    ],
)
def test_cube_reader_refuses(damaged, engine, error, message):
    reader = CubeReader(str(damaged), engine=engine)
    with pytest.raises(error, match=message):
        reader[2]
    with pytest.raises(error, match=message):
        reader[[0, 3]]


def test_verify_dest_names_the_damaged_chunk(damaged):
    report = verify(str(damaged), workers=0)
    assert not report.ok
    found = [str(m) for m in report.mismatches]
    assert any(
        "rtc/c/0/0/0/0/0/0: inner chunk 1 (samples 2-3) fails its CRC-32C" in m for m in found
    ), found
    result = cli("verify", str(damaged), "--workers", "0")
    assert result.returncode == 1
    assert "inner chunk 1 (samples 2-3) fails its CRC-32C" in result.stdout


def test_a_damaged_flag_chunk_is_refused(small_cube, tmp_path):
    dest = tmp_path / "nasar.zarr"
    shutil.copytree(small_cube, dest)
    path = dest / "status" / "c" / "0"
    data = bytearray(path.read_bytes())
    data[1] ^= 0x10  # inside inner chunk 0 (the flags are sharded like the data variables)
    path.write_bytes(bytes(data))
    with (
        dask.config.set(scheduler="threads"),  # this process, not a session-wide cluster
        pytest.raises(
            CubeDamagedError,
            match=r"status: inner chunk 0 of object c/0 \(samples 0-1\) at .*status fails its CRC",
        ),
    ):
        _ = open_cube(str(dest)).status.values


def test_cubes_without_chunk_checksums_still_read(tmp_path):
    """A contract-1 cube (no crc32c after the compressor) decodes as before."""
    from zarr.codecs import BloscCodec

    data = np.random.default_rng(1).random((10, 3, 4), dtype=np.float32)
    array = zarr.create_array(
        str(tmp_path / "old"),
        shape=data.shape,
        dtype=data.dtype,
        chunks=(2, 3, 4),
        shards=(4, 3, 4),
        compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
        fill_value=np.nan,
        zarr_format=3,
    )
    array[:] = data
    layout = backend.array_layout(array, str(tmp_path / "old"))
    assert layout is not None and not layout.checksum
    assert backend.read_rows(layout, slice(None)).tobytes() == data.tobytes()
    assert backend.read_rows(layout, [7, 1]).tobytes() == data[[7, 1]].tobytes()


def test_sharding_module_checks_its_own_trailer():
    encoded = sharding.with_checksum(b"payload")
    assert bytes(sharding.checked(memoryview(encoded))) == b"payload"
    with pytest.raises(sharding.ChecksumMismatch, match="CRC-32C [0-9a-f]{8}, stored"):
        sharding.checked(memoryview(b"payloaX" + encoded[-4:]))
    with pytest.raises(sharding.ChecksumMismatch, match="3 bytes, shorter than a CRC-32C"):
        sharding.checked(memoryview(b"abc"))
