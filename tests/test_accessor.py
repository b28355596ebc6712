"""The ``ds.nasar`` accessor: registration, delegation, select by metadata, metadata table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

import nasar_zarr
from nasar_zarr import normalize, open_cube, schema, signatures, stats
from nasar_zarr.accessor import NasarAccessor, select
from nasar_zarr.testing.dask import raise_if_dask_computes

DATA_VARIABLES = ("rtc", "inc_angle", "ifg", "coh", "dem", "slope_deg", "rtc_present")


def test_importing_registers_the_accessor(cube):
    assert hasattr(xr.Dataset, "nasar")
    assert isinstance(cube.nasar, NasarAccessor)
    for name in (
        "NasarAccessor",
        "select",
        "normalized",
        "histogram",
        "quantiles",
        "clip_and_rescale",
        "write_catalog",
        "open_cube",
        "metadata_table",
    ):
        assert name in nasar_zarr.__all__
        assert getattr(nasar_zarr, name) is not None


def test_methods_delegate_to_the_pure_functions(cube):
    sub = cube.isel(sample=slice(0, 4)).load()
    xr.testing.assert_identical(sub.nasar.normalized(), normalize.normalized(sub))
    xr.testing.assert_identical(
        sub.nasar.normalized(dem_range=(0, 10)), normalize.normalized(sub, dem_range=(0, 10))
    )
    xr.testing.assert_identical(sub.nasar.signatures(), signatures.signatures(sub))
    xr.testing.assert_identical(sub.nasar.wrapped_phase(), signatures.wrapped_phase(sub["ifg"]))
    xr.testing.assert_identical(sub.nasar.histogram(bins=10), stats.histogram(sub, "rtc", bins=10))
    xr.testing.assert_identical(
        sub.nasar.quantiles((0.5,), bins=100), stats.quantiles(sub, (0.5,), bins=100)
    )


def test_metadata_equals_the_parquet_table(cube, table):
    pd.testing.assert_frame_equal(cube.nasar.metadata(), table)


def test_select_picks_the_right_samples(cube, table):
    sub = cube.nasar.select(
        min_quality=0.7,
        require_cross_pol=True,
        bbox=(-140.0, 20.0, -60.0, 60.0),
        time=("2018-01-01", "2023-06-30T12:00:00"),
    )
    t = table
    keep = (
        (t["quality_score"] >= 0.7)
        & t["cross_pol_available"]
        & t["center_lon"].between(-140.0, -60.0)
        & t["center_lat"].between(20.0, 60.0)
        & (t["prime_datetime"] >= pd.Timestamp("2018-01-01", tz="UTC"))
        & (t["prime_datetime"] <= pd.Timestamp("2023-06-30T12:00:00", tz="UTC"))
    )
    expected = t.loc[keep, schema.KEY_COLUMN].tolist()
    assert 0 < len(expected) < len(t)
    assert [str(k) for k in sub["sample"].values] == expected
    # The subset's metadata table is the filtered parquet table.
    pd.testing.assert_frame_equal(sub.nasar.metadata(), t[keep].reset_index(drop=True))
    # Data come along, lazily, for exactly those samples.
    np.testing.assert_array_equal(sub["dem"].values, cube["dem"].sel(sample=expected).values)


def test_each_filter_alone(cube, table):
    def keys(ds):
        return [str(k) for k in ds["sample"].values]

    t = table
    assert keys(cube.nasar.select()) == t[schema.KEY_COLUMN].tolist()  # all written
    assert (
        keys(cube.nasar.select(min_quality=0.8))
        == t.loc[t["quality_score"] >= 0.8, schema.KEY_COLUMN].tolist()
    )
    assert (
        keys(cube.nasar.select(require_cross_pol=True))
        == t.loc[t["cross_pol_available"], schema.KEY_COLUMN].tolist()
    )
    assert len(keys(cube.nasar.select(require_cross_pol=True))) < len(t)
    # Open-ended time, time-zone-aware bounds.
    start = pd.Timestamp("2020-01-01T02:00:00+02:00")
    assert (
        keys(cube.nasar.select(time=(start, None)))
        == t.loc[t["prime_datetime"] >= start, schema.KEY_COLUMN].tolist()
    )
    assert cube.nasar.select(min_quality=1.5).sizes["sample"] == 0


def test_select_reads_no_array_data(small_cube, monkeypatch):
    reads: list[str] = []
    original_get = zarr.storage.LocalStore.get

    async def spy_get(self, key, *args, **kwargs):
        reads.append(key)
        return await original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", spy_get)
    ds = open_cube(str(small_cube), engine="zarr")  # every read through zarr's store
    reads.clear()
    with raise_if_dask_computes():  # without written_only, not even one dask compute
        sub = ds.nasar.select(
            min_quality=0.6,
            require_cross_pol=True,
            bbox=(-170, 10, -50, 75),
            time=("2016-01-01", "2030-01-01"),
            written_only=False,
        )
    variables = {key.split("/", 1)[0] for key in reads}
    assert variables == {
        "quality_score",
        "cross_pol_available",
        "center_lon",
        "center_lat",
        "prime_datetime",  # decoded when first read, then kept
    }
    assert all(isinstance(sub[v].data, type(ds[v].data)) for v in DATA_VARIABLES)

    reads.clear()
    with raise_if_dask_computes(max_computes=1):  # status is read, through dask, once
        ds.nasar.select(require_cross_pol=True)
    variables = {key.split("/", 1)[0] for key in reads}
    assert variables == {schema.STATUS}  # cross_pol_available is already cached
    assert not variables & set(DATA_VARIABLES)


def test_written_only_drops_pending_and_rejected(cube):
    status = np.full(cube.sizes["sample"], schema.STATUS_WRITTEN, dtype="uint8")
    status[[1, 5]] = schema.STATUS_PENDING
    status[7] = schema.STATUS_REJECTED
    ds = cube.assign(status=("sample", status))
    kept = ds.nasar.select()
    expected = np.delete(cube["sample"].values, [1, 5, 7])
    np.testing.assert_array_equal(kept["sample"].values, expected)
    assert ds.nasar.select(written_only=False).sizes["sample"] == cube.sizes["sample"]


def test_bbox_across_the_antimeridian():
    lon = np.array([179.5, -179.5, 0.0, -170.0, 170.0])
    lat = np.array([52.0, 52.0, 52.0, 52.0, 80.0])
    ds = xr.Dataset(
        coords={
            "sample": list("abcde"),
            "center_lon": ("sample", lon),
            "center_lat": ("sample", lat),
        }
    )
    out = select(ds, bbox=(170.0, 50.0, -170.0, 60.0))
    assert list(out["sample"].values) == ["a", "b", "d"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"bbox": (1, 2, 3)}, ValueError, "lon_min, lat_min, lon_max, lat_max"),
        ({"bbox": (0, 10, 1, 5)}, ValueError, "lat_min"),
        ({"time": "2020"}, ValueError, r"\(start, end\)"),
    ],
)
def test_select_refuses_bad_filters(cube, kwargs, error, match):
    with pytest.raises(error, match=match):
        cube.nasar.select(**kwargs)


def test_select_names_a_missing_coordinate():
    ds = xr.Dataset(coords={"sample": ["a", "b"]})
    with pytest.raises(KeyError, match="quality_score"):
        select(ds, min_quality=0.6)
