"""permute_file and the permute/spec commands: streamed, bit-exact, refusing bad input before writing."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lib_rebasin.anatomy import ArchitectureError
from lib_rebasin.checkpoint import CheckpointError, save_state_dict
from lib_rebasin.cli import main
from lib_rebasin.config import sdxl_preset
from lib_rebasin.layout import CLIP_G, CLIP_L, UNET, VAE
from lib_rebasin.permute import permute_file, reorder, spec_for_checkpoint
from lib_rebasin.progress import Cancelled, Monitor
from lib_rebasin.spec.core import apply_to_state_dict, invert, random_permutations
from lib_rebasin.spec.sdxl import SPEC_VERSION, describe_spec, sdxl_spec
from lib_rebasin.synthetic import MARKER_KEYS, synthetic_shapes, write_synthetic


def load(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def permuted(tiny_a, tmp_path_factory):
    return permute_file(tiny_a, tmp_path_factory.mktemp("permute") / "p.safetensors", 21)


def test_permuted_file_is_the_spec_applied_to_the_input(tiny_a, permuted):
    original, result = load(tiny_a), load(permuted.path)
    with safe_open(tiny_a, "pt") as a, safe_open(permuted.path, "pt") as b:
        assert list(a.keys()) == list(b.keys())
        assert b.metadata()["modelspec.title"] == a.metadata()["modelspec.title"]
        note = json.loads(b.metadata()["lib_rebasin.permuted"])
    assert note == {"spec_version": SPEC_VERSION, "seed": 21, "components": ["clip_g", "clip_l", "unet"]}
    spec = sdxl_spec(sdxl_preset("tiny"))
    expected = apply_to_state_dict(spec, original, random_permutations(spec, 21))
    assert all(same_bits(result[k], expected[k]) for k in original)
    changed = {k for k in original if not same_bits(original[k], result[k])}
    assert changed == set(permuted.permuted_keys) == spec.keys()
    untouched = [k for k in original if k.startswith(VAE) or k in MARKER_KEYS]
    untouched += [CLIP_L + "embeddings.position_ids", CLIP_G + "logit_scale", UNET + "out.2.bias"]
    assert all(k in permuted.spec.passthrough for k in untouched)
    assert result[CLIP_L + "embeddings.position_ids"].dtype == torch.int64


def test_inverse_permutations_restore_the_input_bit_for_bit(tiny_a, permuted, tmp_path):
    back = permute_file(permuted.path, tmp_path / "back.safetensors", invert(permuted.permutations))
    original, restored = load(tiny_a), load(back.path)
    assert all(same_bits(original[k], restored[k]) for k in original)


def test_reorder_moves_any_dtype_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=g) * 3
    rows, cols = torch.randperm(6, generator=g), torch.randperm(5, generator=g)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
                  torch.float8_e5m2):
        t = values.to(dtype)
        expected = t.to(torch.float64)[rows][:, cols].to(dtype)
        assert same_bits(reorder(t, [(0, rows), (1, cols)]), expected)


class ShapesOnly:
    """A checkpoint as spec_for_checkpoint sees it (path, keys, shapes), without tensors."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.path, self.shapes = "full.safetensors", shapes

    def keys(self) -> list[str]:
        return list(self.shapes)


def test_full_scale_file_gets_the_full_spec():
    shapes = {k: tuple(s) for k, s in synthetic_shapes("full", markers=True).items()}
    spec = spec_for_checkpoint(ShapesOnly(shapes))
    assert describe_spec(spec)["kinds"] == describe_spec(sdxl_spec(sdxl_preset("full")))["kinds"]
    assert spec.passthrough == set(shapes) - spec.keys() and set(MARKER_KEYS) <= spec.passthrough


def test_unet_only_file(tmp_path):
    src = write_synthetic(tmp_path / "unet.safetensors", scale="tiny", seed=3, unet_only=True)
    result = permute_file(src, tmp_path / "p.safetensors", 1)
    assert {g.split(".")[0] for g in result.spec.groups} == {"unet"}
    with pytest.raises(ArchitectureError, match="has no clip_l"):
        permute_file(src, tmp_path / "q.safetensors", 1, components=("unet", "clip_l"))
    assert not (tmp_path / "q.safetensors").exists()


def test_text_encoders_left_alone_stay_bit_identical(tiny_a, tmp_path):
    result = permute_file(tiny_a, tmp_path / "u.safetensors", 2, components="unet")
    original, out = load(tiny_a), load(result.path)
    assert all(same_bits(original[k], out[k]) for k in original if not k.startswith(UNET))
    changed = {k for k in original if not same_bits(original[k], out[k])}
    assert changed == {k for k in original if k.startswith(UNET)} - {UNET + "out.2.bias"}


def test_bad_requests_are_refused_before_writing(tiny_a, tmp_path):
    out = tmp_path / "out.safetensors"
    spec = sdxl_spec(sdxl_preset("tiny"))
    stream = "unet.residual:input_blocks.0"
    crossing = torch.arange(spec.groups[stream].size)
    crossing[[1, 2]] = crossing[[2, 1]]  # two channels of different GroupNorm groups
    cases = [
        (ValueError, "invalid permutation", dict(perms_or_seed={stream: crossing})),
        (ValueError, "does not have", dict(perms_or_seed={"unet.nonexistent": torch.arange(3)})),
        (ValueError, "components must be", dict(perms_or_seed=1, components="unet,vae")),
        (CheckpointError, "input", dict(dst=tiny_a, perms_or_seed=1, overwrite=True)),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            permute_file(tiny_a, kwargs.pop("dst", out), **kwargs)
        assert not out.exists()
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        permute_file(tiny_a, out, 1)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_non_sdxl_file_is_refused(tmp_path):
    sd15_like = tmp_path / "sd15.safetensors"
    save_state_dict(sd15_like, {UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768)})
    with pytest.raises(ArchitectureError, match="SD1.x"):
        permute_file(sd15_like, tmp_path / "out.safetensors", 1)
    assert not (tmp_path / "out.safetensors").exists()


def test_cancelling_leaves_nothing(tiny_a, tmp_path):
    reports = []
    monitor = Monitor(on_progress=lambda f, m: reports.append(f), is_cancelled=lambda: len(reports) > 50)
    with pytest.raises(Cancelled):
        permute_file(tiny_a, tmp_path / "out.safetensors", 1, monitor=monitor)
    assert list(tmp_path.iterdir()) == []


def test_permute_command(tiny_a, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["permute", str(tiny_a), str(out), "--seed", "5", "--components", "unet,clip_g"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "groups moved" in printed
    note = json.loads(safe_open(str(out), "pt").metadata()["lib_rebasin.permuted"])
    assert note["components"] == ["clip_g", "unet"] and note["seed"] == 5
    assert main(["permute", str(tiny_a), str(out), "--seed", "5"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["permute", str(tiny_a), str(tmp_path / "x.safetensors"), "--seed", "5", "--components", "vae"]) == 2
    assert "components must be" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_spec_command(tiny_a, capsys):
    assert main(["spec", str(tiny_a), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    expected = describe_spec(sdxl_spec(sdxl_preset("tiny")))
    assert described["kinds"] == expected["kinds"] and described["groups"] == expected["groups"] == 106
    assert described["passthrough_keys"] == expected["passthrough_keys"] + len(MARKER_KEYS)
    assert main(["spec", str(tiny_a), "--components", "clip_l"]) == 0
    text = capsys.readouterr().out
    assert "clip_l" in text and "heads" in text and "unet" not in text.split("\n", 2)[2]
