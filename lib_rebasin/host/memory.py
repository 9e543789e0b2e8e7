"""When a job is short of memory beside the webui's loaded model, and what the tab says when the model made room.

A merge streams its inputs through memory-mapped reads: it runs at disk speed while the inputs fit in the page
cache beside everything else, and it thrashes (or, with a webui model of 11–22 GB in RAM, runs a 16–24 GB machine
out of memory) when they do not.  So a job "needs" its inputs' size plus its own buffers in RAM, and on a GPU a
fixed working room for its tensors (streamed merges need little, weight matching ~2 GB at SDXL's widest
groups).  The hosts compare that with the free memory their own memory management reports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

GIB = 1 << 30
JOB_BUFFERS = 1 * GIB   # a job's own working memory beside the page cache of its inputs (stream buffers, stats)
VRAM_NEED = 2 * GIB     # free VRAM a GPU job wants for its tensors


def ram_need(paths: Iterable[str | os.PathLike | None]) -> int:
    """RAM a job over these input files wants to run at disk speed: their size (read through the page cache)
    plus its buffers."""
    total = 0
    for path in paths:
        if path:
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
    return total + JOB_BUFFERS


def available_ram() -> int | None:
    """RAM the system can give without swapping (free + reclaimable cache), or None when unknown."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def short_of(need: int, free: int | None) -> bool:
    return free is not None and free < need


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GB"


@dataclass
class FreedModel:
    """The host's loaded model, unloaded while one job ran because memory was short (see Host.room_for)."""
    name: str           # what the webui calls it
    memory: str         # "RAM" or "VRAM"
    free: int           # bytes free before unloading
    need: int           # bytes the job wanted
    restored: bool = False
    error: str = ""     # why it could not be brought back

    def unloading(self) -> str:
        return f"unloading the webui's model: {self.name} (to make room in {self.memory})"

    def reloading(self) -> str:
        return f"loading the webui's model again: {self.name}"

    def describe(self) -> str:
        made_room = (f"The webui's model {self.name} was unloaded to make room in {self.memory} for this job "
                     f"({gib(self.free)} free, {gib(self.need)} wanted)")
        if self.restored:
            return f"{made_room}; it was loaded again afterwards."
        if self.error:
            return f"{made_room}; loading it again failed ({self.error}): select it again to load it."
        return f"{made_room}; the webui loads it again when it next needs it."
