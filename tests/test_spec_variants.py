"""The spec stays exact on every kind of SDXL file people have, proven by diffusers and transformers.

Each case is a synthetic file of one variant (pruned text encoders, no optional keys, the refiner, an
inpainting UNet, and their combinations), read back through `anatomy` and permuted by the `permute` command.
Both files are run through diffusers' UNet and transformers' CLIP models in fp64 the way a webui loads them
(keys the file lacks are zeros): a valid permutation leaves every output equal to rounding.  A deliberately
broken spec (the CLIP-G stream not carried into the UNet's context) is caught on the same files.
"""
from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch

from lib_rebasin.anatomy import analyse, ema_key
from lib_rebasin.cli import main
from lib_rebasin.config import REFINER
from lib_rebasin.layout import UNET, last_layer_keys, optional_keys, sdxl_shapes
from lib_rebasin.permute import spec_for_models
from lib_rebasin.checkpoint import Checkpoint
from lib_rebasin.spec.core import apply_to_state_dict, random_permutations
from lib_rebasin.spec.sdxl import sdxl_spec
from lib_rebasin.synthetic import write_synthetic
from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
from oracle import (max_relative_error, meta_state_dict, oracle_config, random_inputs, run, sgm_original_config,
                    single_thread, to_diffusers, zero_filled)

EXACT = 1e-9
CAUGHT = 1e-6

CASES = {  # variants -> (oracle config, what the file lacks)
    "pruned": (oracle_config("tiny"), "last"),
    "no-optional": (oracle_config("tiny"), "optional"),
    "pruned,no-optional,no-vae": (oracle_config("tiny"), "all"),
    "refiner": (oracle_config("tiny", REFINER), None),
    "refiner,pruned,no-optional": (oracle_config("tiny", REFINER), "all"),
    "inpaint": (oracle_config("tiny", in_channels=9), None),
    "inpaint,pruned,ema,vpred,schedule": (oracle_config("tiny", in_channels=9), "last"),
    "mixed-dtype,partial-vae": (oracle_config("tiny"), None),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def load64(path) -> dict[str, torch.Tensor]:
    """The UNet and text-encoder tensors of a file, floats in fp64."""
    tensors = safetensors.torch.load_file(str(path))
    return {k: t.double() if t.is_floating_point() else t for k, t in tensors.items()
            if k.startswith(("model.diffusion_model.", "conditioner."))}


def lacking(config, what: str | None) -> set[str]:
    last = {k for keys in last_layer_keys(config).values() for k in keys}
    return {"last": last, "optional": set(optional_keys(config)) - last, "all": set(optional_keys(config)),
            None: set()}[what]


@pytest.fixture(scope="module")
def permuted_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variants")
    out = {}
    for index, variants in enumerate(CASES):
        src = write_synthetic(folder / f"m{index}.safetensors", scale="tiny", seed=10 + index, variants=variants)
        dst = folder / f"p{index}.safetensors"
        assert main(["permute", src, str(dst), "--seed", str(index + 1)]) == 0
        out[variants] = (src, dst)
    return out


@pytest.mark.parametrize("variants", list(CASES))
def test_the_file_is_read_as_the_config_it_was_made_from(permuted_files, variants):
    config, what = CASES[variants]
    src, _ = permuted_files[variants]
    with Checkpoint(src) as ckpt:
        anatomy = analyse(ckpt.shapes)
    assert anatomy.config is not None, anatomy.config_error
    assert anatomy.config.kind == config.kind and anatomy.config.unet == config.unet
    assert (anatomy.config.clip_l, anatomy.config.clip_g) == (config.clip_l, config.clip_g)
    assert set(anatomy.absent) == lacking(config, what)


@pytest.mark.parametrize("variants", list(CASES))
def test_permute_on_every_variant_computes_the_same(permuted_files, variants):
    config, what = CASES[variants]
    src, dst = permuted_files[variants]
    original, permuted = load64(src), load64(dst)
    assert original.keys() == permuted.keys()
    assert not lacking(config, what) & original.keys()
    floats = [k for k, t in original.items() if t.is_floating_point()]
    changed = sum(not torch.equal(original[k], permuted[k]) for k in floats) / len(floats)
    assert changed > 0.9
    inputs = random_inputs(config, seed=0, latent_size=8)
    reference = run(zero_filled(original, config), config, inputs)
    assert max_relative_error(reference, run(zero_filled(permuted, config), config, inputs)) <= EXACT
    if "ema" in variants:  # the synthetic EMA copy equals its weight, and moves with it
        written = safetensors.torch.load_file(str(dst))
        twins = [k for k in original if k.startswith(UNET) and ema_key(k) in written]
        assert twins and all(torch.equal(written[ema_key(k)], written[k]) for k in twins)


@pytest.mark.parametrize("variants", ["refiner", "pruned,no-optional,no-vae"])
def test_a_broken_spec_is_caught_on_the_variant(permuted_files, variants):
    config, _ = CASES[variants]
    src, _ = permuted_files[variants]
    original = load64(src)
    with Checkpoint(src) as ckpt:
        spec = copy.deepcopy(spec_for_models([ckpt]))
    group = spec.groups["clip_g.residual"]
    group.bindings = [b for b in group.bindings if not b.key.startswith(UNET)]
    broken = apply_to_state_dict(spec, original, random_permutations(spec, 5))
    inputs = random_inputs(config, seed=0, latent_size=8)
    reference = run(zero_filled(original, config), config, inputs)
    assert max_relative_error(reference, run(zero_filled(broken, config), config, inputs)) > CAUGHT


def test_a_key_only_one_file_has_is_moved_into_the_common_basis(tmp_path):
    """A pruned A and a full B: the spec of the pair binds B's last CLIP layers too, so permuting B with it
    still computes what B computes."""
    config = oracle_config("tiny")
    a = write_synthetic(tmp_path / "a.safetensors", scale="tiny", seed=1, variants="pruned,no-optional")
    b = write_synthetic(tmp_path / "b.safetensors", scale="tiny", seed=2)
    with Checkpoint(a) as ca, Checkpoint(b) as cb:
        spec = spec_for_models([ca, cb])
    last = {k for keys in last_layer_keys(config).values() for k in keys}
    assert last <= spec.keys()  # bound although A lacks them
    state = load64(b)
    permuted = apply_to_state_dict(spec, state, random_permutations(spec, 3))
    assert any(not torch.equal(state[k], permuted[k]) for k in last)
    inputs = random_inputs(config, seed=0, latent_size=8)
    assert max_relative_error(run(state, config, inputs), run(permuted, config, inputs)) <= EXACT


def test_the_full_size_refiner_layout_is_diffusers_refiner():
    """Our full-scale refiner: diffusers reads its SGM config as the published refiner and its keys load
    strictly into diffusers' and transformers' models (on the meta device)."""
    config = oracle_config("full", REFINER)
    diffusers_config = create_unet_diffusers_config_from_ldm(sgm_original_config(config.unet), {})
    assert diffusers_config["block_out_channels"] == [384, 768, 1536, 1536]
    assert diffusers_config["cross_attention_dim"] == 1280
    assert diffusers_config["projection_class_embeddings_input_dim"] == 2560
    assert diffusers_config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                    "DownBlock2D"]
    to_diffusers(meta_state_dict(config), config, device="meta")  # raises on any missing or extra key
    assert sdxl_spec(config).keys() <= set(sdxl_shapes(config))
