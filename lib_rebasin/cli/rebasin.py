"""rebasin, basin-sum, amp-rebasin and merge-many: weight-matched merges of SDXL checkpoints.

    python -m lib_rebasin rebasin A.safetensors B.safetensors --alpha 0.5 -o OUT.safetensors
    python -m lib_rebasin basin-sum A.safetensors B.safetensors --alpha 0.3 -o OUT.safetensors
    python -m lib_rebasin amp-rebasin A.safetensors B.safetensors -M 2 --alpha 0.5 -o OUT.safetensors
    python -m lib_rebasin merge-many M1.safetensors M2.safetensors M3.safetensors -o OUT.safetensors
"""
from __future__ import annotations

import argparse
import json

from .. import rebasin as jobs
from ..merge import COMPUTE_DTYPES, OUTPUT_DTYPES, SOURCES
from ..report_chart import write_chart
from .common import print_json, progress_bar

_COMPONENTS_HELP = ("source per component as name=source pairs, e.g. 'clip=a,vae=b' (names: unet, clip_l, clip_g, "
                    "clip, vae, other; sources: merge, a, b). Default: UNet and both text encoders merged (and "
                    "matched), VAE and other keys from A")


def parse_components(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, source = item.partition("=")
        if not sep or source.strip() not in SOURCES:
            raise ValueError(f"--components: {item!r} is not name=source with source one of {', '.join(SOURCES)}")
        out[name.strip()] = source.strip()
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the matching's visiting order (default 0)")
    p.add_argument("--device", default="cpu", help="where costs are computed: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", choices=tuple(OUTPUT_DTYPES), default="fp16", help="output dtype (default fp16)")
    p.add_argument("--compute", choices=tuple(COMPUTE_DTYPES), default="fp32", help="merge precision (default fp32)")
    p.add_argument("--components", help=_COMPONENTS_HELP)
    p.add_argument("--vae", help="take the VAE from this file (a checkpoint or a standalone VAE)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--allow-nonfinite", action="store_true", help="write even with NaN/inf values (warn only)")
    p.add_argument("--no-cache", action="store_true", help="neither reuse nor store the matching result")
    p.add_argument("--cache-dir", help="where matching results are cached (default: the output's folder)")
    p.add_argument("--max-sweeps", type=int, default=100, help="coordinate-descent sweeps at most (default 100)")
    p.add_argument("--screen", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 certificate pass before float32 costs (default: when faster)")
    p.add_argument("--report", help="also write the full report (JSON) to this file")
    p.add_argument("--chart", help="draw the alignment chart into this PNG file (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rebasin", help="(1 − α)·A + α·P(B): B permuted into A's basis by weight matching, merged")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--alpha", type=float, default=0.5, help="share of P(B) (default 0.5; 1 writes P(B))")
    _common(p)
    p.set_defaults(func=run, job="rebasin")

    p = sub.add_parser("basin-sum", help="α·(α·A + (1 − α)·B) + (1 − α)·Rebasin(A, B, α)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--alpha", type=float, default=0.5, help="α (default 0.5)")
    _common(p)
    p.set_defaults(func=run, job="basin-sum")

    p = sub.add_parser("amp-rebasin", help="Rebasin(A, A + M·(B − A), α): amplify, then re-basin against A")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("-M", "--multiplier", type=float, default=2.0, help="M of the amplified difference (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="share of the re-based amplified model (default 0.5)")
    _common(p)
    p.set_defaults(func=run, job="amp-rebasin")

    p = sub.add_parser("merge-many", help="mean of N models, each aligned to the mean of the others (MergeMany)")
    p.add_argument("models", nargs="+", metavar="MODEL")
    _common(p)
    p.set_defaults(func=run, job="merge-many")


def run(args) -> int:
    options = dict(seed=args.seed, components=parse_components(args.components), vae=args.vae, dtype=args.dtype,
                   compute=args.compute, device=args.device, overwrite=args.overwrite,
                   allow_nonfinite=args.allow_nonfinite, cache=not args.no_cache, cache_dir=args.cache_dir,
                   max_sweeps=args.max_sweeps, screen=args.screen)
    with progress_bar(args.job) as monitor:
        options["monitor"] = monitor
        if args.job == "merge-many":
            if len(args.models) < 2:
                raise ValueError("merge-many needs at least two models")
            outcome = jobs.merge_many(args.models, args.output, **options)
        elif args.job == "amp-rebasin":
            outcome = jobs.amp_rebasin(args.a, args.b, args.output, multiplier=args.multiplier, alpha=args.alpha,
                                       **options)
        else:
            outcome = jobs.JOBS[args.job](args.a, args.b, args.output, alpha=args.alpha, **options)
    report = dict(outcome.report, seconds=outcome.seconds)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
    if args.chart:
        if write_chart(report, args.chart) is None:
            print("note: no chart drawn (matplotlib is not installed)")
    if args.json:
        print_json(report)
        return 0
    print(outcome.path)
    print(summary(report))
    for warning in outcome.warnings:
        print(f"  warning: {warning}")
    return 0


def summary(report: dict) -> str:
    m = report["matching"]
    t = report["seconds"]
    lines = [f"  {report['formula']}"]
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
