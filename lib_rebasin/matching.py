"""Weight matching: the permutations that bring model B into model A's basis.

The objective is `Σ_k ⟨A_k, P(B)_k⟩` over every tensor the spec binds.  With every other group fixed, the
part that depends on one group's permutation `p` is `Σ_i C[i, p[i]]` with `C = Σ_b A_b · B̃_bᵀ`, one product
per binding `b` of the group (`A_b`, `B̃_b`: the bound window moved to the front and flattened, B with all other
groups' current permutations applied).  Coordinate descent visits the groups and gives each a better valid
permutation for its cost, the best one whenever the visit can prove it; a change is kept only when it beats
the current one by more than a relative tolerance, and it marks the groups that share a tensor with it for
another visit.  Matching stops when no group is marked: every group then holds the permutation its cost
proves best.  A group that shares no tensor with another one is solved once.

The order (`order.VisitOrder`): next, the group whose cost is expected to say the most, given which of its
neighbours are settled; ties by a seeded rank.  Sweep 1 visits the best-informed group of each component
first (the anchors).  If they keep their places, the models likely share a basis and the rest of the sweep
starts with a certification pass: the tensors are read once, in file order, and every group's cost is summed
as its tensors go by; a group whose cost proves its current permutation optimal is done without the solver
(for two fine-tunes of one base, almost every group).  If an anchor moves, the models do not share a basis,
and the groups are visited one by one outwards from the anchors, so that a cost is computed when the
neighbours it depends on are already matched and is then decided by a certificate, not by a solver working
on noise.  Later sweeps check the marked groups, with a certification pass when there are several.

Precision.  When bfloat16 products are faster than float32 on the device, costs are first computed in
bfloat16 with a rigorous error bound (`costs.Partial`, `assignment.screen`).  A bound that proves the
optimum decides; one that proves only an improvement (the solver's answer on the approximate cost, whose
gain stays positive within the bound) takes it and marks the group for another visit; otherwise the float32
cost is computed and solved exactly.  Tensors are read from the (memory-mapped) sources and upcast one at a
time: no copy of a whole model is held.
"""
from __future__ import annotations

import math
import re
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Mapping, Protocol

import torch

from . import assignment, devices, precision
from .costs import Partial, inner_product, inner_products, workspace_bytes
from .order import Use, VisitOrder, expected_use
from .progress import SILENT, Monitor
from .spec.core import Binding, Group, Permutations, Spec, identity, is_identity

PASS_MEMORY = 1 << 30         # bytes of unfinished costs the certification pass may hold; beyond, groups wait
DEVICE_SLACK = 1 << 28        # device memory left unplanned (the allocator's rounding and fragmentation)
CPU = torch.device("cpu")     # where a group goes when its device runs out of memory
PENDING_DECISIONS = 2         # finished costs per worker that may wait for their decision in the pass
PREFETCH_ELEMENTS = 1 << 27   # read-ahead hints cover about this many elements of each source at a time
CERTIFY_AT = 4                # a sweep with at least this many groups to check starts with a certification pass


class TensorSource(Protocol):
    """Where matching reads weights: a Checkpoint, or any object with `get(key)` and `shapes`."""
    shapes: Mapping[str, tuple[int, ...]]

    def get(self, key: str) -> torch.Tensor: ...


class StateDictSource:
    """An in-memory state dict as a TensorSource."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors
        self.shapes = {k: tuple(t.shape) for k, t in tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def as_source(source) -> TensorSource:
    if isinstance(source, Mapping):
        return StateDictSource(source)
    if not (hasattr(source, "get") and hasattr(source, "shapes")):
        raise TypeError(f"{type(source).__name__} is not a tensor source (needs get(key) and shapes)")
    return source


@dataclass(frozen=True)
class MatchOptions:
    seed: int = 0
    max_sweeps: int = 100
    rtol: float = 1e-6          # a group changes only if that gains more than rtol × (Σ_i max_j |C_ij|)
    device: str = "cpu"
    screen: str = "auto"        # "auto": bfloat16 certificate pass when it is faster; "on"; "off"
    workers: int = 0            # CPU threads (0: as many as torch uses); each runs torch single-threaded


@dataclass
class SweepRecord:
    sweep: int
    visited: int
    changed: int
    objective: float
    solver_needed: int
    solver_solved: int
    screened: int               # groups decided by a proof from their cost, without the solver
    seconds: float
    gain: float = 0.0           # objective gain of the groups that changed (estimated from their costs)


@dataclass
class MatchReport:
    groups: int
    uncoupled: int
    changed: list[str]          # groups whose final permutation is not the identity
    sweeps: list[SweepRecord]
    converged: bool
    objective_before: float     # at the initial permutations (identity unless warm-started)
    objective_after: float
    solver_needed: int
    solver_solved: int
    seconds: dict[str, float]
    blocks: dict[str, dict[str, float]]  # per block: cosine of A and B before and after matching
    device: str
    screen_dtype: str | None
    seed: int
    float32_product_bits: int = precision.FP32_FRACTION_BITS  # fraction bits float32 products kept (23: IEEE)
    memory_plan: int | None = None         # bytes matching may allocate on its device at most (None: on the CPU)
    cpu_fallback: list[str] = field(default_factory=list)  # groups computed on the CPU: the device ran out of memory
    profile: dict[str, dict[str, float]] = field(default_factory=dict)  # per group kind: visits, time, solver calls
    bytes_read: int = 0         # tensor bytes read from both models (repeats included; most come from the page cache)

    @property
    def solver_skipped(self) -> int:
        return max(self.solver_needed - self.solver_solved, 0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["changed_groups"] = f"{len(self.changed)}/{self.groups}"
        out["solver_skipped"] = self.solver_skipped
        out["solver_skipped_fraction"] = self.solver_skipped / self.solver_needed if self.solver_needed else 1.0
        return out


@dataclass
class MatchResult:
    perms: Permutations
    report: MatchReport


@dataclass
class _Visit:
    moved: bool
    proven: bool                # decided by a certificate, without the solver
    gain: float = 0.0           # objective gain: exact from a float32 cost, estimated from a bfloat16 one
    final: bool = True          # False: an improvement, not proven the best; the group needs another visit


@dataclass
class _Sweep:
    """Where a sweep stands: groups still to check, groups to check again in the next sweep, tallies."""
    number: int
    pending: set[str]
    monitor: Monitor
    work: float
    later: set[str] = field(default_factory=set)
    visited: int = 0
    changed: int = 0
    proven: int = 0
    gain: float = 0.0
    done_work: float = 0.0

    def message(self) -> str:
        return f"sweep {self.number}: {self.visited} groups checked, {self.changed} moved, gain {self.gain:+.4g}"


# --- the plan: which tensors each group reads ------------------------------------------------------------------

@dataclass
class _KeyUse:
    key: str
    axis: int
    bindings: list[Binding]


@dataclass
class _Plan:
    groups: dict[str, Group]
    uses: dict[str, list[_KeyUse]]                  # group -> keys it is bound to
    by_key: dict[str, list[tuple[Group, Binding]]]
    neighbours: dict[str, set[str]]
    layouts: dict[str, assignment.Layout]
    work: dict[str, float]                           # multiply-adds of one cost, for progress
    shapes: dict[str, tuple[int, ...]]               # of the bound keys


def make_plan(spec: Spec, shapes: Mapping[str, tuple[int, ...]]) -> _Plan:
    by_key = spec.by_key()
    missing = sorted(k for k in by_key if k not in shapes)
    if missing:
        raise ValueError(f"the spec binds {len(missing)} keys the model does not have: {', '.join(missing[:5])}")
    uses: dict[str, list[_KeyUse]] = {name: [] for name in spec.groups}
    work = {name: 0.0 for name in spec.groups}
    for key, entries in by_key.items():
        shape = shapes[key]
        per_group: dict[str, list[Binding]] = defaultdict(list)
        for group, b in entries:
            if not (0 <= b.axis < len(shape)) or b.offset < 0 or b.offset + b.width > shape[b.axis]:
                raise ValueError(f"{key}: group {group.name} binds axis {b.axis} [{b.offset}:{b.offset + b.width}] "
                                 f"outside shape {tuple(shape)}")
            if b.group_offset < 0 or b.group_offset + b.width > group.size:
                raise ValueError(f"{key}: group {group.name} binding exceeds its {group.size} positions")
            per_group[group.name].append(b)
        for name, bindings in per_group.items():
            axes = {b.axis for b in bindings}
            if len(axes) != 1:
                raise ValueError(f"{key}: group {name} is bound to several axes {sorted(axes)}; "
                                 f"its cost would not be linear in its permutation")
            uses[name].append(_KeyUse(key, bindings[0].axis, bindings))
            rest = math.prod(shape) // shape[bindings[0].axis]
            work[name] += sum(b.width * b.width * rest for b in bindings)
    neighbours = {name: set() for name in spec.groups}
    for entries in by_key.values():
        names = {g.name for g, _ in entries}
        for name in names:
            neighbours[name] |= names - {name}
    layouts = {name: assignment.layout_of(g) for name, g in spec.groups.items()}
    return _Plan(dict(spec.groups), uses, by_key, neighbours, layouts, work,
                 {k: tuple(shapes[k]) for k in by_key})


def device_memory(plan: _Plan, pass_memory: int) -> int:
    """Bytes `match` allocates on its device (one worker) at most, with `pass_memory` for the certification
    pass's unfinished costs.  Beside those: the largest tensor of A and of B with two permuted copies (float32
    at most); costs of the widest group: the new ones of one tensor, the finished ones waiting for their
    decision, a product summed from pieces (two), the copies a decision makes (three); the product buffers
    and scratch of the costs (`costs.workspace_bytes`)."""
    largest = max((math.prod(shape) for shape in plan.shapes.values()), default=0) * 4
    widest = max((g.size for g in plan.groups.values()), default=0)
    per_key = max((len(entries) for entries in plan.by_key.values()), default=1)
    squares = per_key + PENDING_DECISIONS + 1 + 2 + 3
    return pass_memory + 4 * largest + squares * widest * widest * 4 + workspace_bytes(widest, per_key)


def _pass_memory(plan: _Plan, device: torch.device) -> int:
    """The certification pass's budget on `device`: PASS_MEMORY, or less where the device's free memory, less
    the rest of the plan, is smaller (down to 0: then every group is visited on its own)."""
    free = None if device == CPU else devices.free_memory(device)
    if free is None:
        return PASS_MEMORY
    return int(min(PASS_MEMORY, max(free - device_memory(plan, 0) - DEVICE_SLACK, 0)))


# --- applying permutations while reading --------------------------------------------------------------------

def _axis_index(plan: _Plan, key: str, axis: int, size: int, perms: Permutations,
                selected) -> torch.Tensor | None:
    """The gather index of one axis of `key` under the `selected` groups' perms; None if it is the identity."""
    index = None
    for group, b in plan.by_key[key]:
        if b.axis != axis or not selected(group.name):
            continue
        window = perms[group.name][b.group_offset:b.group_offset + b.width]
        if torch.equal(window, torch.arange(b.group_offset, b.group_offset + b.width)):
            continue
        if index is None:
            index = torch.arange(size)
        index[b.offset:b.offset + b.width] = window - b.group_offset + b.offset
    return index


def _permuted(plan: _Plan, key: str, tensor: torch.Tensor, perms: Permutations, *,
              skip: str | None = None) -> torch.Tensor:
    """`tensor` with the permutations of every group (but `skip`) applied."""
    def selected(name): return name != skip
    for axis in range(tensor.dim()):
        index = _axis_index(plan, key, axis, tensor.shape[axis], perms, selected)
        if index is not None:
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def _screen_dtype(options: MatchOptions, arithmetic: precision.Arithmetic) -> torch.dtype | None:
    return precision.screen_dtype(options.screen, arithmetic)


def screening(options: MatchOptions) -> str | None:
    """The dtype of the screening products `match` will use with these options on their device ('bfloat16'),
    or None (float32 costs only)."""
    with precision.ieee_products():
        dtype = _screen_dtype(options, precision.measure(torch.device(options.device)))
    return str(dtype).removeprefix("torch.") if dtype is not None else None


@dataclass(frozen=True)
class _Place:
    """Where costs are computed, with the arithmetic measured there and the screening products it affords."""
    device: torch.device
    arithmetic: precision.Arithmetic
    screen_dtype: torch.dtype | None

    @classmethod
    def measure(cls, device: torch.device, options: MatchOptions) -> "_Place":
        """(Inside `precision.ieee_products`.)"""
        arithmetic = precision.measure(device)
        if not arithmetic.usable:
            raise ValueError(f"{device} keeps only {arithmetic.float32_fraction_bits} fraction bits of float32 "
                             f"inputs in its products: too few for exact costs")
        return cls(device, arithmetic, _screen_dtype(options, arithmetic))


class _Matcher:
    def __init__(self, plan: _Plan, a: TensorSource, b: TensorSource, perms: Permutations, options: MatchOptions,
                 monitor: Monitor):
        self.plan, self.a, self.b, self.options, self.monitor = plan, a, b, options, monitor
        self.perms = {k: v.clone() for k, v in perms.items()}
        self.initial = {k: v.clone() for k, v in perms.items()}
        self.device = torch.device(options.device)
        self.place: _Place | None = None                  # measured by match() with IEEE products asked for
        self.cpu_place: _Place | None = None              # for groups the device has no memory for
        self.cpu_fallback: set[str] = set()               # groups the device had no memory for
        self.dropped: set[str] = set()                    # groups whose cost ran out of device memory in the pass
        self.pass_memory = PASS_MEMORY
        self.seconds: dict[str, float] = defaultdict(float)
        self.terms: dict[str, float] = {}                 # key -> ⟨A_k, P(B)_k⟩ under the current perms
        self.first: dict[str, tuple[float, float, float]] = {}  # key -> (‖A‖², ‖B‖², ⟨A, P_init(B)⟩)
        self.stale: set[str] = set()                      # keys whose term needs recomputing
        self.undecided: set[str] = set()                  # groups the screening could not decide (unchanged since)
        self.count = assignment.SolverCount()
        self.kind_of = {name: f"{name.split('.', 1)[0]}.{g.kind}" for name, g in plan.groups.items()}
        self.profile: dict[str, dict[str, float]] = defaultdict(dict)
        self.workers = 1
        self.pool: ThreadPoolExecutor | None = None
        self.open_sweeps: list[SweepRecord] = []
        self.bytes_read = 0                               # tensor bytes read from both models, repeats included
        self.lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------------------
    @property
    def screen_dtype(self) -> torch.dtype | None:
        return self.place.screen_dtype

    def _load(self, key: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A's and B's tensor on `device`, in their stored dtype (upcast happens per window).  Runs in the
        worker threads."""
        self.monitor.check()
        a = self.a.get(key).to(device)
        b = self.b.get(key).to(device)
        with self.lock:
            self.bytes_read += a.nbytes + b.nbytes
        if a.shape != b.shape:
            raise ValueError(f"{key}: shapes differ between the models: {tuple(a.shape)} and {tuple(b.shape)}")
        if key not in self.first:
            self.first[key] = inner_products(a, _permuted(self.plan, key, b, self.initial))
            self.terms[key] = self.first[key][2]
        elif key in self.stale:  # while it is here: its term under the current permutations
            self.terms[key] = inner_product(a, _permuted(self.plan, key, b, self.perms))
            self.stale.discard(key)
        return a, b

    def _contribute(self, key: str, targets: list[tuple[str, _KeyUse, Partial, int]]) -> None:
        """Read one tensor and add it to the costs of the given groups (a worker-thread task)."""
        a, b = self._load(key, targets[0][2].device)
        for name, use, partial, ticket in targets:
            partial.add(a, _permuted(self.plan, key, b, self.perms, skip=name), use.bindings, ticket)

    def _contribute_in_pass(self, key: str, targets: list[tuple[str, _KeyUse, Partial, int]]) -> None:
        """`_contribute` for the certification pass: a group whose cost runs out of device memory is dropped
        from the pass (and visited later, on the CPU if need be)."""
        targets = [t for t in targets if t[0] not in self.dropped]
        if not targets:
            return
        try:
            self._contribute(key, targets)
        except Exception as e:
            if not self._out_of_memory(e):
                raise
            self.dropped.update(name for name, *_ in targets)

    def _out_of_memory(self, error: BaseException) -> bool:
        """Whether `error` is the device running out of memory (then its cache is emptied for what follows)."""
        if self.device == CPU or not devices.is_out_of_memory(error):
            return False
        devices.empty_cache(self.device)
        return True

    def _cpu(self) -> _Place:
        if self.cpu_place is None:
            self.cpu_place = _Place.measure(CPU, self.options)
        return self.cpu_place

    def _term(self, key: str) -> None:
        """Read a stale key: `_load` brings its term up to date."""
        try:
            self._load(key, self.device)
        except Exception as e:
            if not self._out_of_memory(e):
                raise
            self._load(key, CPU)

    def _close_sweep(self) -> None:
        """The objective at the end of the last sweeps, before anything changes: the terms of the tensors read
        since (by the next certification pass, most of them) are up to date, the others are read now."""
        if self.open_sweeps:
            self._update_terms()
            for record in self.open_sweeps:  # nothing changed between them
                record.objective = self.objective()
            self.open_sweeps.clear()

    def _update_terms(self) -> None:
        """Recompute ⟨A_k, P(B)_k⟩ for the keys whose permutations changed since it was last computed (most
        are recomputed as they are read for costs)."""
        start = time.perf_counter()
        for future in [self.pool.submit(self._term, key) for key in sorted(self.stale)]:
            future.result()
        self.seconds["objective"] += time.perf_counter() - start

    def _read_order(self) -> list[str]:
        """The bound keys in the order A stores them (sequential reading), else the spec's order."""
        infos = getattr(self.a, "infos", None) or {}
        keys = list(self.plan.by_key)
        offsets = [getattr(infos.get(k), "offset", None) for k in keys]
        if all(o is not None for o in offsets):
            keys = [k for _, k in sorted(zip(offsets, keys))]
        return keys

    def _prefetch(self, keys: list[str]) -> None:
        """Ask the files behind both sources to start reading these tensors (if they can)."""
        for source in (self.a, self.b):
            if hasattr(source, "prefetch"):
                source.prefetch(keys)

    def _prefetch_group(self, name: str) -> None:
        """Read-ahead for a visit: the group's tensors not read yet, each on its own (a group's tensors can
        be spread over the whole file); tensors read before are likely still in the page cache."""
        for use in self.plan.uses[name]:
            if use.key not in self.first:
                self._prefetch([use.key])

    # -- one group ---------------------------------------------------------------------------------------------
    def _partial(self, name: str, exact: bool, place: _Place) -> Partial:
        return Partial(self.plan.groups[name].size, place.device, None if exact else place.screen_dtype,
                       place.arithmetic)

    def _tally(self, name: str, field_name: str, value: float) -> None:
        profile = self.profile[self.kind_of[name]]
        profile[field_name] = profile.get(field_name, 0) + value

    def _cost(self, name: str, exact: bool, place: _Place) -> tuple[torch.Tensor, assignment.ErrorBound]:
        start = time.perf_counter()
        self._tally(name, "gmac_exact" if exact or place.screen_dtype is None else "gmac_screen",
                    self.plan.work[name] / 1e9)
        partial = self._partial(name, exact, place)
        uses = []  # one task per window of a matrix (GEGLU halves, fused q/k/v) to keep every worker busy
        for use in self.plan.uses[name]:
            if len(use.bindings) > 1 and len(self.plan.shapes[use.key]) > 1:
                uses += [_KeyUse(use.key, use.axis, [b]) for b in use.bindings]
            else:
                uses.append(use)
        tasks = [self.pool.submit(self._contribute, use.key, [(name, use, partial, partial.ticket())]) for use in uses]
        for future in tasks:
            future.result()
        result = partial.finish()
        self.seconds["cost"] += time.perf_counter() - start
        return result

    def _prove(self, name: str, cost: torch.Tensor, bound: assignment.ErrorBound | None) -> torch.Tensor | None:
        """The optimal permutation if the (approximate) cost proves it, else None."""
        start = time.perf_counter()
        layout = self.plan.layouts[name]
        proven = assignment.screen(cost, layout, bound)
        self.seconds["solve"] += time.perf_counter() - start
        return proven

    def visit(self, name: str) -> _Visit:
        """Give group `name` a better permutation, the best one when the visit can prove it.  A group the device
        has no memory for is computed on the CPU (from then on)."""
        start, solved = time.perf_counter(), self.count.solved
        outcome = None
        if name not in self.cpu_fallback:
            try:
                outcome = self._visit(name, self.place)
            except Exception as e:
                if not self._out_of_memory(e):
                    raise
                self.cpu_fallback.add(name)
        if outcome is None:
            outcome = self._visit(name, self._cpu())
        for field_name, value in (("visits", 1), ("moved", outcome.moved), ("proven", outcome.proven),
                                  ("solver_calls", self.count.solved - solved),
                                  ("seconds", time.perf_counter() - start)):
            self._tally(name, field_name, value)
        return outcome

    def _visit(self, name: str, place: _Place) -> _Visit:
        layout = self.plan.layouts[name]
        current = self.perms[name]
        if name not in self.undecided and place.screen_dtype is not None:
            cost, bound = self._cost(name, exact=False, place=place)
            proven = self._prove(name, cost, bound)
            if proven is not None and torch.equal(proven, current):
                self.count.needed += layout.naive_calls
                return _Visit(False, True)
            gain = None if proven is None else self._gain(cost, bound, current, proven)
            if gain is not None:
                self.count.needed += layout.naive_calls
                self._accept(name, proven)
                return _Visit(True, True, gain)
            if proven is None:  # no proof: its neighbours may not be matched yet, so the cost is mostly noise
                start = time.perf_counter()
                candidate = assignment.solve(cost, layout, current, self.count)
                self.seconds["solve"] += time.perf_counter() - start
                gain = self._gain(cost, bound, current, candidate)
                if gain is not None:  # better for certain, though maybe not the best: checked again later
                    self._accept(name, candidate)
                    return _Visit(True, False, gain, final=False)
        self.undecided.discard(name)
        cost, bound = self._cost(name, exact=True, place=place)
        start = time.perf_counter()
        candidate = assignment.solve(cost, layout, current, self.count)
        gain = self._gain(cost, bound, current, candidate)
        self.seconds["solve"] += time.perf_counter() - start
        if gain is None:
            return _Visit(False, False)
        self._accept(name, candidate)
        return _Visit(True, False, gain)

    def _gain(self, cost: torch.Tensor, bound: assignment.ErrorBound | None, current: torch.Tensor,
              candidate: torch.Tensor) -> float | None:
        """The acceptance test: None unless `candidate` gains more than rtol × the cost's scale under the exact
        cost, whatever the rounding of the computed one (so that every accepted change raises the exact
        objective); else the gain the computed cost gives."""
        if torch.equal(candidate, current):
            return None
        if (assignment.certified_gain(cost, bound, current, candidate)
                <= self.options.rtol * assignment.scale_bound(cost, bound)):
            return None
        return assignment.permutation_value(cost, candidate) - assignment.permutation_value(cost, current)

    def _accept(self, name: str, perm: torch.Tensor) -> None:
        self._close_sweep()
        self.perms[name] = perm
        self.stale.update(use.key for use in self.plan.uses[name])
        self.undecided -= self.plan.neighbours[name]

    # -- the certification pass ------------------------------------------------------------------------------
    def certify(self, groups: set[str], order: VisitOrder, monitor: Monitor) -> tuple[set[str], set[str], float]:
        """Read the tensors of `groups` once, in file order, and sum their costs as the tensors go by.  A group
        whose cost proves its current permutation optimal is done; one whose cost proves another permutation
        takes it, unless a neighbour took one first in this pass (its cost is then out of date).  Returns the
        groups that still need a visit, those that changed, and the (estimated) objective gain."""
        start_time = time.perf_counter()
        plan = self.plan
        exact = self.screen_dtype is None
        left = {name: len(plan.uses[name]) for name in groups}
        use_of = {(use.key, name): use for name in groups for use in plan.uses[name]}
        partials: dict[str, Partial] = {}
        futures: dict[str, list[Future]] = defaultdict(list)
        complete: deque[str] = deque()   # groups whose every tensor has been handed to the workers
        in_flight: deque[Future] = deque()
        decisions: list[Future] = []
        waiting: set[str] = set()
        keys = [k for k in self._read_order() if any(g.name in groups for g, _ in plan.by_key[k])]
        sizes = [math.prod(plan.shapes[k]) for k in keys]
        total, done, fetched = max(sum(sizes), 1), 0, 0

        def hand_over_complete(block: bool) -> None:
            while complete and (block or all(f.done() for f in futures[complete[0]])):
                name = complete.popleft()
                for future in futures.pop(name):
                    future.result()
                partial = partials.pop(name)
                if name in self.dropped:
                    waiting.add(name)
                    continue
                pending = [f for f in decisions if not f.done()]
                if len(pending) >= PENDING_DECISIONS * self.workers:  # finished costs waiting bound the memory
                    pending[0].result()
                decisions.append(self.pool.submit(self._decide, name, partial))

        for index, key in enumerate(keys):
            if index >= fetched:  # read-ahead hints, a batch of about PREFETCH_ELEMENTS at a time
                batch_end, batch = fetched, 0
                while batch_end < len(keys) and batch < PREFETCH_ELEMENTS:
                    batch += sizes[batch_end]
                    batch_end += 1
                self._prefetch(keys[fetched:batch_end])
                fetched = batch_end
            monitor.report(done / total, f"certification pass over {len(groups)} groups")
            for name in [n for n in partials if n in self.dropped and n not in complete]:  # out of memory
                del partials[name]
                futures.pop(name, None)
                waiting.add(name)
            targets = []
            for name in sorted({g.name for g, _ in plan.by_key[key]} & groups - waiting - self.dropped):
                if name not in partials:
                    partials[name] = self._partial(name, exact, self.place)
                targets.append((name, use_of[key, name], partials[name], partials[name].ticket()))
            future = self.pool.submit(self._contribute_in_pass, key, targets)
            in_flight.append(future)
            for name, _, _, _ in targets:
                futures[name].append(future)
                left[name] -= 1
                if not left[name]:
                    complete.append(name)
            hand_over_complete(block=False)
            while len(in_flight) > 2 * self.workers or (in_flight and in_flight[0].done()):
                in_flight.popleft().result()
            evictable = [n for n in partials if n not in complete]
            while evictable and sum(p.nbytes for p in partials.values()) > self.pass_memory:
                biggest = max(evictable, key=lambda n: partials[n].nbytes)
                evictable.remove(biggest)
                del partials[biggest]
                futures.pop(biggest, None)
                waiting.add(biggest)
            done += sizes[index]
        hand_over_complete(block=True)
        for future in in_flight:
            future.result()
        results = {}
        for future in decisions:
            name, proven, gain = future.result()
            if name in self.dropped:
                waiting.add(name)
                continue
            self._tally(name, "gmac_pass", plan.work[name] / 1e9)
            results[name] = (proven, gain)
        total_gain = 0.0
        moved: set[str] = set()
        for name in order.best(results):  # a fixed order, whatever the threads' timing
            proven, gain = results[name]
            same = proven is not None and torch.equal(proven, self.perms[name])
            if same or (gain is not None and not plan.neighbours[name] & moved):
                self.count.needed += plan.layouts[name].naive_calls
                self._tally(name, "passed", 1)
                if not same:
                    self._tally(name, "moved", 1)
                    self._accept(name, proven)
                    moved.add(name)
                    total_gain += gain
                continue
            waiting.add(name)
            if proven is None and not exact:
                self.undecided.add(name)
        self.seconds["certify"] += time.perf_counter() - start_time
        return waiting | set(partials), moved, total_gain

    def _decide(self, name: str, partial: Partial) -> tuple[str, torch.Tensor | None, float | None]:
        """(name, the optimum its finished cost proves or None, the estimated gain if it is worth taking): a
        worker-thread task."""
        try:
            cost, bound = partial.finish()
            proven = assignment.screen(cost, self.plan.layouts[name], bound)
            gain = None if proven is None else self._gain(cost, bound, self.perms[name], proven)
            return name, proven, gain
        except Exception as e:
            if not self._out_of_memory(e):
                raise
            self.dropped.add(name)
            return name, None, None

    # -- sweeps ----------------------------------------------------------------------------------------------
    def _order_uses(self) -> dict[str, list[Use]]:
        plan = self.plan
        out = {}
        for name, uses in plan.uses.items():
            out[name] = [expected_use(plan.shapes[use.key], use.axis, sum(b.width for b in use.bindings),
                                      plan.groups[name].size,
                                      {g.name for g, b in plan.by_key[use.key] if b.axis != use.axis})
                         for use in uses]
        return out

    def _anchors(self, order: VisitOrder) -> list[str]:
        """The best-informed group of each component: visited first, they tell whether the models share a basis."""
        best: dict[str, str] = {}
        for name in order.best(self.plan.groups):
            best.setdefault(name.split(".", 1)[0], name)
        return [best[c] for c in sorted(best)]

    def run(self) -> MatchReport:
        plan, options = self.plan, self.options
        started = time.perf_counter()
        names = sorted(plan.groups)
        order = VisitOrder(self._order_uses(), options.seed)
        sweeps: list[SweepRecord] = []
        converged = False
        dirty = set(names)
        for sweep in range(1, options.max_sweeps + 1):
            sweep_start = time.perf_counter()
            before = assignment.SolverCount(self.count.needed, self.count.solved)
            span = (0.0, 0.85) if sweep == 1 else (1 - 0.15 * 0.5 ** (sweep - 2), 1 - 0.15 * 0.5 ** (sweep - 1))
            sweep_state = _Sweep(sweep, set(dirty), self.monitor.scaled(*span), sum(plan.work[n] for n in dirty))
            order.settle(set(names) - dirty)
            order.unsettle(dirty)
            if sweep == 1:  # the anchors first: if they keep their places, B likely shares A's basis
                for name in self._anchors(order):
                    self._prefetch_group(name)
                    self._visit_in_sweep(name, sweep_state, order)
            if not (sweep == 1 and sweep_state.changed) and len(sweep_state.pending) >= CERTIFY_AT:
                self._certify_in_sweep(sweep_state, order)
            sequence = order.sequence(sweep_state.pending)  # the order does not depend on what visits find
            for index, name in enumerate(sequence):
                if index + 1 < len(sequence):
                    self._prefetch_group(sequence[index + 1])
                self._visit_in_sweep(name, sweep_state, order)
            sweeps.append(SweepRecord(sweep, sweep_state.visited, sweep_state.changed, math.nan,
                                      self.count.needed - before.needed, self.count.solved - before.solved,
                                      sweep_state.proven, time.perf_counter() - sweep_start, sweep_state.gain))
            self.open_sweeps.append(sweeps[-1])  # its objective is summed when a permutation next changes
            dirty = sweep_state.later
            if not dirty:
                converged = True
                break
        self._close_sweep()
        self.seconds["total"] = time.perf_counter() - started
        return MatchReport(
            groups=len(names), uncoupled=sum(1 for n in names if not plan.neighbours[n]),
            changed=[n for n in names if not is_identity(self.perms[n])],
            sweeps=sweeps, converged=converged,
            objective_before=sum(self.first[k][2] for k in self.plan.by_key if k in self.first),
            objective_after=self.objective(),
            solver_needed=self.count.needed, solver_solved=self.count.solved,
            seconds={k: round(v, 3) for k, v in self.seconds.items()},
            blocks=self.block_alignment(), device=str(self.device),
            screen_dtype=str(self.screen_dtype).removeprefix("torch.") if self.screen_dtype else None,
            seed=options.seed, float32_product_bits=self.place.arithmetic.float32_fraction_bits,
            memory_plan=None if self.device == CPU else device_memory(self.plan, self.pass_memory),
            cpu_fallback=sorted(self.cpu_fallback), bytes_read=self.bytes_read,
            profile={k: {f: round(v, 3) for f, v in p.items()} for k, p in sorted(self.profile.items())})

    def _visit_in_sweep(self, name: str, state: "_Sweep", order: VisitOrder) -> None:
        state.monitor.report(state.done_work / max(state.work, 1.0), state.message())
        state.pending.discard(name)
        outcome = self.visit(name)
        order.settle([name])
        state.visited += 1
        state.proven += outcome.proven
        state.done_work += self.plan.work[name]
        if outcome.moved:
            state.changed += 1
            state.gain += outcome.gain
            state.later |= self.plan.neighbours[name] - state.pending
        if not outcome.final:
            state.later.add(name)

    def _certify_in_sweep(self, state: "_Sweep", order: VisitOrder) -> None:
        pending = state.pending
        work = sum(self.plan.work[n] for n in pending)
        start = state.done_work / max(state.work, 1.0)
        monitor = state.monitor.scaled(start, start + (1 - start) * 0.8)
        left, moved, gain = self.certify(set(pending), order, monitor)
        decided = pending - left
        state.visited += len(decided)
        state.proven += len(decided)
        state.changed += len(moved)
        state.gain += gain
        for name in moved:  # the proofs of its neighbours used its old permutation
            state.later |= self.plan.neighbours[name] - left
        pending -= decided
        order.settle(decided)
        state.done_work += work - sum(self.plan.work[n] for n in pending)

    def objective(self) -> float:
        return sum(self.terms[key] for key in self.plan.by_key if key in self.terms)  # a fixed order: same sums

    def block_alignment(self) -> dict[str, dict[str, float]]:
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
        for key in (k for k in self.plan.by_key if k in self.first):
            aa, bb, ab = self.first[key]
            s = sums[block_label(key)]
            s[0] += aa
            s[1] += bb
            s[2] += ab
            s[3] += self.terms.get(key, ab)
        out = {}
        for label in sorted(sums, key=_block_sort_key):
            aa, bb, before, after = sums[label]
            norm = math.sqrt(aa * bb) or 1.0
            out[label] = {"before": before / norm, "after": after / norm}
        return out


def match(spec: Spec, a, b, options: MatchOptions = MatchOptions(), *, init: Permutations | None = None,
          monitor: Monitor = SILENT) -> MatchResult:
    """Permutations of `spec` that bring `b` into `a`'s basis (maximising Σ⟨A, P(B)⟩), with a report.

    `a` and `b` are tensor sources (a Checkpoint, a state dict, or anything with `get` and `shapes`);
    `init` warm-starts from a set of permutations (identity by default).
    """
    a, b = as_source(a), as_source(b)
    full_spec, init = spec, init if init is not None else identity(spec)
    spec, a, b = _common_part(spec, a, b)
    plan = make_plan(spec, a.shapes)
    mismatched = [k for k in plan.by_key if tuple(b.shapes.get(k, ())) != tuple(a.shapes[k])]
    if mismatched:
        raise ValueError(f"{len(mismatched)} bound tensors differ in shape between the models: "
                         + ", ".join(f"{k} {tuple(a.shapes[k])} vs {tuple(b.shapes.get(k, ())) or 'missing'}"
                                     for k in mismatched[:5]))
    perms = {k: init[k].clone().long() for k in spec.groups}
    for name, perm in perms.items():
        if not plan.layouts[name].is_valid(perm):
            raise ValueError(f"initial permutation of group {name} is not valid for its structure")
    matcher = _Matcher(plan, a, b, perms, options, monitor)
    cpu = matcher.device.type == "cpu"
    threads = torch.get_num_threads()
    matcher.workers = max(1, options.workers or threads) if cpu else 1
    try:
        if cpu:  # parallel over tensors, one thread per op: no intra-op hand-offs, which stall a busy machine
            torch.set_num_threads(1)
        # the error bounds are those of the arithmetic performed: ask for IEEE products, measure what we get
        with precision.ieee_products(), torch.no_grad():
            matcher.place = _Place.measure(matcher.device, options)
            matcher.pass_memory = _pass_memory(plan, matcher.device)
            with ThreadPoolExecutor(matcher.workers, thread_name_prefix="lib_rebasin-match") as pool:
                matcher.pool = pool
                try:
                    report = matcher.run()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        if cpu:
            torch.set_num_threads(threads)
    monitor.report(1.0, "matching done")
    perms = {k: matcher.perms[k].cpu() if k in matcher.perms else init[k].clone().long() for k in full_spec.groups}
    return MatchResult(perms, report)


def _common_part(spec: Spec, a: TensorSource, b: TensorSource) -> tuple[Spec, TensorSource, TensorSource]:
    """What both models hold: the spec restricted to the keys both have (a tensor only one has adds nothing to
    any cost; a group left without tensors keeps its permutation), and where shapes differ only on axes no group
    binds (an inpainting UNet's extra input channels), both read as their common leading part."""
    by_key = spec.by_key()
    keys = [k for k in by_key if k in a.shapes and k in b.shapes]
    trims = {}
    for key in keys:
        sa, sb = tuple(a.shapes[key]), tuple(b.shapes[key])
        bound = {binding.axis for _, binding in by_key[key]}
        if sa != sb and len(sa) == len(sb) and all(sa[i] == sb[i] for i in bound):
            trims[key] = tuple(map(min, sa, sb))
    if trims:
        a, b = _Trimmed(a, trims), _Trimmed(b, trims)
    return spec.restricted(keys), a, b


class _Trimmed:
    """A tensor source that reads some keys as their leading part of a given shape."""

    def __init__(self, source: TensorSource, trims: Mapping[str, tuple[int, ...]]):
        self.source, self.trims = source, trims
        self.shapes = {**source.shapes, **trims}
        self.infos = getattr(source, "infos", None)

    def prefetch(self, keys) -> None:
        if hasattr(self.source, "prefetch"):
            self.source.prefetch(keys)

    def get(self, key: str) -> torch.Tensor:
        tensor = self.source.get(key)
        shape = self.trims.get(key)
        return tensor[tuple(slice(0, n) for n in shape)] if shape else tensor


def objective(spec: Spec, a, b, perms: Permutations) -> float:
    """`Σ_k ⟨A_k, P(B)_k⟩` over the keys `spec` binds, computed directly (float64)."""
    a, b = as_source(a), as_source(b)
    plan = make_plan(spec, a.shapes)
    total = 0.0
    for key in plan.by_key:
        ta, tb = a.get(key).double(), b.get(key).double()
        total += float((ta * _permuted(plan, key, tb, perms)).sum())
    return total


def group_cost(spec: Spec, a, b, perms: Permutations, name: str, *, low: torch.dtype | None = None
               ) -> tuple[torch.Tensor, assignment.ErrorBound | None]:
    """The cost matrix a visit of group `name` computes with every other group at `perms` (on the CPU, in
    float32, or in `low` precision with its error bound): for diagnostics and benchmarks."""
    a, b = as_source(a), as_source(b)
    plan = make_plan(spec, a.shapes)
    partial = Partial(plan.groups[name].size, torch.device("cpu"), low)
    for use in plan.uses[name]:
        partial.add(a.get(use.key), _permuted(plan, use.key, b.get(use.key), perms, skip=name), use.bindings,
                    partial.ticket())
    return partial.finish()


# --- report labels -------------------------------------------------------------------------------------------

_BLOCK_PATTERNS = [
    (re.compile(r"^model\.diffusion_model\.((?:input|output)_blocks\.\d+)\."), "unet.{}"),
    (re.compile(r"^model\.diffusion_model\.(middle_block)\."), "unet.{}"),
    (re.compile(r"^model\.diffusion_model\.(time_embed|label_emb|out)\."), "unet.{}"),
    (re.compile(r"^conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.(\d+)\."), "clip_l.layer{}"),
    (re.compile(r"^conditioner\.embedders\.[01]\.model\.transformer\.resblocks\.(\d+)\."), "clip_g.layer{}"),
    (re.compile(r"^conditioner\.embedders\.0\.model\."), "clip_g.other"),  # the refiner's CLIP-G
    (re.compile(r"^conditioner\.embedders\.0\."), "clip_l.other"),
    (re.compile(r"^conditioner\.embedders\.1\."), "clip_g.other"),
]


def block_label(key: str) -> str:
    """The report block of a key: a UNet block, a text-encoder layer, or the key's first two name parts."""
    for pattern, template in _BLOCK_PATTERNS:
        m = pattern.match(key)
        if m:
            return template.format(*m.groups())
    return ".".join(key.split(".")[:2])


_BLOCK_RANKS = ("unet.time_embed", "unet.label_emb", "unet.input_blocks", "unet.middle_block", "unet.output_blocks",
                "unet.out", "clip_l", "clip_g")


def _block_sort_key(label: str) -> tuple:
    """UNet blocks in forward order, then the text encoders by layer."""
    rank = next((i for i, prefix in enumerate(_BLOCK_RANKS) if label.startswith(prefix)), len(_BLOCK_RANKS))
    number = re.search(r"(\d+)$", label)
    return rank, int(number.group(1)) if number else -1, label
