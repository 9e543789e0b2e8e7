"""Re-basin merges: B permuted into A's basis by weight matching, then merged.

    rebasin(A, B, α)     = (1 − α)·A + α·P(B)
    basin-sum(A, B, α)   = α·(α·A + (1 − α)·B) + (1 − α)·rebasin(A, B, α)       (as written)
    amp-rebasin(A, B, M) = rebasin(A, A + M·(B − A), α)                          (α = 0.5 by default)
    merge-many(M1…MN)    = mean of the models, each aligned to the mean of the others until none improves

Only components that are merged are matched (a text encoder taken from A or B keeps its own basis, and then
the UNet columns that read it stay fixed).  Everything else — component choices, dtypes, the checks before
writing, the streamed atomic writer, the safety report and the recipe metadata — is the linear merges' own
machinery (`merge.py`), fed with readers that permute (or amplify, or average) tensors as they are read.

Matching results are cached beside the output (`*.rebasin-perms`, safetensors inside, not listed as a
checkpoint by the webuis), keyed by the inputs' sha256, the spec version, the matched components and the
matching settings, so another α, a BasinSum or a later comparison reuses them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import merge as linear
from .anatomy import COMPONENTS as ALL_COMPONENTS
from .checkpoint import Checkpoint, CheckpointError, SafetensorsWriter, check_output_path, safetensors_size
from .matching import MatchOptions, match
from .outputs import OutputFile
from .permcache import cache_key, cache_path, find_cached, save_cache
from .permute import spec_for_checkpoint
from .progress import SILENT, Monitor
from .readers import AmplifiedReader, MeanReader, PermutedReader
from .recipe import Parent, ParentHashes, merge_metadata
from .report import SafetyReport, TensorStats
from .spec.core import Permutations, Spec, compose, identity, invert, is_identity
from .spec.sdxl import COMPONENTS as MATCHABLE, SPEC_VERSION
from .streaming import Item, default_workers, stream

HASH_SHARE, MATCH_SHARE = 0.03, 0.8   # progress: hashing up to 3 %, matching up to 80 %, then writing


# --- formulas, slice by slice --------------------------------------------------------------------------------------

Combine = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], None]  # (sources, scratch, out)


def rebasin_formula(alpha: float) -> Combine:
    """(1 − α)·A + α·P(B), as lerp: exactly A at α = 0 and exactly P(B) at α = 1."""
    def combine(x, scratch, out):
        torch.lerp(x[0], x[1], alpha, out=out)
    return combine


def basin_sum_formula(alpha: float) -> Combine:
    """α·(α·A + (1 − α)·B) + (1 − α)·((1 − α)·A + α·P(B)), evaluated as written."""
    def combine(x, scratch, out):
        a, b, pb = x
        torch.mul(a, alpha, out=out)
        out.add_(b, alpha=1 - alpha)           # α·A + (1 − α)·B
        out.mul_(alpha)
        torch.mul(a, 1 - alpha, out=scratch)
        scratch.add_(pb, alpha=alpha)          # rebasin(A, B, α)
        out.add_(scratch, alpha=1 - alpha)
    return combine


def mean_formula(x, scratch, out):
    """(M1 + … + MN) / N."""
    out.copy_(x[0])
    for other in x[1:]:
        out.add_(other)
    out.div_(len(x))


class FormulaKernel(linear._Kernel):
    """The linear merges' kernel (slices, statistics, checked copies) with any formula over N sources."""

    def __init__(self, combine: Combine, sources: int, compute: torch.dtype, device: torch.device,
                 difference: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]):
        super().__init__(linear.Formula("weighted-sum", 0.0), compute, device, clamp=False)
        self.combine, self.difference, self.sources = combine, difference, sources

    def _buffers(self) -> list[torch.Tensor]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = [torch.empty(self.size, dtype=self.compute, device=self.device)
                                             for _ in range(self.sources + 3)]
        return buffers

    def merge(self, sources: list[torch.Tensor], out: torch.Tensor, begin: int, end: int) -> TensorStats:
        buffers = self._buffers()
        stats = TensorStats(diff_sq=0.0)
        for start in range(begin, end, self.size):
            stop = min(start + self.size, end)
            views = [buf[: stop - start] for buf in buffers]
            x, (result, scratch, diff) = views[:self.sources], views[self.sources:]
            for buf, src in zip(x, sources):
                buf.copy_(src[start:stop])
            self.combine(x, scratch, result)
            torch.sub(self.difference(x, result), x[0], out=diff)
            stats.diff_sq += torch.linalg.vector_norm(diff).item() ** 2
            linear._observe(result, stats)
            out[start:stop].copy_(result)
        return stats


def _last_input(x, result):
    return x[-1]


def _result(x, result):
    return result


# --- jobs -----------------------------------------------------------------------------------------------------------

@dataclass
class RebasinOutcome:
    path: Path
    bytes: int
    report: dict                 # the merge's safety report, with "matching" (the alignment report) inside
    warnings: list[str]
    permutations: list[Permutations]
    cache_file: str | None
    cache_hit: bool
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Inputs:
    """Opened, checked inputs of a job: everything is known before matching starts."""
    paths: list[str]
    checkpoints: list[Checkpoint]
    plan: linear.MergePlan
    sources: dict[str, str]
    components: tuple[str, ...]           # matched components
    spec: Spec
    vae: Checkpoint | None
    output: Path
    output_file: OutputFile               # opened before hashing and matching: the folder is writable
    device: torch.device


def _open(stack: contextlib.ExitStack, models: Sequence[str | os.PathLike], output, *, components, vae, dtype,
          compute, device, overwrite) -> _Inputs:
    sources = linear.resolve_components(components)
    if dtype not in linear.OUTPUT_DTYPES:
        raise linear.MergeError(f"unknown output dtype {dtype!r}: choose {', '.join(linear.OUTPUT_DTYPES)}")
    if compute not in linear.COMPUTE_DTYPES:
        raise linear.MergeError(f"unknown compute precision {compute!r}: choose {', '.join(linear.COMPUTE_DTYPES)}")
    torch_device = linear._device(device)
    paths = [str(m) for m in models]
    if len(set(os.path.realpath(p) for p in paths)) != len(paths):
        raise linear.MergeError("the same file is given twice: re-basin needs different models")
    output = check_output_path(output, [*paths, *([vae] if vae else [])], overwrite)
    checkpoints = [stack.enter_context(Checkpoint(p)) for p in paths]
    vae_ckpt = stack.enter_context(Checkpoint(vae)) if vae else None
    plan = None
    for other in checkpoints[1:]:  # every model against A: architecture, shapes of the merged keys
        plan_ab = linear.plan_merge({"a": checkpoints[0], "b": other}, formula=linear.Formula("weighted-sum", 0.5),
                                    components=sources, dtype=linear.OUTPUT_DTYPES[dtype], vae=vae_ckpt)
        plan = plan or plan_ab
        if len(checkpoints) > 2:
            lacking = [p.key for p in plan.keys if p.source == "merge" and p.key not in other.infos]
            if lacking:
                raise linear.MergeError(f"{other.path.name} lacks {len(lacking)} keys the merge needs, "
                                        f"e.g. {lacking[0]}", lacking)
    merged = {p.component for p in plan.keys if p.source == "merge"}
    matched = tuple(c for c in MATCHABLE if c in merged)
    if not matched:
        raise linear.MergeError("nothing to re-basin: merge at least one of UNet, CLIP-L, CLIP-G")
    spec = spec_for_checkpoint(checkpoints[0], matched)
    # Every check of the output (free space, file size limit, a writable folder) before hashing and matching.
    output_file = stack.enter_context(OutputFile(output, inputs=[*paths, *([vae] if vae else [])],
                                                 overwrite=overwrite, size=safetensors_size(plan.infos)))
    return _Inputs(paths, checkpoints, plan, sources, matched, spec, vae_ckpt, output, output_file, torch_device)


def _hashes(paths: Sequence[str], vae: str | None, monitor: Monitor) -> dict[str, str]:
    hashes = ParentHashes([*paths, *([vae] if vae else [])])
    try:
        while not hashes.done(timeout=0.2):
            monitor.report(0.5, "hashing the inputs (sha256, cached for next time)")
        return hashes.wait()
    except BaseException:
        hashes.cancel()
        raise


def _match_options(seed: int, device: torch.device, max_sweeps: int, rtol: float, screen: str) -> MatchOptions:
    return MatchOptions(seed=seed, max_sweeps=max_sweeps, rtol=rtol, device=str(device), screen=screen)


def _write(inputs: _Inputs, output: Path, readers: Mapping[str, object], roles: Sequence[str], kernel,
           report: SafetyReport, recipe: dict, hashes: Mapping[str, str], *, overwrite: bool, allow_nonfinite: bool,
           monitor: Monitor) -> tuple[dict, list[str]]:
    """Stream the output with the linear merges' machinery (items, read-ahead, writer); returns (safety report,
    warnings).  Nothing is written if the result holds NaN/inf and that is not allowed."""
    present = {p.component for p in inputs.plan.keys}
    for component in ALL_COMPONENTS:
        if component in present:
            source = "vae file" if inputs.vae and component == "vae" else inputs.sources[component]
            report.set_component_source(component, source)
    report.missing, report.ignored = inputs.plan.missing, inputs.plan.ignored
    parents = [Parent(chr(ord("A") + i) if i < 26 else f"M{i + 1}", path, ckpt.metadata)
               for i, (path, ckpt) in enumerate(zip(inputs.paths, inputs.checkpoints))]
    vae_parent = Parent("VAE", str(inputs.vae.path), inputs.vae.metadata) if inputs.vae else None
    metadata = merge_metadata(parents, hashes, recipe, title=output.stem, vae=vae_parent)
    all_inputs = [*inputs.paths, *([str(inputs.vae.path)] if inputs.vae else [])]
    writer = SafetensorsWriter(inputs.output_file, inputs.plan.infos, metadata, inputs=all_inputs, overwrite=overwrite)
    all_readers = {**readers, **({"vae": inputs.vae} if inputs.vae else {})}

    def written(item: Item, results: list[TensorStats]) -> None:
        p = item.context
        report.add(p.key, p.component, p.source, p.info.dtype, TensorStats.combine(results))

    with writer:
        stream(writer, linear._items(inputs.plan, all_readers, roles, kernel),
               largest=max((p.info.nbytes for p in inputs.plan.keys if p.checked), default=0),
               workers=default_workers(inputs.device), monitor=monitor, on_written=written, progress_end=0.99)
        result = report.to_dict()
        problems = report.problem_summary()
        if problems and not allow_nonfinite:
            raise linear.UnsafeOutputError(f"refusing to write {output.name}: {problems}", result)
        monitor.report(1.0, "flushing to disk")
    warnings = inputs.plan.warnings + ([f"written despite {problems}"] if problems else [])
    return result, warnings


def _recipe(method: str, label: str, formula: str, inputs: _Inputs, dtype: str, compute: str, seed: int,
            match_report: Mapping, key: str, **weights) -> dict:
    return {"interp_method": label, **weights, "method": method, "formula": formula,
            "components": inputs.sources, "save_as": dtype, "compute": compute, "seed": seed,
            "matched_components": list(inputs.components), "spec_version": SPEC_VERSION,
            "sweeps": match_report.get("sweeps_total"), "objective": match_report.get("objective"),
            "changed_groups": match_report.get("changed_groups"), "permutation_cache_key": key}


def _summary(report: Mapping) -> dict:
    """The few matching facts that go into the recipe."""
    return {"sweeps_total": len(report.get("sweeps", [])),
            "objective": {"before": report.get("objective_before"), "after": report.get("objective_after")},
            "changed_groups": report.get("changed_groups")}


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise linear.MergeError(f"{name} must be a finite number, not {value}")
    return value


def _pair_job(method: str, a, b, output, *, alpha: float, multiplier: float | None, seed: int, components,
              vae, dtype: str, compute: str, device: str, overwrite: bool, allow_nonfinite: bool,
              cache: bool, cache_dir, max_sweeps: int, rtol: float, screen: str, monitor: Monitor) -> RebasinOutcome:
    started = time.monotonic()
    seconds: dict[str, float] = {}
    alpha = _check_weight("alpha", alpha)
    if multiplier is not None:
        multiplier = _check_weight("M", multiplier)
    with contextlib.ExitStack() as stack:
        inputs = _open(stack, [a, b], output, components=components, vae=vae, dtype=dtype, compute=compute,
                       device=device, overwrite=overwrite)
        ckpt_a, ckpt_b = inputs.checkpoints
        hashes = _hashes(inputs.paths, vae, monitor.scaled(0, HASH_SHARE))
        seconds["hash"] = time.monotonic() - started
        options = _match_options(seed, inputs.device, max_sweeps, rtol, screen)
        target = AmplifiedReader(ckpt_a, ckpt_b, multiplier) if multiplier is not None else ckpt_b
        extra = {"multiplier": multiplier} if multiplier is not None else None
        shas = [hashes[os.path.realpath(p)] for p in inputs.paths]
        key = cache_key("amp-rebasin" if multiplier is not None else "rebasin", shas, inputs.components, options,
                        extra)
        folder = Path(cache_dir) if cache_dir else inputs.output.parent
        cached = find_cached(folder, key, [inputs.spec]) if cache else None
        stage = monitor.scaled(HASH_SHARE, MATCH_SHARE)
        if cached is not None:
            (perms,), match_report, found = cached
            cache_file = str(found)
        else:
            result = match(inputs.spec, ckpt_a, target, options, monitor=stage)
            perms, match_report = result.perms, result.report.to_dict()
            cache_file = None
            if cache:
                saved = save_cache(cache_path(folder, key, inputs.paths), key, [perms], match_report,
                                   inputs=inputs.paths, warnings=inputs.plan.warnings)
                cache_file = str(saved) if saved else None
        seconds["match"] = time.monotonic() - started - seconds["hash"]

        permuted = PermutedReader(target, inputs.spec, perms)
        w = linear.number_text
        if method == "rebasin":
            kernel = FormulaKernel(rebasin_formula(alpha), 2, linear.COMPUTE_DTYPES[compute], inputs.device,
                                   _last_input)
            roles, label = ("a", "pb"), "Re-Basin"
            formula = f"(1 − {w(alpha)})·A + {w(alpha)}·P(B)"
            difference = "P(B) − A"
        elif method == "basin-sum":
            kernel = FormulaKernel(basin_sum_formula(alpha), 3, linear.COMPUTE_DTYPES[compute], inputs.device,
                                   _last_input)
            roles, label = ("a", "b", "pb"), "BasinSum"
            formula = (f"{w(alpha)}·({w(alpha)}·A + (1 − {w(alpha)})·B) + (1 − {w(alpha)})·"
                       f"((1 − {w(alpha)})·A + {w(alpha)}·P(B))")
            difference = "P(B) − A"
        else:
            kernel = FormulaKernel(rebasin_formula(alpha), 2, linear.COMPUTE_DTYPES[compute], inputs.device,
                                   _last_input)
            roles, label = ("a", "pb"), "Amplify → Re-Basin"
            formula = f"(1 − {w(alpha)})·A + {w(alpha)}·P(A + {w(multiplier)}·(B − A))"
            difference = "P(amp) − A"
        readers = {"a": ckpt_a, "b": target, "pb": permuted}
        weights = {"multiplier": alpha, "alpha": alpha, **({"amp_multiplier": multiplier} if multiplier else {})}
        recipe = _recipe(method, label, formula, inputs, dtype, compute, seed, _summary(match_report), key, **weights)
        report = SafetyReport(difference)
        report.facts.update(method=method, formula=formula, output_dtype=dtype, compute=compute,
                            architecture="SDXL base")
        write_start = time.monotonic()
        result, warnings = _write(inputs, inputs.output, readers, roles, kernel, report, recipe, hashes,
                                  overwrite=overwrite, allow_nonfinite=allow_nonfinite,
                                  monitor=monitor.scaled(MATCH_SHARE, 1.0))
        seconds["write"] = time.monotonic() - write_start
    result["matching"] = dict(match_report, cache_hit=cached is not None, cache_file=cache_file)
    seconds["total"] = time.monotonic() - started
    return RebasinOutcome(inputs.output, inputs.output.stat().st_size, result, warnings, [perms], cache_file,
                          cached is not None, seconds)


_COMMON_DOC = """
    Common keyword arguments:
        seed: order of the coordinate descent (results are reproducible per seed).
        components: source per component ('merge', 'a' or 'b'); merged UNet / text encoders are matched.
        vae: a file to take the VAE from.  dtype: fp16, bf16, fp32 or 'same'.  compute: fp32 or fp64.
        device: where costs are computed ('cpu', 'cuda', 'cuda:N').
        overwrite: replace an existing output (never an input).  allow_nonfinite: only warn on NaN/inf.
        cache: reuse / store the matching beside the output (or in `cache_dir`).
        max_sweeps, rtol, screen: matching settings (see matching.MatchOptions).
        monitor: progress and cancellation; a cancelled job leaves no output file.
"""


def rebasin(a, b, output, *, alpha: float = 0.5, seed: int = 0, components=None, vae=None, dtype: str = "fp16",
            compute: str = "fp32", device: str = "cpu", overwrite: bool = False, allow_nonfinite: bool = False,
            cache: bool = True, cache_dir=None, max_sweeps: int = 100, rtol: float = 1e-6, screen: str = "auto",
            monitor: Monitor = SILENT) -> RebasinOutcome:
    """(1 − α)·A + α·P(B), P the permutations that bring B into A's basis."""
    return _pair_job("rebasin", a, b, output, alpha=alpha, multiplier=None, seed=seed, components=components,
                     vae=vae, dtype=dtype, compute=compute, device=device, overwrite=overwrite,
                     allow_nonfinite=allow_nonfinite, cache=cache, cache_dir=cache_dir, max_sweeps=max_sweeps,
                     rtol=rtol, screen=screen, monitor=monitor)


def basin_sum(a, b, output, *, alpha: float = 0.5, seed: int = 0, components=None, vae=None, dtype: str = "fp16",
              compute: str = "fp32", device: str = "cpu", overwrite: bool = False, allow_nonfinite: bool = False,
              cache: bool = True, cache_dir=None, max_sweeps: int = 100, rtol: float = 1e-6, screen: str = "auto",
              monitor: Monitor = SILENT) -> RebasinOutcome:
    """α·(α·A + (1 − α)·B) + (1 − α)·rebasin(A, B, α), evaluated as written (shares rebasin's matching cache)."""
    return _pair_job("basin-sum", a, b, output, alpha=alpha, multiplier=None, seed=seed, components=components,
                     vae=vae, dtype=dtype, compute=compute, device=device, overwrite=overwrite,
                     allow_nonfinite=allow_nonfinite, cache=cache, cache_dir=cache_dir, max_sweeps=max_sweeps,
                     rtol=rtol, screen=screen, monitor=monitor)


def amp_rebasin(a, b, output, *, multiplier: float = 2.0, alpha: float = 0.5, seed: int = 0, components=None,
                vae=None, dtype: str = "fp16", compute: str = "fp32", device: str = "cpu", overwrite: bool = False,
                allow_nonfinite: bool = False, cache: bool = True, cache_dir=None, max_sweeps: int = 100,
                rtol: float = 1e-6, screen: str = "auto", monitor: Monitor = SILENT) -> RebasinOutcome:
    """rebasin(A, amp, α) with amp = A + M·(B − A) computed on the fly in float32 (never written out).

    Here amp plays B's part: a component taken from 'b' comes from amp."""
    return _pair_job("amp-rebasin", a, b, output, alpha=alpha, multiplier=multiplier, seed=seed,
                     components=components, vae=vae, dtype=dtype, compute=compute, device=device,
                     overwrite=overwrite, allow_nonfinite=allow_nonfinite, cache=cache, cache_dir=cache_dir,
                     max_sweeps=max_sweeps, rtol=rtol, screen=screen, monitor=monitor)


for _job in (rebasin, basin_sum, amp_rebasin):
    _job.__doc__ += _COMMON_DOC


# --- MergeMany ----------------------------------------------------------------------------------------------------

def align_many(spec: Spec, models: Sequence, options: MatchOptions, *, max_rounds: int = 20,
               monitor: Monitor = SILENT) -> tuple[list[Permutations], dict]:
    """Permutation sets that align every model to the mean of the others (samuela's MergeMany).

    Rounds visit the models in a seeded order; each is matched to the mean of the others (as currently
    aligned), warm-started from its current set.  A model whose others did not move since its last matching
    is skipped.  Stops after a round in which no set changed.  The result is expressed in the first model's
    basis (its set is the identity), which changes no inner product between the aligned models."""
    n = len(models)
    sets = [identity(spec) for _ in models]
    version = [0] * n              # bumps when a model's set changes
    seen: list[tuple | None] = [None] * n  # the others' versions at a model's last matching
    rounds, calls = [], 0
    converged = False
    expected = 2 * n
    for round_index in range(1, max_rounds + 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(options.seed * 7919 + round_index)).tolist()
        changed = []
        for i in order:
            others = tuple(version[j] for j in range(n) if j != i)
            if seen[i] == others:
                continue
            target = MeanReader([PermutedReader(models[j], spec, sets[j]) for j in range(n) if j != i])
            stage = monitor.scaled(min(calls / expected, 0.95), min((calls + 1) / expected, 0.97))
            result = match(spec, target, models[i], dataclasses.replace(options, seed=options.seed + i),
                           init=sets[i], monitor=stage)
            calls += 1
            seen[i] = others
            moved = any(not torch.equal(result.perms[g], sets[i][g]) for g in spec.groups)
            if moved:
                sets[i] = result.perms
                version[i] += 1
                seen[i] = tuple(version[j] for j in range(n) if j != i)
                changed.append(i)
            rounds.append({"round": round_index, "model": i, "moved": moved,
                           "objective_before": result.report.objective_before,
                           "objective_after": result.report.objective_after,
                           "sweeps": len(result.report.sweeps), "solver_needed": result.report.solver_needed,
                           "solver_solved": result.report.solver_solved,
                           "changed_groups": len(result.report.changed)})
        if not changed:
            converged = True
            break
    back = invert(sets[0])
    sets = [compose(s, back) for s in sets]
    report = {"models": n, "rounds": rounds, "converged": converged, "matchings": calls,
              "changed_groups": [f"{sum(not is_identity(p) for p in s.values())}/{len(spec.groups)}" for s in sets]}
    return sets, report


def merge_many(models: Sequence[str | os.PathLike], output, *, seed: int = 0, components=None, vae=None,
               dtype: str = "fp16", compute: str = "fp32", device: str = "cpu", overwrite: bool = False,
               allow_nonfinite: bool = False, cache: bool = True, cache_dir=None, max_sweeps: int = 100,
               rtol: float = 1e-6, screen: str = "auto", max_rounds: int = 20,
               monitor: Monitor = SILENT) -> RebasinOutcome:
    """The mean of N ≥ 2 models, each aligned to the mean of the others until none improves (in M1's basis)."""
    if len(models) < 2:
        raise linear.MergeError(f"MergeMany needs at least two models, got {len(models)}")
    started = time.monotonic()
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        inputs = _open(stack, models, output, components=components, vae=vae, dtype=dtype, compute=compute,
                       device=device, overwrite=overwrite)
        hashes = _hashes(inputs.paths, vae, monitor.scaled(0, HASH_SHARE))
        seconds["hash"] = time.monotonic() - started
        options = _match_options(seed, inputs.device, max_sweeps, rtol, screen)
        shas = [hashes[os.path.realpath(p)] for p in inputs.paths]
        key = cache_key("merge-many", shas, inputs.components, options, {"max_rounds": max_rounds})
        folder = Path(cache_dir) if cache_dir else inputs.output.parent
        cached = find_cached(folder, key, [inputs.spec] * len(models)) if cache else None
        if cached is not None:
            sets, match_report, found = cached
            cache_file = str(found)
        else:
            sets, match_report = align_many(inputs.spec, inputs.checkpoints, options, max_rounds=max_rounds,
                                            monitor=monitor.scaled(HASH_SHARE, MATCH_SHARE))
            cache_file = None
            if cache:
                saved = save_cache(cache_path(folder, key, inputs.paths), key, sets, match_report,
                                   inputs=inputs.paths, warnings=inputs.plan.warnings)
                cache_file = str(saved) if saved else None
        seconds["match"] = time.monotonic() - started - seconds["hash"]

        roles = tuple(f"p{i}" for i in range(len(models)))
        readers = {"a": inputs.checkpoints[0], "b": inputs.checkpoints[1],
                   **{role: PermutedReader(ckpt, inputs.spec, s)
                      for role, ckpt, s in zip(roles, inputs.checkpoints, sets)}}
        kernel = FormulaKernel(mean_formula, len(models), linear.COMPUTE_DTYPES[compute], inputs.device, _result)
        formula = f"mean of {len(models)} models aligned to the mean of the others"
        summary = {"sweeps_total": len(match_report.get("rounds", [])),
                   "objective": [r["objective_after"] for r in match_report.get("rounds", [])][-len(models):],
                   "changed_groups": match_report.get("changed_groups")}
        recipe = _recipe("merge-many", "MergeMany", formula, inputs, dtype, compute, seed, summary, key)
        report = SafetyReport("mean − A")
        report.facts.update(method="merge-many", formula=formula, output_dtype=dtype, compute=compute,
                            architecture="SDXL base")
        write_start = time.monotonic()
        result, warnings = _write(inputs, inputs.output, readers, roles, kernel, report, recipe, hashes,
                                  overwrite=overwrite, allow_nonfinite=allow_nonfinite,
                                  monitor=monitor.scaled(MATCH_SHARE, 1.0))
        seconds["write"] = time.monotonic() - write_start
    result["matching"] = dict(match_report, cache_hit=cached is not None, cache_file=cache_file)
    seconds["total"] = time.monotonic() - started
    return RebasinOutcome(inputs.output, inputs.output.stat().st_size, result, warnings, sets, cache_file,
                          cached is not None, seconds)


# --- the job entry point -------------------------------------------------------------------------------------------

JOBS = {"rebasin": rebasin, "basin-sum": basin_sum, "amp-rebasin": amp_rebasin, "merge-many": merge_many}


def run_request(request, monitor: Monitor = SILENT) -> tuple[RebasinOutcome, str | None]:
    """Run a `jobs.MergeRequest` for one of JOBS; returns the outcome and a chart file (None without
    matplotlib).  The chart goes to the temporary folder: it is for showing, not for the models folder."""
    common = dict(seed=request.seed, components=request.components, vae=request.vae, dtype=request.dtype,
                  compute=request.compute, device=request.device, overwrite=request.overwrite,
                  allow_nonfinite=request.allow_nonfinite, monitor=monitor)
    if request.method == "merge-many":
        outcome = merge_many(request.models, request.output, **common)
    elif request.method == "amp-rebasin":
        outcome = amp_rebasin(*request.models, request.output, multiplier=request.multiplier, alpha=request.alpha,
                              **common)
    else:
        outcome = JOBS[request.method](*request.models, request.output, alpha=request.alpha, **common)
    if request.clamp:
        outcome.warnings.append("clamping applies to the linear merges only: not applied")
    from .report_chart import private_chart_path, write_chart
    try:
        chart = write_chart(outcome.report, private_chart_path(f"{outcome.path.stem}.alignment.png"), overwrite=True)
    except (OSError, ValueError, CheckpointError):
        chart = None
    return outcome, chart
