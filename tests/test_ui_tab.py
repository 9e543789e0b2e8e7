"""The tab over the standalone host, under whichever Gradio is installed (3.41, 4.40 or current): it builds,
its form reacts to the method, and its handlers merge, interrupt, report errors and create sample checkpoints."""
from __future__ import annotations

import inspect
import os

import pytest
import torch

gr = pytest.importorskip("gradio")
from lib_rebasin import jobs  # noqa: E402
from lib_rebasin.host.standalone import SAMPLE_NAMES, StandaloneHost  # noqa: E402
from lib_rebasin.ui.tab import RECIPE_FIELDS, ThrottledProgress, build_tab, progress_text  # noqa: E402
from ui_support import ProgressRecorder, act_at, copy_models, handler, leftovers, read, update_value  # noqa: E402


@pytest.fixture
def models(tmp_path, tiny_a, tiny_b):
    folder = tmp_path / "models"
    copy_models({"a.safetensors": tiny_a, "b.safetensors": tiny_b}, folder)
    return folder


def values(**overrides) -> list:
    v = dict(method="Amplified difference", model_a="a.safetensors", model_b="b.safetensors", model_c=None,
             models_many=[], multiplier=2.0, alpha=0.5, seed=0, source_unet="merge", source_clip_l="merge",
             source_clip_g="merge", source_vae="A", source_other="A", vae="None", dtype="fp16", device="cpu",
             output_name="", overwrite=False, compute="fp32", clamp=False, allow_nonfinite=False)
    v.update(overrides)
    return [v[name] for name in RECIPE_FIELDS]


def test_the_tab_builds_and_serialises(models):
    tab = build_tab(StandaloneHost(str(models)))
    config = tab.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"rebasin_method", "rebasin_model_a", "rebasin_model_b", "rebasin_merge", "rebasin_interrupt",
            "rebasin_result", "rebasin_output_name", "rebasin_device"} <= ids
    merge = handler(tab, "merge")
    assert any(isinstance(p.default, gr.Progress) for p in inspect.signature(merge).parameters.values())


def test_the_form_follows_the_method(models):
    actions = build_tab(StandaloneHost(str(models))).rebasin_actions
    a, b, c, many, m, alpha, seed = actions.method_changed("Add difference")
    assert (a["visible"], b["visible"], c["visible"], many["visible"]) == (True, True, True, False)
    assert (m["visible"], alpha["visible"], seed["visible"]) == (True, False, False)
    a, b, c, many, m, alpha, seed = actions.method_changed("MergeMany")
    assert (a["visible"], b["visible"], c["visible"], many["visible"]) == (False, False, False, True)
    assert (m["visible"], alpha["visible"], seed["visible"]) == (False, False, True)
    card, name = actions.preview(*values(multiplier=1.5))
    assert "A + 1.5·(B − A)" in card and "a.safetensors" in card and "b.safetensors" in card
    assert name["placeholder"] == "amp_M1.5_a_b.safetensors"
    card, name = actions.preview(*values(method="Weighted sum", alpha=0.3, output_name="mine"))
    assert "(1 − 0.3)·A + 0.3·B" in card and "→" not in card


def test_merge_writes_the_result_and_refreshes_the_lists(models):
    tab = build_tab(StandaloneHost(str(models)))
    progress = ProgressRecorder()
    path_out, html = handler(tab, "merge")(progress, *values(multiplier=-0.5, dtype="fp32"))
    out = models / "amp_M-0.5_a_b.safetensors"
    assert path_out == str(out) and "amp_M-0.5_a_b.safetensors" in html and "class='rebasin-result'" in html
    assert [f for f, _ in progress.calls] == sorted(f for f, _ in progress.calls) and progress.calls[-1][0] == 1.0
    key = "first_stage_model.encoder.conv_in.weight"  # VAE comes from A by default
    assert torch.equal(read(out, key), read(models / "a.safetensors", key).float())
    key = "model.diffusion_model.out.2.weight"
    a, b = read(models / "a.safetensors", key).float(), read(models / "b.safetensors", key).float()
    torch.testing.assert_close(read(out, key), a - 0.5 * (b - a), rtol=1e-6, atol=1e-6)
    lists = handler(tab, "after_merge")(path_out, [], "a.safetensors", "b.safetensors")
    assert lists[0]["choices"] == ["a.safetensors", "amp_M-0.5_a_b.safetensors", "b.safetensors"]
    assert update_value(lists[4]) is None or lists[4].get("visible") is False  # standalone: nothing to load
    again = handler(tab, "merge")(ProgressRecorder(), *values(multiplier=-0.5, dtype="fp32"))
    assert again[0] is None and "already exists" in again[1]


def test_interrupt_stops_the_merge_and_leaves_nothing(models):
    host = StandaloneHost(str(models))
    tab = build_tab(host)
    act_at(host, 0.0, handler(tab, "interrupt"))  # at its first progress report
    path_out, html = handler(tab, "merge")(ProgressRecorder(), *values(output_name="stopped"))
    assert path_out is None and "Interrupted: no file was written." in html
    assert sorted(os.listdir(models)) == ["a.safetensors", "b.safetensors"] and leftovers(models) == []
    path_out, _ = handler(tab, "merge")(ProgressRecorder(), *values(output_name="next"))  # the next run is clean
    assert path_out == str(models / "next.safetensors")


def test_errors_appear_in_the_result_box(models, monkeypatch):
    tab = build_tab(StandaloneHost(str(models)))
    merge = handler(tab, "merge")
    assert "needs model B" in merge(ProgressRecorder(), *values(model_b=None))[1]
    monkeypatch.setattr(jobs, "run", lambda request, monitor: (_ for _ in ()).throw(
        ValueError(f"method {request.method} is not available yet")))
    path_out, html = merge(ProgressRecorder(), *values(method="BasinSum"))
    assert path_out is None and "class='error'" in html and "method basin-sum is not available yet" in html
    monkeypatch.setattr(jobs, "run", lambda request, monitor: [][1])
    path_out, html = merge(ProgressRecorder(), *values())
    assert path_out is None and "IndexError" in html


def test_an_empty_folder_offers_synthetic_checkpoints(tmp_path):
    models = tmp_path / "empty"
    models.mkdir()
    host = StandaloneHost(str(models))
    host.sample_scale = "tiny"
    tab = build_tab(host)
    samples = next(c for c in tab.get_config_file()["components"] if c["props"].get("elem_id") == "rebasin_samples")
    assert samples["props"]["visible"] is True
    created, html = handler(tab, "create_samples")(ProgressRecorder())
    assert [os.path.basename(p) for p in created] == list(SAMPLE_NAMES) and "Created" in html
    a, b, c, many, group = handler(tab, "after_samples")(created)
    assert (a["value"], b["value"], many["value"]) == (SAMPLE_NAMES[0], SAMPLE_NAMES[1], list(SAMPLE_NAMES))
    assert group["visible"] is False and a["choices"] == list(SAMPLE_NAMES)
    base = read(models / SAMPLE_NAMES[0], "model.diffusion_model.out.2.weight").float()
    tune = read(models / SAMPLE_NAMES[1], "model.diffusion_model.out.2.weight").float()
    assert 0 < (tune - base).norm() < 0.2 * base.norm()  # a fine-tune of the base, not a copy or a stranger
    *_, group, cache_line = handler(tab, "refresh")()
    assert group["visible"] is False and "Permutation cache: 0 files" in cache_line


def test_progress_text_keeps_the_phase_and_cuts_from_the_right():
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    assert progress_text(key, limit=80) == "writing: UNet middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    long = progress_text(f"certification pass: {key}", limit=48)
    assert long == "certification pass: UNet middle_block.1.transfo…" and len(long) == 48
    clip = "conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_weight"
    assert progress_text(clip, limit=80) == "writing: CLIP-G transformer.resblocks.7.attn.in_proj_weight"
    assert progress_text("flushing to disk") == "flushing to disk"
    assert progress_text("sweep 3: unet.output_blocks.2") == "sweep 3: unet.output_blocks.2"


def test_the_time_left_comes_from_this_jobs_own_pace():
    now = [100.0]
    calls = []
    progress = ThrottledProgress(lambda f, desc: calls.append((f, desc)), clock=lambda: now[0])
    progress(0.01, "flushing to disk")
    now[0] += 30
    progress(0.25, "model.diffusion_model.out.2.weight")  # 30 s for a quarter: 90 s to go
    now[0] += 0.1
    progress(0.26, "model.diffusion_model.out.2.bias")    # throttled
    now[0] += 60
    progress(1.0, "flushing to disk")
    assert calls == [(0.01, "flushing to disk"),
                     (0.25, "writing: UNet out.2.weight · about 2 min left"),
                     (1.0, "flushing to disk")]
