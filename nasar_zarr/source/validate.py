"""A decoded sample against the dataset card (names, shapes, dtypes), and its non-finite counts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .. import schema
from ..errors import (
    SampleSchemaError,
)


def validate_sample(
    arrays: dict[str, np.ndarray], *, shard: str, key: str
) -> dict[str, np.ndarray]:
    """Check names, shapes and dtypes against the dataset card; return native-order arrays."""
    missing = [k for k in schema.SOURCE_KEYS if k not in arrays]
    if missing:
        raise SampleSchemaError(f"missing arrays {missing}", shard=shard, key=key)
    unexpected = sorted(set(arrays) - set(schema.SOURCE_KEYS))
    if unexpected:
        raise SampleSchemaError(
            f"unexpected arrays {unexpected}; the card defines {len(schema.SOURCE_KEYS)} keys",
            shard=shard,
            key=key,
        )
    out: dict[str, np.ndarray] = {}
    for name in schema.SOURCE_KEYS:
        array = arrays[name]
        expected_shape = schema.SOURCE_SHAPES[name]
        if array.shape != expected_shape:
            raise SampleSchemaError(
                f"array {name!r} has shape {array.shape}, expected {expected_shape}",
                shard=shard,
                key=key,
            )
        if array.dtype.newbyteorder("=") != schema.SOURCE_DTYPE.newbyteorder("="):
            raise SampleSchemaError(
                f"array {name!r} has dtype {array.dtype}, expected {schema.SOURCE_DTYPE}",
                shard=shard,
                key=key,
            )
        if not array.dtype.isnative:
            array = array.astype(schema.SOURCE_DTYPE)  # same values, native byte order
        out[name] = array
    return out


def nonfinite_counts(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Number of NaN/inf values per source array (only those that have any)."""
    counts = {}
    for name, array in arrays.items():
        bad = array.size - int(np.isfinite(array).sum())
        if bad:
            counts[name] = bad
    return counts
