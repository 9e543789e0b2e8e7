"""Synthetic SDXL checkpoints: the full SGM key set at any scale, seeded weights of realistic magnitude,
the quirks real files have, and same-base "fine-tunes" (a base plus a small seeded drift).

Weights are non-degenerate but not chaotic, so that an exact permutation leaves a model's outputs equal to
rounding while a wrong one shows: matrices and convs N(0, 1/fan_in), 1-D parameters (1 for norm weights,
else 0) + 0.2·N(0, 1), embeddings N(0, 0.02²).  Every tensor has its own seed (from the model seed and the
key), so a checkpoint is streamed to disk one tensor at a time and is the same whatever the order.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Iterator, Mapping

import torch

from .anatomy import EMA_PREFIX, SCHEDULE_BUFFERS, WEIGHT, analyse, ema_key, key_kind
from .checkpoint import Checkpoint, CheckpointError, SafetensorsWriter, TensorInfo
from .config import BASE, REFINER, SDXLConfig, sdxl_preset
from .layout import CLIP_G, POSITION_IDS, UNET, VAE, last_layer_keys, optional_keys, sdxl_shapes
from .progress import SILENT, Monitor

MARKER_KEYS = ("v_pred", "ztsnr")
LOGIT_SCALE = CLIP_G + "logit_scale"
_NORM = re.compile(r"(norm|ln_|layer_norm|in_layers\.0|out_layers\.0|out\.0)[^.]*\.weight$|norm\.weight$")

# What make-synthetic can imitate, each a quirk of real files; they compose (e.g. refiner,pruned,no-vae).
VARIANTS = {
    "refiner": "the SDXL refiner: CLIP-G only (as embedder 0), a 4-level UNet (384 channels at full scale)",
    "inpaint": "an inpainting UNet: 9 input channels (4 latent + mask + masked image)",
    "pruned": "without the text encoders' last layers (CLIP-L layer 11, CLIP-G resblock 31)",
    "no-optional": "without any optional key: position_ids, final norms, text_projection, logit_scale",
    "no-vae": "without a VAE",
    "partial-vae": "with only the first 4 VAE keys",
    "vae-only": "a standalone VAE file (keys without first_stage_model.)",
    "unet-only": "only the UNet, like a UNet-only release",
    "ema": "with an EMA copy of the UNet (model_ema.*, LDM's dot-less names)",
    "vpred": "with the v_pred and ztsnr marker keys of v-prediction releases",
    "schedule": "with noise-schedule buffers (betas, alphas_cumprod, alphas_cumprod_prev; fp32)",
    "mixed-dtype": "UNet in --dtype, text encoders fp32, VAE bf16",
}
_ARCHITECTURE_VARIANTS = ("refiner", "inpaint")  # need a fresh model: not with --base
_EXCLUSIVE = [("no-vae", "partial-vae", "vae-only"), ("unet-only", "vae-only"), ("refiner", "vae-only"),
              ("inpaint", "vae-only")]
_PARTIAL_VAE_KEYS = 4
_SCHEDULE_STEPS = 1000


def parse_variants(text: str | list[str] | None) -> tuple[str, ...]:
    """'refiner,pruned' (or a list of such) -> ('refiner', 'pruned'), checked."""
    items = [text] if isinstance(text, str) else list(text or [])
    names = tuple(dict.fromkeys(n.strip() for item in items for n in item.split(",") if n.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    for group in _EXCLUSIVE:
        chosen = [n for n in group if n in names]
        if len(chosen) > 1:
            raise ValueError(f"variants {' and '.join(chosen)} exclude each other")
    return names


def variant_config(scale: str, variants: tuple[str, ...]) -> SDXLConfig:
    config = sdxl_preset(scale, REFINER if "refiner" in variants else BASE)
    if "inpaint" in variants:
        config = replace(config, unet=replace(config.unet, in_channels=9))
    return config


def key_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(seed, key))


def random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 tensor for `key` with the magnitude of a trained SDXL weight of that kind."""
    g = _generator(seed, key)
    if key.endswith("logit_scale"):
        return torch.tensor(math.log(100.0))
    if key.endswith(("token_embedding.weight", "position_embedding.weight", "positional_embedding")):
        return torch.randn(shape, generator=g) * 0.02
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        if key.endswith("text_projection"):  # used as x @ P: rows are the input
            fan_in = shape[0]
        return torch.randn(shape, generator=g) / math.sqrt(fan_in)
    base = 1.0 if _NORM.search(key) else 0.0
    return base + 0.2 * torch.randn(shape, generator=g)


def schedule_buffers() -> dict[str, torch.Tensor]:
    """SD's scaled-linear noise schedule as LDM stores it (float32)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, _SCHEDULE_STEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]).float()}


def _dtype_of(key: str, dtype: torch.dtype, variants: tuple[str, ...]) -> torch.dtype:
    if "mixed-dtype" in variants:
        if key.startswith(VAE):
            return torch.bfloat16
        if key.startswith("conditioner."):
            return torch.float32
    return dtype


def _dropped(config: SDXLConfig | None, variants: tuple[str, ...], keys) -> set[str]:
    """The keys of `keys` that the variants remove (the text encoders' optional keys need the config)."""
    keys = list(keys)
    drop: set[str] = set()
    last = {k for layer in last_layer_keys(config).values() for k in layer} if config else set()
    if "pruned" in variants:
        drop |= last
    if "no-optional" in variants and config:
        drop |= set(optional_keys(config)) - last
    if "unet-only" in variants:
        drop |= {k for k in keys if not k.startswith(UNET)}
    vae = [k for k in keys if k.startswith(VAE)]
    if "no-vae" in variants:
        drop |= set(vae)
    if "partial-vae" in variants:
        drop |= set(vae[_PARTIAL_VAE_KEYS:])
    return drop


def _added(infos: dict[str, TensorInfo], variants: tuple[str, ...]) -> dict[str, tuple[TensorInfo, str | None]]:
    """Keys the variants add: key -> (info, the key whose value it copies, or None for a fixed value)."""
    out: dict[str, tuple[TensorInfo, str | None]] = {}
    if "ema" in variants:
        for key, info in infos.items():
            if key.startswith(UNET):
                out[ema_key(key)] = (TensorInfo(info.shape, info.dtype), key)
        out[EMA_PREFIX + "decay"] = (TensorInfo((), torch.float32), None)
        out[EMA_PREFIX + "num_updates"] = (TensorInfo((), torch.int32), None)
    if "vpred" in variants:
        for key in MARKER_KEYS:
            out[key] = (TensorInfo((0,), torch.int64), None)
    if "schedule" in variants:
        for key in schedule_buffers():
            out[key] = (TensorInfo((_SCHEDULE_STEPS,), torch.float32), None)
    return out


def _fixed_value(key: str, info: TensorInfo) -> torch.Tensor:
    if key == POSITION_IDS:
        return torch.arange(info.shape[1], dtype=torch.int64).reshape(info.shape)
    if key in SCHEDULE_BUFFERS:
        return schedule_buffers()[key]
    if key == EMA_PREFIX + "decay":
        return torch.tensor(0.9999)
    return torch.zeros(info.shape, dtype=info.dtype)


@dataclass
class SyntheticPlan:
    """What a synthetic file holds: every key's info, and where a key's value comes from."""
    infos: dict[str, TensorInfo]
    copies: dict[str, str]   # key -> the key whose (random or base) value it repeats (EMA copies)
    rename: dict[str, str]   # output key -> layout key (a standalone VAE drops the prefix)


def synthetic_plan(config: SDXLConfig, dtype: torch.dtype, variants: tuple[str, ...] = ()) -> SyntheticPlan:
    shapes = sdxl_shapes(config)
    if "vae-only" in variants:
        rename = {k.removeprefix(VAE): k for k in shapes if k.startswith(VAE)}
        return SyntheticPlan({k: TensorInfo(shapes[v], _dtype_of(v, dtype, variants)) for k, v in rename.items()},
                             {}, rename)
    drop = _dropped(config, variants, shapes)
    infos = {k: TensorInfo(s, torch.int64 if k == POSITION_IDS else _dtype_of(k, dtype, variants))
             for k, s in shapes.items() if k not in drop}
    added = _added(infos, variants)
    infos.update({k: info for k, (info, _) in added.items()})
    return SyntheticPlan(infos, {k: src for k, (_, src) in added.items() if src}, {})


def synthetic_tensors(plan: SyntheticPlan, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    for key, info in plan.infos.items():
        source = plan.copies.get(key) or plan.rename.get(key, key)
        if key_kind(source) == WEIGHT and info.dtype.is_floating_point:
            yield key, random_tensor(source, info.shape, seed).to(info.dtype)
        else:
            yield key, _fixed_value(key, info)


def drifted_tensors(base: Checkpoint, seed: int, drift: float, infos: Mapping[str, TensorInfo],
                    copies: Mapping[str, str] = {}) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors plus seeded noise of relative size `drift` (per tensor, against its RMS), cast to
    `infos`' dtypes; keys the base lacks are EMA copies of drifted keys, or fixed values (markers, schedules)."""
    for key, info in infos.items():
        source = copies.get(key, key)
        if source not in base.infos:
            yield key, _fixed_value(key, info)
            continue
        tensor = base.get(source)
        if tensor.is_floating_point() and tensor.numel() and drift and key_kind(source) == WEIGHT:
            t32 = tensor.to(torch.float32)
            rms = t32.square().mean().sqrt()
            noise = torch.randn(tensor.shape, generator=_generator(seed, source))
            tensor = t32 + drift * rms * noise
        yield key, tensor.to(info.dtype)


def description(seed: int, base_title: str | None = None, drift: float | None = None) -> str:
    """The `modelspec.description` of a synthetic checkpoint: its own seed, and for a fine-tune its base."""
    if base_title is None:
        return f"synthetic SDXL-topology checkpoint (seed {seed}) made by lib_rebasin"
    return f"synthetic SDXL-topology fine-tune of {base_title} (seed {seed}, drift {drift:g}) made by lib_rebasin"


def model_metadata(config: SDXLConfig, seed: int, title: str, variants: tuple[str, ...] = ()) -> dict[str, str]:
    architecture = "stable-diffusion-xl-v1-refiner" if config.kind == REFINER else "stable-diffusion-xl-v1-base"
    out = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture + ("/inpaint" if "inpaint" in variants else ""),
        "modelspec.title": title,
        "modelspec.description": description(seed),
        "lib_rebasin.synthetic": json_config(config),
    }
    if variants:
        out["lib_rebasin.variants"] = ",".join(variants)
    return out


def json_config(config: SDXLConfig) -> str:
    import json
    return json.dumps(config.to_dict(), separators=(",", ":"))


def write_synthetic(out: str | os.PathLike, *, scale: str = "full", seed: int = 0,
                    dtype: torch.dtype | None = None, base: str | os.PathLike | None = None,
                    drift: float = 0.01, unet_only: bool = False, markers: bool = False,
                    variants: str | list[str] | tuple[str, ...] = (), overwrite: bool = False,
                    monitor: Monitor = SILENT) -> str:
    """Write a synthetic SDXL checkpoint, or (with `base`) a seeded drift of an existing one.

    `variants` (see VARIANTS) imitate real files' quirks; with `base` only those that drop or add keys apply.
    `dtype`: of the float tensors (default fp16; with `base`, the base's)."""
    variants = parse_variants(list(variants if not isinstance(variants, str) else [variants])
                              + (["unet-only"] if unet_only else []) + (["vpred"] if markers else []))
    title = os.path.splitext(os.path.basename(out))[0]
    if base is not None:
        fresh = [v for v in variants if v in _ARCHITECTURE_VARIANTS + ("vae-only", "mixed-dtype")]
        if fresh:
            raise ValueError(f"variant {fresh[0]} makes a new model: not with --base")
        with Checkpoint(base) as source:
            config = analyse(source.shapes).config
            if config is None and any(v in variants for v in ("pruned", "no-optional")):
                raise ValueError(f"{base}: not an SDXL checkpoint whose layout is understood")
            drop = _dropped(config, variants, source.keys()) if config else set()
            infos = {k: TensorInfo(i.shape, i.dtype if dtype is None or not i.dtype.is_floating_point
                                   or key_kind(k) != WEIGHT else dtype)
                     for k, i in source.infos.items() if k not in drop}
            added = {k: v for k, v in _added(infos, variants).items() if k not in infos}
            infos.update({k: info for k, (info, _) in added.items()})
            copies = {k: src for k, (_, src) in added.items() if src}
            base_title = source.metadata.get("modelspec.title") or os.path.splitext(os.path.basename(base))[0]
            metadata = dict(source.metadata, **{"modelspec.title": title,
                                                "modelspec.description": description(seed, base_title, drift)})
            if variants:
                metadata["lib_rebasin.variants"] = ",".join(variants)
            writer = SafetensorsWriter(out, infos, metadata, inputs=[base], overwrite=overwrite)
            _stream(writer, drifted_tensors(source, seed, drift, infos, copies), monitor)
        return str(writer.path)
    config = variant_config(scale, variants)
    plan = synthetic_plan(config, dtype or torch.float16, variants)
    writer = SafetensorsWriter(out, plan.infos, model_metadata(config, seed, title, variants), overwrite=overwrite)
    _stream(writer, synthetic_tensors(plan, seed), monitor)
    return str(writer.path)


def _stream(writer: SafetensorsWriter, tensors: Iterator[tuple[str, torch.Tensor]], monitor: Monitor) -> None:
    total = max(writer.size, 1)
    done = 0
    with writer:
        for key, tensor in tensors:
            writer.write(key, tensor)
            done += writer.infos[key].nbytes
            monitor.report(done / total, key)


def synthetic_shapes(scale: str = "full", *, unet_only: bool = False, markers: bool = False,
                     variants: str | list[str] | tuple[str, ...] = ()) -> dict[str, list[int]]:
    variants = parse_variants(list(variants if not isinstance(variants, str) else [variants])
                              + (["unet-only"] if unet_only else []) + (["vpred"] if markers else []))
    plan = synthetic_plan(variant_config(scale, variants), torch.float16, variants)
    return {k: list(i.shape) for k, i in plan.infos.items()}


__all__ = ["write_synthetic", "synthetic_shapes", "random_tensor", "synthetic_plan", "CheckpointError", "VARIANTS",
           "parse_variants", "variant_config"]
