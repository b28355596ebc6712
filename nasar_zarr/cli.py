"""The ``nasar-zarr`` command: thin, it parses, calls the library, maps errors to exit codes.

Exit codes: 0 success, 1 verification found mismatches, 2 a library error
(bad input, refused store, ...), printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import NasarZarrError


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", metavar="JSON", type=json.loads, default=None,
                   help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://..."}\'')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nasar-zarr",
        description="Convert the NA-SAR WebDataset corpus into a Zarr v3 cube, and inspect it.",
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
    p.add_argument("--codec", default=None, help="blosc-zstd (default), blosc-lz4, zstd, none")
    p.add_argument("--clevel", type=int, default=None)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, default=None,
                       help="local worker processes (default: one per core; 0: in-process)")
    group.add_argument("--scheduler", default=None, help="address of a running dask scheduler")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store made with other options")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--plan-json", metavar="FILE", help="also write the plan as JSON")
    _add_storage(p)

    p = sub.add_parser("info", help="describe a cube: layout, sizes, status, provenance")
    p.add_argument("dest")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except NasarZarrError as exc:
        print(f"nasar-zarr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nasar-zarr {args.command}: interrupted; run it again to resume",
              file=sys.stderr)
        return 130


def _synth(args) -> int:
    from .testing import write_corpus

    info = write_corpus(args.out, n_shards=args.shards, samples_per_shard=args.samples_per_shard,
                        seed=args.seed, compressed=args.compressed)
    print(f"wrote {info.n_samples} samples in {len(info.shard_paths)} shards to {info.root}")
    return 0


def _convert(args) -> int:
    from .plan import plan_conversion

    options = {k: v for k, v in {"inner_chunk": args.inner_chunk, "shard": args.shard,
                                 "codec": args.codec, "clevel": args.clevel}.items()
               if v is not None}
    try:
        plan = plan_conversion(args.src, args.dest, on_error=args.on_error,
                               storage_options=args.storage_options, **options)
    except ValueError as exc:
        if isinstance(exc, NasarZarrError):
            raise
        print(f"nasar-zarr convert: error: {exc}", file=sys.stderr)
        return 2
    if args.plan_json:
        with open(args.plan_json, "w") as f:
            f.write(plan.to_json())
    print(plan)
    if args.dry_run:
        return 0
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    try:
        ds = plan.execute(client=client, workers=args.workers, progress=True,
                          overwrite=args.overwrite)
    finally:
        if client is not None:
            client.close()
    from .info import status_counts

    counts = status_counts(ds)
    print(f"done: {counts['written']:,} written, {counts['rejected']:,} rejected,"
          f" {counts['pending']:,} pending -> {args.dest}")
    return 0


def _info(args) -> int:
    from .info import describe

    report = describe(args.dest, storage_options=args.storage_options)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from .info import format_report

        print(format_report(report))
    return 0


_COMMANDS = {"synth": _synth, "convert": _convert, "info": _info}
