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
SIZE_EMBED_WIDTH = 256 * 6  # SDXL's six size/crop conditionings, 256 sinusoidal channels each


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

    def to_dict(self) -> dict:
        return asdict(self)


def sdxl_preset(scale: str = "full") -> SDXLConfig:
    """The real SDXL base config ('full') or a width/depth-scaled model of the same topology."""
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
                   adm_in=clip_g.projection + SIZE_EMBED_WIDTH)
    return SDXLConfig(unet=unet, clip_l=clip_l, clip_g=clip_g, vae=vae)


SCALES = ("full", "small", "tiny")
