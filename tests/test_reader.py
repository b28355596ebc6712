"""CubeReader: whole samples through tensorstore or zarr-python, equal to xarray's."""

from __future__ import annotations

import pytest

import nasar_zarr as nz
from nasar_zarr.reader import CubeReader


@pytest.mark.parametrize("engine", ["tensorstore", "zarr", None])
def test_reads_equal_xarray(small_cube, engine):
    reader = CubeReader(str(small_cube), engine=engine)
    assert reader.engine == (engine or "tensorstore")
    ds = nz.open_cube(str(small_cube)).load()
    assert len(reader) == 32
    assert reader.keys.tolist() == ds.sample.values.tolist()
    one = reader[9]
    for name, values in one.items():
        assert values.tobytes() == ds[name].values[9].tobytes(), name
    batch = reader[[30, 2, 9]]
    for name, values in batch.items():
        assert values.tobytes() == ds[name].values[[30, 2, 9]].tobytes(), name
    assert reader[4:12]["rtc"].tobytes() == ds.rtc.values[4:12].tobytes()


def test_unknown_engine(small_cube):
    with pytest.raises(ValueError, match="engine must be 'tensorstore' or 'zarr', got 'x'"):
        CubeReader(str(small_cube), engine="x")
