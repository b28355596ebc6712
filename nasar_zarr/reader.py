"""Fast reads of whole samples, for training loops and random access.

xarray/dask is the analysis path; a training loop wants one sample (or a batch)
in about a millisecond. :class:`CubeReader` reads every variable of the asked
samples at once through tensorstore when it is installed and the store is
local (measured ~2x zarr-python for scans and ~10x for single samples), and
through zarr-python otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import schema, source, store

DEFAULT_VARIABLES = (*schema.VARIABLES, schema.RTC_PRESENT, schema.STATUS)


class CubeReader:
    """Read samples of a cube as ``{variable: numpy array}``.

    Parameters
    ----------
    url
        Local path or fsspec URL of the cube.
    variables
        Variables to read (default: all data variables, ``rtc_present`` and ``status``).
    engine
        ``"tensorstore"``, ``"zarr"``, or ``None`` to pick tensorstore when it is
        installed and the store is local.
    storage_options
        fsspec options for remote stores (zarr engine).

    Examples
    --------
    >>> reader = CubeReader("demo-output/nasar.zarr")          # doctest: +SKIP
    >>> batch = reader[[3, 17, 42]]  # dict of arrays, sample axis first
    """

    def __init__(self, url: str, *, variables: Sequence[str] = DEFAULT_VARIABLES,
                 engine: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        group = store.open_group(url, storage_options)
        self.variables = tuple(variables)
        self.keys = group[schema.SAMPLE_DIM][:]
        if engine is None:
            engine = "tensorstore" if _has_tensorstore() and not source.is_remote(url) else "zarr"
        self.engine = engine
        if engine == "tensorstore":
            import tensorstore as ts

            root = url.split("://", 1)[1] if url.startswith("file://") else url
            context = ts.Context()
            self._arrays = {
                name: ts.open({"driver": "zarr3",
                               "kvstore": {"driver": "file", "path": f"{root}/{name}"}},
                              read=True, context=context).result()
                for name in self.variables
            }
        elif engine == "zarr":
            self._arrays = {name: group[name] for name in self.variables}
        else:
            raise ValueError(f"engine must be 'tensorstore' or 'zarr', got {engine!r}")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int | slice | Sequence[int]) -> dict[str, np.ndarray]:
        """Samples by position: an int drops the sample axis; a slice or list keeps it."""
        if isinstance(index, (int, np.integer)):
            return {name: values[0] for name, values in self[[int(index)]].items()}
        if isinstance(index, slice):
            return self._read(index)
        rows = np.asarray(index, dtype=np.int64)
        if self.engine == "tensorstore":
            return self._read(rows)
        return {name: np.stack([arr[int(i)] for i in rows]) if len(rows) else
                arr[0:0] for name, arr in self._arrays.items()}

    def _read(self, selection) -> dict[str, np.ndarray]:
        if self.engine == "tensorstore":
            futures = {name: arr[selection].read() for name, arr in self._arrays.items()}
            return {name: f.result() for name, f in futures.items()}
        return {name: arr[selection] for name, arr in self._arrays.items()}


def _has_tensorstore() -> bool:
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return False
    return True
