"""What a user asked for (the tab's values or a REST body) turned into a `jobs.MergeRequest`, checked against
the host (names from its checkpoint list only, output inside its models folder), and a result turned into text.
No gradio here: the tab and the REST routes share it."""
from __future__ import annotations

import base64
import dataclasses
import html
import math
import os
import re
from dataclasses import dataclass, field

from .. import jobs
from ..anatomy import COMPONENT_LABELS, COMPONENTS
from ..host.base import DTYPE_CHOICES, Host, UnknownCheckpoint
from ..merge import DEFAULT_COMPONENTS, SOURCES as COMPONENT_SOURCES
COMPUTE_CHOICES = ("fp32", "fp64")
NO_VAE = "None"
_REQUEST_FIELDS = {f.name for f in dataclasses.fields(jobs.MergeRequest)}
_UNSAFE_NAME = re.compile(r'[\x00-\x1f<>:"/\\|?*]+')
_RESERVED_WINDOWS = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


@dataclass
class Recipe:
    """A merge as the user names it: method key, checkpoint names from the host's list, options."""
    method: str
    models: list[str]
    multiplier: float = 2.0
    alpha: float = 0.5
    seed: int = 0
    components: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COMPONENTS))
    vae: str = ""
    dtype: str = "fp16"
    device: str = ""
    output_name: str = ""
    overwrite: bool = False
    compute: str = "fp32"
    clamp: bool = False
    allow_nonfinite: bool = False


def method_key(choice: str) -> str:
    """A method's key from its key or its label."""
    if choice in jobs.METHODS:
        return choice
    for key, info in jobs.METHODS.items():
        if info.label == choice:
            return key
    raise ValueError(f"unknown merge method {choice!r}: choose one of {', '.join(jobs.METHODS)}")


def models_for(method: str, a: str | None, b: str | None, c: str | None, many: list[str] | None) -> list[str]:
    """The tab's model fields that the method uses, in order."""
    count = jobs.METHODS[method].n_models
    if count is None:
        return list(many or [])
    return [name or "" for name in (a, b, c)[:count]]


def sanitize_output_name(name: str) -> str:
    """A plain file name (no folders) ending in .safetensors, safe on Windows too."""
    base = _UNSAFE_NAME.sub("_", name.strip()).strip(" .")
    if base.lower().endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    elif base.lower().endswith(".ckpt"):
        base = base[: -len(".ckpt")]
    base = base.strip(" .")
    if not any(ch.isalnum() for ch in base) or base.lower() in _RESERVED_WINDOWS:
        raise ValueError(f"{name!r} is not usable as a file name")
    return base[:200] + ".safetensors"


def output_path(models_dir: str, name: str) -> str:
    """The output file for a user-given name: always directly inside the models folder."""
    folder = os.path.realpath(models_dir)
    path = os.path.join(folder, sanitize_output_name(name))
    if os.path.dirname(os.path.realpath(path)) != folder:
        raise ValueError(f"{name!r} would leave the models folder")
    return path


def _check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")
    return value


def build_request(host: Host, recipe: Recipe) -> jobs.MergeRequest:
    """Check a recipe against the host and resolve it into a request; raises ValueError (incl. UnknownCheckpoint)
    with a message for the user before anything is written."""
    method = method_key(recipe.method)
    info = jobs.METHODS[method]
    names = [name.strip() for name in recipe.models]
    if info.n_models is None:
        names = [name for name in names if name]
        if len(names) < 2:
            raise ValueError(f"{info.label} needs at least two models")
        if len(set(names)) != len(names):
            raise ValueError(f"{info.label}: each model may be chosen once")
    else:
        names = (names + [""] * info.n_models)[: info.n_models]
        missing = [letter for letter, name in zip("ABC", names) if not name]
        if missing:
            raise ValueError(f"{info.label} needs model {' and '.join(missing)}")
    paths = [host.checkpoint_path(name) for name in names]
    components = {c: _check_choice(recipe.components.get(c, DEFAULT_COMPONENTS[c]), COMPONENT_SOURCES,
                                   f"{c} source") for c in COMPONENTS}
    vae = None
    if recipe.vae and recipe.vae != NO_VAE:
        vae = host.vae_files().get(recipe.vae)
        if vae is None:
            raise UnknownCheckpoint(f"VAE {recipe.vae!r} is not in the VAE list")
    for value, what in ((recipe.multiplier, "multiplier M"), (recipe.alpha, "alpha")):
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"{what} must be a finite number")
    request = jobs.MergeRequest(
        method=method, models=paths, output="", multiplier=float(recipe.multiplier), alpha=float(recipe.alpha),
        seed=int(recipe.seed or 0), components=components, vae=vae,
        dtype=_check_choice(recipe.dtype or host.settings().dtype, DTYPE_CHOICES, "dtype"),
        compute=_check_choice(recipe.compute or "fp32", COMPUTE_CHOICES, "compute precision"),
        clamp=bool(recipe.clamp), allow_nonfinite=bool(recipe.allow_nonfinite),
        device=host.resolve_device(recipe.device), overwrite=bool(recipe.overwrite))
    if "cache_dir" in _REQUEST_FIELDS:  # the re-basin methods' permutation cache (the host's setting)
        request = dataclasses.replace(request, cache_dir=host.permutation_cache_dir())
    name = recipe.output_name.strip() or os.path.basename(jobs.default_output_name(request))
    return dataclasses.replace(request, output=output_path(host.models_dir(), name))


def suggested_name(host: Host, recipe: Recipe) -> str:
    """The output name the recipe gets when the user leaves the field empty ('' while it is incomplete)."""
    try:
        return os.path.basename(build_request(host, dataclasses.replace(recipe, output_name="")).output)
    except ValueError:
        return ""


def _plain(x: float) -> str:
    return f"{x:g}"


def formula_text(method: str, multiplier: float, alpha: float) -> str:
    info = jobs.METHODS[method_key(method)]
    return info.formula.format(M=_plain(float(multiplier)), alpha=_plain(float(alpha)))


def formula_symbols(method: str) -> str:
    """The method's formula with its parameters as symbols, e.g. 'A + M·(B − A)'."""
    return jobs.METHODS[method_key(method)].formula.format(M="M", alpha="α")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _chart_html(chart: str | None) -> str:
    if not chart or not os.path.isfile(chart):
        return ""
    with open(chart, "rb") as f:
        data = f.read()
    if chart.lower().endswith(".svg"):
        mime = "image/svg+xml"
    elif chart.lower().endswith((".jpg", ".jpeg")):
        mime = "image/jpeg"
    else:
        mime = "image/png"
    return (f"<img class='rebasin-chart' alt='alignment report chart' "
            f"src='data:{mime};base64,{base64.b64encode(data).decode()}'>")


def _number(x) -> str:
    return "—" if x is None else f"{x:.4g}"


def _source(source: str) -> str:
    return source.upper() if source in ("a", "b", "c") else source


def _report_html(report: dict) -> str:
    """Summary, components, and a bar chart of the difference the merge applied per UNet block."""
    if not report:
        return ""
    difference = html.escape(str(report.get("difference", "B − A")))
    summary = (f"<div class='rebasin-report-summary'>{report.get('keys', 0)} keys, {report.get('merged_keys', 0)} "
               f"merged · max |w| {_number(report.get('max_abs'))} · ‖{difference}‖ "
               f"{_number(report.get('diff_norm'))}</div>")
    rows = "".join(
        f"<tr><th>{html.escape(COMPONENT_LABELS.get(name, name))}</th><td>{html.escape(_source(c.get('source', '')))}"
        f"</td><td>{c.get('keys', 0)}</td><td>{_number(c.get('diff_norm'))}</td><td>{_number(c.get('max_abs'))}</td>"
        f"</tr>" for name, c in (report.get("components") or {}).items())
    table = (f"<table class='rebasin-report'><tr><th></th><th>source</th><th>keys</th><th>‖{difference}‖</th>"
             f"<th>max |w|</th></tr>{rows}</table>") if rows else ""
    blocks = [b for b in report.get("blocks") or [] if b.get("diff_norm") is not None]
    chart = ""
    if blocks:
        top = max(b["diff_norm"] for b in blocks) or 1.0
        bars = "".join(
            f"<div class='rebasin-bar'><span class='rebasin-bar-label'>{html.escape(b['block'])}</span>"
            f"<span class='rebasin-bar-track'><span class='rebasin-bar-fill' "
            f"style='width:{100 * b['diff_norm'] / top:.1f}%'></span></span>"
            f"<span class='rebasin-bar-value'>{_number(b['diff_norm'])}</span></div>" for b in blocks)
        chart = (f"<div class='rebasin-chart-title'>‖{difference}‖ per UNet block</div>"
                 f"<div class='rebasin-bars'>{bars}</div>")
    return summary + _matching_html(report.get("matching")) + table + chart


def _matching_html(matching: dict | None) -> str:
    """One line on the weight matching of a re-basin method."""
    if not matching:
        return ""
    parts = []
    if "changed_groups" in matching:
        parts.append(f"{matching['changed_groups']} permutation groups changed")
    if "sweeps" in matching:
        converged = "converged" if matching.get("converged") else "not converged"
        parts.append(f"{len(matching['sweeps'])} sweep(s), {converged}")
    before, after = matching.get("objective_before"), matching.get("objective_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        parts.append(f"Σ⟨A, P(B)⟩ {before:.6g} → {after:.6g}")
    if matching.get("cache_hit"):
        parts.append("permutations reused from the cache")
    return f"<div class='rebasin-matching'>Matching: {html.escape(' · '.join(parts))}</div>" if parts else ""


def result_html(result: jobs.MergeResult, models_dir: str) -> str:
    try:
        shown = os.path.relpath(result.path, models_dir)
    except ValueError:  # another drive on Windows
        shown = result.path
    if shown.startswith(".."):
        shown = result.path
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in result.warnings)
    parts = [
        "<div class='rebasin-result'>",
        f"<div class='rebasin-result-title'>Saved <code>{html.escape(shown)}</code></div>",
        f"<div class='rebasin-result-facts'><span>{human_bytes(result.bytes)}</span>"
        f"<span>{result.seconds:.1f} s</span></div>",
        f"<ul class='rebasin-warnings'>{warnings}</ul>" if warnings else "",
        _report_html(result.report or {}),
        _chart_html(result.chart),
        "</div>",
    ]
    return "".join(parts)


def message_html(kind: str, text: str, details: list[str] | tuple[str, ...] = ()) -> str:
    """kind: 'error' (the webui's own error class), 'cancelled' or 'info'; details: one line per case."""
    css = "error" if kind == "error" else f"rebasin-{kind}"
    items = "".join(f"<li>{html.escape(str(d))}</li>" for d in list(details)[:12])
    more = f"<li>… {len(details) - 12} more</li>" if len(details) > 12 else ""
    return f"<div class='{css}'>{html.escape(text)}{f'<ul>{items}{more}</ul>' if items else ''}</div>"


def error_html(error: Exception) -> str:
    return message_html("error", str(error), getattr(error, "details", ()))
