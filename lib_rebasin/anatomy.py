"""What a checkpoint is: its architecture, its components, and (for SDXL) the config derived from its shapes."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Mapping

from .config import BASE, REFINER, SDXLConfig, TextEncoderConfig, UNetConfig, VAEConfig, known_layers, size_embed_width
from .layout import (CLIP_G, CLIP_G_REFINER, CLIP_L, UNET, VAE, clip_g_prefix, clip_g_shapes, clip_l_shapes,
                     optional_keys, unet_shapes, vae_shapes)

Shapes = Mapping[str, tuple[int, ...]]

COMPONENTS = ("unet", "clip_l", "clip_g", "vae", "other")
COMPONENT_LABELS = {"unet": "UNet", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "vae": "VAE", "other": "other"}

SDXL_BASE, SDXL_REFINER, SD1, SD2, UNKNOWN = "sdxl-base", "sdxl-refiner", "sd1", "sd2", "unknown"
STANDALONE_VAE = "vae"
ARCH_LABELS = {SDXL_BASE: "SDXL base", SDXL_REFINER: "SDXL refiner", SD1: "SD1.x", SD2: "SD2.x",
               STANDALONE_VAE: "standalone VAE", UNKNOWN: "unknown"}
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # a standalone VAE file's keys

# (prefix, component) per architecture; the first matching prefix wins.
_PREFIXES = {
    SDXL_BASE: ((UNET, "unet"), (CLIP_L.rsplit("text_model.", 1)[0], "clip_l"),
                ("conditioner.embedders.1.", "clip_g"), (VAE, "vae")),
    SDXL_REFINER: ((UNET, "unet"), ("conditioner.embedders.0.", "clip_g"), (VAE, "vae")),
    SD1: ((UNET, "unet"), ("cond_stage_model.", "clip_l"), (VAE, "vae")),
    SD2: ((UNET, "unet"), ("cond_stage_model.", "clip_g"), (VAE, "vae")),
    STANDALONE_VAE: tuple((part, "vae") for part in VAE_PARTS),
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
    if "decoder.conv_in.weight" in shapes and all(k.startswith(VAE_PARTS) for k in shapes):
        return STANDALONE_VAE
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


def _text_encoder(shapes: Shapes, component: str, prefix: str, layer_rx: str, token: str, position: str,
                  mlp: str, projection: int | None) -> TextEncoderConfig:
    """The encoder's config; a file with one layer fewer than SDXL's encoder of that width is pruned, and its
    config is the full one (the last layer's keys are then absent)."""
    vocab, width = shapes[prefix + token]
    layers = len(_indices(shapes, re.escape(prefix) + layer_rx))
    cfg = TextEncoderConfig(width, layers, shapes[prefix + mlp][0], vocab=vocab,
                            positions=shapes[prefix + position][0], projection=projection)
    if known_layers(component, cfg) == layers + 1:
        cfg = replace(cfg, layers=layers + 1)
    return cfg


def derive_clip_l_config(shapes: Shapes) -> TextEncoderConfig:
    cfg = _text_encoder(shapes, "clip_l", CLIP_L, r"encoder\.layers\.(\d+)\..*", "embeddings.token_embedding.weight",
                        "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight", None)
    _require_layout(shapes, clip_l_shapes(cfg), "CLIP-L", optional_keys(SDXLConfig(clip_l=cfg, clip_g=None)))
    return cfg


def derive_clip_g_config(shapes: Shapes, kind: str = BASE, adm_in: int | None = None) -> TextEncoderConfig:
    """CLIP-G's config; without `text_projection` its width comes from the UNet's ADM input."""
    prefix = clip_g_prefix(kind)
    projection = shapes.get(prefix + "text_projection", (None, None))[1]
    if projection is None:
        projection = adm_in - size_embed_width(kind) if adm_in else shapes[prefix + "token_embedding.weight"][1]
    cfg = _text_encoder(shapes, "clip_g", prefix, r"transformer\.resblocks\.(\d+)\..*", "token_embedding.weight",
                        "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight", projection)
    _require_layout(shapes, clip_g_shapes(cfg, prefix), "CLIP-G",
                    optional_keys(SDXLConfig(clip_l=None, clip_g=cfg, kind=kind)))
    return cfg


_VAE_NEEDED = ("encoder.conv_in.weight", "decoder.conv_in.weight")


def derive_vae_config(shapes: Shapes) -> VAEConfig:
    p = VAE + "encoder."
    missing = [VAE + k for k in _VAE_NEEDED if VAE + k not in shapes]
    if missing:
        count = sum(k.startswith(VAE) for k in shapes)
        raise ArchitectureError(f"VAE incomplete: {count} keys, no {missing[0]}")
    channels = shapes[p + "conv_in.weight"][0]
    levels = _indices(shapes, re.escape(p) + r"down\.(\d+)\..*")
    try:
        mult = tuple(shapes[p + f"down.{i}.block.0.conv1.weight"][0] // channels for i in levels)
    except KeyError as e:
        raise ArchitectureError(f"VAE incomplete: no {e.args[0]}") from None
    res_blocks = len(_indices(shapes, re.escape(p) + r"down\.0\.block\.(\d+)\..*"))
    cfg = VAEConfig(channels=channels, channel_mult=mult, res_blocks=res_blocks,
                    latent=shapes[VAE + "decoder.conv_in.weight"][1])
    _require_layout(shapes, vae_shapes(cfg), "VAE")
    return cfg


def _require_layout(shapes: Shapes, expected: Shapes, what: str, optional: Mapping[str, str] = {}) -> None:
    """The derived config must reproduce the component's keys and shapes exactly (optional keys may be absent,
    a text encoder's last layer only as a whole)."""
    prefix = next(p for p in (UNET, CLIP_L, CLIP_G, CLIP_G_REFINER, VAE) if next(iter(expected)).startswith(p))
    missing = [k for k in expected if k not in shapes and k not in optional]
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in expected if k in shapes and shapes[k] != expected[k]]
    extra = [k for k in shapes if k.startswith(prefix) and k not in expected]
    by_name: dict[str, list[str]] = {}
    for key, name in optional.items():
        if key in expected:
            by_name.setdefault(name, []).append(key)
    partial = [name for name, keys in by_name.items()
               if len(keys) > 1 and 0 < sum(k in shapes for k in keys) < len(keys)]
    if missing or wrong or extra or partial:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} keys, e.g. {missing[0]}" if missing else "",
            f"{len(wrong)} shapes differ, e.g. {wrong[0]}" if wrong else "",
            f"{len(extra)} unexpected keys, e.g. {extra[0]}" if extra else "",
            f"{partial[0]} only in part" if partial else ""]))
        raise ArchitectureError(f"{what} does not have SDXL's layout: {detail}")


def derive_sdxl_config(shapes: Shapes, kind: str | None = None) -> SDXLConfig:
    """The SDXL config whose layout is these keys and shapes, optional keys aside (components absent from a file
    are None; so is an incomplete VAE, which `analyse` reports)."""
    if kind is None:
        kind = REFINER if detect_architecture(shapes) == SDXL_REFINER else BASE
    unet = derive_unet_config(shapes)
    clip_l = derive_clip_l_config(shapes) if kind == BASE and CLIP_L + "embeddings.token_embedding.weight" in shapes \
        else None
    g_prefix = clip_g_prefix(kind)
    clip_g = derive_clip_g_config(shapes, kind, unet.adm_in) if g_prefix + "token_embedding.weight" in shapes else None
    try:
        vae = derive_vae_config(shapes) if any(k.startswith(VAE) for k in shapes) else None
    except ArchitectureError:
        vae = None
    context = (clip_l.width if clip_l else 0) + (clip_g.width if clip_g else 0)
    if clip_g and (clip_l or kind == REFINER) and unet.context_dim != context:
        parts = f"CLIP-L {clip_l.width} + CLIP-G {clip_g.width}" if clip_l else f"CLIP-G {clip_g.width}"
        raise ArchitectureError(f"UNet context width {unet.context_dim} is not {parts}")
    if clip_g and unet.adm_in != clip_g.projection + size_embed_width(kind):
        raise ArchitectureError(f"UNet ADM width {unet.adm_in} is not pooled CLIP-G "
                                f"{clip_g.projection} + {size_embed_width(kind)}")
    return SDXLConfig(unet=unet, clip_l=clip_l, clip_g=clip_g, vae=vae, kind=kind)


# --- keys outside the layout --------------------------------------------------------------------------------

# Zero-size markers that tell a loader how to sample (Forge reads v_pred, ztsnr and the EDM ones).
PREDICTION_MARKERS = {"v_pred": "v-prediction", "ztsnr": "zero terminal SNR", "edm_mean": "EDM",
                      "edm_std": "EDM", "edm_vpred.sigma_max": "EDM v-prediction",
                      "edm_vpred.sigma_min": "EDM v-prediction"}
# Noise-schedule buffers some savers keep (LDM/SGM module buffers): constants, copied bit for bit, never merged.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "denoiser.sigmas", "denoiser.log_sigmas"})
EMA_PREFIX = "model_ema."  # a training copy of the UNet (LDM names without dots) and its decay counters

WEIGHT, BUFFER, MARKER, EMA = "weight", "buffer", "marker", "ema"


def ema_key(unet_key: str) -> str:
    """LDM's name of a UNet weight's EMA copy: 'model.diffusion_model.out.2.weight' ->
    'model_ema.diffusion_modelout2weight'."""
    return EMA_PREFIX + unet_key.removeprefix("model.").replace(".", "")


def key_kind(key: str) -> str:
    """weight (merged), buffer (copied bit for bit: position_ids, schedules), marker or ema."""
    if key in PREDICTION_MARKERS:
        return MARKER
    if key.startswith(EMA_PREFIX):
        return EMA
    if key in SCHEDULE_BUFFERS or key.endswith("position_ids"):
        return BUFFER
    return WEIGHT


def prediction_type(keys) -> str:
    """What a loader that reads the markers (Forge) makes of the file: epsilon unless a marker says otherwise."""
    names = list(dict.fromkeys(PREDICTION_MARKERS[k] for k in keys if k in PREDICTION_MARKERS))
    if "EDM v-prediction" in names and "v-prediction" in names:
        names.remove("v-prediction")
    return ", ".join(names) or "epsilon"


@dataclass
class Anatomy:
    architecture: str
    components: dict[str, list[str]]
    config: SDXLConfig | None
    config_error: str | None = None
    absent: dict[str, str] = field(default_factory=dict)  # optional layout keys the file lacks -> what they are
    vae: str = "none"                                      # complete | partial | none
    prediction: str = "epsilon"
    notes: list[str] = field(default_factory=list)         # what is unusual about the file, for people

    @property
    def label(self) -> str:
        return ARCH_LABELS[self.architecture]

    def present(self) -> list[str]:
        return [c for c in COMPONENTS if self.components[c]]


def analyse(shapes: Shapes) -> Anatomy:
    architecture = detect_architecture(shapes)
    components = split_components(shapes, architecture)
    result = Anatomy(architecture, components, None, prediction=prediction_type(shapes))
    if architecture in (SDXL_BASE, SDXL_REFINER):
        try:
            result.config = derive_sdxl_config(shapes, REFINER if architecture == SDXL_REFINER else BASE)
        except ArchitectureError as e:
            result.config_error = str(e)
    vae_keys = components["vae"]
    if vae_keys:
        try:
            derive_vae_config(shapes if architecture != STANDALONE_VAE else {VAE + k: v for k, v in shapes.items()})
            result.vae = "complete"
        except ArchitectureError as e:
            result.vae = "partial"
            result.notes.append(f"partial VAE: {e}")
    elif architecture in (SDXL_BASE, SDXL_REFINER, SD1, SD2):
        result.notes.append("no VAE")
    if result.config:
        result.absent = {k: name for k, name in optional_keys(result.config).items() if k not in shapes}
        for name in dict.fromkeys(result.absent.values()):
            result.notes.append(f"no {name}")
        if result.config.unet.in_channels != 4:
            result.notes.append(f"inpainting UNet: {result.config.unet.in_channels} input channels "
                                f"(4 latent + {result.config.unet.in_channels - 4} extra)")
    kinds = Counter(key_kind(k) for k in shapes)
    if kinds[EMA]:
        result.notes.append(f"EMA copy: {kinds[EMA]} {EMA_PREFIX}* keys")
    buffers = sorted(k for k in shapes if k in SCHEDULE_BUFFERS)
    if buffers:
        result.notes.append(f"noise-schedule buffers: {', '.join(buffers)}")
    if result.prediction != "epsilon":
        result.notes.append(f"prediction: {result.prediction} (marker keys)")
    return result
