"""Recipe metadata in A1111's schema, lineage across merges of merges, and the sha256 cache."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from lib_rebasin import PROJECT, __version__, recipe
from lib_rebasin.checkpoint import Checkpoint
from lib_rebasin.merge import linear_merge


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def webui_legacy_hash(path) -> str:
    """The webui's `model_hash`, written out independently: sha256 of 64 KiB at 1 MiB, first 8 digits."""
    data = open(path, "rb").read()
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def read_metadata(path) -> dict[str, str]:
    with Checkpoint(path) as ckpt:
        return ckpt.metadata


def test_recipe_and_parents_in_webui_schema(tiny_a, tiny_b, tmp_path):
    out = tmp_path / "amp.safetensors"
    linear_merge("amp", [tiny_a, tiny_b], out, weight=2.0, components={"vae": "b"})
    metadata = read_metadata(out)
    made = json.loads(metadata["sd_merge_recipe"])
    assert made["type"] == PROJECT and made["version"] == __version__
    assert made["primary_model_hash"] == sha256(tiny_a)
    assert made["secondary_model_hash"] == sha256(tiny_b) and made["tertiary_model_hash"] is None
    assert made["interp_method"] == "Amplified difference" and made["multiplier"] == 2.0
    assert made["method"] == "amp" and made["formula"] == "A + 2·(B − A)"
    assert made["components"] == {"unet": "merge", "clip_l": "merge", "clip_g": "merge", "vae": "b", "other": "a"}
    assert made["save_as"] == "fp16" and made["compute"] == "fp32" and made["clamp"] is False
    assert made["custom_name"] == "amp" and made["bake_in_vae"] == "None"
    parents = json.loads(metadata["sd_merge_models"])
    assert parents == {
        sha256(tiny_a): {"name": "tiny_a.safetensors", "legacy_hash": webui_legacy_hash(tiny_a), "sd_merge_recipe": None},
        sha256(tiny_b): {"name": "tiny_b.safetensors", "legacy_hash": webui_legacy_hash(tiny_b), "sd_merge_recipe": None},
    }
    assert metadata["format"] == "pt"
    parent_meta = read_metadata(tiny_a)
    assert metadata["modelspec.title"] == "amp"
    assert metadata["modelspec.architecture"] == parent_meta["modelspec.architecture"]
    assert "lib_rebasin.synthetic" not in metadata  # only modelspec.* is carried over


def test_lineage_survives_a_merge_of_merges(tiny_a, tiny_b, tiny_c, tmp_path):
    first = tmp_path / "first.safetensors"
    linear_merge("amp", [tiny_a, tiny_b], first, weight=2.0)
    second = tmp_path / "second.safetensors"
    linear_merge("add-diff", [first, tiny_c, tiny_a], second, weight=0.5, vae=tiny_b)
    made = json.loads(read_metadata(second)["sd_merge_recipe"])
    assert made["tertiary_model_hash"] == sha256(tiny_a)
    assert made["bake_in_vae"] == "tiny_b.safetensors" and made["bake_in_vae_hash"] == sha256(tiny_b)
    lineage = json.loads(read_metadata(second)["sd_merge_models"])
    assert set(lineage) == {sha256(first), sha256(tiny_c), sha256(tiny_a), sha256(tiny_b)}
    assert lineage[sha256(first)]["sd_merge_recipe"]["formula"] == "A + 2·(B − A)"
    assert lineage[sha256(tiny_b)]["name"] == "tiny_b.safetensors"  # an ancestor through `first`


def test_sha256_cache_is_used_and_invalidated(tiny_a, tmp_path, monkeypatch):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(open(tiny_a, "rb").read())
    assert recipe.file_sha256(copy) == sha256(copy)
    monkeypatch.setattr(recipe, "compute_sha256", lambda *args: pytest.fail("hashed again despite the cache"))
    assert recipe.file_sha256(copy) == sha256(copy)
    hashes = recipe.ParentHashes([copy])
    assert not hashes.pending and hashes.wait() == {os.path.realpath(copy): sha256(copy)}
    with open(copy, "r+b") as f:  # new content, new size and mtime: the cached value no longer applies
        f.seek(0, os.SEEK_END)
        f.write(b"\0" * 8)
    monkeypatch.undo()
    assert recipe.cached_sha256(copy) is None
    hashes = recipe.ParentHashes([copy])
    assert hashes.pending and hashes.wait() == {os.path.realpath(copy): sha256(copy)}
    assert recipe.cached_sha256(copy) == sha256(copy)
