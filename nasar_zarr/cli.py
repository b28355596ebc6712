"""The ``nasar-zarr`` command: thin, it parses, calls the library, maps errors to exit codes.

Exit codes: 0 success, 1 verification found mismatches, 2 any error (bad input,
refused store, missing path or credentials, a bad option), printed as one line
without a traceback (``--debug`` prints it before that line, with the same exit
code), 130 interrupted (Ctrl-C; the store lock is released and a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from contextlib import contextmanager
from typing import NoReturn

from .errors import NasarZarrError
from .plan import CODECS, ON_ERROR

# fsspec protocols and the package (extra) each needs.
_PROTOCOL_PACKAGES = {
    "s3": ("s3fs", "pip install 'nasar-zarr[s3]'"),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "hf": ("huggingface_hub", "pip install huggingface_hub"),
    "http": ("aiohttp", "pip install aiohttp"),
    "https": ("aiohttp", "pip install aiohttp"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (exit 2), like every other failure."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        type=_json_object,
        default=None,
        help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://..."}\'',
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nasar-zarr",
        description="Convert the NA-SAR WebDataset corpus into a Zarr v3 cube, and inspect it.",
        epilog="Add --debug to any command to see the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic NA-SAR corpus in the release layout")
    p.add_argument("out")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compressed", action="store_true", help="np.savez_compressed members")

    p = sub.add_parser("convert", help="convert a corpus (path or URL) into a Zarr v3 cube")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--inner-chunk", type=int, default=None, help="samples per inner chunk")
    p.add_argument("--shard", type=int, default=None, help="samples per Zarr shard (one task)")
    p.add_argument(
        "--codec", default=None, choices=CODECS, help="blosc-lz4 (default), blosc-zstd, zstd, none"
    )
    p.add_argument("--clevel", type=int, default=None)
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local worker processes (default: one per core; 0: in-process)",
    )
    group.add_argument("--scheduler", default=None, help="address of a running dask scheduler")
    p.add_argument("--on-error", choices=ON_ERROR, default="raise")
    p.add_argument(
        "--max-member-mb",
        type=float,
        default=None,
        help="size cap of one tar/npz member (default 64), against decompression bombs",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a store made with other options"
    )
    for role in ("lat", "lon", "footprint", "time", "secondary-time"):
        p.add_argument(
            f"--{role}-column",
            metavar="NAME",
            default=None,
            help=f"metadata column holding the {role.replace('-', ' ')}"
            " (default: recognised by its usual spellings)",
        )
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--plan-json", metavar="FILE", help="also write the plan as JSON")
    _add_storage(p)

    p = sub.add_parser("append", help="add the samples of new tar shards at the end of a cube")
    p.add_argument("src", help="the grown release: the cube's samples first, then new shards")
    p.add_argument("dest")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, default=None)
    group.add_argument("--scheduler", default=None)
    p.add_argument("--on-error", choices=ON_ERROR, default="raise")
    _add_storage(p)

    p = sub.add_parser("verify", help="check a cube against its source, or its checksums")
    p.add_argument(
        "src_or_dest",
        help="SRC DEST to compare with the source; DEST alone to check the recorded checksums",
    )
    p.add_argument("dest", nargs="?")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, default=None)
    group.add_argument("--scheduler", default=None)
    _add_storage(p)

    p = sub.add_parser("info", help="describe a cube: layout, sizes, status, provenance")
    p.add_argument("dest")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage(p)

    p = sub.add_parser("catalog", help="write an intake catalog for a cube (chunks = its shard)")
    p.add_argument("dest", help="the cube: local path or fsspec URL")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="catalog YAML to write")
    p.add_argument(
        "--metadata-url",
        default=None,
        help="metadata.parquet for the nasar_metadata entry (default: the cube)",
    )
    _add_storage(p)

    p = sub.add_parser("stac", help="write a STAC collection.json and items.parquet for a cube")
    p.add_argument("dest", help="the cube: local path or fsspec URL")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help="directory for collection.json and items.parquet",
    )
    p.add_argument(
        "--href", default=None, help="store URL the Zarr asset points to (default: DEST)"
    )
    _add_storage(p)

    p = sub.add_parser("export", help="write a selection of a cube to netCDF-4 or a new Zarr store")
    p.add_argument("dest", help="the cube: local path or fsspec URL")
    p.add_argument("out", help="output: *.nc (netCDF-4) or *.zarr, or see --format")
    p.add_argument(
        "--format",
        choices=("netcdf", "zarr"),
        default=None,
        help="output format (default: from OUT's suffix)",
    )
    p.add_argument(
        "--min-quality", type=float, default=None, metavar="Q", help="keep quality_score >= Q"
    )
    p.add_argument(
        "--require-cross-pol", action="store_true", help="keep samples with a cross-pol channel"
    )
    p.add_argument(
        "--bbox",
        type=float,
        nargs=4,
        default=None,
        metavar=("W", "S", "E", "N"),
        help="patch centre inside lon W..E, lat S..N (degrees, inclusive)",
    )
    p.add_argument(
        "--time",
        nargs=2,
        default=None,
        metavar=("START", "END"),
        help="prime acquisition time in [START, END] (UTC; '' for an open end)",
    )
    p.add_argument(
        "--normalized",
        action="store_true",
        help="write the release loader's normalized variables instead of raw ones",
    )
    p.add_argument(
        "--piece",
        type=int,
        default=None,
        metavar="N",
        help="samples per piece written (default: the cube's shard)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_storage(p)

    p = sub.add_parser("view", help="browse a cube in a web browser (static page, local server)")
    p.add_argument("dest", nargs="?", help="the cube: local path (not needed with --export)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    p.add_argument("--sample", default=None, help="sample key to open first")
    p.add_argument(
        "--export",
        metavar="DIR",
        default=None,
        help="copy the page's static files into DIR (to publish next to a cube)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            f"nasar-zarr {args.command}: interrupted; the store's lock is released, run the"
            " same command again to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        if debug:  # the traceback too, with the same one line and exit code after it
            traceback.print_exc(file=sys.stderr)
        print(f"nasar-zarr {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """What went wrong, on one line, with a hint where one helps."""
    if isinstance(exc, NasarZarrError):
        text = str(exc)
    elif isinstance(exc, ImportError):
        text = _missing_package(exc)
    elif isinstance(exc, PermissionError):
        text = (
            f"permission denied: {exc.filename} ({exc.strerror})"
            if exc.filename
            else f"permission denied: {exc}"
        )
    elif isinstance(exc, FileNotFoundError):
        where = exc.filename or str(exc)
        text = f"no such file or directory: {where}"
    elif type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        text = (
            f"{exc}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile), or"
            " pass --storage-options '{\"anon\": true}' for a public bucket"
        )
    elif isinstance(exc, ValueError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc} (run again with --debug for the traceback)"
    return " ".join(text.split())


def _missing_package(exc: ImportError) -> str:
    message = str(exc)
    for protocol, (package, install) in _PROTOCOL_PACKAGES.items():
        if package in message or exc.name == package:
            return f"{protocol}:// URLs need {package}, which is not installed: {install}"
    return f"{message} (a package nasar-zarr needs here is missing)"


def _synth(args) -> int:
    from .testing import write_corpus

    info = write_corpus(
        args.out,
        n_shards=args.shards,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        compressed=args.compressed,
    )
    print(f"wrote {info.n_samples} samples in {len(info.shard_paths)} shards to {info.root}")
    return 0


def _convert(args) -> int:
    from .api import plan_conversion
    from .layout import check_destination

    options = {
        k: v
        for k, v in {
            "inner_chunk": args.inner_chunk,
            "shard": args.shard,
            "codec": args.codec,
            "clevel": args.clevel,
            "max_member_bytes": None
            if args.max_member_mb is None
            else int(args.max_member_mb * 2**20),
        }.items()
        if v is not None
    }
    columns = {
        role: getattr(args, f"{role}_column")
        for role in ("lat", "lon", "footprint", "time", "secondary_time")
    }
    plan = plan_conversion(
        args.src,
        args.dest,
        on_error=args.on_error,
        storage_options=args.storage_options,
        **options,
        columns={k: v for k, v in columns.items() if v},
    )
    check_destination(plan, overwrite=args.overwrite)  # refuse before printing the plan
    if args.plan_json:
        with open(args.plan_json, "w") as f:
            f.write(plan.to_json())
    print(plan)
    if args.dry_run:
        return 0
    with _client(args) as client:
        ds = plan.execute(
            client=client, workers=args.workers, progress=True, overwrite=args.overwrite
        )
    _summary(ds, args.dest, args.storage_options)
    return 0


@contextmanager
def _client(args):
    if not args.scheduler:
        yield None
        return
    from distributed import Client

    with Client(args.scheduler) as client:
        yield client


def _summary(ds, dest: str, storage_options) -> None:
    from . import store
    from .info import status_counts
    from .store import REJECTIONS_FILE

    counts = status_counts(ds)
    print(
        f"done: {counts['written']:,} written, {counts['rejected']:,} rejected,"
        f" {counts['pending']:,} pending -> {dest}"
    )
    report = store.read_json(dest, REJECTIONS_FILE, storage_options, default={})
    for item in report.get("rejected", [])[:20]:
        print(f"  rejected {item['shard']}: {item['key']!r}: {item['reason']}")
    n_rejected = report.get("counts", {}).get("rejected", len(report.get("rejected", [])))
    if n_rejected > 20:
        print(f"  ... and {n_rejected - 20:,} more rejected; by reason:")
        reasons = list(report.get("by_reason", {}).items())
        for reason, n in reasons[:10]:
            print(f"  {n:>11,}  {reason}")
        if len(reasons) > 10:
            print(f"  ... and {len(reasons) - 10} other reasons")
    for item in report.get("nonfinite", [])[:20]:
        print(
            f"  non-finite values kept as they are in {item['shard']}: {item['key']!r}:"
            f" {item['nonfinite_values']}"
        )
    n_nonfinite = report.get("counts", {}).get("nonfinite", len(report.get("nonfinite", [])))
    if n_nonfinite > 20:
        print(f"  ... and {n_nonfinite - 20:,} more samples with non-finite values")
    if report.get("rejected") or report.get("nonfinite"):
        every = report.get("all_rejected")
        print(
            f"report: {dest.rstrip('/')}/{REJECTIONS_FILE}"
            + (f" (every rejected sample: {dest.rstrip('/')}/{every})" if every else "")
        )


def _append(args) -> int:
    from .api import append

    with _client(args) as client:
        ds = append(
            args.src,
            args.dest,
            client=client,
            workers=args.workers,
            progress=True,
            on_error=args.on_error,
            storage_options=args.storage_options,
        )
    _summary(ds, args.dest, args.storage_options)
    return 0


def _verify(args) -> int:
    from .api import verify

    src, dest = (args.src_or_dest, args.dest) if args.dest else (None, args.src_or_dest)
    with _client(args) as client:
        report = verify(
            dest,
            src=src,
            client=client,
            workers=args.workers,
            progress=True,
            storage_options=args.storage_options,
        )
    print(report)
    return 0 if report.ok else 1


def _info(args) -> int:
    from .info import describe

    report = describe(args.dest, storage_options=args.storage_options)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from .info import format_report

        print(format_report(report))
    return 0


def _catalog(args) -> int:
    from .catalog import write_catalog
    from .layout import require_cube

    require_cube(args.dest, args.storage_options)

    path = write_catalog(
        args.dest, args.output, metadata_url=args.metadata_url, storage_options=args.storage_options
    )
    print(f"wrote {path}: intake.open_catalog({str(path)!r})['nasar'].to_dask()")
    return 0


def _view(args) -> int:
    from .viewer import export_static, serve

    if args.export:
        files = export_static(args.export)
        print(
            f"wrote {', '.join(f.name for f in files)} to {args.export}: open"
            " index.html?store=URL (default ./nasar.zarr)"
        )
        return 0
    if not args.dest:
        print("nasar-zarr view: error: give DEST (a local cube) or --export DIR", file=sys.stderr)
        return 2
    serve(args.dest, port=args.port, open_browser=not args.no_browser, sample=args.sample)
    return 0


def _export(args) -> int:
    from .export import export

    time = None if args.time is None else tuple(t or None for t in args.time)
    res = export(
        args.dest,
        args.out,
        format=args.format,
        min_quality=args.min_quality,
        require_cross_pol=args.require_cross_pol,
        bbox=args.bbox,
        time=time,
        normalized=args.normalized,
        piece=args.piece,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        storage_options=args.storage_options,
    )
    print(
        f"wrote {res.n_samples} samples to {res.path} ({res.format}, {res.pieces} pieces of"
        f" <= {res.piece} samples)"
    )
    return 0


def _stac(args) -> int:
    from .stac import write_stac

    print(write_stac(args.dest, args.output, href=args.href, storage_options=args.storage_options))
    return 0


_COMMANDS = {
    "stac": _stac,
    "export": _export,
    "synth": _synth,
    "convert": _convert,
    "info": _info,
    "catalog": _catalog,
    "append": _append,
    "verify": _verify,
    "view": _view,
}
