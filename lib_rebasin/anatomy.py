"""What a checkpoint is: its architecture, its components, and (for SDXL) the config derived from its shapes."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .config import SIZE_EMBED_WIDTH, SDXLConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .layout import CLIP_G, CLIP_L, UNET, VAE, clip_g_shapes, clip_l_shapes, unet_shapes, vae_shapes

Shapes = Mapping[str, tuple[int, ...]]

COMPONENTS = ("unet", "clip_l", "clip_g", "vae", "other")
COMPONENT_LABELS = {"unet": "UNet", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "vae": "VAE", "other": "other"}

SDXL_BASE, SDXL_REFINER, SD1, SD2, UNKNOWN = "sdxl-base", "sdxl-refiner", "sd1", "sd2", "unknown"
ARCH_LABELS = {SDXL_BASE: "SDXL base", SDXL_REFINER: "SDXL refiner", SD1: "SD1.x", SD2: "SD2.x", UNKNOWN: "unknown"}

# (prefix, component) per architecture; the first matching prefix wins.
_PREFIXES = {
    SDXL_BASE: ((UNET, "unet"), (CLIP_L.rsplit("text_model.", 1)[0], "clip_l"),
                ("conditioner.embedders.1.", "clip_g"), (VAE, "vae")),
    SDXL_REFINER: ((UNET, "unet"), ("conditioner.embedders.0.", "clip_g"), (VAE, "vae")),
    SD1: ((UNET, "unet"), ("cond_stage_model.", "clip_l"), (VAE, "vae")),
    SD2: ((UNET, "unet"), ("cond_stage_model.", "clip_g"), (VAE, "vae")),
    UNKNOWN: ((UNET, "unet"), (VAE, "vae")),
}


class ArchitectureError(Exception):
    pass


def detect_architecture(shapes: Shapes) -> str:
    label = shapes.get(UNET + "label_emb.0.0.weight")
    to_k = next((s for k, s in shapes.items()
                 if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if label is not None:
        if any(k.startswith("conditioner.embedders.1.") for k in shapes):
            return SDXL_BASE
        if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
            return SDXL_REFINER
        levels = len({m.group(1) for k in shapes
                      if (m := re.match(re.escape(UNET) + r"input_blocks\.(\d+)\.0\.op\.weight", k))}) + 1
        return SDXL_REFINER if levels == 4 else SDXL_BASE
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes) or (to_k and to_k[1] == 768):
        return SD1
    if any(k.startswith("cond_stage_model.model.") for k in shapes) or (to_k and to_k[1] == 1024):
        return SD2
    return UNKNOWN


def component_of(key: str, architecture: str) -> str:
    for prefix, component in _PREFIXES[architecture]:
        if key.startswith(prefix):
            return component
    return "other"


def split_components(keys, architecture: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for key in keys:
        out[component_of(key, architecture)].append(key)
    return out


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.fullmatch(k))})


def _depth(shapes: Shapes, prefix: str) -> int:
    found = _indices(shapes, re.escape(prefix) + r"transformer_blocks\.(\d+)\..*")
    return len(found)


def derive_unet_config(shapes: Shapes) -> UNetConfig:
    p = UNET
    try:
        model_channels, in_channels = shapes[p + "input_blocks.0.0.weight"][:2]
        out_channels = shapes[p + "out.2.weight"][0]
        adm_in = shapes[p + "label_emb.0.0.weight"][1]
    except KeyError as e:
        raise ArchitectureError(f"not an SDXL UNet: missing {e.args[0]}") from None
    levels: list[list[int]] = [[]]  # per level, the transformer depth after each ResBlock
    widths: list[int] = []
    for index in _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\..*"):
        if index == 0:
            continue
        if p + f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
            continue
        if len(levels[-1]) == 0:
            widths.append(shapes[p + f"input_blocks.{index}.0.in_layers.2.weight"][0])
        levels[-1].append(_depth(shapes, p + f"input_blocks.{index}.1."))
    res_blocks = len(levels[0])
    context = next((s[1] for k, s in shapes.items() if k.startswith(p) and k.endswith("attn2.to_k.weight")), 0)
    cfg = UNetConfig(
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        res_blocks=res_blocks,
        transformer_depth=tuple(lv[0] if lv else 0 for lv in levels),
        transformer_depth_middle=_depth(shapes, p + "middle_block.1."),
        in_channels=in_channels, out_channels=out_channels, context_dim=context, adm_in=adm_in)
    _require_layout(shapes, unet_shapes(cfg), "UNet")
    return cfg


def _text_encoder(shapes: Shapes, prefix: str, layer_rx: str, token: str, position: str, mlp: str,
                  projection: str | None) -> TextEncoderConfig:
    vocab, width = shapes[prefix + token]
    layers = len(_indices(shapes, re.escape(prefix) + layer_rx))
    mlp_width = shapes[prefix + mlp][0]
    proj = shapes[prefix + projection][1] if projection else None
    return TextEncoderConfig(width, layers, mlp_width, vocab=vocab, positions=shapes[prefix + position][0],
                             projection=proj)


def derive_clip_l_config(shapes: Shapes) -> TextEncoderConfig:
    cfg = _text_encoder(shapes, CLIP_L, r"encoder\.layers\.(\d+)\..*", "embeddings.token_embedding.weight",
                        "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight", None)
    _require_layout(shapes, clip_l_shapes(cfg), "CLIP-L", optional={CLIP_L + "embeddings.position_ids"})
    return cfg


def derive_clip_g_config(shapes: Shapes) -> TextEncoderConfig:
    cfg = _text_encoder(shapes, CLIP_G, r"transformer\.resblocks\.(\d+)\..*", "token_embedding.weight",
                        "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight", "text_projection")
    _require_layout(shapes, clip_g_shapes(cfg), "CLIP-G", optional={CLIP_G + "logit_scale"})
    return cfg


def derive_vae_config(shapes: Shapes) -> VAEConfig:
    p = VAE + "encoder."
    channels = shapes[p + "conv_in.weight"][0]
    levels = _indices(shapes, re.escape(p) + r"down\.(\d+)\..*")
    mult = tuple(shapes[p + f"down.{i}.block.0.conv1.weight"][0] // channels for i in levels)
    res_blocks = len(_indices(shapes, re.escape(p) + r"down\.0\.block\.(\d+)\..*"))
    cfg = VAEConfig(channels=channels, channel_mult=mult, res_blocks=res_blocks,
                    latent=shapes[VAE + "decoder.conv_in.weight"][1])
    _require_layout(shapes, vae_shapes(cfg), "VAE")
    return cfg


def _require_layout(shapes: Shapes, expected: Shapes, what: str, optional: set[str] = frozenset()) -> None:
    """The derived config must reproduce the component's keys and shapes exactly."""
    prefix = next(p for p in (UNET, CLIP_L, CLIP_G, VAE) if next(iter(expected)).startswith(p))
    missing = [k for k in expected if k not in shapes and k not in optional]
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in expected if k in shapes and shapes[k] != expected[k]]
    extra = [k for k in shapes if k.startswith(prefix) and k not in expected]
    if missing or wrong or extra:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} keys, e.g. {missing[0]}" if missing else "",
            f"{len(wrong)} shapes differ, e.g. {wrong[0]}" if wrong else "",
            f"{len(extra)} unexpected keys, e.g. {extra[0]}" if extra else ""]))
        raise ArchitectureError(f"{what} does not have SDXL's layout: {detail}")


def derive_sdxl_config(shapes: Shapes) -> SDXLConfig:
    """The SDXL config whose layout is exactly these keys and shapes (components absent from a file are None)."""
    unet = derive_unet_config(shapes)
    clip_l = derive_clip_l_config(shapes) if CLIP_L + "embeddings.token_embedding.weight" in shapes else None
    clip_g = derive_clip_g_config(shapes) if CLIP_G + "token_embedding.weight" in shapes else None
    vae = derive_vae_config(shapes) if VAE + "encoder.conv_in.weight" in shapes else None
    if clip_l and clip_g and unet.context_dim != clip_l.width + clip_g.width:
        raise ArchitectureError(f"UNet context width {unet.context_dim} is not CLIP-L {clip_l.width} "
                                f"+ CLIP-G {clip_g.width}")
    if clip_g and unet.adm_in != (clip_g.projection or clip_g.width) + SIZE_EMBED_WIDTH:
        raise ArchitectureError(f"UNet ADM width {unet.adm_in} is not pooled CLIP-G "
                                f"{clip_g.projection} + {SIZE_EMBED_WIDTH}")
    return SDXLConfig(unet=unet, clip_l=clip_l, clip_g=clip_g, vae=vae)


@dataclass
class Anatomy:
    architecture: str
    components: dict[str, list[str]]
    config: SDXLConfig | None
    config_error: str | None = None

    @property
    def label(self) -> str:
        return ARCH_LABELS[self.architecture]

    def present(self) -> list[str]:
        return [c for c in COMPONENTS if self.components[c]]


def analyse(shapes: Shapes) -> Anatomy:
    architecture = detect_architecture(shapes)
    components = split_components(shapes, architecture)
    config, error = None, None
    if architecture == SDXL_BASE:
        try:
            config = derive_sdxl_config(shapes)
        except ArchitectureError as e:
            error = str(e)
    return Anatomy(architecture, components, config, error)
