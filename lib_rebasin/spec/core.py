"""Permutation specs as data: named groups of channel positions, bound to windows of tensor axes.

A *group* is one channel space of a model (a residual stream, a hidden layer, the heads of an attention).
A permutation of a group is a LongTensor `perm` of its positions with the convention
`permuted[..., i, ...] = original[..., perm[i], ...]` on every window the group is bound to.

A *binding* ties a window of a tensor axis (`offset`, `width`) to positions `group_offset …` of a group, so one
group can appear several times on one axis (GEGLU halves, the q/k/v thirds of a fused in_proj) and one axis
can hold several groups (a decoder concat `[h | skip]`).

A *structure* says which permutations are legitimate: positions are partitioned into superblocks, each a list
of atoms (ranges of positions).  A valid permutation maps every superblock onto a superblock of the same
class, atom k onto atom k, and is arbitrary inside an atom.  A group without structure is free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

OUT, IN, PARAM = "out", "in", "param"  # binding roles: produces the space, reads it, or follows its producer
FIXED = "fixed"  # role of a `Spec.fixed` window: channels that no permutation may move


@dataclass(frozen=True)
class Binding:
    key: str
    axis: int
    offset: int
    width: int
    group_offset: int = 0
    role: str = PARAM


@dataclass(frozen=True)
class Structure:
    blocks: tuple[tuple[range, ...], ...]  # superblocks, each a tuple of atoms
    classes: tuple[int, ...]               # per superblock; only blocks of one class may trade places

    @property
    def atoms(self) -> list[range]:
        return [atom for block in self.blocks for atom in block]


@dataclass
class Group:
    name: str
    size: int
    kind: str
    bindings: list[Binding] = field(default_factory=list)
    structure: Structure | None = None  # None: any permutation is valid

    @property
    def is_free(self) -> bool:
        return self.structure is None

    def effective_structure(self) -> Structure:
        return self.structure or Structure(((range(self.size),),), (0,))


Permutations = dict[str, torch.Tensor]


@dataclass
class Spec:
    groups: dict[str, Group]
    passthrough: set[str] = field(default_factory=set)  # keys with no permutable axis (explicitly unpermuted)
    # Windows of bound keys' channel axes that must never move (latent in/out, token positions, the size
    # embeddings of the ADM vector, context columns of a text encoder that is not permuted, ...).
    fixed: list[Binding] = field(default_factory=list)

    def by_key(self) -> dict[str, list[tuple[Group, Binding]]]:
        out: dict[str, list[tuple[Group, Binding]]] = {}
        for group in self.groups.values():
            for b in group.bindings:
                out.setdefault(b.key, []).append((group, b))
        return out

    def keys(self) -> set[str]:
        return {b.key for g in self.groups.values() for b in g.bindings}

    def restricted(self, keys: Iterable[str]) -> "Spec":
        """The spec of a file that holds only `keys` (others pruned or optional): bindings of absent keys go,
        and so do groups left without any.  Exact for the file as a loader sees it: an absent tensor is zeros
        there (what the webuis fill in), and permuting zeros changes nothing."""
        keys = set(keys)
        groups = {}
        for name, group in self.groups.items():
            bindings = [b for b in group.bindings if b.key in keys]
            if bindings:
                groups[name] = Group(group.name, group.size, group.kind, bindings, group.structure)
        bound = {b.key for g in groups.values() for b in g.bindings}
        return Spec(groups, passthrough=keys - bound, fixed=[b for b in self.fixed if b.key in bound])


# --- structures --------------------------------------------------------------------------------------------

def structure_from_partitions(size: int, cut_sets: Iterable[Iterable[int]],
                              pinned: Iterable[range] = ()) -> Structure | None:
    """The structure that keeps every partition of [0, size) intact.

    Each cut set lists the boundaries of one partition (e.g. the group edges of one GroupNorm that reads the
    space).  Atoms are the cells of the common refinement; superblocks are the cells of the coarsest common
    coarsening, i.e. split only where every partition has a cut.  Two superblocks share a class when every
    partition cuts them at the same relative places; a superblock that overlaps a pinned range (part of a
    norm group that continues into another space) gets a class of its own.
    """
    partitions = [sorted({0, size, *(c for c in cuts if 0 < c < size)}) for cuts in cut_sets]
    if not partitions:
        return None
    atom_cuts = sorted(set().union(*map(set, partitions)))
    block_cuts = sorted(set.intersection(*map(set, partitions)))
    pinned = list(pinned)
    blocks, classes, class_ids = [], [], {}
    for begin, end in zip(block_cuts, block_cuts[1:]):
        atoms = tuple(range(a, b) for a, b in zip(atom_cuts, atom_cuts[1:]) if begin <= a and b <= end)
        signature = tuple(tuple(c - begin for c in cuts if begin <= c <= end) for cuts in partitions)
        if any(p.start < end and begin < p.stop for p in pinned):
            signature = ("pinned", begin)
        blocks.append(atoms)
        classes.append(class_ids.setdefault(signature, len(class_ids)))
    if len(blocks) == 1 and len(blocks[0]) == 1:
        return None
    return Structure(tuple(blocks), tuple(classes))


def heads_structure(heads: int, head_width: int) -> Structure:
    """Attention heads over a group laid out as [q/k space | v/o space]: heads trade places as wholes, and
    inside a head the q/k and v/o channels permute independently."""
    total = heads * head_width
    blocks = tuple((range(h * head_width, (h + 1) * head_width),
                    range(total + h * head_width, total + (h + 1) * head_width)) for h in range(heads))
    return Structure(blocks, (0,) * heads)


# --- permutations ------------------------------------------------------------------------------------------

def identity(spec: Spec) -> Permutations:
    return {name: torch.arange(g.size) for name, g in spec.groups.items()}


def is_identity(perm: torch.Tensor) -> bool:
    return bool(torch.equal(perm, torch.arange(len(perm))))


def random_permutation(group: Group, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random valid permutation of the group."""
    structure = group.effective_structure()
    perm = torch.empty(group.size, dtype=torch.long)
    for cls in sorted(set(structure.classes)):
        members = [i for i, c in enumerate(structure.classes) if c == cls]
        sources = [members[i] for i in torch.randperm(len(members), generator=generator)]
        for target, source in zip(members, sources):
            for t_atom, s_atom in zip(structure.blocks[target], structure.blocks[source]):
                inner = torch.randperm(len(s_atom), generator=generator)
                perm[t_atom.start:t_atom.stop] = s_atom.start + inner
    return perm


def random_permutations(spec: Spec, seed: int) -> Permutations:
    generator = torch.Generator().manual_seed(seed)
    return {name: random_permutation(g, generator) for name, g in spec.groups.items()}


def compose(first: Permutations, then: Permutations) -> Permutations:
    """The set that applies `first`, then `then`: applying it equals applying both in that order."""
    return {name: first[name][then[name]] for name in first}


def invert(perms: Permutations) -> Permutations:
    out = {}
    for name, p in perms.items():
        inv = torch.empty_like(p)
        inv[p] = torch.arange(len(p))
        out[name] = inv
    return out


def is_valid(group: Group, perm: torch.Tensor) -> bool:
    if perm.shape != (group.size,) or not torch.equal(torch.sort(perm).values, torch.arange(group.size)):
        return False
    structure = group.effective_structure()
    block_of = torch.empty(group.size, dtype=torch.long)
    atom_of = torch.empty(group.size, dtype=torch.long)  # index of the atom inside its superblock
    for b, block in enumerate(structure.blocks):
        for k, atom in enumerate(block):
            block_of[atom.start:atom.stop] = b
            atom_of[atom.start:atom.stop] = k
    source = block_of[perm]
    if not torch.equal(atom_of[perm], atom_of):  # atom k of a superblock must come from an atom k
        return False
    blocks = len(structure.blocks)
    lowest = torch.full((blocks,), blocks).scatter_reduce(0, block_of, source, "amin")
    highest = torch.full((blocks,), -1).scatter_reduce(0, block_of, source, "amax")
    if not torch.equal(lowest, highest):  # every superblock comes from a single superblock
        return False
    classes = torch.tensor(structure.classes)
    return bool(torch.equal(classes[lowest], classes))


# --- applying ----------------------------------------------------------------------------------------------

def axis_indices(spec_by_key: Mapping[str, list[tuple[Group, Binding]]], key: str, shape: tuple[int, ...],
                 perms: Permutations) -> list[tuple[int, torch.Tensor]]:
    """Per permuted axis of `key`, the full gather index for that axis (identity outside bound windows)."""
    per_axis: dict[int, torch.Tensor] = {}
    for group, b in spec_by_key.get(key, ()):
        perm = perms.get(group.name)
        if perm is None:
            continue
        index = per_axis.setdefault(b.axis, torch.arange(shape[b.axis]))
        window = perm[b.group_offset:b.group_offset + b.width] - b.group_offset
        if len(window) != b.width or (b.width and (window.min() < 0 or window.max() >= b.width)):
            raise ValueError(f"permutation of {group.name} moves channels across the window "
                             f"{b.group_offset}:{b.group_offset + b.width} bound to {key} axis {b.axis}")
        index[b.offset:b.offset + b.width] = b.offset + window
    return [(axis, index) for axis, index in per_axis.items()
            if not torch.equal(index, torch.arange(len(index)))]


def permute_tensor(tensor: torch.Tensor, indices: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    for axis, index in indices:
        tensor = tensor.index_select(axis, index)
    return tensor


def apply_to_state_dict(spec: Spec, state: Mapping[str, torch.Tensor], perms: Permutations) -> dict[str, torch.Tensor]:
    """Permute an in-memory state dict (tests, small models); streamed files go through `permute_file`."""
    by_key = spec.by_key()
    return {k: permute_tensor(t, axis_indices(by_key, k, tuple(t.shape), perms)) for k, t in state.items()}
