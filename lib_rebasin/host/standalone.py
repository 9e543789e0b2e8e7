"""The host for the standalone app: a folder of checkpoints, a device of its own, a lock of its own."""
from __future__ import annotations

import os
import threading

from ..checkpoint import same_file
from ..progress import SILENT, Monitor
from .base import DTYPE_CHOICES, Host, Settings, UnknownCheckpoint, parse_credentials, scan_checkpoints

SAMPLE_NAMES = ("synthetic-sdxl-a.safetensors", "synthetic-sdxl-b.safetensors")
VAE_SUFFIXES = (".vae.safetensors", ".vae.ckpt", ".vae.pt")


class StandaloneHost(Host):
    name = "standalone"
    label = "Standalone"
    can_create_samples = True

    def __init__(self, models_dir: str, *, device: str | None = None, dtype: str = "fp16",
                 permutation_cache: str = "", api_auth: str | None = None, sample_scale: str = "small"):
        super().__init__()
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        self._dir = os.path.abspath(models_dir)
        if not os.path.isdir(self._dir):
            raise ValueError(f"{self._dir}: models folder does not exist")
        self._device = device or _best_device()
        self._settings = Settings(dtype=dtype, device="", permutation_cache=permutation_cache)
        self._credentials = parse_credentials(api_auth)
        self.sample_scale = sample_scale
        self._lock = threading.Lock()
        self._checkpoints: dict[str, str] = {}
        self.progress: tuple[float, str] = (0.0, "")
        self.refresh_checkpoints()

    def checkpoint_titles(self) -> list[str]:
        return list(self._checkpoints)

    def refresh_checkpoints(self) -> None:
        self._checkpoints = scan_checkpoints(self._dir)

    def checkpoint_path(self, title: str) -> str:
        path = self._checkpoints.get(title)
        if path is None:
            raise UnknownCheckpoint(f"{title!r} is not in the checkpoint list of {self._dir} (refresh the list?)")
        return path

    def title_for_path(self, path: str) -> str | None:
        for title, candidate in self._checkpoints.items():
            if os.path.exists(path) and same_file(candidate, path):
                return title
        return None

    def models_dir(self) -> str:
        return self._dir

    def vae_files(self) -> dict[str, str]:
        found = {}
        for root, dirs, files in os.walk(self._dir):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.lower().endswith(VAE_SUFFIXES):
                    path = os.path.join(root, name)
                    found[os.path.relpath(path, self._dir).replace(os.sep, "/")] = path
        return dict(sorted(found.items()))

    def default_device(self) -> str:
        return self._device

    def settings(self) -> Settings:
        return self._settings

    def _exclusive(self):
        return self._lock

    def _begin(self, label: str) -> None:
        self.progress = (0.0, label)

    def _set_progress(self, fraction: float, message: str) -> None:
        self.progress = (fraction, message)

    def api_credentials(self) -> dict[str, str] | None:
        return self._credentials

    def create_samples(self, monitor: Monitor = SILENT) -> list[str]:
        """Two synthetic SDXL checkpoints for trying every method: a base and a same-base 'fine-tune'."""
        from ..synthetic import write_synthetic
        scale = self.sample_scale
        a, b = (os.path.join(self._dir, name) for name in SAMPLE_NAMES)
        if os.path.exists(a) or os.path.exists(b):
            raise ValueError(f"{self._dir} already holds {SAMPLE_NAMES[0]} or {SAMPLE_NAMES[1]}")
        write_synthetic(a, scale=scale, seed=1, monitor=monitor.scaled(0.0, 0.5))
        try:
            write_synthetic(b, base=a, seed=2, drift=0.05, monitor=monitor.scaled(0.5, 1.0))
        except BaseException:
            os.unlink(a)
            raise
        self.refresh_checkpoints()
        return [a, b]


def _best_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
