"""Column roles: recognition of the usual spellings, overrides, CF attributes, cf-xarray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nasar_zarr import columns, open_cube, plan_conversion
from nasar_zarr import metadata as meta
from nasar_zarr.columns import ColumnRoles, recognise
from nasar_zarr.errors import MetadataError
from nasar_zarr.testing import write_corpus

CORPUS_COLUMNS = [
    "sample_key", "shard_path", "shard_index", "sample_index_in_shard", "opera_granule_id",
    "burst_id", "prime_datetime", "secondary_datetime", "orbit_direction", "track", "epsg",
    "center_lon", "center_lat", "footprint_wkt", "quality_score", "co_pol_available",
    "cross_pol_available",
]  # fmt: skip


def test_the_synthetic_corpus_columns_are_recognised():
    assert recognise(CORPUS_COLUMNS) == ColumnRoles(
        lat="center_lat", lon="center_lon", footprint="footprint_wkt", time="prime_datetime",
        secondary_time="secondary_datetime", orbit_direction="orbit_direction", track="track",
        co_pol="co_pol_available", cross_pol="cross_pol_available", epsg="epsg",
        burst_id="burst_id", granule_id="opera_granule_id", quality="quality_score",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["lat", "lon", "footprint", "datetime"],
         {"lat": "lat", "lon": "lon", "footprint": "footprint", "time": "datetime"}),
        (["Latitude", "LONGITUDE", "WKT", "Acquisition Time", "Secondary-Time"],
         {"lat": "Latitude", "lon": "LONGITUDE", "footprint": "WKT",
          "time": "Acquisition Time", "secondary_time": "Secondary-Time"}),
        (["centre_lat", "lng", "geometry_wkt", "reference_datetime", "secondary_datetime"],
         {"lat": "centre_lat", "lon": "lng", "footprint": "geometry_wkt",
          "time": "reference_datetime", "secondary_time": "secondary_datetime"}),
        (["lat_center", "lon_center", "start_time"],
         {"lat": "lat_center", "lon": "lon_center", "time": "start_time"}),
        (["y_center", "x_center", "geometry", "id"], {}),  # projected / WKB: not guessed
    ],
)  # fmt: skip
def test_usual_spellings(names, expected):
    assert recognise(names).as_dict() == expected


def test_most_specific_spelling_wins_and_a_column_plays_one_role():
    roles = recognise(["lat", "center_lat", "time", "prime_datetime", "datetime"])
    assert roles.lat == "center_lat"
    assert roles.time == "prime_datetime"
    assert roles.as_dict() == {"lat": "center_lat", "time": "prime_datetime"}


def test_overrides_win_over_recognition():
    roles = recognise(CORPUS_COLUMNS, lat="quality_score", time="secondary_datetime")
    assert roles.lat == "quality_score"
    assert roles.time == "secondary_datetime"
    assert roles.secondary_time is None  # the override took the only secondary spelling
    assert roles.quality is None  # quality_score now plays the lat role
    assert roles.lon == "center_lon"


def test_override_of_a_missing_column_names_it_and_the_columns():
    with pytest.raises(MetadataError) as err:
        recognise(["a", "b"], lat="latitude")
    assert str(err.value) == (
        "the lat column 'latitude' is not in the metadata table; its columns are ['a', 'b']"
    )


def test_one_column_given_two_roles_is_refused():
    with pytest.raises(
        MetadataError, match="^column 'a' was given as both the lat and the lon column$"
    ):
        recognise(["a"], lat="a", lon="a")


def test_unknown_role_is_refused():
    with pytest.raises(MetadataError, match=r"^unknown column role\(s\) \['height'\]"):
        recognise(["a"], height="a")


def test_roles_attr_round_trip():
    roles = recognise(CORPUS_COLUMNS)
    text = columns.roles_attr(roles)
    assert json.loads(text)["lat"] == "center_lat"
    assert list(json.loads(text)) == sorted(roles.as_dict())
    assert columns.roles_from_attr(text) == roles
    assert columns.roles_from_attr({"lat": "y", "future_role": "z"}) == ColumnRoles(lat="y")


_ROLE_SPELLINGS = st.sampled_from(
    [(role, spelling) for role in ("lat", "lon", "footprint", "time", "secondary_time")
     for spelling in columns.SPELLINGS[role]]
)  # fmt: skip
_NOISE = st.text(alphabet="abcdefgqz_", min_size=1, max_size=8).map(lambda s: "q" + s)


def _case(spelling: str, flips: list[bool]) -> str:
    return "".join(
        c.upper() if f else c
        for c, f in zip(spelling, flips + [False] * len(spelling), strict=False)
    )


@settings(max_examples=150, deadline=None)
@given(picks=st.lists(_ROLE_SPELLINGS, max_size=5, unique_by=lambda p: p[0]),
       noise=st.lists(_NOISE, max_size=4, unique=True),
       flips=st.lists(st.booleans(), max_size=20), data=st.data())  # fmt: skip
def test_recognition_properties(picks, noise, flips, data):
    """Every spelled role is found whatever the case and order; noise columns play no
    role; each column plays at most one; an override always wins."""
    named = {role: _case(spelling, flips) for role, spelling in picks}
    names = data.draw(st.permutations(list(named.values()) + noise))
    roles = recognise(names)
    found = roles.as_dict()
    for role, column in named.items():
        assert found[role] == column
    assert set(found.values()) <= set(names)
    assert len(set(found.values())) == len(found)
    assert not set(found.values()) & set(noise)
    if noise:
        override = recognise(names, lat=noise[0])
        assert override.lat == noise[0]
        assert override.role_of(noise[0]) == "lat"


def test_cf_attrs_only_where_the_values_fit_the_role():
    roles = ColumnRoles(lat="lat", lon="lon", time="t", secondary_time="t2", footprint="wkt")
    assert columns.cf_attrs("lat", np.zeros(2), roles) == {
        "long_name": "latitude", "nasar_role": "lat", "standard_name": "latitude",
        "units": "degrees_north"}  # fmt: skip
    assert columns.cf_attrs("lon", np.zeros(2, "float32"), roles)["units"] == "degrees_east"
    assert columns.cf_attrs("t", np.zeros(2, "datetime64[ns]"), roles) == {
        "long_name": "prime acquisition time",
        "nasar_role": "time",
        "standard_name": "time",
    }
    assert columns.cf_attrs("t2", np.zeros(2, "datetime64[ns]"), roles) == {
        "long_name": "secondary acquisition time",
        "nasar_role": "secondary_time",
    }
    # A latitude stored as text is not called latitude (cf-xarray matches long_name too).
    assert columns.cf_attrs("lat", np.array(["45N"], dtype=object), roles) == {
        "long_name": "lat",
        "nasar_role": "lat",
    }
    assert columns.cf_attrs("quality_score", np.zeros(2), roles) == {"long_name": "quality score"}


def test_encode_table_adds_cf_attributes_and_decode_ignores_them():
    frame = pd.DataFrame({
        "lat": [45.0, 46.5], "lng": [-100.0, -101.0],
        "acquisition_time": pd.to_datetime(["2020-01-01", "2020-01-02"], utc=True),
        "score_1": [0.5, 0.7],
    })  # fmt: skip
    table = pa.Table.from_pandas(frame, preserve_index=False)
    encoded = meta.encode_table(table)
    assert {name: attrs["long_name"] for name, (_, attrs) in encoded.items()} == {
        "lat": "latitude", "lng": "longitude", "acquisition_time": "prime acquisition time",
        "score_1": "score 1"}  # fmt: skip
    assert encoded["lng"][1]["standard_name"] == "longitude"
    assert "units" not in encoded["acquisition_time"][1]  # the CF time encoding has them
    explicit = meta.encode_table(table, roles=recognise(table.column_names, lat="score_1"))
    assert explicit["score_1"][1]["standard_name"] == "latitude"
    assert "standard_name" not in explicit["lat"][1]
    rebuilt = meta.decode_table(encoded, table.schema)
    pd.testing.assert_frame_equal(rebuilt, table.to_pandas())


# ---------------------------------------------------------------------------- cubes + cf-xarray


def test_cf_xarray_finds_latitude_longitude_and_time(cube):
    import cf_xarray  # noqa: F401  (registers ds.cf)

    assert cube.cf["latitude"].name == "center_lat"
    assert cube.cf["longitude"].name == "center_lon"
    assert cube.cf["time"].name == "prime_datetime"
    assert cube.cf.axes == {"T": ["prime_datetime"]}  # the "time" label is not an axis
    assert cube.cf.coordinates == {
        "latitude": ["center_lat"],
        "longitude": ["center_lon"],
        "time": ["prime_datetime"],
    }
    assert cube["center_lat"].attrs["units"] == "degrees_north"
    np.testing.assert_array_equal(cube.cf["latitude"].values, cube["center_lat"].values)
    for name, var in cube.variables.items():
        assert var.attrs.get("long_name"), name


def test_label_coordinates_carry_no_axis_and_strings_no_units(cube):
    for dim in ("view", "time", "pol", "component", "y", "x"):
        attrs = cube[dim].attrs
        assert attrs["long_name"]
        assert "axis" not in attrs and "standard_name" not in attrs
    assert "units" not in cube["time"].attrs


@pytest.fixture(scope="module")
def renamed_cube(tmp_path_factory):
    """A corpus whose metadata names the roles lat/lon/footprint/acquisition_time."""
    root = tmp_path_factory.mktemp("renamed")
    write_corpus(root, n_shards=1, samples_per_shard=5, seed=3)
    path = root / "metadata.parquet"
    table = pq.read_table(path)
    renames = {
        "center_lat": "lat",
        "center_lon": "lon",
        "footprint_wkt": "footprint",
        "prime_datetime": "acquisition_time",
        "secondary_datetime": "secondary_time",
    }
    table = table.rename_columns([renames.get(n, n) for n in table.column_names])
    pq.write_table(table, path)
    dest = root / "cube.zarr"
    plan_conversion(str(root), str(dest), shard=8).execute(workers=0)
    return table, open_cube(str(dest))


def test_cf_xarray_on_a_cube_with_lat_lon_columns(renamed_cube):
    import cf_xarray  # noqa: F401

    table, ds = renamed_cube
    assert ds.cf["latitude"].name == "lat"
    assert ds.cf["longitude"].name == "lon"
    assert ds.cf["time"].name == "acquisition_time"
    np.testing.assert_array_equal(ds.cf["latitude"].values, table["lat"].to_numpy())
    assert ds["secondary_time"].attrs["long_name"] == "secondary acquisition time"
    assert "standard_name" not in ds["secondary_time"].attrs
    rebuilt = ds.nasar.metadata()
    pd.testing.assert_frame_equal(rebuilt, table.to_pandas())


def test_convert_takes_columns_by_name(tmp_path):
    """Columns no spelling would recognise, named on the command line."""
    import json

    import cf_xarray  # noqa: F401

    from tests.conftest import cli

    root = tmp_path / "corpus"
    write_corpus(root, n_shards=1, samples_per_shard=4, seed=5)
    path = root / "metadata.parquet"
    table = pq.read_table(path)
    renames = {"center_lat": "patch_y", "center_lon": "patch_x", "prime_datetime": "t_ref"}
    pq.write_table(table.rename_columns([renames.get(n, n) for n in table.column_names]), path)
    dest = tmp_path / "cube.zarr"
    wrong = cli("convert", str(root), str(dest), "--lat-column", "nope")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.startswith(
        "nasar-zarr convert: error: the lat column 'nope' is not in the metadata table;"
        " its columns are ['sample_key', "
    )
    result = cli(
        "convert",
        str(root),
        str(dest),
        "--workers",
        "0",
        "--lat-column",
        "patch_y",
        "--lon-column",
        "patch_x",
        "--time-column",
        "t_ref",
    )
    assert result.returncode == 0, result.stderr
    ds = open_cube(str(dest))
    assert (ds.cf["latitude"].name, ds.cf["longitude"].name, ds.cf["time"].name) == (
        "patch_y",
        "patch_x",
        "t_ref",
    )
    recorded = json.loads(ds.attrs["nasar_columns"])
    assert {k: recorded[k] for k in ("lat", "lon", "time")} == {
        "lat": "patch_y",
        "lon": "patch_x",
        "time": "t_ref",
    }


def test_select_uses_the_recorded_roles(renamed_cube):
    table, ds = renamed_cube
    frame = table.to_pandas()
    lat, lon = frame["lat"].to_numpy(), frame["lon"].to_numpy()
    box = (float(lon.min()) - 1, float(np.median(lat)), float(lon.max()) + 1, 90.0)
    chosen = ds.nasar.select(bbox=box, written_only=False)
    assert chosen.sample.values.tolist() == frame["sample_key"][lat >= np.median(lat)].tolist()
    start = frame["acquisition_time"].sort_values().iloc[2]
    later = ds.nasar.select(time=(start, None), written_only=False)
    assert later.sizes["sample"] == int((frame["acquisition_time"] >= start).sum())
