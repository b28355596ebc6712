"""STAC: collection.json + items.parquet, read back with pystac, xarray and pyarrow.

pystac's ``validate()`` fetches the JSON schemas from the network, which tests never
reach: the structure is checked here through pystac's object model (its extension
classes read the fields by their names) and by walking the fields used.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import xarray as xr

pystac = pytest.importorskip("pystac")
pytest.importorskip("stac_geoparquet")

from pystac.extensions.datacube import DatacubeExtension  # noqa: E402
from pystac.extensions.sar import SarExtension  # noqa: E402

from nasar_zarr import open_cube, plan_conversion, stac  # noqa: E402
from nasar_zarr.cli import main  # noqa: E402
from nasar_zarr.columns import ColumnRoles  # noqa: E402
from nasar_zarr.errors import MetadataError  # noqa: E402
from nasar_zarr.testing import write_corpus  # noqa: E402

N_SAMPLES = 32  # small_corpus: 11 + 7 + 14


@pytest.fixture(scope="module")
def stac_dir(small_cube, tmp_path_factory):
    out = tmp_path_factory.mktemp("stac")
    result = stac.write_stac(str(small_cube), str(out))
    return out, result


def _wkt_coords(wkt: str) -> list[list[float]]:
    numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", wkt)]
    return [numbers[i:i + 2] for i in range(0, len(numbers), 2)]  # fmt: skip


def test_write_stac_reports_what_it_wrote(stac_dir):
    out, result = stac_dir
    assert result.n_items == N_SAMPLES
    assert result.collection == str(out / "collection.json")
    assert result.items == str(out / "items.parquet")
    assert result.empty == ()  # every role has its column in the synthetic corpus
    assert pq.read_metadata(result.items).num_rows == N_SAMPLES


def test_collection_reads_with_pystac(stac_dir, cube, table):
    out, result = stac_dir
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    assert collection.id == "nasar"
    assert collection.title == cube.attrs["title"]
    assert collection.license == "other"
    # spatial extent: the union of the footprints
    corners = np.array([c for wkt in table["footprint_wkt"] for c in _wkt_coords(wkt)])
    assert collection.extent.spatial.bboxes == [
        [corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()]
    ]
    start, end = collection.extent.temporal.intervals[0]
    assert start == table["prime_datetime"].min().to_pydatetime()
    assert end == table["secondary_datetime"].max().to_pydatetime()
    summaries = collection.summaries
    assert summaries.get_list("sat:orbit_state") == sorted(set(table["orbit_direction"]))
    assert summaries.get_range("sat:relative_orbit").minimum == table["track"].min()
    assert summaries.get_range("sat:relative_orbit").maximum == table["track"].max()
    assert summaries.get_list("proj:code") == [f"EPSG:{c}" for c in sorted(set(table["epsg"]))]
    assert summaries.get_list("nasar:cross_pol_available") == sorted(
        set(table["cross_pol_available"])
    )
    sar = SarExtension.summaries(collection)
    assert sar.instrument_mode == ["IW"]
    assert list(sar.frequency_band) == ["C"]
    assert (sar.center_frequency.minimum, sar.center_frequency.maximum) == (5.405, 5.405)
    assert list(sar.polarizations) == ["VV", "VH"]
    assert sar.product_type == ["RTC"]
    rels = {link.rel: link.href for link in collection.links if link.rel not in ("root", "self")}
    assert rels == {"derived_from": stac.OPERA_RTC_S1_DOI, "cite-as": stac.NASAR_RELEASE_URL}


def test_zarr_asset_with_datacube_fields(stac_dir, small_cube, cube):
    out, _ = stac_dir
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    assert set(collection.assets) == {"zarr", "geoparquet-items"}
    asset = collection.assets["zarr"]
    assert asset.href == str(small_cube)
    assert asset.media_type == "application/vnd.zarr"
    assert asset.roles == ["data"]
    assert (asset.extra_fields["zarr:zarr_format"], asset.extra_fields["zarr:consolidated"],
            asset.extra_fields["zarr:node_type"]) == (3, True, "group")  # fmt: skip
    cube_ext = DatacubeExtension.ext(asset)
    dims = cube_ext.dimensions
    assert list(dims) == ["sample", "view", "time", "pol", "component", "y", "x"]
    assert dims["sample"].to_dict()["extent"] == [0, N_SAMPLES - 1]
    assert dims["time"].to_dict()["values"] == ["prime", "secondary"]
    assert dims["pol"].to_dict()["values"] == ["co", "cross"]
    assert dims["x"].to_dict()["extent"] == [0, 127]
    variables = cube_ext.variables
    assert variables["rtc"].dimensions == ["sample", "view", "time", "pol", "y", "x"]
    assert variables["rtc"].var_type == "data"
    assert variables["dem"].unit == "m"
    assert variables["status"].var_type == "auxiliary"
    assert variables["center_lat"].unit == "degrees_north"
    assert set(variables) == set(cube.data_vars) | {
        n for n, c in cube.coords.items() if "nasar_column" in c.attrs
    }
    items_asset = collection.assets["geoparquet-items"]
    assert items_asset.get_absolute_href() == str(out / "items.parquet")


def _prefixes(obj) -> set[str]:
    found = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            if ":" in key and not key.startswith(("http", "nasar:")):
                found.add(key.split(":", 1)[0])
            found |= _prefixes(value)
    elif isinstance(obj, list):
        for value in obj:
            found |= _prefixes(value)
    return found


def test_stac_extensions_are_exactly_the_ones_used(stac_dir):
    out, _ = stac_dir
    data = json.loads((out / "collection.json").read_text())
    assert data["stac_extensions"] == [
        stac.SCHEMAS[p] for p in ("cube", "proj", "sar", "sat", "xarray", "zarr")
    ]
    used = _prefixes({k: v for k, v in data.items() if k not in ("links", "stac_extensions")})
    assert used == {"cube", "proj", "sar", "sat", "xarray", "zarr"}
    assert "self" not in {link["rel"] for link in data["links"]}
    # pystac's object model round trip keeps every field
    again = pystac.Collection.from_dict(data).to_dict(include_self_link=False)
    assert again["assets"] == data["assets"]
    assert again["summaries"] == data["summaries"]
    assert again["stac_extensions"] == data["stac_extensions"]


def test_asset_opens_with_xarray_as_open_cube(stac_dir, cube):
    pytest.importorskip("xpystac")
    out, _ = stac_dir
    asset = pystac.Collection.from_file(str(out / "collection.json")).assets["zarr"]
    from xpystac.core import to_xarray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 1-D coordinates: one stored chunk
        opened = xr.open_dataset(asset)  # xpystac: engine, zarr_format, ... from the asset
        # cube.compute(), not cube.load(): load() would change the session-wide fixture
        xr.testing.assert_identical(opened.load(), cube.compute())
        # xpystac's to_xarray applies xarray:open_kwargs (xarray's engine="stac" route,
        # open_dataset(asset), drops dask unless it is given chunks= itself)
        chunked = to_xarray(asset)
        asked = xr.open_dataset(asset, chunks={"sample": 8})
    # dask chunks of one shard (8 samples here), every variable and flag alike
    assert chunked.chunks["sample"] == asked.chunks["sample"] == (8, 8, 8, 8)
    assert chunked.rtc.chunks[0] == chunked.status.chunks[0] == chunked.rtc_present.chunks[0]
    xr.testing.assert_identical(chunked.load(), opened)


def test_asset_open_kwargs_open_with_plain_xarray(stac_dir, small_cube):
    out, _ = stac_dir
    data = json.loads((out / "collection.json").read_text())
    kwargs = data["assets"]["zarr"]["xarray:open_kwargs"]
    assert kwargs == {
        "engine": "zarr",
        "chunks": {"sample": 8},
        "consolidated": True,
        "zarr_format": 3,
    }
    assert "chunks={'sample': 8}" in data["assets"]["zarr"]["description"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = xr.open_dataset(data["assets"]["zarr"]["href"], **kwargs)
        plain = xr.open_zarr(str(small_cube), chunks={"sample": 8})  # what the docs show
    assert ds.chunks["sample"] == plain.chunks["sample"] == (8, 8, 8, 8)
    assert float(ds.status.sum()) == float(plain.status.sum()) == N_SAMPLES


def test_items_read_back_equal_the_metadata(stac_dir, cube, table):
    out, _ = stac_dir
    items = stac.read_items(str(out / "items.parquet"))
    assert [i.id for i in items] == list(cube.sample.values)
    for index, (item, (_, row)) in enumerate(zip(items, table.iterrows(), strict=True)):
        assert item.id == row["sample_key"]
        assert item.collection_id == "nasar"
        assert item.properties["nasar:index"] == index
        assert item.geometry == {
            "type": "Polygon",
            "coordinates": [_wkt_coords(row["footprint_wkt"])],
        }
        assert item.datetime == row["prime_datetime"].to_pydatetime()
        assert pd.Timestamp(item.properties["start_datetime"]) == row["prime_datetime"]
        assert pd.Timestamp(item.properties["end_datetime"]) == row["secondary_datetime"]
        assert item.properties["sat:orbit_state"] == row["orbit_direction"]
        assert item.properties["sat:relative_orbit"] == row["track"]
        assert item.properties["proj:code"] == f"EPSG:{row['epsg']}"
        assert item.properties["proj:centroid"] == {
            "lat": row["center_lat"],
            "lon": row["center_lon"],
        }
        for column in (
            "opera_granule_id",
            "burst_id",
            "quality_score",
            "co_pol_available",
            "cross_pol_available",
            "track",
            "epsg",
            "shard_path",
        ):
            assert item.properties[f"nasar:{column}"] == row[column], column
        assert item.stac_extensions == [stac.SCHEMAS["proj"], stac.SCHEMAS["sat"]]


@pytest.mark.parametrize(
    ("bbox", "time"),
    [
        ((-130.0, 20.0, -90.0, 60.0), ("2018-01-01", "2022-12-31")),
        ((-165.0, 15.0, -100.0, 70.0), (None, "2020-06-01T00:00:00+00:00")),
        ((-100.0, 15.0, -165.0, 70.0), None),  # across the antimeridian
        (None, ("2019-01-01", None)),
    ],
)
def test_item_filter_selects_what_nasar_select_selects(stac_dir, cube, bbox, time):
    out, _ = stac_dir
    hits = stac.search_items(str(out / "items.parquet"), bbox=bbox, time=time)
    selected = cube.nasar.select(bbox=bbox, time=time)
    assert 0 < selected.sizes["sample"] < N_SAMPLES
    assert hits["id"].to_pylist() == list(selected.sample.values)
    np.testing.assert_array_equal(
        cube.sample.values[hits["nasar:index"].to_numpy()], selected.sample.values
    )


def test_search_rejects_a_malformed_bbox(stac_dir):
    out, _ = stac_dir
    with pytest.raises(ValueError, match=r"^bbox must be \(lon_min, lat_min, lon_max, lat_max\)"):
        stac.search_items(str(out / "items.parquet"), bbox=(1, 2, 3))


def test_cli_writes_collection_and_items(small_cube, tmp_path, capsys):
    out = tmp_path / "stac"
    assert main(["stac", str(small_cube), "-o", str(out), "--href", "s3://b/nasar.zarr"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == (
        f"wrote {out / 'collection.json'} and {out / 'items.parquet'} ({N_SAMPLES} items)"
    )
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    assert collection.assets["zarr"].href == "s3://b/nasar.zarr"
    assert pq.read_metadata(out / "items.parquet").num_rows == N_SAMPLES


@pytest.fixture(scope="module")
def sparse_cube(tmp_path_factory):
    """A corpus without footprint column, with its prime time under an unusual name."""
    root = tmp_path_factory.mktemp("sparse")
    write_corpus(root, n_shards=1, samples_per_shard=4, seed=5)
    path = root / "metadata.parquet"
    table = pq.read_table(path).drop_columns(["footprint_wkt"])
    table = table.rename_columns(
        ["when_taken" if n == "prime_datetime" else n for n in table.column_names]
    )
    pq.write_table(table, path)
    dest = root / "cube.zarr"
    plan_conversion(str(root), str(dest), shard=8).execute(workers=0)
    return dest, table.to_pandas()


def test_no_time_column_is_one_line_error_with_exit_2(sparse_cube, tmp_path, capsys):
    dest, _ = sparse_cube
    assert main(["stac", str(dest), "-o", str(tmp_path / "stac")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "nasar-zarr stac: error: no acquisition time column was recognised in the metadata,"
        " and a STAC item needs a datetime; name it explicitly"
        " (columns.recognise(..., time=NAME))\n"
    )
    with pytest.raises(MetadataError, match="no acquisition time column"):
        next(stac.iter_items(open_cube(str(dest)), roles=ColumnRoles()))


def test_absent_footprint_falls_back_to_centre_points(sparse_cube, tmp_path):
    dest, frame = sparse_cube
    ds = open_cube(str(dest))
    roles = stac.dataset_roles(ds)
    assert roles.footprint is None and roles.time is None
    roles = ColumnRoles(**{**roles.as_dict(), "time": "when_taken"})
    result = stac.write_stac(str(dest), str(tmp_path), roles=roles)
    assert result.n_items == 4
    assert result.empty == (f"footprint: {stac.FIELDS_BY_ROLE['footprint']}",)
    items = stac.read_items(result.items)
    for item, (_, row) in zip(items, frame.iterrows(), strict=True):
        assert item.geometry == {
            "type": "Point",
            "coordinates": [row["center_lon"], row["center_lat"]],
        }
        assert item.bbox == [row["center_lon"], row["center_lat"]] * 2
        assert item.datetime == row["when_taken"].to_pydatetime()
    collection = pystac.Collection.from_file(result.collection)
    assert collection.extent.spatial.bboxes == [
        [
            frame["center_lon"].min(),
            frame["center_lat"].min(),
            frame["center_lon"].max(),
            frame["center_lat"].max(),
        ]
    ]
