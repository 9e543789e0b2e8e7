"""Sound certificates under GPU arithmetic, proven on the CPU.

The cost products run through software models of TF32 and bfloat16 input rounding (`tests/emulation.py`) and
every claim the certificates make is checked against float64 computed independently here:
- the arithmetic probe finds what a product does to its inputs;
- the entrywise error bound of a cost holds for the arithmetic performed (and is violated when the rounding
  is not charged: the old TF32 behaviour);
- on adversarial near ties at real group sizes and structures, a permutation `assignment.screen` proves is an
  optimum of the exact cost (checked with scipy over a relaxation), and `certified_gain` / `scale_bound` never
  claim more than the exact cost gives — so the acceptance test never takes a change float64 would refuse;
- whole matchings under emulated GPU arithmetic give the CPU's permutations, and every change they accept
  raises the exact objective.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from scipy.optimize import linear_sum_assignment

import emulation
from lib_rebasin import assignment, costs, precision
from lib_rebasin import matching
from lib_rebasin.matching import MatchOptions, match, objective
from lib_rebasin.spec.core import (Binding, Group, apply_to_state_dict, heads_structure, invert, is_valid,
                                   random_permutation, random_permutations, structure_from_partitions)

from test_matching import HAND_BUILT, drifted

ARITHMETICS = {  # name -> (matmul, fraction bits float32 inputs keep)
    "ieee": (torch.matmul, 23),
    "tf32": (emulation.matmul_with(emulation.TF32), 10),
    "bf16-inputs": (emulation.matmul_with(emulation.bf16_rounded), 7),
}


# --- the probe --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ARITHMETICS))
def test_probe_finds_the_fraction_bits_products_keep(name):
    matmul, bits = ARITHMETICS[name]
    measured = precision.measure("cpu", matmul)
    assert measured.float32_fraction_bits == bits and measured.bf16_sums_in_float32
    assert measured.input_unit(torch.float32) == (0.0 if bits == 23 else 2.0 ** -bits)


def test_probe_finds_bfloat16_sums_and_screening_is_refused_there():
    measured = precision.measure("cpu", emulation.bf16_summed_matmul)
    assert measured.float32_fraction_bits == 23 and not measured.bf16_sums_in_float32
    assert precision.screen_dtype("on", measured) is None
    with pytest.raises(ValueError, match="low precision"):
        measured.product_error(torch.bfloat16, 100)
    assert precision.screen_dtype("on", precision.measure("cpu")) == torch.bfloat16
    assert precision.screen_dtype("off", precision.measure("cpu")) is None


_FLAG_SCRIPT = """
import torch
from lib_rebasin import precision
m = torch.backends.cuda.matmul
def read(get):
    try:
        return str(get())
    except RuntimeError:
        return "unreadable"
def state():
    return [read(lambda: m.allow_tf32), read(lambda: m.fp32_precision), read(torch.get_float32_matmul_precision),
            read(lambda: torch.backends.mkldnn.matmul.fp32_precision),
            read(lambda: m.allow_bf16_reduced_precision_reduction)]
{setup}
before = state()
with precision.ieee_products():
    inside = state()
    ieee = precision.measure("cpu").ieee
after = state()
print(before == after, inside[0], inside[1], inside[2], inside[4], ieee)
"""


@pytest.mark.parametrize("setup", [
    "m.allow_tf32 = True",                                   # what A1111 and Forge do at start
    "m.fp32_precision = 'tf32'",                             # torch's new API (the legacy one becomes unreadable)
    "torch.set_float32_matmul_precision('medium'); m.allow_bf16_reduced_precision_reduction = True",
    "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'",  # oneDNN (CPU, Intel GPUs)
])
def test_ieee_products_then_every_flag_as_it_was(setup):
    """Inside: no TF32, IEEE float32 products, float32 reductions.  After: the flags read exactly as before,
    through whichever API set them (each case in a fresh process: torch's flag APIs do not mix)."""
    script = _FLAG_SCRIPT.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False", "ieee", "highest", "False", "True"], out


# --- the error bound of a cost ----------------------------------------------------------------------------------

def parallel_rows(n: int, depth: int, seed: int, bits: int) -> torch.Tensor:
    """Positive, nearly parallel rows (Σ|a·b| = ‖a‖·‖b‖: the bound is tight) whose every entry sits 0.45 of a
    unit in the last of `bits` fraction bits above a representable value: rounding to nearest and truncation
    both lose it, all in the same direction (no cancellation of errors)."""
    g = torch.Generator().manual_seed(seed)
    base = (1 + torch.rand(depth, generator=g)) * (1 + 0.01 * torch.rand(n, depth, generator=g))
    base = emulation.truncated(min(bits, 22))(base.float()).double()
    ulp = 2.0 ** (torch.floor(torch.log2(base)) - min(bits, 22))
    return (base + 0.45 * ulp).float()


@pytest.mark.parametrize("name", list(ARITHMETICS))
@pytest.mark.parametrize("low", [None, torch.bfloat16])
def test_cost_error_bound_holds_for_the_arithmetic_performed(name, low):
    matmul, bits = ARITHMETICS[name]
    n = 96
    rows = {seed: parallel_rows(n, depth, seed, bits) for seed, depth in ((1, 700), (2, 700), (3, 300), (4, 300))}
    a_out, b_out = rows[1], rows[2]                                         # bound on rows
    a_in, b_in = rows[3].T.contiguous(), rows[4].T.contiguous()             # on columns
    bias_a, bias_b = parallel_rows(1, n, 5, bits)[0], parallel_rows(1, n, 6, bits)[0]   # narrow
    exact = (a_out.double() @ b_out.double().T + a_in.double().T @ b_in.double()
             + torch.outer(bias_a.double(), bias_b.double()))

    def computed(arithmetic):
        partial = costs.Partial(n, torch.device("cpu"), low, arithmetic)
        for (a, b), axis in (((a_out, b_out), 0), ((a_in, b_in), 1), ((bias_a, bias_b), 0)):
            partial.add(a, b, [Binding("w", axis, 0, n)], partial.ticket())
        return partial.finish()

    cost, bound = computed(precision.measure("cpu", matmul))
    error = (cost.double() - exact).abs()
    allowed = bound.eps * torch.outer(bound.rows, bound.cols)
    assert (error <= allowed).all()
    if bits < 23 and low is None:
        assert float((error / allowed).max()) > 0.25    # the charge is what these products need, not a loose cap
        uncharged, blind = computed(precision.Arithmetic("cpu", 23, True, matmul))  # TF32 charged as IEEE
        assert (error > blind.eps * torch.outer(blind.rows, blind.cols)).any()


# --- certificates on adversarial near ties ----------------------------------------------------------------------

def gn_structure(size: int, groups: int):
    return structure_from_partitions(size, [range(0, size, size // groups)])


REAL_GROUPS = {  # name -> (group, depth of its row binding): the widths and structures of SDXL's spaces
    "free 320": (Group("free", 320, "test", []), 2880),
    "heads 5x64": (Group("heads", 640, "test", [], heads_structure(5, 64)), 640),
    "groupnorm 1280/32": (Group("gn", 1280, "test", [], gn_structure(1280, 32)), 1280),
}


def near_tie_weights(group: Group, depth: int, bits: int, seed: int):
    """A's and B's row windows with B = P(A) + noise, and rows whose best and second-best channels differ by
    less than the inputs' rounding: the best one's extra sits in the bits the device drops, the other's in
    bits it keeps, so that the computed cost prefers the wrong one (or sees a tie)."""
    g = torch.Generator().manual_seed(seed)
    n = group.size
    a = torch.randn(n, depth, generator=g)
    planted = random_permutation(group, g)
    b = torch.empty_like(a)
    b[planted] = a + 0.01 * torch.randn(n, depth, generator=g)
    cell_of = assignment.layout_of(group).cell_of
    for i in torch.randperm(n, generator=g)[:24].tolist():
        j_best = int(planted[i])
        peers = (cell_of == cell_of[j_best]).nonzero().reshape(-1)
        peers = peers[peers != j_best]
        j_other = int(peers[torch.randint(len(peers), (1,), generator=g)])
        grid = 2.0 ** torch.randint(-1, 2, (depth,), generator=g).double()     # exact at any precision
        a[i] = grid.float()
        ulp = grid * 2.0 ** -bits
        b[j_best] = (grid + 0.45 * ulp).float()                                # the extra is lost
        kept = torch.zeros(depth, dtype=torch.float64)
        share = float(torch.empty(1).uniform_(0.02, 0.6, generator=g))         # < 0.45: j_best is better
        kept[: int(share * depth)] = 1
        b[j_other] = (grid + kept * ulp).float()                               # the extra survives
    return a, b, planted


def relaxed_optimum(exact: torch.Tensor, layout: assignment.Layout) -> float:
    """The best value over permutations that keep every position in its cell (a superset of the valid ones)."""
    allowed = layout.cell_of[:, None] == layout.cell_of[None, :]
    masked = torch.where(allowed, exact, torch.full_like(exact, -1e18))
    rows, cols = linear_sum_assignment(masked.numpy(), maximize=True)
    return float(exact[rows, cols].sum())


def value(cost: torch.Tensor, perm: torch.Tensor) -> float:
    return float(cost.double()[torch.arange(len(perm)), perm].sum())


def wrong_claims(group: Group, arithmetic: precision.Arithmetic, low, a, b, planted, seed: int) -> tuple[int, int]:
    """(claims float64 contradicts, proofs made) for the costs `arithmetic` computes from a and b."""
    n = group.size
    layout = assignment.layout_of(group)
    partial = costs.Partial(n, torch.device("cpu"), low, arithmetic)
    partial.add(a, b, [Binding("w", 0, 0, n)], partial.ticket())
    cost, bound = partial.finish()
    exact = a.double() @ b.double().T
    tolerance = 1e-12 * float(exact.abs().amax(1).sum())
    wrong = proofs = 0
    proven = assignment.screen(cost, layout, bound)
    if proven is not None:
        proofs += 1
        assert is_valid(group, proven)
        wrong += value(exact, proven) < relaxed_optimum(exact, layout) - tolerance
    scale = float(exact.abs().amax(1).sum())
    wrong += assignment.scale_bound(cost, bound) < scale - tolerance
    g = torch.Generator().manual_seed(seed)
    solved = assignment.solve(cost, layout, torch.arange(n), assignment.SolverCount())
    candidates = [solved, planted, random_permutation(group, g)] + ([proven] if proven is not None else [])
    for current in (torch.arange(n), planted, random_permutation(group, g)):
        for candidate in candidates:
            claimed = assignment.certified_gain(cost, bound, current, candidate)
            wrong += claimed > value(exact, candidate) - value(exact, current) + tolerance
    return wrong, proofs


@pytest.mark.parametrize("group_name", list(REAL_GROUPS))
@pytest.mark.parametrize("name", ["tf32", "bf16-inputs"])
def test_certificates_never_claim_what_float64_denies(group_name, name):
    group, depth = REAL_GROUPS[group_name]
    matmul, bits = ARITHMETICS[name]
    measured = precision.measure("cpu", matmul)
    blind = precision.Arithmetic("cpu", 23, True, matmul)  # the old charge: any float32 product taken as IEEE
    blind_wrong = proofs = 0
    for seed in range(2):
        a, b, planted = near_tie_weights(group, depth, bits, seed)
        for low in (None, torch.bfloat16):
            wrong, proved = wrong_claims(group, measured, low, a, b, planted, seed)
            assert wrong == 0, (group_name, name, seed, low)
            proofs += proved
        blind_wrong += wrong_claims(group, blind, None, a, b, planted, seed)[0]
    assert blind_wrong > 0   # these near ties defeat a certificate that does not charge the rounding


@pytest.mark.parametrize("group_name", list(REAL_GROUPS))
def test_certificates_still_decide_clear_cases(group_name):
    """Soundness is not bought by never deciding: a planted permutation with 1 % drift is proven at every
    arithmetic (by bfloat16 screening too), and its gain over the identity is certified."""
    group, depth = REAL_GROUPS[group_name]
    g = torch.Generator().manual_seed(11)
    a = torch.randn(group.size, depth, generator=g)
    planted = random_permutation(group, g)
    b = torch.empty_like(a)
    b[planted] = a + 0.01 * torch.randn(group.size, depth, generator=g)
    layout = assignment.layout_of(group)
    for name, (matmul, _) in ARITHMETICS.items():
        for low in (None, torch.bfloat16):
            partial = costs.Partial(group.size, torch.device("cpu"), low, precision.measure("cpu", matmul))
            partial.add(a, b, [Binding("w", 0, 0, group.size)], partial.ticket())
            cost, bound = partial.finish()
            assert torch.equal(assignment.screen(cost, layout, bound), planted), (name, low)
            assert assignment.certified_gain(cost, bound, torch.arange(group.size), planted) > 0


# --- whole matchings under emulated GPU arithmetic ------------------------------------------------------------

@pytest.mark.parametrize("build", HAND_BUILT)
@pytest.mark.parametrize("name", ["tf32", "bf16-inputs"])
def test_matching_under_gpu_arithmetic_gives_the_cpu_permutations(build, name, monkeypatch):
    spec, a = build(seed=1)
    planted = random_permutations(spec, seed=7)
    b = drifted(apply_to_state_dict(spec, a, planted), 0.05, seed=3)
    reference = {screen: match(spec, a, b, MatchOptions(screen=screen)) for screen in ("off", "on")}
    emulation.emulate(monkeypatch, ARITHMETICS[name][0])
    for screen in ("off", "on"):
        result = match(spec, a, b, MatchOptions(screen=screen))
        assert result.report.float32_product_bits == ARITHMETICS[name][1]
        for group in spec.groups:
            assert torch.equal(result.perms[group], reference[screen].perms[group]), (screen, group)
            assert torch.equal(result.perms[group], invert(planted)[group])


@pytest.mark.parametrize("name", ["tf32", "bf16-inputs"])
def test_every_change_matching_accepts_raises_the_exact_objective(name, monkeypatch):
    """Two unrelated models (many changes, several sweeps), with rows tied below the rounding: each change
    accepted under emulated GPU arithmetic gains more than rtol × scale in float64."""
    spec, a = HAND_BUILT[0](seed=3, h1=96, h2=96)
    _, b = HAND_BUILT[0](seed=4, h1=96, h2=96)
    bits = ARITHMETICS[name][1]
    g = torch.Generator().manual_seed(0)
    for i in range(0, 96, 8):  # rows of w2 (group h2) tied across the rounding, as in near_tie_weights
        grid = 2.0 ** torch.randint(-4, -1, (96,), generator=g).double()    # about the weights' own size
        a["w2"][i] = grid.float()
        b["w2"][i] = (grid + 0.45 * grid * 2.0 ** -bits).float()
        b["w2"][i + 1] = (grid + (torch.arange(96) < 20) * grid * 2.0 ** -bits).float()
    emulation.emulate(monkeypatch, ARITHMETICS[name][0])
    gains = []
    accept = matching._Matcher._accept

    def checked_accept(self, group, perm):
        before = objective(spec, a, b, self.perms)
        accept(self, group, perm)
        gains.append(objective(spec, a, b, self.perms) - before)

    monkeypatch.setattr(matching._Matcher, "_accept", checked_accept)
    for screen in ("off", "on"):
        gains.clear()
        result = match(spec, a, b, MatchOptions(screen=screen, seed=5))
        assert result.report.converged and len(gains) >= 2
        assert all(gain > 0 for gain in gains), gains
