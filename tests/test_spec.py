"""Lints of the SDXL permutation spec: shape, coverage, fixed axes, and the structure every group must keep.

The structural checks do not trust the spec's own structures: they draw random valid permutations, turn them
into per-axis gather indices the way a checkpoint is permuted, and check each index against the architecture
(every GroupNorm group lands on a GroupNorm group, heads move as 64-wide wholes with q and k together, GEGLU
halves move together, fused q/k/v thirds agree).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from collections import Counter, defaultdict

import pytest
import torch

from lib_rebasin.config import GROUPNORM_GROUPS, HEAD_WIDTH, SDXLConfig, sdxl_preset
from lib_rebasin.layout import CLIP_G, CLIP_L, UNET, VAE, ResBlock, Transformer, sdxl_shapes, unet_blocks
from lib_rebasin.spec.core import (IN, OUT, apply_to_state_dict, axis_indices, compose, invert, is_valid,
                                   random_permutations)
from lib_rebasin.spec.sdxl import SPEC_VERSION, describe_spec, sdxl_spec

TINY = sdxl_preset("tiny")
FULL = sdxl_preset("full")
COMPONENT_SETS = [("unet", "clip_l", "clip_g"), ("unet",), ("clip_l",), ("clip_g",), ("clip_l", "clip_g"),
                  ("unet", "clip_g")]


@pytest.fixture(scope="module")
def full_spec():
    return sdxl_spec(FULL)


def component_counts(spec) -> Counter:
    return Counter((g.name.split(".")[0], g.kind) for g in spec.groups.values())


# --- the full-scale spec ------------------------------------------------------------------------------------

def test_full_scale_spec_has_every_space_of_the_reference(full_spec):
    assert component_counts(full_spec) == {
        ("unet", "residual"): 16, ("unet", "resblock_inner"): 17, ("unet", "embedding"): 3,
        ("unet", "transformer_stream"): 11, ("unet", "ff_hidden"): 70, ("unet", "heads"): 140,
        ("clip_l", "residual"): 1, ("clip_l", "heads"): 12, ("clip_l", "mlp_hidden"): 12,
        ("clip_g", "residual"): 1, ("clip_g", "heads"): 32, ("clip_g", "mlp_hidden"): 32, ("clip_g", "pooled"): 1,
    }
    groups = full_spec.groups.values()
    unet_heads = [g for g in groups if g.kind == "heads" and g.name.startswith("unet.")]
    assert sum(len(g.structure.blocks) for g in unet_heads) == 2600  # 10 heads at 640, 20 at 1280
    assert sum(len(g.structure.atoms) for g in unet_heads) == 5200   # a q/k and a v/o space per head
    assert Counter(g.size for g in groups if g.kind == "ff_hidden") == {2560: 10, 5120: 60}
    assert Counter(g.size for g in groups if g.kind == "residual" and g.name.startswith("unet.")) == \
        {320: 5, 640: 6, 1280: 5}
    assert {g.size for g in groups if g.kind == "embedding"} == {1280}
    assert full_spec.groups["clip_g.pooled"].size == 1280


def test_full_scale_spec_covers_every_key(full_spec):
    shapes = sdxl_shapes(FULL)
    assert full_spec.keys() | full_spec.passthrough == set(shapes)
    assert not full_spec.keys() & full_spec.passthrough
    assert full_spec.passthrough == {k for k in shapes if k.startswith(VAE)} | {
        CLIP_L + "embeddings.position_ids", CLIP_G + "logit_scale", UNET + "out.2.bias"}  # out.2.bias: latent


def test_straddling_decoder_concat_pins_its_boundary(full_spec):
    """`input_blocks.6` (after the second downsample, 640) is read by input_blocks.7's GroupNorm (20-wide
    groups) and, as the skip of output_blocks.2, at offset 1280 of a [1280 | 640] concat (60-wide groups):
    its first 40 channels share a group with h, the rest form ten 60-wide blocks of three 20-wide atoms."""
    s = full_spec.groups["unet.residual:input_blocks.6.0"].structure
    assert s.blocks[0] == (range(0, 20), range(20, 40))
    assert all(block == tuple(range(40 + 60 * i + 20 * k, 60 + 60 * i + 20 * k) for k in range(3))
               for i, block in enumerate(s.blocks[1:]))
    assert len(s.blocks) == 11
    assert s.classes.count(s.classes[0]) == 1 and len(set(s.classes[1:])) == 1
    h = full_spec.groups["unet.residual:output_blocks.1.0"].structure  # h of the same concat: last 20 pinned
    assert h.blocks[-1][-1] == range(1260, 1280) and h.classes.count(h.classes[-1]) == 1


def test_description_counts_and_is_json(full_spec):
    d = describe_spec(full_spec)
    json.dumps(d)
    assert d["spec_version"] == SPEC_VERSION and d["groups"] == 348
    kinds = {(k["component"], k["kind"]): k for k in d["kinds"]}
    assert kinds[("unet", "heads")]["superblocks"] == 2600
    assert kinds[("unet", "residual")]["structured"] == 16
    assert kinds[("unet", "transformer_stream")]["free"] == 11
    assert d["permuted_keys"] + d["passthrough_keys"] == len(sdxl_shapes(FULL))


# --- lints over several configs and component sets ---------------------------------------------------------

def spec_cases():
    unet_only = SDXLConfig(unet=TINY.unet, clip_l=None, clip_g=None, vae=None)
    cases = [pytest.param(FULL, c, id="full-" + "+".join(c)) for c in COMPONENT_SETS[:2]]
    cases += [pytest.param(TINY, c, id="tiny-" + "+".join(c)) for c in COMPONENT_SETS]
    cases += [pytest.param(sdxl_preset("small"), COMPONENT_SETS[0], id="small"),
              pytest.param(unet_only, ("unet", "clip_l", "clip_g"), id="tiny-unet-only-config")]
    return cases


@pytest.mark.parametrize("config, components", spec_cases())
def test_every_group_has_a_producer_and_a_consumer(config, components):
    spec = sdxl_spec(config, components)
    for group in spec.groups.values():
        roles = {b.role for b in group.bindings}
        assert OUT in roles and IN in roles, group.name


@pytest.mark.parametrize("config, components", spec_cases())
def test_windows_in_bounds_disjoint_and_channel_axes_complete(config, components):
    """Per key and axis, the group windows and fixed windows tile the axis without overlap; the channel axes
    (0, and 1 for matrices and convs) of every bound key are tiled completely, so nothing is forgotten."""
    spec = sdxl_spec(config, components)
    shapes = sdxl_shapes(config)
    windows = defaultdict(list)
    for group in spec.groups.values():
        for b in group.bindings:
            assert 0 <= b.group_offset and b.group_offset + b.width <= group.size, (group.name, b)
            windows[(b.key, b.axis)].append((b.offset, b.width))
    for b in spec.fixed:
        windows[(b.key, b.axis)].append((b.offset, b.width))
    for key in spec.keys():
        shape = shapes[key]
        for axis in range(min(len(shape), 2)):
            tiles = sorted(windows[(key, axis)])
            assert tiles, (key, axis)
            ends = [0] + [offset + width for offset, width in tiles]
            assert [offset for offset, _ in tiles] == ends[:-1] and ends[-1] == shape[axis], (key, axis, tiles)
    assert {k for k, _ in windows} <= spec.keys()


@pytest.mark.parametrize("config, components", spec_cases())
def test_every_key_is_covered_or_passed_through(config, components):
    spec = sdxl_spec(config, components)
    shapes = sdxl_shapes(config)
    assert spec.keys() | spec.passthrough == set(shapes) and not spec.keys() & spec.passthrough
    excluded = [prefix for name, prefix in (("unet", UNET), ("clip_l", CLIP_L), ("clip_g", CLIP_G))
                if name not in components]
    couplings = ("attn2.to_k.weight", "attn2.to_v.weight", "label_emb.0.0.weight")
    for key in spec.keys():  # keys of components left alone are bound only through a coupling
        if key.startswith(tuple(excluded)):
            assert key.startswith(UNET) and key.endswith(couplings), key


def fixed_windows(config: SDXLConfig, components) -> list[tuple[str, int, int, int]]:
    """(key, axis, start, stop) that no permutation may touch, written from the architecture."""
    u = config.unet
    out = [(UNET + "input_blocks.0.0.weight", 1, 0, u.in_channels),  # latent in
           (UNET + "out.2.weight", 0, 0, u.out_channels), (UNET + "out.2.bias", 0, 0, u.out_channels),
           (UNET + "time_embed.0.weight", 1, 0, u.model_channels)]   # sinusoidal timestep
    proj = config.clip_g.projection if config.clip_g else 0
    out.append((UNET + "label_emb.0.0.weight", 1, proj, u.adm_in))   # size/crop embeddings
    if "clip_g" not in components:
        out.append((UNET + "label_emb.0.0.weight", 1, 0, u.adm_in))
    for te, prefix, token, position in ((config.clip_l, CLIP_L, "embeddings.token_embedding.weight",
                                         "embeddings.position_embedding.weight"),
                                        (config.clip_g, CLIP_G, "token_embedding.weight", "positional_embedding")):
        if te:
            out += [(prefix + token, 0, 0, te.vocab), (prefix + position, 0, 0, te.positions)]
    g_width = config.clip_g.width if config.clip_g else 0
    l_width = u.context_dim - g_width  # the CLIP-L part of the context, [CLIP-L | CLIP-G]
    context = []
    if "clip_l" not in components or not config.clip_l:
        context.append((0, l_width))
    if "clip_g" not in components or not config.clip_g:
        context.append((l_width, u.context_dim))
    for key in sdxl_shapes(config):
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            out += [(key, 1, a, b) for a, b in context]
    return out


@pytest.mark.parametrize("config, components", spec_cases())
def test_no_fixed_axis_is_bound(config, components):
    spec = sdxl_spec(config, components)
    by_key = spec.by_key()
    for key, axis, start, stop in fixed_windows(config, components):
        for group, b in by_key.get(key, ()):
            if b.axis == axis:
                assert b.offset + b.width <= start or stop <= b.offset, (key, axis, group.name)


def source_index(permuted: torch.Tensor, axis: int) -> torch.Tensor:
    """For a permuted `tiny_state` tensor (values 0, 1, 2, ... in the original), the original position along
    `axis` of every element."""
    stride = math.prod(permuted.shape[axis + 1:])
    return (permuted.long() // stride) % permuted.shape[axis]


@pytest.mark.parametrize("components", COMPONENT_SETS[:4])
def test_fixed_axes_and_passthrough_keys_do_not_move(components):
    spec = sdxl_spec(TINY, components)
    state = tiny_state()
    permuted = apply_to_state_dict(spec, state, random_permutations(spec, 5))
    for key, axis, start, stop in fixed_windows(TINY, components):
        source = source_index(permuted[key], axis).narrow(axis, start, stop - start)
        shape = [1] * source.dim()
        shape[axis] = stop - start
        assert torch.equal(source, torch.arange(start, stop).reshape(shape).expand_as(source)), (key, axis)
    for key in spec.passthrough & state.keys():
        assert torch.equal(permuted[key], state[key])
    assert sum(not torch.equal(permuted[k], state[k]) for k in spec.keys()) == len(spec.keys())


def test_unknown_component_is_refused():
    with pytest.raises(ValueError, match="unknown components"):
        sdxl_spec(TINY, ("unet", "vae"))


# --- structure, checked against the architecture through the gather indices -------------------------------

_STATE: dict = {}


def tiny_state() -> dict[str, torch.Tensor]:
    """Distinct values per tensor (the identity of every element can be traced after permuting)."""
    if not _STATE:
        for key, shape in sdxl_shapes(replace(TINY, vae=None)).items():
            _STATE[key] = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    return _STATE


def gather(spec, key, axis, shape, perms) -> torch.Tensor:
    indices = dict(axis_indices(spec.by_key(), key, shape, perms))
    return indices.get(axis, torch.arange(shape[axis]))


def maps_blocks_onto_blocks(index: torch.Tensor, starts: list[int]) -> bool:
    """Each cell [starts[i], starts[i+1]) of the axis is filled from exactly one whole cell."""
    cells = list(zip(starts, starts[1:]))
    whole = {frozenset(range(a, b)) for a, b in cells}
    return all(frozenset(index[a:b].tolist()) in whole for a, b in cells)


def groupnorms(config: SDXLConfig):
    """(key, width) of every GroupNorm weight in the UNet, from the layout."""
    shapes = sdxl_shapes(config)
    for key, shape in shapes.items():
        if key == UNET + "out.0.weight" or key.startswith(UNET) and key.endswith(("in_layers.0.weight",
                                                                                 "out_layers.0.weight")):
            yield key, shape[0]
    for block in unet_blocks(config.unet):
        if isinstance(block, Transformer):
            yield UNET + block.prefix + "norm.weight", block.width


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_permutations_keep_every_groupnorm_group_whole(seed):
    spec = sdxl_spec(TINY)
    perms = random_permutations(spec, seed)
    shapes = sdxl_shapes(TINY)
    moved = 0
    for key, width in groupnorms(TINY):
        index = gather(spec, key, 0, shapes[key], perms)
        step = width // GROUPNORM_GROUPS
        assert maps_blocks_onto_blocks(index, list(range(0, width + 1, step))), key
        moved += not torch.equal(index, torch.arange(width))
    assert moved > 30  # and they do move


def test_decoder_concats_straddle_and_stay_exact():
    """The tiny preset has decoder concats whose GroupNorm groups straddle [h | skip]; valid permutations
    keep them whole (the test above) while both sides move."""
    straddling = [b for b in unet_blocks(TINY.unet) if isinstance(b, ResBlock) and b.skip_from
                  and (b.c_in - b.skip_width) % (b.c_in // GROUPNORM_GROUPS)]
    assert len(straddling) >= 2
    spec = sdxl_spec(TINY)
    perms = random_permutations(spec, 3)
    for block in straddling:
        key = UNET + block.prefix + "in_layers.2.weight"
        index = gather(spec, key, 1, sdxl_shapes(TINY)[key], perms)
        h = block.c_in - block.skip_width
        assert not torch.equal(index[:h], torch.arange(h)) and not torch.equal(index[h:], torch.arange(h, block.c_in))


@pytest.mark.parametrize("seed", [0, 1])
def test_heads_move_whole_with_q_and_k_together(seed):
    spec = sdxl_spec(TINY)
    perms = random_permutations(spec, seed)
    shapes = sdxl_shapes(TINY)
    attentions = {k.rsplit(".", 2)[0] for k in shapes if k.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))}
    assert attentions
    for attn in attentions:
        q, k, v = (gather(spec, f"{attn}.to_{n}.weight", 0, shapes[f"{attn}.to_{n}.weight"], perms) for n in "qkv")
        out = gather(spec, f"{attn}.to_out.0.weight", 1, shapes[f"{attn}.to_out.0.weight"], perms)
        width = len(q)
        heads = list(range(0, width + 1, HEAD_WIDTH))
        assert torch.equal(q, k) and torch.equal(v, out)
        assert maps_blocks_onto_blocks(q, heads) and maps_blocks_onto_blocks(v, heads)
        assert torch.equal(q[::HEAD_WIDTH] // HEAD_WIDTH, v[::HEAD_WIDTH] // HEAD_WIDTH)  # same head order


def test_clip_g_fused_in_proj_thirds_agree():
    spec = sdxl_spec(TINY)
    perms = random_permutations(spec, 4)
    w = TINY.clip_g.width
    for i in range(TINY.clip_g.layers):
        key = f"{CLIP_G}transformer.resblocks.{i}.attn.in_proj_weight"
        rows = gather(spec, key, 0, (3 * w, w), perms)
        bias = gather(spec, key.replace("weight", "bias"), 0, (3 * w,), perms)
        q, k, v = rows[:w], rows[w:2 * w] - w, rows[2 * w:] - 2 * w
        assert torch.equal(rows, bias) and torch.equal(q, k)
        assert maps_blocks_onto_blocks(q, list(range(0, w + 1, HEAD_WIDTH)))
        assert torch.equal(q[::HEAD_WIDTH] // HEAD_WIDTH, v[::HEAD_WIDTH] // HEAD_WIDTH)
        out = gather(spec, f"{CLIP_G}transformer.resblocks.{i}.attn.out_proj.weight", 1, (w, w), perms)
        assert torch.equal(out, v) and not torch.equal(q, torch.arange(w))


def test_geglu_halves_move_together():
    spec = sdxl_spec(TINY)
    perms = random_permutations(spec, 6)
    shapes = sdxl_shapes(TINY)
    keys = [k for k in shapes if k.endswith("ff.net.0.proj.weight")]
    assert keys
    for key in keys:
        rows = gather(spec, key, 0, shapes[key], perms)
        f = len(rows) // 2
        assert torch.equal(rows[f:] - f, rows[:f]) and not torch.equal(rows[:f], torch.arange(f))
        cols = gather(spec, key.replace("net.0.proj", "net.2"), 1, shapes[key.replace("net.0.proj", "net.2")], perms)
        assert torch.equal(cols, rows[:f])


def test_pooled_output_feeds_the_first_adm_columns():
    spec = sdxl_spec(TINY)
    perms = random_permutations(spec, 7)
    proj = TINY.clip_g.projection
    label = gather(spec, UNET + "label_emb.0.0.weight", 1, (TINY.unet.time_embed_dim, TINY.unet.adm_in), perms)
    text_proj = gather(spec, CLIP_G + "text_projection", 1, (TINY.clip_g.width, proj), perms)
    assert torch.equal(label[:proj], text_proj) and not torch.equal(text_proj, torch.arange(proj))
    assert torch.equal(label[proj:], torch.arange(proj, TINY.unet.adm_in))


# --- permutation algebra ---------------------------------------------------------------------------------------

def test_random_sets_are_valid_deterministic_and_invertible():
    spec = sdxl_spec(TINY)
    p, q = random_permutations(spec, 11), random_permutations(spec, 12)
    assert all(is_valid(spec.groups[name], perm) for name, perm in p.items())
    assert all(torch.equal(p[n], random_permutations(spec, 11)[n]) for n in p)
    state = {k: v for k, v in tiny_state().items() if v.numel() <= 2**16}  # most keys, a fraction of the bytes
    once = apply_to_state_dict(spec, state, p)
    assert all(not torch.equal(once[k], state[k]) for k in spec.keys() & state.keys())
    back = apply_to_state_dict(spec, once, invert(p))
    assert all(torch.equal(back[k], state[k]) for k in state)
    two_steps = apply_to_state_dict(spec, once, q)
    composed = apply_to_state_dict(spec, state, compose(p, q))
    assert all(torch.equal(two_steps[k], composed[k]) for k in state)
    assert all(is_valid(spec.groups[n], c) for n, c in compose(p, q).items())


def test_invalid_permutations_are_recognised():
    spec = sdxl_spec(TINY)
    stream = spec.groups["unet.residual:input_blocks.0"]  # 64 channels, GroupNorm groups of 2
    swap_across_groups = torch.arange(64)
    swap_across_groups[[1, 2]] = swap_across_groups[[2, 1]]
    swap_inside_group = torch.arange(64)
    swap_inside_group[[2, 3]] = swap_inside_group[[3, 2]]
    assert not is_valid(stream, swap_across_groups) and is_valid(stream, swap_inside_group)
    heads = spec.groups["clip_l.heads:0"]  # 2 heads of 64: [q/k | v/o]
    q_only = torch.arange(heads.size)
    q_only[:128] = torch.cat([torch.arange(64, 128), torch.arange(64)])
    both = q_only.clone()
    both[128:] = torch.cat([torch.arange(192, 256), torch.arange(128, 192)])
    assert not is_valid(heads, q_only) and is_valid(heads, both)
    assert not is_valid(heads, torch.arange(heads.size - 1))
