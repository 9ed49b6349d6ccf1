"""`python -m dreamrelation_core <command>`: each command is defined next to its concept."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> its add_cli(subparsers); a module not present (optional part) is skipped
_COMMAND_MODULES = ("dataset", "subject_masks", "train_cli", "demo", "comfy_keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dreamrelation_core",
        description="DreamRelation: relation LoRAs for Mochi 1 (prepare data, train, export, import).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"dreamrelation_core.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"dreamrelation_core.{name}":
                continue
            raise
        mod.add_cli(sub)
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
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # our errors name the file, key and shape: show them without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
