"""Streamed linear merges: amplified difference A + M·(B − A), add difference A + M·(B − C) and weighted sum
(1 − α)·A + α·B, key by key, with a source per component, dtype handling, optional clamping, checks before
anything is written, recipe metadata and a safety report.

How: the inputs are memory-mapped and read ahead by background threads; `streaming.stream` computes the output
tensors in worker threads and writes them in one pass.  A worker evaluates its range in slices of 32 Ki elements:
upcast to fp32 (or fp64), formula, statistics for the report, cast.  Slices that small stay in the CPU cache
and keep each torch op on its own thread: torch would split bigger element-wise ops over every core, which
stalls on a busy machine.  Parents missing from the hash cache are hashed in background threads meanwhile,
and their sha256 written into the header at the end.  Memory: two output buffers (each the larger of 64 MiB
and the largest output tensor: 126 MB for SDXL in fp16) plus a few slices per worker.

Limits: the inputs must share one architecture and, for merged keys, one shape; one weight for every key.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .anatomy import (ARCH_LABELS, COMPONENT_LABELS, COMPONENTS, UNKNOWN, ArchitectureError, analyse,
                      component_of, derive_vae_config)
from .checkpoint import Checkpoint, SafetensorsWriter, TensorInfo, check_output_path
from .layout import VAE
from .progress import SILENT, Monitor
from .recipe import ParentHashes, Parent, merge_metadata
from .report import SafetyReport, TensorStats
from .streaming import Item, default_workers, stream

SOURCES = ("merge", "a", "b")
DEFAULT_COMPONENTS = {"unet": "merge", "clip_l": "merge", "clip_g": "merge", "vae": "a", "other": "a"}
OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "same": None}
COMPUTE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}

SLICE_CPU = 1 << 15        # element-wise torch ops up to this size run on the calling thread only
SLICE_DEVICE = 1 << 22
READ_AHEAD_BYTES = 512 << 20
READ_AHEAD_STEP = 32 << 20
METADATA_ROOM = 512        # header bytes kept free for the final metadata (hashes known at the end)
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class MergeError(ValueError):
    """A merge that cannot be done as asked; raised before anything is written. `details` lists every case."""

    def __init__(self, message: str, details: Sequence[str] = ()):
        super().__init__(message)
        self.details = list(details)


class UnsafeOutputError(MergeError):
    """The result holds NaN/inf or values beyond the output dtype's range; nothing was written."""

    def __init__(self, message: str, report: dict):
        super().__init__(message, [e["key"] for e in report["nonfinite"] + report["out_of_range"]])
        self.report = report


# --- the formulas ---------------------------------------------------------------------------------------------

def amplified_difference(a: torch.Tensor, b: torch.Tensor, multiplier: float, *, out=None) -> torch.Tensor:
    """A + M·(B − A), as lerp: exactly A at M = 0 and exactly B at M = 1."""
    return torch.lerp(a, b, multiplier, out=out)


def weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float, *, out=None) -> torch.Tensor:
    """(1 − α)·A + α·B, which is A + α·(B − A)."""
    return torch.lerp(a, b, alpha, out=out)


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, multiplier: float, *, out=None) -> torch.Tensor:
    """A + M·(B − C): exactly A at M = 0."""
    return torch.add(a, b - c, alpha=multiplier, out=out)


@dataclass(frozen=True)
class LinearMethod:
    label: str
    roles: tuple[str, ...]
    template: str      # with {M} / {alpha}
    parameter: str     # "M" or "alpha"
    difference: str    # the difference it applies, for the report


LINEAR_METHODS = {
    "amp": LinearMethod("Amplified difference", ("a", "b"), "A + {M}·(B − A)", "M", "B − A"),
    "add-diff": LinearMethod("Add difference", ("a", "b", "c"), "A + {M}·(B − C)", "M", "B − C"),
    "weighted-sum": LinearMethod("Weighted sum", ("a", "b"), "(1 − {alpha})·A + {alpha}·B", "alpha", "B − A"),
}


def number_text(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Formula:
    method: str
    weight: float

    def __post_init__(self):
        if self.method not in LINEAR_METHODS:
            raise MergeError(f"unknown linear merge {self.method!r}: choose one of {', '.join(LINEAR_METHODS)}")
        if not math.isfinite(self.weight):
            raise MergeError(f"{self.info.parameter} must be a finite number, not {self.weight}")

    @property
    def info(self) -> LinearMethod:
        return LINEAR_METHODS[self.method]

    @property
    def text(self) -> str:
        w = number_text(self.weight)
        return self.info.template.format(M=w, alpha=w)


# --- the plan: what every output key is made of ---------------------------------------------------------------

@dataclass
class KeyPlan:
    key: str             # output key
    component: str
    source: str          # "merge", or the file it is copied from: "a", "b", "vae"
    info: TensorInfo     # output shape and dtype
    source_key: str      # its key in the source file (differs for a standalone VAE file)
    checked: bool        # float values: cast and checked (position_ids and integer tensors are copied bit for bit)


@dataclass
class MergePlan:
    keys: list[KeyPlan]
    architecture: str
    missing: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return {p.key: p.info for p in self.keys}


def _role_name(role: str, ckpt: Checkpoint) -> str:
    return f"{role.upper()} ({ckpt.path.name})"


def _mergeable(key: str, dtypes: list[torch.dtype]) -> bool:
    return not key.endswith("position_ids") and all(d.is_floating_point for d in dtypes)


def _vae_sources(vae: Checkpoint) -> dict[str, str]:
    """Output key -> key in a VAE file, which may be a whole checkpoint or a standalone VAE (no prefix)."""
    prefixed = {k: k for k in vae.keys() if k.startswith(VAE)}
    if prefixed:
        return prefixed
    return {VAE + k: k for k in vae.keys() if k.startswith(_VAE_PARTS)}


def _listing(items: Sequence[str], limit: int = 8) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _component_counts(keys: Sequence[str], architecture: str) -> str:
    counts: dict[str, int] = {}
    for key in keys:
        component = component_of(key, architecture)
        counts[component] = counts.get(component, 0) + 1
    return ", ".join(f"{COMPONENT_LABELS[c]} {n}" for c, n in counts.items())


def _check_architectures(inputs: Mapping[str, Checkpoint], roles: Sequence[str]) -> tuple[str, list[str]]:
    """The inputs' common architecture (and warnings); MergeError naming both files if they differ."""
    a = inputs["a"]
    architectures = {role: analyse(inputs[role].shapes).architecture for role in roles}
    architecture = architectures["a"]
    for role in roles[1:]:
        if architectures[role] != architecture:
            raise MergeError(
                f"cannot merge checkpoints of different architectures: {_role_name('a', a)} is "
                f"{ARCH_LABELS[architecture]}, {_role_name(role, inputs[role])} is {ARCH_LABELS[architectures[role]]}")
    if architecture != UNKNOWN:
        return architecture, []
    if not set(a.keys()) & set(inputs["b"].keys()):
        raise MergeError(f"{_role_name('a', a)} and {_role_name('b', inputs['b'])} have no key in common: "
                         f"these are not two checkpoints of one model")
    return architecture, ["architecture not recognised: merged key by key where names and shapes match"]


def _checked_vae_sources(vae: Checkpoint, a: Checkpoint) -> dict[str, str]:
    """The VAE file's keys (output key -> key in the file), checked to be a VAE that fits A's."""
    sources = _vae_sources(vae)
    shapes = {k: vae.infos[src].shape for k, src in sources.items()}
    try:
        derive_vae_config(shapes)
    except (ArchitectureError, KeyError) as e:
        raise MergeError(f"VAE file {vae.path.name} is not a VAE in the layout checkpoints use ({e})") from None
    wrong = [f"{k}: VAE file {shapes[k]}, A {a.infos[k].shape}" for k in shapes
             if k in a.infos and a.infos[k].shape != shapes[k]]
    if wrong:
        raise MergeError(f"VAE file {vae.path.name} does not fit A's VAE: {len(wrong)} shapes differ: "
                         f"{_listing(wrong)}", wrong)
    return sources


def _output_order(inputs: Mapping[str, Checkpoint], architecture: str, vae_keys: Sequence[str]) -> list[str]:
    """A's keys, then those only B has (keys only C has are not output); a VAE file's keys replace the VAE."""
    a, b = inputs["a"], inputs["b"]
    order = a.keys() + [k for k in b.keys() if k not in a.infos]
    if not vae_keys:
        return order
    is_vae = [component_of(k, architecture) == "vae" for k in order]
    first = is_vae.index(True) if True in is_vae else len(order)
    rest = [k for k, v in zip(order, is_vae) if not v]
    return rest[:first] + list(vae_keys) + rest[first:]


def plan_merge(inputs: Mapping[str, Checkpoint], *, formula: Formula, components: Mapping[str, str],
               dtype: torch.dtype | None, vae: Checkpoint | None = None) -> MergePlan:
    """Decide every output key's source and dtype, and refuse (MergeError) what cannot be merged:
    different architectures, shape mismatches (all listed), a VAE file that does not fit."""
    roles = formula.info.roles
    architecture, warnings = _check_architectures(inputs, roles)
    vae_sources = _checked_vae_sources(vae, inputs["a"]) if vae is not None else {}

    plans, mismatched = [], []
    missing: dict[str, list[str]] = {role: [] for role in roles}
    for key in _output_order(inputs, architecture, list(vae_sources)):
        component = component_of(key, architecture)
        if key in vae_sources:
            plans.append(_key_plan(key, component, "vae", vae.infos[vae_sources[key]], vae_sources[key], dtype))
            continue
        present = [role for role in roles if key in inputs[role].infos]
        lacking = [r for r in ("a", "b") if r not in present] or [r for r in roles[2:] if r not in present]
        for role in lacking:
            missing[role].append(key)
        choice = components[component]
        if choice in ("a", "b"):
            source = choice if choice in present else present[0]
        elif not lacking and _mergeable(key, [inputs[r].infos[key].dtype for r in roles]):
            shapes = {role: inputs[role].infos[key].shape for role in roles}
            if len(set(shapes.values())) > 1:
                mismatched.append(f"{key}: " + ", ".join(f"{r.upper()} {s}" for r, s in shapes.items()))
                continue
            source = "merge"
        else:
            source = "a" if "a" in present else "b"
        source_info = inputs["a" if source == "merge" else source].infos[key]
        plans.append(_key_plan(key, component, source, source_info, key, dtype))
    if mismatched:
        raise MergeError(f"{len(mismatched)} tensors to merge have different shapes: {_listing(mismatched)}",
                         mismatched)

    missing = {role: keys for role, keys in missing.items() if keys}
    for role, keys in missing.items():
        others = "the others" if len(roles) > 2 else ("B" if role == "a" else "A")
        warnings.append(f"{_role_name(role, inputs[role])} lacks {len(keys)} keys "
                        f"({_component_counts(keys, architecture)}): taken from {others} unmerged")
    ignored = []
    if "c" in roles:
        ignored = [k for k in inputs["c"].keys() if k not in inputs["a"].infos and k not in inputs["b"].infos]
        if ignored:
            warnings.append(f"{_role_name('c', inputs['c'])} has {len(ignored)} keys that neither A nor B has: "
                            f"ignored")
    return MergePlan(plans, architecture, missing, ignored, warnings)


def _key_plan(key: str, component: str, source: str, info: TensorInfo, source_key: str,
              dtype: torch.dtype | None) -> KeyPlan:
    checked = info.dtype.is_floating_point and not key.endswith("position_ids")
    out_dtype = (dtype or info.dtype) if checked else info.dtype
    return KeyPlan(key, component, source, TensorInfo(info.shape, out_dtype), source_key, checked)


# --- evaluation slice by slice --------------------------------------------------------------------------------

class _Kernel:
    """Evaluates the formula (or a checked copy) over a range of a flat output tensor, slice by slice in the
    calling thread's scratch buffers, and returns the range's TensorStats."""

    def __init__(self, formula: Formula, compute: torch.dtype, device: torch.device, clamp: bool):
        self.formula, self.compute, self.device, self.clamp = formula, compute, device, clamp
        self.size = SLICE_CPU if device.type == "cpu" else SLICE_DEVICE
        self._local = threading.local()

    def _scratch(self) -> list[torch.Tensor]:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = [torch.empty(self.size, dtype=self.compute, device=self.device)
                                             for _ in range(4)]
        return scratch

    def merge(self, sources: list[torch.Tensor], out: torch.Tensor, begin: int, end: int) -> TensorStats:
        a, b, c = sources[0], sources[1], (sources[2] if len(sources) == 3 else None)
        scratch = self._scratch()
        stats = TensorStats(diff_sq=0.0)
        weight = self.formula.weight
        # The formula's value is one input exactly at these weights; taking it keeps even the sign of zeros.
        keep = {0.0: 0, 1.0: 1 if c is None else None}.get(weight)
        for start in range(begin, end, self.size):
            stop = min(start + self.size, end)
            x, y, d, t = (s[: stop - start] for s in scratch)
            x.copy_(a[start:stop])
            y.copy_(b[start:stop])
            if c is not None:
                t.copy_(c[start:stop])
            torch.sub(y, x if c is None else t, out=d)
            stats.diff_sq += torch.linalg.vector_norm(d).item() ** 2  # (torch.dot would go to BLAS threads)
            if keep is not None:
                result = (x, y)[keep]
            else:
                result = d
                if c is None:
                    amplified_difference(x, y, weight, out=d)
                else:
                    torch.add(x, d, alpha=weight, out=d)
                if self.clamp:
                    torch.maximum(x, y, out=t)
                    torch.minimum(x, y, out=x)
                    torch.clamp(d, x, t, out=d)
            _observe(result, stats)
            out[start:stop].copy_(result)
        return stats

    def copy(self, source: torch.Tensor, out: torch.Tensor, begin: int, end: int) -> TensorStats:
        x_full = self._scratch()[0]
        stats = TensorStats()
        for start in range(begin, end, self.size):
            stop = min(start + self.size, end)
            x = x_full[: stop - start]
            x.copy_(source[start:stop])
            _observe(x, stats)
            out[start:stop].copy_(x)
        return stats


def _observe(x: torch.Tensor, stats: TensorStats) -> None:
    lo, hi = (v.item() for v in torch.aminmax(x))
    if math.isfinite(lo) and math.isfinite(hi):
        stats.max_abs = max(stats.max_abs, -lo, hi)
        return
    nan, inf = torch.isnan(x), torch.isinf(x)
    stats.nan += int(nan.sum())
    stats.inf += int(inf.sum())
    finite = x[~(nan | inf)]
    if finite.numel():
        stats.max_abs = max(stats.max_abs, finite.abs().max().item())


# --- streaming: the output keys as items for streaming.stream --------------------------------------------------

class _ReadAhead:
    """Keeps every input's prefetch thread (Checkpoint.prefetch) about READ_AHEAD_BYTES ahead of the
    computation, asking for spans of READ_AHEAD_STEP per file, so that the disk works while the CPU computes:
    without it every slice of a cold file waits for its own page faults."""

    def __init__(self, plan: MergePlan, readers: Mapping[str, Checkpoint], roles: Sequence[str]):
        self.reads = [[(readers[r], p.key) for r in roles] if p.source == "merge"
                      else [(readers[p.source], p.source_key)] for p in plan.keys]
        self.start = [0]
        for reads in self.reads:
            self.start.append(self.start[-1] + sum(reader.infos[key].nbytes for reader, key in reads))
        self.cursor = 0
        self.pending: dict[Checkpoint, tuple[list[str], int]] = {}

    def advance(self, index: int) -> None:
        """Called before key `index` is computed."""
        limit = self.start[index] + READ_AHEAD_BYTES
        while self.cursor < len(self.reads) and self.start[self.cursor] < limit:
            for reader, key in self.reads[self.cursor]:
                keys, size = self.pending.get(reader, ([], 0))
                keys.append(key)
                self.pending[reader] = (keys, size + reader.infos[key].nbytes)
                if self.pending[reader][1] >= READ_AHEAD_STEP:
                    reader.prefetch(self.pending.pop(reader)[0])
            self.cursor += 1
        if self.cursor == len(self.reads):
            for reader, (keys, _) in self.pending.items():
                reader.prefetch(keys)
            self.pending.clear()


def _items(plan: MergePlan, readers: Mapping[str, Checkpoint], roles: Sequence[str],
           kernel: _Kernel) -> Iterator[Item]:
    """The output keys as stream items, their inputs read ahead."""
    read_ahead = _ReadAhead(plan, readers, roles)
    for index, p in enumerate(plan.keys):
        read_ahead.advance(index)
        if p.source == "merge":
            sources = [readers[role].get(p.key).reshape(-1) for role in roles]
            yield Item(p.key, p.info, fill=functools.partial(kernel.merge, sources), context=p)
        elif p.checked:
            source = readers[p.source].get(p.source_key).reshape(-1)
            yield Item(p.key, p.info, fill=functools.partial(kernel.copy, source), context=p)
        else:
            yield Item(p.key, p.info, tensor=readers[p.source].get(p.source_key), context=p)


# --- the job --------------------------------------------------------------------------------------------------

@dataclass
class MergeOutcome:
    path: Path
    bytes: int
    report: dict
    warnings: list[str]


def resolve_components(components: Mapping[str, str] | None) -> dict[str, str]:
    """Every component's source, defaults filled in; 'clip' sets both text encoders."""
    resolved = dict(DEFAULT_COMPONENTS)
    for name, source in (components or {}).items():
        targets = ("clip_l", "clip_g") if name == "clip" else (name,)
        if any(t not in COMPONENTS for t in targets):
            raise MergeError(f"unknown component {name!r}: choose from {', '.join(COMPONENTS)} (or clip)")
        if source not in SOURCES:
            raise MergeError(f"unknown source {source!r} for {name}: choose merge, a or b")
        for target in targets:
            resolved[target] = source
    return resolved


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergeError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"device {name!r} is not available here (torch sees no CUDA device)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MergeError(f"device {name!r} is not available here")
    return device


def linear_merge(method: str, models: Sequence[str | os.PathLike], output: str | os.PathLike, *, weight: float,
                 components: Mapping[str, str] | None = None, vae: str | os.PathLike | None = None,
                 dtype: str = "fp16", compute: str = "fp32", clamp: bool = False, allow_nonfinite: bool = False,
                 device: str = "cpu", overwrite: bool = False, monitor: Monitor = SILENT) -> MergeOutcome:
    """Merge checkpoints with one of LINEAR_METHODS into a new .safetensors file.

    Args:
        method: 'amp' (A + M·(B − A)), 'add-diff' (A + M·(B − C)) or 'weighted-sum' ((1 − α)·A + α·B).
        models: the input files [A, B] or [A, B, C].
        output: the .safetensors file to create.
        weight: M, or α for the weighted sum.
        components: source per component ('merge', 'a' or 'b'); defaults in DEFAULT_COMPONENTS.
        vae: a file to take the VAE from (a checkpoint or a standalone VAE).
        dtype: output dtype of float tensors: fp16, bf16, fp32 or 'same' (as the source).
        compute: fp32 or fp64.
        clamp: clamp merged values to [min(A, B), max(A, B)] per element.
        allow_nonfinite: write the result even with NaN/inf/out-of-range values (reported as warnings).
        device: where to compute.
        overwrite: replace an existing output (never an input).
        monitor: progress and cancellation.

    Returns the output's path and size, the safety report and the warnings.
    Raises MergeError (incl. UnsafeOutputError), CheckpointError, Cancelled; no file is left behind on any error.
    """
    formula = Formula(method, float(weight))
    roles = formula.info.roles
    if len(models) != len(roles):
        raise MergeError(f"{formula.info.label} takes {len(roles)} models ({', '.join(r.upper() for r in roles)}), "
                         f"got {len(models)}")
    sources = resolve_components(components)
    if dtype not in OUTPUT_DTYPES:
        raise MergeError(f"unknown output dtype {dtype!r}: choose {', '.join(OUTPUT_DTYPES)}")
    if compute not in COMPUTE_DTYPES:
        raise MergeError(f"unknown compute precision {compute!r}: choose {', '.join(COMPUTE_DTYPES)}")
    torch_device = _device(device)
    inputs_paths = [*models, *([vae] if vae else [])]
    output = check_output_path(output, inputs_paths, overwrite)

    with contextlib.ExitStack() as stack:
        inputs = {role: stack.enter_context(Checkpoint(path)) for role, path in zip(roles, models)}
        vae_ckpt = stack.enter_context(Checkpoint(vae)) if vae else None
        plan = plan_merge(inputs, formula=formula, components=sources, dtype=OUTPUT_DTYPES[dtype], vae=vae_ckpt)
        report = SafetyReport(formula.info.difference)
        report.facts.update(method=method, formula=formula.text, output_dtype=dtype, compute=compute,
                            clamp=clamp, architecture=ARCH_LABELS[plan.architecture])
        report.missing, report.ignored = plan.missing, plan.ignored
        present = {p.component for p in plan.keys}
        for component in COMPONENTS:
            if component in present:
                report.set_component_source(component, "vae file" if vae and component == "vae"
                                            else sources[component])

        parents = [Parent(role.upper(), str(path), inputs[role].metadata) for role, path in zip(roles, models)]
        vae_parent = Parent("VAE", str(vae), vae_ckpt.metadata) if vae_ckpt else None
        recipe = {"interp_method": formula.info.label, "multiplier": formula.weight, "method": method,
                  "formula": formula.text, "components": sources, "save_as": dtype, "compute": compute,
                  "clamp": clamp}

        def metadata(hashes: Mapping[str, str]) -> dict[str, str]:
            return merge_metadata(parents, hashes, recipe, title=output.stem, vae=vae_parent)

        hashes = ParentHashes(inputs_paths)
        try:
            writer = SafetensorsWriter(output, plan.infos, metadata(hashes.current()), inputs=inputs_paths,
                                       overwrite=overwrite, metadata_room=METADATA_ROOM)
            kernel = _Kernel(formula, COMPUTE_DTYPES[compute], torch_device, clamp)
            readers = {**inputs, **({"vae": vae_ckpt} if vae_ckpt else {})}

            def written(item: Item, results: list[TensorStats]) -> None:
                p = item.context
                report.add(p.key, p.component, p.source, p.info.dtype, TensorStats.combine(results))

            with writer:
                stream(writer, _items(plan, readers, roles, kernel), workers=default_workers(torch_device),
                       largest=max((p.info.nbytes for p in plan.keys if p.checked), default=0),
                       monitor=monitor, on_written=written, progress_end=0.99)
                result = report.to_dict()
                problems = report.problem_summary()
                if problems and not allow_nonfinite:
                    raise UnsafeOutputError(f"refusing to write {output.name}: {problems}", result)
                if hashes.pending:
                    while not hashes.done(timeout=0.1):
                        monitor.report(0.99, "hashing the inputs for the recipe")
                    writer.set_metadata(metadata(hashes.wait()))
                monitor.report(1.0, "flushing to disk")
        except BaseException:
            hashes.cancel()
            raise
    warnings = plan.warnings + ([f"written despite {problems}"] if problems else [])
    return MergeOutcome(output, output.stat().st_size, result, warnings)


__all__ = ["linear_merge", "plan_merge", "Formula", "LINEAR_METHODS", "MergeError", "UnsafeOutputError",
           "amplified_difference", "add_difference", "weighted_sum", "DEFAULT_COMPONENTS", "SOURCES",
           "OUTPUT_DTYPES", "COMPUTE_DTYPES", "resolve_components"]
