"""The intake catalog: the static catalogs/nasar.yaml, write_catalog, and the CLI subcommand."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import dask.array as da
import intake
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from nasar_zarr import metadata_table, schema, write_catalog
from nasar_zarr.cli import main
from nasar_zarr.testing.dask import raise_if_dask_computes

CATALOG = Path(__file__).resolve().parents[1] / "catalogs" / "nasar.yaml"


def _same_cube(opened: xr.Dataset, cube: xr.Dataset) -> None:
    assert dict(opened.sizes) == dict(cube.sizes)
    assert set(opened.data_vars) == set(cube.data_vars)
    np.testing.assert_array_equal(opened["sample"].values, cube["sample"].values)
    np.testing.assert_array_equal(opened["dem"].values, cube["dem"].values)
    np.testing.assert_array_equal(opened["status"].values, cube["status"].values)


def test_static_catalog_opens_a_store_given_by_url(small_cube, cube):
    cat = intake.open_catalog(str(CATALOG))
    assert set(cat) == {"nasar", "nasar_metadata"}
    with raise_if_dask_computes():
        ds = cat["nasar"](url=str(small_cube)).to_dask()
    assert isinstance(ds["rtc"].data, da.Array)
    # open_cube's chunks: whole shards (all 4 here), every variable alike.
    assert ds.chunks["sample"] == cube.chunks["sample"] == (32,)
    _same_cube(ds, cube)
    # The accessor works on what the catalog returns.
    with raise_if_dask_computes():
        norm = ds.nasar.normalized()
    np.testing.assert_array_equal(norm["slope"].values, cube.nasar.slope_normalized().values)


def test_static_catalog_default_url_from_environment(small_cube, cube, monkeypatch):
    monkeypatch.setenv("NASAR_ZARR_URL", str(small_cube))
    cat = intake.open_catalog(str(CATALOG))
    _same_cube(cat.nasar.to_dask(), cube)


def test_static_catalog_metadata_entry(small_cube, small_corpus, cube, table):
    cat = intake.open_catalog(str(CATALOG))
    got = cat["nasar_metadata"](url=str(small_cube)).read()
    pd.testing.assert_frame_equal(got, table)
    pd.testing.assert_frame_equal(got, metadata_table(cube))
    # Or straight from a parquet file, sorted into release order.
    parquet = str(small_corpus.root / schema.METADATA_FILE)
    got = cat["nasar_metadata"](url=str(small_cube), metadata_url=parquet).read()
    pd.testing.assert_frame_equal(got, table)
    lazy = cat["nasar_metadata"](url=str(small_cube)).to_dask()
    pd.testing.assert_frame_equal(lazy.compute(), table)


def test_write_catalog_records_the_shard_size(small_cube, cube, table, tmp_path):
    path = write_catalog(str(small_cube), tmp_path / "sub" / "nasar.yaml")
    spec = yaml.safe_load(path.read_text())
    nasar = spec["sources"]["nasar"]
    resolved = Path(small_cube).resolve()
    assert nasar["args"]["urlpath"] == f'{{{{ url if url else "{resolved}" }}}}'
    assert "(8 samples per shard)" in nasar["description"]
    cat = intake.open_catalog(str(path))
    ds = cat["nasar"].to_dask()
    assert ds["rtc"].chunks[0] == cube["rtc"].chunks[0] == (32,)
    _same_cube(ds, cube)
    pd.testing.assert_frame_equal(cat["nasar_metadata"].read(), table)


def test_url_parameter_overrides_a_written_catalog(small_cube, cube, tmp_path):
    other = tmp_path / "other.zarr"
    subset = xr.open_zarr(str(small_cube)).isel(sample=slice(0, 5)).drop_encoding()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        subset.to_zarr(other, zarr_format=3, consolidated=True)
    cat = intake.open_catalog(str(write_catalog(str(small_cube), tmp_path / "c.yaml")))
    assert cat["nasar"](url=str(other)).to_dask().sizes["sample"] == 5
    assert cat["nasar"].to_dask().sizes["sample"] == cube.sizes["sample"]


def test_cli_catalog(small_cube, tmp_path, capsys):
    out = tmp_path / "cli.yaml"
    assert main(["catalog", str(small_cube), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    cat = intake.open_catalog(str(out))
    assert cat["nasar"].to_dask()["rtc"].chunks[0] == (32,)

    assert main(["catalog", str(tmp_path / "missing.zarr"), "-o", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing.zarr" in err
    assert not (tmp_path / "x.yaml").exists()


def test_opening_the_catalog_prints_no_warning(small_cube, tmp_path):
    """A fresh interpreter with every warning an error: catalog, entries, url=, metadata."""
    written = write_catalog(str(small_cube), tmp_path / "w.yaml")
    code = (
        "import intake\n"
        f"for path in ({str(CATALOG)!r}, {str(written)!r}):\n"
        "    cat = intake.open_catalog(path)\n"
        f"    ds = cat['nasar'](url={str(small_cube)!r}).to_dask()\n"
        "    assert ds.chunks['sample'] == (32,)\n"
        "    assert cat['nasar'].to_dask().sizes['sample'] == 32\n"
        f"    table = cat['nasar_metadata'](url={str(small_cube)!r}).read()\n"
        "    assert len(table) == 32\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NASAR_ZARR_URL": str(small_cube)}
    res = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == "ok\n"
    assert res.stderr == ""


def test_describe_and_a_bounded_read(small_cube, cube, monkeypatch):
    from nasar_zarr import catalog
    from nasar_zarr.errors import ReadTooLargeError

    source = intake.open_catalog(str(CATALOG))["nasar"](url=str(small_cube))
    described = source.describe()
    assert described["name"] == "nasar" and described["container"] == "xarray"
    assert described["plugin"] == ["nasar_zarr", "zarr"]
    assert source.discover()["dims"]["sample"] == 32
    loaded = source.read()  # 32 samples: 18.0 MiB, under the limit
    assert not isinstance(loaded["rtc"].data, da.Array)
    _same_cube(loaded, cube)
    monkeypatch.setattr(catalog, "READ_LIMIT_BYTES", 2**20)
    with pytest.raises(ReadTooLargeError) as caught:
        source.read()
    assert str(caught.value) == (
        f"{small_cube}: read() would load 36.0 MiB of data variables into memory (limit"
        " 1.0 MiB, nasar_zarr.catalog.READ_LIMIT_BYTES); use .to_dask() for the lazy cube"
        " and load a selection"
    )
    assert isinstance(caught.value, MemoryError)
