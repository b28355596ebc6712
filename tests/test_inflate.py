"""The fast inflaters (isal, zlib-ng) against zlib: same bytes, same caps, same errors."""

from __future__ import annotations

import zipfile
import zlib

import numpy as np
import pytest

from nasar_zarr import schema, source
from nasar_zarr.errors import MemberTooLargeError, SampleDecodeError
from nasar_zarr.source import npz
from nasar_zarr.testing import encode_npz, make_batch

NAMES = list(source.INFLATERS)


def _sample(seed=0):
    rng = np.random.default_rng(seed)
    batch = make_batch(rng, 1, cross_pol_available=np.ones(1, bool), ascending=np.ones(1, bool))
    return {k: np.ascontiguousarray(batch[k][0]) for k in schema.SOURCE_KEYS}


def _deflate(data: bytes, level: int = 6) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def test_isal_is_installed_and_the_default():
    # a declared dependency: the fallback to zlib is for platforms without a wheel
    assert NAMES[0] == source.INFLATER == "isal"
    assert NAMES[-1] == "zlib"


@pytest.mark.parametrize("name", NAMES)
def test_every_inflater_gives_zlibs_bytes(name):
    rng = np.random.default_rng(3)
    payloads = [
        b"",
        b"x",
        rng.integers(0, 4, 300_000, dtype=np.uint8).tobytes(),
        rng.standard_normal(100_000).astype(np.float32).tobytes(),
    ]
    for data in payloads:
        for level in (1, 6, 9):
            packed = _deflate(data, level)
            assert source.inflate(packed, len(data), inflater=name) == data
            assert zlib.decompress(packed, -15) == data


@pytest.mark.parametrize("name", NAMES)
def test_every_inflater_decodes_a_deflated_npz_like_zlib(name):
    sample = _sample()
    payload = encode_npz(sample, compressed=True)
    got = source.decode_npz(payload, shard="s.tar", key="k", inflater=name)
    ref = source.decode_npz(payload, shard="s.tar", key="k", inflater="zlib")
    assert list(got) == list(ref) == list(sample)
    for key in sample:
        assert got[key].tobytes() == ref[key].tobytes() == sample[key].tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_cap_holds_with_every_inflater(name):
    data = bytes(1_000_000)
    packed = _deflate(data)  # ~1 KB that inflates to 1 MB
    assert source.inflate(packed, 1_000_000, inflater=name) == data
    with pytest.raises(OverflowError, match=r"^inflates past 999,999 bytes$"):
        source.inflate(packed, 999_999, inflater=name)


@pytest.mark.parametrize("name", NAMES)
def test_a_member_lying_about_its_size_is_capped_with_every_inflater(name):
    # The central directory claims a small size; the stream inflates to 8 MiB.
    bomb = np.zeros((8, 512, 512), np.float32)
    payload = bytearray(encode_npz({"dem": bomb}, compressed=True))
    (info,) = zipfile.ZipFile(__import__("io").BytesIO(bytes(payload))).infolist()
    cd = payload.rindex(b"PK\x01\x02")
    payload[cd + 24 : cd + 28] = (1000).to_bytes(4, "little")  # uncompressed size
    assert info.file_size > 1_000_000
    with pytest.raises(MemberTooLargeError) as err:
        source.decode_npz(
            bytes(payload), shard="s.tar", key="k", max_member_bytes=1_000_000, inflater=name
        )
    assert str(err.value) == (
        "s.tar: sample 'k': npz entry 'dem.npy' inflates past the cap of 1,000,000 bytes"
    )


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_and_truncated_streams_are_errors_with_every_inflater(name):
    data = np.arange(50_000, dtype=np.float32).tobytes()
    packed = _deflate(data)
    with pytest.raises(ValueError, match=r"^deflate stream ends early$"):
        source.inflate(packed[: len(packed) // 2], len(data), inflater=name)
    with pytest.raises(ValueError, match=r"^invalid deflate stream \("):
        source.inflate(b"\xff" * 64, len(data), inflater=name)


@pytest.mark.parametrize("name", NAMES)
def test_bad_crc_of_a_deflated_member_is_caught_with_every_inflater(name):
    payload = bytearray(encode_npz(_sample(), compressed=True))
    cd = payload.index(b"PK\x01\x02")  # the first entry's CRC-32 in the central directory
    payload[cd + 16] ^= 0xFF
    with pytest.raises(SampleDecodeError) as err:
        source.decode_npz(bytes(payload), shard="s.tar", key="k", inflater=name)
    assert str(err.value) == (
        "s.tar: sample 'k': corrupt npz member: bad CRC-32 for 'prime_rtc_view_0.npy'"
    )


def test_crc32_is_zlibs():
    data = np.random.default_rng(1).bytes(1_000_003)
    assert source.crc32(data) == zlib.crc32(data)
    assert source.crc32(data[500:], source.crc32(data[:500])) == zlib.crc32(data)


def test_npz_the_fast_parser_does_not_take_goes_through_zipfile():
    # a zip comment: not what np.savez writes, so zipfile parses it; same arrays
    sample = _sample()
    payload = encode_npz(sample)
    assert npz._central_directory(memoryview(payload)) is not None
    commented = payload[:-2] + (5).to_bytes(2, "little") + b"hello"
    assert npz._central_directory(memoryview(commented)) is None
    got = source.decode_npz(commented, shard="s.tar", key="k")
    for key in sample:
        assert got[key].tobytes() == sample[key].tobytes()
