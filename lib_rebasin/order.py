"""The order in which matching visits permutation groups: next, the group whose cost will say the most.

A group's cost sums one product per tensor it is bound to.  A product carries signal only when every other
permuted axis of its tensor is already in A's basis: fixed channels, a one-dimensional tensor, or groups
that are settled; with an axis still in B's basis it is noise.  When B's basis differs from A's everywhere (a
model trained separately, a planted permutation), a random order solves most groups from noise: hard
assignments (seconds each at 5120 channels) whose answers a later sweep undoes.  Visiting next the unsettled
group with the best expected signal-to-noise ratio grows the settled region from the anchors (the fixed
latent, timestep, vocabulary and size-embedding channels) outwards, so that nearly every cost is decided by
a certificate when it is computed.

Expected figures come from shapes alone: a window of depth `d` of a tensor whose entries have variance `v`
adds about `d·v` to an aligned diagonal and noise of variance `d·v²` when it is not aligned.  Weights are
taken to have variance 1 / fan-in (as initialised and, roughly, as trained), the entries of a vector that
follows a group (bias, norm scale) `VECTOR_VARIANCE` around their mean.  The order only changes how fast
matching gets there, never what it proves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

VECTOR_VARIANCE = 0.04


@dataclass(frozen=True)
class Use:
    """One tensor a group is bound to: the groups on its other axes, and its expected signal and noise."""
    others: frozenset[str]
    signal: float
    noise: float


def expected_use(shape: Sequence[int], axis: int, width: int, size: int, others: Iterable[str]) -> Use:
    """The expected contribution of `width` positions (of a group of `size`) bound to `axis` of a tensor."""
    share = width / size
    if len(shape) < 2:
        return Use(frozenset(others), share * VECTOR_VARIANCE, 0.0)
    depth = math.prod(shape) // shape[axis]
    variance = 1.0 / max(math.prod(shape[1:]), 1)
    return Use(frozenset(others), share * depth * variance, share * depth * variance * variance)


class VisitOrder:
    """Picks the next group to visit: the best expected signal-to-noise among the candidates (ties broken by
    a seeded random rank), updated as groups settle."""

    def __init__(self, uses: Mapping[str, Sequence[Use]], seed: int):
        names = sorted(uses)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        self.rank = {names[i]: r for r, i in enumerate(torch.randperm(len(names), generator=generator).tolist())}
        self.uses = {name: list(group_uses) for name, group_uses in uses.items()}
        self.settled: set[str] = set()
        self.signal = {name: 0.0 for name in names}
        self.noise = {name: 0.0 for name in names}
        self.missing: dict[tuple[str, int], int] = {}
        self.waiting: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
        for name, group_uses in self.uses.items():
            for index, use in enumerate(group_uses):
                self.missing[name, index] = len(use.others)
                for other in use.others:
                    self.waiting[other].append((name, index))
            self._sum(name)

    def _sum(self, name: str) -> None:
        uses = self.uses[name]
        self.signal[name] = sum(u.signal for i, u in enumerate(uses) if not self.missing[name, i])
        self.noise[name] = sum(u.noise for i, u in enumerate(uses) if self.missing[name, i])

    def score(self, name: str) -> float:
        return self.signal[name] / math.sqrt(self.noise[name] + 1e-30)

    def settle(self, names: Iterable[str]) -> None:
        self._change(names, True)

    def unsettle(self, names: Iterable[str]) -> None:
        self._change(names, False)

    def _change(self, names: Iterable[str], settle: bool) -> None:
        touched = set()
        for name in names:
            if (name in self.settled) == settle:
                continue
            if settle:
                self.settled.add(name)
            else:
                self.settled.discard(name)
            for group, index in self.waiting[name]:
                self.missing[group, index] += -1 if settle else 1
                touched.add(group)
        for group in touched:
            self._sum(group)

    def next(self, candidates: Iterable[str]) -> str:
        return max(candidates, key=lambda name: (self.score(name), -self.rank[name]))

    def sequence(self, candidates: Iterable[str]) -> list[str]:
        """The order in which to visit `candidates`, each settling before the next is chosen."""
        left, out = set(candidates), []
        while left:
            name = self.next(left)
            left.discard(name)
            self.settle([name])
            out.append(name)
        return out

    def best(self, candidates: Iterable[str]) -> list[str]:
        """`candidates` from the best-informed to the least, as things stand (nothing settles meanwhile)."""
        return sorted(candidates, key=lambda name: (-self.score(name), self.rank[name]))
