"""The outside oracle: our SGM-layout state dicts run through diffusers' and transformers' own models.

diffusers' single-file converters (`diffusers.loaders.single_file_utils`) turn the SGM keys into a
`UNet2DConditionModel`, a `CLIPTextModel` (CLIP-L) and a `CLIPTextModelWithProjection` (CLIP-G), loaded
strictly.  `sdxl_outputs` runs SDXL's conditioning and denoiser the way the SDXL pipeline does: the context is
the penultimate hidden states of both encoders side by side, the ADM vector is the pooled CLIP-G projection
followed by the six size/crop embeddings, and the UNet predicts the noise, all in fp64.  The refiner reads
CLIP-G alone and five size/aesthetic embeddings; an inpainting UNet takes 9 input channels.

Keys a file lacks (pruned layers, optional norms) are zeros, as the webuis load them (`zero_filled`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                  convert_open_clip_checkpoint,
                                                  create_unet_diffusers_config_from_ldm)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

from lib_rebasin.config import BASE, HEAD_WIDTH, SIZE_CONDITIONS, SDXLConfig, TextEncoderConfig, UNetConfig, sdxl_preset
from lib_rebasin.layout import CLIP_L, POSITION_IDS, UNET, clip_g_prefix, sdxl_shapes
from lib_rebasin.synthetic import random_tensor

transformers_logging.set_verbosity_error()  # tiny vocabularies make it warn about CLIP's special token ids


def oracle_config(scale: str = "tiny", kind: str = BASE, in_channels: int = 4) -> SDXLConfig:
    """A preset without its VAE (out of the spec's scope and not needed to run the denoiser)."""
    config = replace(sdxl_preset(scale, kind), vae=None)
    return replace(config, unet=replace(config.unet, in_channels=in_channels))


def zero_filled(state: dict[str, torch.Tensor], config: SDXLConfig) -> dict[str, torch.Tensor]:
    """The state dict as A1111 loads a file that lacks keys: every missing parameter zero (position_ids, a
    buffer, keeps its 0…76)."""
    sample = next(t for t in state.values() if t.is_floating_point())
    out = dict(state)
    for key, shape in sdxl_shapes(config).items():
        if key not in out:
            out[key] = (torch.arange(shape[1]).reshape(shape) if key == POSITION_IDS
                        else torch.zeros(shape, dtype=sample.dtype))
    return out


def random_state_dict(config: SDXLConfig, seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """UNet and text-encoder weights with the synthetic builder's magnitudes (non-degenerate, not chaotic)."""
    out = {}
    for key, shape in sdxl_shapes(config).items():
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[1], dtype=torch.int64).reshape(shape)
        else:
            out[key] = random_tensor(key, shape, seed).to(dtype)
    return out


# --- configs -------------------------------------------------------------------------------------------------

def sgm_original_config(cfg: UNetConfig) -> dict:
    """The SGM model config (as in SDXL's sd_xl_base.yaml) that diffusers' single-file loader reads."""
    network = {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "model_channels": cfg.model_channels,
        "channel_mult": list(cfg.channel_mult), "num_res_blocks": cfg.res_blocks,
        "attention_resolutions": [2 ** level for level, d in enumerate(cfg.transformer_depth) if d],
        "transformer_depth": list(cfg.transformer_depth), "num_head_channels": HEAD_WIDTH,
        "use_linear_in_transformer": True, "context_dim": cfg.context_dim, "num_classes": "sequential",
        "adm_in_channels": cfg.adm_in,
    }
    return {"model": {"params": {"network_config": {"params": network},
                                 "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}


def unet_diffusers_config(cfg: UNetConfig) -> dict:
    """diffusers' own translation of the SGM config, completed for width-scaled models."""
    config = create_unet_diffusers_config_from_ldm(sgm_original_config(cfg), {})
    # diffusers recognises SDXL's size/crop conditioning by the context width (2048); scaled models have
    # the same conditioning with a narrower context.
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    # diffusers reads the mid block's depth from the last entry of transformer_layers_per_block and the
    # decoder's from reverse_transformer_layers_per_block: list the encoder levels, then the middle, so a
    # scaled model whose middle is shallower than its last level (our tiny preset) is expressed exactly.
    depths = [max(d, 1) for d in cfg.transformer_depth]  # 0: a level without attention (depth unused)
    config["transformer_layers_per_block"] = depths + [cfg.transformer_depth_middle]
    config["reverse_transformer_layers_per_block"] = list(reversed(depths))
    return config


def clip_config(cfg: TextEncoderConfig, *, openclip: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.width // HEAD_WIDTH,
        max_position_embeddings=cfg.positions, hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=cfg.projection or cfg.width, layer_norm_eps=1e-5,
        bos_token_id=cfg.vocab - 2, eos_token_id=cfg.vocab - 1, pad_token_id=cfg.vocab - 1)


# --- conversion ----------------------------------------------------------------------------------------------

@dataclass
class SDXLModels:
    config: SDXLConfig
    unet: UNet2DConditionModel
    clip_l: CLIPTextModel | None  # None: the refiner
    clip_g: CLIPTextModelWithProjection

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.clip_l, self.clip_g) if m is not None]


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], assign: bool = False) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise AssertionError(f"{type(model).__name__}: missing {missing[:5]} ({len(missing)}), "
                             f"unexpected {unexpected[:5]} ({len(unexpected)})")
    model.load_state_dict(state, strict=True, assign=assign)


def convert_unet(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return convert_ldm_unet_checkpoint(state, unet_diffusers_config(cfg))


def convert_clip_l(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_L)})
    # transformers 5's CLIPTextModel has no `text_model.` prefix; position_ids is a non-persistent buffer
    return {k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")}


def convert_clip_g(state: dict[str, torch.Tensor], model: CLIPTextModelWithProjection,
                   prefix: str) -> dict[str, torch.Tensor]:
    return convert_open_clip_checkpoint(model, state, prefix=prefix)


def build_models(config: SDXLConfig, device: str | torch.device = "cpu") -> SDXLModels:
    """Fresh models; the UNet always on the meta device (its weights come from the converted state dict,
    so it is never initialised: that would cost more than running it)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_diffusers_config(config.unet))
    with torch.device(device):
        clip_l = CLIPTextModel(clip_config(config.clip_l, openclip=False)) if config.clip_l else None
        clip_g = CLIPTextModelWithProjection(clip_config(config.clip_g, openclip=True))
    return SDXLModels(config, unet, clip_l, clip_g)


def to_diffusers(state: dict[str, torch.Tensor], config: SDXLConfig, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu") -> SDXLModels:
    """Convert an SGM state dict with diffusers' converters and load it strictly into fresh models
    (on the meta device: shapes only)."""
    models = build_models(config, device)
    on_meta = str(device) == "meta"
    unet_state = {k: v.to(dtype) for k, v in convert_unet(state, config.unet).items()}
    load_strict(models.unet, unet_state, assign=True)
    encoders = [(models.clip_g, convert_clip_g(state, models.clip_g, clip_g_prefix(config.kind)))]
    if models.clip_l is not None:
        encoders.append((models.clip_l, convert_clip_l(state)))
    for model, converted in encoders:
        if not on_meta:
            model.to(dtype)
        load_strict(model, converted, assign=on_meta)
    for model in (models.unet, *models.text_encoders()):
        model.eval()
    return models


# --- running SDXL ---------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    tokens: torch.Tensor      # [batch, positions] token ids, end-of-text marked by the largest id
    latents: torch.Tensor     # [batch, 4, h, w]
    timesteps: torch.Tensor   # [batch]
    time_ids: torch.Tensor    # [batch, 6] original size, crop offset, target size (refiner: 5, aesthetic score last)


def random_inputs(config: SDXLConfig, seed: int, batch: int = 2, latent_size: int = 16) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    te = config.clip_l or config.clip_g
    tokens = torch.randint(0, te.vocab - 2, (batch, te.positions), generator=g)
    tokens[:, 0] = te.vocab - 2
    ends = torch.randint(3, te.positions, (batch,), generator=g)
    tokens[torch.arange(batch), ends] = te.vocab - 1
    latents = torch.randn(batch, config.unet.in_channels, latent_size, latent_size, generator=g, dtype=torch.float64)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(torch.float64)
    time_ids = torch.tensor([[1024., 1024., 0., 0., 1024., 1024.], [768., 1344., 64., 32., 1024., 1024.]],
                            dtype=torch.float64)[torch.arange(batch) % 2]
    conditions = SIZE_CONDITIONS[config.kind]
    if conditions < time_ids.shape[1]:  # the refiner: original size, crop offset, aesthetic score
        time_ids = torch.cat([time_ids[:, :4], torch.tensor([[6.0], [2.5]], dtype=torch.float64)[torch.arange(batch) % 2]], 1)
    return Inputs(tokens, latents, timesteps, time_ids)


@torch.no_grad()
def sdxl_outputs(models: SDXLModels, inputs: Inputs) -> dict[str, torch.Tensor]:
    """Everything SDXL computes from the weights, as the SDXL pipeline wires it, plus two channel-order-free
    views of the text encoders' final states (SDXL does not read CLIP-L's last layer, but it is in the file)."""
    outputs = [m(inputs.tokens, output_hidden_states=True) for m in models.text_encoders()]
    context = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    out_g = outputs[-1]
    noise = models.unet(inputs.latents, inputs.timesteps, encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": out_g.text_embeds, "time_ids": inputs.time_ids}).sample
    result = {"noise": noise}
    # token-by-token Gram matrices do not depend on the channel order of a residual stream
    for name, out in zip(("clip_l", "clip_g")[-len(outputs):], outputs):
        final = out.last_hidden_state
        result[f"{name}_final_gram"] = final @ final.transpose(1, 2)
    return result


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny fp64 models run no slower on one thread, and many times faster when other jobs share the CPU
    (OpenMP hand-offs between two busy cores dominate such small operations)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a| (absolute when a is all zeros, e.g. a zero-filled final norm's output)."""
    scale = a.abs().max()
    return float((a - b).abs().max() / (scale if scale > 0 else 1))


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(relative_error(a[k], b[k]) for k in a)


def run(state: dict[str, torch.Tensor], config: SDXLConfig, inputs: Inputs) -> dict[str, torch.Tensor]:
    return sdxl_outputs(to_diffusers(state, config), inputs)


def meta_state_dict(config: SDXLConfig) -> dict[str, torch.Tensor]:
    """Every key of the layout as a meta tensor (shapes only, no memory)."""
    return {k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("position_ids") else torch.float16)
            for k, s in sdxl_shapes(config).items() if k.startswith((UNET, CLIP_L, clip_g_prefix(config.kind)))}
