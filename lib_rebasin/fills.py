"""Tensors a merge writes that no input holds as they are, as tensor sources the merge pipeline reads like files.

- `FillSource`: keys every input lacks but a webui needs (a text encoder's pruned last layer, CLIP-L's
  position_ids): zeros — what A1111 puts in a parameter a file lacks, and for a pre-LN layer the identity, so the
  output computes what the inputs compute in A1111 — and 0…76 for position_ids.
- `WidenedSource`: a normal UNet's input conv read next to an inpainting one (`layout.UNET_INPUT`, 4 against 9
  input channels), widened with the other model's extra channels, so every formula merges the 4 latent channels
  and passes the extra ones through from the model that has them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .checkpoint import TensorInfo
from .layout import POSITION_IDS, UNET_INPUT

WIDENABLE = {UNET_INPUT: 1}  # key -> the one axis that may differ between models of one family (input channels)


def fill_tensor(key: str, info: TensorInfo) -> torch.Tensor:
    if key == POSITION_IDS:
        return torch.arange(info.shape[-1], dtype=info.dtype).reshape(info.shape)
    return torch.zeros(info.shape, dtype=info.dtype)


class FillSource:
    """Fill values for the given keys, read like a file."""

    def __init__(self, infos: Mapping[str, TensorInfo]):
        self.infos = dict(infos)
        self.shapes = {k: i.shape for k, i in self.infos.items()}

    def get(self, key: str) -> torch.Tensor:
        return fill_tensor(key, self.infos[key])


def widened_shape(key: str, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The common shape of models whose `key` differs only on its widenable axis (else None)."""
    axis = WIDENABLE.get(key)
    shapes = [tuple(s) for s in shapes]
    if axis is None or len({len(s) for s in shapes}) != 1:
        return None
    rest = {s[:axis] + s[axis + 1:] for s in shapes}
    if len(rest) != 1:
        return None
    widest = max(shapes, key=lambda s: s[axis])
    return widest


class WidenedSource:
    """`source` with the keys in `shapes` widened to those shapes, the extra channels read from `donors[key]` (in
    the same basis: the permuted model when `source` is A, A when `source` is a permuted B).  The result has the
    wider dtype of the two, so extra channels are carried bit for bit."""

    def __init__(self, source, donors: Mapping[str, object], shapes: Mapping[str, tuple[int, ...]]):
        self.source, self.donors = source, donors
        self.widen = {k: tuple(s) for k, s in shapes.items() if tuple(source.shapes[k]) != tuple(s)}
        self.shapes = {**source.shapes, **self.widen}
        infos = getattr(source, "infos", None)
        self.infos = None if infos is None else {
            **infos, **{k: TensorInfo(s, infos[k].dtype, infos[k].offset) for k, s in self.widen.items()}}

    def prefetch(self, keys) -> None:
        keys = list(keys)
        if hasattr(self.source, "prefetch"):
            self.source.prefetch(keys)
        for key in keys:
            if key in self.widen and hasattr(self.donors[key], "prefetch"):
                self.donors[key].prefetch([key])

    def get(self, key: str) -> torch.Tensor:
        tensor = self.source.get(key)
        if key not in self.widen:
            return tensor
        extra = self.donors[key].get(key)
        dtype = torch.promote_types(tensor.dtype, extra.dtype)
        out = extra.to(dtype, copy=True)
        out[tuple(slice(0, n) for n in tensor.shape)] = tensor.to(dtype)
        return out


def plan_readers(readers: Mapping[str, object], operands: Sequence[str], fills: Mapping[str, TensorInfo],
                 widen: Mapping[str, tuple[int, ...]]) -> dict[str, object]:
    """The readers a merge plan needs: 'fill' for the keys it fills in, and every operand widened where the plan
    widens a key (the extra channels from the first operand that has them)."""
    out = dict(readers)
    if fills:
        out["fill"] = FillSource(fills)
    if widen:
        donors = {key: next(readers[r] for r in operands if tuple(readers[r].shapes[key]) == tuple(shape))
                  for key, shape in widen.items()}
        for role in operands:
            out[role] = WidenedSource(readers[role], donors, widen)
    return out
