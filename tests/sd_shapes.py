"""Key/shape tables of non-SDXL-base checkpoints, written out by hand for detection tests.

They follow the public SD1.x / SD2.x / SDXL-refiner checkpoints (LDM/SGM key names), built independently of
lib_rebasin.layout so that a detection test does not just read back our own generator.
"""
from __future__ import annotations


def _sd_unet(context: int, linear_proj: bool, mult=(1, 2, 4, 4), attn_levels=(0, 1, 2), ch=320,
             adm: int | None = None) -> dict[str, tuple[int, ...]]:
    p = "model.diffusion_model."
    s: dict[str, tuple[int, ...]] = {p + "input_blocks.0.0.weight": (ch, 4, 3, 3), p + "input_blocks.0.0.bias": (ch,),
                                     p + "time_embed.0.weight": (4 * ch, ch), p + "time_embed.2.weight": (4 * ch, 4 * ch),
                                     p + "out.2.weight": (4, ch, 3, 3)}
    if adm:
        s[p + "label_emb.0.0.weight"] = (4 * ch, adm)
    index, c = 1, ch
    for level, m in enumerate(mult):
        for _ in range(2):
            w = ch * m
            s[p + f"input_blocks.{index}.0.in_layers.2.weight"] = (w, c, 3, 3)
            c = w
            if level in attn_levels:
                t = p + f"input_blocks.{index}.1."
                s[t + "proj_in.weight"] = (c, c) if linear_proj else (c, c, 1, 1)
                s[t + "transformer_blocks.0.attn2.to_k.weight"] = (c, context)
            index += 1
        if level != len(mult) - 1:
            s[p + f"input_blocks.{index}.0.op.weight"] = (c, c, 3, 3)
            index += 1
    return s


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    s = _sd_unet(768, linear_proj=False)
    t = "cond_stage_model.transformer.text_model."
    s[t + "embeddings.token_embedding.weight"] = (49408, 768)
    s[t + "embeddings.position_ids"] = (1, 77)
    s[t + "encoder.layers.0.self_attn.q_proj.weight"] = (768, 768)
    s["first_stage_model.encoder.conv_in.weight"] = (128, 3, 3, 3)
    return s


def sd2_shapes() -> dict[str, tuple[int, ...]]:
    s = _sd_unet(1024, linear_proj=True)
    s["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
    s["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = (3072, 1024)
    return s


def refiner_shapes() -> dict[str, tuple[int, ...]]:
    s = _sd_unet(1280, linear_proj=True, mult=(1, 2, 4, 4), attn_levels=(1, 2), ch=384, adm=2560)
    s["conditioner.embedders.0.model.token_embedding.weight"] = (49408, 1280)
    s["conditioner.embedders.0.model.text_projection"] = (1280, 1280)
    return s
