"""The one place that knows the NA-SAR source keys and the cube layout.

Everything else asks this module how a sample's 12 source arrays become the
cube's variables (and back), which dimensions and labels the cube has, and
what attributes each variable carries. See ``docs/CUBE.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

PATCH = 128
SOURCE_DTYPE = np.dtype("float32")

# The dataset card's tensor keys and their per-sample shapes (channels, y, x).
SOURCE_SHAPES: dict[str, tuple[int, int, int]] = {
    "prime_rtc_view_0": (2, PATCH, PATCH),
    "secondary_rtc_view_0": (2, PATCH, PATCH),
    "prime_rtc_view_1": (2, PATCH, PATCH),
    "secondary_rtc_view_1": (2, PATCH, PATCH),
    "inc_angle_view_0": (1, PATCH, PATCH),
    "inc_angle_view_1": (1, PATCH, PATCH),
    "ifg_view_0": (2, PATCH, PATCH),
    "coh_view_0": (1, PATCH, PATCH),
    "ifg_view_1": (2, PATCH, PATCH),
    "coh_view_1": (1, PATCH, PATCH),
    "dem": (1, PATCH, PATCH),
    "slope_deg": (1, PATCH, PATCH),
}
SOURCE_KEYS: tuple[str, ...] = tuple(SOURCE_SHAPES)

# The four sharding columns the release's metadata.parquet always has.
KEY_COLUMN = "sample_key"
SHARD_PATH_COLUMN = "shard_path"
SHARD_INDEX_COLUMN = "shard_index"
INDEX_IN_SHARD_COLUMN = "sample_index_in_shard"
SHARDING_COLUMNS = (KEY_COLUMN, SHARD_PATH_COLUMN, SHARD_INDEX_COLUMN, INDEX_IN_SHARD_COLUMN)
# Flags that tell a truly-zero polarization from a missing (zero-padded) one.
POL_FLAG_COLUMNS = {"co": "co_pol_available", "cross": "cross_pol_available"}

SHARD_GLOB = "data/nasar-train-*.tar"
METADATA_FILE = "metadata.parquet"
SUMMARY_FILE = "webdataset_summary.json"


def shard_name(index: int) -> str:
    """Relative path of tar shard ``index`` in the release layout."""
    return f"data/nasar-train-{index:06d}.tar"


# Dimension labels (coordinate values). ``sample`` is labelled by the sample key.
SAMPLE_DIM = "sample"
LABELS: dict[str, np.ndarray] = {
    "view": np.array([0, 1], dtype="int8"),
    # object dtype: stored as Zarr variable-length strings (fixed-width UTF-32 has no v3 spec)
    "time": np.array(["prime", "secondary"], dtype=object),
    "pol": np.array(["co", "cross"], dtype=object),
    "component": np.array(["cos", "sin"], dtype=object),
    "y": np.arange(PATCH, dtype="int16"),
    "x": np.arange(PATCH, dtype="int16"),
}
DIM_SIZES: dict[str, int] = {dim: len(values) for dim, values in LABELS.items()}
# CF attributes of the label coordinates. No ``axis`` and no ``standard_name``: ``time``
# labels the two acquisitions of a pair ("prime", "secondary"), it is not a time axis
# (the acquisition times are the metadata coordinates that carry ``standard_name:
# time``), and ``y``/``x`` index pixels of a per-sample UTM grid, not one projection.
# The string labels have no ``units`` (CF units describe numbers).
LABEL_ATTRS: dict[str, dict[str, str]] = {
    "view": {"long_name": "spatial (orbit) view", "units": "1"},
    "time": {"long_name": "acquisition of the pair (prime or secondary)"},
    "pol": {"long_name": "polarization (co-pol / cross-pol)"},
    "component": {"long_name": "interferometric phase component (cosine / sine)"},
    "y": {"long_name": "pixel row", "units": "1"},
    "x": {"long_name": "pixel column", "units": "1"},
}


@dataclass(frozen=True)
class Placement:
    """One source key written into one slot of a cube variable.

    ``index`` selects the slot in the per-sample variable (sample dim excluded);
    the source array is reshaped to the slot's shape (dropping a lone channel).
    """

    source_key: str
    index: tuple[int, ...]


@dataclass(frozen=True)
class VariableSpec:
    """A data variable of the cube and where its values come from."""

    name: str
    dims: tuple[str, ...]
    placements: tuple[Placement, ...]
    long_name: str
    units: str
    description: str
    dtype: np.dtype = SOURCE_DTYPE

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample of this variable (without the ``sample`` dim)."""
        return tuple(DIM_SIZES[d] for d in self.dims[1:])

    @property
    def source_keys(self) -> tuple[str, ...]:
        return tuple(p.source_key for p in self.placements)

    @property
    def attrs(self) -> dict[str, str]:
        return {
            "long_name": self.long_name,
            "units": self.units,
            "description": self.description,
            "source_keys": ", ".join(self.source_keys),
        }


def _rtc_placements() -> tuple[Placement, ...]:
    times = [str(t) for t in LABELS["time"]]
    return tuple(
        Placement(f"{time}_rtc_view_{view}", (view, t))
        for view in range(2)
        for t, time in enumerate(times)
    )


def _per_view(prefix: str) -> tuple[Placement, ...]:
    return tuple(Placement(f"{prefix}_view_{view}", (view,)) for view in range(2))


# No CF standard_name on the data variables, on purpose (CF-1.11, standard name table):
# - rtc: the table's surface_backwards_scattering_coefficient_of_radar_wave is used for
#   sigma0 (normalized by ground area); gamma0 after terrain flattening is normalized
#   differently, so that name would mislabel it.
# - inc_angle: sensor_zenith_angle fits an ellipsoid incidence angle only; the card does
#   not say whether the release stores the ellipsoid or the local (terrain) angle.
# - dem: surface_altitude (above the geoid) and height_above_reference_ellipsoid differ
#   by the vertical datum, which the card ("raw elevation in meters") does not state.
# - ifg (cos/sin of phase), coh (coherence), slope_deg (terrain slope): no entry.
DATA_VARIABLES: tuple[VariableSpec, ...] = (
    VariableSpec(
        "rtc",
        (SAMPLE_DIM, "view", "time", "pol", "y", "x"),
        _rtc_placements(),
        "radiometrically terrain corrected backscatter (gamma0)",
        "1",
        "Linear gamma0 backscatter from prime_rtc_view_{0,1} and secondary_rtc_view_{0,1}"
        " (channel 0 co-pol, channel 1 cross-pol). Invalid, non-finite and negative values"
        " were set to 0 by the release; a missing polarization is an all-zero channel.",
    ),
    VariableSpec(
        "inc_angle",
        (SAMPLE_DIM, "view", "y", "x"),
        _per_view("inc_angle"),
        "incidence angle",
        "degree",
        "Incidence angle per spatial view, from inc_angle_view_{0,1}.",
    ),
    VariableSpec(
        "ifg",
        (SAMPLE_DIM, "view", "component", "y", "x"),
        _per_view("ifg"),
        "interferometric phase as cosine and sine",
        "1",
        "InSAR phase stored as cos(phi), sin(phi), from ifg_view_{0,1}.",
    ),
    VariableSpec(
        "coh",
        (SAMPLE_DIM, "view", "y", "x"),
        _per_view("coh"),
        "interferometric coherence",
        "1",
        "Interferometric coherence per spatial view, from coh_view_{0,1}.",
    ),
    VariableSpec(
        "dem",
        (SAMPLE_DIM, "y", "x"),
        (Placement("dem", ()),),
        "surface elevation",
        "m",
        "Raw DEM elevation in metres, from dem; shared by both spatial views.",
    ),
    VariableSpec(
        "slope_deg",
        (SAMPLE_DIM, "y", "x"),
        (Placement("slope_deg", ()),),
        "terrain slope",
        "degree",
        "Raw terrain slope angle in degrees, from slope_deg; shared by both views.",
    ),
)
VARIABLES: dict[str, VariableSpec] = {v.name: v for v in DATA_VARIABLES}

RTC_PRESENT = "rtc_present"
RTC_PRESENT_DIMS = (SAMPLE_DIM, "view", "time", "pol")
RTC_PRESENT_ATTRS = {
    "long_name": "RTC channel holds data",
    "units": "1",
    "description": "Derived at conversion: True where the rtc channel has any non-zero value."
    " False marks a missing (zero-padded) polarization, or an unwritten sample.",
}

STATUS = "status"
STATUS_PENDING, STATUS_WRITTEN, STATUS_REJECTED = 0, 1, 2
STATUS_ATTRS = {
    "long_name": "conversion state of the sample",
    "units": "1",
    "flag_values": [STATUS_PENDING, STATUS_WRITTEN, STATUS_REJECTED],
    "flag_meanings": "pending written rejected",
    "description": "0: not yet written (data reads as NaN); 1: written; 2: rejected as bad input.",
}

PER_SAMPLE_BYTES = sum(int(np.prod(s)) for s in SOURCE_SHAPES.values()) * SOURCE_DTYPE.itemsize


def fill_batch(batch: Mapping[str, np.ndarray], row: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Write one sample's source arrays into row ``row`` of per-variable batch buffers."""
    for spec in DATA_VARIABLES:
        target = batch[spec.name][row]
        for p in spec.placements:
            slot = target[p.index]
            slot[...] = arrays[p.source_key].reshape(slot.shape)


def empty_batch(n: int) -> dict[str, np.ndarray]:
    """Uninitialized per-variable buffers for ``n`` samples (the caller fills every row)."""
    return {
        spec.name: np.empty((n, *spec.sample_shape), dtype=spec.dtype) for spec in DATA_VARIABLES
    }


def cube_to_source(sample_vars: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One sample's cube variables back to the 12 source arrays (the inverse of
    :func:`fill_batch`)."""
    out: dict[str, np.ndarray] = {}
    for spec in DATA_VARIABLES:
        values = np.asarray(sample_vars[spec.name])
        for p in spec.placements:
            out[p.source_key] = values[p.index].reshape(SOURCE_SHAPES[p.source_key])
    return out


def rtc_present(rtc: np.ndarray) -> np.ndarray:
    """Per (sample, view, time, pol): does the channel hold any non-zero value?

    NaN counts as non-zero, so an unwritten row must be masked by ``status``.
    """
    return (rtc != 0).any(axis=(-2, -1))
