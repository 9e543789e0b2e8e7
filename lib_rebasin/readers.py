"""Views of checkpoints that change tensors as they are read: permuted, amplified, averaged.

They are what re-basin feeds to the matcher and to the merge pipeline in place of a file: each has the
`get(key)` / `shapes` of a tensor source, and `infos` / `prefetch` where the merge pipeline needs them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .checkpoint import Checkpoint, TensorInfo
from .merge import amplified_difference
from .permute import reorder
from .spec.core import Permutations, Spec, axis_indices


class PermutedReader:
    """A source with a permutation set applied to every tensor as it is read (bit for bit)."""

    def __init__(self, source, spec: Spec, perms: Permutations):
        self.source, self.perms = source, perms
        self.by_key = spec.by_key()
        self.infos: dict[str, TensorInfo] | None = getattr(source, "infos", None)
        self.shapes = source.shapes

    def prefetch(self, keys) -> None:
        _prefetch(self.source, keys)

    def get(self, key: str) -> torch.Tensor:
        tensor = self.source.get(key)
        if key not in self.by_key:
            return tensor
        indices = axis_indices(self.by_key, key, tuple(tensor.shape), self.perms)
        return reorder(tensor, indices) if indices else tensor


class AmplifiedReader:
    """amp = A + M·(B − A), computed in float32 per key; keys that cannot be merged come from A as they are."""

    def __init__(self, a: Checkpoint, b: Checkpoint, multiplier: float):
        self.a, self.b, self.multiplier = a, b, multiplier
        self.amplified = {key for key, info in a.infos.items()
                          if key in b.infos and b.infos[key].shape == info.shape and _mergeable(key, info, b.infos[key])}
        self.infos: dict[str, TensorInfo] = {
            key: TensorInfo(info.shape, torch.float32) if key in self.amplified else info
            for key, info in a.infos.items()}
        self.shapes = {k: i.shape for k, i in self.infos.items()}

    def prefetch(self, keys) -> None:
        keys = list(keys)
        _prefetch(self.a, keys)
        _prefetch(self.b, [k for k in keys if k in self.amplified])

    def get(self, key: str) -> torch.Tensor:
        if key not in self.amplified:
            return self.a.get(key)
        return amplified_difference(self.a.get(key).float(), self.b.get(key).float(), self.multiplier)


class MeanReader:
    """The float32 mean of several (permuted) sources, read key by key: MergeMany's target."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self.shapes = self.sources[0].shapes

    def get(self, key: str) -> torch.Tensor:
        total = self.sources[0].get(key).float()
        for source in self.sources[1:]:
            total = total + source.get(key).float()
        return total / len(self.sources)


def _prefetch(source, keys) -> None:
    """Pass a read-ahead hint on to the file behind a reader (the merge pipeline sends them)."""
    if hasattr(source, "prefetch"):
        source.prefetch(keys)


def _mergeable(key: str, *infos: TensorInfo) -> bool:
    return not key.endswith("position_ids") and all(i.dtype.is_floating_point for i in infos)
