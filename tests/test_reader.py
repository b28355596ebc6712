"""CubeReader: whole samples through the shard decoder, tensorstore or zarr-python."""

from __future__ import annotations

import json
import multiprocessing
import shutil

import pytest

import nasar_zarr as nz
from nasar_zarr import store
from nasar_zarr.reader import CubeReader


@pytest.mark.parametrize("engine", ["shards", "tensorstore", "zarr", None])
def test_reads_equal_xarray(small_cube, engine):
    reader = CubeReader(str(small_cube), engine=engine)
    assert reader.engine == (engine or "shards")
    assert reader.fork_safe == (reader.engine == "shards")
    ds = nz.open_cube(str(small_cube)).load()
    assert len(reader) == 32
    assert reader.keys.tolist() == ds.sample.values.tolist()
    one = reader[9]
    for name, values in one.items():
        assert values.tobytes() == ds[name].values[9].tobytes(), name
    batch = reader[[30, 2, 9, 2]]
    for name, values in batch.items():
        assert values.tobytes() == ds[name].values[[30, 2, 9, 2]].tobytes(), name
    assert reader[4:12]["rtc"].tobytes() == ds.rtc.values[4:12].tobytes()
    runs = reader.read_runs([(30, 32), (2, 5), (7, 7)])
    for name, values in runs.items():
        assert values.tobytes() == ds[name].values[[30, 31, 2, 3, 4]].tobytes(), name
    assert reader[[]]["rtc"].shape == (0, 2, 2, 2, 128, 128)


def test_unknown_engine(small_cube):
    with pytest.raises(
        ValueError,
        match="engine must be one of 'shards', 'tensorstore', 'zarr' or None, got 'x'",
    ):
        CubeReader(str(small_cube), engine="x")


def test_shards_engine_refuses_what_it_cannot_decode(small_cube, tmp_path):
    # A copy whose "coh" uses a codec the shard decoder does not know (gzip).
    dest = tmp_path / "gzip.zarr"
    shutil.copytree(small_cube, dest)
    meta_path = dest / "coh" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["codecs"][1:] = [
        {"name": "gzip", "configuration": {"level": 1}}
    ]
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(dest / "coh" / "c")  # no chunks left in the old codec: fill values
    store.consolidate(str(dest))
    with pytest.raises(
        ValueError,
        match=r"engine='shards' decodes the converter's layouts, but "
        r"variable\(s\) \['coh'\] use a codec it does not decode; use engine=None",
    ):
        CubeReader(str(dest), engine="shards")
    reader = CubeReader(str(dest))
    assert reader.engine == "zarr" and not reader.fork_safe
    assert reader[3]["rtc"].tobytes() == CubeReader(str(small_cube))[3]["rtc"].tobytes()


def _read_in_child(reader, conn):
    conn.send({name: values.tobytes() for name, values in reader[[5, 1]].items()})
    conn.close()


def test_shards_reader_keeps_working_after_fork(small_cube):
    reader = CubeReader(str(small_cube), variables=("rtc", "coh", "status"))
    want = {name: values.tobytes() for name, values in reader[[5, 1]].items()}  # parent reads
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_in_child, args=(reader, child))
    proc.start()
    got = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0 and got == want
    assert reader[[5, 1]]["rtc"].tobytes() == want["rtc"]  # the parent reads on
