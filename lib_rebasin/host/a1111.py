"""The host inside AUTOMATIC1111 1.10: its checkpoint registry, models folder, device, queue lock and progress
state (`shared.state`), settings, and txt2img's X/Y/Z plot.  `modules` is imported inside methods only, so
this file imports anywhere; Forge's differences live in `forge.py`.

Traps handled here (see the webui extension reference): the queue lock is not re-entrant; the tab's merge runs
inside `wrap_gradio_gpu_call`, which holds it; `shared.sd_model` loads a model on first access, so the live
model is read from `sd_models.model_data`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Callable, Iterator

from ..checkpoint import same_file
from ..devices import free_memory, is_accelerator, parse
from . import memory
from .base import Host, Settings, UnknownCheckpoint, XyzTargets, parse_credentials

PROGRESS_STEPS = 1000
SETTINGS_SECTION = ("rebasin", "Re-Basin Merge")
SETTINGS_CATEGORY = "sd"  # listed with the webui's Stable Diffusion settings
XYZ_SCRIPT_FILE = "xyz_grid.py"
PERMUTATION_CACHE_FOLDER = "rebasin-cache"  # under the webui's models folder, beside Stable-diffusion
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]\s*$")


class A1111Host(Host):
    name = "a1111"
    label = "AUTOMATIC1111"
    can_load = True

    # --- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_titles(self) -> list[str]:
        from modules import sd_models
        return list(sd_models.checkpoint_tiles())

    def refresh_checkpoints(self) -> None:
        from modules import sd_models, sd_vae
        sd_models.list_models()
        sd_vae.refresh_vae_list()

    def _info(self, title: str):
        """Exact lookup among the registry's aliases (title, name, hash...); a title whose hash part is stale
        (the file was hashed since the list was sent) is found by its name.  No substring matching: only
        names from the list are accepted."""
        from modules import sd_models
        info = sd_models.checkpoint_aliases.get(title)
        if info is None:
            info = sd_models.checkpoint_aliases.get(_HASH_SUFFIX.sub("", title))
        return info

    def checkpoint_path(self, title: str) -> str:
        info = self._info(title) if title else None
        if info is None:
            raise UnknownCheckpoint(f"{title!r} is not in the webui's checkpoint list (refresh the list?)")
        return info.filename

    def _info_for_path(self, path: str):
        from modules import sd_models
        if not os.path.exists(path):
            return None
        for info in sd_models.checkpoints_list.values():
            if os.path.exists(info.filename) and same_file(info.filename, path):
                return info
        return None

    def title_for_path(self, path: str) -> str | None:
        info = self._info_for_path(path)
        return info.title if info is not None else None

    def models_dir(self) -> str:
        from modules import sd_models, shared
        return shared.cmd_opts.ckpt_dir or sd_models.model_path

    def vae_files(self) -> dict[str, str]:
        from modules import sd_vae
        return dict(sd_vae.vae_dict)

    # --- device and settings ----------------------------------------------------------------------------------
    def default_device(self) -> str:
        from modules import devices
        return str(devices.device) if devices.device is not None else devices.get_optimal_device_name()

    def settings(self) -> Settings:
        from modules import shared
        opts = shared.opts
        limit = getattr(opts, "rebasin_permutation_cache_limit_mb", None)
        return Settings(dtype=getattr(opts, "rebasin_dtype", "fp16") or "fp16",
                        device=getattr(opts, "rebasin_device", "") or "",
                        permutation_cache=getattr(opts, "rebasin_permutation_cache", "") or "",
                        permutation_cache_limit_mb=Settings.permutation_cache_limit_mb if limit is None else limit)

    def register_settings(self, options: list[tuple[str, object, str, object, dict | Callable | None, str]]) -> None:
        """Add our options to the webui's Settings page: (key, default, label, component, component_args, info)."""
        from modules import shared
        for key, default, label, component, component_args, info in options:
            option = shared.OptionInfo(default, label, component=component, component_args=component_args,
                                       section=SETTINGS_SECTION, category_id=SETTINGS_CATEGORY)
            shared.opts.add_option(key, option.info(info) if info else option)

    def default_permutation_cache_dir(self) -> str:
        """`models/rebasin-cache`, beside `models/Stable-diffusion` (which the webui lists recursively)."""
        from modules import paths
        return os.path.join(paths.models_path, PERMUTATION_CACHE_FOLDER)

    @contextlib.contextmanager
    def room_for(self, request, say: Callable[[str], None] = lambda text: None
                 ) -> Iterator[memory.FreedModel | None]:
        """A1111's own model handling: a model in VRAM goes to RAM (`unload_model_weights`) and comes back
        (`send_model_to_device`); a model in RAM is dropped (`send_model_to_trash`, like a checkpoint switch
        does) and built again from its file (`load_model`)."""
        from modules import sd_models
        loading = getattr(sd_models.model_data, "lock", None)  # held while the webui loads its first model
        if loading is not None and loading.locked():
            say("waiting for the webui to finish loading its model")
            with loading:
                pass
        model = sd_models.model_data.sd_model  # not shared.sd_model: reading that would load a model
        device = _model_device(model)
        if device is None:
            yield None
            return
        gpu_job = is_accelerator(request.device)  # cuda, mps, xpu, DirectML: the model's device if it is there
        if gpu_job and device.type == parse(request.device).type:
            free, need = _free_vram(request.device), memory.VRAM_NEED
            if not memory.short_of(need, free):
                yield None
                return
            freed = memory.FreedModel(_model_name(model), "VRAM", free, need)
            say(freed.unloading())
            self._offload(model)
            try:
                yield freed
            finally:
                say(freed.reloading())
                freed.restored, freed.error = _attempt(lambda: self._onload(model))
        elif not gpu_job and device.type == "cpu":
            free, need = self._available_ram(), memory.ram_need([*request.models, request.vae])
            if not memory.short_of(need, free):
                yield None
                return
            freed = memory.FreedModel(_model_name(model), "RAM", free, need)
            say(freed.unloading())
            info = self._drop_models()
            try:
                yield freed
            finally:
                say(freed.reloading())
                freed.restored, freed.error = _attempt(lambda: self._reload(info))
        else:
            yield None

    def _available_ram(self) -> int | None:
        return memory.available_ram()

    def empty_device_cache(self, device: str) -> None:
        from modules import devices
        devices.torch_gc()

    def _offload(self, model) -> None:
        from modules import devices, sd_models
        sd_models.unload_model_weights(model)
        devices.torch_gc()

    def _onload(self, model) -> None:
        from modules import devices, sd_models
        devices.torch_gc()
        sd_models.send_model_to_device(model)

    def _drop_models(self):
        """Every model the webui holds in RAM (the current one, those kept by `sd_checkpoints_limit`, cached
        state dicts) goes; returns the current one's CheckpointInfo, to load it again."""
        import gc

        from modules import devices, sd_models
        data = sd_models.model_data
        info = getattr(data.sd_model, "sd_checkpoint_info", None)
        for model in {id(m): m for m in [data.sd_model, *data.loaded_sd_models] if m is not None}.values():
            sd_models.send_model_to_trash(model)
        data.loaded_sd_models.clear()
        data.sd_model = None
        getattr(sd_models, "checkpoints_loaded", {}).clear()
        gc.collect()
        devices.torch_gc()
        return info

    def _reload(self, info) -> None:
        from modules import sd_models
        if info is None:
            return
        try:
            sd_models.load_model(info)
        except BaseException:
            sd_models.model_data.was_loaded_at_least_once = False  # the next use of the model tries again
            raise

    # --- jobs -------------------------------------------------------------------------------------------------
    def _exclusive(self):
        from modules import call_queue
        return call_queue.queue_lock

    def _begin(self, label: str) -> None:
        from modules import shared
        shared.state.begin(job=label)
        self._start_counting()

    def _start_counting(self) -> None:
        from modules import shared
        shared.state.job_count = 1
        shared.state.sampling_steps = PROGRESS_STEPS
        shared.state.sampling_step = 0

    def _end(self) -> None:
        from modules import shared
        shared.state.end()

    def _set_progress(self, fraction: float, message: str) -> None:
        from modules import shared
        shared.state.sampling_step = int(fraction * PROGRESS_STEPS)
        shared.state.textinfo = message

    def _host_interrupted(self) -> bool:
        from modules import shared
        return bool(shared.state.interrupted)

    def _interrupt_running(self) -> None:
        from modules import shared
        shared.state.interrupt()

    def wrap_ui_job(self, handler: Callable[..., list], extra_outputs: list) -> Callable[..., tuple]:
        """`call_queue.wrap_gradio_gpu_call`: the queue lock, `shared.state.begin/end`, errors as the last
        output's HTML, timing appended to it."""
        from modules import call_queue

        @functools.wraps(handler)
        def body(*args, **kwargs):
            with self.jobs.running_job():
                self._start_counting()
                return handler(*args, **kwargs)

        gpu_call = call_queue.wrap_gradio_gpu_call(body, extra_outputs=list(extra_outputs))

        @functools.wraps(handler)
        def wrapped(*args, **kwargs):
            with self.jobs.submitted_job():
                return gpu_call(*args, **kwargs)
        return wrapped

    # --- UI and API plumbing ----------------------------------------------------------------------------------
    def queue_enabled(self) -> bool:
        from modules import shared
        return not getattr(shared.cmd_opts, "no_gradio_queue", False)

    def api_enabled(self) -> bool:
        from modules import shared
        return bool(getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False))

    def api_credentials(self) -> dict[str, str] | None:
        from modules import shared
        return parse_credentials(getattr(shared.cmd_opts, "api_auth", None))

    def xyz_targets(self) -> XyzTargets | None:
        """The built-in X/Y/Z plot's controls in txt2img (built before extension tabs), if it is there."""
        from modules import scripts
        runner = getattr(scripts, "scripts_txt2img", None)
        if runner is None or not getattr(runner, "inputs", None) or runner.inputs[0] is None:
            return None
        for script in runner.selectable_scripts:
            if os.path.basename(getattr(script, "filename", "") or "") == XYZ_SCRIPT_FILE:
                controls = runner.inputs[script.args_from:script.args_to]
                if len(controls) < 3:
                    return None
                return XyzTargets(runner.inputs[0], script.title(), controls[0], controls[1], controls[2])
        return None

    def xyz_checkpoint_choices(self) -> list[str]:
        """The Checkpoint name axis' own choices: the registry's titles."""
        from modules import sd_models
        return sorted(sd_models.checkpoints_list, key=str.casefold)

    def xyz_title_for_path(self, path: str) -> str | None:
        info = self._info_for_path(path)
        return info.title if info is not None else None


def _model_device(model):
    """Where a loaded model's weights are (a torch.device), or None when no real model is loaded."""
    if model is None:
        return None
    try:
        parameter = next(model.parameters())
    except (AttributeError, StopIteration, TypeError):
        return None
    return None if parameter.device.type == "meta" else parameter.device


def _model_name(model) -> str:
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "name", None) or getattr(info, "title", None) or "(loaded model)"


def _free_vram(device: str) -> int | None:
    return free_memory(parse(device))


def _attempt(action: Callable[[], None]) -> tuple[bool, str]:
    """(done, error message) of bringing a model back: a failure there must not hide the job's result."""
    try:
        action()
        return True, ""
    except Exception as e:  # reported to the user in the result; the webui's own log has the traceback
        import traceback
        traceback.print_exc()
        return False, f"{type(e).__name__}: {e}"
