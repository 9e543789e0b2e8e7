"""Architecture detection, component split and the SDXL config derived from shapes."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from lib_rebasin import anatomy
from lib_rebasin.anatomy import SD1, SD2, SDXL_BASE, SDXL_REFINER, UNKNOWN, ArchitectureError, analyse
from lib_rebasin.config import SDXLConfig, TextEncoderConfig, UNetConfig, sdxl_preset
from lib_rebasin.layout import UNET, sdxl_shapes
from sd_shapes import refiner_shapes, sd2_shapes, sd15_shapes


def test_full_sdxl_anatomy_matches_the_published_architecture():
    shapes = sdxl_shapes(sdxl_preset("full"))
    result = analyse(shapes)
    assert result.architecture == SDXL_BASE
    counts = {c: len(k) for c, k in result.components.items()}
    assert counts == {"unet": 1680, "clip_l": 197, "clip_g": 390, "vae": 248, "other": 0}
    # SDXL base: 2.57 B UNet parameters, 123 M CLIP-L, 695 M CLIP-G, 84 M VAE (published figures).
    params = {c: sum(math.prod(shapes[k]) for k in keys) for c, keys in result.components.items()}
    assert round(params["unet"] / 1e6) == 2567
    assert round(params["clip_l"] / 1e6) == 123
    assert round(params["clip_g"] / 1e6) == 695
    assert round(params["vae"] / 1e6) == 84
    cfg = result.config
    assert cfg.unet.model_channels == 320 and cfg.unet.channel_mult == (1, 2, 4)
    assert cfg.unet.transformer_depth == (0, 2, 10) and cfg.unet.transformer_depth_middle == 10
    assert cfg.unet.context_dim == 2048 and cfg.unet.adm_in == 2816
    assert [w // 64 for w in cfg.unet.level_widths[1:]] == [10, 20]
    assert (cfg.clip_l.width, cfg.clip_l.layers, cfg.clip_l.heads) == (768, 12, 12)
    assert (cfg.clip_g.width, cfg.clip_g.layers, cfg.clip_g.heads, cfg.clip_g.projection) == (1280, 32, 20, 1280)


@pytest.mark.parametrize("scale", ["full", "small", "tiny"])
def test_config_round_trips_through_shapes(scale):
    cfg = sdxl_preset(scale)
    assert anatomy.derive_sdxl_config(sdxl_shapes(cfg)) == cfg


def test_width_and_depth_scaled_models_are_understood():
    unet = UNetConfig(model_channels=192, transformer_depth=(0, 3, 5), transformer_depth_middle=2, res_blocks=3,
                      context_dim=256 + 320, adm_in=320 + 1536)
    cfg = SDXLConfig(unet=unet, clip_l=TextEncoderConfig(256, 3, 1024, vocab=500),
                     clip_g=TextEncoderConfig(320, 5, 1280, vocab=500, projection=320), vae=None)
    assert anatomy.derive_sdxl_config(sdxl_shapes(cfg)) == cfg


def test_unet_only_file_is_sdxl_with_only_a_unet():
    shapes = {k: s for k, s in sdxl_shapes(sdxl_preset("tiny")).items() if k.startswith(UNET)}
    result = analyse(shapes)
    assert result.architecture == SDXL_BASE
    assert result.present() == ["unet"]
    assert result.config.clip_l is None and result.config.vae is None


def test_marker_and_unknown_keys_are_other():
    shapes = dict(sdxl_shapes(sdxl_preset("tiny")), v_pred=(0,), **{"denoiser.sigmas": (1000,)})
    result = analyse(shapes)
    assert result.components["other"] == ["v_pred", "denoiser.sigmas"]
    assert result.config == sdxl_preset("tiny")


@pytest.mark.parametrize("shapes, expected", [(sd15_shapes, SD1), (sd2_shapes, SD2), (refiner_shapes, SDXL_REFINER)])
def test_other_architectures_are_recognised(shapes, expected):
    result = analyse(shapes())
    assert result.architecture == expected
    assert result.config is None


def test_sd15_components():
    result = analyse(sd15_shapes())
    assert len(result.components["clip_l"]) == 3 and len(result.components["vae"]) == 1


def test_unrelated_file_is_unknown():
    assert analyse({"foo.weight": (3, 3)}).architecture == UNKNOWN


def test_broken_sdxl_layout_is_reported_not_guessed():
    shapes = sdxl_shapes(sdxl_preset("tiny"))
    key = UNET + "output_blocks.4.0.skip_connection.weight"
    shapes[key] = (shapes[key][0], shapes[key][1] + 1, 1, 1)
    result = analyse(shapes)
    assert result.architecture == SDXL_BASE and result.config is None
    assert "skip_connection" in result.config_error
    del shapes[key]
    with pytest.raises(ArchitectureError, match="missing"):
        anatomy.derive_sdxl_config(shapes)


def test_mismatched_context_width_is_refused():
    cfg = sdxl_preset("tiny")
    shapes = sdxl_shapes(replace(cfg, clip_l=replace(cfg.clip_l, width=192, mlp_width=768)))
    with pytest.raises(ArchitectureError, match="context"):
        anatomy.derive_sdxl_config(shapes)
