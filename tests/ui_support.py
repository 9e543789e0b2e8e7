"""Helpers for the UI tests: tiny checkpoints in a folder, finding a wired Gradio handler, reading outputs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open


class ProgressRecorder:
    """Stands in for gr.Progress: records the (fraction, desc) calls."""

    def __init__(self):
        self.calls: list[tuple[float, str]] = []

    def __call__(self, fraction, desc=None, **kwargs):
        self.calls.append((fraction, desc))


def act_at(host, fraction: float, action) -> None:
    """Make the host's job monitor run `action` once, when a job first reports progress >= `fraction` (unlike
    the UI's progress bar this is not throttled, so it fires mid-job even for a tiny checkpoint)."""
    make_monitor = host.monitor
    pending = [action]

    def monitor(on_progress=None):
        def report(f, message):
            if pending and f >= fraction:
                pending.pop()()
            if on_progress is not None:
                on_progress(f, message)
        return make_monitor(report)
    host.monitor = monitor


def copy_models(sources: dict[str, str], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, source in sources.items():
        out[name] = folder / name
        shutil.copyfile(source, out[name])
    return out


def handler(blocks, name: str):
    """The function wired to an event whose handler was built from the function `name` (wrappers followed)."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    for block_fn in fns:
        fn = block_fn.fn
        seen = fn
        while seen is not None:
            if getattr(seen, "__name__", None) == name:
                return fn
            seen = getattr(seen, "__wrapped__", None)
    raise LookupError(f"no event handler built from {name}")


def update_value(update):
    """The value in a gr.update() dict (Gradio 3 and 4+ agree on this key)."""
    return update.get("value") if isinstance(update, dict) else update


def read(path, key: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key)


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files a job might leave behind."""
    return sorted(name for name in os.listdir(folder) if name.startswith(".") or name.endswith((".tmp", ".part")))
