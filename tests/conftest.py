"""Shared fixtures: synthetic SDXL checkpoints built once per session (tiny scale unless a test asks more)."""
from __future__ import annotations

import pytest

from lib_rebasin.synthetic import write_synthetic


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def tiny_a(synthetic_dir):
    """A tiny SDXL-topology checkpoint (fp16, with marker keys)."""
    return write_synthetic(synthetic_dir / "tiny_a.safetensors", scale="tiny", seed=1, markers=True)


@pytest.fixture(scope="session")
def tiny_b(synthetic_dir, tiny_a):
    """A same-base 'fine-tune' of tiny_a (1% drift)."""
    return write_synthetic(synthetic_dir / "tiny_b.safetensors", base=tiny_a, seed=2, drift=0.01)


@pytest.fixture(scope="session")
def tiny_c(synthetic_dir, tiny_a):
    """Another same-base 'fine-tune' of tiny_a (1% drift, another seed)."""
    return write_synthetic(synthetic_dir / "tiny_c.safetensors", base=tiny_a, seed=3, drift=0.01)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """lib_rebasin's caches (the inputs' sha256, …) go to a temporary folder, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIB_REBASIN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield
