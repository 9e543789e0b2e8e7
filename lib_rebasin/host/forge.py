"""The host inside Forge (2.0.1v1.10.1): A1111's registry and queue with Forge's differences.

- The checkpoint dropdowns show `name`, not `title` (`sd_models.checkpoint_tiles` returns names).
- Models load lazily from a file path (`forge_model_reload`); `load_model`/`reload_model_weights` are stubs, so
  a result is switched to through the UI's checkpoint selector (JavaScript `selectCheckpoint`).
- Memory goes through `backend.memory_management` (free memory, unloading to the offload device, loading to the
  GPU), and model loading runs on Forge's main thread (`modules_forge.main_thread`), as its txt2img does.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from ..devices import is_accelerator, parse
from . import memory
from .a1111 import A1111Host, _attempt


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
    def room_for(self, request, say: Callable[[str], None] = lambda text: None
                 ) -> Iterator[memory.FreedModel | None]:
        """VRAM: the models on the GPU go to their offload device (`unload_all_models`) and are loaded to the
        GPU again after (`load_models_gpu`).  RAM: the model is dropped as a checkpoint switch drops it and
        `forge_model_reload` loads it again from its file."""
        import torch
        from backend import memory_management
        from modules import sd_models
        model = sd_models.model_data.sd_model
        if not hasattr(model, "forge_objects"):  # nothing loaded yet (Forge loads at the first generation)
            yield None
            return
        if is_accelerator(request.device):  # cuda, mps, xpu, DirectML
            device = parse(request.device)
            free = memory_management.get_free_memory(device)
            need = memory.VRAM_NEED
            on_gpu = [loaded.model for loaded in memory_management.current_loaded_models
                      if getattr(loaded, "device", None) is not None and loaded.device.type == device.type]
            if not on_gpu or not memory.short_of(need, free):
                yield None
                return
            freed = memory.FreedModel(_model_name(model), "VRAM", free, need)
            say(freed.unloading())
            _on_main_thread(_unload_all)
            try:
                yield freed
            finally:
                say(freed.reloading())
                freed.restored, freed.error = _attempt(lambda: _on_main_thread(
                    lambda: memory_management.load_models_gpu(on_gpu)))
        else:
            free = memory_management.get_free_memory(torch.device("cpu"))
            need = memory.ram_need([*request.models, request.vae])
            if not memory.short_of(need, free):
                yield None
                return
            freed = memory.FreedModel(_model_name(model), "RAM", free, need)
            del model
            say(freed.unloading())
            _on_main_thread(_drop_model)
            try:
                yield freed
            finally:
                say(freed.reloading())
                freed.restored, freed.error = _attempt(lambda: _on_main_thread(sd_models.forge_model_reload))


    def empty_device_cache(self, device: str) -> None:
        from backend import memory_management
        memory_management.soft_empty_cache()


def _model_name(model) -> str:
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "name", None) or "(loaded model)"


def _unload_all() -> None:
    from backend import memory_management
    memory_management.unload_all_models()
    memory_management.soft_empty_cache()


def _drop_model() -> None:
    """What `forge_model_reload` does before loading another checkpoint, plus forgetting the loaded one so
    that the next reload (ours, or the next generation's) loads it again."""
    import gc

    from modules import sd_models
    data = sd_models.model_data
    data.sd_model = sd_models.FakeInitialModel()
    data.forge_hash = ""
    gc.collect()
    _unload_all()
    gc.collect()


def _on_main_thread(action: Callable[[], object]) -> None:
    """Run on Forge's main thread (where its txt2img moves models) and raise here what it raised there."""
    outcome: dict = {}

    def run() -> None:
        try:
            action()
        except BaseException as e:  # handed to the calling thread below
            outcome["error"] = e
    try:
        from modules_forge import main_thread
    except ImportError:
        main_thread = None
    if main_thread is None or threading.current_thread() is threading.main_thread():
        run()  # (on the main thread itself, waiting for its loop would wait forever)
    else:
        main_thread.run_and_wait_result(run)
    if "error" in outcome:
        raise outcome["error"]
