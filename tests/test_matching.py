"""Weight matching: exact structured assignment, certificates, coordinate descent, on hand-built specs and SDXL.

References are independent of the code under test: brute force over every permutation (filtered by
`spec.core.is_valid`) for the assignment, the planted permutation for matching, and a direct float64
evaluation of the objective.
"""
from __future__ import annotations

import itertools
import re

import pytest
import torch

from lib_rebasin import assignment
from lib_rebasin.config import sdxl_preset
from lib_rebasin.layout import sdxl_shapes
from lib_rebasin.matching import MatchOptions, match, objective
from lib_rebasin.order import Use, VisitOrder
from lib_rebasin.progress import Cancelled, Monitor
from lib_rebasin.spec.core import (IN, OUT, Binding, Group, Spec, apply_to_state_dict, heads_structure,
                                   identity, invert, is_valid, random_permutation, random_permutations,
                                   structure_from_partitions)
from lib_rebasin.spec.sdxl import sdxl_spec
from lib_rebasin.synthetic import random_tensor


# --- hand-built specs ------------------------------------------------------------------------------------------

def mlp_spec_and_weights(seed: int = 0, d: int = 16, h1: int = 64, h2: int = 48):
    """x -> W1 -> W2 -> W3 with both hidden spaces free; input and output fixed."""
    g = torch.Generator().manual_seed(seed)
    spec = Spec({
        "h1": Group("h1", h1, "hidden", [Binding("w1", 0, 0, h1, role=OUT), Binding("b1", 0, 0, h1),
                                         Binding("w2", 1, 0, h1, role=IN)]),
        "h2": Group("h2", h2, "hidden", [Binding("w2", 0, 0, h2, role=OUT), Binding("b2", 0, 0, h2),
                                         Binding("w3", 1, 0, h2, role=IN)]),
    })
    weights = {"w1": torch.randn(h1, d, generator=g) / d ** 0.5, "b1": 0.2 * torch.randn(h1, generator=g),
               "w2": torch.randn(h2, h1, generator=g) / h1 ** 0.5, "b2": 0.2 * torch.randn(h2, generator=g),
               "w3": torch.randn(10, h2, generator=g) / h2 ** 0.5}
    return spec, weights


def groupnorm_stack(seed: int = 0, c1: int = 32, c2: int = 48, groups: int = 8):
    """conv(3→c1) → GN(groups) → conv(c1→c2) → GN(groups) → conv(c2→4): two GroupNorm-structured spaces."""
    g = torch.Generator().manual_seed(seed)

    def gn_group(name, width, conv_out, norm, conv_in):
        cuts = range(0, width, width // groups)
        return Group(name, width, "residual",
                     [Binding(conv_out + ".weight", 0, 0, width, role=OUT), Binding(conv_out + ".bias", 0, 0, width),
                      Binding(norm + ".weight", 0, 0, width), Binding(norm + ".bias", 0, 0, width),
                      Binding(conv_in + ".weight", 1, 0, width, role=IN)],
                     structure_from_partitions(width, [cuts]))

    spec = Spec({"s1": gn_group("s1", c1, "conv1", "norm1", "conv2"),
                 "s2": gn_group("s2", c2, "conv2", "norm2", "conv3")})
    w = {"conv1.weight": torch.randn(c1, 3, 3, 3, generator=g) / 27 ** 0.5, "conv1.bias": torch.randn(c1, generator=g),
         "norm1.weight": 1 + 0.2 * torch.randn(c1, generator=g), "norm1.bias": 0.2 * torch.randn(c1, generator=g),
         "conv2.weight": torch.randn(c2, c1, 3, 3, generator=g) / (9 * c1) ** 0.5,
         "conv2.bias": torch.randn(c2, generator=g),
         "norm2.weight": 1 + 0.2 * torch.randn(c2, generator=g), "norm2.bias": 0.2 * torch.randn(c2, generator=g),
         "conv3.weight": torch.randn(4, c2, 3, 3, generator=g) / (9 * c2) ** 0.5}
    return spec, w


def attention_spec_and_weights(seed: int = 0, width: int = 32, heads: int = 4, head_width: int = 8):
    """One attention over a fixed stream: q/k rows and v rows per head, out columns; heads-structured group."""
    g = torch.Generator().manual_seed(seed)
    inner = heads * head_width
    group = Group("heads", 2 * inner, "heads",
                  [Binding("q", 0, 0, inner, role=OUT), Binding("k", 0, 0, inner, role=OUT),
                   Binding("v", 0, 0, inner, 0 + inner, role=OUT), Binding("o", 1, 0, inner, inner, role=IN)],
                  heads_structure(heads, head_width))
    w = {name: torch.randn(inner, width, generator=g) / width ** 0.5 for name in ("q", "k", "v")}
    w["o"] = torch.randn(width, inner, generator=g) / inner ** 0.5
    return Spec({"heads": group}), w


def drifted(weights, drift: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {k: v + drift * v.std() * torch.randn(v.shape, generator=g) for k, v in weights.items()}


HAND_BUILT = [mlp_spec_and_weights, groupnorm_stack, attention_spec_and_weights]


# --- the assignment ---------------------------------------------------------------------------------------------

_ALL_PERMUTATIONS = torch.tensor(list(itertools.permutations(range(8))))
_VALID: dict[tuple, torch.Tensor] = {}


def valid_permutations(group: Group) -> torch.Tensor:
    """Every valid permutation of an 8-position group, filtered with spec.core's own validity check."""
    key = (group.size, group.structure)
    if key not in _VALID:
        keep = [p for p in _ALL_PERMUTATIONS if group.structure is None or is_valid(group, p)]
        _VALID[key] = torch.stack(keep)
    return _VALID[key]


def brute_force_best(cost: torch.Tensor, group: Group) -> float:
    perms = valid_permutations(group)
    return float(cost.double()[torch.arange(group.size), perms].sum(1).max())


SMALL_STRUCTURES = {
    "free": None,
    "groupnorm": structure_from_partitions(8, [range(0, 8, 2)]),
    "heads": heads_structure(2, 2),
    "two classes": structure_from_partitions(8, [[0, 2, 4, 8], [0, 2, 4, 6, 8]]),
}


@pytest.mark.parametrize("name", list(SMALL_STRUCTURES))
@pytest.mark.parametrize("seed", range(4))
def test_structured_assignment_equals_brute_force(name, seed):
    structure = SMALL_STRUCTURES[name]
    size = 8
    group = Group(name, size, "test", [], structure)
    layout = assignment.layout_of(group)
    g = torch.Generator().manual_seed(seed)
    for cost in (torch.randn(size, size, generator=g),                       # hard: solver needed
                 torch.eye(size) * 3 + 0.3 * torch.randn(size, size, generator=g)):  # certificate territory
        count = assignment.SolverCount()
        start = random_permutation(group, g)
        perm = assignment.solve(cost, layout, start, count)
        assert is_valid(group, perm)
        assert assignment.permutation_value(cost, perm) == pytest.approx(brute_force_best(cost, group), abs=1e-9)
        assert count.needed == layout.naive_calls and count.solved <= count.needed + 5


def test_layout_validity_agrees_with_spec_core():
    g = torch.Generator().manual_seed(0)
    for name, structure in SMALL_STRUCTURES.items():
        group = Group(name, 8, "test", [], structure)
        layout = assignment.layout_of(group)
        for _ in range(200):
            perm = torch.randperm(8, generator=g) if torch.rand(1, generator=g) < 0.5 else random_permutation(group, g)
            assert layout.is_valid(perm) == is_valid(group, perm), (name, perm)


def test_diagonal_cost_needs_no_solver():
    group = Group("gn", 64, "test", [], structure_from_partitions(64, [range(0, 64, 8)]))
    layout = assignment.layout_of(group)
    g = torch.Generator().manual_seed(1)
    cost = 10 * torch.eye(64) + torch.randn(64, 64, generator=g)
    count = assignment.SolverCount()
    perm = assignment.solve(cost, layout, torch.arange(64), count)
    assert torch.equal(perm, torch.arange(64))
    assert count.solved == 0 and count.needed == 8 * 8 + 1


def test_screen_is_sound_under_its_error_bound():
    """Whatever exact cost lies within the bound, the screened permutation is its optimum."""
    group = Group("gn", 8, "test", [], structure_from_partitions(8, [range(0, 8, 2)]))
    layout = assignment.layout_of(group)
    g = torch.Generator().manual_seed(2)
    proven_count = 0
    for trial in range(40):
        true_perm = random_permutation(group, g)
        approx = torch.randn(8, 8, generator=g)
        approx[torch.arange(8), true_perm] += 2.0 + trial * 0.05
        bound = assignment.ErrorBound(0.1, torch.full((8,), 2.0), torch.linspace(1, 2, 8))
        proven = assignment.screen(approx, layout, bound)
        if proven is None:
            continue
        proven_count += 1
        error = 0.1 * torch.outer(torch.full((8,), 2.0), torch.linspace(1, 2, 8))
        for _ in range(5):
            exact = approx + error * (2 * torch.rand(8, 8, generator=g) - 1)
            assert assignment.permutation_value(exact, proven) == pytest.approx(brute_force_best(exact, group),
                                                                              abs=1e-9)
    assert proven_count >= 10
    loose = assignment.ErrorBound(0.6, torch.ones(8), torch.ones(8))
    assert assignment.screen(torch.eye(8), layout, loose) is None  # the bound is too loose to decide


def test_screen_refuses_an_argmax_that_breaks_the_structure():
    group = Group("gn", 4, "test", [], structure_from_partitions(4, [[0, 2, 4]]))
    layout = assignment.layout_of(group)
    cost = torch.eye(4)[[0, 2, 1, 3]]  # rows 1 and 2 prefer each other's channel: across GroupNorm groups
    assert assignment.screen(cost, layout) is None
    count = assignment.SolverCount()
    perm = assignment.solve(cost, layout, torch.arange(4), count)
    assert is_valid(group, perm)


# --- matching on hand-built specs ---------------------------------------------------------------------------

@pytest.mark.parametrize("build", HAND_BUILT)
@pytest.mark.parametrize("screen", ["off", "on"])
def test_planted_permutation_is_recovered(build, screen):
    spec, a = build(seed=1)
    planted = random_permutations(spec, seed=7)
    b = drifted(apply_to_state_dict(spec, a, planted), 0.01, seed=3)
    result = match(spec, a, b, MatchOptions(screen=screen))
    expected = invert(planted)
    for name in spec.groups:
        assert torch.equal(result.perms[name], expected[name]), name
    aligned = apply_to_state_dict(spec, b, result.perms)
    for key, tensor in a.items():
        assert (aligned[key] - tensor).norm() <= 0.02 * tensor.norm() + 1e-6, key
    report = result.report
    assert report.converged and sorted(report.changed) == sorted(spec.groups)
    assert report.objective_after == pytest.approx(objective(spec, a, b, result.perms), rel=1e-5)
    assert report.objective_before == pytest.approx(objective(spec, a, b, identity(spec)), rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("build", HAND_BUILT)
def test_same_model_gives_identity_without_solver(build):
    spec, a = build(seed=2)
    result = match(spec, a, dict(a), MatchOptions(screen="on"))
    assert all(torch.equal(p, torch.arange(len(p))) for p in result.perms.values())
    report = result.report
    assert report.solver_solved == 0 and report.solver_needed > 0
    assert len(report.sweeps) == 1 and report.changed == []
    assert all(abs(v["after"] - 1) < 1e-6 for v in report.blocks.values())


@pytest.mark.parametrize("build", HAND_BUILT)
def test_objective_never_decreases_and_matches_direct_evaluation(build):
    spec, a = build(seed=3)
    _, b = build(seed=4)  # an unrelated model: many changes, several sweeps
    result = match(spec, a, b, MatchOptions(screen="off", seed=5))
    objectives = [result.report.objective_before] + [s.objective for s in result.report.sweeps]
    assert all(later >= earlier - 1e-9 * abs(earlier) for earlier, later in zip(objectives, objectives[1:]))
    assert result.report.objective_after == pytest.approx(objective(spec, a, b, result.perms), rel=1e-5)
    assert result.report.objective_after > result.report.objective_before
    for name, group in spec.groups.items():
        assert is_valid(group, result.perms[name])


@pytest.mark.parametrize("build", HAND_BUILT)
def test_screening_changes_speed_not_results(build):
    spec, a = build(seed=5)
    planted = random_permutations(spec, seed=8)
    b = drifted(apply_to_state_dict(spec, a, planted), 0.05, seed=9)
    on = match(spec, a, b, MatchOptions(screen="on"))
    off = match(spec, a, b, MatchOptions(screen="off"))
    for name in spec.groups:
        assert torch.equal(on.perms[name], off.perms[name])


def test_same_seed_same_result_and_seed_sets_the_order():
    spec, a = mlp_spec_and_weights(seed=6, h1=96, h2=96)
    _, b = mlp_spec_and_weights(seed=7, h1=96, h2=96)
    first = match(spec, a, b, MatchOptions(seed=11, screen="off"))
    again = match(spec, a, b, MatchOptions(seed=11, screen="off"))
    assert all(torch.equal(first.perms[n], again.perms[n]) for n in spec.groups)
    assert [s.objective for s in first.report.sweeps] == [s.objective for s in again.report.sweeps]


def test_uncoupled_groups_are_solved_once():
    g = torch.Generator().manual_seed(0)
    spec = Spec({name: Group(name, 16, "hidden", [Binding(f"{name}.in", 0, 0, 16), Binding(f"{name}.out", 1, 0, 16)])
                 for name in ("x", "y")})
    a = {f"{n}.{s}": torch.randn(16, 16, generator=g) for n in ("x", "y") for s in ("in", "out")}
    b = {k: torch.randn(16, 16, generator=g) for k in a}
    result = match(spec, a, b, MatchOptions(screen="off"))
    assert result.report.uncoupled == 2 and len(result.report.sweeps) == 1


def test_bad_inputs_are_refused():
    spec, a = mlp_spec_and_weights()
    with pytest.raises(ValueError, match="differ in shape"):
        match(spec, a, dict(a, w2=torch.zeros(48, 65)))
    with pytest.raises(ValueError, match="not valid"):
        match(spec, a, a, init={"h1": torch.zeros(64, dtype=torch.long), "h2": torch.arange(48)})
    twice = Spec({"h": Group("h", 16, "hidden", [Binding("w", 0, 0, 16), Binding("w", 1, 0, 16)])})
    with pytest.raises(ValueError, match="several axes"):
        match(twice, {"w": torch.zeros(16, 16)}, {"w": torch.zeros(16, 16)})

def test_a_tensor_one_model_lacks_adds_nothing_to_the_cost():
    """Matching with w3 absent from either model equals matching under a spec that never bound w3; a group
    left without any tensor keeps its (initial) permutation."""
    spec, a = mlp_spec_and_weights(seed=1)
    _, other = mlp_spec_and_weights(seed=2)
    without_w3 = Spec({name: Group(g.name, g.size, g.kind, [b for b in g.bindings if b.key != "w3"])
                       for name, g in spec.groups.items()})
    expected = match(without_w3, a, other, MatchOptions(screen="off")).perms
    for a_side, b_side in (({k: v for k, v in a.items() if k != "w3"}, other),
                           (a, {k: v for k, v in other.items() if k != "w3"})):
        result = match(spec, a_side, b_side, MatchOptions(screen="off"))
        assert all(torch.equal(result.perms[n], expected[n]) for n in spec.groups)
    lonely = Spec(dict(spec.groups, h3=Group("h3", 10, "hidden", [Binding("w4", 0, 0, 10)])))
    result = match(lonely, a, dict(other, w4=torch.randn(10, 3)), MatchOptions(screen="off"))
    assert torch.equal(result.perms["h3"], torch.arange(10))


def test_extra_channels_on_an_unbound_axis_are_left_out_of_the_cost():
    """An inpainting-like first layer (more input channels in A) is matched on the channels both have."""
    spec, a = mlp_spec_and_weights(seed=3)
    planted = random_permutations(spec, seed=4)
    b = drifted(apply_to_state_dict(spec, a, planted), 0.01, seed=5)
    wide = dict(a, w1=torch.cat([a["w1"], torch.randn(64, 5)], dim=1))  # axis 1 of w1 is not bound
    result = match(spec, wide, b, MatchOptions(screen="off"))
    assert all(torch.equal(result.perms[n], invert(planted)[n]) for n in spec.groups)


def test_cancel_stops_matching():
    spec, a = mlp_spec_and_weights()
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        match(spec, a, drifted(a, 0.01, 1), monitor=Monitor(is_cancelled=cancelled))


# --- models that do not share a basis ------------------------------------------------------------------------

def test_visit_order_grows_from_what_is_already_in_place():
    """A chain fixed → a → b → c, and d reading only c: a sees fixed channels, each next group its settled
    neighbour; the seed only breaks ties."""
    uses = {"a": [Use(frozenset(), 1.0, 0.0), Use(frozenset({"b"}), 1.0, 0.1)],
            "b": [Use(frozenset({"a"}), 1.0, 0.1), Use(frozenset({"c"}), 1.0, 0.1)],
            "c": [Use(frozenset({"b"}), 1.0, 0.1), Use(frozenset({"d"}), 1.0, 0.1)],
            "d": [Use(frozenset({"c"}), 1.0, 0.1)]}
    again = set()
    for seed in range(10):
        order = VisitOrder(uses, seed)
        assert order.sequence(uses) == ["a", "b", "c", "d"]
        order.unsettle(["b", "c"])  # b sees a settled, c sees d settled: a tie the seed breaks
        again.add(tuple(order.sequence(["c", "b"])))
    assert again == {("b", "c"), ("c", "b")}
    ties = {name: [Use(frozenset(), 1.0, 0.0)] for name in "pqrstu"}
    assert len({tuple(VisitOrder(ties, seed).sequence(ties)) for seed in range(6)}) > 1


@pytest.fixture(scope="module")
def planted_sdxl():
    """A tiny synthetic SDXL, and B = A with every group moved (a planted permutation) plus a 1 % drift."""
    config = sdxl_preset("tiny")
    spec = sdxl_spec(config)
    keys = spec.keys()
    a = {k: random_tensor(k, shape, 1) for k, shape in sdxl_shapes(config).items() if k in keys}
    planted = random_permutations(spec, seed=7)
    return spec, a, drifted(apply_to_state_dict(spec, a, planted), 0.01, seed=3), planted


def test_planted_sdxl_permutation_is_found_by_certificates(planted_sdxl):
    """Visited best-informed first, nearly every group's cost proves its optimum when it is computed: the
    planted permutation comes back with hardly any solver call, and the last sweep proves every group."""
    spec, a, b, planted = planted_sdxl
    result = match(spec, a, b)
    expected = invert(planted)
    assert [n for n in spec.groups if not torch.equal(result.perms[n], expected[n])] == []
    report = result.report
    assert report.converged and len(report.changed) == len(spec.groups)
    assert report.solver_solved <= 0.01 * report.solver_needed
    assert report.sweeps[-1].changed == 0 and report.sweeps[-1].screened == report.sweeps[-1].visited
    assert report.objective_after == pytest.approx(objective(spec, a, b, result.perms), rel=1e-6)
    gains = [s.objective - before for s, before in
             zip(report.sweeps, [report.objective_before] + [s.objective for s in report.sweeps])]
    assert [s.gain for s in report.sweeps] == pytest.approx(gains, rel=1e-2, abs=1e-6 * report.objective_after)


def test_progress_tells_the_sweep_and_the_groups_moved_and_cancel_stays_live(planted_sdxl):
    spec, a, b, _ = planted_sdxl
    seen: list[tuple[float, str]] = []
    match(spec, a, b, monitor=Monitor(on_progress=lambda f, m: seen.append((f, m))))
    messages = [m for _, m in seen]
    assert any(re.fullmatch(r"sweep 1: \d+ groups checked, [1-9]\d* moved, gain \+\S+", m) for m in messages)
    assert any(m.startswith("sweep 2:") for m in messages)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    def cancelled():
        return bool(seen) and seen[-1][1].startswith("sweep 2")

    seen.clear()
    with pytest.raises(Cancelled):
        match(spec, a, b, monitor=Monitor(on_progress=lambda f, m: seen.append((f, m)), is_cancelled=cancelled))
    assert not any(m.startswith("sweep 3") for _, m in seen)


# --- cost matrices ---------------------------------------------------------------------------------------------

def test_low_precision_costs_stay_within_their_error_bound(monkeypatch):
    """bfloat16 products (in pieces, transposed views, narrow rows batched) against a float64 reference."""
    from lib_rebasin import costs
    monkeypatch.setattr(costs, "PIECE_ELEMENTS", 1 << 12)       # several pieces per window
    monkeypatch.setattr(costs, "LOW_PRECISION_WORK", 1)         # every product but the narrow ones in bfloat16
    g = torch.Generator().manual_seed(0)
    n = 24
    tensors = {"conv": torch.randn(16, 40, 3, 3, generator=g).half(),          # bound on its columns (axis 1)
               "linear": torch.randn(2 * n, 96, generator=g).half(),           # two windows of rows (GEGLU-like)
               "bias": torch.randn(n, generator=g).half(),                     # narrow
               "cols": torch.randn(300, n, generator=g)}                       # float32, columns, many pieces
    bindings = {"conv": [Binding("conv", 1, 8, n)], "linear": [Binding("linear", 0, 0, n), Binding("linear", 0, n, n)],
                "bias": [Binding("bias", 0, 0, n)], "cols": [Binding("cols", 1, 0, n)]}
    other = {k: (v.float() + 0.3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in tensors.items()}
    partial = costs.Partial(n, torch.device("cpu"), torch.bfloat16)
    reference = torch.zeros(n, n, dtype=torch.float64)
    for key in tensors:
        partial.add(tensors[key], other[key], bindings[key], partial.ticket())
        for b in bindings[key]:
            wa = tensors[key].double().narrow(b.axis, b.offset, b.width).movedim(b.axis, 0).reshape(b.width, -1)
            wb = other[key].double().narrow(b.axis, b.offset, b.width).movedim(b.axis, 0).reshape(b.width, -1)
            reference += wa @ wb.T
    cost, bound = partial.finish()
    error = (cost.double() - reference).abs()
    allowed = bound.eps * torch.outer(bound.rows, bound.cols)
    assert (error <= allowed).all()
    assert error.max() > 0  # it really was computed in low precision
    exact = costs.Partial(n, torch.device("cpu"), None)
    for key in tensors:
        exact.add(tensors[key], other[key], bindings[key], exact.ticket())
    cost32, bound32 = exact.finish()
    error32 = (cost32.double() - reference).abs()
    assert (error32 <= bound32.eps * torch.outer(bound32.rows, bound32.cols)).all()
    assert bound32.eps < bound.eps / 100  # float32 products are bounded far more tightly


def test_contributions_are_summed_in_ticket_order_whatever_the_arrival():
    from lib_rebasin import costs
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(8, 1000, generator=g) * 10 ** k for k in range(-3, 4)]
    results = []
    for order in (list(range(len(parts))), list(reversed(range(len(parts))))):
        partial = costs.Partial(8, torch.device("cpu"), None)
        tickets = [partial.ticket() for _ in parts]
        for i in order:
            partial.add(parts[i], parts[i], [Binding("x", 0, 0, 8)], tickets[i])
        results.append(partial.finish()[0])
    assert torch.equal(results[0], results[1])


def test_inner_products_match_float64():
    from lib_rebasin import costs
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(300, 70, generator=g).half(), torch.randn(300, 70, generator=g).half()
    aa, bb, ab = costs.inner_products(a, b)
    assert aa == pytest.approx(float((a.double() ** 2).sum()), rel=1e-6)
    assert bb == pytest.approx(float((b.double() ** 2).sum()), rel=1e-6)
    assert ab == pytest.approx(float((a.double() * b.double()).sum()), rel=1e-5, abs=1e-3)
