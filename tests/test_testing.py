"""The synthetic corpus: release layout, readable by independent readers, plausible values."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from nasar_zarr import schema
from nasar_zarr.testing import write_corpus
from tests.conftest import decode_with_card


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c"), n_shards=3, samples_per_shard=40, seed=3)


@pytest.fixture(scope="module")
def arrays(corpus):
    return decode_with_card(corpus.root)


def test_release_layout(corpus):
    root = corpus.root
    assert sorted(p.name for p in (root / "data").iterdir()) == [
        "nasar-train-000000.tar",
        "nasar-train-000001.tar",
        "nasar-train-000002.tar",
    ]
    summary = json.loads((root / "webdataset_summary.json").read_text())
    assert summary["num_shards"] == 3
    assert summary["num_samples"] == 120
    assert summary["dem_extended"] == "raw"
    assert summary["dem_arrays"] == ["dem", "slope_deg"]


def test_card_reader_reads_everything(arrays):
    assert len(arrays) == 120
    for sample in arrays.values():
        assert list(sample) == list(schema.SOURCE_KEYS)
        for name, a in sample.items():
            assert a.shape == schema.SOURCE_SHAPES[name]
            assert a.dtype == np.float32


def test_webdataset_library_reads_every_sample(corpus, arrays):
    import io

    import webdataset as wds

    urls = [str(corpus.root / p) for p in corpus.shard_paths]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        with np.load(io.BytesIO(sample["npz"]), allow_pickle=False) as npz:
            np.testing.assert_array_equal(npz["dem"], arrays[sample["__key__"]]["dem"])
        seen += 1
    assert seen == 120


def test_metadata_agrees_with_tars(corpus, arrays):
    meta = pq.read_table(corpus.root / "metadata.parquet").to_pandas()
    assert list(meta.columns[:4]) == list(schema.SHARDING_COLUMNS)
    assert meta["sample_key"].tolist() == list(arrays)  # same keys, same (release) order
    assert meta["shard_path"].tolist() == [schema.shard_name(i // 40) for i in range(120)]
    assert meta["shard_index"].tolist() == [i // 40 for i in range(120)]
    assert meta["sample_index_in_shard"].tolist() == [i % 40 for i in range(120)]
    assert (meta["quality_score"] > 0.53).all()
    assert str(meta["prime_datetime"].dt.tz) == "UTC"
    assert (meta["secondary_datetime"] > meta["prime_datetime"]).all()
    assert set(meta["orbit_direction"]) == {"ascending", "descending"}
    assert meta["footprint_wkt"].str.startswith("POLYGON ((").all()
    assert meta["center_lon"].between(-170, -50).all() and meta["center_lat"].between(10, 75).all()


def test_values_are_plausible(corpus, arrays):
    meta = pq.read_table(corpus.root / "metadata.parquet").to_pandas().set_index("sample_key")
    co, cross = [], []
    for key, s in arrays.items():
        for view in range(2):
            prime, secondary = s[f"prime_rtc_view_{view}"], s[f"secondary_rtc_view_{view}"]
            assert (prime >= 0).all() and (secondary >= 0).all()
            assert not np.array_equal(prime, secondary)
            # Same reflectivity field under independent speckle: 8x8 block means agree.
            blocks = [
                a[0].reshape(16, 8, 16, 8).mean(axis=(1, 3)).ravel() for a in (prime, secondary)
            ]
            assert np.corrcoef(np.log(blocks[0]), np.log(blocks[1]))[0, 1] > 0.6
            co.append(prime[0].mean())
            if meta.loc[key, "cross_pol_available"]:
                cross.append(prime[1].mean())
                assert prime[1].any()
            else:
                assert not prime[1].any() and not secondary[1].any()  # zero padded
            inc = s[f"inc_angle_view_{view}"][0]
            assert 29 <= inc.min() and inc.max() <= 46
            assert not np.allclose(inc[:, 0], inc[:, -1])  # ramps across range
            cos, sin = s[f"ifg_view_{view}"]
            np.testing.assert_allclose(cos**2 + sin**2, 1, atol=1e-5)
            coh = s[f"coh_view_{view}"]
            assert 0 <= coh.min() and coh.max() <= 1
        dem = s["dem"][0].astype(np.float64)
        assert -500 < dem.min() and dem.max() < 6500
        dzdy, dzdx = np.gradient(dem, 30.0)
        slope = np.degrees(np.arctan(np.hypot(dzdx, dzdy)))
        np.testing.assert_allclose(s["slope_deg"][0], slope, atol=0.05)
    ratio = np.mean(co) / np.mean(cross)
    assert 5 <= ratio <= 10, ratio
    missing = 1 - meta["cross_pol_available"].mean()
    assert 0.03 < missing < 0.35


def test_speckle_statistics(arrays):
    # Gamma speckle with ~4.5 looks: the coefficient of variation of a homogeneous
    # area is ~1/sqrt(L); over small windows it stays close to that.
    s = next(iter(arrays.values()))["prime_rtc_view_0"][0]
    window = s[60:68, 60:68]
    cv = window.std() / window.mean()
    assert 0.25 < cv < 0.8


def test_deterministic_for_a_seed(tmp_path):
    a = write_corpus(tmp_path / "a", n_shards=1, samples_per_shard=3, seed=11)
    b = write_corpus(tmp_path / "b", n_shards=1, samples_per_shard=3, seed=11)
    c = write_corpus(tmp_path / "c", n_shards=1, samples_per_shard=3, seed=12)
    name = schema.shard_name(0)
    assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    assert (a.root / name).read_bytes() != (c.root / name).read_bytes()
    pd.testing.assert_frame_equal(a.metadata, b.metadata)


def test_cli_synth(tmp_path):
    from nasar_zarr.cli import main

    assert (
        main(
            [
                "synth",
                str(tmp_path / "out"),
                "--shards",
                "3",
                "--samples-per-shard",
                "4",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert len(decode_with_card(tmp_path / "out")) == 12
