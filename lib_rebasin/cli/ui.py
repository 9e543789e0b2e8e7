"""ui: serve the merge tab as a standalone web app over a folder of checkpoints.

    python -m lib_rebasin ui --models-dir ./models
    python -m lib_rebasin ui --models-dir ./models --port 7870 --host 127.0.0.1 --device cuda
"""
from __future__ import annotations

import argparse
import os

from ..host.base import DTYPE_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the merge tab as a standalone web app (needs gradio)")
    p.add_argument("--models-dir", required=True, help="folder of checkpoints; merges are written here")
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp16", help="default output dtype")
    p.add_argument("--permutation-cache", default="", help="folder for cached re-basin permutations")
    p.add_argument("--sample-scale", choices=("tiny", "small", "full"), default="small",
                   help="size of the synthetic checkpoints offered in an empty folder (default: small, ~0.5 GB each)")
    p.add_argument("--api-auth", help="user:password[,user2:password2] for the REST routes under /rebasin/v1")
    p.set_defaults(func=serve)


def serve(args) -> int:
    from . import UsageError
    try:
        from ..ui import app
    except ImportError as e:
        raise UsageError(f"the ui needs gradio ({e}); install it with: pip install 'gradio>=4.40'") from None
    from ..host.standalone import StandaloneHost
    if not os.path.isdir(args.models_dir):
        if os.path.exists(args.models_dir):
            raise UsageError(f"{args.models_dir}: not a folder")
        os.makedirs(args.models_dir)
    host = StandaloneHost(args.models_dir, device=args.device, dtype=args.dtype,
                          permutation_cache=args.permutation_cache, api_auth=args.api_auth,
                          sample_scale=args.sample_scale)
    app.serve(host, server_name=args.host, port=args.port)
    return 0
