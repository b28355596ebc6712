"""Bad input under --on-error raise (one clear line, nothing lost) and skip (status 2, NaN,
a report), for every defect kind; good samples stay bit-exact."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import nasar_zarr as nz
from nasar_zarr import schema
from nasar_zarr.api import verify
from nasar_zarr.cli import main
from nasar_zarr.errors import SourceError
from nasar_zarr.store import REJECTIONS_FILE
from nasar_zarr.testing import encode_npz, write_corpus, write_tar
from tests.conftest import decode_with_card

SHARD1 = "data/nasar-train-000001.tar"
BAD = "nasar_000000005"  # 2nd sample of shard 1 (shards of 4 samples each)


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def edit_sample(root: Path, key: str, change: Callable[[dict], dict | bytes]) -> None:
    """Rewrite ``key``'s npz in shard 1 with ``change(arrays)`` (arrays or raw bytes)."""
    out = []
    for name, data in members(root / SHARD1):
        if name == f"{key}.npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            new = change(arrays)
            data = new if isinstance(new, bytes) else encode_npz(new)
        out.append((name, data))
    write_tar(root / SHARD1, out)


def corrupt_bytes(arrays):
    data = bytearray(encode_npz(arrays))
    data[4000:4010] = b"\x00\x01" * 5
    return bytes(data)


def pickled(arrays):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, a)
        with zf.open("payload.npy", "w") as f:
            obj = np.empty(1, dtype=object)
            obj[0] = {"not": "allowed"}
            np.lib.format.write_array(f, obj, allow_pickle=True)
    return buf.getvalue()


def truncate(root: Path) -> None:
    data = (root / SHARD1).read_bytes()
    # cut inside the 2nd member: samples 4 keeps, 5 is cut, 6 and 7 are gone
    keep = 512 + 1_181_500 + 512 + 400_000
    (root / SHARD1).write_bytes(data[:keep])


def duplicate(root: Path) -> None:
    ms = members(root / SHARD1)
    write_tar(root / SHARD1, [*ms, next((n, d) for n, d in ms if n.startswith(BAD))])


def ghost_row(root: Path) -> None:
    table = pq.read_table(root / "metadata.parquet").to_pandas()
    row = table.iloc[[5]].copy()
    row["sample_key"] = "ghost"
    row["sample_index_in_shard"] = 99
    import pandas as pd

    table = pd.concat([table, row], ignore_index=True)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), root / "metadata.parquet")


def orphan(root: Path) -> None:
    ms = members(root / SHARD1)
    name, data = ms[0]
    write_tar(root / SHARD1, [*ms, ("stray.npz", data)])


def nonfinite(arrays):
    arrays["coh_view_0"] = arrays["coh_view_0"].copy()
    arrays["coh_view_0"][0, 0, :3] = [np.nan, np.inf, -np.inf]
    return arrays


def bomb(arrays):
    return encode_npz({**arrays, "dem": np.zeros((80, 1024, 1024), np.float32)}, compressed=True)


# kind -> (corrupt the corpus, rejected keys, reason as reported)
CASES = {
    "truncated_tar": (
        truncate,
        [BAD, "nasar_000000006", "nasar_000000007"],
        "truncated tar: member 'nasar_000000005.npz' needs bytes up to {end:,}"
        " but the file has {size:,}",
    ),
    "corrupt_npz": (
        lambda r: edit_sample(r, BAD, corrupt_bytes),
        [BAD],
        "corrupt npz member: bad CRC-32 for 'prime_rtc_view_0.npy'",
    ),
    "pickled_array": (
        lambda r: edit_sample(r, BAD, pickled),
        [BAD],
        "'nasar_000000005.npz/payload.npy' holds an object array (pickled data);"
        " refusing to unpickle it",
    ),
    "wrong_shape": (
        lambda r: edit_sample(r, BAD, lambda a: {**a, "dem": a["dem"][:, :100]}),
        [BAD],
        "array 'dem' has shape (1, 100, 128), expected (1, 128, 128)",
    ),
    "wrong_dtype": (
        lambda r: edit_sample(r, BAD, lambda a: {**a, "dem": a["dem"].astype("f8")}),
        [BAD],
        "array 'dem' has dtype float64, expected float32",
    ),
    "missing_array": (
        lambda r: edit_sample(r, BAD, lambda a: {k: v for k, v in a.items() if k != "coh_view_1"}),
        [BAD],
        "missing arrays ['coh_view_1']",
    ),
    "duplicate_key": (
        duplicate,
        [BAD],
        "duplicate sample key: member 'nasar_000000005.npz' repeats it",
    ),
    "metadata_row_without_sample": (
        ghost_row,
        ["ghost"],
        "metadata.parquet lists this sample but no tar holds it",
    ),
    "tar_sample_not_in_metadata": (
        orphan,
        ["stray"],
        "sample is in the tar but not in metadata.parquet",
    ),
    "decompression_bomb": (
        lambda r: edit_sample(r, BAD, bomb),
        [BAD],
        "npz entry 'dem.npy' inflates to 335,544,448 bytes, over the cap of 67,108,864",
    ),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_corpus(
        tmp_path_factory.mktemp("pristine"), n_shards=2, samples_per_shard=4, seed=13
    )


@pytest.fixture
def broken(pristine, tmp_path, request):
    import shutil

    kind = request.param
    root = tmp_path / "corpus"
    shutil.copytree(pristine.root, root)
    good = decode_with_card(root)
    with tarfile.open(root / SHARD1) as tar:
        second = tar.getmembers()[1]
    CASES[kind][0](root)
    sizes = {"end": second.offset_data + second.size, "size": (root / SHARD1).stat().st_size}
    corrupt, keys, reason = CASES[kind]
    return kind, root, good, keys, reason.format(**sizes)


@pytest.mark.parametrize("broken", sorted(CASES), indirect=True)
def test_raise_names_shard_and_key_and_keeps_what_was_written(broken, tmp_path, capsys):
    kind, root, _, keys, reason = broken
    dest = tmp_path / "cube.zarr"
    code = main(["convert", str(root), str(dest), "--shard", "4", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == f"nasar-zarr convert: error: {SHARD1}: sample {keys[0]!r}: {reason}\n"
    if dest.exists():  # a task-level failure: shard 0 was written before it and stays valid
        assert verify(str(dest), workers=0).mismatches[0].what.startswith("not written")


@pytest.mark.parametrize("broken", sorted(CASES), indirect=True)
def test_skip_rejects_bad_samples_and_keeps_good_ones_bit_exact(broken, tmp_path, capsys):
    kind, root, good, keys, reason = broken
    dest = tmp_path / "cube.zarr"
    code = main(
        ["convert", str(root), str(dest), "--shard", "4", "--workers", "0", "--on-error", "skip"]
    )
    out = capsys.readouterr().out
    assert code == 0
    ds = nz.open_cube(str(dest)).load()
    report = json.loads((dest / REJECTIONS_FILE).read_text())
    assert [(r["shard"], r["key"]) for r in report["rejected"]][:1] == [(SHARD1, keys[0])]
    assert report["rejected"][0]["reason"] == reason
    assert {r["key"] for r in report["rejected"]} == set(keys)
    assert f"rejected {SHARD1}: {keys[0]!r}: {reason}" in out
    in_cube = set(ds.sample.values.tolist())
    for key in in_cube:
        sample = ds.sel(sample=key)
        if key in keys:
            assert int(sample.status) == schema.STATUS_REJECTED
            for name in schema.VARIABLES:
                assert np.isnan(sample[name].values).all()
            assert not sample.rtc_present.values.any()
        else:
            assert int(sample.status) == schema.STATUS_WRITTEN
            back = schema.cube_to_source({n: sample[n].values for n in schema.VARIABLES})
            for name in schema.SOURCE_KEYS:
                assert back[name].tobytes() == good[key][name].tobytes()
    assert f"{sum(k in in_cube for k in keys)} rejected" in out
    assert verify(str(dest), src=str(root), workers=0).ok


def test_nonfinite_values_are_reported_and_stored_as_they_are(pristine, tmp_path, capsys):
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(pristine.root, root)
    edit_sample(root, BAD, nonfinite)
    dest = tmp_path / "cube.zarr"
    assert main(["convert", str(root), str(dest), "--shard", "4", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"non-finite values kept as they are in {SHARD1}: {BAD!r}: {{'coh_view_0': 3}}" in out
    report = json.loads((dest / REJECTIONS_FILE).read_text())
    assert report["rejected"] == []
    assert report["nonfinite"] == [
        {"shard": SHARD1, "key": BAD, "row": 5, "nonfinite_values": {"coh_view_0": 3}}
    ]
    coh = nz.open_cube(str(dest)).coh.sel(sample=BAD, view=0).values
    assert np.isnan(coh[0, 0]) and coh[0, 1] == np.inf and coh[0, 2] == -np.inf
    assert int(nz.open_cube(str(dest)).status.sel(sample=BAD)) == schema.STATUS_WRITTEN


def test_oversized_tar_member_under_both_policies(pristine, tmp_path, capsys):
    dest = tmp_path / "cube.zarr"
    code = main(
        [
            "convert",
            str(pristine.root),
            str(dest),
            "--shard",
            "4",
            "--workers",
            "0",
            "--max-member-mb",
            "1",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith(
        "nasar-zarr convert: error: data/nasar-train-000000.tar: sample 'nasar_000000000':"
        " member 'nasar_000000000.npz' is 1,18"
    )
    with pytest.raises(SourceError):
        nz.plan_conversion(str(pristine.root), str(dest), max_member_bytes=2**20)
    plan = nz.plan_conversion(
        str(pristine.root), str(dest), max_member_bytes=2**20, on_error="skip", shard=4
    )
    assert len(plan.rejected) == 8
    ds = plan.execute(workers=0)
    np.testing.assert_array_equal(ds.status.values, schema.STATUS_REJECTED)


def test_every_error_survives_a_trip_from_a_dask_worker():
    """dask.distributed sends a task's exception to the client with tblib's pickling:
    each of ours must come back as itself, with its text."""
    import inspect

    from distributed.protocol import pickle as dask_pickle
    from tblib import pickling_support

    from nasar_zarr import backend, errors, ranges, sharding

    classes = {
        cls
        for module in (errors, backend, ranges, sharding)
        for cls in vars(module).values()
        if inspect.isclass(cls)
        and issubclass(cls, BaseException)
        and cls.__module__.startswith("nasar_zarr")
    }
    assert len(classes) >= 20
    for cls in sorted(classes, key=lambda c: c.__name__):
        needs_shard = "shard" in inspect.signature(cls.__init__).parameters
        error = cls("s.tar: k: bad", shard="s.tar", key="k") if needs_shard else cls("a: b")
        pickling_support.install(error)
        back = dask_pickle.loads(dask_pickle.dumps(error, protocol=4))
        assert type(back) is cls and str(back) == str(error), cls.__name__
