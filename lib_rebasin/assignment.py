"""Exact linear assignment over the valid permutations of one group, with certificates that skip the solver.

A cost matrix `C[i, j]` scores "position i takes the channel at position j"; a permutation `perm` is worth
`Σ_i C[i, perm[i]]`.  For a free group any permutation is valid and one assignment solves it.  For a
structured group (GroupNorm superblocks, attention heads) only permutations that move whole superblocks
onto superblocks of the same class, atom k onto atom k, are valid.  That family is solved exactly in two
levels: a small assignment per (superblock, superblock′) and atom gives a superblock score, then one
assignment over the superblocks of each class.

Most assignments never reach the solver.  If every row's maximum over the entries a valid permutation may
use sits on one valid permutation, that permutation is optimal (no permutation can beat the sum of the row
maxima).  Off-diagonal superblock pairs are only bounded (row- and column-maximum sums) until a bound could
change the answer; the superblock assignment is refined until it uses exact scores only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spec.core import Group


@dataclass
class SolverCount:
    """Assignment problems an exact solver without certificates would solve, and those we actually solved."""
    needed: int = 0
    solved: int = 0

    @property
    def skipped(self) -> int:
        return max(self.needed - self.solved, 0)


@dataclass
class _Class:
    blocks: int                 # superblocks of this class
    cells: list[torch.Tensor]   # per atom index k: (blocks, atom width) positions, superblock order


@dataclass
class Layout:
    """A group's structure as index tensors: which entries of a cost matrix a valid permutation may use."""
    size: int
    classes: list[_Class]
    block_of: torch.Tensor      # position -> superblock
    cell_of: torch.Tensor       # position -> (class, atom index) id; valid permutations keep it
    block_start: torch.Tensor   # superblock -> its first position
    naive_calls: int = field(init=False)

    def __post_init__(self) -> None:
        self.naive_calls = sum(c.blocks * c.blocks * len(c.cells) + (c.blocks > 1) for c in self.classes)

    @property
    def is_free(self) -> bool:
        return len(self.classes) == 1 and self.classes[0].blocks == 1 and len(self.classes[0].cells) == 1

    def cell_positions(self) -> list[torch.Tensor]:
        return [cell.reshape(-1) for c in self.classes for cell in c.cells]

    def is_valid(self, perm: torch.Tensor) -> bool:
        """Vectorised `spec.core.is_valid`: a bijection that keeps cells and moves superblocks whole."""
        perm = perm.cpu()
        if perm.shape != (self.size,):
            return False
        if not torch.equal(torch.sort(perm).values, torch.arange(self.size)):
            return False
        if not torch.equal(self.cell_of[perm], self.cell_of):
            return False
        source_block = self.block_of[perm]
        return bool(torch.equal(source_block, source_block[self.block_start[self.block_of]]))


def layout_of(group: Group) -> Layout:
    """The group's structure (free: one superblock of one atom) as index tensors."""
    structure = group.effective_structure()
    n = group.size
    block_of = torch.empty(n, dtype=torch.long)
    for b, block in enumerate(structure.blocks):
        for atom in block:
            block_of[atom.start:atom.stop] = b
    covered = sum(len(atom) for atom in structure.atoms)
    if covered != n or len(torch.unique(block_of)) != len(structure.blocks):
        raise ValueError(f"group {group.name}: structure does not partition its {n} positions")
    classes: list[_Class] = []
    cell_of = torch.empty(n, dtype=torch.long)
    cell_id = 0
    for cls in sorted(set(structure.classes)):
        members = [b for b, c in enumerate(structure.classes) if c == cls]
        shapes = {tuple(len(a) for a in structure.blocks[b]) for b in members}
        if len(shapes) != 1:
            raise ValueError(f"group {group.name}: superblocks of class {cls} have different atoms {sorted(shapes)}")
        cells = []
        for k in range(len(structure.blocks[members[0]])):
            cell = torch.stack([torch.arange(structure.blocks[b][k].start, structure.blocks[b][k].stop)
                                for b in members])
            cell_of[cell.reshape(-1)] = cell_id
            cell_id += 1
            cells.append(cell)
        classes.append(_Class(len(members), cells))
    block_start = torch.tensor([block[0].start for block in structure.blocks], dtype=torch.long)
    return Layout(n, classes, block_of, cell_of, block_start)


# --- certificates --------------------------------------------------------------------------------------------

def _is_permutation(index: torch.Tensor) -> torch.Tensor:
    """Per leading index, whether the last axis holds a permutation of 0..n-1."""
    n = index.shape[-1]
    return (torch.sort(index, dim=-1).values == torch.arange(n, device=index.device)).all(-1)


@dataclass(frozen=True)
class ErrorBound:
    """|computed − exact| ≤ eps · rows[i] · cols[j] for every entry of a cost matrix."""
    eps: float
    rows: torch.Tensor
    cols: torch.Tensor

    def at(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.eps * self.rows[i] * self.cols[j]


def screen(cost: torch.Tensor, layout: Layout, bound: ErrorBound | None = None) -> torch.Tensor | None:
    """The optimal valid permutation, if the cost proves it; else None.

    With `bound`, `cost` only approximates the exact cost.  A row is decided when its best entry (among the
    entries its cell allows) beats the second best even with the errors stacked against it; if every row is
    decided and the chosen entries form a valid permutation, that permutation is the exact optimum (no valid
    permutation can beat the sum of the row maxima).  Without `bound` the cost is taken as exact and ties
    are left undecided.
    """
    device = cost.device
    perm = torch.empty(layout.size, dtype=torch.long, device=device)
    for positions in layout.cell_positions():
        positions = positions.to(device)
        if len(positions) == 1:
            perm[positions] = positions
            continue
        sub = cost if len(positions) == layout.size else cost[positions][:, positions]
        top = sub.topk(2, dim=1)
        first, second, best = top.values[:, 0], top.values[:, 1], top.indices[:, 0]
        if bound is not None:  # in float64, so that the comparison adds no rounding of its own
            first, second = first.double(), second.double()
            rows, cols = bound.rows[positions].to(first.dtype), bound.cols[positions].to(first.dtype)
            first = first - bound.eps * rows * cols[best]
            second = second + bound.eps * rows * cols.max()
        if not bool((first > second).all()):
            return None
        perm[positions] = positions[best]
    perm = perm.cpu()
    return perm if layout.is_valid(perm) else None


def permutation_value(cost: torch.Tensor, perm: torch.Tensor) -> float:
    rows = torch.arange(len(perm), device=cost.device)
    return float(cost[rows, perm.to(cost.device)].double().sum())


def certified_gain(cost: torch.Tensor, bound: ErrorBound | None, current: torch.Tensor,
                   candidate: torch.Tensor) -> float:
    """A lower bound of how much `candidate` gains over `current` under the exact cost (only the rows that
    move count: the others cancel exactly)."""
    moved = (candidate != current).nonzero().reshape(-1)
    if not len(moved):
        return 0.0
    new, old = candidate[moved], current[moved]
    d = cost.device
    gain = cost[moved.to(d), new.to(d)].double() - cost[moved.to(d), old.to(d)].double()
    if bound is not None:
        rows = bound.rows.double()[moved.to(bound.rows.device)]
        cols = bound.cols.double()
        slack = bound.eps * rows * (cols[new.to(cols.device)] + cols[old.to(cols.device)])
        gain = gain - slack.to(gain.device)
    return float(gain.sum())


def scale_bound(cost: torch.Tensor, bound: ErrorBound | None) -> float:
    """An upper bound of `Σ_i max_j |C_ij|` of the exact cost (the scale of matching's relative tolerance)."""
    scale = float(cost.abs().amax(1).double().sum())
    if bound is not None:
        scale += bound.eps * float((bound.rows.double() * bound.cols.double().max()).sum())
    return scale


# --- exact solve ---------------------------------------------------------------------------------------------

def _lap(cost: torch.Tensor, count: SolverCount) -> torch.Tensor:
    """Row -> column of a maximum-weight perfect matching; the solver runs only without a certificate."""
    best = cost.argmax(1)
    if bool(_is_permutation(best)):
        return best.cpu()
    count.solved += 1
    from scipy.optimize import linear_sum_assignment  # imported when first needed: it takes half a second
    _, cols = linear_sum_assignment(cost.detach().double().cpu().numpy(), maximize=True)
    return torch.from_numpy(cols).long()


class _PairScores:
    """Lazy exact scores of (target superblock, source superblock) pairs of one class, with upper bounds."""

    def __init__(self, cost: torch.Tensor, cls: _Class, whole: bool, count: SolverCount):
        self.count = count
        nb = cls.blocks
        self.tables = []   # per atom: (nb, nb, a, a) cost blocks
        self.proofs = []   # per atom: (row argmax, pairs it solves, column argmax, pairs it solves)
        self.solved: dict[tuple[int, int, int], torch.Tensor] = {}
        exact = torch.zeros(nb, nb, dtype=torch.float64)
        known = torch.ones(nb, nb, dtype=torch.bool)
        upper = torch.zeros(nb, nb, dtype=torch.float64)
        for cell in cls.cells:
            a = cell.shape[1]
            if whole:
                table = cost.view(1, a, 1, a).transpose(1, 2)
            else:
                flat = cell.reshape(-1).to(cost.device)
                table = cost[flat][:, flat].view(nb, a, nb, a).transpose(1, 2)
            row_best, col_best = table.max(-1), table.max(-2)
            row_sum = row_best.values.double().sum(-1).cpu()
            col_sum = col_best.values.double().sum(-1).cpu()
            by_rows = _is_permutation(row_best.indices).cpu()
            by_cols = _is_permutation(col_best.indices).cpu() & ~by_rows
            upper += torch.minimum(row_sum, col_sum)
            exact += torch.where(by_rows, row_sum, torch.where(by_cols, col_sum, 0.0))
            known &= by_rows | by_cols
            self.tables.append(table)
            self.proofs.append((row_best.indices.cpu(), by_rows, col_best.indices.cpu(), by_cols))
        self.exact, self.known, self.upper = exact, known, upper

    def weights(self) -> torch.Tensor:
        return torch.where(self.known, self.exact, self.upper)

    def assignment(self, b: int, s: int, k: int) -> torch.Tensor:
        rows, by_rows, cols, by_cols = self.proofs[k]
        if by_rows[b, s]:
            return rows[b, s]
        if by_cols[b, s]:
            return torch.argsort(cols[b, s])
        if (b, s, k) not in self.solved:
            self.solved[b, s, k] = _lap(self.tables[k][b, s], self.count)
        return self.solved[b, s, k]

    def resolve(self, b: int, s: int) -> None:
        if self.known[b, s]:
            return
        self.exact[b, s] = sum(permutation_value(table[b, s], self.assignment(b, s, k))
                               for k, table in enumerate(self.tables))
        self.known[b, s] = True


def solve(cost: torch.Tensor, layout: Layout, current: torch.Tensor, count: SolverCount) -> torch.Tensor:
    """The valid permutation maximising `Σ_i cost[i, perm[i]]`, exactly (among ties, any one of them)."""
    count.needed += layout.naive_calls
    perm = torch.empty(layout.size, dtype=torch.long)
    current = current.cpu()
    for cls in layout.classes:
        whole = layout.is_free
        scores = _PairScores(cost, cls, whole, count)
        first = cls.cells[0][:, 0]
        # the current superblock assignment, in this class's superblock order
        order = {int(p): i for i, p in enumerate(first)}
        current_sigma = torch.tensor([order[int(layout.block_start[layout.block_of[current[p]]])]
                                      for p in first.tolist()], dtype=torch.long)
        sigma = _assign_blocks(scores, current_sigma, count) if cls.blocks > 1 else torch.zeros(1, dtype=torch.long)
        for b in range(cls.blocks):
            s = int(sigma[b])
            scores.resolve(b, s)
            for k, cell in enumerate(cls.cells):
                perm[cell[b]] = cell[s][scores.assignment(b, s, k)]
    return perm


def _assign_blocks(scores: _PairScores, current: torch.Tensor, count: SolverCount) -> torch.Tensor:
    """Superblock assignment over exact pair scores, resolving only the pairs that could matter."""
    nb = len(current)
    for b in range(nb):
        scores.resolve(b, int(current[b]))
    weights = scores.weights()
    rows = torch.arange(nb)
    if bool((weights[rows, current] >= weights.amax(1)).all()):
        return current
    while True:
        sigma = _lap(weights, count)
        missing = [b for b in range(nb) if not scores.known[b, sigma[b]]]
        if not missing:
            return sigma
        for b in missing:
            scores.resolve(b, int(sigma[b]))
        weights = scores.weights()
