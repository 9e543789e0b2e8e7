"""Stopping a run from outside the way Ctrl-C does: SIGINT, SIGTERM (kill, a service manager, a container
stopping), SIGHUP (the terminal was closed) and, on Windows, SIGBREAK (Ctrl-Break).

Inside `stop_on_signals()` the first such signal raises `Interrupted` (a KeyboardInterrupt) in the main thread,
so every job unwinds as on Ctrl-C: its temporary files are removed and the caller prints one line.  A second
signal while that cleanup runs removes the temporary files at once and exits.  A signal the parent process
set to be ignored (`nohup`, a background job) stays ignored.  Only the main thread can handle signals, so in
any other thread this does nothing (a webui handles its own).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

HANDLED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")
_NAMES = {"SIGINT": "Ctrl-C", "SIGHUP": "SIGHUP (the terminal was closed)", "SIGBREAK": "Ctrl-Break"}


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `exit_code` is the shell's convention, 128 + the signal's number."""

    def __init__(self, signum: int):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {_NAMES.get(name, name)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(error: BaseException) -> int:
    """The exit status for an interruption: 128 + the signal (130 for a plain KeyboardInterrupt)."""
    return error.exit_code if isinstance(error, Interrupted) else 128 + signal.SIGINT


_critical: list[None] = []
_pending: list[int] = []


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A step that must not be cut in two (committing a file: the caller must learn whether it happened): a
    first stop signal arriving meanwhile is raised when the step is over."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _critical.append(None)
    try:
        yield
    finally:
        _critical.pop()
        if not _critical and _pending:
            raise Interrupted(_pending.pop())


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handle(signum, frame):
        received.append(signum)
        if len(received) == 1:
            if _critical:
                _pending.append(signum)
                return
            raise Interrupted(signum)
        from .outputs import remove_live_temps
        remove_live_temps()
        try:
            os.write(2, b"\nstopped at once (second signal); temporary files removed\n")
        finally:
            os._exit(128 + signum)

    previous = {}
    for name in HANDLED:
        number = getattr(signal, name, None)
        if number is None:
            continue
        try:
            if signal.getsignal(number) is signal.SIG_IGN:
                continue
            previous[number] = signal.signal(number, handle)
        except (OSError, ValueError):
            continue
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


__all__ = ["Interrupted", "stop_on_signals", "deferred", "exit_code", "HANDLED"]
