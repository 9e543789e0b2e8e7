"""Re-basin benchmark: a same-base SDXL pair and a planted pair, then a comparison with sd-mecha.

The same-base pair is a synthetic base A and A plus a 1 % seeded drift (B).  The planted pair does not share a
basis: `permute A P --seed 7` moves every permutation group of A (P computes exactly what A computes), and B2
is P plus a 1 % drift (`make-synthetic --base P`).  Matching A and B2 must find the planted permutation again.

1. Ours, end to end (`python -m lib_rebasin rebasin A B --alpha 0.5`), on both pairs in the same run: hashing,
   matching, merging and writing, wall time, peak RSS (and its anonymous part: the file-backed part is the
   page cache of the memory-mapped inputs), sweeps, solver calls skipped, groups changed.  For the planted
   pair also how much of the planted permutation came back: the share of positions whose permutation is the
   planted one's inverse (rows back in A's basis), and ‖P(B2) − A‖ / ‖A‖ over every float tensor.
   Targets: same-base ≤ 10 min for full SDXL on 2 cores with ≥ 90 % of the solver calls skipped; planted
   ≤ 2 × the same-base time, ≥ 99 % of the rows back, P(B2) within 2 % of A; peak RSS ≤ size(A) + size(B) + 3 GB
   for both.
2. Side by side on the same files, B re-based into A's basis and written (α = 1): ours and sd-mecha 1.1.8's
   `rebasin(B, A)`.  sd-mecha builds its permutation graph from the full SDXL key table at import, so it only
   runs on full-size checkpoints: the comparison uses the full-size pair (a reduced-scale pair would not load
   in sd-mecha).  Reported: the time ratio, peak memory, and how many permutation groups each has and
   changes (sd-mecha's changes are read off its output: a group moved if any window it permutes differs
   from B).

    python benchmarks/bench_rebasin.py [--workdir /work/bench-data/matching] [--scale full] [--keep]
                                       [--skip-mecha] [--skip-planted] [--device cpu]
                                       [--inputs A.safetensors B.safetensors B2.safetensors]

Files go to --workdir, which is deleted at the end if the run created it, unless --keep (--inputs uses existing
files instead, made as above with --planted-seed).  Run one benchmark at a time on a shared machine: the
figures are wall-clock times.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

MECHA_SCRIPT = r"""
import sys, torch, sd_mecha
a, b, out = sys.argv[1:4]
recipe = sd_mecha.rebasin(sd_mecha.model(b), sd_mecha.model(a))
sd_mecha.merge(recipe, output=out, merge_device="cpu", merge_dtype=torch.float32, output_dtype=torch.float16,
               threads=int(sys.argv[4]))
"""

MECHA_GROUPS_SCRIPT = r"""
import json, sys, torch
from safetensors import safe_open
from sd_mecha.extensions.builtin.merge_methods.rebasin import sdxl_sgm
b_path, out_path = sys.argv[1:3]
graph = sdxl_sgm.perm_graph
moved = total = 0
with safe_open(b_path, "pt") as b, safe_open(out_path, "pt") as o:
    for closure in graph.closures():
        for pid in closure.perms:
            total += 1
            width = closure.pid_to_width[pid]
            for node in closure.pid_to_nodes[pid]:
                tb, to = b.get_tensor(node.key), o.get_tensor(node.key)
                axis = node.axis % tb.dim()
                if not torch.equal(tb.narrow(axis, node.offset, width), to.narrow(axis, node.offset, width)):
                    moved += 1
                    break
print(json.dumps({"groups": total, "changed": moved}))
"""


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; wall time, exit code, output, and the peak of its RSS (total and anonymous)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    peak = {"rss": 0, "anon": 0}

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                rss = int(fields["VmRSS"].split()[0]) * 1024
                anon = int(fields["RssAnon"].split()[0]) * 1024
                peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    return {"seconds": time.monotonic() - start, "code": proc.returncode, "stdout": out, "stderr": err[-3000:],
            "peak_rss": peak["rss"], "peak_anon": peak["anon"]}


def make_inputs(workdir: Path, scale: str, planted_seed: int, planted: bool) -> tuple[Path, Path, Path | None]:
    """A, B (same base) and B2 (A permuted with the planted seed, plus a drift) in `workdir`."""
    a, b = workdir / f"A_{scale}.safetensors", workdir / f"B_{scale}.safetensors"
    p, b2 = workdir / f"P_{scale}.safetensors", workdir / f"B2_{scale}.safetensors"
    steps = [(a, ["make-synthetic", str(a), "--scale", scale, "--seed", "1"]),
             (b, ["make-synthetic", str(b), "--base", str(a), "--seed", "2", "--drift", "0.01"])]
    if planted:
        steps += [(p, ["permute", str(a), str(p), "--seed", str(planted_seed)]),
                  (b2, ["make-synthetic", str(b2), "--base", str(p), "--drift", "0.01"])]
    for path, args in steps:
        if not path.exists():
            run = measured([PYTHON, "-m", "lib_rebasin", *args])
            if run["code"]:
                sys.exit(f"{' '.join(args[:1])} failed: {run['stderr']}")
    p.unlink(missing_ok=True)
    return a, b, b2 if planted else None


RECOVERY_SCRIPT = r"""
import json, sys, torch
from safetensors import safe_open
from lib_rebasin.checkpoint import Checkpoint
from lib_rebasin.permute import check_permutations, spec_for_checkpoint
from lib_rebasin.readers import PermutedReader
from lib_rebasin.spec.core import invert, random_permutations
a_path, b_path, cache_path, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with Checkpoint(a_path) as a, Checkpoint(b_path) as b, safe_open(cache_path, "pt") as cache:
    spec = spec_for_checkpoint(a)
    perms = check_permutations(spec, {n: cache.get_tensor("0/" + n).long() for n in spec.groups})
    planted = invert(random_permutations(spec, seed))
    back = sum(int((perms[n] == planted[n]).sum()) for n in spec.groups)
    rows = sum(len(p) for p in planted.values())
    groups = sum(bool(torch.equal(perms[n], planted[n])) for n in spec.groups)
    aligned = PermutedReader(b, spec, perms)
    diff = norm = 0.0
    for key, info in a.infos.items():
        if not info.dtype.is_floating_point or key not in b.infos:
            continue
        ta = a.get(key).double()
        diff += float((aligned.get(key).double() - ta).square().sum())
        norm += float(ta.square().sum())
print(json.dumps({"rows_back": back / rows, "groups_back": groups, "groups": len(spec.groups),
                  "relative_l2": (diff / norm) ** 0.5}))
"""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def ours(a: Path, b: Path, out: Path, alpha: float, device: str, cache_dir: Path | None = None) -> dict:
    """One re-basin, end to end; with `cache_dir` (empty: no hit) its permutations are kept there."""
    report = out.with_suffix(".report.json")
    cache = ["--cache-dir", str(cache_dir)] if cache_dir else ["--no-cache"]
    run = measured([PYTHON, "-m", "lib_rebasin", "rebasin", str(a), str(b), "--alpha", str(alpha), "-o", str(out),
                    *cache, "--device", device, "--report", str(report), "--overwrite"])
    if run["code"]:
        sys.exit(f"rebasin failed: {run['stderr']}")
    run["report"] = json.loads(report.read_text())
    report.unlink()
    return run


def describe_ours(run: dict) -> list[str]:
    m, t = run["report"]["matching"], run["report"]["seconds"]
    skipped = m["solver_needed"] - m["solver_solved"]
    screen = m.get("screen_dtype") or "off"
    sweeps = "; ".join(f"{s['sweep']}: {s['visited']} checked, {s['changed']} moved, {s['seconds']:.0f} s"
                       for s in m["sweeps"])
    return [
        f"  wall {run['seconds']:.1f} s (hash {t['hash']:.1f} s, match {t['match']:.1f} s, merge+write "
        f"{t['write']:.1f} s); matching phases {m['seconds']}",
        f"  peak RSS {gib(run['peak_rss'])} (anonymous {gib(run['peak_anon'])})",
        f"  groups changed {m['changed_groups']}, sweeps {len(m['sweeps'])} ({sweeps}), solver calls skipped "
        f"{skipped}/{m['solver_needed']} ({100 * skipped / max(m['solver_needed'], 1):.1f} %), "
        f"screening {screen}",
    ]


def recovery(a: Path, b2: Path, cache_dir: Path, seed: int) -> dict:
    found = sorted(cache_dir.glob("*.rebasin-perms"))
    if len(found) != 1:
        sys.exit(f"expected one permutation cache file in {cache_dir}, found {len(found)}")
    run = measured([PYTHON, "-c", RECOVERY_SCRIPT, str(a), str(b2), str(found[0]), str(seed)])
    if run["code"]:
        sys.exit(f"recovery check failed: {run['stderr']}")
    return json.loads(run["stdout"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/work/bench-data/matching")
    parser.add_argument("--scale", default="full", choices=("full", "small", "tiny"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--inputs", nargs=3, metavar=("A", "B", "B2"), help="use these files (B: A's same-base "
                        "fine-tune, B2: A permuted with --planted-seed plus a drift) instead of making them")
    parser.add_argument("--planted-seed", type=int, default=7, help="seed of the planted permutation (default 7)")
    parser.add_argument("--skip-planted", action="store_true", help="only the same-base pair")
    parser.add_argument("--skip-mecha", action="store_true", help="only measure ours")
    parser.add_argument("--mecha-threads", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.inputs:
            a, b, b2 = map(Path, args.inputs)
            b2 = None if args.skip_planted else b2
        else:
            a, b, b2 = make_inputs(workdir, args.scale, args.planted_seed, not args.skip_planted)
        size_a, size_b = a.stat().st_size, b.stat().st_size
        limit = size_a + size_b + 3 * 2**30
        print(f"inputs: {a.name} {gib(size_a)}, {b.name} {gib(size_b)} (same base, 1 % drift)"
              + (f", {b2.name} (planted permutation, seed {args.planted_seed}, 1 % drift)" if b2 else "")
              + f"; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other processes slow every figure)")

        print("\n1. ours: rebasin(A, B, α = 0.5), end to end")
        same_cache = workdir / "same-base-perms"
        shutil.rmtree(same_cache, ignore_errors=True)
        end_to_end = ours(a, b, workdir / "ours_alpha05.safetensors", 0.5, args.device, same_cache)
        shutil.rmtree(same_cache, ignore_errors=True)
        for line in describe_ours(end_to_end):
            print(line)
        m = end_to_end["report"]["matching"]
        print(f"  targets: time ≤ 600 s: {end_to_end['seconds'] <= 600}; skipped ≥ 90 %: "
              f"{(m['solver_needed'] - m['solver_solved']) >= 0.9 * m['solver_needed']}; "
              f"peak RSS ≤ size(A) + size(B) + 3 GB ({gib(limit)}): {end_to_end['peak_rss'] <= limit}")
        (workdir / "ours_alpha05.safetensors").unlink()

        if b2 is not None:
            print("\n   the planted pair: rebasin(A, B2, α = 0.5), end to end, same settings")
            cache_dir = workdir / "planted-perms"
            shutil.rmtree(cache_dir, ignore_errors=True)
            planted = ours(a, b2, workdir / "ours_planted.safetensors", 0.5, args.device, cache_dir)
            (workdir / "ours_planted.safetensors").unlink()
            for line in describe_ours(planted):
                print(line)
            found = recovery(a, b2, cache_dir, args.planted_seed)
            shutil.rmtree(cache_dir, ignore_errors=True)
            ratio = planted["seconds"] / end_to_end["seconds"]
            print(f"  recovered: {100 * found['rows_back']:.3f} % of the rows back in A's basis "
                  f"({found['groups_back']}/{found['groups']} groups exactly), ‖P(B2) − A‖ / ‖A‖ = "
                  f"{100 * found['relative_l2']:.3f} %")
            print(f"  time planted / same-base: {ratio:.2f}×")
            print(f"  targets: ≤ 2× the same-base time: {ratio <= 2}; ≥ 99 % recovered: "
                  f"{found['rows_back'] >= 0.99}; P(B2) within 2 % of A: {found['relative_l2'] <= 0.02}; "
                  f"peak RSS ≤ {gib(limit)}: {planted['peak_rss'] <= limit}")

        if args.skip_mecha:
            return 0
        if args.scale != "full" and not args.inputs:
            print("\n2. sd-mecha runs on full-size SDXL only: use --scale full for the comparison")
            return 0
        print("\n2. B re-based into A's basis and written (α = 1), same files")
        ours_p = ours(a, b, workdir / "ours_pb.safetensors", 1.0, args.device)
        for line in describe_ours(ours_p):
            print(line)
        mecha_out = workdir / "mecha_pb.safetensors"
        mecha = measured([PYTHON, "-c", MECHA_SCRIPT, str(a), str(b), str(mecha_out), str(args.mecha_threads)])
        if mecha["code"]:
            print(f"  sd-mecha failed: {mecha['stderr']}")
            return 1
        groups = measured([PYTHON, "-c", MECHA_GROUPS_SCRIPT, str(b), str(mecha_out)])
        counted = json.loads(groups["stdout"]) if groups["code"] == 0 else {"groups": "?", "changed": "?"}
        print(f"  sd-mecha 1.1.8: wall {mecha['seconds']:.1f} s, peak RSS {gib(mecha['peak_rss'])} "
              f"(anonymous {gib(mecha['peak_anon'])}), groups changed {counted['changed']}/{counted['groups']}")
        print(f"  speed ratio (sd-mecha time / ours): {mecha['seconds'] / ours_p['seconds']:.2f}×")
        m = ours_p["report"]["matching"]
        print(f"  groups: ours {m['changed_groups']} changed (exact spec: residual streams, ResBlock inner, "
              f"embeddings, transformer streams, FF hidden, heads, text encoders); sd-mecha "
              f"{counted['changed']}/{counted['groups']} (heads as 10/20-wide windows, FF hidden, embeddings, "
              f"text-encoder heads and MLPs)")
        return 0
    finally:
        if not args.keep and created:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
