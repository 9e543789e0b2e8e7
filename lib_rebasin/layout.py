"""SDXL's SGM key layout, generated from an architecture config.

`unet_blocks` walks the UNet the way SGM's `UNetModel.__init__` builds it and yields one descriptor per
layer; the key table (`sdxl_shapes`), the synthetic builder and the permutation spec all read the UNet through
these descriptors, so the topology is written down once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .config import REFINER, SDXLConfig, TextEncoderConfig, UNetConfig, VAEConfig

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model."
CLIP_G = "conditioner.embedders.1.model."
CLIP_G_REFINER = "conditioner.embedders.0.model."  # the refiner's only text encoder
VAE = "first_stage_model."
POSITION_IDS = CLIP_L + "embeddings.position_ids"
UNET_INPUT = UNET + "input_blocks.0.0.weight"  # [C, in_channels, 3, 3]: 4 latents, 9 for inpainting

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ResBlock:
    prefix: str
    c_in: int
    c_out: int
    skip_from: str | None = None  # decoder: the encoder block whose output is concatenated after h
    skip_width: int = 0           # width of that skip (c_in = h width + skip_width)

    @property
    def has_skip_conv(self) -> bool:
        return self.c_in != self.c_out


@dataclass(frozen=True)
class Transformer:
    prefix: str
    width: int
    depth: int


@dataclass(frozen=True)
class Downsample:
    prefix: str
    width: int


@dataclass(frozen=True)
class Upsample:
    prefix: str
    width: int


UNetBlock = ResBlock | Transformer | Downsample | Upsample


def unet_blocks(cfg: UNetConfig) -> Iterator[UNetBlock]:
    """Every UNet layer in forward order (after `input_blocks.0.0`, before `out`)."""
    ch = cfg.model_channels
    skips: list[tuple[str, int]] = [("input_blocks.0", ch)]
    index = 1
    for level, mult in enumerate(cfg.channel_mult):
        width = cfg.model_channels * mult
        for _ in range(cfg.res_blocks):
            yield ResBlock(f"input_blocks.{index}.0.", ch, width)
            ch = width
            if cfg.transformer_depth[level]:
                yield Transformer(f"input_blocks.{index}.1.", ch, cfg.transformer_depth[level])
            skips.append((f"input_blocks.{index}", ch))
            index += 1
        if level != len(cfg.channel_mult) - 1:
            yield Downsample(f"input_blocks.{index}.0.", ch)
            skips.append((f"input_blocks.{index}", ch))
            index += 1

    yield ResBlock("middle_block.0.", ch, ch)
    yield Transformer("middle_block.1.", ch, cfg.transformer_depth_middle)
    yield ResBlock("middle_block.2.", ch, ch)

    index = 0
    for level in reversed(range(len(cfg.channel_mult))):
        width = cfg.model_channels * cfg.channel_mult[level]
        for i in range(cfg.res_blocks + 1):
            skip_from, skip_width = skips.pop()
            yield ResBlock(f"output_blocks.{index}.0.", ch + skip_width, width, skip_from, skip_width)
            ch = width
            layer = 1
            if cfg.transformer_depth[level]:
                yield Transformer(f"output_blocks.{index}.{layer}.", ch, cfg.transformer_depth[level])
                layer += 1
            if level and i == cfg.res_blocks:
                yield Upsample(f"output_blocks.{index}.{layer}.", ch)
            index += 1


def _linear(out: int, inp: int, bias: bool = True) -> dict[str, Shape]:
    return {"weight": (out, inp), **({"bias": (out,)} if bias else {})}


def _conv(out: int, inp: int, k: int = 3) -> dict[str, Shape]:
    return {"weight": (out, inp, k, k), "bias": (out,)}


def _norm(width: int) -> dict[str, Shape]:
    return {"weight": (width,), "bias": (width,)}


def _prefixed(prefix: str, params: dict[str, Shape]) -> dict[str, Shape]:
    return {prefix + name: shape for name, shape in params.items()}


def _resblock_shapes(b: ResBlock, emb: int) -> dict[str, Shape]:
    out = {}
    out |= _prefixed(b.prefix + "in_layers.0.", _norm(b.c_in))
    out |= _prefixed(b.prefix + "in_layers.2.", _conv(b.c_out, b.c_in))
    out |= _prefixed(b.prefix + "emb_layers.1.", _linear(b.c_out, emb))
    out |= _prefixed(b.prefix + "out_layers.0.", _norm(b.c_out))
    out |= _prefixed(b.prefix + "out_layers.3.", _conv(b.c_out, b.c_out))
    if b.has_skip_conv:
        out |= _prefixed(b.prefix + "skip_connection.", _conv(b.c_out, b.c_in, 1))
    return out


def _transformer_shapes(t: Transformer, context: int) -> dict[str, Shape]:
    c = t.width
    out = _prefixed(t.prefix + "norm.", _norm(c))
    out |= _prefixed(t.prefix + "proj_in.", _linear(c, c))
    for i in range(t.depth):
        p = f"{t.prefix}transformer_blocks.{i}."
        for attn, kv_in in (("attn1", c), ("attn2", context)):
            out[f"{p}{attn}.to_q.weight"] = (c, c)
            out[f"{p}{attn}.to_k.weight"] = (c, kv_in)
            out[f"{p}{attn}.to_v.weight"] = (c, kv_in)
            out |= _prefixed(f"{p}{attn}.to_out.0.", _linear(c, c))
        out |= _prefixed(p + "ff.net.0.proj.", _linear(8 * c, c))
        out |= _prefixed(p + "ff.net.2.", _linear(c, 4 * c))
        for n in ("norm1", "norm2", "norm3"):
            out |= _prefixed(f"{p}{n}.", _norm(c))
    out |= _prefixed(t.prefix + "proj_out.", _linear(c, c))
    return out


def unet_shapes(cfg: UNetConfig) -> dict[str, Shape]:
    mc, emb = cfg.model_channels, cfg.time_embed_dim
    out = {}
    out |= _prefixed("time_embed.0.", _linear(emb, mc))
    out |= _prefixed("time_embed.2.", _linear(emb, emb))
    out |= _prefixed("label_emb.0.0.", _linear(emb, cfg.adm_in))
    out |= _prefixed("label_emb.0.2.", _linear(emb, emb))
    out |= _prefixed("input_blocks.0.0.", _conv(mc, cfg.in_channels))
    for block in unet_blocks(cfg):
        if isinstance(block, ResBlock):
            out |= _resblock_shapes(block, emb)
        elif isinstance(block, Transformer):
            out |= _transformer_shapes(block, cfg.context_dim)
        elif isinstance(block, Downsample):
            out |= _prefixed(block.prefix + "op.", _conv(block.width, block.width))
        else:
            out |= _prefixed(block.prefix + "conv.", _conv(block.width, block.width))
    out |= _prefixed("out.0.", _norm(mc))
    out |= _prefixed("out.2.", _conv(cfg.out_channels, mc))
    return _prefixed(UNET, out)


def clip_l_shapes(cfg: TextEncoderConfig) -> dict[str, Shape]:
    w, m = cfg.width, cfg.mlp_width
    out = {
        "embeddings.token_embedding.weight": (cfg.vocab, w),
        "embeddings.position_embedding.weight": (cfg.positions, w),
        "embeddings.position_ids": (1, cfg.positions),
    }
    for i in range(cfg.layers):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= _prefixed(f"{p}self_attn.{proj}.", _linear(w, w))
        out |= _prefixed(p + "layer_norm1.", _norm(w))
        out |= _prefixed(p + "mlp.fc1.", _linear(m, w))
        out |= _prefixed(p + "mlp.fc2.", _linear(w, m))
        out |= _prefixed(p + "layer_norm2.", _norm(w))
    out |= _prefixed("final_layer_norm.", _norm(w))
    return _prefixed(CLIP_L, out)


def clip_g_shapes(cfg: TextEncoderConfig, prefix: str = CLIP_G) -> dict[str, Shape]:
    w, m = cfg.width, cfg.mlp_width
    out = {
        "token_embedding.weight": (cfg.vocab, w),
        "positional_embedding": (cfg.positions, w),
    }
    for i in range(cfg.layers):
        p = f"transformer.resblocks.{i}."
        out |= _prefixed(p + "ln_1.", _norm(w))
        out[p + "attn.in_proj_weight"] = (3 * w, w)
        out[p + "attn.in_proj_bias"] = (3 * w,)
        out |= _prefixed(p + "attn.out_proj.", _linear(w, w))
        out |= _prefixed(p + "ln_2.", _norm(w))
        out |= _prefixed(p + "mlp.c_fc.", _linear(m, w))
        out |= _prefixed(p + "mlp.c_proj.", _linear(w, m))
    out |= _prefixed("ln_final.", _norm(w))
    out["text_projection"] = (w, cfg.projection or w)
    out["logit_scale"] = ()
    return _prefixed(prefix, out)


def _vae_resblock(prefix: str, c_in: int, c_out: int) -> dict[str, Shape]:
    out = _prefixed(prefix + "norm1.", _norm(c_in))
    out |= _prefixed(prefix + "conv1.", _conv(c_out, c_in))
    out |= _prefixed(prefix + "norm2.", _norm(c_out))
    out |= _prefixed(prefix + "conv2.", _conv(c_out, c_out))
    if c_in != c_out:
        out |= _prefixed(prefix + "nin_shortcut.", _conv(c_out, c_in, 1))
    return out


def _vae_mid(prefix: str, c: int) -> dict[str, Shape]:
    out = _vae_resblock(prefix + "mid.block_1.", c, c)
    out |= _prefixed(prefix + "mid.attn_1.norm.", _norm(c))
    for name in ("q", "k", "v", "proj_out"):
        out |= _prefixed(f"{prefix}mid.attn_1.{name}.", _conv(c, c, 1))
    out |= _vae_resblock(prefix + "mid.block_2.", c, c)
    return out


def vae_shapes(cfg: VAEConfig) -> dict[str, Shape]:
    ch, mult, z = cfg.channels, cfg.channel_mult, cfg.latent
    out = _prefixed("encoder.conv_in.", _conv(ch, 3))
    c = ch
    for i, m in enumerate(mult):
        for j in range(cfg.res_blocks):
            out |= _vae_resblock(f"encoder.down.{i}.block.{j}.", c, ch * m)
            c = ch * m
        if i != len(mult) - 1:
            out |= _prefixed(f"encoder.down.{i}.downsample.conv.", _conv(c, c))
    out |= _vae_mid("encoder.", c)
    out |= _prefixed("encoder.norm_out.", _norm(c))
    out |= _prefixed("encoder.conv_out.", _conv(2 * z, c))

    c = ch * mult[-1]
    out |= _prefixed("decoder.conv_in.", _conv(c, z))
    out |= _vae_mid("decoder.", c)
    for i in reversed(range(len(mult))):
        for j in range(cfg.res_blocks + 1):
            out |= _vae_resblock(f"decoder.up.{i}.block.{j}.", c, ch * mult[i])
            c = ch * mult[i]
        if i != 0:
            out |= _prefixed(f"decoder.up.{i}.upsample.conv.", _conv(c, c))
    out |= _prefixed("decoder.norm_out.", _norm(c))
    out |= _prefixed("decoder.conv_out.", _conv(3, c))
    out |= _prefixed("quant_conv.", _conv(2 * z, 2 * z, 1))
    out |= _prefixed("post_quant_conv.", _conv(z, z, 1))
    return _prefixed(VAE, out)


def clip_g_prefix(kind: str) -> str:
    return CLIP_G_REFINER if kind == REFINER else CLIP_G


def component_prefixes(cfg: SDXLConfig) -> dict[str, str]:
    """Key prefix of each component the config has (UNet always)."""
    out = {"unet": UNET}
    if cfg.clip_l:
        out["clip_l"] = CLIP_L
    if cfg.clip_g:
        out["clip_g"] = clip_g_prefix(cfg.kind)
    if cfg.vae:
        out["vae"] = VAE
    return out


def sdxl_shapes(cfg: SDXLConfig) -> dict[str, Shape]:
    """Every key of an SGM-layout SDXL checkpoint with its shape, in a stable order."""
    out = unet_shapes(cfg.unet)
    if cfg.clip_l:
        out |= clip_l_shapes(cfg.clip_l)
    if cfg.clip_g:
        out |= clip_g_shapes(cfg.clip_g, clip_g_prefix(cfg.kind))
    if cfg.vae:
        out |= vae_shapes(cfg.vae)
    return out


# --- keys real files may lack -----------------------------------------------------------------------------
# The webuis load SDXL without them (sd-mecha's SDXL table marks the same ones optional).  SDXL reads the
# penultimate layer of both text encoders, so savers may also drop the last one ("pruned" files): CLIP-G's last
# resblock then feeds only the pooled output, which a webui computes with the layer zero-filled, i.e. skipped.

def optional_keys(cfg: SDXLConfig) -> dict[str, str]:
    """Keys of the layout a file may lack, each with a short name of what it is."""
    out = {}
    if cfg.clip_l:
        out[POSITION_IDS] = "CLIP-L position_ids"
        out[CLIP_L + "final_layer_norm.weight"] = out[CLIP_L + "final_layer_norm.bias"] = "CLIP-L final_layer_norm"
    if cfg.clip_g:
        p = clip_g_prefix(cfg.kind)
        out[p + "ln_final.weight"] = out[p + "ln_final.bias"] = "CLIP-G ln_final"
        out[p + "text_projection"] = "CLIP-G text_projection"
        out[p + "logit_scale"] = "CLIP-G logit_scale"
    for component, keys in last_layer_keys(cfg).items():
        name = last_layer_name(cfg, component)
        out.update(dict.fromkeys(keys, name))
    return out


def last_layer_name(cfg: SDXLConfig, component: str) -> str:
    if component == "clip_l":
        return f"CLIP-L layer {cfg.clip_l.layers - 1}"
    return f"CLIP-G resblock {cfg.clip_g.layers - 1}"


def last_layer_keys(cfg: SDXLConfig) -> dict[str, list[str]]:
    """Per text encoder, the keys of its last layer (what a pruned file lacks)."""
    out = {}
    if cfg.clip_l:
        layer = f"{CLIP_L}encoder.layers.{cfg.clip_l.layers - 1}."
        out["clip_l"] = [k for k in clip_l_shapes(cfg.clip_l) if k.startswith(layer)]
    if cfg.clip_g:
        layer = f"{clip_g_prefix(cfg.kind)}transformer.resblocks.{cfg.clip_g.layers - 1}."
        out["clip_g"] = [k for k in clip_g_shapes(cfg.clip_g, clip_g_prefix(cfg.kind)) if k.startswith(layer)]
    return out
