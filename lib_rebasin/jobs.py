"""The one entry point the webui tab, the REST routes and the standalone app call: a MergeRequest in, a
MergeResult out, with progress and cancel through a Monitor.  METHODS describes every method for the UI;
RUNNERS maps the methods that can run today to the function that runs them.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from . import rebasin
from .merge import DEFAULT_COMPONENTS, LINEAR_METHODS, linear_merge, number_text
from .progress import SILENT, Monitor


@dataclass(frozen=True)
class MethodInfo:
    label: str
    n_models: int | None   # None: two or more
    formula: str           # with {M} / {alpha} placeholders
    uses_multiplier: bool
    uses_alpha: bool
    uses_seed: bool


def _linear_info(key: str) -> MethodInfo:
    m = LINEAR_METHODS[key]
    return MethodInfo(m.label, len(m.roles), m.template, m.parameter == "M", m.parameter == "alpha", False)


METHODS: dict[str, MethodInfo] = {
    "amp": _linear_info("amp"),
    "add-diff": _linear_info("add-diff"),
    "weighted-sum": _linear_info("weighted-sum"),
    "rebasin": MethodInfo("Re-Basin", 2, "(1 − {alpha})·A + {alpha}·P(B)", False, True, True),
    "basin-sum": MethodInfo("BasinSum", 2, "{alpha}·((1 − {alpha})·A + {alpha}·B) + (1 − {alpha})·Rebasin(A, B, {alpha})",
                            False, True, True),
    "amp-rebasin": MethodInfo("Amplify → Re-Basin", 2, "Rebasin(A, A + {M}·(B − A), {alpha})", True, True, True),
    "merge-many": MethodInfo("MergeMany", None, "mean of N models aligned to their mean", False, False, True),
}


@dataclass
class MergeRequest:
    method: str
    models: list[str]                  # [A, B], [A, B, C] for add-diff, N >= 2 for merge-many
    output: str                        # the .safetensors file to create
    multiplier: float = 2.0            # M
    alpha: float = 0.5
    seed: int = 0
    components: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COMPONENTS))  # -> merge | a | b
    vae: str | None = None             # a file to take the VAE from
    dtype: str = "fp16"                # fp16 | bf16 | fp32 | same
    compute: str = "fp32"              # fp32 | fp64
    clamp: bool = False
    allow_nonfinite: bool = False      # only warn on NaN/inf/out-of-range instead of failing
    device: str = "cpu"
    overwrite: bool = False


@dataclass
class MergeResult:
    path: str
    bytes: int
    seconds: float
    report: dict
    chart: str | None = None
    warnings: list[str] = field(default_factory=list)


def _run_linear(request: MergeRequest, monitor: Monitor) -> MergeResult:
    started = time.monotonic()
    weight = request.alpha if LINEAR_METHODS[request.method].parameter == "alpha" else request.multiplier
    outcome = linear_merge(request.method, request.models, request.output, weight=weight,
                           components=request.components, vae=request.vae, dtype=request.dtype,
                           compute=request.compute, clamp=request.clamp, allow_nonfinite=request.allow_nonfinite,
                           device=request.device, overwrite=request.overwrite, monitor=monitor)
    return MergeResult(str(outcome.path), outcome.bytes, time.monotonic() - started, outcome.report,
                       warnings=outcome.warnings)


def _run_rebasin(request: MergeRequest, monitor: Monitor) -> MergeResult:
    started = time.monotonic()
    outcome, chart = rebasin.run_request(request, monitor)
    return MergeResult(str(outcome.path), outcome.bytes, time.monotonic() - started, outcome.report, chart=chart,
                       warnings=outcome.warnings)


RUNNERS: dict[str, Callable[[MergeRequest, Monitor], MergeResult]] = {
    "amp": _run_linear,
    "add-diff": _run_linear,
    "weighted-sum": _run_linear,
    **{method: _run_rebasin for method in rebasin.JOBS},
}


def _check_request(request: MergeRequest, info: MethodInfo) -> None:
    if not request.output:
        raise ValueError(f"no output file given (e.g. {default_output_name(request)} in the models folder)")
    count = len(request.models)
    if info.n_models is None and count < 2:
        raise ValueError(f"{info.label} needs at least two models, got {count}")
    if info.n_models is not None and count != info.n_models:
        raise ValueError(f"{info.label} takes {info.n_models} models, got {count}")


def run(request: MergeRequest, monitor: Monitor = SILENT) -> MergeResult:
    """Run a merge job. Raises ValueError (bad request; MergeError is one), CheckpointError, ArchitectureError
    or progress.Cancelled; no output file is left behind on any error."""
    info = METHODS.get(request.method)
    if info is None:
        raise ValueError(f"unknown method {request.method!r}: choose one of {', '.join(METHODS)}")
    runner = RUNNERS.get(request.method)
    if runner is None:
        raise ValueError(f"method {request.method} is not available yet")
    _check_request(request, info)
    return runner(request, monitor)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _stem(path: str, limit: int = 40) -> str:
    name = os.path.basename(path)
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _UNSAFE.sub("_", name).strip("._-")[:limit] or "model"


def default_output_name(request: MergeRequest) -> str:
    """A file name derived from the recipe, e.g. 'amp_M2_modelA_modelB.safetensors' (no folder)."""
    info = METHODS.get(request.method)
    if info is None:
        raise ValueError(f"unknown method {request.method!r}: choose one of {', '.join(METHODS)}")
    parts = [request.method.replace("-", "")]
    if info.uses_multiplier:
        parts.append(f"M{number_text(request.multiplier)}")
    if info.uses_alpha:
        parts.append(f"a{number_text(request.alpha)}")
    if info.uses_seed and request.seed:
        parts.append(f"s{request.seed}")
    stems = [_stem(p) for p in request.models]
    if len(stems) > 3:
        stems = stems[:2] + [f"{len(stems) - 2}more"]
    return "_".join(parts + stems) + ".safetensors"
