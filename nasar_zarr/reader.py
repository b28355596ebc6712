"""Fast reads of whole samples, for training loops and random access.

xarray/dask is the analysis path; a training loop wants one sample (or a batch)
in about a millisecond. :class:`CubeReader` reads every variable of the asked
samples at once. The default engine, ``"shards"``, decodes the Zarr shards
directly, local or remote (:func:`nasar_zarr.backend.read_many`: every
variable of a batch at once, only the inner chunks that hold the samples; on
S3/HTTPS the shard indexes once per process, then the chunks in one concurrent
round of coalesced range GETs; no state, threads or open files left behind), so
a reader keeps working in a process forked after it read (a PyTorch
``DataLoader`` with the ``fork`` start method). ``engine="tensorstore"``
(local) and ``engine="zarr"`` stay available.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import backend, schema, store
from .ranges import Location

DEFAULT_VARIABLES = (*schema.VARIABLES, schema.RTC_PRESENT, schema.STATUS)
ENGINES = ("shards", "tensorstore", "zarr")


class CubeReader:
    """Read samples of a cube as ``{variable: numpy array}``.

    Parameters
    ----------
    url
        Local path or fsspec URL of the cube.
    variables
        Variables to read (default: all data variables, ``rtc_present`` and ``status``).
    engine
        ``"shards"`` (the stateless shard decoder of :mod:`nasar_zarr.backend`;
        local and remote stores), ``"tensorstore"`` (local stores; not usable in
        a process forked after it started its threads), ``"zarr"`` (zarr-python),
        or ``None``: ``"shards"`` where it decodes every array, else ``"zarr"``.
    storage_options
        fsspec options for remote stores (e.g. ``{"endpoint_url": ...}`` for S3).

    Attributes
    ----------
    fork_safe : bool
        True when the reader holds nothing that a ``fork`` breaks (the
        ``"shards"`` engine): a forked process may keep using it.

    Examples
    --------
    >>> reader = CubeReader("demo-output/nasar.zarr")          # doctest: +SKIP
    >>> batch = reader[[3, 17, 42]]  # dict of arrays, sample axis first
    """

    def __init__(
        self,
        url: str,
        *,
        variables: Sequence[str] = DEFAULT_VARIABLES,
        engine: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if engine not in (None, *ENGINES):
            raise ValueError(
                f"engine must be one of {', '.join(map(repr, ENGINES))} or None, got {engine!r}"
            )
        group = store.open_group(url, storage_options)
        self.variables = tuple(variables)
        self.keys = store.read(group, schema.SAMPLE_DIM)
        root = url.split("://", 1)[1] if url.startswith("file://") else url
        location = Location.of(url, storage_options)
        layouts: dict[str, backend.ArrayLayout | None] = {}
        if engine in (None, "shards"):
            layouts = {
                name: backend.array_layout(store.array(group, name), location.path(name), location)
                for name in self.variables
            }
        undecodable = [name for name, layout in layouts.items() if layout is None]
        if engine == "shards" and undecodable:
            raise ValueError(
                f"engine='shards' decodes the converter's layouts, but variable(s)"
                f" {undecodable} use a codec it does not decode; use engine=None (picks"
                " zarr-python) or engine='zarr'"
            )
        if engine is None:
            engine = "shards" if layouts and not undecodable else "zarr"
        self.engine = engine
        self.fork_safe = engine == "shards"
        self._layouts: dict[str, backend.ArrayLayout] = {}
        self._arrays: dict[str, Any] = {}
        if engine == "shards":
            self._layouts = {name: layout for name, layout in layouts.items() if layout}
        elif engine == "tensorstore":
            import tensorstore as ts

            context = ts.Context()
            self._arrays = {
                name: ts.open(
                    {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{root}/{name}"}},
                    read=True,
                    context=context,
                ).result()
                for name in self.variables
            }
        else:
            self._arrays = {name: store.array(group, name) for name in self.variables}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Samples by position: an int drops the sample axis; a slice or list keeps it."""
        if isinstance(index, (int, np.integer)):
            return {name: values[0] for name, values in self[[int(index)]].items()}
        if isinstance(index, slice):
            return self._read(index)
        rows = np.asarray(index, dtype=np.int64).reshape(-1)
        if self.engine == "zarr":
            return {
                name: np.stack([arr[int(i)] for i in rows]) if len(rows) else arr[0:0]
                for name, arr in self._arrays.items()
            }
        return self._read(rows)

    def read_runs(self, runs: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Several contiguous runs of samples in one go, concatenated along ``sample``.

        With the ``"shards"`` engine each variable is one
        :func:`~nasar_zarr.backend.read_rows` of the runs' positions (each inner
        chunk decoded once); with tensorstore one read of a virtual concatenation
        of the runs (``tensorstore.concat``), the reads of all variables issued
        before any is awaited; with zarr-python one read per run and variable.
        A batch of a shuffled loader is a few runs of whole inner chunks.

        Parameters
        ----------
        runs
            ``(start, stop)`` half-open ranges of sample positions, in the order
            their rows are wanted.

        Returns
        -------
        dict of numpy.ndarray
            Every variable, sample axis first, ``sum(stop - start)`` rows.

        Examples
        --------
        >>> reader.read_runs([(0, 4), (10, 12)])["rtc"].shape  # doctest: +SKIP
        (6, 2, 2, 2, 128, 128)
        """
        n = len(self)
        bounds = [(int(start), int(stop)) for start, stop in runs]
        for start, stop in bounds:
            if not 0 <= start <= stop <= n:
                raise IndexError(f"run ({start}, {stop}) is outside the cube's {n} samples")
        if len(bounds) == 1:
            return self._read(slice(*bounds[0]))
        if self.engine == "shards":
            rows = np.concatenate([np.arange(a, b) for a, b in bounds] or [np.zeros(0, np.int64)])
            return self._read(rows)
        if self.engine == "tensorstore" and bounds:
            import tensorstore as ts

            futures = {
                name: ts.concat([arr[a:b] for a, b in bounds], axis=0).read()
                for name, arr in self._arrays.items()
            }
            return {name: np.asarray(f.result()) for name, f in futures.items()}
        parts = [self._read(slice(a, b)) for a, b in bounds or [(0, 0)]]
        return {name: np.concatenate([p[name] for p in parts]) for name in self._arrays}

    def _read(self, selection: slice | np.ndarray) -> dict[str, np.ndarray]:
        if self.engine == "shards":  # every variable in one go: two round trips when remote
            names = list(self._layouts)
            values = backend.read_many([(self._layouts[n], selection) for n in names])
            return dict(zip(names, values, strict=True))
        if self.engine == "tensorstore":
            futures = {name: arr[selection].read() for name, arr in self._arrays.items()}
            return {name: np.asarray(f.result()) for name, f in futures.items()}
        return {name: np.asarray(arr[selection]) for name, arr in self._arrays.items()}
