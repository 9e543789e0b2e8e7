"""inspect and make-synthetic."""
from __future__ import annotations

import argparse
from collections import Counter

from ..anatomy import COMPONENT_LABELS, EMA, analyse, key_kind
from ..checkpoint import Checkpoint
from ..config import SCALES
from ..synthetic import VARIANTS, synthetic_shapes, write_synthetic
from .common import DTYPES, human_bytes, print_json, progress_bar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="architecture, components, dtypes, derived config and metadata of a checkpoint")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=inspect)

    p = sub.add_parser("make-synthetic", help="write a synthetic SDXL checkpoint (seeded random weights)")
    p.add_argument("out", nargs="?")
    p.add_argument("--scale", choices=SCALES, default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the float tensors (default fp16; with --base, "
                                                          "the base's)")
    p.add_argument("--base", help="make a fine-tune-like variant of this checkpoint instead")
    p.add_argument("--drift", type=float, default=0.01, help="relative size of the variant's drift (default 0.01)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[,NAME…]",
                   help="imitate real files (composable, repeatable): "
                        + "; ".join(f"{name}: {text}" for name, text in VARIANTS.items()))
    p.add_argument("--unet-only", action="store_true", help="same as --variant unet-only")
    p.add_argument("--markers", action="store_true", help="same as --variant vpred")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--list", action="store_true", help="print every key and shape as JSON; write nothing")
    p.set_defaults(func=make_synthetic)


def describe(path: str) -> dict:
    with Checkpoint(path) as ckpt:
        anatomy = analyse(ckpt.shapes)
        components = {}
        for name, keys in anatomy.components.items():
            if keys:
                components[name] = {
                    "keys": len(keys),
                    "bytes": sum(ckpt.infos[k].nbytes for k in keys),
                    "dtypes": dict(Counter(str(ckpt.infos[k].dtype).removeprefix("torch.") for k in keys)),
                }
        return {
            "file": str(ckpt.path),
            "architecture": anatomy.architecture,
            "architecture_label": anatomy.label,
            "keys": len(ckpt),
            "bytes": ckpt.nbytes,
            "components": components,
            "other_keys": [k for k in anatomy.components["other"] if key_kind(k) != EMA][:50],
            "config": anatomy.config.to_dict() if anatomy.config else None,
            "config_error": anatomy.config_error,
            "vae": anatomy.vae,
            "prediction": anatomy.prediction,
            "absent_optional_keys": sorted(anatomy.absent),
            "notes": anatomy.notes,
            "metadata": {k: (v if len(v) <= 200 else v[:200] + f"… ({len(v)} chars)")
                         for k, v in ckpt.metadata.items()},
        }


def inspect(args) -> int:
    info = describe(args.file)
    if args.json:
        print_json(info)
        return 0
    print(f"{info['file']}\n  architecture: {info['architecture_label']}  "
          f"({info['keys']} keys, {human_bytes(info['bytes'])})")
    for name, c in info["components"].items():
        dtypes = ", ".join(f"{d}×{n}" for d, n in c["dtypes"].items())
        print(f"  {COMPONENT_LABELS[name]:7} {c['keys']:5} keys {human_bytes(c['bytes']):>11}  {dtypes}")
    if info["other_keys"]:
        print(f"  other keys: {', '.join(info['other_keys'])}")
    if info["config"]:
        u = info["config"]["unet"]
        heads = [u["model_channels"] * m // 64 for m in u["channel_mult"]]
        print(f"  UNet: {u['model_channels']} channels × {tuple(u['channel_mult'])}, {u['res_blocks']} res blocks, "
              f"transformer depth {tuple(u['transformer_depth'])} (middle {u['transformer_depth_middle']}), "
              f"heads {tuple(heads)}, context {u['context_dim']}, ADM {u['adm_in']}")
        for name in ("clip_l", "clip_g"):
            te = info["config"][name]
            if te:
                print(f"  {COMPONENT_LABELS[name]}: width {te['width']}, {te['layers']} layers, "
                      f"{te['width'] // 64} heads, MLP {te['mlp_width']}, vocab {te['vocab']}"
                      + (f", projection {te['projection']}" if te["projection"] else ""))
        if info["config"]["vae"]:
            v = info["config"]["vae"]
            print(f"  VAE: {v['channels']} channels × {tuple(v['channel_mult'])}, latent {v['latent']}")
    if info["config_error"]:
        print(f"  config: {info['config_error']}")
    for note in info["notes"]:
        print(f"  note: {note}")
    if info["metadata"]:
        print(f"  metadata ({len(info['metadata'])} entries):")
        for k, v in info["metadata"].items():
            print(f"    {k}: {v if len(v) <= 100 else v[:100] + '…'}")
    return 0


def make_synthetic(args) -> int:
    if args.list:
        print_json(synthetic_shapes(args.scale, unet_only=args.unet_only, markers=args.markers,
                                    variants=args.variant))
        return 0
    if not args.out:
        raise ValueError("make-synthetic needs an output file (or --list)")
    with progress_bar(f"make-synthetic {args.scale}") as monitor:
        path = write_synthetic(args.out, scale=args.scale, seed=args.seed,
                               dtype=DTYPES[args.dtype] if args.dtype else None, base=args.base, drift=args.drift,
                               unet_only=args.unet_only, markers=args.markers, variants=args.variant,
                               overwrite=args.overwrite, monitor=monitor)
    print(path)
    return 0
