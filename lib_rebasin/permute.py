"""Apply a set of permutations to a checkpoint file, streamed one tensor at a time.

The output computes exactly what the input computes (that is what the spec guarantees): a diagnostic anyone
can run, and the last step of a re-basin.  Tensors keep their dtype and their bits: a permuted tensor is a
reordering of the input's elements, every other key is copied unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import torch

from .anatomy import ARCH_LABELS, SDXL_BASE, SDXL_REFINER, ArchitectureError, analyse, ema_key
from .config import SDXLConfig
from .layout import UNET, component_prefixes
from .checkpoint import Checkpoint, SafetensorsWriter
from .progress import SILENT, Monitor
from .spec.core import Permutations, Spec, axis_indices, is_valid, random_permutations
from .spec.sdxl import COMPONENTS, SPEC_VERSION, sdxl_spec

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def parse_components(text: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """'unet,clip_g' -> ('unet', 'clip_g'); None stays None (every component the file has)."""
    if text is None:
        return None
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        raise ValueError(f"components must be a comma-separated subset of {','.join(COMPONENTS)}, got {text!r}")
    return tuple(dict.fromkeys(names))


def model_config(checkpoints: Sequence) -> SDXLConfig:
    """The SDXL config of one or more checkpoints of one model family: each component's config from the files
    that have it (they must agree), the widest UNet input (an inpainting UNet's extra input channels are fixed
    channels, so it shares every permutable space with a normal one)."""
    configs = []
    for checkpoint in checkpoints:
        anatomy = analyse(checkpoint.shapes)
        if anatomy.architecture not in (SDXL_BASE, SDXL_REFINER):
            raise ArchitectureError(f"{checkpoint.path}: a {ARCH_LABELS[anatomy.architecture]} checkpoint; "
                                    f"the permutation spec covers SDXL base and refiner")
        if anatomy.config is None:
            raise ArchitectureError(f"{checkpoint.path}: {anatomy.config_error}")
        configs.append((checkpoint, anatomy.config))
    first, config = configs[0]
    for checkpoint, other in configs[1:]:
        if other.kind != config.kind:
            raise ArchitectureError(f"{first.path} is an SDXL {config.kind}, {checkpoint.path} an SDXL {other.kind}")
        unet = replace(other.unet, in_channels=config.unet.in_channels)
        if unet != config.unet:
            raise ArchitectureError(f"{checkpoint.path}: its UNet differs from {first.path}'s")
        if other.unet.in_channels > config.unet.in_channels:
            config = replace(config, unet=other.unet)
        for component in ("clip_l", "clip_g"):
            mine, theirs = getattr(config, component), getattr(other, component)
            if mine and theirs and mine != theirs:
                raise ArchitectureError(f"{checkpoint.path}: its {component} differs from {first.path}'s")
            if theirs and not mine:
                config = replace(config, **{component: theirs})
    return replace(config, vae=None)


def spec_for_models(checkpoints: Sequence, components: Iterable[str] | None = None) -> Spec:
    """The spec of one or more SDXL checkpoints of one family, bound to every key any of them has: a key only
    one file has (a layer the others pruned) is still moved into the common basis.  Keys no group binds (VAE,
    position_ids, logit_scale, markers, unknown keys) are in `passthrough`.

    `components` None means every permutable component the files have; asking for one they lack is an error."""
    config = model_config(checkpoints)
    keys = set().union(*(c.keys() for c in checkpoints))
    prefixes = component_prefixes(config)
    present = tuple(c for c in COMPONENTS if c in prefixes and any(k.startswith(prefixes[c]) for k in keys))
    if components is None:
        components = present
    missing = [c for c in components if c not in present]
    if missing:
        names = ", ".join(str(c.path) for c in checkpoints)
        raise ArchitectureError(f"{names}: has no {', '.join(missing)} to permute (it has {', '.join(present)})")
    return sdxl_spec(config, components).restricted(keys)


def spec_for_checkpoint(checkpoint: Checkpoint, components: Iterable[str] | None = None) -> Spec:
    """The spec of one SDXL checkpoint (see `spec_for_models`)."""
    return spec_for_models([checkpoint], components)


def check_permutations(spec: Spec, perms: Mapping[str, torch.Tensor]) -> Permutations:
    """Every named group must exist and get a valid permutation; groups not named stay the identity."""
    unknown = sorted(set(perms) - set(spec.groups))
    if unknown:
        raise ValueError(f"permutations for groups this spec does not have, e.g. {unknown[0]} "
                         f"(spec {SPEC_VERSION}, {len(unknown)} unknown)")
    invalid = [name for name, p in perms.items() if not is_valid(spec.groups[name], p)]
    if invalid:
        raise ValueError(f"invalid permutation for {invalid[0]} ({len(invalid)} invalid): it would change "
                         f"what the model computes")
    return dict(perms)


def reorder(tensor: torch.Tensor, indices: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Gather along each axis on the raw bits, so any dtype (fp8 included) is moved bit for bit."""
    bits = _BITS[tensor.element_size()]
    moved = tensor.view(bits) if tensor.dtype != bits else tensor
    for axis, index in indices:
        moved = moved.index_select(axis, index)
    return moved.view(tensor.dtype) if tensor.dtype != bits else moved


@dataclass
class PermuteResult:
    path: str
    spec: Spec
    permutations: Permutations
    permuted_keys: list[str]  # keys whose tensor was reordered (the rest were copied)


def permute_file(src: str | os.PathLike, dst: str | os.PathLike, perms_or_seed: int | Mapping[str, torch.Tensor],
                 components: Iterable[str] | None = None, monitor: Monitor = SILENT,
                 overwrite: bool = False) -> PermuteResult:
    """Write `dst`: `src` with a set of permutations applied (or a uniformly random valid set from a seed).

    Everything is checked before the output is opened; the output appears only when complete."""
    components = parse_components(components)
    with Checkpoint(src) as checkpoint:
        spec = spec_for_checkpoint(checkpoint, components)
        if isinstance(perms_or_seed, int):
            seed = perms_or_seed
            perms = random_permutations(spec, seed)
        else:
            seed = None
            perms = check_permutations(spec, perms_or_seed)
        by_key = spec.by_key()
        twins = {ema_key(k): k for k in by_key if k.startswith(UNET)}  # an EMA copy moves with its weight
        note = {"spec_version": SPEC_VERSION, "seed": seed,
                "components": sorted({name.split(".", 1)[0] for name in spec.groups})}
        metadata = dict(checkpoint.metadata, **{"lib_rebasin.permuted": json.dumps(note)})
        writer = SafetensorsWriter(dst, checkpoint.infos, metadata, inputs=[src], overwrite=overwrite)
        total, done, permuted = max(checkpoint.nbytes, 1), 0, []
        with writer:
            for key in writer.keys:
                info = checkpoint.infos[key]
                tensor = checkpoint.get(key)
                bound = twins.get(key, key)
                indices = axis_indices(by_key, bound, info.shape, perms) if bound in by_key else []
                if indices:
                    tensor = reorder(tensor, indices)
                    permuted.append(key)
                writer.write(key, tensor)
                done += info.nbytes
                monitor.report(done / total, key)
    return PermuteResult(str(writer.path), spec, perms, permuted)
