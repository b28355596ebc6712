"""End to end: corpus -> cube, bit-exact, readable by xarray, zarr and tensorstore;
on a real 2-worker cluster and a real S3-compatible server."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr
import zarr

import nasar_zarr as nz
from nasar_zarr import schema, store
from nasar_zarr.cli import main
from nasar_zarr.testing import write_corpus
from tests.conftest import decode_with_card, release_order


def assert_cube_equals_source(ds: xr.Dataset, corpus_root) -> None:
    """Every variable of every sample equals the card reader's arrays, bit for bit."""
    expected = decode_with_card(corpus_root)
    meta = release_order(pq.read_table(corpus_root / "metadata.parquet").to_pandas())
    assert ds.sample.values.tolist() == meta["sample_key"].tolist()
    loaded = {name: ds[name].values for name in schema.VARIABLES}
    for i, key in enumerate(ds.sample.values.tolist()):
        back = schema.cube_to_source({name: values[i] for name, values in loaded.items()})
        for name in schema.SOURCE_KEYS:
            assert back[name].tobytes() == expected[key][name].tobytes(), (key, name)
    np.testing.assert_array_equal(ds.status.values, schema.STATUS_WRITTEN)
    present = np.array(
        [
            [
                [
                    [expected[k][f"{t}_rtc_view_{v}"][p].any() for p in range(2)]
                    for t in ("prime", "secondary")
                ]
                for v in range(2)
            ]
            for k in ds.sample.values.tolist()
        ]
    )
    np.testing.assert_array_equal(ds.rtc_present.values, present)


def test_small_cube_is_bit_exact(small_cube, small_corpus):
    ds = nz.open_cube(str(small_cube))
    assert dict(ds.sizes) == {
        "sample": 32,
        "view": 2,
        "time": 2,
        "pol": 2,
        "component": 2,
        "y": 128,
        "x": 128,
    }
    assert_cube_equals_source(ds, small_corpus.root)


def test_opens_with_plain_xarray_and_zarr(small_cube):
    ds = xr.open_zarr(str(small_cube))
    assert ds.rtc.dims == ("sample", "view", "time", "pol", "y", "x")
    assert ds.time.values.tolist() == ["prime", "secondary"]
    assert ds.pol.values.tolist() == ["co", "cross"]
    assert ds.component.values.tolist() == ["cos", "sin"]
    assert ds.view.values.tolist() == [0, 1]
    for name, spec in schema.VARIABLES.items():
        assert ds[name].attrs["units"] == spec.units
        assert ds[name].attrs["long_name"] == spec.long_name
        assert "description" in ds[name].attrs
    assert ds.status.attrs["flag_meanings"] == "pending written rejected"
    group = zarr.open_group(str(small_cube), mode="r")
    assert group.metadata.zarr_format == 3
    assert group.metadata.consolidated_metadata is not None
    rtc = group["rtc"]
    assert rtc.chunks == (2, 2, 2, 2, 128, 128) and rtc.shards == (8, 2, 2, 2, 128, 128)
    assert [type(c).__name__ for c in rtc.compressors] == ["BloscCodec", "Crc32cCodec"]
    assert np.isnan(rtc.fill_value)
    prov = store.read_provenance(group.attrs)
    assert prov["layout"] == {"inner_chunk": 2, "shard": 8, "codec": "blosc-lz4", "clevel": 5}
    assert prov["webdataset_summary"]["dem_arrays"] == ["dem", "slope_deg"]
    assert [t["samples"] for t in prov["tar_shards"]] == [11, 7, 14]
    assert group.attrs["Conventions"].startswith("CF-")


def test_open_cube_chunks_are_whole_shards_alike(small_cube):
    ds = nz.open_cube(str(small_cube))
    # Whole shards (here all 4: 16 MiB of rtc is below dask's chunk-size), alike for all.
    assert {name: var.data.chunks[0] for name, var in ds.data_vars.items()} == {
        name: (32,) for name in ds.data_vars
    }
    assert dict(ds.chunks)["sample"] == (32,)
    by_shard = nz.open_cube(str(small_cube), chunks=16)
    assert dict(by_shard.chunks)["sample"] == (16, 16)
    assert not hasattr(ds.quality_score.variable._data, "dask")  # coords stay lazy numpy
    assert ds.rtc.values.tobytes() == by_shard.rtc.values.tobytes()


def test_every_metadata_column_is_a_coordinate(small_cube, small_corpus):
    ds = nz.open_cube(str(small_cube))
    original = pq.read_table(small_corpus.root / "metadata.parquet").to_pandas()
    for column in original.columns:
        assert column in ds.coords, column
        assert ds[column].dims == ("sample",)
    expected = release_order(original)
    pd.testing.assert_frame_equal(nz.metadata_table(ds), expected)


def test_tensorstore_reads_rtc_bit_exact(small_cube):
    import tensorstore as ts

    arr = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(small_cube / "rtc")}}
    ).result()
    got = arr.read().result()
    ds = xr.open_zarr(str(small_cube))
    assert got.tobytes() == ds.rtc.values.tobytes()
    for name in ["dem", "ifg", "inc_angle", "coh", "slope_deg", "status", "rtc_present"]:
        ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(small_cube / name)}}
        ).result()


@pytest.fixture(scope="module")
def awkward_corpus(tmp_path_factory):
    """Uneven shards, shuffled rows, mixed npz, extra members, npy members in one shard,
    and metadata columns of mixed types including nullable ints and tz-aware times."""
    root = tmp_path_factory.mktemp("awkward")
    info = write_corpus(
        root,
        n_shards=3,
        samples_per_shard=[5, 9, 4],
        seed=5,
        compressed="mixed",
        extra_members=True,
        shuffle_metadata=True,
    )
    table = pq.read_table(root / "metadata.parquet").to_pandas()
    n = len(table)
    table["revisit_days"] = pd.array([None if i % 3 == 0 else i for i in range(n)], "Int64")
    table["is_coastal"] = pd.array(
        [None if i % 4 == 0 else i % 2 == 0 for i in range(n)], "boolean"
    )
    table["processed_at"] = pd.date_range("2025-01-01", periods=n, freq="h", tz="America/Chicago")
    table["land_cover"] = pd.Categorical(["forest", "crop", None][i % 3] for i in range(n))
    table["note"] = pd.array([None if i % 5 == 0 else f"n{i}" for i in range(n)], "string")
    table["bursts"] = [[i, i + 1] for i in range(n)]
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), root / "metadata.parquet")
    return info


def test_cli_convert_awkward_corpus_on_cluster(awkward_corpus, tmp_path, dask_client, capsys):
    dest = tmp_path / "cube.zarr"
    address = dask_client.scheduler.address
    assert (
        main(
            [
                "convert",
                str(awkward_corpus.root),
                str(dest),
                "--shard",
                "4",
                "--inner-chunk",
                "2",
                "--scheduler",
                address,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "done: 18 written, 0 rejected, 0 pending" in out
    ds = nz.open_cube(str(dest))
    assert_cube_equals_source(ds, awkward_corpus.root)
    original = pq.read_table(awkward_corpus.root / "metadata.parquet").to_pandas()
    rebuilt = ds.nasar.metadata() if hasattr(ds, "nasar") else nz.metadata_table(ds)
    expected = release_order(original)
    pd.testing.assert_frame_equal(rebuilt, expected)
    assert ds.revisit_days.attrs["nasar_encoding"] == "nullable_int"
    assert str(ds.processed_at.dtype) == "datetime64[ns]"
    # verify compares every awkward column (nulls, NaN, zones, categories, lists) exactly
    from nasar_zarr.api import verify

    report = verify(str(dest), src=str(awkward_corpus.root), workers=0)
    assert report.ok, [str(m) for m in report.mismatches]


def test_cube_smaller_than_one_shard(tmp_path):
    corpus = write_corpus(tmp_path / "c", n_shards=1, samples_per_shard=5, seed=9)
    ds = nz.plan_conversion(
        str(corpus.root), str(tmp_path / "c.zarr"), shard=8, inner_chunk=2
    ).execute(workers=0)
    assert ds.rtc.data.chunks[0] == (5,)
    assert_cube_equals_source(ds, corpus.root)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert group["rtc"].shards[0] == 8 and group["rtc"].chunks[0] == 2
    from nasar_zarr.api import verify

    assert verify(str(tmp_path / "c.zarr"), src=str(corpus.root), workers=0).ok


def test_npy_member_layout_converts(tmp_path):
    corpus = write_corpus(tmp_path / "c", n_shards=2, samples_per_shard=3, seed=2, layout="npy")
    ds = nz.plan_conversion(str(corpus.root), str(tmp_path / "c.zarr"), shard=4).execute(workers=0)
    assert_cube_equals_source_npy(ds, corpus)


def assert_cube_equals_source_npy(ds, corpus):
    from nasar_zarr import source

    for path in corpus.shard_paths:
        for key, arrays in source.iter_shard(str(corpus.root / path)):
            sample = ds.sel(sample=key)
            back = schema.cube_to_source({n: sample[n].values for n in schema.VARIABLES})
            for name in schema.SOURCE_KEYS:
                assert back[name].tobytes() == arrays[name].tobytes()


def test_local_cluster_with_two_processes(small_corpus, tmp_path):
    # The default path: nasar-zarr starts (and closes) its own LocalCluster.
    plan = nz.plan_conversion(str(small_corpus.root), str(tmp_path / "c.zarr"), shard=16)
    ds = plan.execute(workers=2)
    assert_cube_equals_source(ds, small_corpus.root)


def test_s3_round_trip(small_corpus, s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": s3_server["endpoint_url"]}, key="testing", secret="testing"
    )
    fs.mkdir("nasar-src")
    fs.mkdir("nasar-dst")
    fs.put(str(small_corpus.root) + "/", "nasar-src/corpus/", recursive=True)
    options = {
        "client_kwargs": {"endpoint_url": s3_server["endpoint_url"]},
        "key": "testing",
        "secret": "testing",
    }
    plan = nz.plan_conversion(
        "s3://nasar-src/corpus", "s3://nasar-dst/nasar.zarr", shard=8, storage_options=options
    )
    assert plan.n_samples == 32
    plan.execute(workers=0)
    ds = nz.open_cube("s3://nasar-dst/nasar.zarr", storage_options=options)
    assert_cube_equals_source(ds, small_corpus.root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = xr.open_zarr("s3://nasar-dst/nasar.zarr", storage_options=options)
    assert plain.dem.values.tobytes() == ds.dem.values.tobytes()


def test_cli_dry_run_and_info(small_corpus, small_cube, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    assert (
        main(
            [
                "convert",
                str(small_corpus.root),
                str(tmp_path / "x.zarr"),
                "--dry-run",
                "--shard",
                "8",
                "--plan-json",
                str(plan_file),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tasks:     4 (one per Zarr shard; one writer each)" in out
    assert not (tmp_path / "x.zarr").exists()
    assert nz.ConversionPlan.from_json(plan_file.read_text()).n_samples == 32
    assert main(["info", str(small_cube)]) == 0
    out = capsys.readouterr().out
    assert "status: pending 0, written 32, rejected 0" in out
    assert "dims: sample=32" in out
    assert main(["info", str(small_cube), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["variables"]["rtc"]["shards"] == [8, 2, 2, 2, 128, 128]
    assert report["status"] == {"pending": 0, "written": 32, "rejected": 0}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("nasar-zarr convert: error: ")
    assert err == f"nasar-zarr convert: error: {tmp_path / 'nowhere'}: no such file or directory\n"
    assert (
        main(
            [
                "convert",
                str(tmp_path),
                str(tmp_path / "x.zarr"),
                "--shard",
                "10",
                "--inner-chunk",
                "3",
            ]
        )
        == 2
    )
    assert "shard (10) must be a multiple of inner_chunk (3)" in capsys.readouterr().err
