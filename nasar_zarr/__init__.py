"""nasar-zarr: the NA-SAR corpus as an analysis-ready Zarr v3 cube.

Importing the package registers the ``ds.nasar`` accessor.
"""

__version__ = "0.1.0"

from .cube import metadata_table, open_cube  # noqa: E402
from .errors import NasarZarrError  # noqa: E402
from .plan import ConversionPlan, ConvertOptions, plan_conversion  # noqa: E402

__all__ = [
    "ConversionPlan",
    "ConvertOptions",
    "NasarZarrError",
    "__version__",
    "metadata_table",
    "open_cube",
    "plan_conversion",
]
