"""`python -m lib_rebasin`: one subcommand per library capability."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..anatomy import ArchitectureError
from ..checkpoint import CheckpointError
from ..progress import Cancelled

# Each module defines register(subparsers); a subcommand's handler is stored as its `func` default.
COMMAND_MODULES = ("foundation", "merge", "ui", "spec", "rebasin")


class UsageError(Exception):
    """Bad arguments or input found before any work started."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(prog="python -m lib_rebasin",
                                     description="Merge SDXL checkpoints: amplified difference and exact Git Re-Basin.")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (CheckpointError, ArchitectureError, UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("cancelled: no output was written", file=sys.stderr)
        return 130
