"""Peak RSS of the streaming safetensors writer stays flat as the output grows (0.5 GB → ≥ 4 GB).

Each size runs in a fresh process that generates fp16 tensors of SDXL-like sizes one at a time and streams
them through `SafetensorsWriter`; the floor is the same process generating the tensors without writing.
For contrast, `safetensors.torch.save_file` (which needs the whole state dict in RAM) runs at the smallest
size.  Usage: python benchmarks/bench_writer.py [--dir DIR] [--sizes 0.5,1,2,4.5]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import os, sys, time, resource
import torch
from lib_rebasin.checkpoint import SafetensorsWriter, TensorInfo
mode, size_gb, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
shapes = [(1280, 1280 * 2, 3, 3)]  # a 29.5 MB fp16 conv: the size of SDXL's largest UNet tensors
per = 1280 * 1280 * 2 * 9 * 2
count = int(size_gb * 1e9 // per)
infos = {f"t{i}": TensorInfo(shapes[0], torch.float16) for i in range(count)}
def tensor(i):
    return torch.full(shapes[0], float(i % 7), dtype=torch.float16)
start = time.perf_counter()
if mode == "ours":
    with SafetensorsWriter(out, infos) as w:
        for i, key in enumerate(w.keys):
            w.write(key, tensor(i))
elif mode == "floor":
    for i in range(count):
        tensor(i)
else:
    import safetensors.torch
    safetensors.torch.save_file({k: tensor(i) for i, k in enumerate(infos)}, out)
elapsed = time.perf_counter() - start
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
print(f"{count * per} {hwm()} {elapsed}")
"""


def run(mode: str, size_gb: float, folder: str) -> tuple[int, int, float]:
    out = os.path.join(folder, f"bench_{mode}_{size_gb}.safetensors")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(size_gb), out], cwd=root,
                          capture_output=True, text=True, check=True)
    if os.path.exists(out):
        os.remove(out)
    written, peak, elapsed = proc.stdout.split()
    return int(written), int(peak), float(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="folder for the temporary outputs (default: a temp dir)")
    parser.add_argument("--sizes", default="0.5,1,2,4.5", help="output sizes in GB")
    args = parser.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="bench_writer_")
    sizes = [float(s) for s in args.sizes.split(",")]
    print(f"{'mode':<22}{'output':>10}{'peak RSS':>12}{'time':>9}{'MB/s':>8}")
    peaks = {}
    for size in sizes:
        for mode in ("floor", "ours"):
            written, peak, elapsed = run(mode, size, folder)
            peaks[(mode, size)] = peak
            rate = f"{written / elapsed / 1e6:.0f}" if mode == "ours" else ""
            print(f"{mode:<22}{written / 1e9:>8.2f}GB{peak / 2**20:>10.0f}MB{elapsed:>8.1f}s{rate:>8}")
    written, peak, elapsed = run("safetensors.save_file", sizes[0], folder)
    print(f"{'safetensors.save_file':<22}{written / 1e9:>8.2f}GB{peak / 2**20:>10.0f}MB{elapsed:>8.1f}s")
    small, large = sizes[0], sizes[-1]
    growth = peaks[("ours", large)] / peaks[("ours", small)]
    over_floor = (peaks[("ours", large)] - peaks[("floor", large)]) / 2**20
    print(f"\npeak RSS {large} GB / {small} GB output: {growth:.3f}x "
          f"(writer's peak above the no-write floor at {large} GB: {over_floor:.0f} MB)")


if __name__ == "__main__":
    main()
