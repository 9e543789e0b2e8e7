"""The spec is exact, proven by code we did not write.

A tiny width-scaled SDXL (64-channel heads, 32 GroupNorm groups, decoder concats whose GroupNorm groups straddle
`[h | skip]`) and randomly permuted copies of it are converted with diffusers' own single-file converters and
run through diffusers' UNet2DConditionModel and transformers' CLIP text models with SDXL's conditioning, in
fp64: a valid permutation leaves every output equal to rounding.  Deliberately wrong permutations — each one a
mistake published SD re-basin specs make — are caught by the same comparison.
"""
from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch

from lib_rebasin.checkpoint import save_state_dict
from lib_rebasin.cli import main
from lib_rebasin.config import GROUPNORM_GROUPS, HEAD_WIDTH
from lib_rebasin.layout import CLIP_G, CLIP_L, UNET, ResBlock, unet_blocks
from lib_rebasin.spec.core import apply_to_state_dict, random_permutations
from lib_rebasin.spec.sdxl import sdxl_spec
from oracle import max_relative_error, oracle_config, random_inputs, random_state_dict, run, single_thread

EXACT = 1e-9    # valid permutations: outputs equal within this relative error (fp64 rounding is ~1e-15)
CAUGHT = 1e-6   # a wrong permutation must move some output by more than this (measured: 2e-3 .. 5e-1)

CONFIG = oracle_config("tiny")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model(one_thread):
    state = random_state_dict(CONFIG, seed=0)
    inputs = random_inputs(CONFIG, seed=0, latent_size=8)
    return state, inputs, run(state, CONFIG, inputs)


def error_of(model, state) -> float:
    original, inputs, reference = model
    return max_relative_error(reference, run(state, CONFIG, inputs))


def changed_fraction(before: dict, after: dict) -> float:
    floats = [k for k, t in before.items() if t.is_floating_point()]
    return sum(not torch.equal(before[k], after[k]) for k in floats) / len(floats)


def test_the_model_has_straddling_decoder_concats():
    straddling = [b.prefix for b in unet_blocks(CONFIG.unet) if isinstance(b, ResBlock) and b.skip_from
                  and (b.c_in - b.skip_width) % (b.c_in // GROUPNORM_GROUPS)]
    assert len(straddling) == 4  # [2C | C] concats: the last decoder block of levels 2 and 1, the first of 1 and 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_valid_permutations_compute_the_same_outputs(model, seed):
    state = model[0]
    spec = sdxl_spec(CONFIG)
    permuted = apply_to_state_dict(spec, state, random_permutations(spec, seed))
    assert changed_fraction(state, permuted) >= 0.9
    assert error_of(model, permuted) <= EXACT


@pytest.mark.parametrize("components", [("unet",), ("clip_l",), ("clip_g",), ("clip_l", "clip_g")])
def test_a_subset_of_components_is_exact_and_leaves_the_rest_alone(model, components):
    state = model[0]
    spec = sdxl_spec(CONFIG, components)
    permuted = apply_to_state_dict(spec, state, random_permutations(spec, 4))
    prefixes = tuple(p for c, p in (("unet", UNET), ("clip_l", CLIP_L), ("clip_g", CLIP_G)) if c in components)
    couplings = {"clip_l": ("attn2.to_k.weight", "attn2.to_v.weight"),
                 "clip_g": ("attn2.to_k.weight", "attn2.to_v.weight", "label_emb.0.0.weight")}
    carried = tuple(k for c in components for k in couplings.get(c, ()))
    changed = {k for k in state if not torch.equal(state[k], permuted[k])}
    assert changed and all(k.startswith(prefixes) or k.startswith(UNET) and k.endswith(carried) for k in changed)
    assert all(any(k.startswith(p) for k in changed) for p in prefixes)
    assert error_of(model, permuted) <= EXACT


def test_the_permute_command_writes_a_file_that_computes_the_same(model, tmp_path):
    state = model[0]
    src, dst = tmp_path / "model.safetensors", tmp_path / "permuted.safetensors"
    save_state_dict(src, state)
    assert main(["permute", str(src), str(dst), "--seed", "8"]) == 0
    permuted = safetensors.torch.load_file(dst)
    spec = sdxl_spec(CONFIG)
    expected = apply_to_state_dict(spec, state, random_permutations(spec, 8))
    assert all(torch.equal(permuted[k], expected[k]) for k in state)
    assert error_of(model, permuted) <= EXACT


# --- negative controls: each is a mistake a spec can make; the same comparison must catch it -------------------

def without_bindings(spec, group: str, drop) -> object:
    """A copy of the spec in which `group` forgets the bindings `drop` selects."""
    spec = copy.deepcopy(spec)
    kept = [b for b in spec.groups[group].bindings if not drop(b)]
    assert len(kept) < len(spec.groups[group].bindings)
    spec.groups[group].bindings = kept
    return spec


def swapped(perm: torch.Tensor, i: int, j: int) -> torch.Tensor:
    perm = perm.clone()
    perm[[i, j]] = perm[[j, i]]
    return perm


FIRST_FF = "unet.ff_hidden:input_blocks.4.1.transformer_blocks.0"
FIRST_ATTN = "unet.heads:input_blocks.4.1.transformer_blocks.0.attn1"


def concat_only_swap(spec) -> tuple[str, int]:
    """A channel pair of a decoder stream that shares a group in every GroupNorm of its own width but sits
    on both sides of a group edge of the straddling concat that reads it: (group name, first channel)."""
    for block in unet_blocks(CONFIG.unet):
        if not (isinstance(block, ResBlock) and block.skip_from):
            continue
        h = block.c_in - block.skip_width
        concat_step, own_step = block.c_in // GROUPNORM_GROUPS, h // GROUPNORM_GROUPS
        for cut in range(concat_step, h, concat_step):
            if cut % own_step:
                key = UNET + block.prefix + "in_layers.2.weight"
                group = next(g for g, b in spec.by_key()[key] if b.axis == 1 and b.offset == 0)
                return group.name, cut - 1
    raise AssertionError("no decoder concat splits a group of its h stream")


def wrong_permutations(spec, perms):
    """(name, spec, permutations) for each mistake."""
    ff_width = spec.groups[FIRST_FF].size
    yield "GEGLU gate half left alone", without_bindings(
        spec, FIRST_FF, lambda b: b.key.endswith(("net.0.proj.weight", "net.0.proj.bias")) and b.offset == ff_width
    ), perms
    heads = spec.groups[FIRST_ATTN]
    width = heads.size // 2
    heads_swapped = torch.cat([torch.arange(HEAD_WIDTH, 2 * HEAD_WIDTH), torch.arange(HEAD_WIDTH),
                               torch.arange(2 * HEAD_WIDTH, width)])
    heads_swapped = torch.cat([heads_swapped, heads_swapped + width])
    yield "two heads' q swapped without k", without_bindings(
        spec, FIRST_ATTN, lambda b: b.key.endswith("attn1.to_k.weight")), {FIRST_ATTN: heads_swapped}
    yield "a q/k channel moved across a head boundary", spec, {
        FIRST_ATTN: swapped(torch.arange(heads.size), HEAD_WIDTH - 1, HEAD_WIDTH)}
    stream = "unet.residual:input_blocks.0"
    own_step = spec.groups[stream].size // GROUPNORM_GROUPS
    yield "GroupNorm: two channels of different groups swapped", spec, {
        stream: swapped(torch.arange(spec.groups[stream].size), own_step - 1, own_step)}
    name, channel = concat_only_swap(spec)
    yield "GroupNorm: a swap only the straddling decoder concat forbids", spec, {
        name: swapped(torch.arange(spec.groups[name].size), channel, channel + 1)}
    yield "ResBlock embedding projection not following the inner space", without_bindings(
        spec, "unet.resblock_inner:input_blocks.1.0", lambda b: "emb_layers" in b.key), perms
    yield "CLIP-G stream not carried into the UNet context", without_bindings(
        spec, "clip_g.residual", lambda b: b.key.startswith(UNET)), perms
    yield "pooled CLIP-G output not carried into the ADM input", without_bindings(
        spec, "clip_g.pooled", lambda b: b.key.startswith(UNET)), perms
    yield "text_projection rows not following the CLIP-G stream", without_bindings(
        spec, "clip_g.residual", lambda b: b.key.endswith("text_projection")), perms
    yield "CLIP-L final LayerNorm not following its stream", without_bindings(
        spec, "clip_l.residual", lambda b: "final_layer_norm" in b.key), perms


CONTROLS = [name for name, _, _ in wrong_permutations(sdxl_spec(CONFIG), random_permutations(sdxl_spec(CONFIG), 0))]


@pytest.mark.parametrize("control", CONTROLS)
def test_wrong_permutations_are_caught(model, control):
    spec = sdxl_spec(CONFIG)
    perms = random_permutations(spec, 9)
    _, wrong_spec, wrong_perms = next(c for c in wrong_permutations(spec, perms) if c[0] == control)
    permuted = apply_to_state_dict(wrong_spec, model[0], wrong_perms)
    assert error_of(model, permuted) > CAUGHT
