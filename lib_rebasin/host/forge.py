"""The host inside Forge (2.0.1v1.10.1): A1111's registry and queue with Forge's differences.

- The checkpoint dropdowns show `name`, not `title` (`sd_models.checkpoint_tiles` returns names).
- Models load lazily from a file path (`forge_model_reload`); `load_model`/`reload_model_weights` are stubs, so
  a result is switched to through the UI's checkpoint selector (JavaScript `selectCheckpoint`).
- VRAM is freed with `backend.memory_management`; the model comes back by itself at the next generation.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from .a1111 import A1111Host


def running_in_forge() -> bool:
    from modules import sd_models
    return hasattr(sd_models, "forge_model_reload")


class ForgeHost(A1111Host):
    name = "forge"
    label = "Forge"

    def title_for_path(self, path: str) -> str | None:
        info = self._info_for_path(path)
        return info.name if info is not None else None

    def default_device(self) -> str:
        from backend import memory_management
        return str(memory_management.get_torch_device())

    @contextlib.contextmanager
    def vram_freed(self, device: str) -> Iterator[None]:
        if device.startswith("cuda"):
            from backend import memory_management
            memory_management.unload_all_models()
            memory_management.soft_empty_cache()
        yield
