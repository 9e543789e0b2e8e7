"""What the merge tab needs from whatever hosts it: a checkpoint list, a models folder, a device, a job lock with
progress and interrupt, and (in a webui) switching the live model.  One implementation per host: `a1111.py`,
`forge.py` (the only files that import the webui's `modules`), `standalone.py` (a folder of checkpoints).

Jobs: `run_job` takes the host's exclusive lock (the webui's queue lock) and is for callers outside the webui's
own wrappers (the REST routes).  The tab's handlers go through `wrap_ui_job`, which in a webui is
`wrap_gradio_gpu_call`: it already holds that lock, and the lock is not re-entrant, so code inside a wrapped
handler must never call `run_job`.
"""
from __future__ import annotations

import contextlib
import functools
import html
import os
import threading
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from .. import devices
from ..progress import SILENT, Monitor
from .memory import FreedModel

T = TypeVar("T")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
DTYPE_CHOICES = ("fp16", "bf16", "fp32", "same")


class UnknownCheckpoint(ValueError):
    """A model name that is not in the host's checkpoint list."""


@dataclass(frozen=True)
class Settings:
    dtype: str = "fp16"            # default output dtype
    device: str = ""               # "" means the host's own device
    permutation_cache: str = ""    # folder for cached re-basin permutations; "" means the host's default
    permutation_cache_limit_mb: float = 1024  # the cache's size cap; the least recently used files go first


@dataclass(frozen=True)
class XyzTargets:
    """txt2img's script dropdown and the X axis of its X/Y/Z plot, as the host's own UI components."""
    script_dropdown: Any
    script_title: str
    x_type: Any
    x_values: Any
    x_values_dropdown: Any


class JobTracker:
    """Whether one of our jobs waits or runs, and an interrupt request that reaches a job still waiting for the
    lock (the webui resets its own interrupt flag when a job starts, so a click while queued would be lost)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submitted = 0
        self.running = False
        self.cancel_requested = False

    @contextlib.contextmanager
    def submitted_job(self) -> Iterator[None]:
        with self._lock:
            self.submitted += 1
        try:
            yield
        finally:
            with self._lock:
                self.submitted -= 1
                if self.submitted == 0:
                    self.cancel_requested = False

    @contextlib.contextmanager
    def running_job(self) -> Iterator[None]:
        self.running = True
        try:
            yield
        finally:
            with self._lock:
                self.running = False
                self.cancel_requested = False

    def request_cancel(self) -> bool:
        with self._lock:
            if self.submitted == 0 and not self.running:
                return False
            self.cancel_requested = True
            return True


class Host(ABC):
    name = "host"
    label = "Host"
    can_load = False            # the host has a live model that a result can be switched to
    can_create_samples = False  # offer synthetic checkpoints in an empty folder (create_samples)
    sample_scale = "small"

    def __init__(self) -> None:
        self.jobs = JobTracker()

    # --- checkpoints -------------------------------------------------------------------------------------------
    @abstractmethod
    def checkpoint_titles(self) -> list[str]:
        """The names the host shows for its checkpoints, in its order."""

    @abstractmethod
    def refresh_checkpoints(self) -> None:
        """Rescan the models folder(s)."""

    @abstractmethod
    def checkpoint_path(self, title: str) -> str:
        """The file behind a name from the list; raises UnknownCheckpoint for anything else."""

    @abstractmethod
    def title_for_path(self, path: str) -> str | None:
        """The list entry of a file (after a refresh), or None."""

    @abstractmethod
    def models_dir(self) -> str:
        """Where merges are written."""

    def load_value(self, path: str) -> str | None:
        """What the host's own model switcher wants for this file (title or name), or None."""
        return self.title_for_path(path)

    def vae_files(self) -> dict[str, str]:
        """Standalone VAE files offered for baking in: label -> path."""
        return {}

    def create_samples(self, monitor: Monitor = SILENT) -> list[str]:
        """Write sample checkpoints into the models folder (hosts whose `can_create_samples` is set)."""
        raise NotImplementedError(f"{self.label} does not create sample checkpoints")

    # --- device and settings ----------------------------------------------------------------------------------
    @abstractmethod
    def default_device(self) -> str:
        """The device the host computes on ('cpu', 'cuda', 'cuda:1', ...)."""

    def device_choices(self) -> list[str]:
        choices = devices.choices()
        default = self.default_device()
        if default not in choices:
            choices.append(default)
        return choices

    def settings(self) -> Settings:
        return Settings()

    def resolve_device(self, choice: str | None) -> str:
        """A device choice from the UI or API ('' / 'default' = the settings' device, else the host's): any
        device the webuis run on.  Whether it is there, and whether each part of a job runs on it, the job
        finds out before it reads anything big (`devices.require`, `devices.place`)."""
        choice = (choice or "").strip()
        if choice in ("", "default"):
            choice = self.settings().device.strip()
        if choice in ("", "default"):
            choice = self.default_device()
        return str(devices.parse(choice))

    def permutation_cache_dir(self) -> str:
        """Where re-basin permutations are cached: the setting, else the host's default folder (never the
        checkpoint folder: the cache is not a model)."""
        return os.path.abspath(os.path.expanduser(self.settings().permutation_cache.strip()
                                                  or self.default_permutation_cache_dir()))

    def default_permutation_cache_dir(self) -> str:
        from ..permcache import default_cache_dir
        return str(default_cache_dir())

    def permutation_cache_limit(self) -> int:
        """The permutation cache's size cap in bytes (0: no cap)."""
        return max(0, int(float(self.settings().permutation_cache_limit_mb or 0) * (1 << 20)))

    @contextlib.contextmanager
    def room_for(self, request, say: Callable[[str], None] = lambda text: None) -> Iterator[FreedModel | None]:
        """While `request` (a jobs.MergeRequest) runs: unload the host's loaded model if memory is short
        beside it (RAM for a CPU job, VRAM for a GPU job) and bring it back after, telling `say` what it is
        doing.  Yields what was unloaded (its `describe()` is for the user), or None."""
        yield None

    @contextlib.contextmanager
    def job_room(self, request, say: Callable[[str], None] = lambda text: None) -> Iterator[list[str]]:
        """Around one merge job: room for it (`room_for`), then the permutation cache trimmed to its cap.
        Yields a list that holds, once the block is left, notes for the user about both."""
        notes: list[str] = []
        try:
            with self.room_for(request, say) as freed:
                try:
                    yield notes
                finally:
                    if devices.is_accelerator(request.device):  # the job's cached blocks go back before the model does
                        self.empty_device_cache(request.device)
                    if freed is not None:
                        notes.append(freed)  # described once it has been restored (or not)
        finally:
            notes[:] = [n.describe() if isinstance(n, FreedModel) else n for n in notes]
            notes.extend(self.trim_permutation_cache())

    def empty_device_cache(self, device: str) -> None:
        """Give what a job left in the allocator's cache back to the device (the host's own way)."""
        devices.empty_cache(devices.parse(device))

    def trim_permutation_cache(self) -> list[str]:
        from ..permcache import trim_cache
        removed = trim_cache(self.permutation_cache_dir(), self.permutation_cache_limit())
        if not removed:
            return []
        return [f"The permutation cache was over its size limit: its {len(removed)} least recently used "
                f"file(s) were removed."]

    # --- jobs -------------------------------------------------------------------------------------------------
    @abstractmethod
    def _exclusive(self) -> contextlib.AbstractContextManager:
        """The host's lock around GPU work (the webui's queue lock); never held twice by one thread."""

    def _begin(self, label: str) -> None:
        pass

    def _end(self) -> None:
        pass

    def _set_progress(self, fraction: float, message: str) -> None:
        pass

    def _host_interrupted(self) -> bool:
        return False

    def _interrupt_running(self) -> None:
        pass

    def monitor(self, on_progress: Callable[[float, str], None] | None = None) -> Monitor:
        """A Monitor that reports to the host (and `on_progress`) and stops when the user interrupts."""
        def report(fraction: float, message: str) -> None:
            self._set_progress(fraction, message)
            if on_progress is not None:
                on_progress(fraction, message)
        return Monitor(report, self.interrupted)

    def interrupted(self) -> bool:
        return self.jobs.cancel_requested or self._host_interrupted()

    def interrupt(self) -> bool:
        """Stop our running job, or the next one of ours to start; False when none is waiting or running."""
        if not self.jobs.request_cancel():
            return False
        if self.jobs.running:
            self._interrupt_running()
        return True

    def run_job(self, label: str, job: Callable[[Monitor], T],
                on_progress: Callable[[float, str], None] | None = None,
                on_start: Callable[[], None] | None = None) -> T:
        """Run `job(monitor)` under the host's lock, as one job of the host (for callers outside `wrap_ui_job`)."""
        with self.jobs.submitted_job():
            with self._exclusive():
                self._begin(label)
                try:
                    with self.jobs.running_job():
                        if on_start is not None:
                            on_start()
                        return job(self.monitor(on_progress))
                finally:
                    self._end()

    def wrap_ui_job(self, handler: Callable[..., list], extra_outputs: list) -> Callable[..., tuple]:
        """Wrap a tab handler that returns a list whose last item is HTML: it runs as one job under the host's
        lock, an exception becomes `extra_outputs + [error HTML]`.  Signature inspection (gr.Progress) still
        sees `handler`'s parameters."""

        @functools.wraps(handler)
        def wrapped(*args, **kwargs):
            with self.jobs.submitted_job():
                try:
                    with self._exclusive():
                        self._begin("rebasin")
                        try:
                            with self.jobs.running_job():
                                return tuple(handler(*args, **kwargs))
                        finally:
                            self._end()
                except Exception as e:
                    traceback.print_exc()  # for a bug report; the user sees the message in the tab
                    message = html.escape(f"{type(e).__name__}: {e}")
                    return tuple(list(extra_outputs) + [f"<div class='error'>{message}</div>"])
        return wrapped

    # --- UI and API plumbing ----------------------------------------------------------------------------------
    def queue_enabled(self) -> bool:
        """gr.Progress needs the Gradio queue (A1111's --no-gradio-queue turns it off)."""
        return True

    def api_credentials(self) -> dict[str, str] | None:
        """user -> password for the REST routes (the webui's --api-auth), or None for no authentication."""
        return None

    def xyz_targets(self) -> XyzTargets | None:
        return None

    def xyz_checkpoint_choices(self) -> list[str]:
        """The choices of the X/Y/Z plot's Checkpoint name axis."""
        return []

    def xyz_title_for_path(self, path: str) -> str | None:
        """A file as a value of the X/Y/Z plot's Checkpoint name axis."""
        return None

    def api_enabled(self) -> bool:
        """Whether to mount the REST routes."""
        return True


def parse_credentials(spec: str | None) -> dict[str, str] | None:
    """'user:pass,user2:pass2' (the webui's --api-auth format) -> {user: pass}."""
    if not spec:
        return None
    credentials = {}
    for item in spec.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user:
            raise ValueError(f"bad credentials {item!r}: expected user:password")
        credentials[user] = password
    return credentials


def scan_checkpoints(folder: str) -> dict[str, str]:
    """Checkpoint files under `folder`, recursively, as {relative posix path: absolute path}, sorted like the
    webui does (case-insensitive); `*.vae.*` files are VAEs, not checkpoints."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            lower = name.lower()
            if lower.endswith(CHECKPOINT_SUFFIXES) and ".vae." not in lower and not name.startswith("."):
                path = os.path.join(root, name)
                found[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.abspath(path)
    return dict(sorted(found.items(), key=lambda item: item[0].casefold()))
