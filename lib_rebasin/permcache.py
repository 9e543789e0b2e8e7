"""The permutation cache: matching results stored in a folder of their own, found again by a key.

The key is the sha256 of everything a matching result depends on: the inputs' sha256, the spec version, the
matched components, the matching settings.  Files are `<models>.<key>.rebasin-perms` (safetensors inside;
the webuis list only .safetensors/.ckpt as checkpoints), written through the output guard; a damaged or
foreign file is ignored and costs only a new matching.

The folder is the caller's choice (a host's setting); `default_cache_dir()` is lib_rebasin's own cache folder.
`trim_cache` keeps a folder under a size cap, least recently used first (a cache hit touches its file).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .errors import CheckpointError, OutputError, file_error
from .matching import MatchOptions, screening
from .outputs import OutputFile
from .permute import check_permutations
from .spec.core import Permutations, Spec
from .spec.sdxl import SPEC_VERSION

MATCHING_VERSION = "3"       # bump when matching would give other permutations for the same inputs and settings
CACHE_SUFFIX = ".rebasin-perms"


def cache_key(kind: str, hashes: Sequence[str], components: Sequence[str], options: MatchOptions,
              extra: Mapping[str, object] | None = None) -> str:
    """sha256 of everything a matching result depends on, the kind of device and the screening products
    included: decisions within their error bounds of a tie may differ between arithmetics."""
    payload = {"kind": kind, "inputs": list(hashes), "spec": SPEC_VERSION, "matching": MATCHING_VERSION,
               "components": sorted(components), "seed": options.seed, "max_sweeps": options.max_sweeps,
               "rtol": options.rtol, "device": torch.device(options.device).type, "screening": screening(options),
               **(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _stem(path: str | os.PathLike, limit: int = 32) -> str:
    name = Path(path).name
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:limit] or "model"


def cache_path(folder: str | os.PathLike, key: str, models: Sequence[str | os.PathLike]) -> Path:
    names = "__".join(_stem(m) for m in models[:3]) + ("__more" if len(models) > 3 else "")
    return Path(folder) / f"{names}.{key[:16]}{CACHE_SUFFIX}"


def find_cached(folder: str | os.PathLike, key: str,
                specs: Sequence[Spec]) -> tuple[list[Permutations], dict, Path] | None:
    """The cached permutation sets for `key` (one per aligned model), their report and file, if a valid cache
    file exists in `folder`."""
    from safetensors import safe_open
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob(f"*.{key[:16]}{CACHE_SUFFIX}")):
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("key") != key:
                    continue
                sets = []
                for i, spec in enumerate(specs):
                    perms = {name: f.get_tensor(f"{i}/{name}").long() for name in spec.groups}
                    sets.append(check_permutations(spec, perms))
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: the last file trim_cache removes
                return sets, json.loads(metadata.get("report", "{}")), path
        except Exception:  # a damaged or foreign cache file only costs a new matching
            continue
    return None


def default_cache_dir() -> Path:
    """The cache folder when the user names none: lib_rebasin's own cache folder, never a models folder."""
    from .recipe import cache_dir
    return cache_dir() / "permutations"


def cache_files(folder: str | os.PathLike) -> list[Path]:
    """The permutation files in `folder`, least recently used first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"*{CACHE_SUFFIX}"):
        with contextlib.suppress(OSError):
            found.append((path.stat().st_mtime, path))
    return [path for _, path in sorted(found)]


def cache_usage(folder: str | os.PathLike) -> tuple[int, int]:
    """(number of files, bytes) of the permutation cache in `folder`."""
    files = cache_files(folder)
    total = 0
    for path in files:
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return len(files), total


def trim_cache(folder: str | os.PathLike, max_bytes: int) -> list[Path]:
    """Remove the least recently used permutation files until the cache holds at most `max_bytes` (0: no cap);
    returns what was removed.  Only `*.rebasin-perms` files are touched."""
    if max_bytes <= 0:
        return []
    files = cache_files(folder)
    sizes = {}
    for path in files:
        with contextlib.suppress(OSError):
            sizes[path] = path.stat().st_size
    total, removed = sum(sizes.values()), []
    for path in files:
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
            total -= sizes.get(path, 0)
    return removed


def clear_cache(folder: str | os.PathLike) -> int:
    """Remove every permutation file in `folder` (nothing else); returns how many."""
    return sum(_unlink(path) for path in cache_files(folder))


def _unlink(path: Path) -> int:
    try:
        path.unlink()
        return 1
    except OSError:
        return 0


def save_cache(path: Path, key: str, sets: Sequence[Permutations], report: Mapping,
               inputs: Sequence[str | os.PathLike] = (), warnings: list[str] | None = None) -> Path | None:
    """Write the permutation sets through the output guard: complete or not at all, never over an input.  A
    cache file of the same name is replaced (find_cached did not accept it).  A cache that cannot be written
    only costs time later: returns None, and says why in `warnings`."""
    from .checkpoint import save_state_dict
    tensors = {f"{i}/{name}": p.to(torch.int32).contiguous() for i, perms in enumerate(sets)
               for name, p in perms.items()}
    metadata = {"key": key, "spec_version": SPEC_VERSION, "matching_version": MATCHING_VERSION,
                "report": json.dumps(report, default=str)}
    try:
        if path.parent.exists() and not path.parent.is_dir():
            raise OutputError(f"{path.parent}: not a folder, so no cache can go there")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise file_error(e, path.parent, writing=True) from None
        output = OutputFile(path, inputs=inputs, overwrite=True, suffixes=(CACHE_SUFFIX,), record=False)
        return save_state_dict(output, tensors, metadata)
    except CheckpointError as e:
        if warnings is not None:
            warnings.append(f"permutation cache not written ({e})")
        return None
