"""rebasin, basin-sum, amp-rebasin and merge-many: weight-matched merges of SDXL checkpoints.

    python -m lib_rebasin rebasin A.safetensors B.safetensors --alpha 0.5 -o OUT.safetensors
    python -m lib_rebasin basin-sum A.safetensors B.safetensors --alpha 0.3 -o OUT.safetensors
    python -m lib_rebasin amp-rebasin A.safetensors B.safetensors -M 2 --alpha 0.5 -o OUT.safetensors
    python -m lib_rebasin merge-many M1.safetensors M2.safetensors M3.safetensors -o OUT.safetensors
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from .. import jobs, rebasin
from ..anatomy import COMPONENTS
from ..merge import COMPUTE_DTYPES, OUTPUT_DTYPES, SOURCES
from ..progress import SILENT
from ..report import format_report
from ..errors import CheckpointError
from ..outputs import check_output_path, write_file
from ..report_chart import SUFFIXES as chart_suffixes
from ..report_chart import available as chart_available
from ..report_chart import write_chart
from . import UsageError
from .common import print_json, progress_bar
from .merge import parse_components


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", help="the .safetensors file to write (default: a name made from the recipe, "
                                          "in A's folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the matching's visiting order (default 0)")
    p.add_argument("--device", default="cpu", help="where costs are computed: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", choices=tuple(OUTPUT_DTYPES), default="fp16",
                   help="output dtype of float tensors (default fp16; 'same' keeps each source's)")
    p.add_argument("--compute", choices=tuple(COMPUTE_DTYPES), default="fp32", help="merge precision")
    p.add_argument("--components", nargs="+", default=[], metavar="COMPONENT=SOURCE",
                   help=f"where each component comes from: {', '.join(COMPONENTS)} or clip (both text encoders) = "
                        f"{' | '.join(SOURCES)}; merged UNet and text encoders are matched; default unet, clip_l, "
                        f"clip_g merged, vae and other from A (e.g. --components clip=a)")
    p.add_argument("--vae", help="take the VAE from this file (a checkpoint or a standalone VAE)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write the result even with NaN, inf or values beyond the dtype's range (warn only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    p.add_argument("--no-cache", action="store_true", help="neither reuse nor store the matching result")
    p.add_argument("--cache-dir", help="where matching results are cached (default: the output's folder)")
    p.add_argument("--max-sweeps", type=int, default=100, help="coordinate-descent sweeps at most (default 100)")
    p.add_argument("--screen", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 costs with an error bound before float32 ones (default: when faster here)")
    p.add_argument("--report", help="also write the full report (JSON) to this file")
    p.add_argument("--chart", help="draw the alignment chart into this PNG file (needs matplotlib)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as one JSON object")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar and report: only the path")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rebasin", help="(1 − α)·A + α·P(B): B permuted into A's basis by weight matching, merged")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--alpha", type=float, default=0.5, help="share of P(B) (default 0.5; 1 writes P(B))")
    _common(p)
    p.set_defaults(func=run, job="rebasin")

    p = sub.add_parser("basin-sum", help="α·(α·A + (1 − α)·B) + (1 − α)·Rebasin(A, B, α)")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--alpha", type=float, default=0.5, help="α (default 0.5)")
    _common(p)
    p.set_defaults(func=run, job="basin-sum")

    p = sub.add_parser("amp-rebasin", help="Rebasin(A, A + M·(B − A), α): amplify, then re-basin against A")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("-M", "--multiplier", type=float, default=2.0, help="M of the amplified difference (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="share of the re-based amplified model (default 0.5)")
    _common(p)
    p.set_defaults(func=run, job="amp-rebasin")

    p = sub.add_parser("merge-many", help="mean of N models, each aligned to the mean of the others (MergeMany)")
    p.add_argument("models", nargs="+", metavar="MODEL")
    _common(p)
    p.set_defaults(func=run, job="merge-many")


def run(args) -> int:
    models = args.models if args.job == "merge-many" else [args.a, args.b]
    if len(models) < 2:
        raise UsageError("merge-many needs at least two models")
    output = args.output
    if not output:
        request = jobs.MergeRequest(args.job, [str(m) for m in models], "", multiplier=getattr(args, "multiplier", 2.0),
                                    alpha=getattr(args, "alpha", 0.5), seed=args.seed)
        output = os.path.join(os.path.dirname(os.path.abspath(models[0])), jobs.default_output_name(request))
    inputs = [str(m) for m in models] + ([args.vae] if args.vae else [])
    check_output_path(output, inputs, args.overwrite)
    side_files = _check_side_files(args, output, inputs)
    options = dict(seed=args.seed, components=parse_components(args.components), vae=args.vae, dtype=args.dtype,
                   compute=args.compute, device=args.device, overwrite=args.overwrite,
                   allow_nonfinite=args.allow_nonfinite, cache=not args.no_cache, cache_dir=args.cache_dir,
                   max_sweeps=args.max_sweeps, screen=args.screen)
    if args.job != "merge-many":
        options["alpha"] = args.alpha
    if args.job == "amp-rebasin":
        options["multiplier"] = args.multiplier
    bar = contextlib.nullcontext(SILENT) if args.quiet or args.json else progress_bar(args.job)
    with bar as monitor:
        job = rebasin.JOBS[args.job]
        outcome = job(models, output, monitor=monitor, **options) if args.job == "merge-many" else \
            job(*models, output, monitor=monitor, **options)
    report = dict(outcome.report, seconds=outcome.seconds)
    try:
        if args.report:
            write_file(args.report, json.dumps(report, indent=2, default=str).encode(), **side_files)
        if args.chart and write_chart(report, args.chart, **side_files) is None:
            print("note: no chart drawn (the report has nothing to draw)", file=sys.stderr)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the merge itself was written: {outcome.path})") from None
    if args.json:
        print_json({"path": str(outcome.path), "bytes": outcome.bytes, "seconds": outcome.seconds,
                    "warnings": outcome.warnings, "report": report})
        return 0
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(format_report(report))
        print(summary(report))
        print(f"wrote {outcome.bytes / 2**30:.2f} GiB in {outcome.seconds['total']:.1f} s:")
    print(outcome.path)
    return 0


def _check_side_files(args, output: str, inputs: list[str]) -> dict:
    """Refuse a bad --report / --chart before any work: never an input or the output, never each other, never
    an existing file without --overwrite.  Returns the guard's options for writing them."""
    seen = {_identity(output): "the output"}
    for flag, path, suffixes in (("--report", args.report, None), ("--chart", args.chart, chart_suffixes)):
        if not path:
            continue
        check_output_path(path, [*inputs, output], args.overwrite, suffixes=suffixes)
        if _identity(path) in seen:
            raise UsageError(f"{flag} {path}: the same file as {seen[_identity(path)]}: choose another name")
        seen[_identity(path)] = flag
    if args.chart and not chart_available():
        raise UsageError("--chart needs matplotlib: pip install matplotlib (or leave out --chart)")
    return {"inputs": inputs, "overwrite": args.overwrite}


def _identity(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def summary(report: dict) -> str:
    m = report["matching"]
    t = report["seconds"]
    lines = []
    source = "cache (" + str(m.get("cache_file")) + ")" if m.get("cache_hit") else "weight matching"
    if "rounds" in m:
        lines.append(f"  permutations from {source}: {m['matchings']} matchings, converged {m['converged']}, "
                     f"groups changed per model {', '.join(m['changed_groups'])}")
    else:
        skipped = m["solver_needed"] - m["solver_solved"]
        lines.append(f"  permutations from {source}: {m['changed_groups']} groups changed, {len(m['sweeps'])} sweeps, "
                     f"objective {m['objective_before']:.6g} → {m['objective_after']:.6g}, "
                     f"solver calls skipped {skipped}/{m['solver_needed']}")
    blocks = m.get("blocks") or {}
    gains = sorted(((v["after"] - v["before"], name) for name, v in blocks.items()), reverse=True)
    if gains and gains[0][0] > 1e-6:
        shown = ", ".join(f"{name} {blocks[name]['before']:.3f} → {blocks[name]['after']:.3f}"
                          for gain, name in gains[:4] if gain > 1e-6)
        lines.append(f"  alignment (cosine of A and B → of A and P(B)), most improved: {shown}")
    elif blocks:
        lines.append("  alignment: no block changed (the models already share a basis)")
    lines.append(f"  time: hash {t.get('hash', 0):.1f} s, match {t.get('match', 0):.1f} s, "
                 f"write {t.get('write', 0):.1f} s, total {t.get('total', 0):.1f} s")
    return "\n".join(lines)
