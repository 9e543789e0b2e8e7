"""`python -m lib_rebasin`: one subcommand per library capability.

Every failure a user can cause ends in one line on stderr and a non-zero exit, never a traceback: 2 for a
refusal or a failed job (bad input, an output that must not be written, a full disk; nothing was written),
128 + N for signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP; temporary files removed).  Only this module's
stdlib imports run before the signal handlers are in place, so even Ctrl-C while torch loads is clean.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..interrupts import exit_code, stop_on_signals

# Each module defines register(subparsers); a subcommand's handler is stored as its `func` default.
COMMAND_MODULES = ("foundation", "merge", "ui", "spec", "rebasin")
EXIT_REFUSED = 2


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


def error(message: object) -> None:
    print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .. import outputs
    with stop_on_signals():
        written = outputs.committed_count()
        try:
            return _run(argv)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP turned into Interrupted
            done = outputs.committed_since(written)
            what = str(e) if str(e) else "interrupted by Ctrl-C"
            outcome = (f"wrote {', '.join(map(str, done))} before that; nothing else was written" if done
                       else "no output was written")
            print(f"\n{what}: {outcome}", file=sys.stderr)
            return exit_code(e)
        except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as a C tool would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141


def _run(argv: list[str] | None) -> int:
    from ..errors import user_message
    from ..progress import Cancelled
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except Cancelled:
        print("cancelled: no output was written", file=sys.stderr)
        return 130
    except UsageError as e:
        error(e)
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        error(message)
    return EXIT_REFUSED

