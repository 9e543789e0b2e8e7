"""Benchmark: amplified difference 2B − A on a full-size synthetic SDXL fp16 pair, against the I/O floor and
sd-mecha, in one run.

    python benchmarks/bench_amp.py [--workdir DIR] [--skip-mecha] [--keep] [--repeat N]

A and B are made in DIR if missing (`make-synthetic --scale full`, then a 1 % drift of it).  Each contender
runs in a fresh process with both inputs evicted from the page cache first (posix_fadvise DONTNEED):

  floor         read A, then copy B to an output file and fsync it (plain 16 MiB file reads and writes)
  amp           our `amp`, M = 2, fp32 compute, fp16 output, hash cache empty: the first merge of these files
  amp (cached)  the same with the inputs' sha256 already cached
  sd-mecha      add_difference(A, B, A, alpha=2) as users run it, merge_dtype fp32, output fp16, file to file

Times are measured inside each process (imports excluded); peak anonymous RSS (RssAnon: mmap'd file pages
do not count) is sampled every 20 ms from outside, peak total RSS is the kernel's ru_maxrss.
Targets: amp ≤ 1.3 × floor, sd-mecha ≥ 2 × amp, peak anonymous RSS ≤ 1 GiB.  The output files are deleted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30


def evict(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


# --- the contenders (run in a child process) -------------------------------------------------------------------

def run_floor(a: Path, b: Path, out: Path) -> None:
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    with open(a, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    with open(b, "rb", buffering=0) as f, open(out, "wb", buffering=0) as g:
        while n := f.readinto(buffer):
            g.write(view[:n])
        os.fsync(g.fileno())


def run_amp(a: Path, b: Path, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from lib_rebasin import jobs
    jobs.run(jobs.MergeRequest("amp", [str(a), str(b)], str(out), multiplier=2.0, dtype="fp16", compute="fp32"))


def run_mecha(a: Path, b: Path, out: Path) -> None:
    import sd_mecha
    import torch
    recipe = sd_mecha.add_difference(sd_mecha.model(str(a)), sd_mecha.model(str(b)), sd_mecha.model(str(a)),
                                     alpha=2.0, clamp_to_ab=False)
    sd_mecha.merge(recipe, output=str(out), merge_dtype=torch.float32, output_dtype=torch.float16)


CONTENDERS = {"floor": run_floor, "amp": run_amp, "amp-cached": run_amp, "sd-mecha": run_mecha}


def child(name: str, a: Path, b: Path, out: Path) -> None:
    if name == "sd-mecha":
        import sd_mecha  # noqa: F401  (imports before the clock starts, as for the others)
    elif name.startswith("amp"):
        sys.path.insert(0, str(ROOT))
        import lib_rebasin.jobs  # noqa: F401
    started = time.perf_counter()
    CONTENDERS[name](a, b, out)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


# --- the parent --------------------------------------------------------------------------------------------------

def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(name: str, a: Path, b: Path, out: Path, env: dict) -> dict:
    out.unlink(missing_ok=True)
    evict(a, b)
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as stderr:  # progress bars and warnings: shown only on failure
        proc = subprocess.Popen([sys.executable, __file__, "--child", name, str(a), str(b), str(out)],
                                stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, rss_anon(proc.pid))
            time.sleep(0.02)
        stdout = proc.stdout.read()
        if proc.returncode:
            stderr.seek(0)
            raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{stderr.read()[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(name=name, anon=peak, load=load, bytes=out.stat().st_size if out.exists() else 0)
    out.unlink(missing_ok=True)
    return result


def make_inputs(workdir: Path) -> tuple[Path, Path]:
    a, b = workdir / "bench_A.safetensors", workdir / "bench_B.safetensors"
    cli = [sys.executable, "-m", "lib_rebasin", "make-synthetic"]
    if not a.exists():
        subprocess.run(cli + [str(a), "--scale", "full", "--seed", "1"], check=True, cwd=ROOT)
    if not b.exists():
        subprocess.run(cli + [str(b), "--base", str(a), "--seed", "2", "--drift", "0.01"], check=True, cwd=ROOT)
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/merge"))
    parser.add_argument("--skip-mecha", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep A and B for another run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of floor/amp (the best round counts)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    a, b = make_inputs(args.workdir)
    out = args.workdir / "bench_out.safetensors"
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, LIB_REBASIN_CACHE_DIR=cache)
        results: dict[str, list[dict]] = {}
        for round_ in range(args.repeat):
            for name in ("floor", "amp", "amp-cached"):
                if name == "amp":
                    for f in Path(cache).glob("*"):
                        f.unlink()
                r = measure(name, a, b, out, env)
                results.setdefault(name, []).append(r)
                print(f"round {round_ + 1} {name:11} {r['seconds']:7.1f} s  anon {r['anon'] / 2**20:6.0f} MiB  "
                      f"(load {r['load']:.1f})", flush=True)
        if not args.skip_mecha:
            r = measure("sd-mecha", a, b, out, env)
            results["sd-mecha"] = [r]
            print(f"sd-mecha          {r['seconds']:7.1f} s  anon {r['anon'] / 2**20:6.0f} MiB  (load {r['load']:.1f})")
    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in results.items()}
    floor = best["floor"]["seconds"]
    print(f"\n{'contender':12} {'seconds':>8} {'× floor':>8} {'peak anon':>10} {'peak RSS':>9}")
    for name, r in best.items():
        print(f"{name:12} {r['seconds']:8.1f} {r['seconds'] / floor:8.2f} {r['anon'] / GiB:8.2f} GiB "
              f"{r['maxrss'] / GiB:6.2f} GiB")
    amp = best["amp"]
    print(f"\ntarget amp ≤ 1.3 × floor:       {amp['seconds'] / floor:.2f} (cached hashes "
          f"{best['amp-cached']['seconds'] / floor:.2f})")
    if "sd-mecha" in best:
        print(f"target sd-mecha ≥ 2 × amp:      {best['sd-mecha']['seconds'] / amp['seconds']:.2f}")
    print(f"target peak anon ≤ 1 GiB:       {max(amp['anon'], best['amp-cached']['anon']) / GiB:.2f} GiB")
    if not args.keep:
        a.unlink()
        b.unlink()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
