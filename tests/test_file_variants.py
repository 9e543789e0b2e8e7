"""Every kind of SDXL file people have, as make-synthetic imitates it, read by anatomy and `inspect`.

Expectations come from the published architectures (the refiner's widths, an inpainting UNet's 9 input
channels) and from the variant's definition (which keys a pruned file lacks), not from our own derivation.
"""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lib_rebasin.anatomy import (SDXL_BASE, SDXL_REFINER, STANDALONE_VAE, analyse, ema_key, key_kind,
                                  prediction_type)
from lib_rebasin.checkpoint import Checkpoint
from lib_rebasin.cli import main
from lib_rebasin.config import REFINER, sdxl_preset
from lib_rebasin.layout import CLIP_G_REFINER, CLIP_L, UNET, VAE, sdxl_shapes
from lib_rebasin.synthetic import VARIANTS, parse_variants, synthetic_shapes, write_synthetic

CLIP_G = "conditioner.embedders.1.model."


def inspect_json(capsys, path) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def variant_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variant-files")
    return {name: write_synthetic(folder / f"{name}.safetensors", scale="tiny", seed=3, variants=name)
            for name in VARIANTS}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inspect_reads_every_variant(variant_files, capsys, name):
    info = inspect_json(capsys, variant_files[name])
    expected = STANDALONE_VAE if name == "vae-only" else SDXL_REFINER if name == "refiner" else SDXL_BASE
    assert info["architecture"] == expected
    assert name == "vae-only" or info["config"] is not None, info["config_error"]
    assert main(["inspect", str(variant_files[name])]) == 0  # the text form too
    capsys.readouterr()


def test_full_size_variants_have_the_published_key_counts():
    base = synthetic_shapes("full")
    # CLIP-L layer 11 (16 keys) and CLIP-G resblock 31 (12 keys) pruned
    assert len(base) - len(synthetic_shapes("full", variants="pruned")) == 16 + 12
    # position_ids, final_layer_norm ×2, ln_final ×2, text_projection, logit_scale
    assert len(base) - len(synthetic_shapes("full", variants="no-optional")) == 7
    refiner = synthetic_shapes("full", variants="refiner")
    assert refiner[UNET + "input_blocks.0.0.weight"] == [384, 4, 3, 3]
    assert refiner[UNET + "label_emb.0.0.weight"] == [1536, 2560]
    assert refiner[CLIP_G_REFINER + "transformer.resblocks.31.attn.in_proj_weight"] == [3840, 1280]
    assert not any(k.startswith((CLIP_L, CLIP_G)) for k in refiner)
    inpaint = synthetic_shapes("full", variants="inpaint")
    assert inpaint[UNET + "input_blocks.0.0.weight"] == [320, 9, 3, 3] and inpaint[UNET + "out.2.weight"][0] == 4


def test_pruned_and_optional_keys_are_recognised_not_refused(variant_files):
    with Checkpoint(variant_files["pruned"]) as ckpt:
        anatomy = analyse(ckpt.shapes)
    assert anatomy.config == sdxl_preset("tiny")  # the full depth: the last layer is absent, not missing
    assert {n for n in anatomy.absent.values()} == {"CLIP-L layer 1", "CLIP-G resblock 1"}
    with Checkpoint(variant_files["no-optional"]) as ckpt:
        anatomy = analyse(ckpt.shapes)
    assert anatomy.config == sdxl_preset("tiny")
    assert CLIP_L + "final_layer_norm.weight" in anatomy.absent and CLIP_G + "text_projection" in anatomy.absent


def test_a_partly_pruned_layer_is_refused_with_a_reason():
    shapes = sdxl_shapes(sdxl_preset("tiny"))
    del shapes[CLIP_L + "encoder.layers.1.mlp.fc1.weight"]
    anatomy = analyse(shapes)
    assert anatomy.config is None and "CLIP-L layer 1 only in part" in anatomy.config_error


def test_a_partial_vae_is_reported_not_a_crash(variant_files, capsys):
    info = inspect_json(capsys, variant_files["partial-vae"])
    assert info["vae"] == "partial" and info["components"]["vae"]["keys"] == 4
    assert any("partial VAE" in note for note in info["notes"])
    assert info["config"]["vae"] is None and info["config"]["unet"]["model_channels"] == 64


def test_standalone_vae_and_vae_less_files(variant_files, capsys):
    info = inspect_json(capsys, variant_files["vae-only"])
    assert info["vae"] == "complete" and info["components"] == {"vae": info["components"]["vae"]}
    assert all(not k.startswith(VAE) for k in safetensors.torch.load_file(variant_files["vae-only"]))
    info = inspect_json(capsys, variant_files["no-vae"])
    assert info["vae"] == "none" and "no VAE" in info["notes"]


def test_markers_ema_and_schedule_are_classified(variant_files):
    tensors = safetensors.torch.load_file(variant_files["ema"])
    assert torch.equal(tensors[ema_key(UNET + "out.2.weight")], tensors[UNET + "out.2.weight"])
    assert ema_key(UNET + "out.2.weight") == "model_ema.diffusion_modelout2weight"  # LDM's naming
    assert key_kind("model_ema.decay") == "ema" and key_kind("v_pred") == "marker"
    assert key_kind("alphas_cumprod") == key_kind(CLIP_L + "embeddings.position_ids") == "buffer"
    assert prediction_type(["v_pred", "ztsnr"]) == "v-prediction, zero terminal SNR"
    assert prediction_type([UNET + "out.2.weight"]) == "epsilon"
    schedule = safetensors.torch.load_file(variant_files["schedule"])
    alphas = schedule["alphas_cumprod"].double()
    assert schedule["alphas_cumprod"].dtype == torch.float32
    # SD's published schedule: scaled linear betas 0.00085 .. 0.012 over 1000 steps
    assert alphas[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert alphas[-1].item() == pytest.approx(0.00466, rel=1e-2)


def test_storage_dtypes(tmp_path):
    for name, dtype in (("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2),
                        ("bf16", torch.bfloat16)):
        out = tmp_path / f"{name}.safetensors"
        assert main(["make-synthetic", str(out), "--scale", "tiny", "--dtype", name]) == 0
        with Checkpoint(out) as ckpt:
            floats = {i.dtype for k, i in ckpt.infos.items() if i.dtype.is_floating_point}
            assert floats == {dtype}
            assert analyse(ckpt.shapes).config == sdxl_preset("tiny")
    mixed = tmp_path / "mixed.safetensors"
    write_synthetic(mixed, scale="tiny", variants="mixed-dtype", dtype=torch.float8_e5m2)
    with Checkpoint(mixed) as ckpt:
        assert {ckpt.infos[k].dtype for k in ckpt.keys() if k.startswith(UNET)} == {torch.float8_e5m2}
        assert ckpt.infos[CLIP_G + "text_projection"].dtype == torch.float32
        assert ckpt.infos[VAE + "decoder.conv_in.weight"].dtype == torch.bfloat16


def test_variants_compose_and_conflicts_are_refused(tmp_path):
    assert parse_variants(["refiner,pruned", "no-vae"]) == ("refiner", "pruned", "no-vae")
    with pytest.raises(ValueError, match="exclude"):
        parse_variants("no-vae,partial-vae")
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variants("pony")
    shapes = synthetic_shapes("tiny", variants="refiner,pruned,no-vae")
    anatomy = analyse({k: tuple(v) for k, v in shapes.items()})
    assert anatomy.architecture == SDXL_REFINER and anatomy.config.kind == REFINER and anatomy.vae == "none"
    assert {n for n in anatomy.absent.values()} == {"CLIP-G resblock 1"}


def test_variants_of_an_existing_file(tmp_path, tiny_a):
    out = write_synthetic(tmp_path / "b.safetensors", base=tiny_a, seed=2, drift=0.01,
                          variants="pruned,no-optional,ema")
    with Checkpoint(tiny_a) as a, Checkpoint(out) as b:
        anatomy = analyse(b.shapes)
        assert anatomy.config == analyse(a.shapes).config
        assert len(anatomy.absent) == 7 + 16 + 12  # optional keys, CLIP-L layer 1, CLIP-G resblock 1
        key = UNET + "out.2.weight"
        assert torch.equal(b.get(ema_key(key)), b.get(key)) and not torch.equal(b.get(key), a.get(key))
        assert torch.equal(b.get("v_pred"), a.get("v_pred"))  # tiny_a's markers are kept
    with pytest.raises(ValueError, match="new model"):
        write_synthetic(tmp_path / "c.safetensors", base=tiny_a, variants="refiner")
