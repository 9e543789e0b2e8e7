"""GPU benchmark: the merges users run, on the GPU and on the CPU, in one table.

    python benchmarks/bench_gpu.py SCRATCH [--device cuda] [--budget 450] [--keep]
    python benchmarks/bench_gpu.py SCRATCH --dry-run        # tiny scale, the CPU standing in for the GPU (CI)

Builds a full-size synthetic SDXL pair in SCRATCH — A (seed 1), B = A + 1 % drift (a same-base fine-tune), and
B2 = P + 1 % drift where P is A under a random valid permutation (`permute A P --seed 7`), so that every
permutation group needs the solver — then runs on each device:

- amp:          A + 2·(B − A)
- rebasin:      re-basin of the same-base pair (A, B), α = 0.5
- rebasin-perm: re-basin of the planted-permutation pair (A, B2), α = 0.5

end to end through `jobs.run` (hashing, matching, merging, writing), without the permutation cache, and prints
one table: wall time, peak RAM (RSS), peak VRAM (allocated by torch), the GPU/CPU time ratio, and whether the
GPU's result agrees with the CPU's (the same permutations; merged weights within one unit in the last place).
Goal on one H100/H200-class GPU: the full-size re-basin end to end ≤ 60 s; the whole benchmark < 8 minutes.
The CPU runs share what is left of --budget seconds; one that would exceed its share is stopped and shown as
"> t" (the ratio as a bound).  Outputs are deleted after each comparison; SCRATCH is kept with --keep.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_rebasin import jobs  # noqa: E402
from lib_rebasin.permute import permute_file  # noqa: E402
from lib_rebasin.progress import Cancelled, Monitor  # noqa: E402
from lib_rebasin.synthetic import write_synthetic  # noqa: E402

GIB = 1 << 30
JOBS = {  # name -> (method, model names, weights)
    "amp": ("amp", ("A", "B"), {"multiplier": 2.0}),
    "rebasin": ("rebasin", ("A", "B"), {"alpha": 0.5}),
    "rebasin-perm": ("rebasin", ("A", "B2"), {"alpha": 0.5}),
}


@dataclass
class Run:
    job: str
    device: str
    seconds: float | None = None      # None: stopped at its time limit
    limit: float | None = None
    ram: int = 0
    vram: int | None = None
    output: Path | None = None
    cache_file: str | None = None
    notes: list[str] = field(default_factory=list)


class PeakRss:
    """The process's resident set size, sampled every 20 ms while a block runs (its high-water mark)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def build_inputs(folder: Path, scale: str) -> dict[str, Path]:
    """A, B (same base), P (A permuted) and B2 (P + drift): written once, reused by later runs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.safetensors" for name in ("A", "B", "P", "B2")}
    steps = [("A", lambda out: write_synthetic(out, scale=scale, seed=1)),
             ("B", lambda out: write_synthetic(out, base=paths["A"], seed=2, drift=0.01)),
             ("P", lambda out: permute_file(paths["A"], out, 7)),
             ("B2", lambda out: write_synthetic(out, base=paths["P"], seed=3, drift=0.01))]
    for name, make in steps:
        if not paths[name].exists():
            started = time.monotonic()
            make(paths[name])
            print(f"built {name} ({paths[name].stat().st_size / GIB:.2f} GB) in {time.monotonic() - started:.0f} s",
                  flush=True)
    return paths


def run_job(job: str, device: str, label: str, inputs: dict[str, Path], folder: Path, limit: float | None) -> Run:
    method, models, weights = JOBS[job]
    out_dir = folder / f"{job}-{device.replace(':', '')}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    request = jobs.MergeRequest(method=method, models=[str(inputs[m]) for m in models],
                                output=str(out_dir / "out.safetensors"), device=device, dtype="fp16", **weights)
    run = Run(job, label, limit=limit)
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch_device)
    started = time.monotonic()
    deadline = None if limit is None else started + limit
    monitor = Monitor(lambda fraction, message: None, lambda: deadline is not None and time.monotonic() > deadline)
    with PeakRss() as rss:
        try:
            result = jobs.run(request, monitor)
        except Cancelled:
            result = None
    run.ram = rss.peak
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
        run.vram = torch.cuda.max_memory_allocated(torch_device)
    if result is not None:
        run.seconds = time.monotonic() - started
        run.output = Path(result.path)
        run.cache_file = (result.report.get("matching") or {}).get("cache_file")
        run.notes = list(result.warnings)
    return run


def permutations_equal(first: str | None, second: str | None) -> bool | None:
    """Whether two permutation cache files hold the same permutations (None: one of them is missing)."""
    if not first or not second:
        return None
    from safetensors import safe_open
    with safe_open(first, "pt") as a, safe_open(second, "pt") as b:
        if set(a.keys()) != set(b.keys()):
            return False
        return all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def ulp_distance(first: Path | None, second: Path | None) -> int | None:
    """The largest difference between two checkpoints in units in the last place of their dtype."""
    if first is None or second is None:
        return None
    from safetensors import safe_open
    worst = 0
    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            if not x.is_floating_point():
                worst = max(worst, 0 if torch.equal(x, y) else 1 << 30)
                continue
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            # IEEE bit patterns, made monotonic across zero, count the representable values between x and y
            xi, yi = (t.contiguous().view(ints).long() for t in (x, y))
            top = 1 << (8 * x.element_size() - 1)
            xi = torch.where(xi < 0, -(xi + top), xi)
            yi = torch.where(yi < 0, -(yi + top), yi)
            worst = max(worst, int((xi - yi).abs().max()) if xi.numel() else 0)
    return worst


def text(n: float | None, unit: str = "") -> str:
    return "—" if n is None else f"{n:.1f}{unit}"


def table(runs: dict[tuple[str, str], Run], gpu: str, cpu: str) -> str:
    rows = [("job", "device", "time s", "peak RAM GB", "peak VRAM GB", "GPU/CPU time", "same as CPU")]
    for job in JOBS:
        g, c = runs.get((job, gpu)), runs.get((job, cpu))
        for run in (g, c):
            if run is None:
                continue
            seconds = f"> {run.limit:.0f}" if run.seconds is None else f"{run.seconds:.1f}"
            ratio = same = ""
            if run is g and c is not None and g.seconds is not None:
                if c.seconds is not None:
                    ratio = f"{g.seconds / c.seconds:.3f}"
                else:
                    ratio = f"< {g.seconds / c.limit:.3f}"
                if job == "amp":
                    ulps = ulp_distance(g.output, c.output)
                    same = "—" if ulps is None else f"{ulps} ulp"
                else:
                    equal = permutations_equal(g.cache_file, c.cache_file)
                    same = "—" if equal is None else ("same permutations" if equal else "PERMUTATIONS DIFFER")
            vram = None if run.vram is None else run.vram / GIB
            rows.append((job, run.device, seconds, text(run.ram / GIB), text(vram), ratio, same))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scratch", type=Path, help="folder for the synthetic inputs and the outputs")
    parser.add_argument("--device", default="cuda", help="the GPU to measure (default cuda)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for the whole benchmark; the CPU runs share what the rest leaves")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny scale, the CPU standing in for the GPU: checks the benchmark itself")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic inputs in SCRATCH")
    args = parser.parse_args(argv)
    started = time.monotonic()
    scale = "tiny" if args.dry_run else "full"
    gpu, cpu = ("cpu", "cpu") if args.dry_run else (args.device, "cpu")
    if not args.dry_run:
        from lib_rebasin import devices
        devices.require(gpu)
    args.scratch.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(args.scratch / "inputs", scale)
    if torch.device(gpu).type == "cuda":  # context creation and kernel loading are not the job's time
        torch.ones(1, device=gpu).matmul(torch.ones(1, 1, device=gpu))
    runs: dict[tuple[str, str], Run] = {}
    gpu_label = "cpu (standing in for the GPU)" if args.dry_run else gpu
    try:
        for job in JOBS:
            runs[job, gpu_label] = run = run_job(job, gpu, gpu_label, inputs, args.scratch / "gpu", None)
            print(f"{job} on {gpu_label}: {text(run.seconds, ' s')}", *run.notes, flush=True)
        for index, job in enumerate(JOBS):
            left = args.budget - (time.monotonic() - started)
            limit = None if args.dry_run else max(left / (len(JOBS) - index), 10.0)
            runs[job, cpu] = run = run_job(job, cpu, cpu, inputs, args.scratch / "cpu", limit)
            print(f"{job} on {cpu}: {text(run.seconds, ' s') if run.seconds else f'stopped at {limit:.0f} s'}",
                  flush=True)
        print()
        print(table(runs, gpu_label, cpu))
        print(f"\ntotal {time.monotonic() - started:.0f} s ({scale} scale)")
    finally:
        for folder in ("gpu", "cpu"):
            shutil.rmtree(args.scratch / folder, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.scratch / "inputs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
