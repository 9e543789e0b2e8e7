"""amp, add-diff and weighted-sum: the streamed linear merges.

    python -m lib_rebasin amp A.safetensors B.safetensors -M 2 -o 2B-A.safetensors
    python -m lib_rebasin add-diff A.safetensors B.safetensors C.safetensors -M 1 --components clip=a
    python -m lib_rebasin weighted-sum A.safetensors B.safetensors --alpha 0.3 --dtype bf16 --vae sdxl_vae.safetensors

The report (per component and UNet block: ‖difference‖ and max |w|) goes to stdout, then the output's path;
warnings and the progress bar go to stderr.  --json prints one JSON object instead, --quiet only the path.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .. import jobs
from ..anatomy import COMPONENTS
from ..merge import COMPUTE_DTYPES, LINEAR_METHODS, OUTPUT_DTYPES, SOURCES
from ..progress import SILENT
from ..report import format_report
from . import UsageError
from .common import print_json, progress_bar

_DEFAULT_M = {"amp": 2.0, "add-diff": 1.0}


def register(sub: argparse._SubParsersAction) -> None:
    for method, info in LINEAR_METHODS.items():
        formula = info.template.format(M="M", alpha="α")
        p = sub.add_parser(method, help=f"{info.label.lower()}: {formula}",
                           description=f"{info.label}: {formula}, streamed key by key into a new .safetensors file.")
        for role in info.roles:
            p.add_argument(role, metavar=role.upper(), help=f"model {role.upper()} (.safetensors, or a .ckpt, "
                                                            f"loaded without running code)")
        if info.parameter == "M":
            p.add_argument("-M", "--multiplier", type=float, default=_DEFAULT_M[method],
                           help=f"M (default {_DEFAULT_M[method]:g}); any real number, no clamping")
        else:
            p.add_argument("--alpha", type=float, default=0.5, help="α (default 0.5)")
        p.add_argument("-o", "--output", help="the .safetensors file to write (default: a name made from the "
                                              "recipe, in A's folder)")
        p.add_argument("--dtype", choices=tuple(OUTPUT_DTYPES), default="fp16",
                       help="output dtype of float tensors (default fp16; 'same' keeps each source's)")
        p.add_argument("--compute", choices=tuple(COMPUTE_DTYPES), default="fp32", help="compute precision")
        p.add_argument("--components", nargs="+", default=[], metavar="COMPONENT=SOURCE",
                       help=f"where each component comes from: {', '.join(COMPONENTS)} or clip (both text "
                            f"encoders) = {' | '.join(SOURCES)}; default unet, clip_l, clip_g merged, vae and "
                            f"other from A (e.g. --components clip=a vae=b)")
        p.add_argument("--vae", help="take the VAE from this file (a checkpoint or a standalone VAE)")
        p.add_argument("--clamp", action="store_true", help="clamp merged values to [min(A, B), max(A, B)]")
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="write the result even with NaN, inf or values beyond the dtype's range (warn only)")
        p.add_argument("--device", default="cpu", help="where to compute (cpu, cuda, cuda:1, mps)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
        out = p.add_mutually_exclusive_group()
        out.add_argument("--json", action="store_true", help="print the result as one JSON object")
        out.add_argument("-q", "--quiet", action="store_true", help="no progress bar and report: only the path")
        p.set_defaults(func=run_merge, method=method, roles=info.roles)


def parse_components(items: list[str]) -> dict[str, str]:
    components: dict[str, str] = {}
    for item in (part for arg in items for part in arg.split(",") if part):
        name, sep, source = item.partition("=")
        if not sep:
            raise UsageError(f"--components takes COMPONENT=SOURCE pairs, not {item!r}")
        components[name.strip()] = source.strip()
    return components


def run_merge(args) -> int:
    request = jobs.MergeRequest(
        method=args.method, models=[getattr(args, role) for role in args.roles], output=args.output or "",
        multiplier=getattr(args, "multiplier", 2.0), alpha=getattr(args, "alpha", 0.5),
        components=parse_components(args.components), vae=args.vae, dtype=args.dtype, compute=args.compute,
        clamp=args.clamp, allow_nonfinite=args.allow_nonfinite, device=args.device, overwrite=args.overwrite)
    if not request.output:
        folder = os.path.dirname(os.path.abspath(request.models[0]))
        request.output = os.path.join(folder, jobs.default_output_name(request))
    bar = contextlib.nullcontext(SILENT) if args.quiet or args.json else progress_bar(args.method)
    with bar as monitor:
        result = jobs.run(request, monitor)
    if args.json:
        print_json({"path": result.path, "bytes": result.bytes, "seconds": result.seconds,
                    "warnings": result.warnings, "report": result.report})
        return 0
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(format_report(result.report))
        print(f"wrote {result.bytes / 2**30:.2f} GiB in {result.seconds:.1f} s:")
    print(result.path)
    return 0
