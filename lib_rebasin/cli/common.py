"""Helpers shared by the subcommands: progress bars, dtype names, JSON output."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Iterator

import torch

from ..progress import Monitor

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Monitor]:
    """A Monitor that draws a tqdm bar on stderr (plain text when stderr is not a terminal)."""
    from tqdm import tqdm
    with tqdm(total=1000, desc=description, unit="‰", file=sys.stderr, leave=True,
              disable=None, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}") as bar:
        def on_progress(fraction: float, message: str) -> None:
            bar.n = int(fraction * 1000)
            bar.set_postfix_str(message[-60:], refresh=False)
            bar.refresh()
        yield Monitor(on_progress=on_progress)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
