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
from typing import Iterator

import torch

from .checkpoint import Checkpoint, CheckpointError, SafetensorsWriter, TensorInfo
from .config import SDXLConfig, sdxl_preset
from .layout import CLIP_G, CLIP_L, UNET, sdxl_shapes
from .progress import SILENT, Monitor

MARKER_KEYS = ("v_pred", "ztsnr")
POSITION_IDS = CLIP_L + "embeddings.position_ids"
LOGIT_SCALE = CLIP_G + "logit_scale"
_NORM = re.compile(r"(norm|ln_|layer_norm|in_layers\.0|out_layers\.0|out\.0)[^.]*\.weight$|norm\.weight$")


def key_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(seed, key))


def random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 tensor for `key` with the magnitude of a trained SDXL weight of that kind."""
    g = _generator(seed, key)
    if key == LOGIT_SCALE:
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


def synthetic_infos(config: SDXLConfig, dtype: torch.dtype, *, unet_only: bool = False,
                    markers: bool = False) -> dict[str, TensorInfo]:
    shapes = sdxl_shapes(config)
    infos = {}
    for key, shape in shapes.items():
        if unet_only and not key.startswith(UNET):
            continue
        infos[key] = TensorInfo(shape, torch.int64 if key == POSITION_IDS else dtype)
    if markers:
        for key in MARKER_KEYS:
            infos[key] = TensorInfo((0,), torch.int64)
    return infos


def synthetic_tensors(infos: dict[str, TensorInfo], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    for key, info in infos.items():
        if key == POSITION_IDS:
            yield key, torch.arange(info.shape[1], dtype=torch.int64).reshape(info.shape)
        elif info.dtype == torch.int64:
            yield key, torch.zeros(info.shape, dtype=torch.int64)
        else:
            yield key, random_tensor(key, info.shape, seed).to(info.dtype)


def drifted_tensors(base: Checkpoint, seed: int, drift: float) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors plus seeded noise of relative size `drift` (per tensor, against its RMS)."""
    for key in base.keys():
        tensor = base.get(key)
        if not tensor.is_floating_point() or tensor.numel() == 0:
            yield key, tensor
            continue
        t32 = tensor.to(torch.float32)
        rms = t32.square().mean().sqrt()
        noise = torch.randn(tensor.shape, generator=_generator(seed, key))
        yield key, (t32 + drift * rms * noise).to(tensor.dtype)


def model_metadata(config: SDXLConfig, seed: int, title: str) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.title": title,
        "modelspec.description": f"synthetic SDXL-topology checkpoint (seed {seed}) made by lib_rebasin",
        "lib_rebasin.synthetic": json_config(config),
    }


def json_config(config: SDXLConfig) -> str:
    import json
    return json.dumps(config.to_dict(), separators=(",", ":"))


def write_synthetic(out: str | os.PathLike, *, scale: str = "full", seed: int = 0,
                    dtype: torch.dtype = torch.float16, base: str | os.PathLike | None = None,
                    drift: float = 0.01, unet_only: bool = False, markers: bool = False,
                    overwrite: bool = False, monitor: Monitor = SILENT) -> str:
    """Write a synthetic SDXL checkpoint, or (with `base`) a seeded drift of an existing one."""
    title = os.path.splitext(os.path.basename(out))[0]
    if base is not None:
        with Checkpoint(base) as source:
            metadata = dict(source.metadata, **{"modelspec.title": title})
            writer = SafetensorsWriter(out, source.infos, metadata, inputs=[base], overwrite=overwrite)
            _stream(writer, drifted_tensors(source, seed, drift), monitor)
        return str(writer.path)
    config = sdxl_preset(scale)
    infos = synthetic_infos(config, dtype, unet_only=unet_only, markers=markers)
    writer = SafetensorsWriter(out, infos, model_metadata(config, seed, title), overwrite=overwrite)
    _stream(writer, synthetic_tensors(infos, seed), monitor)
    return str(writer.path)


def _stream(writer: SafetensorsWriter, tensors: Iterator[tuple[str, torch.Tensor]], monitor: Monitor) -> None:
    total = max(writer.size, 1)
    done = 0
    with writer:
        for key, tensor in tensors:
            writer.write(key, tensor)
            done += writer.infos[key].nbytes
            monitor.report(done / total, key)


def synthetic_shapes(scale: str = "full", *, unet_only: bool = False, markers: bool = False) -> dict[str, list[int]]:
    infos = synthetic_infos(sdxl_preset(scale), torch.float16, unet_only=unet_only, markers=markers)
    return {k: list(i.shape) for k, i in infos.items()}


__all__ = ["write_synthetic", "synthetic_shapes", "random_tensor", "synthetic_infos", "CheckpointError"]
