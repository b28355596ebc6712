"""``ds.nasar``: a thin accessor delegating to the package's pure functions.

Registered when :mod:`nasar_zarr` is imported. Every method returns lazy
results on a dask-backed cube (:func:`nasar_zarr.open_cube`); see
:mod:`nasar_zarr.normalize`, :mod:`nasar_zarr.signatures`, :mod:`nasar_zarr.stats`.

:func:`select` lives here, beside the accessor, because it is the only
metadata-coordinate filter of the package; it is a plain function all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from . import normalize, schema, signatures, stats
from .columns import role_coordinate
from .cube import metadata_table


def _coord_values(ds: xr.Dataset, name: str, needed_for: str) -> np.ndarray:
    if name not in ds.coords and name not in ds:
        raise KeyError(
            f"{needed_for} needs the {name!r} metadata coordinate, which this dataset lacks;"
            f" it has {sorted(str(c) for c in ds.coords)}"
        )
    # .values of a 1-D coordinate reads only that coordinate's (single) object.
    return np.asarray(ds[name].values)


def _role_values(ds: xr.Dataset, role: str, default: str, needed_for: str) -> np.ndarray:
    """The coordinate playing ``role`` (recorded at conversion, or recognised by name)."""
    return _coord_values(ds, role_coordinate(ds, role, default) or default, needed_for)


def _utc_naive(value: Any) -> np.datetime64:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp.to_datetime64()


def select(
    ds: xr.Dataset,
    *,
    min_quality: float | None = None,
    require_cross_pol: bool = False,
    bbox: Sequence[float] | None = None,
    time: Sequence[Any] | None = None,
    written_only: bool = True,
) -> xr.Dataset:
    """The samples whose metadata pass the filters, reading no array data.

    Only 1-D coordinates along ``sample`` are read (and ``status`` with
    ``written_only``); data variables stay lazy and are subset with ``isel``.

    Parameters
    ----------
    ds
        A cube.
    min_quality
        Keep ``quality_score >= min_quality`` (the release already keeps > 0.53).
    require_cross_pol
        Keep only samples with ``cross_pol_available``.
    bbox
        ``(lon_min, lat_min, lon_max, lat_max)`` in degrees, inclusive, on the
        patch centre (the longitude/latitude columns recorded at conversion, e.g.
        ``center_lon``, ``center_lat``). ``lon_min > lon_max``
        selects across the antimeridian (e.g. the Aleutians).
    time
        ``(start, end)``, inclusive, on the prime acquisition time (e.g.
        ``prime_datetime``; UTC); either may be
        None for an open end. Strings, datetimes and pandas Timestamps are
        accepted; time-zone-aware values are converted to UTC.
    written_only
        Keep only samples with ``status == 1`` (written). On by default: pending
        samples read as NaN and rejected ones hold no data, so a subset for
        analysis or training should not include them. This reads the small
        ``status`` variable (one byte per sample, through dask).

    Returns
    -------
    xarray.Dataset
        ``ds.isel(sample=...)`` in release order.
    """
    n = ds.sizes[schema.SAMPLE_DIM]
    keep = np.ones(n, dtype=bool)
    if min_quality is not None:
        keep &= _role_values(ds, "quality", "quality_score", "min_quality") >= float(min_quality)
    if require_cross_pol:
        column = schema.POL_FLAG_COLUMNS["cross"]
        keep &= _role_values(ds, "cross_pol", column, "require_cross_pol").astype(bool)
    if bbox is not None:
        try:
            lon_min, lat_min, lon_max, lat_max = (float(b) for b in bbox)
        except (TypeError, ValueError):
            raise ValueError(
                f"bbox must be (lon_min, lat_min, lon_max, lat_max), got {bbox!r}"
            ) from None
        if lat_min > lat_max:
            raise ValueError(f"bbox has lat_min {lat_min} > lat_max {lat_max}: {bbox!r}")
        lon = _role_values(ds, "lon", "center_lon", "bbox")
        lat = _role_values(ds, "lat", "center_lat", "bbox")
        in_lon = (
            (lon >= lon_min) & (lon <= lon_max)
            if lon_min <= lon_max
            else (lon >= lon_min) | (lon <= lon_max)
        )
        keep &= in_lon & (lat >= lat_min) & (lat <= lat_max)
    if time is not None:
        try:
            start, end = time
        except (TypeError, ValueError):
            raise ValueError(f"time must be (start, end), got {time!r}") from None
        prime = _role_values(ds, "time", "prime_datetime", "time").astype("datetime64[ns]")
        if start is not None:
            keep &= prime >= _utc_naive(start)
        if end is not None:
            keep &= prime <= _utc_naive(end)
    if written_only and schema.STATUS in ds:
        keep &= np.asarray(ds[schema.STATUS].values) == schema.STATUS_WRITTEN
    return ds.isel({schema.SAMPLE_DIM: np.flatnonzero(keep)})


@xr.register_dataset_accessor("nasar")
class NasarAccessor:
    """NA-SAR helpers on a cube: ``ds.nasar.normalized()``, ``ds.nasar.select(...)``, ...

    Each method delegates to a pure function; see its documentation there.
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    # ---------------------------------------------------------------- normalization
    def normalized(
        self,
        *,
        rtc_gain: float = normalize.RTC_GAIN,
        rtc_ranges: Mapping[str, Sequence[float]] = normalize.RTC_RANGES,
        dem_range: Sequence[float] = normalize.DEM_RANGE,
        relief_percentiles: Sequence[float] = normalize.RELIEF_PERCENTILES,
        slope_range: Sequence[float] = normalize.SLOPE_RANGE,
    ) -> xr.Dataset:
        """The cube as the release's InSAR loader returns it, lazily (float32).

        Delegates to :func:`nasar_zarr.normalize.normalized`: ``rtc`` as
        ``clip_and_rescale(log1p(gain * x), p1, p99)`` per polarization (missing
        ones stay 0), ``dem`` and ``slope`` rescaled to fixed ranges,
        ``dem_relief`` to each patch's own percentiles; ``inc_angle``, ``ifg`` and
        ``coh`` pass through.

        Parameters
        ----------
        rtc_gain
            Factor inside ``log1p`` (20.0 in the release).
        rtc_ranges
            ``{pol: (p1, p99)}`` in log1p units (co ``(0.15, 2.39)``, cross ``(0.01, 1.09)``).
        dem_range
            ``(low, high)`` metres mapped to 0 and 1 (``(-100, 4000)``).
        relief_percentiles
            Patch-local ``(low, high)`` percentiles of ``dem_relief`` (``(5, 95)``).
        slope_range
            ``(low, high)`` degrees mapped to 0 and 1 (``(0, 45)``).

        Returns
        -------
        xarray.Dataset
            Same coordinates and chunks as the cube; nothing is read until computed.

        Examples
        --------
        >>> norm = ds.nasar.normalized()                       # doctest: +SKIP
        >>> norm.rtc.isel(sample=0).compute()                  # doctest: +SKIP
        """
        return normalize.normalized(
            self._ds,
            rtc_gain=rtc_gain,
            rtc_ranges=rtc_ranges,
            dem_range=dem_range,
            relief_percentiles=relief_percentiles,
            slope_range=slope_range,
        )

    def rtc_normalized(self, **options: Any) -> xr.DataArray:
        """Normalized RTC backscatter (:func:`nasar_zarr.normalize.rtc_normalized`).

        Parameters
        ----------
        **options
            ``rtc_gain``, ``rtc_ranges`` as :meth:`normalized`.

        Returns
        -------
        xarray.DataArray
            float32 in [0, 1], lazy.

        Examples
        --------
        >>> ds.nasar.rtc_normalized()  # doctest: +SKIP
        """
        present = self._ds.get(schema.RTC_PRESENT)
        return normalize.rtc_normalized(self._ds["rtc"], present, **options)

    def dem_normalized(self, **options: Any) -> xr.DataArray:
        """Globally rescaled elevation (:func:`nasar_zarr.normalize.dem_normalized`).

        Parameters
        ----------
        **options
            ``dem_range`` as :meth:`normalized`.

        Returns
        -------
        xarray.DataArray
            float32 in [0, 1], lazy.

        Examples
        --------
        >>> ds.nasar.dem_normalized()  # doctest: +SKIP
        """
        return normalize.dem_normalized(self._ds["dem"], **options)

    def dem_relief(self, **options: Any) -> xr.DataArray:
        """Patch-local relief (:func:`nasar_zarr.normalize.dem_relief`).

        Parameters
        ----------
        **options
            ``relief_percentiles`` as :meth:`normalized`.

        Returns
        -------
        xarray.DataArray
            float32 in [0, 1], lazy.

        Examples
        --------
        >>> ds.nasar.dem_relief()  # doctest: +SKIP
        """
        return normalize.dem_relief(self._ds["dem"], **options)

    def slope_normalized(self, **options: Any) -> xr.DataArray:
        """Rescaled slope (:func:`nasar_zarr.normalize.slope_normalized`).

        Parameters
        ----------
        **options
            ``slope_range`` as :meth:`normalized`.

        Returns
        -------
        xarray.DataArray
            float32 in [0, 1], lazy.

        Examples
        --------
        >>> ds.nasar.slope_normalized()  # doctest: +SKIP
        """
        return normalize.slope_normalized(self._ds["slope_deg"], **options)

    # ---------------------------------------------------------------- signatures
    def backscatter_db(self) -> xr.DataArray:
        """RTC backscatter in dB (:func:`nasar_zarr.signatures.backscatter_db`).

        Returns
        -------
        xarray.DataArray
            ``10 log10 rtc``, lazy.

        Examples
        --------
        >>> ds.nasar.backscatter_db()  # doctest: +SKIP
        """
        return signatures.backscatter_db(self._ds["rtc"])

    def cross_co_ratio_db(self) -> xr.DataArray:
        """Cross/co-pol ratio in dB (:func:`nasar_zarr.signatures.cross_co_ratio_db`).

        Returns
        -------
        xarray.DataArray
            Lazy, without the ``pol`` dimension.

        Examples
        --------
        >>> ds.nasar.cross_co_ratio_db()  # doctest: +SKIP
        """
        return signatures.cross_co_ratio_db(self._ds["rtc"])

    def temporal_change_db(self) -> xr.DataArray:
        """Secondary minus prime backscatter, dB (:func:`~.signatures.temporal_change_db`).

        Returns
        -------
        xarray.DataArray
            Lazy, without the ``time`` dimension.

        Examples
        --------
        >>> ds.nasar.temporal_change_db()  # doctest: +SKIP
        """
        return signatures.temporal_change_db(self._ds["rtc"])

    def wrapped_phase(self) -> xr.DataArray:
        """Interferometric phase from (cos, sin) (:func:`nasar_zarr.signatures.wrapped_phase`).

        Returns
        -------
        xarray.DataArray
            Radians in (-pi, pi], lazy.

        Examples
        --------
        >>> ds.nasar.wrapped_phase()  # doctest: +SKIP
        """
        return signatures.wrapped_phase(self._ds["ifg"])

    def coherence(self) -> xr.DataArray:
        """Interferometric coherence (:func:`nasar_zarr.signatures.coherence`).

        Returns
        -------
        xarray.DataArray
            Lazy.

        Examples
        --------
        >>> ds.nasar.coherence()  # doctest: +SKIP
        """
        return signatures.coherence(self._ds["coh"])

    def signatures(self) -> xr.Dataset:
        """All signatures in one dataset (:func:`nasar_zarr.signatures.signatures`).

        Returns
        -------
        xarray.Dataset
            Lazy.

        Examples
        --------
        >>> ds.nasar.signatures()  # doctest: +SKIP
        """
        return signatures.signatures(self._ds)

    # ---------------------------------------------------------------- metadata
    def select(
        self,
        *,
        min_quality: float | None = None,
        require_cross_pol: bool = False,
        bbox: Sequence[float] | None = None,
        time: Sequence[Any] | None = None,
        written_only: bool = True,
    ) -> xr.Dataset:
        """The samples whose metadata pass the filters, reading no array data.

        Delegates to :func:`nasar_zarr.accessor.select`.

        Parameters
        ----------
        min_quality
            Keep ``quality_score >= min_quality``.
        require_cross_pol
            Keep only samples with ``cross_pol_available``.
        bbox
            ``(lon_min, lat_min, lon_max, lat_max)`` on the patch centre, inclusive.
        time
            ``(start, end)`` on ``prime_datetime`` (UTC), inclusive; None for an open end.
        written_only
            Keep only written samples (``status == 1``).

        Returns
        -------
        xarray.Dataset
            ``ds.isel(sample=...)``, still lazy.

        Examples
        --------
        >>> good = ds.nasar.select(min_quality=0.7, require_cross_pol=True)  # doctest: +SKIP
        """
        return select(
            self._ds,
            min_quality=min_quality,
            require_cross_pol=require_cross_pol,
            bbox=bbox,
            time=time,
            written_only=written_only,
        )

    def metadata(self) -> pd.DataFrame:
        """The original ``metadata.parquet`` table, rebuilt from the coordinates.

        Returns
        -------
        pandas.DataFrame
            One row per sample, in the dataset's order, with the parquet's dtypes.

        Examples
        --------
        >>> ds.nasar.metadata().to_parquet("subset-metadata.parquet")  # doctest: +SKIP
        """
        return metadata_table(self._ds)

    # ---------------------------------------------------------------- statistics
    def histogram(
        self,
        var: str = "rtc",
        *,
        bins: int = stats.HISTOGRAM_BINS,
        range: Sequence[float] | None = None,
        transform: str | Callable | None = "auto",
        **options: Any,
    ) -> xr.DataArray:
        """Counts of a variable's values over the cube, lazily, in one pass.

        Delegates to :func:`nasar_zarr.stats.histogram` (one task per dask chunk).

        Parameters
        ----------
        var
            The variable to bin (``"rtc"``).
        bins
            Number of equal-width bins.
        range
            ``(low, high)`` in transformed units; defaults exist for the cube's variables.
        transform
            ``"auto"`` (``log1p20`` for rtc), ``"log1p20"``, ``"db"``, None or a callable.
        **options
            ``by`` (dimension to keep, ``"pol"``) and ``clip``.

        Returns
        -------
        xarray.DataArray
            int64 counts, dims ``(by, "bin")``.

        Examples
        --------
        >>> ds.nasar.histogram(bins=200).compute()  # doctest: +SKIP
        """
        return stats.histogram(
            self._ds, var, bins=bins, range=range, transform=transform, **options
        )

    def quantiles(
        self,
        q: Sequence[float] = (0.01, 0.99),
        *,
        var: str = "rtc",
        **options: Any,
    ) -> xr.DataArray:
        """Corpus quantiles in one pass, from a fine histogram.

        Delegates to :func:`nasar_zarr.stats.quantiles`.

        Parameters
        ----------
        q
            Quantiles in [0, 1].
        var
            The variable (``"rtc"``).
        **options
            ``bins``, ``range``, ``transform``, ``by`` as :meth:`histogram`.

        Returns
        -------
        xarray.DataArray
            float64, dims ``(by, "quantile")``; ``accuracy`` attribute = bin width.

        Examples
        --------
        >>> ds.nasar.quantiles((0.01, 0.99)).compute()  # doctest: +SKIP
        """
        return stats.quantiles(self._ds, q, var=var, **options)


__all__ = ["NasarAccessor", "select"]
