"""nasar-zarr: the NA-SAR corpus as an analysis-ready Zarr v3 cube.

Importing the package registers the ``ds.nasar`` accessor.
"""

from ._version import __version__
from .accessor import NasarAccessor, select  # noqa: E402  (registers ds.nasar)
from .api import append, execute, plan_conversion, verify  # noqa: E402
from .cube import metadata_table, open_cube  # noqa: E402
from .errors import NasarZarrError  # noqa: E402
from .normalize import clip_and_rescale, normalized  # noqa: E402
from .plan import ConversionPlan, ConvertOptions  # noqa: E402
from .plan import register_executor as _register_executor  # noqa: E402
from .reader import CubeReader  # noqa: E402
from .stats import histogram, quantiles  # noqa: E402

# plan.py sits below the writing side, so the writer is handed down to plan.execute(...).
_register_executor(execute)

__all__ = [
    "ConversionPlan",
    "ConvertOptions",
    "CubeReader",
    "NasarAccessor",
    "NasarZarrError",
    "__version__",
    "append",
    "clip_and_rescale",
    "execute",
    "histogram",
    "metadata_table",
    "normalized",
    "open_cube",
    "plan_conversion",
    "quantiles",
    "select",
    "verify",
    "write_catalog",
]


def __getattr__(name: str):
    # intake is imported only when the catalog helpers are used.
    if name == "write_catalog":
        from .catalog import write_catalog

        return write_catalog
    raise AttributeError(f"module 'nasar_zarr' has no attribute {name!r}")
