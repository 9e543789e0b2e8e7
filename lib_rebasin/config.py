"""Architecture configs of SDXL-topology models, and the presets the synthetic builder uses.

A config is plain data: everything that shapes an SDXL checkpoint (widths, depths, text-encoder sizes).
`anatomy.derive_sdxl_config` recovers one from a checkpoint's shapes; `layout.sdxl_shapes` turns one
back into the full SGM key table.  Scaled presets keep SDXL's invariants: 64 channels per attention head,
GroupNorm with 32 groups, GEGLU feed-forward, and a decoder whose concat GroupNorms straddle `[h | skip]`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

HEAD_WIDTH = 64
GROUPNORM_GROUPS = 32
BASE, REFINER = "base", "refiner"
KINDS = (BASE, REFINER)
# Sinusoidal size conditionings after the pooled CLIP-G output in the ADM vector, 256 channels each: the base
# reads original size, crop offset and target size (2 numbers each), the refiner original size, crop offset
# and an aesthetic score.
SIZE_CONDITIONS = {BASE: 6, REFINER: 5}
SIZE_EMBED_WIDTH = 256


@dataclass(frozen=True)
class TextEncoderConfig:
    width: int
    layers: int
    mlp_width: int
    vocab: int = 49408
    positions: int = 77
    projection: int | None = None  # CLIP-G only: text_projection output width

    @property
    def heads(self) -> int:
        return self.width // HEAD_WIDTH


@dataclass(frozen=True)
class VAEConfig:
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 2
    latent: int = 4


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # per level, encoder side
    transformer_depth_middle: int = 10
    in_channels: int = 4
    out_channels: int = 4
    context_dim: int = 2048
    adm_in: int = 2816

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def level_widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)


@dataclass(frozen=True)
class SDXLConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    clip_l: TextEncoderConfig | None = field(default_factory=lambda: TextEncoderConfig(768, 12, 3072))
    clip_g: TextEncoderConfig | None = field(
        default_factory=lambda: TextEncoderConfig(1280, 32, 5120, projection=1280))
    vae: VAEConfig | None = field(default_factory=VAEConfig)
    kind: str = BASE  # "refiner": CLIP-G only (as embedder 0), 5 size conditionings

    @property
    def size_embed_width(self) -> int:
        return size_embed_width(self.kind)

    def to_dict(self) -> dict:
        return asdict(self)


def size_embed_width(kind: str) -> int:
    return SIZE_EMBED_WIDTH * SIZE_CONDITIONS[kind]


def sdxl_preset(scale: str = "full", kind: str = BASE) -> SDXLConfig:
    """The real SDXL base or refiner config ('full') or a width/depth-scaled model of the same topology."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: choose {' or '.join(KINDS)}")
    if kind == REFINER:
        return _refiner_preset(scale)
    if scale == "full":
        return SDXLConfig()
    if scale == "small":
        clip_l = TextEncoderConfig(256, 4, 1024, vocab=4096)
        clip_g = TextEncoderConfig(384, 4, 1536, vocab=4096, projection=384)
        unet = UNetConfig(model_channels=128, transformer_depth=(0, 2, 4), transformer_depth_middle=4)
        vae = VAEConfig(channels=64)
    elif scale == "tiny":
        clip_l = TextEncoderConfig(128, 2, 512, vocab=1000)
        clip_g = TextEncoderConfig(192, 2, 768, vocab=1000, projection=192)
        unet = UNetConfig(model_channels=64, transformer_depth=(0, 1, 2), transformer_depth_middle=1)
        vae = VAEConfig(channels=32)
    else:
        raise ValueError(f"unknown scale {scale!r}: choose full, small or tiny")
    unet = replace(unet, context_dim=clip_l.width + clip_g.width,
                   adm_in=clip_g.projection + size_embed_width(BASE))
    return SDXLConfig(unet=unet, clip_l=clip_l, clip_g=clip_g, vae=vae)


def _refiner_preset(scale: str) -> SDXLConfig:
    """SDXL refiner: a 384-wide UNet with four levels (attention at the middle two, depth 4), conditioned on
    CLIP-G alone; scaled like the base presets (same text-encoder and VAE sizes per scale)."""
    base = sdxl_preset(scale)
    channels, depth = {"full": (384, 4), "small": (96, 2), "tiny": (64, 1)}[scale]
    unet = UNetConfig(model_channels=channels, channel_mult=(1, 2, 4, 4), transformer_depth=(0, depth, depth, 0),
                      transformer_depth_middle=depth, context_dim=base.clip_g.width,
                      adm_in=base.clip_g.projection + size_embed_width(REFINER))
    return SDXLConfig(unet=unet, clip_l=None, clip_g=base.clip_g, vae=base.vae, kind=REFINER)


SCALES = ("full", "small", "tiny")


def known_layers(component: str, encoder: TextEncoderConfig) -> int | None:
    """The depth of SDXL's text encoder ('clip_l' or 'clip_g') with these widths and vocabulary, in the real
    models and in our scaled presets; None for an encoder SDXL does not use.  Pruned files lack the last layer
    (SDXL reads the penultimate one), so a file with one layer fewer is recognised as pruned."""
    for scale in SCALES:
        known = getattr(sdxl_preset(scale), component)
        if (known.width, known.mlp_width, known.vocab, known.positions) == \
                (encoder.width, encoder.mlp_width, encoder.vocab, encoder.positions):
            return known.layers
    return None
