"""Where a job computes: device names, which devices this machine has, and whether a kind of work runs there.

Webuis run on cuda, mps (Apple), xpu (Intel) and DirectML (`torch_directml`, a `privateuseone` device), and
not every operation exists everywhere (mps has no float64; DirectML lacks many kernels).  Before a job reads
anything big, `place` runs a tiny instance of the work on the chosen device and compares it with the CPU;
where that fails, the work runs on the CPU and the job says so (`Placement.note`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

TYPES = ("cpu", "cuda", "mps", "xpu", "privateuseone", "npu")   # what the webuis run on (privateuseone: DirectML)
_ALIASES = {"dml": "privateuseone:0", "directml": "privateuseone:0", "gpu": "cuda"}
HELP = "cpu, cuda, cuda:N, mps, xpu, xpu:N or privateuseone:N (DirectML, also 'dml')"


class DeviceError(ValueError):
    """A device name that is not a device, or a device this machine does not have."""


def parse(name: str | torch.device) -> torch.device:
    """A device as the UI, the CLI and the webuis name it (see HELP; any other device type torch knows is
    taken too, and `place` finds out whether the work runs there)."""
    text = str(name).strip().lower()
    text = _ALIASES.get(text, text)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type == "meta" or (device.type == "cpu" and device.index):
        raise DeviceError(f"unknown device {str(name)!r}: use {HELP}")
    return device


def _directml():
    try:
        import torch_directml
    except ImportError:
        return None
    return torch_directml


def _count(kind: str) -> int | None:
    """How many devices of a kind torch can use here (0: none, or no support in this torch; None: unknown)."""
    try:
        if kind == "cpu":
            return 1
        if kind == "mps":
            return 1 if torch.backends.mps.is_available() else 0
        if kind == "privateuseone":
            dml = _directml()
            return dml.device_count() if dml is not None and dml.is_available() else 0
        module = getattr(torch, kind, None)  # cuda, xpu, npu (torch_npu), ...
        if module is None or not hasattr(module, "is_available"):
            return None
        return module.device_count() if module.is_available() else 0
    except (RuntimeError, AssertionError):  # a backend that is compiled in but broken counts as absent
        return 0


_MISSING = {"cuda": "torch sees no CUDA device", "mps": "torch sees no Apple GPU (mps)",
            "xpu": "torch sees no Intel GPU (xpu)", "privateuseone": "torch_directml is not installed or sees no GPU"}


def require(name: str | torch.device) -> torch.device:
    """The device named, if this machine has it; else a DeviceError that says what is missing."""
    device = parse(name)
    count = _count(device.type)
    index = device.index or 0
    if count is not None and index >= count:
        reason = (_MISSING.get(device.type, f"torch sees no {device.type} device") if count == 0
                  else f"there are only {count} {device.type} devices")
        raise DeviceError(f"device {str(device)!r} is not available here: {reason}")
    return device


def choices() -> list[str]:
    """Every device this machine offers, CPU first."""
    names = ["cpu"]
    for kind in TYPES[1:]:
        count = _count(kind)
        if count:  # (None: torch has no such backend to ask)
            names.append(kind if kind != "privateuseone" else "privateuseone:0")
            if count > 1 or kind == "privateuseone":
                names += [f"{kind}:{i}" for i in range(count) if f"{kind}:{i}" not in names]
    return names


def is_accelerator(device: str | torch.device) -> bool:
    """Whether `device` is a GPU (or another accelerator with memory of its own)."""
    try:
        return parse(device).type != "cpu"
    except DeviceError:
        return False


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` now (None where torch cannot tell)."""
    try:
        if device.type == "cuda":  # free on the card, and what torch's allocator holds without using
            reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return torch.cuda.mem_get_info(device)[0] + reserved
        if device.type == "xpu" and hasattr(torch.xpu, "mem_get_info"):
            return torch.xpu.mem_get_info(device)[0]
        if device.type == "mps":
            return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    except (RuntimeError, AttributeError, AssertionError):
        return None
    return None


def empty_cache(device: torch.device) -> None:
    """Give the allocator's cached blocks back to the device."""
    module = getattr(torch, device.type, None) if device.type in ("cuda", "mps", "xpu") else None
    if module is not None and hasattr(module, "empty_cache"):
        try:
            module.empty_cache()
        except RuntimeError:
            pass


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure on a device (each backend words it its own way)."""
    if isinstance(error, getattr(torch, "OutOfMemoryError", ())) or isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


# --- does a kind of work run on a device ------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    device: torch.device     # where the work runs
    note: str | None = None  # why that is not the device asked for


def _matching_runs(device: torch.device) -> None:
    """A tiny matching (a free and a GroupNorm-structured group, bfloat16 screening on and off) gives the
    CPU's permutations on `device`."""
    from .matching import MatchOptions, match
    from .spec.core import Binding, Group, Spec, structure_from_partitions
    g = torch.Generator().manual_seed(0)
    spec = Spec({
        "free": Group("free", 16, "probe", [Binding("w1", 0, 0, 16), Binding("w2", 1, 0, 16)]),
        "norm": Group("norm", 32, "probe", [Binding("w2", 0, 0, 32), Binding("w3", 1, 0, 32)],
                      structure_from_partitions(32, [range(0, 32, 8)])),
    })
    a = {"w1": torch.randn(16, 24, generator=g), "w2": torch.randn(32, 16, generator=g),
         "w3": torch.randn(8, 32, generator=g)}
    b = {k: v.flip(0).half() if k != "w3" else v.flip(1).half() for k, v in a.items()}
    for screen in ("off", "on"):
        here = match(spec, a, b, MatchOptions(device=str(device), screen=screen)).perms
        cpu = match(spec, a, b, MatchOptions(screen=screen)).perms
        if any(not torch.equal(here[k], cpu[k]) for k in spec.groups):
            raise AssertionError(f"its permutations differ from the CPU's")


def _merging_runs(compute: torch.dtype) -> Callable[[torch.device], None]:
    def probe(device: torch.device) -> None:
        """The operations of the merge kernels on a few values, against the CPU."""
        x = torch.linspace(-2, 2, 64, dtype=torch.float16)
        y = x.flip(0).to(torch.bfloat16)
        results = []
        for where in (torch.device("cpu"), device):
            a, b = x.to(where).to(compute), y.to(where).to(compute)
            d = torch.sub(b, a)
            out = torch.lerp(a, b, 0.25) + torch.mul(d, 2.0).add_(a).div_(3)
            out = torch.clamp(out, torch.minimum(a, b), torch.maximum(a, b))
            lo, hi = torch.aminmax(out)
            stats = (torch.linalg.vector_norm(d).item(), lo.item(), hi.item(), int(torch.isnan(out).sum()))
            results.append((out.to(torch.float16).cpu(), stats))
        if not torch.equal(results[0][0], results[1][0]):
            raise AssertionError("its results differ from the CPU's")
    return probe


WORK: dict[str, Callable[[torch.device], None]] = {
    "matching": _matching_runs,
    "merging": _merging_runs(torch.float32),
    "merging in float64": _merging_runs(torch.float64),
}
_VERDICTS: dict[tuple[str, str], str | None] = {}


def place(device: torch.device | str, kind: str) -> Placement:
    """Where a kind of work (a key of WORK) asked for on `device` runs: there if a tiny instance of it runs and
    agrees with the CPU (tried once per device), else on the CPU, with a note saying why."""
    device = torch.device(device)
    if device.type == "cpu":
        return Placement(device)
    key = (str(device), kind)
    if key not in _VERDICTS:
        try:
            WORK[kind](device)
            _VERDICTS[key] = None
        except Exception as e:  # whatever fails there (a missing kernel or dtype, a wrong result) rules it out
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            _VERDICTS[key] = f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
    reason = _VERDICTS[key]
    if reason is None:
        return Placement(device)
    return Placement(torch.device("cpu"), f"{kind} ran on the CPU: it does not run on {device} ({reason})")


@dataclass(frozen=True)
class JobDevices:
    """Where the parts of one job run, decided before it reads anything big."""
    merging: torch.device
    matching: torch.device | None        # None: the job does no weight matching
    notes: tuple[str, ...] = ()          # for the user: a part that runs on the CPU instead, and why


def plan_job(name: str | torch.device, *, matching: bool, compute: torch.dtype = torch.float32) -> JobDevices:
    """The devices of a job asked to run on `name`: a DeviceError if this machine lacks it; each part (merging
    in `compute`, weight matching) there if it runs there, else on the CPU with a note."""
    device = require(name)
    merge = place(device, "merging in float64" if compute == torch.float64 else "merging")
    match = place(device, "matching") if matching else None
    notes = tuple(p.note for p in (merge, match) if p is not None and p.note)
    return JobDevices(merge.device, match.device if match is not None else None, notes)
