"""`python -m dreamrelation_core <command>`: one module per command family, each with `add_cli`.

Only this subpackage uses argparse and tqdm; the library below it takes plain arguments and
reports progress through callbacks.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import DreamRelationError
from . import ablation, analyze, demo, evaluate, export, masks, prepare, train
from . import memory as memory_cmd

# in `--help` order
_FAMILIES = (prepare, masks, train, memory_cmd, export, analyze, evaluate, ablation, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dreamrelation_core",
        description="DreamRelation: relation LoRAs for Mochi 1 (prepare data, train, export, import).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in _FAMILIES:
        family.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (DreamRelationError, ValueError, FileNotFoundError, RuntimeError) as e:
        # our errors name the file, key and shape: show them without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
