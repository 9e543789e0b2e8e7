"""Progress and cancellation, passed down from whoever runs a job (CLI, webui, API) as plain callbacks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class Cancelled(Exception):
    """Raised inside a job when its caller asked it to stop; the job leaves no output behind."""


@dataclass
class Monitor:
    on_progress: Callable[[float, str], None] | None = None  # (fraction done in [0, 1], message)
    is_cancelled: Callable[[], bool] | None = None

    def check(self) -> None:
        if self.is_cancelled is not None and self.is_cancelled():
            raise Cancelled("cancelled by the user")

    def report(self, fraction: float, message: str = "") -> None:
        self.check()
        if self.on_progress is not None:
            self.on_progress(min(max(fraction, 0.0), 1.0), message)

    def scaled(self, start: float, end: float) -> "Monitor":
        """A monitor for one phase of a job that maps the phase's [0, 1] onto [start, end]."""
        def on_progress(fraction: float, message: str) -> None:
            self.report(start + (end - start) * fraction, message)
        return Monitor(on_progress, self.is_cancelled)


SILENT = Monitor()
