"""The permutation cache as a folder of its own: its default place, its size cap (least recently used first, a
cache hit counts as a use) and clearing it, touching nothing but cache files."""
from __future__ import annotations

import os
from pathlib import Path

from lib_rebasin import permcache
from lib_rebasin import rebasin as rb


def _cache_file(folder: Path, name: str, size: int, used: int) -> Path:
    path = folder / f"{name}.0123456789abcdef{permcache.CACHE_SUFFIX}"
    path.write_bytes(b"\0" * size)
    os.utime(path, (used, used))
    return path


def test_the_default_folder_is_lib_rebasins_own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LIB_REBASIN_CACHE_DIR", str(tmp_path / "cache"))
    assert permcache.default_cache_dir() == tmp_path / "cache" / "permutations"


def test_trim_removes_the_least_recently_used_files_down_to_the_cap(tmp_path):
    old, mid, new = (_cache_file(tmp_path, n, 1000, t) for n, t in (("old", 1), ("mid", 2), ("new", 3)))
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\0" * 5000)
    assert permcache.cache_usage(tmp_path) == (3, 3000)
    assert permcache.trim_cache(tmp_path, 0) == []          # 0: no cap
    assert permcache.trim_cache(tmp_path, 2500) == [old]
    assert permcache.trim_cache(tmp_path, 1000) == [mid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new.name, other.name])
    assert permcache.clear_cache(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [other.name]
    assert permcache.clear_cache(tmp_path / "missing") == 0 and permcache.cache_usage(tmp_path / "missing") == (0, 0)


def test_a_cache_hit_makes_its_file_the_most_recently_used(tiny_a, tiny_b, tmp_path):
    cache = tmp_path / "cache"
    first = rb.rebasin(tiny_a, tiny_b, tmp_path / "first.safetensors", cache_dir=cache)
    assert not first.cache_hit and Path(first.cache_file).parent == cache
    os.utime(first.cache_file, (1, 1))
    younger = _cache_file(cache, "other", 10, 2)
    second = rb.rebasin(tiny_a, tiny_b, tmp_path / "second.safetensors", cache_dir=cache)
    assert second.cache_hit and second.cache_file == first.cache_file
    assert permcache.cache_files(cache) == [younger, Path(first.cache_file)]
