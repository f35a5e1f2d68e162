"""transfusion data prepare: decode a dataset once into the cache and print what it holds.

Examples:

    transfusion data prepare retina-eyepacs --source /data/eyepacs
    transfusion data prepare chexpert --source s3://bucket/CheXpert-v1.0-small \
        --option uncertainty=u-ignore
    transfusion data prepare medmnist --source retinamnist.npz --resolution 224 --skip-bad
"""

from __future__ import annotations

import argparse
import sys


def parse_options(items: list[str]) -> dict[str, str]:
    """``key=value`` strings -> a dict; values stay strings, each dataset types its own."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def command_data_prepare(args: argparse.Namespace) -> int:
    from transfusion.data import DATASETS, prepare_dataset
    from transfusion.data.build import default_resolution
    from transfusion.data.summary import describe

    DATASETS.get(args.name)  # an unknown name lists the valid ones before anything else is checked
    options: dict[str, object] = parse_options(args.option)
    if args.skip_bad:
        options["skip_bad"] = True
    resolution = default_resolution(args.name) if args.resolution is None else args.resolution
    try:
        prepared = prepare_dataset(args.name, source=args.source, resolution=resolution, options=options)
    except ValueError as exc:
        # main() prints the first line; show the rest (e.g. every bad file) before it.
        details = str(exc).strip().splitlines()[1:]
        for line in details[:200]:
            print(line, file=sys.stderr)
        if len(details) > 200:
            print(f"  ... and {len(details) - 200} more", file=sys.stderr)
        raise
    print(describe(prepared))
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``data prepare NAME --source ...`` to the ``transfusion`` parser."""
    data = subparsers.add_parser("data", help="prepare datasets and show their summaries")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser(
        "prepare",
        help="prepare a dataset (decode once into the cache) and print images per split and label",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("name", help="dataset name (see: transfusion list)")
    prepare.add_argument("--source", default=None, help="a local folder/file or s3://bucket/prefix")
    from flows.arguments import resolution_px

    prepare.add_argument(
        "--resolution", type=resolution_px, default=None, help="pixels per side (default: per dataset)"
    )
    prepare.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dataset option, e.g. uncertainty=u-zeros, val_fraction=0.1 (repeatable)",
    )
    prepare.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unreadable image files instead of failing",
    )
    prepare.set_defaults(func=command_data_prepare)
