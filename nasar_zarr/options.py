"""The storage options every fsspec client of nasar-zarr gets: checked for the URL's
filesystem, with the defaults nasar-zarr adds (a bounded S3 connect timeout).

A module of its own, below both :mod:`nasar_zarr.store` (the writing side) and
:mod:`nasar_zarr.ranges` (the byte seam, which the source reader uses too).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .errors import StorageOptionsError

# botocore's settings for every s3:// URL unless the storage options say otherwise: a
# dead or wrong endpoint fails in about a second, not after botocore's 60 s connect
# timeout and its retries (measured: 10-14 s against a closed loopback port).
S3_CONFIG = {"connect_timeout": 3, "retries": {"max_attempts": 2, "mode": "standard"}}
# Options s3fs takes besides its own parameters (fsspec's, and botocore session's).
_S3_EXTRA_OPTIONS = {
    "skip_instance_cache",
    "use_listings_cache",
    "listings_expiry_time",
    "max_paths",
    "batch_size",
    "profile",
    "session_vars",
    "event_hooks",
    "include_builtin_handlers",
}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def storage_options(url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``options`` checked for ``url``'s filesystem, with the defaults nasar-zarr adds.

    For ``s3://`` URLs: an option s3fs does not take is refused here, in one line
    naming it (s3fs would fail later with a ``TypeError`` from deep in aiobotocore),
    and :data:`S3_CONFIG` (a bounded connect timeout and retries) fills in what the
    options' ``config_kwargs`` do not set. Other URLs get ``options`` unchanged.

    Raises
    ------
    StorageOptionsError
        An unknown option for ``s3://``.
    """
    options = dict(options or {})
    if _protocol(url) not in ("s3", "s3a"):
        return options
    import inspect

    try:
        import s3fs
    except ImportError:
        return options  # the caller's fsspec call says what to install
    known = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(options) - known - _S3_EXTRA_OPTIONS)
    if unknown:
        raise StorageOptionsError(
            f"{url}: unknown storage option {', '.join(map(repr, unknown))} for s3:// URLs"
            f" (s3fs takes {', '.join(sorted(known | {'profile'}))})"
        )
    # A deep copy each time: botocore rewrites the retries dict it is given.
    config = {**copy.deepcopy(S3_CONFIG), **copy.deepcopy(options.get("config_kwargs") or {})}
    return {**options, "config_kwargs": config}
