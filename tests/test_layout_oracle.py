"""Our SGM key layout, checked by outside references: diffusers' single-file converters must turn it into
diffusers/transformers models that load strictly (full scale on the meta device, tiny scale with weights and
a forward pass), and sd-mecha's SDXL key table must list the same keys and shapes."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

from lib_rebasin.checkpoint import Checkpoint
from lib_rebasin.config import SCALES, sdxl_preset
from lib_rebasin.layout import CLIP_G, CLIP_L, UNET, sdxl_shapes
from oracle import (meta_state_dict, oracle_config, random_inputs, relative_error, sdxl_outputs, sgm_original_config,
                    single_thread, to_diffusers)


@pytest.mark.parametrize("scale", SCALES)
def test_layout_converts_and_loads_strictly_on_the_meta_device(scale):
    config = oracle_config(scale)
    models = to_diffusers(meta_state_dict(config), config, device="meta")  # raises on any missing/extra key
    ours = {k: s for k, s in sdxl_shapes(config).items() if k.startswith((UNET, CLIP_L, CLIP_G))}
    loaded = sum(p.numel() for m in (models.unet, models.clip_l, models.clip_g) for p in m.parameters())
    position_ids = config.clip_l.positions  # a buffer in transformers, not a parameter
    assert loaded == sum(torch.Size(s).numel() for s in ours.values()) - position_ids - 1  # - logit_scale


def test_diffusers_reads_our_full_scale_config_as_sdxl():
    config = create_unet_diffusers_config_from_ldm(sgm_original_config(sdxl_preset("full").unet), {})
    assert config["addition_embed_type"] == "text_time" and config["addition_time_embed_dim"] == 256
    assert config["projection_class_embeddings_input_dim"] == 2816 and config["cross_attention_dim"] == 2048
    assert config["block_out_channels"] == [320, 640, 1280] and config["attention_head_dim"] == [5, 10, 20]
    assert config["transformer_layers_per_block"] == [0, 2, 10] and config["use_linear_projection"]
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]


def test_tiny_synthetic_checkpoint_runs_in_diffusers(tiny_a):
    """The synthetic file itself (fp16, with marker keys): converted, loaded strictly, run in fp64; the
    prompt and the size conditioning both reach the output."""
    config = oracle_config("tiny")
    with Checkpoint(tiny_a) as checkpoint:
        state = {k: checkpoint.get(k) for k in checkpoint.keys() if k.startswith((UNET, CLIP_L, CLIP_G))}
    state = {k: t.to(torch.float64) if t.is_floating_point() else t for k, t in state.items()}
    inputs = random_inputs(config, seed=0)
    with single_thread():
        models = to_diffusers(state, config)
        out = sdxl_outputs(models, inputs)
        other_prompt = sdxl_outputs(models, replace(inputs, tokens=random_inputs(config, seed=1).tokens))
        other_size = sdxl_outputs(models, replace(inputs, time_ids=inputs.time_ids.flip(0)))
    noise = out["noise"]
    assert noise.shape == inputs.latents.shape and torch.isfinite(noise).all() and noise.std() > 0.1
    assert relative_error(noise, other_prompt["noise"]) > 1e-3
    assert relative_error(noise, other_size["noise"]) > 1e-3


def sd_mecha_sdxl_table() -> Path | None:
    spec = importlib.util.find_spec("sd_mecha")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "extensions/builtin/model_configs/sdxl-sgm.yaml"
    return path if path.is_file() else None


@pytest.mark.skipif(sd_mecha_sdxl_table() is None, reason="sd-mecha is not installed")
def test_full_scale_keys_and_shapes_match_sd_mecha():
    import yaml
    table = yaml.safe_load(sd_mecha_sdxl_table().read_text())
    entries = {k: v for component in table["components"].values() for k, v in component.items()}
    required = {k for k, v in entries.items() if not v.get("optional")}
    ours = sdxl_shapes(sdxl_preset("full"))
    assert required <= set(ours), sorted(required - set(ours))[:5]
    assert set(ours) <= set(entries), sorted(set(ours) - set(entries))[:5]
    wrong = [k for k, s in ours.items() if tuple(entries[k]["shape"]) != s]
    assert not wrong, wrong[:5]
