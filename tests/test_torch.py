"""nasar_zarr.torch: the release loader's outputs from the cube, the sampler, the loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from nasar_zarr import store  # noqa: E402
from nasar_zarr.reader import CubeReader  # noqa: E402
from nasar_zarr.torch import (  # noqa: E402
    CubeDataLoader,
    InSARDataset,
    RTCDataset,
    ShardAwareSampler,
    _plan_reads,
    _runs,
    collate,
    dataloader,
    shard_aware_order,
)
from tests.conftest import decode_with_card  # noqa: E402

# A loader left in a reference cycle stops its workers when collected, taking up to
# 5 s per worker on whichever thread collects: here, not in a later test's server.
pytestmark = pytest.mark.usefixtures("collect_garbage")

RTC_KEYS = ["prime_rtc_view_0", "secondary_rtc_view_0", "prime_rtc_view_1", "secondary_rtc_view_1"]
INSAR_KEYS = RTC_KEYS + [
    f"{name}_view_{v}"
    for name in ("inc_angle", "ifg", "coh", "dem", "dem_relief", "slope")
    for v in (0, 1)
]


# ------------------------------------------------ an independent reading of the card


def card_rtc(x, gain=20.0, co=(0.15, 2.39), cross=(0.01, 1.09)):
    """Dataset card, Preprocessing: log1p(gain x), then clip-and-rescale per polarization."""
    y = np.log1p(gain * x.astype(np.float64))
    out = np.stack(
        [(np.clip(y[c], lo, hi) - lo) / (hi - lo) for c, (lo, hi) in enumerate((co, cross))]
    )
    out[~x.any(axis=(1, 2))] = 0.0  # "Fully missing polarizations remain zero-padded"
    return out


def card_range(x, lo, hi):
    return (np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo)


def card_relief(dem, percentiles=(5, 95)):
    lo, hi = np.percentile(dem.astype(np.float64), percentiles)
    return np.zeros(dem.shape) if hi == lo else card_range(dem, lo, hi)


def card_item(arrays, **ranges):
    """The release InSAR loader's item, from the npz arrays of one sample, in float64."""
    gain = ranges.get("rtc_gain", 20.0)
    co, cross = ranges.get("rtc_ranges", {"co": (0.15, 2.39), "cross": (0.01, 1.09)}).values()
    out = {key: card_rtc(arrays[key], gain, co, cross) for key in RTC_KEYS}
    for v in (0, 1):
        for name in ("inc_angle", "ifg", "coh"):
            out[f"{name}_view_{v}"] = arrays[f"{name}_view_{v}"]
        out[f"dem_view_{v}"] = card_range(arrays["dem"], *ranges.get("dem_range", (-100, 4000)))
        out[f"dem_relief_view_{v}"] = card_relief(
            arrays["dem"], ranges.get("relief_percentiles", (5, 95))
        )
        out[f"slope_view_{v}"] = card_range(
            arrays["slope_deg"], *ranges.get("slope_range", (0, 45))
        )
    return out


@pytest.fixture(scope="module")
def card(small_corpus):
    return decode_with_card(small_corpus.root)


def assert_card(item, arrays, keys, **ranges):
    expected = card_item(arrays, **ranges)
    for key in keys:
        got = item[key]
        assert got.dtype == torch.float32 and tuple(got.shape) == expected[key].shape, key
        if key[:-7] in ("inc_angle", "ifg", "coh"):  # as stored: bit for bit
            assert got.numpy().tobytes() == expected[key].tobytes(), key
        else:
            np.testing.assert_allclose(got.numpy(), expected[key], rtol=0, atol=2e-6, err_msg=key)


# ------------------------------------------------ datasets


def test_rtc_dataset_equals_card(small_cube, card, table):
    ds = RTCDataset(str(small_cube))
    assert len(ds) == 32 and ds.shard_size == 8 and ds.inner_chunk == 2
    items = ds.__getitems__(list(range(32)))
    for i, item in enumerate(items):
        assert sorted(item) == sorted([*RTC_KEYS, "sample_key", "index"])
        assert item["index"] == i and item["sample_key"] == table.sample_key[i]
        assert_card(item, card[item["sample_key"]], RTC_KEYS)
    # A missing polarization stays exactly 0 (metadata flag says it is missing).
    no_cross = np.flatnonzero(~table.cross_pol_available.to_numpy())
    assert no_cross.size
    for i in no_cross:
        for key in RTC_KEYS:
            assert not items[i][key][1].any(), (i, key)


def test_insar_dataset_equals_normalized_and_card(small_cube, cube, card):
    ds = InSARDataset(str(small_cube))
    norm = cube.nasar.normalized().compute()
    order = [31, 0, 9, 9, 17, 8, 3]  # unsorted, a duplicate, runs across shards
    items = ds.__getitems__(order)
    assert [it["index"] for it in items] == order
    for i, item in zip(order, items, strict=True):
        assert sorted(item) == sorted([*INSAR_KEYS, "sample_key", "index"])
        s = norm.isel(sample=i)
        for v in (0, 1):
            for t in ("prime", "secondary"):
                want = s.rtc.sel(view=v, time=t).values
                assert item[f"{t}_rtc_view_{v}"].numpy().tobytes() == want.tobytes()
            for name, var in (("dem", "dem"), ("dem_relief", "dem_relief"), ("slope", "slope")):
                assert item[f"{name}_view_{v}"].numpy().tobytes() == s[var].values.tobytes()
        assert_card(item, card[item["sample_key"]], INSAR_KEYS)
        assert torch.equal(ds[i]["dem_relief_view_0"], item["dem_relief_view_0"])


def test_custom_ranges_follow_normalized(small_cube, cube, card):
    ranges = dict(
        rtc_gain=10.0,
        rtc_ranges={"co": (-0.5, 2.0), "cross": (0.0, 0.8)},
        dem_range=(0.0, 1000.0),
        relief_percentiles=(10, 90),
        slope_range=(5, 30),
    )
    ds = InSARDataset(str(small_cube), **ranges)
    norm = cube.nasar.normalized(**ranges).isel(sample=[4, 20]).compute()
    for j, item in enumerate(ds.__getitems__([4, 20])):
        assert item["prime_rtc_view_0"].numpy().tobytes() == norm.rtc.values[j, 0, 0].tobytes()
        assert item["dem_relief_view_1"].numpy()[0].tobytes() == norm.dem_relief.values[j].tobytes()
        assert_card(item, card[item["sample_key"]], INSAR_KEYS, **ranges)


def test_runs_group_inner_chunks():
    runs, rows = _runs(np.array([0, 1, 3, 6, 7, 12, 15, 19]), 2)
    # chunks 0,0,1 | 3,3 | 6,7 | 9: consecutive chunks merge, a skipped chunk starts a run
    assert runs == [(0, 4), (6, 8), (12, 16), (19, 20)]
    assert rows.tolist() == [0, 1, 3, 4, 5, 6, 9, 10]
    assert _runs(np.array([5]), 4) == ([(5, 6)], np.array([0]))
    assert _runs(np.zeros(0, np.int64), 2)[0] == []


def test_reader_read_runs(small_cube):
    reader = CubeReader(str(small_cube), variables=("rtc", "status"))
    whole = reader[0:32]
    got = reader.read_runs([(30, 32), (2, 5)])
    assert got["rtc"].tobytes() == np.concatenate([whole["rtc"][30:], whole["rtc"][2:5]]).tobytes()
    assert got["status"].tolist() == [1] * 5
    with pytest.raises(IndexError, match=r"run \(30, 33\) is outside the cube's 32 samples"):
        reader.read_runs([(30, 33)])


def test_indices_from_select(small_cube, cube, table):
    selection = cube.nasar.select(min_quality=0.7)
    assert 0 < selection.sizes["sample"] < 32
    ds = RTCDataset(str(small_cube), indices=selection)
    assert len(ds) == selection.sizes["sample"]
    want = table.index[table.quality_score >= 0.7].to_numpy()
    assert ds.sample_indices.tolist() == want.tolist()
    assert [
        it["sample_key"] for it in ds.__getitems__(range(len(ds)))
    ] == selection.sample.values.tolist()
    assert RTCDataset(str(small_cube), indices=[7, 2, 7]).sample_indices.tolist() == [7, 2, 7]


def test_bad_indices(small_cube, cube):
    url = str(small_cube)
    with pytest.raises(
        IndexError,
        match=r"indices must lie in \[0, 32\) for a cube of 32 "
        r"samples, got values from 0 to 32",
    ):
        RTCDataset(url, indices=[0, 32])
    with pytest.raises(TypeError, match="indices must be a 1-D sequence of integer"):
        RTCDataset(url, indices=[0.5])
    other = cube.isel(sample=[1, 2]).assign_coords(sample=["nope", cube.sample.values[2]])
    with pytest.raises(
        ValueError,
        match=r"1 sample key\(s\) of the selection are not in the "
        r"cube at .*, e.g. \['nope'\]",
    ):
        RTCDataset(url, indices=other)
    ds = RTCDataset(url, indices=[3, 4])
    with pytest.raises(IndexError, match="index 2 is out of range for a dataset of 2 samples"):
        ds[2]
    assert ds[-1]["index"] == 4
    with pytest.raises(
        ValueError,
        match=r"rtc_ranges has no range for polarization\(s\) "
        r"\['cross'\]",
    ):
        RTCDataset(url, rtc_ranges={"co": (0, 1)})
    with pytest.raises(ValueError, match=r"relief_percentiles must lie in \[0, 100\]"):
        InSARDataset(url, relief_percentiles=(5, 120))


@pytest.fixture(scope="module")
def edited_cube(small_cube, tmp_path_factory):
    """A copy of the small cube with sample 5 rejected and no DEM variables."""
    dest = tmp_path_factory.mktemp("edited") / "nasar.zarr"
    shutil.copytree(small_cube, dest)
    group = store.open_group(str(dest), mode="r+")
    group["status"][5] = 2
    shutil.rmtree(dest / "dem")
    shutil.rmtree(dest / "slope_deg")
    store.consolidate(str(dest))
    return dest


def test_unwritten_samples_and_missing_dem(edited_cube):
    url = str(edited_cube)
    ds = RTCDataset(url)
    assert len(ds) == 31 and 5 not in ds.sample_indices.tolist()
    with pytest.raises(
        ValueError,
        match=r"indices include 1 sample\(s\) that hold no data in "
        r".* \(status 0 pending or 2 rejected\), e.g. "
        r"positions \[5\]",
    ):
        RTCDataset(url, indices=[4, 5])
    with pytest.raises(
        ValueError,
        match=r"has no variable\(s\) \['dem', 'slope_deg'\] that "
        r"InSARDataset reads; .*\(require_dem=False serves",
    ):
        InSARDataset(url)
    item = InSARDataset(url, require_dem=False)[0]
    assert sorted(item) == sorted([*INSAR_KEYS[:10], "sample_key", "index"])


def test_pickles_without_handles(small_cube):
    import pickle

    ds = InSARDataset(str(small_cube))
    ds[0]
    assert ds._reader is not None
    state = ds.__getstate__()
    assert state["_reader"] is None and state["_reader_pid"] is None
    assert len(pickle.dumps(ds)) < 10_000


def test_other_samplers_keep_working(small_cube):
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    ds = RTCDataset(str(small_cube))
    seen = [
        int(i)
        for b in DataLoader(
            ds, batch_size=6, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0))
        )
        for i in b["index"]
    ]
    assert sorted(seen) == list(range(32))
    share = DistributedSampler(ds, num_replicas=3, rank=1, shuffle=False)
    batch = next(iter(DataLoader(ds, batch_size=4, sampler=share)))
    assert batch["index"].tolist() == [1, 4, 7, 10]
    assert batch["prime_rtc_view_0"].shape == (4, 2, 128, 128)


# ------------------------------------------------ DataLoader, processes


def test_dataloader_two_workers_end_to_end(small_cube):
    ds = InSARDataset(str(small_cube))
    reference = ds.__getitems__(list(range(32)))  # the parent reads first
    sampler = ShardAwareSampler(ds, seed=5)
    loader = dataloader(ds, batch_size=5, sampler=sampler, num_workers=2)
    assert isinstance(loader, CubeDataLoader) and loader.multiprocessing_context is None
    assert loader.persistent_workers
    order = []
    for batch in loader:
        assert batch["dem_view_0"].shape[1:] == (1, 128, 128)
        for j, i in enumerate(batch["index"].tolist()):
            order.append(i)
            assert batch["sample_key"][j] == reference[i]["sample_key"]
            for key in INSAR_KEYS:
                assert torch.equal(batch[key][j], reference[i][key]), (i, key)
    assert order == sampler.epoch_indices(0).tolist()
    workers = loader._iterator._workers
    loader.close()  # persistent workers stop now, not whenever the loader is collected
    assert [w.exitcode for w in workers] == [0, 0] and loader._iterator is None
    assert len([b for b in loader]) == 7  # and start again on the next epoch
    with loader:
        workers = loader._iterator._workers
    assert [w.exitcode for w in workers] == [0, 0]
    forkserver = dataloader(ds, batch_size=8, num_workers=1, multiprocessing_context="forkserver")
    assert forkserver.multiprocessing_context.get_start_method() == "forkserver"
    assert [int(i) for b in forkserver for i in b["index"]] == list(range(32))


FORK_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("error")
from torch.utils.data import DataLoader
from nasar_zarr.torch import RTCDataset, dataloader
ds = RTCDataset(sys.argv[1], engine=sys.argv[2] if sys.argv[2] != "auto" else None)
first = ds[0]["prime_rtc_view_0"]  # the parent reads first
if sys.argv[3] == "plain":
    loader = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context="fork")
else:  # ours, default start method, and no `if __name__ == "__main__":` guard
    loader = dataloader(ds, batch_size=8, num_workers=2)
out = {"n": 0, "equal": None}
for batch in loader:
    out["n"] += len(batch["index"])
    if batch["index"][0] == 0:
        out["equal"] = bool((batch["prime_rtc_view_0"][0] == first).all())
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "engine,how", [("auto", "plain"), ("auto", "ours"), ("tensorstore", "plain")]
)
def test_fork_after_parent_read(small_cube, tmp_path, engine, how):
    script = tmp_path / "train.py"  # a script file, as users run them
    script.write_text(textwrap.dedent(FORK_SCRIPT))
    run = subprocess.run(
        [sys.executable, str(script), str(small_cube), engine, how],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if engine == "auto":  # the shard reader: no fallback, no warning, items equal
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.splitlines()[-1]) == {"n": 32, "equal": True}
        assert "Warning" not in run.stderr, run.stderr
    else:  # explicitly tensorstore: a clear error, not a hang and not an abort
        assert run.returncode == 1
        assert (
            "RTCDataset(engine='tensorstore'): this process was forked after tensorstore"
            " started its threads"
        ) in run.stderr


# ------------------------------------------------ outputs own their memory, indices, errors


def _assert_keys_independent(items_or_batch, keys):
    """Mutating one key in place changes no other key (nor another item's)."""
    groups = items_or_batch if isinstance(items_or_batch, list) else [items_or_batch]
    before = [{k: g[k].clone() for k in keys} for g in groups]
    for gi, group in enumerate(groups):
        for key in keys:
            group[key].add_(1000.0)
            for gj, other in enumerate(groups):
                for k in keys:
                    if (gi, key) != (gj, k):
                        assert torch.equal(other[k], before[gj][k]), (gi, key, gj, k)
            group[key].copy_(before[gi][key])


@pytest.mark.parametrize("stack", [False, True])
def test_outputs_own_their_memory(small_cube, stack):
    ds = InSARDataset(str(small_cube), stack=stack)
    keys = ["x"] if stack else INSAR_KEYS
    items = ds.__getitems__([3, 4, 10])
    _assert_keys_independent(items, keys)
    _assert_keys_independent(collate(items), keys)
    loader = dataloader(ds, batch_size=4, num_workers=1)
    batches = [b for b, _ in zip(loader, range(2), strict=False)]
    for batch in batches:
        _assert_keys_independent(batch, keys)
    per_batch = [{b[k].untyped_storage().data_ptr() for k in keys} for b in batches]
    assert not per_batch[0] & per_batch[1]  # no storage shared between batches


def test_index_types(small_cube):
    ds = RTCDataset(str(small_cube), indices=[5, 6, 7, 8])
    want = ds[3]["prime_rtc_view_0"]
    for index in (3, np.int64(3), np.array(3), torch.tensor(3), torch.tensor([3]), -1):
        got = ds[index]
        assert got["index"] == 8 and torch.equal(got["prime_rtc_view_0"], want), index
    for index in (True, np.bool_(False), torch.tensor(True)):
        with pytest.raises(TypeError, match="index must be an integer, got the boolean"):
            ds[index]
    with pytest.raises(TypeError, match=r"index must be an integer \(int, numpy integer or"):
        ds[1.0]
    with pytest.raises(TypeError, match="indices must be integer item positions, got bool"):
        ds.__getitems__([True, False])
    assert [it["index"] for it in ds.__getitems__(torch.tensor([2, 0]))] == [7, 5]


def test_not_a_cube(small_corpus, tmp_path):
    from nasar_zarr.errors import NotACubeError

    corpus = str(small_corpus.root)
    with pytest.raises(NotACubeError) as info:
        InSARDataset(corpus)
    assert str(info.value) == (
        f"{corpus}: not a nasar-zarr cube but a corpus to convert (tar shards and"
        f" metadata.parquet); make a cube of it with `nasar-zarr convert {corpus} DEST`"
    )
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(NotACubeError) as info:
        RTCDataset(str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path}: not a nasar-zarr cube (no Zarr v3 group with 'nasar_zarr' provenance);"
        " make one with `nasar-zarr convert SRC DEST`"
    )
    with pytest.raises(NotACubeError, match=r"missing: no such file or directory$"):
        RTCDataset(str(tmp_path / "missing"))


# ------------------------------------------------ resume through loaders


def _indices(batches):
    return [int(i) for b in batches for i in b["index"]]


@pytest.mark.parametrize("stop", [1, 3, 6])
def test_resume_through_our_loader(small_cube, stop):
    def make():
        ds = RTCDataset(str(small_cube))
        sampler = ShardAwareSampler(ds, seed=3)
        sampler.set_epoch(1)
        return sampler, dataloader(ds, batch_size=4, sampler=sampler, num_workers=2)

    sampler, loader = make()
    full = sampler.epoch_indices().tolist()
    it = iter(loader)
    head = [next(it) for _ in range(stop)]
    state = loader.state_dict()
    assert state["sampler"]["position"] == 4 * stop  # not what the workers read ahead
    assert sampler.state_dict() == state["sampler"]  # the sampler's own state agrees
    del it
    sampler2, loader2 = make()
    loader2.load_state_dict(json.loads(json.dumps(state)))
    sampler2.set_epoch(1)
    assert _indices(head) + _indices(loader2) == full
    assert loader2.state_dict()["sampler"]["position"] == 32  # the epoch is done
    sampler2.set_epoch(2)
    assert _indices(loader2) == sampler2.epoch_indices(2).tolist()


def test_sampler_state_refuses_a_plain_loaders_read_ahead(rtc_ds):
    from torch.utils.data import DataLoader

    sampler = ShardAwareSampler(rtc_ds, seed=3)
    loader = DataLoader(rtc_ds, batch_size=4, sampler=sampler, num_workers=2)
    it = iter(loader)
    [next(it) for _ in range(2)]
    with pytest.raises(
        ValueError,
        match=r"ShardAwareSampler.state_dict\(\) without samples_consumed while a DataLoader"
        r" with 2 workers draws from it: it has handed out \d+ positions, more than your loop"
        r" has consumed .* or pass samples_consumed=",
    ):
        sampler.state_dict()
    assert sampler.state_dict(samples_consumed=8)["position"] == 8
    single = ShardAwareSampler(rtc_ds, seed=3)  # no workers: nothing read ahead
    it = iter(DataLoader(rtc_ds, batch_size=4, sampler=single))
    [next(it) for _ in range(2)]
    assert single.state_dict()["position"] == 8


@pytest.mark.parametrize("stop", [2, 5])
def test_resume_through_stateful_dataloader(small_cube, stop):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        ds = InSARDataset(str(small_cube), stack=True)
        sampler = ShardAwareSampler(ds, seed=4)
        loader = StatefulDataLoader(
            ds, batch_size=4, sampler=sampler, num_workers=2, collate_fn=collate
        )
        return sampler, loader

    sampler, loader = make()
    full = sampler.epoch_indices(0).tolist()
    it = iter(loader)
    head = [next(it) for _ in range(stop)]
    state = loader.state_dict()
    del it
    _, loader2 = make()
    loader2.load_state_dict(state)
    rest = list(loader2)
    assert _indices(head) + _indices(rest) == full
    assert rest[0]["x"].shape == (4, 22, 128, 128)


# ------------------------------------------------ sampler


def is_permutation(order, n):
    return sorted(order.tolist()) == list(range(n))


@settings(max_examples=200, deadline=None)
@given(
    cube=st.lists(st.integers(0, 300), unique=True, max_size=120),
    shard_chunks=st.integers(1, 8),
    inner=st.sampled_from([1, 2, 3, 4]),
    window=st.integers(1, 5),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 100),
    block_chunks=st.integers(1, 4),
)
def test_shard_aware_order_properties(cube, shard_chunks, inner, window, seed, epoch, block_chunks):
    shard = shard_chunks * inner
    cube = np.array(cube, dtype=np.int64)
    args = {"shard": shard, "inner_chunk": inner, "window": window, "block_chunks": block_chunks}
    order = shard_aware_order(cube, seed=seed, epoch=epoch, **args)
    assert is_permutation(order, cube.size)
    again = shard_aware_order(cube.copy(), seed=seed, epoch=epoch, **args)
    assert order.tolist() == again.tolist()  # a pure function
    visited = cube[order]
    # Every block (block_chunks inner chunks of one shard, counted from the shard's
    # start) is contiguous in the order, and in cube order inside.
    span = inner * block_chunks
    blocks = (visited // shard) * shard + (visited % shard) // span
    for b in np.unique(blocks):
        where = np.flatnonzero(blocks == b)
        assert where.tolist() == list(range(where[0], where[-1] + 1))
        assert np.all(np.diff(visited[where]) > 0)
    # Shards come in windows: group shards by first visit, `window` at a time; the
    # window number never decreases along the order.
    shards = visited // shard
    first_seen = list(dict.fromkeys(shards.tolist()))
    turn = {s: k // window for k, s in enumerate(first_seen)}
    assert all(np.diff([turn[s] for s in shards.tolist()]) >= 0)


def test_shard_aware_order_shuffles_and_validates():
    cube = np.arange(64)
    a = shard_aware_order(cube, shard=8, inner_chunk=2, seed=0, epoch=0)
    b = shard_aware_order(cube, shard=8, inner_chunk=2, seed=0, epoch=1)
    c = shard_aware_order(cube, shard=8, inner_chunk=2, seed=1, epoch=0)
    assert a.tolist() != b.tolist() and a.tolist() != c.tolist()
    assert a.tolist() != list(range(64))
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        shard_aware_order(cube, shard=8, inner_chunk=2, seed=-1, epoch=0)
    with pytest.raises(ValueError, match="window must be a positive integer, got 0"):
        shard_aware_order(cube, shard=8, inner_chunk=2, seed=0, epoch=0, window=0)
    with pytest.raises(ValueError, match="block_chunks must be a positive integer, got 0"):
        shard_aware_order(cube, shard=8, inner_chunk=2, seed=0, epoch=0, block_chunks=0)
    # the default is one inner chunk per block: the order saved states were taken in
    explicit = shard_aware_order(cube, shard=8, inner_chunk=2, seed=0, epoch=0, block_chunks=1)
    assert explicit.tolist() == a.tolist()
    assert a[:8].tolist() == [20, 21, 18, 19, 52, 53, 32, 33]  # as before block_chunks


def test_larger_blocks_read_a_batch_in_fewer_runs(small_cube, rtc_ds):
    one = ShardAwareSampler(rtc_ds, seed=2)
    four = ShardAwareSampler(rtc_ds, seed=2, block_chunks=4)  # a whole 8-sample shard
    runs = {}
    for name, sampler in (("one", one), ("four", four)):
        order = sampler.epoch_indices(0)
        runs[name] = len(_runs(np.sort(rtc_ds.sample_indices[order[:8]]), 2)[0])
        assert sorted(order.tolist()) == list(range(len(rtc_ds)))
    assert runs["four"] == 1 and runs["one"] > 1
    state = four.state_dict(samples_consumed=5)
    assert state["block_chunks"] == 4
    with pytest.raises(ValueError, match="block_chunks: saved 4, here 1"):
        one.load_state_dict(state)
    old = {k: v for k, v in one.state_dict(samples_consumed=3).items() if k != "block_chunks"}
    one.load_state_dict(old)  # a state saved before block_chunks existed
    assert one.state_dict()["position"] == 3


@pytest.fixture(scope="module")
def rtc_ds(small_cube):
    return RTCDataset(str(small_cube))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 32),
    replicas=st.integers(1, 7),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
def test_rank_split_equal_disjoint_covering(
    small_cube, n, replicas, drop_last, shuffle, seed, epoch
):
    ds = RTCDataset(str(small_cube), indices=np.arange(n))
    shares = []
    for rank in range(replicas):
        s = ShardAwareSampler(
            ds, num_replicas=replicas, rank=rank, drop_last=drop_last, shuffle=shuffle, seed=seed
        )
        s.set_epoch(epoch)
        shares.append(list(s))
        assert len(shares[-1]) == len(s)
    lengths = {len(share) for share in shares}
    assert len(lengths) == 1
    per_rank = lengths.pop()
    assert per_rank == (n // replicas if drop_last else -(-n // replicas))
    together = [i for share in shares for i in share]
    if drop_last or n % replicas == 0:
        assert len(set(together)) == len(together)  # disjoint
    if not drop_last:
        assert set(together) == set(range(n))  # covering; the padding repeats the start
        padding = together[n:]
        assert padding == together[: len(padding)]  # the order's start, repeated
    order = (
        shard_aware_order(ds.sample_indices, shard=8, inner_chunk=2, seed=seed, epoch=epoch)
        if shuffle
        else np.arange(n)
    )
    k = min(n, len(together))
    assert together[:k] == order[:k].tolist()


@settings(max_examples=60, deadline=None)
@given(consumed=st.integers(0, 11), replicas=st.integers(1, 3), epoch=st.integers(0, 3))
def test_resume_at_exactly_the_next_sample(rtc_ds, consumed, replicas, epoch):
    rank = replicas - 1
    s = ShardAwareSampler(rtc_ds, num_replicas=replicas, rank=rank, seed=9)
    s.set_epoch(epoch)
    full = s.epoch_indices().tolist()
    consumed = min(consumed, len(full))
    it = iter(s)
    head = [next(it) for _ in range(consumed)]
    state = s.state_dict()
    assert state["epoch"] == epoch and state["position"] == consumed
    resumed = ShardAwareSampler(rtc_ds, num_replicas=replicas, rank=rank, seed=9)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    resumed.set_epoch(epoch)  # the training loop's call keeps the resumed position
    assert head + list(resumed) == full
    assert list(resumed) == full  # the next pass of the epoch starts at the beginning
    resumed.set_epoch(epoch + 1)
    assert list(resumed) == s.epoch_indices(epoch + 1).tolist()


def test_state_with_consumed_count_and_mismatch(rtc_ds, small_cube):
    s = ShardAwareSampler(rtc_ds, seed=1)
    it = iter(s)
    [next(it) for _ in range(12)]  # a DataLoader draws ahead of the loop
    state = s.state_dict(samples_consumed=8)
    assert state["position"] == 8
    other = ShardAwareSampler(rtc_ds, seed=2)
    with pytest.raises(
        ValueError,
        match="cannot resume: the sampler or dataset differs from "
        "the saved state \\(seed: saved 1, here 2\\)",
    ):
        other.load_state_dict(state)
    smaller = RTCDataset(str(small_cube), indices=list(range(31)))
    with pytest.raises(ValueError, match="dataset_size: saved 32, here 31"):
        ShardAwareSampler(smaller, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"samples_consumed must lie in \[0, 32\], got 33"):
        s.state_dict(samples_consumed=33)
    with pytest.raises(TypeError, match="ShardAwareSampler needs a nasar_zarr.torch dataset"):
        ShardAwareSampler(list(range(4)))
    with pytest.raises(ValueError, match="need num_replicas >= 1 and 0 <= rank < num_replicas"):
        ShardAwareSampler(rtc_ds, num_replicas=2, rank=2)


def test_plan_reads_follows_whole_blocks():
    # Whole blocks in any order: read in request order, nothing to gather.
    assert _plan_reads(np.array([6, 7, 0, 1, 2, 3]), 2) == ([(6, 8), (0, 4)], None)
    assert _plan_reads(np.array([7, 0, 1]), 2) == ([(7, 8), (0, 2)], None)
    # Rows not asked for, a duplicate or an interleaving: sorted runs, then a gather.
    runs, take = _plan_reads(np.array([3, 0]), 2)
    assert runs == [(0, 4)] and take.tolist() == [3, 0]
    runs, take = _plan_reads(np.array([1, 0, 1]), 2)
    assert runs == [(0, 2)] and take.tolist() == [1, 0, 1]
    runs, take = _plan_reads(np.array([0, 6, 1, 7]), 2)
    assert runs == [(0, 2), (6, 8)] and take.tolist() == [0, 2, 1, 3]


def test_collate_takes_batch_buffers_without_copy(small_cube):
    from torch.utils.data import default_collate

    ds = InSARDataset(str(small_cube))
    items = ds.__getitems__([4, 5, 9])
    batch, reference = collate(items), default_collate(items)
    assert list(batch) == list(reference)
    for key in INSAR_KEYS:
        assert torch.equal(batch[key], reference[key]) and batch[key].is_contiguous()
        assert batch[key].data_ptr() == items[0][key].data_ptr(), key  # no copy
    assert batch["sample_key"] == reference["sample_key"]
    assert batch["index"].tolist() == [4, 5, 9]
    mixed = [items[1], ds[0]]  # rows of two batches: stacked, as default_collate does
    assert torch.equal(collate(mixed)["ifg_view_1"], default_collate(mixed)["ifg_view_1"])
    assert collate([1, 2]).tolist() == [1, 2]


# ------------------------------------------------ fast transforms, device, stack, half


def _around_thresholds(gain=20.0, ranges=((0.15, 2.39), (0.01, 1.09)), steps=1500):
    """Raw RTC values whose log1p(gain x) lies at and around each clip threshold."""
    out = []
    for lo, hi in ranges:
        for t in (lo, hi):
            x0 = np.float32(np.expm1(np.float64(t)) / gain)
            out.append(x0 + np.arange(-steps, steps, dtype=np.float32) * np.spacing(x0))
    return np.concatenate(out)


def test_fast_rtc_kernel_within_one_ulp_of_exact():
    from nasar_zarr import normalize
    from nasar_zarr.torch import kernels as fast

    rng = np.random.default_rng(11)
    values = np.concatenate(
        [
            _around_thresholds(),
            rng.gamma(1.0, 0.1, 150_000).astype(np.float32),
            rng.uniform(0, 1e3, 50_000).astype(np.float32),
            np.array([0.0, -0.0, 1e-30, np.inf], np.float32),
        ]
    )
    x = np.resize(values, (values.size // 64 + 1) * 64).reshape(-1, 2, 2, 2, 2, 4)
    x[0, 0, 0, 1] = 0.0  # a missing polarization stays exactly 0
    x[1] = np.nan  # an unwritten sample stays NaN
    present = x.any(axis=(-2, -1)) | np.isnan(x).any(axis=(-2, -1))
    low = np.array([0.15, 0.01], np.float32)[:, None, None]
    high = np.array([2.39, 1.09], np.float32)[:, None, None]
    exact = normalize.rtc_kernel(x, present[..., None, None], low, high, gain=np.float32(20))
    got = torch.empty(x.shape)
    fast.rtc(
        torch.from_numpy(x),
        torch.from_numpy(present)[..., None, None],
        torch.from_numpy(low),
        torch.from_numpy(high),
        gain=20.0,
        out=got,
    )
    got_np = got.numpy()
    assert np.array_equal(np.isnan(got_np), np.isnan(exact))
    finite = ~np.isnan(exact)
    # within one ulp of the output range's top (2**-23): log1p is the one step that differs
    assert np.abs(got_np[finite].astype(np.float64) - exact[finite]).max() <= 2.0**-23
    assert not got_np[0, 0, 0, 1].any()
    assert (got_np[finite] == exact[finite]).mean() > 0.85  # mostly bit for bit


def test_fast_precision_and_device_equal_exact_but_rtc(small_cube):
    exact = InSARDataset(str(small_cube))
    fast = InSARDataset(str(small_cube), precision="fast")
    on_cpu = InSARDataset(str(small_cube), precision="fast", device="cpu")
    order = [5, 30, 2, 2]
    want = exact.__getitems__(order)
    got = fast.__getitems__(order)
    via_device = on_cpu.__getitems__(order)
    for a, b, c in zip(want, got, via_device, strict=True):
        for key in INSAR_KEYS:
            assert torch.equal(b[key], c[key]), key  # the same kernels wherever they run
            if key in RTC_KEYS:
                assert (b[key].double() - a[key].double()).abs().max() <= 2.0**-23, key
            else:
                assert b[key].numpy().tobytes() == a[key].numpy().tobytes(), key
    # device=: workers only read; the loader transforms each batch on the device
    sampler = ShardAwareSampler(on_cpu, seed=2)
    loader = dataloader(on_cpu, batch_size=6, sampler=sampler, num_workers=2)
    for batch in loader:
        assert not any(k.startswith("raw/") for k in batch)
        ref = collate(fast.__getitems__(batch["index"].tolist()))
        for key in INSAR_KEYS:
            assert torch.equal(batch[key], ref[key]), key
    with pytest.raises(ValueError, match="device='cpu' runs the fast transforms on that device"):
        InSARDataset(str(small_cube), device="cpu")
    with pytest.raises(ValueError, match="precision must be 'exact' or 'fast', got 'half'"):
        InSARDataset(str(small_cube), precision="half")


@pytest.mark.parametrize("cls", [RTCDataset, InSARDataset])
def test_stack_is_the_concatenation_of_the_keys(small_cube, cls):
    plain = cls(str(small_cube))
    stacked = cls(str(small_cube), stack=True)
    keys = RTC_KEYS if cls is RTCDataset else INSAR_KEYS
    assert stacked.output_keys == tuple(keys)
    assert len(stacked.channels) == (8 if cls is RTCDataset else 22)
    assert stacked.channels[:3] == (
        "prime_rtc_view_0/co",
        "prime_rtc_view_0/cross",
        "secondary_rtc_view_0/co",
    )
    if cls is InSARDataset:
        assert stacked.channels[8:14] == (
            "inc_angle_view_0",
            "inc_angle_view_1",
            "ifg_view_0/cos",
            "ifg_view_0/sin",
            "ifg_view_1/cos",
            "ifg_view_1/sin",
        )
        assert stacked.channels[-2:] == ("slope_view_0", "slope_view_1")
    order = [9, 3, 3, 31]
    want = collate(plain.__getitems__(order))
    cat = torch.cat([want[key] for key in keys], dim=1)
    batch = collate(stacked.__getitems__(order))
    assert sorted(batch) == ["index", "sample_key", "x"]
    assert batch["x"].dtype == torch.float32 and batch["x"].is_contiguous()
    assert batch["x"].numpy().tobytes() == cat.numpy().tobytes()
    for dtype in (torch.bfloat16, torch.float16):
        half = cls(str(small_cube), stack=True, dtype=dtype)
        x = collate(half.__getitems__(order))["x"]
        assert x.dtype == dtype and torch.equal(x, cat.to(dtype))  # round to nearest, once
        per_key = cls(str(small_cube), dtype=dtype).__getitems__(order)[1]
        assert all(torch.equal(per_key[k], want[k][1].to(dtype)) for k in keys)
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or"):
        cls(str(small_cube), dtype=torch.float64)


@pytest.mark.parametrize("context", [None, "forkserver"])
def test_stacked_loader_and_a_training_step(small_cube, context):
    ds = InSARDataset(str(small_cube), stack=True, dtype=torch.bfloat16)
    sampler = ShardAwareSampler(ds, seed=0)
    loader = dataloader(
        ds, batch_size=8, sampler=sampler, num_workers=2, multiprocessing_context=context
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(22, 4, 3, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(1)
    )
    model(torch.zeros(1, 22, 128, 128))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    start = [p.detach().clone() for p in model.parameters()]
    seen, storages, kept = [], set(), []
    for batch in loader:
        x = batch["x"]
        assert x.shape[1:] == (22, 128, 128) and x.dtype == torch.bfloat16
        storages.add(x.untyped_storage().data_ptr())
        kept.append(x)  # held, so that no address is reused
        loss = model(x.float()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        seen += batch["index"].tolist()
    assert seen == sampler.epoch_indices(0).tolist()
    assert len(storages) == 4  # every batch its own buffer
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))


DDP_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from nasar_zarr.torch import InSARDataset, ShardAwareSampler, dataloader

def run(rank, url, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ds = InSARDataset(url, stack=True, dtype=torch.bfloat16)
    sampler = ShardAwareSampler(ds, seed=1)  # ranks from the process group
    loader = dataloader(ds, batch_size=4, sampler=sampler, num_workers=1)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Conv2d(22, 2, 8, stride=8), torch.nn.Flatten(),
                            torch.nn.Linear(512, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    seen = []
    for batch in loader:
        loss = model(batch["x"].float()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += batch["index"].tolist()
    weights = [p.detach().flatten()[:4].tolist() for p in model.parameters()]
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"seen": seen, "share": sampler.epoch_indices(0).tolist(),
                   "weights": weights}, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=tuple(sys.argv[1:4]), nprocs=2)
"""


def test_stacked_loader_under_ddp(small_cube, tmp_path):
    import socket

    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / "rank"
    run = subprocess.run(
        [sys.executable, str(script), str(small_cube), port, str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["seen"] == r["share"] and len(r["seen"]) == 16
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(32))  # disjoint, covering
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas in step


@pytest.mark.parametrize("options", [{"stack": True}, {}, {"precision": "fast", "device": "cpu"}])
def test_pooled_buffers_are_reused_only_once_released(small_cube, options):
    ds = InSARDataset(str(small_cube), **options)
    keys = ["x"] if options.get("stack") else INSAR_KEYS
    reference = ds.__getitems__(list(range(32)))
    sampler = ShardAwareSampler(ds, seed=0)
    loader = dataloader(ds, batch_size=4, sampler=sampler, num_workers=2)
    tags = []
    hold = loader._hold

    def spy(batch):
        tags.append(batch.get("_buffer"))
        hold(batch)

    loader._hold = spy
    kept = []
    with loader:
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for batch in loader:
                assert "_buffer" not in batch
                if epoch == 0:
                    kept.append(batch)  # held by the loop: their buffers must never be reused
    for batch in kept:
        for j, i in enumerate(batch["index"].tolist()):
            for key in keys:
                assert torch.equal(batch[key][j], reference[i][key]), (i, key)
    assert len(tags) == 24 and all(t >= 0 for t in tags)
    assert not set(tags[:8]) & set(tags[8:])  # held buffers stayed out of the pool
    assert len(set(tags[8:])) < 16  # released ones came back


def test_metadata_columns_ride_along(small_cube, table):
    ds = InSARDataset(
        str(small_cube), stack=True, metadata=["quality_score", "track", "orbit_direction"]
    )
    order = [7, 0, 30]
    batch = collate(ds.__getitems__(order))
    assert batch["quality_score"].dtype == torch.float64
    assert batch["quality_score"].tolist() == table.quality_score[order].tolist()
    assert batch["track"].tolist() == table.track[order].tolist()
    assert batch["orbit_direction"] == table.orbit_direction[order].tolist()
    with dataloader(ds, batch_size=8, num_workers=1) as loader:
        first = next(iter(loader))
    assert first["track"].tolist() == table.track[:8].tolist()
    for name, why in (("nope", ""), ("sample_key", " (an item already has that key)")):
        with pytest.raises(ValueError) as info:
            RTCDataset(str(small_cube), metadata=[name])
        assert str(info.value).startswith(
            f"metadata={name!r}: not a per-sample column of the cube at {small_cube}{why};"
            " its per-sample columns are ['burst_id', 'center_lat',"
        )
