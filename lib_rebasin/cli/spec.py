"""permute and spec: apply a random valid permutation set to a checkpoint; describe its permutation spec."""
from __future__ import annotations

import argparse

from ..checkpoint import Checkpoint
from ..permute import parse_components, permute_file, spec_for_checkpoint
from ..spec.core import is_identity
from ..spec.sdxl import COMPONENTS, describe_spec
from .common import print_json, progress_bar

_COMPONENTS_HELP = f"comma-separated subset of {','.join(COMPONENTS)} (default: every one the file has)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("permute", help="write a randomly permuted copy of a checkpoint that computes the same "
                                       "images (a check of the permutation spec)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--seed", type=int, required=True, help="seed of the random permutation set")
    p.add_argument("--components", help=_COMPONENTS_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=permute)

    p = sub.add_parser("spec", help="the permutation groups of a checkpoint by kind: counts, sizes, structure")
    p.add_argument("file")
    p.add_argument("--components", help=_COMPONENTS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=spec)


def permute(args) -> int:
    components = parse_components(args.components)
    with progress_bar("permute") as monitor:
        result = permute_file(args.input, args.output, args.seed, components, monitor, overwrite=args.overwrite)
    moved = sum(1 for p in result.permutations.values() if not is_identity(p))
    print(f"{result.path}\n  {len(result.permuted_keys)} tensors permuted, "
          f"{len(result.spec.passthrough)} copied; {moved} of {len(result.spec.groups)} groups moved "
          f"(seed {args.seed})")
    return 0


def spec(args) -> int:
    with Checkpoint(args.file) as checkpoint:
        description = describe_spec(spec_for_checkpoint(checkpoint, parse_components(args.components)))
    description = {"file": args.file, **description}
    if args.json:
        print_json(description)
        return 0
    print(f"{args.file}\n  spec {description['spec_version']}: {description['groups']} groups over "
          f"{description['permuted_keys']} keys ({', '.join(description['components'])}); "
          f"{description['passthrough_keys']} keys passed through unchanged")
    print(f"  {'component':9} {'kind':18} {'groups':>6}  {'sizes':24} structure")
    for k in description["kinds"]:
        sizes = ", ".join(f"{size}×{n}" if n > 1 else str(size) for size, n in k["sizes"].items())
        if k["structured"]:
            structure = (f"{k['superblocks']} superblocks, {k['atoms']} atoms of width "
                         f"{'/'.join(map(str, k['atom_widths']))}")
            if k["fixed_superblocks"]:
                structure += f" ({k['fixed_superblocks']} stay in place)"
        else:
            structure = "free"
        print(f"  {k['component']:9} {k['kind']:18} {k['groups']:6}  {sizes:24} {structure}")
    return 0
