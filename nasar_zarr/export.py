"""``nasar-zarr export``: a selection of the cube as a CF netCDF-4 file or a new Zarr store.

The selection is made on the metadata coordinates (the filters of
:func:`nasar_zarr.accessor.select`), then read and written in pieces of one
Zarr shard of samples: the cube is opened without dask
(``open_cube(chunks=None)``), the selection is applied lazily (only the
selected samples' inner chunks are ever read) and re-chunked into pieces, and
dask streams piece by piece into the output. Memory stays a few pieces,
whatever the size of the selection. Raw variables are written with their
dtypes and values unchanged (lossless); ``normalized=True`` writes
:func:`nasar_zarr.normalize.normalized` instead.

netCDF-4 is written through h5netcdf (the ``export`` extra, also in ``test``),
which needs no C netCDF library and writes the cube's string coordinates as
variable-length strings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from . import schema
from .errors import NasarZarrError

FORMATS = ("netcdf", "zarr")
_SUFFIXES = {
    ".nc": "netcdf",
    ".nc4": "netcdf",
    ".netcdf": "netcdf",
    ".h5": "netcdf",
    ".zarr": "zarr",
}


class ExportError(NasarZarrError, ValueError):
    """An export that cannot be done as asked (format, empty selection, existing output)."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote.

    Parameters
    ----------
    path
        The output file or store.
    format
        ``"netcdf"`` or ``"zarr"``.
    n_samples
        Samples written.
    pieces
        Pieces of at most ``piece`` samples the selection was streamed in.
    piece
        Samples per piece.
    """

    path: str
    format: str
    n_samples: int
    pieces: int
    piece: int


def export_format(out: str, format: str | None = None) -> str:
    """The output format: ``format`` if given, else from ``out``'s suffix.

    Parameters
    ----------
    out
        Output path (``.nc``/``.nc4``/``.netcdf``/``.h5``: netCDF; ``.zarr``: Zarr).
    format
        ``"netcdf"``, ``"zarr"`` or None.

    Returns
    -------
    str
        ``"netcdf"`` or ``"zarr"``.

    Examples
    --------
    >>> export_format("subset.nc"), export_format("subset.zarr"), export_format("x", "zarr")
    ('netcdf', 'zarr', 'zarr')
    """
    if format is not None:
        if format not in FORMATS:
            raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
        return format
    suffix = Path(str(out).rstrip("/")).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ExportError(
            f"cannot tell the format from {out!r}: name it *.nc or *.zarr, or"
            " pass --format netcdf|zarr"
        )
    return _SUFFIXES[suffix]


def export(
    dest: str,
    out: str | os.PathLike[str],
    *,
    format: str | None = None,
    min_quality: float | None = None,
    require_cross_pol: bool = False,
    bbox: Sequence[float] | None = None,
    time: Sequence[Any] | None = None,
    normalized: bool = False,
    piece: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write the samples of a cube that pass the filters to a netCDF-4 file or a Zarr store.

    Parameters
    ----------
    dest
        The cube (local path or fsspec URL).
    out
        Output path: a netCDF-4 file or a new Zarr store (local).
    format
        ``"netcdf"`` or ``"zarr"``; None: from ``out``'s suffix (:func:`export_format`).
    min_quality, require_cross_pol, bbox, time
        The filters of :func:`nasar_zarr.accessor.select` (written samples only).
    normalized
        Write :func:`nasar_zarr.normalize.normalized` of the selection instead of
        the raw variables.
    piece
        Samples per piece (default: the cube's Zarr shard); memory holds a few pieces.
    overwrite
        Replace an existing ``out``.
    progress
        Show a tqdm progress bar (one step per piece written).
    storage_options
        fsspec options for ``dest``.

    Returns
    -------
    ExportResult
        Path, format, samples and pieces written.

    Examples
    --------
    >>> export("nasar.zarr", "west.nc", bbox=(-125, 30, -110, 50))  # doctest: +SKIP
    ExportResult(path='west.nc', format='netcdf', n_samples=812, pieces=2, piece=512)
    """
    from .accessor import select
    from .cube import open_cube, shard_size

    fmt = export_format(str(out), format)
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    # No dask yet: the selection stays a lazy index into the store, so only the selected
    # samples are ever read, piece by piece.
    ds = open_cube(dest, storage_options=storage_options, chunks=None)
    sub = select(
        ds, min_quality=min_quality, require_cross_pol=require_cross_pol, bbox=bbox, time=time
    )
    n = sub.sizes[schema.SAMPLE_DIM]
    if n == 0:
        raise ExportError(f"no written sample of {dest} passes the filters; nothing to export")
    size = int(piece or shard_size(ds) or n)
    if size < 1:
        raise ExportError(f"piece must be a positive number of samples, got {piece!r}")
    sub = sub.chunk({schema.SAMPLE_DIM: size})
    if normalized:
        from .normalize import normalized as normalize_all

        sub = normalize_all(sub)
    sub.attrs["history"] = (
        str(sub.attrs.get("history", "")) + "\n" + f"nasar-zarr export of {n} samples from {dest}"
    ).strip()
    pieces = -(-n // size)
    if out_path.exists():
        import shutil

        shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
    if fmt == "netcdf":
        delayed = sub.to_netcdf(out_path, engine="h5netcdf", compute=False)
    else:
        encoding = {name: {"chunks": (size, *var.shape[1:])} for name, var in sub.data_vars.items()}
        delayed = sub.to_zarr(
            out_path, zarr_format=3, consolidated=True, compute=False, encoding=encoding
        )
    _compute(delayed, pieces * len(sub.data_vars), progress, f"export {n} samples")
    return ExportResult(path=str(out), format=fmt, n_samples=n, pieces=pieces, piece=size)


def _compute(delayed: Any, total: int, progress: bool, desc: str) -> None:
    """Compute with a tqdm bar advancing once per written piece of a variable."""
    import dask
    from dask.callbacks import Callback

    if not progress:
        dask.compute(delayed, scheduler="threads")
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="piece")

    class _Bar(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):  # noqa: ANN001
            name = key[0] if isinstance(key, tuple) else key
            if str(name).startswith(("store-", "store_")) and bar.n < total:
                bar.update(1)

    try:
        with _Bar():
            dask.compute(delayed, scheduler="threads")
    finally:
        bar.n = total
        bar.close()


def open_export(path: str | os.PathLike[str]) -> xr.Dataset:
    """Open what :func:`export` wrote (netCDF-4 or Zarr), lazily.

    Parameters
    ----------
    path
        The exported file or store.

    Returns
    -------
    xarray.Dataset

    Examples
    --------
    >>> open_export("west.nc").sizes["sample"]  # doctest: +SKIP
    812
    """
    if export_format(str(path)) == "netcdf":
        return xr.open_dataset(path, engine="h5netcdf")
    return xr.open_zarr(path)
