"""Provenance of a merge, in the schema A1111's checkpoint merger writes and reads.

`sd_merge_recipe` says what was done (method, multiplier, components, dtypes, this project's name and version);
`sd_merge_models` maps each parent's sha256 to its name, legacy hash and own recipe, and carries the parents'
`sd_merge_models` along, so a merge of merges keeps its whole lineage.  `modelspec.*` is carried over from
model A with the title set to the output's name.

Hashes are whole-file sha256, as the webui computes them.  Hashing a 7 GB file takes seconds, so results are
kept in a small JSON cache keyed by path, size and modification time; `ParentHashes` hashes the uncached
parents in background threads while a merge streams, and the merge writes the final metadata at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from . import PROJECT, __version__
from .errors import CheckpointError
from .outputs import write_file

RECIPE_KEY = "sd_merge_recipe"
MODELS_KEY = "sd_merge_models"
_HASH_BLOCK = 8 * 1024 * 1024
_CACHE_FILE = "sha256.json"
_cache_lock = threading.Lock()


def cache_dir() -> Path:
    """Where lib_rebasin keeps small caches: $LIB_REBASIN_CACHE_DIR, else the user's cache folder."""
    configured = os.environ.get("LIB_REBASIN_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.environ.get("LOCALAPPDATA") or Path.home() / ".cache"
    return Path(base) / "lib_rebasin"


def _stat_key(path: str | os.PathLike) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _load_cache() -> dict:
    try:
        with open(cache_dir() / _CACHE_FILE, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The remembered sha256 of a file, if its size and modification time have not changed since."""
    real, size, mtime = _stat_key(path)
    with _cache_lock:
        entry = _load_cache().get(real)
    if isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime:
        return entry.get("sha256")
    return None


def remember_sha256(path: str | os.PathLike, sha256: str) -> None:
    """Store a file's sha256 (hosts that already know it, e.g. from the webui's own cache, may call this)."""
    real, size, mtime = _stat_key(path)
    folder = cache_dir()
    with _cache_lock:
        data = _load_cache()
        data[real] = {"size": size, "mtime_ns": mtime, "sha256": sha256.lower()}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_file(folder / _CACHE_FILE, json.dumps(data, indent=0).encode(), overwrite=True, record=False)
        except (OSError, CheckpointError):
            pass  # a cache that cannot be written only costs time


def compute_sha256(path: str | os.PathLike, stop: threading.Event | None = None) -> str | None:
    """sha256 of a whole file (None if `stop` was set meanwhile). hashlib releases the GIL on big blocks."""
    digest = hashlib.sha256()
    block = bytearray(_HASH_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            if stop is not None and stop.is_set():
                return None
            digest.update(view[:n])
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """A file's sha256, from the cache when it is fresh, else computed and remembered."""
    sha = cached_sha256(path)
    if sha is None:
        sha = compute_sha256(path)
        remember_sha256(path, sha)
    return sha


def legacy_hash(path: str | os.PathLike) -> str:
    """The webui's old 8-digit model hash: sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class ParentHashes:
    """The sha256 of a job's input files: cached ones at once, the others hashed in background threads.

    `current()` gives every file a 64-digit value at any time (a placeholder while it is being hashed), so a
    header can be written first and rewritten with `wait()`'s real values, which have the same length."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self._stop = threading.Event()
        self._known: dict[str, str] = {}
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        unique = list(dict.fromkeys(os.path.realpath(p) for p in paths))
        self._placeholders = {real: f"{i + 1:064x}" for i, real in enumerate(unique)}
        for real in unique:
            sha = cached_sha256(real)
            if sha is not None:
                self._known[real] = sha
            else:
                thread = threading.Thread(target=self._hash, args=(real,), name="lib_rebasin-sha256", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _hash(self, real: str) -> None:
        try:
            sha = compute_sha256(real, self._stop)
            if sha is not None:
                remember_sha256(real, sha)
                self._known[real] = sha
        except BaseException as e:  # reported by wait()
            self._errors.append(e)

    def current(self) -> dict[str, str]:
        """path (as given or real) -> sha256 or placeholder."""
        return {real: self._known.get(real, placeholder) for real, placeholder in self._placeholders.items()}

    @property
    def pending(self) -> bool:
        """Whether any file is (or was) hashed in the background, i.e. current() held placeholders at first."""
        return bool(self._threads)

    def done(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def wait(self) -> dict[str, str]:
        self.done()
        if self._errors:
            raise self._errors[0]
        return self.current()

    def cancel(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


@dataclass
class Parent:
    """One input of a merge: its role letter ('A', 'B', …), file and safetensors metadata."""
    role: str
    path: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _json_value(text: str | None):
    """A metadata value the way the webui reads it back: JSON objects parsed, anything else as is."""
    if isinstance(text, str) and text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def merge_metadata(parents: Sequence[Parent], hashes: Mapping[str, str], recipe: Mapping[str, object], *,
                   title: str, vae: Parent | None = None) -> dict[str, str]:
    """The output's safetensors metadata: modelspec.* from the first parent, sd_merge_recipe, sd_merge_models.

    Args:
        parents: the merged models in order (A first).
        hashes: real path -> sha256 for every parent (and the VAE file).
        recipe: method-specific fields (interp_method, multiplier, method, formula, components, dtypes, …).
        title: the output's name (without extension).
        vae: the file the VAE was taken from, if any.
    """
    def sha(p: Parent) -> str:
        return hashes[os.path.realpath(p.path)]

    metadata: dict[str, str] = {k: v for k, v in parents[0].metadata.items()
                                if k.startswith("modelspec.") and not k.startswith("modelspec.hash")}
    if metadata:
        metadata["modelspec.title"] = title
    shas = [sha(p) for p in parents]
    full = {
        "type": PROJECT,
        "version": __version__,
        "primary_model_hash": shas[0],
        "secondary_model_hash": shas[1] if len(shas) > 1 else None,
        "tertiary_model_hash": shas[2] if len(shas) > 2 else None,
        **({"additional_model_hashes": shas[3:]} if len(shas) > 3 else {}),
        **recipe,
        "models": {p.role: p.name for p in parents},
        "custom_name": title,
        "bake_in_vae": vae.name if vae else "None",
        **({"bake_in_vae_hash": sha(vae)} if vae else {}),
        "discard_weights": "",
        "is_inpainting": False,
        "is_instruct_pix2pix": False,
    }
    lineage: dict[str, object] = {}
    for parent, parent_sha in zip(parents, shas):
        lineage[parent_sha] = {
            "name": parent.name,
            "legacy_hash": legacy_hash(parent.path),
            RECIPE_KEY: _json_value(parent.metadata.get(RECIPE_KEY)),
        }
        ancestors = _json_value(parent.metadata.get(MODELS_KEY))
        if isinstance(ancestors, dict):
            for ancestor_sha, entry in ancestors.items():
                lineage.setdefault(ancestor_sha, entry)
    metadata["format"] = "pt"
    metadata[RECIPE_KEY] = json.dumps(full, ensure_ascii=False)
    metadata[MODELS_KEY] = json.dumps(lineage, ensure_ascii=False)
    return metadata


def read_recipe(metadata: Mapping[str, str]) -> tuple[dict | None, dict]:
    """(sd_merge_recipe, sd_merge_models) parsed from a checkpoint's metadata ({} / None when absent)."""
    recipe = _json_value(metadata.get(RECIPE_KEY))
    models = _json_value(metadata.get(MODELS_KEY))
    return (recipe if isinstance(recipe, dict) else None), (models if isinstance(models, dict) else {})
