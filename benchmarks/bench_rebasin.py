"""Re-basin benchmark: a same-base SDXL pair (synthetic: a base, and the base plus a 1 % seeded drift).

1. Ours, end to end (`python -m lib_rebasin rebasin A B --alpha 0.5`): hashing, matching, merging and writing,
   wall time, peak RSS (and its anonymous part: the file-backed part is the page cache of the memory-mapped
   inputs), solver calls skipped, groups changed.  Targets: ≤ 10 min for full SDXL on 2 cores, ≥ 90 % of the
   solver calls skipped, peak RSS ≤ size(A) + size(B) + 3 GB.
2. Side by side on the same files, B re-based into A's basis and written (α = 1): ours and sd-mecha 1.1.8's
   `rebasin(B, A)`.  sd-mecha builds its permutation graph from the full SDXL key table at import, so it only
   runs on full-size checkpoints: the comparison uses the full-size pair (a reduced-scale pair would not load
   in sd-mecha).  Reported: the time ratio, peak memory, and how many permutation groups each has and
   changes (sd-mecha's changes are read off its output: a group moved if any window it permutes differs
   from B).

    python benchmarks/bench_rebasin.py [--workdir /work/bench-data/matching] [--scale full] [--keep]
                                       [--skip-mecha] [--device cpu]

Files go to --workdir and are deleted at the end unless --keep.  Run one benchmark at a time on a shared
machine: the figures are wall-clock times.
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


def make_pair(workdir: Path, scale: str) -> tuple[Path, Path]:
    a, b = workdir / f"A_{scale}.safetensors", workdir / f"B_{scale}.safetensors"
    if not a.exists():
        run = measured([PYTHON, "-m", "lib_rebasin", "make-synthetic", str(a), "--scale", scale, "--seed", "1"])
        if run["code"]:
            sys.exit(f"make-synthetic failed: {run['stderr']}")
    if not b.exists():
        run = measured([PYTHON, "-m", "lib_rebasin", "make-synthetic", str(b), "--base", str(a), "--seed", "2",
                        "--drift", "0.01"])
        if run["code"]:
            sys.exit(f"make-synthetic --base failed: {run['stderr']}")
    return a, b


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def ours(a: Path, b: Path, out: Path, alpha: float, device: str) -> dict:
    report = out.with_suffix(".report.json")
    run = measured([PYTHON, "-m", "lib_rebasin", "rebasin", str(a), str(b), "--alpha", str(alpha), "-o", str(out),
                    "--no-cache", "--device", device, "--report", str(report), "--overwrite"])
    if run["code"]:
        sys.exit(f"rebasin failed: {run['stderr']}")
    run["report"] = json.loads(report.read_text())
    report.unlink()
    return run


def describe_ours(run: dict) -> list[str]:
    m, t = run["report"]["matching"], run["report"]["seconds"]
    skipped = m["solver_needed"] - m["solver_solved"]
    screen = m.get("screen_dtype") or "off"
    return [
        f"  wall {run['seconds']:.1f} s (hash {t['hash']:.1f} s, match {t['match']:.1f} s, merge+write "
        f"{t['write']:.1f} s); matching phases {m['seconds']}",
        f"  peak RSS {gib(run['peak_rss'])} (anonymous {gib(run['peak_anon'])})",
        f"  groups changed {m['changed_groups']}, sweeps {len(m['sweeps'])}, solver calls skipped "
        f"{skipped}/{m['solver_needed']} ({100 * skipped / max(m['solver_needed'], 1):.1f} %), "
        f"screening {screen}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/work/bench-data/matching")
    parser.add_argument("--scale", default="full", choices=("full", "small", "tiny"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--skip-mecha", action="store_true", help="only measure ours")
    parser.add_argument("--mecha-threads", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        a, b = make_pair(workdir, args.scale)
        size_a, size_b = a.stat().st_size, b.stat().st_size
        print(f"inputs: {a.name} {gib(size_a)}, {b.name} {gib(size_b)} (same base, 1 % drift), "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other processes slow every figure)")

        print("\n1. ours: rebasin(A, B, α = 0.5), end to end")
        end_to_end = ours(a, b, workdir / "ours_alpha05.safetensors", 0.5, args.device)
        for line in describe_ours(end_to_end):
            print(line)
        m = end_to_end["report"]["matching"]
        limit = size_a + size_b + 3 * 2**30
        print(f"  targets: time ≤ 600 s: {end_to_end['seconds'] <= 600}; skipped ≥ 90 %: "
              f"{(m['solver_needed'] - m['solver_solved']) >= 0.9 * m['solver_needed']}; "
              f"peak RSS ≤ size(A) + size(B) + 3 GB ({gib(limit)}): {end_to_end['peak_rss'] <= limit}")
        (workdir / "ours_alpha05.safetensors").unlink()

        if args.skip_mecha:
            return 0
        if args.scale != "full":
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
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
