"""Where matching's time goes when B does not share A's basis: the planted pair, whole and group by group.

The planted pair: B2 = A permuted with every group moved (`permute A P --seed 7`), plus a 1 % drift
(`make-synthetic B2 --base P --drift 0.01`).  Matching A and B2 must find the inverse of the planted permutation.

1. The whole matching, in this process (A against B2, and against the same-base B = A plus a 1 % drift for
   reference): sweeps; phases (certification passes, costs computed by visits, the solver, objective
   updates, and the rest: Python, ordering, bookkeeping); per group kind the visits, the groups a pass
   decided, the multiply-adds computed in each precision and their rate, solver calls and time; bytes read
   from disk and peak memory; how much of the planted permutation came back.
2. Extracted groups: the largest group of each kind alone, with its neighbours in A's basis (the planted
   permutation: what a visit sees once its neighbours are matched) and in B's (the identity: what a visit sees
   before): the cost products in bfloat16 and float32, the certificate, and the exact solver.  This part reads
   only the group's tensors, so it runs on full-size files without loading a model.

    python benchmarks/profile_matching.py [--scale small] [--workdir DIR] [--inputs A B B2] [--planted-seed 7]
                                          [--skip-whole] [--skip-groups] [--groups N]

Part 1 at full size needs a model's worth of memory: run it under the shared heavy-work lock.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lib_rebasin import assignment  # noqa: E402
from lib_rebasin.checkpoint import Checkpoint  # noqa: E402
from lib_rebasin.matching import MatchOptions, group_cost, make_plan, match  # noqa: E402
from lib_rebasin.permute import spec_for_checkpoint  # noqa: E402
from lib_rebasin.spec.core import identity, invert, random_permutations  # noqa: E402


def read_bytes() -> int:
    """Bytes this process caused to be read from disk (page-cache hits are free)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def make_inputs(workdir: Path, scale: str, seed: int) -> tuple[Path, Path, Path]:
    a, b = workdir / f"A_{scale}.safetensors", workdir / f"B_{scale}.safetensors"
    p, b2 = workdir / f"P_{scale}.safetensors", workdir / f"B2_{scale}.safetensors"
    steps = [(a, ["make-synthetic", str(a), "--scale", scale, "--seed", "1"]),
             (b, ["make-synthetic", str(b), "--base", str(a), "--seed", "2", "--drift", "0.01"]),
             (p, ["permute", str(a), str(p), "--seed", str(seed)]),
             (b2, ["make-synthetic", str(b2), "--base", str(p), "--drift", "0.01"])]
    for path, args in steps:
        if not path.exists() and not (path == p and b2.exists()):
            subprocess.run([sys.executable, "-m", "lib_rebasin", *args], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
    p.unlink(missing_ok=True)
    return a, b, b2


def whole(a_path: Path, b_path: Path, label: str, planted_seed: int | None) -> None:
    print(f"\n1. whole matching: A against {label} ({b_path.name})")
    with Checkpoint(a_path) as a, Checkpoint(b_path) as b:
        spec = spec_for_checkpoint(a)
        disk, start = read_bytes(), time.perf_counter()
        result = match(spec, a, b, MatchOptions())
        wall, disk = time.perf_counter() - start, read_bytes() - disk
        report = result.report
        print(f"  {wall:.1f} s, {len(report.sweeps)} sweeps, converged {report.converged}, "
              f"{len(report.changed)}/{report.groups} groups changed, solver calls {report.solver_solved} "
              f"(of {report.solver_needed} without certificates); tensors read {report.bytes_read / 2**30:.2f} GiB = "
              f"{report.bytes_read / (a.nbytes + b.nbytes):.2f} × both models, from disk {disk / 2**30:.2f} GiB; "
              f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        for s in report.sweeps:
            print(f"  sweep {s.sweep}: {s.visited} checked, {s.changed} moved, {s.screened} decided by a "
                  f"certificate, {s.solver_solved} solver calls, objective gain {s.gain:+.5g}, {s.seconds:.1f} s")
        seconds = dict(report.seconds)
        accounted = sum(v for k, v in seconds.items() if k != "total")
        print(f"  phases: certification passes {seconds.get('certify', 0):.1f} s, visit costs "
              f"{seconds.get('cost', 0):.1f} s, solver and certificates {seconds.get('solve', 0):.1f} s, objective "
              f"updates {seconds.get('objective', 0):.1f} s, the rest {seconds['total'] - accounted:.1f} s")
        print(f"  {'kind':<26}{'visits':>7}{'passed':>7}{'moved':>6}{'Gmac bf16':>10}{'Gmac fp32':>10}"
              f"{'Gmac pass':>10}{'solver':>7}{'visit s':>8}{'Gmac/s':>8}")
        for kind, p in report.profile.items():
            visit_work = p.get("gmac_screen", 0) + p.get("gmac_exact", 0)
            rate = visit_work / p["seconds"] if p.get("seconds") else 0
            print(f"  {kind:<26}{p.get('visits', 0):>7.0f}{p.get('passed', 0):>7.0f}{p.get('moved', 0):>6.0f}"
                  f"{p.get('gmac_screen', 0):>10.1f}{p.get('gmac_exact', 0):>10.1f}{p.get('gmac_pass', 0):>10.1f}"
                  f"{p.get('solver_calls', 0):>7.0f}{p.get('seconds', 0):>8.1f}{rate:>8.1f}")
        work = sum(make_plan(spec, a.shapes).work.values()) / 1e9
        done = sum(p.get(f, 0) for p in report.profile.values() for f in ("gmac_screen", "gmac_exact", "gmac_pass"))
        print(f"  multiply-adds: {done:.0f} G computed = {done / work:.2f} × one sweep's {work:.0f} G")
        if planted_seed is not None:
            planted = invert(random_permutations(spec, planted_seed))
            back = sum(int((result.perms[n] == planted[n]).sum()) for n in spec.groups)
            print(f"  planted permutation recovered: {100 * back / sum(len(p) for p in planted.values()):.3f} % "
                  f"of the rows")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def groups(a_path: Path, b_path: Path, planted_seed: int, count: int) -> None:
    print("\n2. extracted groups (neighbours matched / not yet matched): products, certificate, exact solver")
    with Checkpoint(a_path) as a, Checkpoint(b_path) as b:
        spec = spec_for_checkpoint(a)
        plan = make_plan(spec, a.shapes)
        planted = invert(random_permutations(spec, planted_seed))
        biggest: dict[str, list[str]] = {}
        for name in sorted(spec.groups, key=lambda n: -plan.work[n]):
            kind = f"{name.split('.', 1)[0]}.{spec.groups[name].kind}"
            biggest.setdefault(kind, [])
            if len(biggest[kind]) < count:
                biggest[kind].append(name)
        for kind, names in sorted(biggest.items(), key=lambda kv: -plan.work[kv[1][0]]):
            for name in names:
                layout = plan.layouts[name]
                print(f"  {name} ({spec.groups[name].size} positions, {plan.work[name] / 1e9:.1f} Gmac, "
                      f"{'free' if layout.is_free else f'{len(layout.classes)} class(es) of superblocks'})")
                for label, others in (("matched", planted), ("unmatched", identity(spec))):
                    perms = dict(others, **{name: identity(spec)[name]})
                    (low, bound), t_low = timed(lambda: group_cost(spec, a, b, perms, name, low=torch.bfloat16))
                    proof, t_screen = timed(lambda: assignment.screen(low, layout, bound))
                    (cost, _), t_exact = timed(lambda: group_cost(spec, a, b, perms, name))
                    count_ = assignment.SolverCount()
                    perm, t_solve = timed(lambda: assignment.solve(cost, layout, torch.arange(layout.size), count_))
                    right = float((perm == planted[name]).float().mean())
                    print(f"    {label:<10} cost bf16 {t_low:6.2f} s, certificate {t_screen:5.2f} s "
                          f"({'proves the optimum' if proof is not None else 'undecided'}), cost fp32 "
                          f"{t_exact:6.2f} s, exact solve {t_solve:6.2f} s ({count_.solved} solver calls), "
                          f"{100 * right:.1f} % planted")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="small", choices=("full", "small", "tiny"))
    parser.add_argument("--workdir", default="/work/bench-data/profile-matching")
    parser.add_argument("--inputs", nargs=3, metavar=("A", "B", "B2"), help="existing files instead of making them")
    parser.add_argument("--planted-seed", type=int, default=7)
    parser.add_argument("--skip-whole", action="store_true")
    parser.add_argument("--skip-groups", action="store_true")
    parser.add_argument("--groups", type=int, default=1, help="largest groups of each kind to extract (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    created = not args.inputs and not workdir.exists()
    try:
        if args.inputs:
            a, b, b2 = map(Path, args.inputs)
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            a, b, b2 = make_inputs(workdir, args.scale, args.planted_seed)
        print(f"inputs: {a}, {b} (same base), {b2} (planted, seed {args.planted_seed}); torch threads "
              f"{torch.get_num_threads()}; load average {__import__('os').getloadavg()[0]:.2f}")
        if not args.skip_whole:
            whole(a, b2, "the planted B2", args.planted_seed)
            whole(a, b, "the same-base B", None)
        if not args.skip_groups:
            groups(a, b2, args.planted_seed, args.groups)
        return 0
    finally:
        if created and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
