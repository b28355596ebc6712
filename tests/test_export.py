"""nasar-zarr export: a selection of the cube to netCDF-4 / Zarr, streamed in pieces."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from nasar_zarr import open_cube
from nasar_zarr.cli import main
from nasar_zarr.export import ExportError, export, export_format, open_export

FILTERS = {"min_quality": 0.6, "require_cross_pol": True}


@pytest.fixture(scope="module")
def selection(small_cube):
    """The cube's selection under FILTERS, in memory (zarr-python only)."""
    ds = open_cube(str(small_cube), engine="zarr")
    return ds.nasar.select(**FILTERS).load()


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_round_trip_equals_the_selection(small_cube, selection, tmp_path, suffix):
    out = tmp_path / f"subset{suffix}"
    res = export(str(small_cube), out, progress=False, **FILTERS)
    n = selection.sizes["sample"]
    assert 0 < n < 32
    assert (res.n_samples, res.piece, res.pieces) == (n, 8, -(-n // 8))
    assert res.format == ("netcdf" if suffix == ".nc" else "zarr")
    with open_export(out) as back:
        back = back.load()
    history = back.attrs.pop("history")
    assert history.endswith(f"nasar-zarr export of {n} samples from {small_cube}")
    expected = selection.copy()
    expected.attrs.pop("history", None)
    xr.testing.assert_identical(back, expected)
    if suffix == ".nc":  # plain xarray, default engine, reads it equal too
        with xr.open_dataset(out) as plain:
            np.testing.assert_array_equal(plain["rtc"].values, selection["rtc"].values)


def test_a_large_selection_is_written_in_pieces(small_cube, tmp_path, capsys):
    """Bounded memory: 32 samples go out in 11 pieces of <= 3 samples, one task each."""
    out = tmp_path / "all.zarr"
    res = export(str(small_cube), out, piece=3, progress=True)
    assert (res.n_samples, res.pieces, res.piece) == (32, 11, 3)
    back = xr.open_zarr(out)
    assert back.chunks["sample"] == (3,) * 10 + (2,)
    assert "export 32 samples" in capsys.readouterr().err  # the tqdm bar
    ref = open_cube(str(small_cube), engine="zarr")
    np.testing.assert_array_equal(back["ifg"].values, ref["ifg"].values)


def test_normalized_export(small_cube, tmp_path):
    out = tmp_path / "norm.nc"
    export(str(small_cube), out, normalized=True, progress=False)
    ref = open_cube(str(small_cube)).nasar.select().nasar.normalized().compute()
    with open_export(out) as back:
        assert set(back.data_vars) == set(ref.data_vars)
        np.testing.assert_array_equal(back["rtc"].values, ref["rtc"].values)
        np.testing.assert_array_equal(back["dem_relief"].values, ref["dem_relief"].values)


def test_format_from_suffix_and_errors(small_cube, tmp_path):
    assert export_format("a.nc") == "netcdf"
    assert export_format("a.NC4") == "netcdf"
    assert export_format("a.zarr/") == "zarr"
    assert export_format("a.bin", "zarr") == "zarr"
    with pytest.raises(ExportError, match="cannot tell the format from 'a.bin'"):
        export_format("a.bin")
    with pytest.raises(ExportError, match="format must be one of"):
        export_format("a.nc", "csv")
    with pytest.raises(ExportError, match="no written sample of .* passes the filters"):
        export(str(small_cube), tmp_path / "none.nc", min_quality=2.0, progress=False)
    (tmp_path / "exists.nc").write_bytes(b"x")
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        export(str(small_cube), tmp_path / "exists.nc", progress=False)


def test_cli_export(small_cube, selection, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    argv = [
        "export",
        str(small_cube),
        str(out),
        "--min-quality",
        "0.6",
        "--require-cross-pol",
        "--bbox",
        "-180",
        "-90",
        "180",
        "90",
        "--time",
        "2000-01-01",
        "",
        "--no-progress",
    ]
    assert main(argv) == 0
    n = selection.sizes["sample"]
    assert capsys.readouterr().out == (
        f"wrote {n} samples to {out} (zarr, {-(-n // 8)} pieces of <= 8 samples)\n"
    )
    np.testing.assert_array_equal(xr.open_zarr(out)["dem"].values, selection["dem"].values)
    assert main(["export", str(small_cube), str(tmp_path / "x.bin"), "--no-progress"]) == 2
    assert "cannot tell the format from" in capsys.readouterr().err
