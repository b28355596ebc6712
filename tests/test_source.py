"""nasar_zarr.source: bit-exact reads, both member layouts, and errors that name shard and key."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest

from nasar_zarr import schema, source
from nasar_zarr.errors import (
    DuplicateSampleError,
    MemberTooLargeError,
    SampleDecodeError,
    SampleSchemaError,
    ShardCorruptError,
    SourceError,
)
from nasar_zarr.testing import encode_npz, make_batch, sample_members, write_tar
from tests.conftest import decode_with_card


def _arrays(seed=0, n=1):
    rng = np.random.default_rng(seed)
    batch = make_batch(rng, n, cross_pol_available=np.ones(n, bool), ascending=np.ones(n, bool))
    return [{k: np.ascontiguousarray(batch[k][i]) for k in schema.SOURCE_KEYS} for i in range(n)]


def test_reads_synthetic_corpus_bit_exact(small_corpus):
    expected = decode_with_card(small_corpus.root)
    got = {}
    for path in small_corpus.shard_paths:
        for key, arrays in source.iter_shard(str(small_corpus.root / path), shard=path):
            got[key] = arrays
    assert list(got) == list(expected)
    for key, arrays in got.items():
        for name in schema.SOURCE_KEYS:
            assert arrays[name].dtype == np.float32
            assert arrays[name].tobytes() == expected[key][name].tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_npy_members_read_like_npz(tmp_path, compressed):
    (sample,) = _arrays()
    write_tar(tmp_path / "a.tar", sample_members("k1", sample, layout="npz", compressed=compressed))
    write_tar(tmp_path / "b.tar", sample_members("k1", sample, layout="npy"))
    ((ka, a),) = source.iter_shard(str(tmp_path / "a.tar"))
    ((kb, b),) = source.iter_shard(str(tmp_path / "b.tar"))
    assert ka == kb == "k1"
    for name in schema.SOURCE_KEYS:
        np.testing.assert_array_equal(a[name], sample[name])
        np.testing.assert_array_equal(b[name], sample[name])


def test_member_grouping_ignores_other_members(tmp_path):
    s1, s2 = _arrays(n=2)
    members = [
        ("a/x1.json", b"{}"),
        *sample_members("a/x1", s1),
        ("a/x1.txt", b"hi"),
        *sample_members("a/x2", s2),
        ("README", b"not a sample"),
    ]
    write_tar(tmp_path / "s.tar", members)
    keys = [k for k, _ in source.iter_shard(str(tmp_path / "s.tar"))]
    assert keys == ["a/x1", "a/x2"]
    assert source.member_key("dir/abc.prime_rtc_view_0.npy") == ("dir/abc", "prime_rtc_view_0.npy")


def test_big_endian_float32_is_accepted_and_made_native(tmp_path):
    (sample,) = _arrays()
    swapped = {k: v.astype(">f4") for k, v in sample.items()}
    write_tar(tmp_path / "s.tar", sample_members("k", swapped))
    ((_, arrays),) = source.iter_shard(str(tmp_path / "s.tar"))
    assert arrays["dem"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(arrays["dem"], sample["dem"])


# ---------------------------------------------------------------- errors


def _shard_with(tmp_path, payload: bytes, name="bad.npz"):
    (good,) = _arrays()
    write_tar(tmp_path / "s.tar", [*sample_members("good", good), (name, payload)])
    return str(tmp_path / "s.tar")


def _read_all(path):
    return list(source.iter_shard(path, shard="data/nasar-train-000007.tar"))


def test_truncated_tar(tmp_path):
    s1, s2 = _arrays(n=2)
    write_tar(tmp_path / "s.tar", [*sample_members("k1", s1), *sample_members("k2", s2)])
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: len(data) - 600_000])
    with pytest.raises(ShardCorruptError) as err:
        _read_all(str(tmp_path / "s.tar"))
    assert str(err.value).startswith(
        "data/nasar-train-000007.tar: sample 'k2': truncated tar: member 'k2.npz' needs bytes"
    )
    assert err.value.key == "k2"


def test_not_a_tar(tmp_path):
    (tmp_path / "s.tar").write_bytes(b"garbage" * 1000)
    with pytest.raises(ShardCorruptError, match=r"^data/nasar-train-000007.tar: not a readable"):
        _read_all(str(tmp_path / "s.tar"))


def test_corrupt_npz_bytes(tmp_path):
    (s,) = _arrays()
    payload = bytearray(encode_npz(s))
    payload[5000:5010] = b"\xff" * 10  # inside the first array's data: CRC must catch it
    with pytest.raises(SampleDecodeError) as err:
        _read_all(_shard_with(tmp_path, bytes(payload)))
    assert str(err.value) == (
        "data/nasar-train-000007.tar: sample 'bad': corrupt npz member:"
        " bad CRC-32 for 'prime_rtc_view_0.npy'"
    )


def test_not_a_zip(tmp_path):
    with pytest.raises(SampleDecodeError, match=r"sample 'bad': corrupt npz member: "):
        _read_all(_shard_with(tmp_path, b"\x00" * 3000))


def test_pickled_object_array_is_refused_without_unpickling(tmp_path):
    (s,) = _arrays()

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, a in s.items():
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, a)
        with zf.open("dem_extra.npy", "w") as f:
            obj = np.empty(1, dtype=object)
            obj[0] = Boom()
            np.lib.format.write_array(f, obj, allow_pickle=True, pickle_kwargs={})
    assert pickle.dumps  # the module is there; the reader must never call loads
    with pytest.raises(SampleDecodeError) as err:
        _read_all(_shard_with(tmp_path, buf.getvalue()))
    assert str(err.value) == (
        "data/nasar-train-000007.tar: sample 'bad': 'bad.npz/dem_extra.npy' holds an object"
        " array (pickled data); refusing to unpickle it"
    )


def test_wrong_shape(tmp_path):
    (s,) = _arrays()
    s["dem"] = s["dem"][:, :64]
    with pytest.raises(SampleSchemaError) as err:
        _read_all(_shard_with(tmp_path, encode_npz(s)))
    assert str(err.value) == (
        "data/nasar-train-000007.tar: sample 'bad': array 'dem' has shape"
        " (1, 64, 128), expected (1, 128, 128)"
    )


def test_wrong_dtype(tmp_path):
    (s,) = _arrays()
    s["coh_view_1"] = s["coh_view_1"].astype(np.float64)
    with pytest.raises(
        SampleSchemaError, match="array 'coh_view_1' has dtype float64, expected float32"
    ):
        _read_all(_shard_with(tmp_path, encode_npz(s)))


def test_missing_key(tmp_path):
    (s,) = _arrays()
    del s["slope_deg"]
    with pytest.raises(SampleSchemaError) as err:
        _read_all(_shard_with(tmp_path, encode_npz(s)))
    assert str(err.value) == (
        "data/nasar-train-000007.tar: sample 'bad': missing arrays ['slope_deg']"
    )


def test_unexpected_array(tmp_path):
    (s,) = _arrays()
    s["dem_relief"] = s["dem"]
    with pytest.raises(SampleSchemaError, match=r"unexpected arrays \['dem_relief'\]"):
        _read_all(_shard_with(tmp_path, encode_npz(s)))


def test_duplicate_key(tmp_path):
    s1, s2 = _arrays(n=2)
    write_tar(
        tmp_path / "s.tar",
        [*sample_members("k1", s1), *sample_members("k2", s2), *sample_members("k1", s2)],
    )
    with pytest.raises(DuplicateSampleError) as err:
        _read_all(str(tmp_path / "s.tar"))
    assert str(err.value) == (
        "data/nasar-train-000007.tar: sample 'k1': duplicate sample key: member 'k1.npz' repeats it"
    )


def test_oversized_member(tmp_path):
    (s,) = _arrays()
    size = len(encode_npz(s))
    path = _shard_with(tmp_path, encode_npz(s))
    with pytest.raises(MemberTooLargeError) as err:
        list(source.iter_shard(path, shard="x.tar", max_member_bytes=1_000_000))
    assert str(err.value) == (
        f"x.tar: sample 'good': member 'good.npz' is {size:,} bytes, over the cap of 1,000,000"
        " (raise max_member_bytes if this is intended)"
    )


def test_decompression_bomb_is_capped(tmp_path):
    bomb = {k: np.zeros((64, 1024, 1024), np.float32) for k in ["dem"]}  # 256 MiB inflated
    payload = encode_npz(bomb, compressed=True)
    assert len(payload) < 1_000_000
    with pytest.raises(MemberTooLargeError, match="inflates to 268,435,584 bytes, over the cap"):
        _read_all(_shard_with(tmp_path, payload))


def test_problems_are_collected_when_asked(tmp_path):
    s1, s2 = _arrays(n=2)
    write_tar(tmp_path / "s.tar", [*sample_members("k1", s1), *sample_members("k2", s2)])
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: len(data) - 600_000])
    problems: list[SourceError] = []
    entries = source.index_shard(str(tmp_path / "s.tar"), shard="s.tar", problems=problems)
    assert [e.key for e in entries] == ["k1"]
    assert [(p.key, type(p).__name__) for p in problems] == [("k2", "ShardCorruptError")]


def test_errors_survive_pickling():
    err = SampleSchemaError("bad shape", shard="a.tar", key="k")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.shard, back.key) == (type(err), str(err), "a.tar", "k")
