"""The extension inside AUTOMATIC1111 1.10 (Gradio 3.41.2) and Forge (Gradio 4.40.0), against stand-ins of the
webui's modules with the real signatures (tests/webui_stubs).  Each flavour runs only under its own Gradio pin:
build the venvs with `bash .ci/ui-envs.sh DIR`, then `DIR/gradio3/bin/python -m pytest -m gradio3` and
`DIR/gradio4/bin/python -m pytest -m gradio4`."""
from __future__ import annotations

import inspect
import os
import runpy
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

gr = pytest.importorskip("gradio")
from ui_support import ProgressRecorder, act_at, copy_models, handler, leftovers, read, update_value  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUBS = Path(__file__).resolve().parent / "webui_stubs"
A1111 = [pytest.mark.gradio3, pytest.mark.skipif(gr.__version__ != "3.41.2", reason=(
    "A1111 1.10 pins gradio 3.41.2: run in the gradio3 venv of .ci/ui-envs.sh"))]
FORGE = [pytest.mark.gradio4, pytest.mark.skipif(gr.__version__ != "4.40.0", reason=(
    "Forge pins gradio 4.40.0: run in the gradio4 venv of .ci/ui-envs.sh"))]
STUB_PACKAGES = ("modules", "backend", "forge")


class Webui:
    """The stand-in webui after our script file was loaded: its modules, our host, the UI as the webui builds it."""

    def __init__(self, flavor: str, models: Path):
        import modules.call_queue
        import modules.devices
        import modules.script_callbacks
        import modules.scripts
        import modules.sd_models
        import modules.sd_vae
        import modules.shared
        self.flavor = flavor
        self.models = models
        self.shared = modules.shared
        self.sd_models = modules.sd_models
        self.script_callbacks = modules.script_callbacks
        self.scripts = modules.scripts
        self.devices = modules.devices
        self.call_queue = modules.call_queue
        self.script = runpy.run_path(str(ROOT / "scripts" / "rebasin_merge.py"), run_name="rebasin_merge.py")
        self.host = self.script["host"]
        self.demo = None

    def build_ui(self):
        """What modules/ui.py does: settings callbacks, txt2img with its scripts, the extension tabs, one Blocks."""
        self.script_callbacks.ui_settings_callback()
        runner = self.scripts.ScriptRunner()
        runner.add(XyzPlot(), os.path.join("scripts", "xyz_grid.py"))
        self.scripts.scripts_txt2img = runner
        with gr.Blocks(analytics_enabled=False) as txt2img:
            runner.setup_ui(gr)
        tabs = self.script_callbacks.ui_tabs_callback()
        with gr.Blocks(analytics_enabled=False) as demo:
            with gr.Tabs(elem_id="tabs"):
                with gr.TabItem("txt2img", id="txt2img"):
                    txt2img.render()
                for interface, label, ifid in tabs:
                    with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                        interface.render()
        self.demo, self.tabs, self.runner = demo, tabs, runner
        demo.get_config_file()  # everything serialises as the page needs it
        return tabs[0][0]

    def values(self, a, b, **overrides) -> list:
        from lib_rebasin.ui.tab import RECIPE_FIELDS
        values = dict(method="Amplified difference", model_a=a, model_b=b, model_c=None, models_many=[],
                      multiplier=2.0, alpha=0.5, seed=0, source_unet="merge", source_clip_l="merge",
                      source_clip_g="merge", source_vae="A", source_other="A", vae="None", dtype="fp32",
                      device="default", output_name="", overwrite=False, compute="fp32", clamp=False,
                      allow_nonfinite=False)
        values.update(overrides)
        return [values[name] for name in RECIPE_FIELDS]


class XyzPlot:
    """The X/Y/Z plot script's UI as scripts/xyz_grid.py builds it (its controls and their order)."""
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        x_type = gr.Dropdown(label="X type", choices=["Nothing", "Seed", "Checkpoint name"], value="Seed",
                             type="index", elem_id="script_txt2img_xyz_plot_x_type")
        x_values = gr.Textbox(label="X values", lines=1, elem_id="script_txt2img_xyz_plot_x_values")
        x_values_dropdown = gr.Dropdown(label="X values", visible=False, multiselect=True, interactive=True)
        y_type = gr.Dropdown(label="Y type", choices=["Nothing", "Seed"], value="Nothing", type="index")
        return [x_type, x_values, x_values_dropdown, y_type]


@pytest.fixture(params=[pytest.param("a1111", marks=A1111), pytest.param("forge", marks=FORGE)])
def webui(request, tmp_path, monkeypatch, tiny_a, tiny_b):
    models = tmp_path / "models"
    checkpoints = models / "Stable-diffusion"
    (models / "VAE").mkdir(parents=True)
    files = copy_models({"base.safetensors": tiny_a, "tune.safetensors": tiny_b}, checkpoints / "sub")
    monkeypatch.setenv("WEBUI_STUB_MODELS", str(models))
    monkeypatch.syspath_prepend(str(STUBS))
    _forget_stubs()
    import modules.sd_models
    modules.sd_models.known_sha256[str(files["base.safetensors"])] = "1234567890abcdef" * 4
    if request.param == "forge":
        import forge
        forge.apply()
    modules.sd_models.list_models()
    yield Webui(request.param, checkpoints)
    _forget_stubs()


def _forget_stubs():
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_PACKAGES:
            del sys.modules[name]


def _titles(webui) -> list[str]:
    return webui.host.checkpoint_titles()


def test_the_script_file_registers_settings_tab_and_routes(webui):
    from lib_rebasin.host.a1111 import A1111Host
    from lib_rebasin.host.forge import ForgeHost
    assert type(webui.host) is (ForgeHost if webui.flavor == "forge" else A1111Host)
    tab = webui.build_ui()
    assert webui.tabs == [(tab, "Re-Basin Merge", "rebasin")]
    labels = webui.shared.opts.data_labels
    assert labels["rebasin_dtype"].section == ("rebasin", "Re-Basin Merge")
    assert labels["rebasin_dtype"].category_id == "sd"
    assert webui.shared.opts.rebasin_dtype == "fp16" and webui.shared.opts.rebasin_device == "default"
    assert labels["rebasin_device"].component_args()["choices"][:2] == ["default", "cpu"]
    assert labels["rebasin_permutation_cache"].default == ""
    assert labels["rebasin_permutation_cache_limit_mb"].default == 1024
    # the cache's default folder: beside the checkpoint folder (which the webui lists recursively), not in it
    cache = Path(webui.host.permutation_cache_dir())
    assert cache == webui.models.parent / "rebasin-cache"
    assert str(cache) in labels["rebasin_permutation_cache"].comment_after
    # titles (A1111: 'name [shorthash]' once hashed) vs names (Forge) in our dropdowns, as in the webui's own
    if webui.flavor == "a1111":
        assert _titles(webui) == ["sub/base.safetensors [1234567890]", "sub/tune.safetensors"]
    else:
        assert _titles(webui) == ["sub/base.safetensors", "sub/tune.safetensors"]


def test_merge_runs_in_the_webui_queue_and_writes_the_formula(webui):
    webui.build_ui()
    a, b = _titles(webui)
    merge = handler(webui.demo, "merge")
    progress = ProgressRecorder()
    path_out, html = merge(progress, *webui.values(a, b, multiplier=2.5, output_name="amp test"))
    out = webui.models / "amp test.safetensors"
    assert path_out == str(out) and out.is_file()
    assert "amp test.safetensors" in html and "Time taken" in html  # wrap_gradio_gpu_call appended its timing
    assert webui.shared.state.began == [None]  # one job of the webui, under its queue lock
    assert webui.shared.state.sampling_steps == 1000 and webui.shared.state.sampling_step == 1000
    assert progress.calls and progress.calls[-1][0] == 1.0
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    base = read(webui.models / "sub/base.safetensors", key).float()
    tune = read(webui.models / "sub/tune.safetensors", key).float()
    torch.testing.assert_close(read(out, key), base + 2.5 * (tune - base), rtol=1e-6, atol=1e-6)
    # the follow-up event: lists refreshed, Load offered with what the webui's selector wants, XYZ offered
    updates = handler(webui.demo, "after_merge")(path_out, [], a, b)
    new = "amp test.safetensors"
    assert new in updates[0]["choices"] and new in updates[3]["choices"]
    assert updates[4]["visible"] is True and updates[5]["visible"] is True
    assert updates[6] == new
    assert updates[7] == [{"models": [str(webui.models / "sub/base.safetensors"),
                                      str(webui.models / "sub/tune.safetensors")], "result": str(out)}]


def test_a_late_interrupt_says_it_could_not_stop_the_write(webui):
    """Interrupt after the merge's last check (while the file is flushed): the file is complete and kept, and
    the tab says why instead of ignoring the click."""
    webui.build_ui()
    a, b = _titles(webui)
    act_at(webui.host, 1.0, handler(webui.demo, "interrupt"))  # at the last progress report
    path_out, html = handler(webui.demo, "merge")(ProgressRecorder(), *webui.values(a, b, output_name="late"))
    assert path_out == str(webui.models / "late.safetensors") and Path(path_out).is_file()
    assert "Interrupt came too late to stop this merge" in html and "Saved" in html
    updates = handler(webui.demo, "after_merge")(path_out, [], a, b, None, [])
    assert updates[4]["visible"] is True  # the file is the merge's result: Load offers it


def test_load_and_compare_are_withdrawn_when_the_last_merge_wrote_nothing(webui):
    webui.build_ui()
    a, b = _titles(webui)
    start = handler(webui.demo, "starting")()
    assert start[1]["visible"] is False and start[2]["visible"] is False  # hidden while a merge runs
    path_out, _ = handler(webui.demo, "merge")(ProgressRecorder(), *webui.values(a, b, output_name="first"))
    after = handler(webui.demo, "after_merge")
    shown = after(path_out, [], a, b, None, [])
    assert shown[4]["visible"] is True and shown[4]["value"] == "Load first.safetensors" and shown[6] == "first.safetensors"
    failed = handler(webui.demo, "merge")(ProgressRecorder(), *webui.values(a, b, output_name="first"))  # exists
    assert failed[0] is None and "already exists" in failed[1]
    hidden = after(failed[0], shown[7], a, b, None, [])
    assert hidden[4]["visible"] is False and hidden[5]["visible"] is False and hidden[6] == ""
    assert hidden[7] == shown[7]  # the session's earlier result stays in the comparison history


def test_refresh_keeps_the_choice_under_the_webuis_current_title(webui):
    """A1111 titles a file 'name [hash]' once it has hashed it: a choice made before keeps pointing at the file."""
    webui.build_ui()
    a, b = _titles(webui)
    tune = webui.models / "sub/tune.safetensors"
    webui.sd_models.known_sha256[str(tune)] = "fedcba9876543210" * 4
    (webui.models / "sub/gone.safetensors").write_bytes(b"")
    webui.sd_models.list_models()
    gone = next(t for t in _titles(webui) if "gone" in t)
    (webui.models / "sub/gone.safetensors").unlink()
    lists = handler(webui.demo, "refresh")(a, b, gone, [b, gone])
    new_b = "sub/tune.safetensors [fedcba9876]" if webui.flavor == "a1111" else "sub/tune.safetensors"
    assert [update_value(u) for u in lists[:4]] == [a, new_b, None, [new_b]]
    assert lists[0]["choices"] == _titles(webui) and new_b in lists[0]["choices"]


def test_an_empty_models_folder_says_what_to_do(webui):
    for file in webui.models.rglob("*.safetensors"):
        file.unlink()
    webui.sd_models.list_models()
    tab = webui.build_ui()
    components = tab.get_config_file()["components"]
    config = {c["props"].get("elem_id"): c for c in components}
    assert config["rebasin_samples"]["props"]["visible"] is True
    assert config["rebasin_create_samples"]["props"]["visible"] is False  # the webui's folder is the user's
    hint = " ".join(str(c["props"].get("value", "")) for c in components
                    if "No checkpoints" in str(c["props"].get("value", "")))
    assert str(webui.models) in hint and "press ↻" in hint


def test_the_permutation_cache_is_capped_and_cleared_from_the_tab(webui, monkeypatch):
    tab = webui.build_ui()
    a, b = _titles(webui)
    cache = Path(webui.host.permutation_cache_dir())
    cache.mkdir(parents=True)
    for age, name in enumerate(["old", "mid", "new"]):
        path = cache / f"{name}.0123456789abcdef.rebasin-perms"
        path.write_bytes(b"x" * (1 << 20))
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    keep = cache / "notes.txt"
    keep.write_text("not ours")
    webui.shared.opts.rebasin_permutation_cache_limit_mb = 2
    path_out, html = handler(webui.demo, "merge")(ProgressRecorder(), *webui.values(a, b, output_name="capped"))
    assert path_out and "least recently used file(s) were removed" in html
    assert sorted(p.name.split(".")[0] for p in cache.glob("*.rebasin-perms")) == ["mid", "new"]
    info = tab.rebasin_actions.cache_info()
    assert "2 files" in info and "2.00 MiB" in info and str(cache) in info
    cleared = handler(webui.demo, "clear_cache")()
    assert "0 files" in cleared and "Removed 2 files" in cleared
    assert list(cache.iterdir()) == [keep]


def test_interrupt_leaves_no_file_and_uses_the_webui_state(webui):
    webui.build_ui()
    a, b = _titles(webui)
    act_at(webui.host, 0.0, handler(webui.demo, "interrupt"))  # at its first progress report
    path_out, html = handler(webui.demo, "merge")(ProgressRecorder(), *webui.values(a, b, output_name="stopped"))
    assert path_out is None and "Interrupted: no file was written" in html
    assert not (webui.models / "stopped.safetensors").exists() and leftovers(webui.models) == []
    assert webui.shared.state.interrupted is False  # reset by the webui's wrapper after the job
    assert webui.host.interrupt() is False  # nothing of ours is waiting or running any more


def test_errors_are_shown_in_the_tab(webui, monkeypatch):
    webui.build_ui()
    a, b = _titles(webui)
    merge = handler(webui.demo, "merge")
    _, html = merge(ProgressRecorder(), *webui.values(a, "sub/missing.safetensors"))
    assert "class='error'" in html and "missing.safetensors" in html and "not in the webui" in html
    from lib_rebasin import jobs

    def unavailable(request, monitor):
        raise ValueError(f"method {request.method} is not available yet")
    monkeypatch.setattr(jobs, "run", unavailable)
    _, html = merge(ProgressRecorder(), *webui.values(a, b, method="Re-Basin"))
    assert "method rebasin is not available yet" in html
    monkeypatch.setattr(jobs, "run", lambda request, monitor: 1 / 0)  # a bug: the webui's wrapper reports it
    result = merge(ProgressRecorder(), *webui.values(a, b))
    assert result[0] is None and "ZeroDivisionError" in result[-1]
    assert list(webui.models.glob("*.safetensors")) == []


def test_compare_in_xyz_sets_the_checkpoint_axis(webui):
    webui.build_ui()
    a, b = _titles(webui)
    merge = handler(webui.demo, "merge")
    path_out, _ = merge(ProgressRecorder(), *webui.values(a, b, output_name="twice"))
    history = handler(webui.demo, "after_merge")(path_out, [], a, b)[7]
    script, x_type, x_values, x_dropdown = handler(webui.demo, "compare")(a, b, history)
    registry_titles = sorted(webui.sd_models.checkpoints_list, key=str.casefold)
    expected = [webui.sd_models.get_closet_checkpoint_match(n).title for n in (a, b)] + ["twice.safetensors"]
    assert update_value(script) == "X/Y/Z plot" and update_value(x_type) == "Checkpoint name"
    assert update_value(x_values) == ", ".join(expected)
    assert x_dropdown["value"] == expected and x_dropdown["choices"] == registry_titles
    assert set(expected) <= set(webui.sd_models.checkpoints_list)  # values the built-in axis accepts


def _request(webui, device: str):
    from lib_rebasin import jobs
    files = [str(webui.models / "sub/base.safetensors"), str(webui.models / "sub/tune.safetensors")]
    return jobs.MergeRequest(method="amp", models=files, output="", device=device)


def _loaded(webui, name: str):
    """A loaded model of the webui's kind, from the registry entry `name`, on the CPU."""
    info = webui.sd_models.get_closet_checkpoint_match(name)
    if webui.flavor == "forge":
        webui.sd_models.model_data.forge_loading_parameters = {"checkpoint_info": info}
        model, _ = webui.sd_models.forge_model_reload()
        return model
    return webui.sd_models.load_model(info)


def test_a_merge_short_of_ram_unloads_the_webuis_model_and_loads_it_again(webui, monkeypatch):
    """Not enough RAM beside the loaded model for a CPU merge: the webui's own unloading makes room while the
    merge runs, its own loading brings the same checkpoint back, and the result says so."""
    webui.build_ui()
    a, b = _titles(webui)
    model = _loaded(webui, a)
    data = webui.sd_models.model_data
    need = sum(os.path.getsize(webui.models / f"sub/{n}.safetensors") for n in ("base", "tune")) + (1 << 30)
    during = {}
    if webui.flavor == "forge":
        from backend import memory_management
        monkeypatch.setitem(memory_management.free_bytes, "cpu", need - 1)
        act_at(webui.host, 0.0, lambda: during.update(model=data.sd_model, hash=data.forge_hash,
                                                      calls=list(memory_management.calls)))
    else:
        from lib_rebasin.host import memory
        monkeypatch.setattr(memory, "available_ram", lambda: need - 1)
        act_at(webui.host, 0.0, lambda: during.update(model=data.sd_model, kept=list(data.loaded_sd_models)))
    progress = ProgressRecorder()
    path_out, html = handler(webui.demo, "merge")(progress, *webui.values(a, b, output_name="roomy"))
    assert path_out == str(webui.models / "roomy.safetensors")
    assert "was unloaded to make room in RAM" in html and "loaded again afterwards" in html
    said = [desc for _, desc in progress.calls]
    assert said[0].startswith("unloading the webui's model: ") and said[-1].startswith("loading the webui's model")
    if webui.flavor == "forge":
        assert isinstance(during["model"], webui.sd_models.FakeInitialModel) and during["hash"] == ""
        assert "unload_all_models" in during["calls"]
        assert memory_management.calls[-1] == "forge_model_reload"
    else:
        assert during == {"model": None, "kept": []} and model.device == "meta"
        assert webui.sd_models.loads[-1] is model.sd_checkpoint_info
    assert data.sd_model is not model and data.sd_model.sd_checkpoint_info is model.sd_checkpoint_info


@pytest.mark.parametrize("webui", [pytest.param("a1111", marks=A1111)], indirect=True)
def test_a_merge_waits_for_the_webuis_first_model_load_before_judging_memory(webui, monkeypatch):
    """A1111 loads its model at startup in a thread: a merge started meanwhile waits for that load, then makes
    room, instead of running beside a model that is still being built."""
    from lib_rebasin.host import memory
    webui.build_ui()
    a, b = _titles(webui)
    data = webui.sd_models.model_data
    monkeypatch.setattr(memory, "available_ram", lambda: 1)
    data.lock.acquire()

    def startup_load():
        time.sleep(1.0)
        webui.sd_models.load_model(webui.sd_models.get_closet_checkpoint_match(a))
        data.lock.release()
    loader = threading.Thread(target=startup_load)
    loader.start()
    progress = ProgressRecorder()
    path_out, html = handler(webui.demo, "merge")(progress, *webui.values(a, b, output_name="waited"))
    loader.join()
    assert path_out and "was unloaded to make room in RAM" in html
    assert progress.calls[0][1] == "waiting for the webui to finish loading its model"
    assert len(webui.sd_models.loads) == 2  # the startup load, and the load after the merge


def test_with_room_to_spare_the_model_stays(webui, monkeypatch):
    webui.build_ui()
    a, b = _titles(webui)
    model = _loaded(webui, a)
    if webui.flavor == "a1111":
        from lib_rebasin.host import memory
        monkeypatch.setattr(memory, "available_ram", lambda: 64 << 30)
    path_out, html = handler(webui.demo, "merge")(ProgressRecorder(), *webui.values(a, b, output_name="spare"))
    assert path_out and "unloaded" not in html
    assert webui.sd_models.model_data.sd_model is model


def test_a_failed_reload_is_reported_not_raised(webui, monkeypatch):
    webui.build_ui()
    a, b = _titles(webui)
    _loaded(webui, a)
    from lib_rebasin.host import memory

    def broken(*args, **kwargs):
        raise FileNotFoundError("the checkpoint is gone")
    if webui.flavor == "forge":
        from backend import memory_management
        monkeypatch.setitem(memory_management.free_bytes, "cpu", 1)
        monkeypatch.setattr(webui.sd_models, "forge_model_reload", broken)
    else:
        monkeypatch.setattr(memory, "available_ram", lambda: 1)
        monkeypatch.setattr(webui.sd_models, "load_model", broken)
    path_out, html = handler(webui.demo, "merge")(ProgressRecorder(), *webui.values(a, b, output_name="after"))
    assert path_out and "loading it again failed (FileNotFoundError: the checkpoint is gone)" in html
    if webui.flavor == "a1111":  # the webui's lazy loading tries again at the next use of the model
        assert webui.sd_models.model_data.was_loaded_at_least_once is False
    else:  # Forge loads the selected checkpoint at the next generation
        assert webui.sd_models.model_data.forge_hash == ""


def test_vram_is_freed_for_gpu_work_when_short_and_given_back(webui, monkeypatch):
    from lib_rebasin.host import a1111
    request = _request(webui, "cuda")
    if webui.flavor == "forge":
        from backend import memory_management
        model = _loaded(webui, _titles(webui)[0])
        on_gpu = [SimpleNamespace(model=model, device=torch.device("cuda"))]
        monkeypatch.setattr(memory_management, "current_loaded_models", on_gpu)
        with webui.host.room_for(request) as freed:
            assert freed is None  # 24 GB free: nothing to do
        monkeypatch.setitem(memory_management.free_bytes, "cuda", 1 << 30)
        with webui.host.room_for(request) as freed:
            assert freed.memory == "VRAM" and memory_management.calls[-2:] == ["unload_all_models",
                                                                               "soft_empty_cache"]
        assert memory_management.calls[-1] == ("load_models_gpu", [model]) and freed.restored
        return
    model = webui.sd_models.FakeModel("cuda")
    webui.sd_models.model_data.sd_model = model
    webui.devices.device = torch.device("cuda")
    monkeypatch.setattr(a1111, "_free_vram", lambda device: 20 << 30)
    with webui.host.room_for(request) as freed:
        assert freed is None
    monkeypatch.setattr(a1111, "_free_vram", lambda device: 1 << 30)
    with webui.host.room_for(request) as freed:
        moved = list(model.moves)
    with webui.host.room_for(_request(webui, "cpu")):  # a CPU job does not need the VRAM
        pass
    assert moved == ["cpu"] and model.moves == ["cpu", "cuda"] and freed.restored


def test_without_the_gradio_queue_the_handler_takes_no_progress(webui):
    webui.shared.cmd_opts.no_gradio_queue = True  # A1111 --no-gradio-queue: gr.Progress would kill the launch
    webui.build_ui()
    merge = handler(webui.demo, "merge")
    assert not any(isinstance(p.default, gr.Progress) for p in inspect.signature(merge).parameters.values())
    a, b = _titles(webui)
    path_out, _ = merge(*webui.values(a, b, output_name="plain"))
    assert Path(path_out).is_file()


def test_the_queue_lock_is_never_taken_twice(webui):
    """A REST job from another thread waits for the tab's job (which holds the webui's queue lock) instead of
    deadlocking or overlapping it; the stand-in lock raises if one thread takes it twice."""
    webui.build_ui()
    a, b = _titles(webui)
    seen = {}
    out = webui.models / "first.safetensors"

    def rest_job(monitor):
        seen["tab output existed"] = out.exists()

    def at_start():
        seen["thread"] = threading.Thread(target=lambda: webui.host.run_job("rest", rest_job))
        seen["thread"].start()
    act_at(webui.host, 0.0, at_start)
    path_out, _ = handler(webui.demo, "merge")(ProgressRecorder(), *webui.values(a, b, output_name="first"))
    seen["thread"].join(timeout=60)
    assert path_out == str(out) and seen["tab output existed"] is True
    assert webui.shared.state.began == [None, "rest"]


def test_rest_routes_follow_api_and_api_auth(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    assert not [r for r in app.routes if getattr(r, "path", "").startswith("/rebasin")]  # no --api: no routes
    webui.shared.cmd_opts.api, webui.shared.cmd_opts.api_auth = True, "u:p"
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get("/rebasin/v1/checkpoints").status_code == 401
    listed = client.get("/rebasin/v1/checkpoints", auth=("u", "p")).json()
    assert listed["checkpoints"] == _titles(webui) and listed["models_dir"] == str(webui.models)
    response = client.post("/rebasin/v1/merge", auth=("u", "p"),
                           json={"method": "amp", "models": [_titles(webui)[0], "sub/other.safetensors"]})
    assert response.status_code == 422 and "not in the webui's checkpoint list" in response.json()["detail"]
