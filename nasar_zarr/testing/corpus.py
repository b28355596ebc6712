"""A synthetic NA-SAR corpus in exactly the release layout.

Values are physically plausible (see ``make_batch``) because normalization,
statistics and compression all depend on them; everything is deterministic
for a seed. Smooth fields are made by bilinear upsampling of coarse random
grids with two small matrix products, which keeps 1,000 samples in seconds.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import schema

PIXEL_SPACING_M = 30.0  # OPERA RTC-S1 posting
LOOKS = 4.5  # equivalent number of looks of the speckle
MISSING_CROSS_POL_FRACTION = 0.15
_BATCH = 64  # samples generated at once


@dataclass(frozen=True)
class CorpusInfo:
    """What :func:`write_corpus` wrote."""

    root: Path
    shard_paths: tuple[str, ...]
    samples_per_shard: tuple[int, ...]
    metadata: pd.DataFrame

    @property
    def n_samples(self) -> int:
        return sum(self.samples_per_shard)


# ---------------------------------------------------------------------------- fields


def _upsample_matrix(coarse: int, fine: int = schema.PATCH) -> np.ndarray:
    """(fine, coarse) bilinear interpolation weights."""
    pos = np.linspace(0, coarse - 1, fine)
    lo = np.clip(np.floor(pos).astype(int), 0, coarse - 2)
    frac = pos - lo
    m = np.zeros((fine, coarse), dtype=np.float32)
    m[np.arange(fine), lo] = 1 - frac
    m[np.arange(fine), lo + 1] = frac
    return m


_UP = {c: _upsample_matrix(c) for c in (3, 5, 9, 17)}


def smooth_field(rng: np.random.Generator, lead: tuple[int, ...], coarse: int = 5) -> np.ndarray:
    """Zero-mean, unit-ish smooth random fields of shape (*lead, 128, 128)."""
    grid = rng.standard_normal((*lead, coarse, coarse), dtype=np.float32)
    up = _UP[coarse]
    return up @ grid @ up.T


def terrain(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """DEM in metres (multi-scale relief over a base height) and its slope in degrees."""
    base = rng.uniform(0.0, 3000.0, size=(n, 1, 1)).astype(np.float32)
    # Low plains are flat, mountains rugged: relief grows with base height.
    relief = rng.lognormal(np.log(120.0), 1.0, size=(n, 1, 1)).clip(2, 0.4 * base + 50)
    field = (
        smooth_field(rng, (n,), 3)
        + 0.5 * smooth_field(rng, (n,), 9)
        + 0.2 * smooth_field(rng, (n,), 17)
    )
    dem = np.maximum(base + relief.astype(np.float32) * field, -100.0)
    dzdy, dzdx = np.gradient(dem, PIXEL_SPACING_M, axis=(1, 2))
    slope = np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32)
    return dem.astype(np.float32), slope


def make_batch(
    rng: np.random.Generator, n: int, *, cross_pol_available: np.ndarray, ascending: np.ndarray
) -> dict[str, np.ndarray]:
    """``n`` samples of the 12 source arrays, shape (n, C, 128, 128) each, float32.

    - RTC: linear gamma0 = smooth log-normal reflectivity x gamma speckle (4.5
      looks); cross-pol 5-10x darker than co-pol; secondary = prime reflectivity
      with a small smooth change and independent speckle; a missing cross-pol
      is an all-zero channel.
    - Incidence angle ramps across range (x) within 29-46 degrees, per view.
    - ifg: cos/sin of a smooth phase (fringes) plus coherence-dependent noise.
    - coh: smooth in [0, 1]; DEM with its consistent slope.
    """
    f32 = np.float32
    out: dict[str, np.ndarray] = {}
    dem, slope = terrain(rng, n)
    out["dem"], out["slope_deg"] = dem[:, None], slope[:, None]
    x = np.arange(schema.PATCH, dtype=f32)
    for view in range(2):
        co_db = rng.uniform(-16.0, -6.0, size=(n, 1, 1)).astype(f32) + 2.5 * smooth_field(rng, (n,))
        ratio_db = rng.uniform(-10.0, -7.0, size=(n, 1, 1)).astype(f32) + smooth_field(rng, (n,))
        reflect = np.stack([co_db, co_db + ratio_db], axis=1)  # (n, 2, y, x) in dB
        change_db = 0.8 * smooth_field(rng, (n, 2), 3)
        for time, delta in (("prime", 0.0), ("secondary", change_db)):
            mean = np.power(f32(10.0), (reflect + delta) / f32(10.0))
            speckle = rng.standard_gamma(LOOKS, size=mean.shape, dtype=f32) / f32(LOOKS)
            rtc = mean * speckle
            rtc[~cross_pol_available, 1] = 0.0
            out[f"{time}_rtc_view_{view}"] = rtc.astype(f32)
        near = rng.uniform(29.0, 45.0, size=(n, 1, 1)).astype(f32)
        span = rng.uniform(0.2, 1.0, size=(n, 1, 1)).astype(f32)
        direction = np.where(ascending ^ bool(view), 1.0, -1.0).astype(f32)[:, None, None]
        ramp = near + span * (0.5 + direction * (x / (schema.PATCH - 1) - 0.5))
        out[f"inc_angle_view_{view}"] = np.broadcast_to(ramp, (n, schema.PATCH, schema.PATCH))[
            :, None
        ].astype(f32)
        coh = (
            0.55
            + 0.25 * smooth_field(rng, (n,))
            + 0.05 * rng.standard_normal((n, schema.PATCH, schema.PATCH), dtype=f32)
        )
        coh = np.clip(coh, 0.0, 1.0).astype(f32)
        out[f"coh_view_{view}"] = coh[:, None]
        fringes = rng.uniform(-0.3, 0.3, size=(n, 2, 1, 1)).astype(f32)
        yy = np.arange(schema.PATCH, dtype=f32)[:, None]
        phase = fringes[:, 0] * yy + fringes[:, 1] * x + 3.0 * smooth_field(rng, (n,))
        phase += (1.0 - coh) * rng.standard_normal(phase.shape, dtype=f32)
        out[f"ifg_view_{view}"] = np.stack([np.cos(phase), np.sin(phase)], axis=1).astype(f32)
    return {k: out[k] for k in schema.SOURCE_KEYS}


# ---------------------------------------------------------------------------- encoding


def encode_npz(arrays: Mapping[str, np.ndarray], *, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    if compressed:
        np.savez_compressed(buf, allow_pickle=False, **arrays)
    else:
        np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def sample_members(
    key: str, arrays: Mapping[str, np.ndarray], *, layout: str = "npz", compressed: bool = False
) -> list[tuple[str, bytes]]:
    """Tar members of one sample: ``<key>.npz`` or ``<key>.<array>.npy`` each."""
    if layout == "npz":
        return [(f"{key}.npz", encode_npz(arrays, compressed=compressed))]
    if layout == "npy":
        return [(f"{key}.{name}.npy", encode_npy(a)) for name, a in arrays.items()]
    raise ValueError(f"layout must be 'npz' or 'npy', got {layout!r}")


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> int:
    """Write ``(name, bytes)`` members to a tar file; returns the file size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


# ---------------------------------------------------------------------------- metadata


def sample_key(global_index: int) -> str:
    return f"nasar_{global_index:09d}"


def make_metadata(rng: np.random.Generator, samples_per_shard: Sequence[int]) -> pd.DataFrame:
    """Plausible OPERA provenance and patch geometry, one row per sample, release order."""
    n = int(sum(samples_per_shard))
    shard_index = np.repeat(np.arange(len(samples_per_shard)), samples_per_shard)
    in_shard = np.concatenate([np.arange(k) for k in samples_per_shard]) if n else np.zeros(0, int)
    track = rng.integers(1, 176, n)
    burst = rng.integers(1000, 380000, n)
    swath = rng.integers(1, 4, n)
    ascending = rng.random(n) < 0.5
    lon = rng.uniform(-165.0, -55.0, n)
    lat = rng.uniform(15.0, 70.0, n)
    prime = pd.Timestamp("2016-06-01", tz="UTC") + pd.to_timedelta(
        rng.integers(0, 8 * 365 * 86400, n), unit="s"
    )
    baseline_days = rng.choice([6, 12, 24, 36, 48], n)
    secondary = prime + pd.to_timedelta(baseline_days, unit="D")
    epsg = np.where(lat >= 0, 32600, 32700) + np.floor((lon + 180) / 6).astype(int) + 1
    half = 64 * PIXEL_SPACING_M / 111_320.0
    dlon = half / np.cos(np.radians(lat))
    footprint = [
        f"POLYGON (({a - b:.6f} {c - half:.6f}, {a + b:.6f} {c - half:.6f}, "
        f"{a + b:.6f} {c + half:.6f}, {a - b:.6f} {c + half:.6f}, {a - b:.6f} {c - half:.6f}))"
        for a, b, c in zip(lon, dlon, lat, strict=True)
    ]
    burst_id = [f"T{t:03d}-{b:06d}-IW{s}" for t, b, s in zip(track, burst, swath, strict=True)]
    granule = [
        f"OPERA_L2_RTC-S1_{b}_{p:%Y%m%dT%H%M%S}Z_S1A_30_v1.0"
        for b, p in zip(burst_id, prime, strict=True)
    ]
    return pd.DataFrame(
        {
            schema.KEY_COLUMN: [sample_key(i) for i in range(n)],
            schema.SHARD_PATH_COLUMN: [schema.shard_name(int(s)) for s in shard_index],
            schema.SHARD_INDEX_COLUMN: shard_index.astype("int64"),
            schema.INDEX_IN_SHARD_COLUMN: in_shard.astype("int64"),
            "opera_granule_id": granule,
            "burst_id": burst_id,
            "prime_datetime": prime,
            "secondary_datetime": secondary,
            "orbit_direction": np.where(ascending, "ascending", "descending"),
            "track": track.astype("int32"),
            "epsg": epsg.astype("int32"),
            "center_lon": lon,
            "center_lat": lat,
            "footprint_wkt": footprint,
            "quality_score": rng.uniform(0.5301, 0.99, n),
            "co_pol_available": np.ones(n, dtype=bool),
            "cross_pol_available": rng.random(n) >= MISSING_CROSS_POL_FRACTION,
        }
    )


def write_metadata(path: str | Path, table: pd.DataFrame) -> None:
    """Write the metadata table as parquet, strings as Arrow strings, times in UTC."""
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)


# ---------------------------------------------------------------------------- corpus


def write_corpus(
    path: str | Path,
    *,
    n_shards: int = 2,
    samples_per_shard: int | Sequence[int] = 8,
    seed: int = 0,
    compressed: bool | str = False,
    layout: str = "npz",
    extra_members: bool = False,
    shuffle_metadata: bool = False,
) -> CorpusInfo:
    """Write a synthetic NA-SAR corpus in the release layout under ``path``.

    Parameters
    ----------
    path
        Output directory: ``data/nasar-train-NNNNNN.tar``, ``metadata.parquet``
        and ``webdataset_summary.json`` are written there.
    n_shards, samples_per_shard
        Number of tar shards; samples per shard (an int, or one count per shard
        for uneven shards).
    seed
        The same seed writes the same bytes.
    compressed
        ``False`` for ``np.savez`` members, ``True`` for ``np.savez_compressed``,
        ``"mixed"`` to alternate both within a shard.
    layout
        ``"npz"`` (one ``<key>.npz`` per sample, as the release) or ``"npy"``
        (``<key>.<array>.npy`` members, as the compact release).
    extra_members
        Add a non-array ``<key>.json`` member per sample, as WebDataset allows.
    shuffle_metadata
        Write the metadata rows in random order (readers must sort them).
    """
    root = Path(path)
    counts = (
        [int(samples_per_shard)] * n_shards
        if isinstance(samples_per_shard, int)
        else [int(c) for c in samples_per_shard]
    )
    if len(counts) != n_shards:
        raise ValueError(f"samples_per_shard has {len(counts)} counts for {n_shards} shards")
    meta = make_metadata(np.random.default_rng([seed, 1_000_003]), counts)
    shard_paths = []
    start = 0
    for shard, count in enumerate(counts):
        rows = meta.iloc[start : start + count]
        start += count
        rng = np.random.default_rng([seed, shard])
        members = _shard_members(
            rng, rows, compressed=compressed, layout=layout, extra_members=extra_members
        )
        write_tar(root / schema.shard_name(shard), members)
        shard_paths.append(schema.shard_name(shard))
    table = meta.sample(frac=1.0, random_state=seed) if shuffle_metadata else meta
    write_metadata(root / schema.METADATA_FILE, table)
    summary = {
        "num_shards": n_shards,
        "num_samples": int(sum(counts)),
        "shard_pattern": schema.SHARD_GLOB,
        "samples_per_shard": counts,
        "dem_extended": "raw",
        "dem_arrays": ["dem", "slope_deg"],
    }
    (root / schema.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return CorpusInfo(root, tuple(shard_paths), tuple(counts), meta.reset_index(drop=True))


def _shard_members(rng, rows: pd.DataFrame, *, compressed, layout, extra_members):
    keys = rows[schema.KEY_COLUMN].tolist()
    cross = rows["cross_pol_available"].to_numpy()
    ascending = (rows["orbit_direction"] == "ascending").to_numpy()
    for lo in range(0, len(keys), _BATCH):
        hi = min(lo + _BATCH, len(keys))
        batch = make_batch(
            rng, hi - lo, cross_pol_available=cross[lo:hi], ascending=ascending[lo:hi]
        )
        for i in range(hi - lo):
            key = keys[lo + i]
            arrays = {name: batch[name][i] for name in schema.SOURCE_KEYS}
            zipped = compressed is True or (compressed == "mixed" and (lo + i) % 2 == 1)
            yield from sample_members(key, arrays, layout=layout, compressed=zipped)
            if extra_members:
                yield f"{key}.json", json.dumps({"key": key}).encode()
