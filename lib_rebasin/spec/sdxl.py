"""The exact permutation spec of an SDXL checkpoint (SGM layout), generated from its architecture config.

Every channel space that can be permuted without changing what the model computes becomes a group
(`../shared/reference/sdxl-symmetries.md` is the map).  The UNet is read through `layout.unet_blocks`, the
same descriptors that define its keys, so the spec follows any width/depth-scaled SDXL topology.

Tensor axes are described as *axes*: tuples of windows laid side by side, each a run of one group's positions
or of fixed channels.  A decoder concat is `h + skip`, a GEGLU projection `hidden + hidden`, a fused CLIP-G
`in_proj` `qk + qk + vo`, the cross-attention context `clip_l + clip_g`.  A handful of helpers (linear,
conv, norm, resblock, transformer, attention, geglu, text encoders) bind such axes to tensor keys; GroupNorm
readers record their partitions, and each GroupNorm-read group gets the structure that keeps every one of
them intact (including groups that straddle the `[h | skip]` boundary of a decoder concat).

`components` chooses whose own spaces may move.  A text encoder that is not among them has no groups, so
its residual stream stays the identity and the UNet columns that read it stay fixed.  A text encoder that
is among them carries the UNet's context columns (and, for CLIP-G, the pooled part of the ADM input) along
even when the UNet itself is not permuted: that is what keeps the whole model's function unchanged.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..config import GROUPNORM_GROUPS, HEAD_WIDTH, REFINER, SDXLConfig, TextEncoderConfig, UNetConfig
from ..layout import CLIP_L, UNET, Downsample, ResBlock, Transformer, Upsample, clip_g_prefix, sdxl_shapes, unet_blocks
from .core import FIXED, IN, OUT, PARAM, Binding, Group, Spec, heads_structure, structure_from_partitions

SPEC_VERSION = "sdxl-1"  # bump whenever the groups or their bindings change: cached permutations depend on it

COMPONENTS = ("unet", "clip_l", "clip_g")

# group kinds
RESIDUAL = "residual"                      # UNet residual streams; text-encoder residual streams
RESBLOCK_INNER = "resblock_inner"
EMBEDDING = "embedding"                    # time hidden, label hidden, embedding output
TRANSFORMER_STREAM = "transformer_stream"  # inside a SpatialTransformer (between proj_in and proj_out)
FF_HIDDEN = "ff_hidden"                    # GEGLU hidden, value and gate halves tied
HEADS = "heads"                            # one attention: head order, q/k and v/o inside each head
MLP_HIDDEN = "mlp_hidden"                  # text-encoder MLP hidden
POOLED = "pooled"                          # CLIP-G text_projection output = first columns of the ADM input


@dataclass(frozen=True)
class Window:
    """`width` consecutive positions of `group` from `group_offset`; with `group` None, fixed channels."""
    group: Group | None
    width: int
    group_offset: int = 0


Axis = tuple[Window, ...]


def fixed(width: int) -> Axis:
    return (Window(None, width),)


def axis_width(axis: Axis) -> int:
    return sum(w.width for w in axis)


def sub_axis(axis: Axis, offset: int, width: int) -> Axis:
    """Positions [offset, offset + width) of an axis, as windows."""
    out, start = [], 0
    for w in axis:
        lo, hi = max(offset, start), min(offset + width, start + w.width)
        if lo < hi:
            out.append(Window(w.group, hi - lo, w.group_offset + lo - start))
        start += w.width
    return tuple(out)


class SpecBuilder:
    """Collects groups, bindings, fixed windows and GroupNorm partitions; `build` makes the Spec."""

    def __init__(self, components: Iterable[str]):
        self.components = set(components)
        self.groups: dict[str, Group] = {}
        self.fixed: list[Binding] = []
        self.partitions: dict[str, list[set[int]]] = defaultdict(list)
        self.pinned: dict[str, list[range]] = defaultdict(list)

    def space(self, component: str, name: str, size: int, kind: str, structure=None) -> Axis:
        """A new channel space: a group if `component` is permuted, otherwise fixed channels."""
        if component not in self.components:
            return fixed(size)
        full_name = f"{component}.{name}"
        if full_name in self.groups:
            raise ValueError(f"duplicate group {full_name}")
        group = Group(full_name, size, kind, structure=structure)
        self.groups[full_name] = group
        return (Window(group, size),)

    def bind(self, key: str, axis: int, windows: Axis, role: str) -> None:
        offset = 0
        for w in windows:
            if w.group is None:
                self.fixed.append(Binding(key, axis, offset, w.width, role=FIXED))
            else:
                w.group.bindings.append(Binding(key, axis, offset, w.width, w.group_offset, role))
            offset += w.width

    def groupnorm(self, axis: Axis, num_groups: int = GROUPNORM_GROUPS) -> None:
        """Record the partition a GroupNorm over `axis` imposes on every group in it.

        A norm group that crosses a window edge (the `[h | skip]` straddle of a decoder concat) pins its
        part of each window: that part may be shuffled inside but must stay where it is."""
        width = axis_width(axis)
        if width % num_groups:
            raise ValueError(f"GroupNorm({num_groups}) over {width} channels")
        step = width // num_groups
        start = 0
        for w in axis:
            lo, hi = start, start + w.width
            start = hi
            if w.group is None:
                continue
            to_group = w.group_offset - lo
            cuts = {w.group_offset, w.group_offset + w.width}
            cuts |= {c + to_group for c in range(0, width + 1, step) if lo < c < hi}
            self.partitions[w.group.name].append(cuts)
            for cell in range(0, width, step):
                inside = range(max(cell, lo), min(cell + step, hi))
                if len(inside) and len(inside) < step:
                    self.pinned[w.group.name].append(range(inside.start + to_group, inside.stop + to_group))

    def build(self, all_keys: Iterable[str]) -> Spec:
        for name, cut_sets in self.partitions.items():
            group = self.groups[name]
            if group.structure is not None:
                raise ValueError(f"{name} has both a structure and GroupNorm readers")
            group.structure = structure_from_partitions(group.size, cut_sets, self.pinned[name])
        bound = {b.key for g in self.groups.values() for b in g.bindings}
        return Spec(groups=self.groups, passthrough=set(all_keys) - bound,
                    fixed=[b for b in self.fixed if b.key in bound])


# --- layer helpers -----------------------------------------------------------------------------------------

def linear(b: SpecBuilder, prefix: str, rows: Axis, cols: Axis, bias: bool = True) -> None:
    """A Linear (or a conv: same axes 0 and 1) `prefix.weight [rows, cols, ...]` and its bias."""
    b.bind(prefix + "weight", 0, rows, OUT)
    b.bind(prefix + "weight", 1, cols, IN)
    if bias:
        b.bind(prefix + "bias", 0, rows, PARAM)


conv = linear


def norm(b: SpecBuilder, prefix: str, axis: Axis, groupnorm: bool = False) -> None:
    """A LayerNorm (equivariant: free) or a GroupNorm(32) over `axis`: weight and bias follow the channels."""
    b.bind(prefix + "weight", 0, axis, PARAM)
    b.bind(prefix + "bias", 0, axis, PARAM)
    if groupnorm:
        b.groupnorm(axis)


def heads_space(b: SpecBuilder, component: str, name: str, width: int) -> tuple[Axis, Axis]:
    """The heads of one attention as (q/k axis, v/o axis): head order moves both, inside a head the q/k and
    v/o channels move independently."""
    heads = b.space(component, name, 2 * width, HEADS, heads_structure(width // HEAD_WIDTH, HEAD_WIDTH))
    return sub_axis(heads, 0, width), sub_axis(heads, width, width)


def attention(b: SpecBuilder, prefix: str, stream: Axis, kv_in: Axis, name: str) -> None:
    """UNet attention (to_q/to_k/to_v without bias, to_out.0 with)."""
    qk, vo = heads_space(b, "unet", name, axis_width(stream))
    linear(b, prefix + "to_q.", qk, stream, bias=False)
    linear(b, prefix + "to_k.", qk, kv_in, bias=False)
    linear(b, prefix + "to_v.", vo, kv_in, bias=False)
    linear(b, prefix + "to_out.0.", stream, vo)


def geglu(b: SpecBuilder, prefix: str, stream: Axis, name: str) -> None:
    """GEGLU feed-forward: `net.0.proj` rows are [value | gate], both halves carry the same hidden channels."""
    hidden = b.space("unet", name, 4 * axis_width(stream), FF_HIDDEN)
    linear(b, prefix + "net.0.proj.", hidden + hidden, stream)
    linear(b, prefix + "net.2.", stream, hidden)


def transformer(b: SpecBuilder, t: Transformer, stream: Axis, context: Axis) -> None:
    """SpatialTransformer: GroupNorm + linear proj_in into its own stream, LayerNorm blocks, proj_out back."""
    p, where = UNET + t.prefix, t.prefix.rstrip(".")
    inner = b.space("unet", f"{TRANSFORMER_STREAM}:{where}", t.width, TRANSFORMER_STREAM)
    norm(b, p + "norm.", stream, groupnorm=True)
    linear(b, p + "proj_in.", inner, stream)
    for i in range(t.depth):
        q = f"{p}transformer_blocks.{i}."
        block = f"{where}.transformer_blocks.{i}"
        norm(b, q + "norm1.", inner)
        attention(b, q + "attn1.", inner, inner, f"{HEADS}:{block}.attn1")
        norm(b, q + "norm2.", inner)
        attention(b, q + "attn2.", inner, context, f"{HEADS}:{block}.attn2")
        norm(b, q + "norm3.", inner)
        geglu(b, q + "ff.", inner, f"{FF_HIDDEN}:{block}")
    linear(b, p + "proj_out.", stream, inner)


def resblock(b: SpecBuilder, r: ResBlock, inp: Axis, emb: Axis) -> Axis:
    """ResBlock: GN → conv into its inner space (plus the embedding projection), GN → conv back; a skip conv
    (when widths differ) starts a new residual stream.  Returns the output stream."""
    p, where = UNET + r.prefix, r.prefix.rstrip(".")
    inner = b.space("unet", f"{RESBLOCK_INNER}:{where}", r.c_out, RESBLOCK_INNER)
    norm(b, p + "in_layers.0.", inp, groupnorm=True)
    conv(b, p + "in_layers.2.", inner, inp)
    linear(b, p + "emb_layers.1.", inner, emb)
    norm(b, p + "out_layers.0.", inner, groupnorm=True)
    if r.has_skip_conv:
        out = b.space("unet", f"{RESIDUAL}:{where}", r.c_out, RESIDUAL)
        conv(b, p + "skip_connection.", out, inp)
    elif r.skip_from:
        raise ValueError(f"{r.prefix}: a concat input needs a skip conv")
    else:
        out = inp
    conv(b, p + "out_layers.3.", out, inner)
    return out


def block_of(prefix: str) -> str:
    """'input_blocks.4.1.' -> 'input_blocks.4' (the unit whose output the skip stack records)."""
    return ".".join(prefix.split(".")[:2])


def unet(b: SpecBuilder, cfg: UNetConfig, context: Axis, adm: Axis) -> None:
    if axis_width(context) != cfg.context_dim or axis_width(adm) != cfg.adm_in:
        raise ValueError("context/ADM axes do not match the UNet config")
    p = UNET
    emb_width = cfg.time_embed_dim
    time_hidden = b.space("unet", f"{EMBEDDING}:time_embed", emb_width, EMBEDDING)
    label_hidden = b.space("unet", f"{EMBEDDING}:label_emb", emb_width, EMBEDDING)
    emb = b.space("unet", f"{EMBEDDING}:emb", emb_width, EMBEDDING)
    linear(b, p + "time_embed.0.", time_hidden, fixed(cfg.model_channels))  # sinusoidal timestep: fixed
    linear(b, p + "time_embed.2.", emb, time_hidden)
    linear(b, p + "label_emb.0.0.", label_hidden, adm)
    linear(b, p + "label_emb.0.2.", emb, label_hidden)

    stream = b.space("unet", f"{RESIDUAL}:input_blocks.0", cfg.model_channels, RESIDUAL)
    conv(b, p + "input_blocks.0.0.", stream, fixed(cfg.in_channels))
    outputs = {"input_blocks.0": stream}
    for block in unet_blocks(cfg):
        if isinstance(block, ResBlock):
            inp = stream + outputs[block.skip_from] if block.skip_from else stream
            stream = resblock(b, block, inp, emb)
        elif isinstance(block, Transformer):
            transformer(b, block, stream, context)
        elif isinstance(block, (Downsample, Upsample)):
            new = b.space("unet", f"{RESIDUAL}:{block.prefix.rstrip('.')}", block.width, RESIDUAL)
            conv(b, UNET + block.prefix + ("op." if isinstance(block, Downsample) else "conv."), new, stream)
            stream = new
        outputs[block_of(block.prefix)] = stream
    norm(b, p + "out.0.", stream, groupnorm=True)
    conv(b, p + "out.2.", fixed(cfg.out_channels), stream)


def text_attention(b: SpecBuilder, component: str, prefix: str, stream: Axis, layer: int,
                   fused: bool) -> None:
    qk, vo = heads_space(b, component, f"{HEADS}:{layer}", axis_width(stream))
    if fused:  # open_clip nn.MultiheadAttention: in_proj = [q | k | v] rows
        linear(b, prefix + "in_proj_", qk + qk + vo, stream)
        linear(b, prefix + "out_proj.", stream, vo)
    else:
        for proj, rows in (("q_proj.", qk), ("k_proj.", qk), ("v_proj.", vo)):
            linear(b, prefix + proj, rows, stream)
        linear(b, prefix + "out_proj.", stream, vo)


def mlp(b: SpecBuilder, component: str, prefix: str, names: tuple[str, str], stream: Axis,
        cfg: TextEncoderConfig, layer: int) -> None:
    hidden = b.space(component, f"{MLP_HIDDEN}:{layer}", cfg.mlp_width, MLP_HIDDEN)
    linear(b, prefix + names[0], hidden, stream)
    linear(b, prefix + names[1], stream, hidden)


def embeddings(b: SpecBuilder, token_key: str, position_key: str, stream: Axis, cfg: TextEncoderConfig) -> None:
    """Token and position embeddings produce the residual stream; vocabulary and positions are fixed."""
    for key, rows in ((token_key, cfg.vocab), (position_key, cfg.positions)):
        b.bind(key, 0, fixed(rows), FIXED)
        b.bind(key, 1, stream, OUT)


def clip_l(b: SpecBuilder, cfg: TextEncoderConfig) -> Axis:
    """CLIP-L (HF layout).  Returns its residual stream (what the UNet context reads)."""
    p = CLIP_L
    stream = b.space("clip_l", RESIDUAL, cfg.width, RESIDUAL)
    embeddings(b, p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight", stream, cfg)
    for i in range(cfg.layers):
        q = f"{p}encoder.layers.{i}."
        norm(b, q + "layer_norm1.", stream)
        text_attention(b, "clip_l", q + "self_attn.", stream, i, fused=False)
        norm(b, q + "layer_norm2.", stream)
        mlp(b, "clip_l", q + "mlp.", ("fc1.", "fc2."), stream, cfg, i)
    norm(b, p + "final_layer_norm.", stream)
    return stream


def clip_g(b: SpecBuilder, cfg: TextEncoderConfig, p: str) -> tuple[Axis, Axis]:
    """CLIP-G (OpenCLIP layout) under prefix `p`.  Returns its residual stream and the pooled output space."""
    stream = b.space("clip_g", RESIDUAL, cfg.width, RESIDUAL)
    embeddings(b, p + "token_embedding.weight", p + "positional_embedding", stream, cfg)
    for i in range(cfg.layers):
        q = f"{p}transformer.resblocks.{i}."
        norm(b, q + "ln_1.", stream)
        text_attention(b, "clip_g", q + "attn.", stream, i, fused=True)
        norm(b, q + "ln_2.", stream)
        mlp(b, "clip_g", q + "mlp.", ("c_fc.", "c_proj."), stream, cfg, i)
    norm(b, p + "ln_final.", stream)
    pooled = b.space("clip_g", POOLED, cfg.projection or cfg.width, POOLED)
    b.bind(p + "text_projection", 0, stream, IN)  # used as x @ text_projection
    b.bind(p + "text_projection", 1, pooled, OUT)
    return stream, pooled


def lay_out(total: int, parts: Sequence[Axis | None]) -> Axis:
    """Known axes side by side; the unknown parts (None: a component the config lacks) share the remaining
    width as one run of fixed channels."""
    known = sum(axis_width(a) for a in parts if a is not None)
    out: Axis = ()
    for i, axis in enumerate(parts):
        if axis is not None:
            out += axis
        elif None not in parts[:i]:
            out += fixed(total - known)
    if axis_width(out) != total:
        raise ValueError(f"parts of width {known} do not fit {total} channels")
    return out


def sdxl_spec(config: SDXLConfig, components: Iterable[str] = COMPONENTS) -> Spec:
    """The permutation spec of an SDXL checkpoint with this config.

    `components`: whose channel spaces may move (any of 'unet', 'clip_l', 'clip_g'; those absent from the
    config are skipped).  Keys without a permuted axis, the VAE's included, are in `spec.passthrough`."""
    components = tuple(components)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}: choose from {', '.join(COMPONENTS)}")
    b = SpecBuilder(c for c in components if c == "unet" or getattr(config, c) is not None)
    u = config.unet
    l_stream = clip_l(b, config.clip_l) if config.clip_l else None
    g_stream, pooled = clip_g(b, config.clip_g, clip_g_prefix(config.kind)) if config.clip_g else (None, None)
    context = lay_out(u.context_dim, [g_stream] if config.kind == REFINER else [l_stream, g_stream])
    adm = lay_out(u.adm_in, [pooled, None])  # [pooled CLIP-G | size/crop embeddings (fixed)]
    unet(b, u, context, adm)
    return b.build(sdxl_shapes(config))


# --- description -------------------------------------------------------------------------------------------

def component_of(group: Group) -> str:
    return group.name.split(".", 1)[0]


def log10_permutations(group: Group) -> float:
    """log10 of the number of valid permutations of the group (its symmetry, in decimal digits)."""
    s = group.effective_structure()
    inner = sum(math.lgamma(len(a) + 1) for a in s.atoms)
    outer = sum(math.lgamma(n + 1) for n in Counter(s.classes).values())
    return (inner + outer) / math.log(10)


def structure_summary(group: Group) -> dict:
    if group.structure is None:
        return {"free": True}
    s = group.structure
    class_sizes = Counter(s.classes)
    return {
        "superblocks": len(s.blocks),
        "atoms": len(s.atoms),
        "atom_widths": sorted({len(a) for a in s.atoms}),
        "interchangeable_superblocks": sum(n for n in class_sizes.values() if n > 1),
        "fixed_superblocks": sum(1 for n in class_sizes.values() if n == 1),
    }


def describe_spec(spec: Spec) -> dict:
    """Groups by component and kind: counts, sizes, structure, symmetry; plus key coverage."""
    by_kind: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in spec.groups.values():
        by_kind[(component_of(group), group.kind)].append(group)
    kinds = []
    for (component, kind), groups in sorted(by_kind.items()):
        structures = [structure_summary(g) for g in groups]
        structured = [s for s in structures if not s.get("free")]
        kinds.append({
            "component": component,
            "kind": kind,
            "groups": len(groups),
            "sizes": {str(size): n for size, n in sorted(Counter(g.size for g in groups).items())},
            "free": len(groups) - len(structured),
            "structured": len(structured),
            "superblocks": sum(s["superblocks"] for s in structured),
            "atoms": sum(s["atoms"] for s in structured),
            "atom_widths": sorted({w for s in structured for w in s["atom_widths"]}),
            "fixed_superblocks": sum(s["fixed_superblocks"] for s in structured),
            "bindings": sum(len(g.bindings) for g in groups),
            "log10_permutations": round(sum(log10_permutations(g) for g in groups), 1),
        })
    return {
        "spec_version": SPEC_VERSION,
        "groups": len(spec.groups),
        "components": sorted({component_of(g) for g in spec.groups.values()}),
        "permuted_keys": len(spec.keys()),
        "passthrough_keys": len(spec.passthrough),
        "fixed_windows": len(spec.fixed),
        "kinds": kinds,
    }
