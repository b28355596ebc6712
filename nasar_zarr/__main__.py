"""``python -m nasar_zarr`` is the ``nasar-zarr`` command."""

import sys

from .cli import main

sys.exit(main())
