"""The GPU benchmark runs to completion without a GPU: `--dry-run` builds the same four inputs at tiny scale and
runs the same jobs through the same code, the CPU standing in for the GPU, and prints the same table."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


def test_gpu_benchmark_dry_run(tmp_path, capsys):
    bench = runpy.run_path(str(BENCH), run_name="bench_gpu")
    assert bench["main"]([str(tmp_path / "scratch"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("A", "B", "P", "B2"):
        assert f"built {name} " in out
    table = out[out.index("job "):].splitlines()
    cells = [re.split(r"\s{2,}", line.strip()) for line in table]
    assert cells[0] == ["job", "device", "time s", "peak RAM GB", "peak VRAM GB", "GPU/CPU time", "same as CPU"]
    rows = [c for c in cells[2:] if c[0] in ("amp", "rebasin", "rebasin-perm")]
    assert [(r[0], r[1]) for r in rows] == [(job, device) for job in ("amp", "rebasin", "rebasin-perm")
                                            for device in ("cpu (standing in for the GPU)", "cpu")]
    for stand_in, cpu in zip(rows[::2], rows[1::2]):
        assert float(stand_in[2]) > 0 and float(cpu[2]) > 0 and float(stand_in[3]) > 0.1   # seconds, GB of RAM
        assert stand_in[4] == "—"                                                           # no VRAM on a CPU
        g, c = float(stand_in[2]), float(cpu[2])                                            # shown to 0.1 s
        assert (g - 0.05) / (c + 0.05) <= float(stand_in[5]) <= (g + 0.05) / max(c - 0.05, 1e-9)  # the ratio
    # the same device twice: the same merge to the bit, the same permutations
    assert [r[6] for r in rows[::2]] == ["0 ulp", "same permutations", "same permutations"]
    assert not (tmp_path / "scratch" / "inputs").exists()  # inputs deleted without --keep
