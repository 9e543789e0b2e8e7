"""Synthetic checkpoints and the foundation CLI (make-synthetic, inspect)."""
from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from lib_rebasin.checkpoint import Checkpoint, save_state_dict
from lib_rebasin.cli import main
from lib_rebasin.config import sdxl_preset
from lib_rebasin.layout import CLIP_G, CLIP_L, UNET, sdxl_shapes
from sd_shapes import sd15_shapes


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_prints_every_full_scale_key_without_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "make-synthetic", "--scale", "full", "--list")
    assert code == 0 and list(tmp_path.iterdir()) == []
    listed = json.loads(out)
    expected = sdxl_shapes(sdxl_preset("full"))
    assert {k: tuple(v) for k, v in listed.items()} == expected
    assert sum(math.prod(v) for v in listed.values()) == 3_468_837_945


def test_synthetic_has_real_world_quirks(tiny_a):
    tensors = safetensors.torch.load_file(tiny_a)
    position_ids = tensors[CLIP_L + "embeddings.position_ids"]
    assert position_ids.dtype == torch.int64 and torch.equal(position_ids, torch.arange(77)[None])
    assert tensors[CLIP_G + "logit_scale"].item() == pytest.approx(math.log(100), rel=1e-3)
    assert tensors["v_pred"].numel() == 0 and tensors["ztsnr"].numel() == 0
    floats = [k for k, t in tensors.items() if t.is_floating_point()]
    assert all(tensors[k].dtype == torch.float16 for k in floats)


def test_synthetic_weights_have_realistic_magnitude(tiny_a):
    with Checkpoint(tiny_a) as ckpt:
        proj = ckpt.get(UNET + "input_blocks.4.1.proj_in.weight").float()
        assert proj.std().item() == pytest.approx(1 / math.sqrt(proj.shape[1]), rel=0.1)
        norm = ckpt.get(UNET + "input_blocks.4.1.transformer_blocks.0.norm1.weight").float()
        assert norm.mean().item() == pytest.approx(1.0, abs=0.1)
        bias = ckpt.get(UNET + "input_blocks.4.1.proj_in.bias").float()
        assert abs(bias.mean().item()) < 0.1 and 0.1 < bias.std().item() < 0.3
        assert all(torch.isfinite(ckpt.get(k).float()).all() for k in ckpt.keys())


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    from lib_rebasin.synthetic import write_synthetic
    a = write_synthetic(tmp_path / "a.safetensors", scale="tiny", seed=5)
    b = write_synthetic(tmp_path / "b.safetensors", scale="tiny", seed=5)
    c = write_synthetic(tmp_path / "c.safetensors", scale="tiny", seed=6)
    ta, tb, tc = (safetensors.torch.load_file(p) for p in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    key = UNET + "out.2.weight"
    assert not torch.equal(ta[key], tc[key])


def test_fine_tune_variant_drifts_by_the_asked_amount(tiny_a, tiny_b):
    a, b = safetensors.torch.load_file(tiny_a), safetensors.torch.load_file(tiny_b)
    assert a.keys() == b.keys()
    key = UNET + "middle_block.1.proj_in.weight"
    drift = (b[key].double() - a[key].double()).norm() / a[key].double().norm()
    assert drift.item() == pytest.approx(0.01, rel=0.05)
    assert torch.equal(a[CLIP_L + "embeddings.position_ids"], b[CLIP_L + "embeddings.position_ids"])


def test_a_fine_tune_describes_itself_not_its_base(tiny_a, tiny_b):
    with Checkpoint(tiny_a) as a, Checkpoint(tiny_b) as b:
        assert "(seed 1)" in a.metadata["modelspec.description"]
        described = b.metadata["modelspec.description"]
        assert b.metadata["modelspec.title"] == "tiny_b"
    assert "seed 2" in described and "seed 1" not in described and "fine-tune of tiny_a" in described


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_and_unet_only(tmp_path, capsys, dtype, torch_dtype):
    out = tmp_path / "u.safetensors"
    code, _, _ = run_cli(capsys, "make-synthetic", str(out), "--scale", "tiny", "--dtype", dtype, "--unet-only")
    assert code == 0
    with Checkpoint(out) as ckpt:
        assert all(k.startswith(UNET) for k in ckpt.keys())
        assert {i.dtype for i in ckpt.infos.values()} == {torch_dtype}
    code, text, _ = run_cli(capsys, "inspect", str(out), "--json")
    info = json.loads(text)
    assert info["architecture"] == "sdxl-base" and list(info["components"]) == ["unet"]


def test_inspect_reports_anatomy(tiny_a, capsys):
    code, text, _ = run_cli(capsys, "inspect", tiny_a, "--json")
    info = json.loads(text)
    assert code == 0 and info["architecture_label"] == "SDXL base"
    assert {c: v["keys"] for c, v in info["components"].items()} == {
        "unet": 600, "clip_l": 37, "clip_g": 30, "vae": 248, "other": 2}
    assert info["components"]["clip_l"]["dtypes"] == {"float16": 36, "int64": 1}
    assert info["config"]["unet"]["model_channels"] == 64
    assert info["metadata"]["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    code, text, _ = run_cli(capsys, "inspect", tiny_a)
    assert "SDXL base" in text and "CLIP-G" in text and "v_pred" in text


def test_inspect_says_sd1_for_an_sd15_shaped_file(tmp_path, capsys):
    path = save_state_dict(tmp_path / "sd15.safetensors",
                           {k: torch.zeros(s, dtype=torch.float16) for k, s in sd15_shapes().items()})
    code, text, _ = run_cli(capsys, "inspect", str(path))
    assert code == 0 and "SD1.x" in text


def test_cli_errors_are_clear_and_write_nothing(tmp_path, capsys, tiny_a):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, "make-synthetic", tiny_a, "--scale", "tiny")
    assert code == 2 and "already exists" in err


@pytest.mark.slow
def test_full_scale_synthetic_inspects_as_sdxl(tmp_path, capsys):
    out = tmp_path / "full.safetensors"
    assert run_cli(capsys, "make-synthetic", str(out), "--markers")[0] == 0
    code, text, _ = run_cli(capsys, "inspect", str(out), "--json")
    info = json.loads(text)
    assert info["architecture"] == "sdxl-base" and info["keys"] == 2517
    assert {c: v["keys"] for c, v in info["components"].items()} == {
        "unet": 1680, "clip_l": 197, "clip_g": 390, "vae": 248, "other": 2}
    assert 6.8e9 < out.stat().st_size < 7.0e9
    assert info["config"]["unet"]["transformer_depth"] == [0, 2, 10]
