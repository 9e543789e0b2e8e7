"""The safety report of a merge: what the output holds, key by key and block by block.

Per key it records the largest finite |w| before the cast to the output dtype, NaN and ±inf counts, and whether
values exceed what the output dtype can hold; per UNet block and per component, the norm of the difference the
merge applies (‖B − A‖, or ‖B − C‖ for add difference) and the largest |w|.  `to_dict()` is plain JSON data
(no NaN or infinity anywhere in it), `format_report()` the text the CLI prints.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .anatomy import COMPONENT_LABELS, COMPONENTS
from .layout import UNET

DTYPE_LABELS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

# UNet blocks in forward order: anything not listed sorts by its name after these.
_BLOCK_ORDER = ("time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out")
_NUMBERED = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")


@dataclass
class TensorStats:
    """What one output tensor holds before its cast (diff_sq: squared norm of the merge's difference, if merged)."""
    max_abs: float = 0.0
    nan: int = 0
    inf: int = 0
    diff_sq: float | None = None

    @property
    def finite(self) -> bool:
        return not (self.nan or self.inf)

    @classmethod
    def combine(cls, parts: list["TensorStats"]) -> "TensorStats":
        """The stats of a tensor from those of its pieces."""
        diffs = [p.diff_sq for p in parts if p.diff_sq is not None]
        return cls(max((p.max_abs for p in parts), default=0.0), sum(p.nan for p in parts),
                   sum(p.inf for p in parts), sum(diffs) if diffs else None)


def unet_block(key: str) -> str:
    """'model.diffusion_model.input_blocks.4.1.proj_in.weight' -> 'input_blocks.4'; 'middle_block', 'out', …"""
    rest = key[len(UNET):]
    m = _NUMBERED.match(rest)
    return f"{m.group(1)}.{m.group(2)}" if m else rest.split(".", 1)[0]


def _block_sort_key(name: str) -> tuple:
    group, _, number = name.partition(".")
    rank = _BLOCK_ORDER.index(group) if group in _BLOCK_ORDER else len(_BLOCK_ORDER)
    return rank, int(number) if number.isdigit() else -1, name


def dtype_limit(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


class _Tally:
    __slots__ = ("keys", "diff_sq", "merged", "max_abs")

    def __init__(self):
        self.keys = self.merged = 0
        self.diff_sq = 0.0
        self.max_abs = 0.0

    def add(self, stats: TensorStats) -> None:
        self.keys += 1
        self.max_abs = max(self.max_abs, stats.max_abs)
        if stats.diff_sq is not None:
            self.merged += 1
            self.diff_sq += stats.diff_sq

    def to_dict(self) -> dict:
        finite = self.merged and math.isfinite(self.diff_sq)  # NaN/inf inputs: no norm, and JSON stays strict
        return {"keys": self.keys, "merged": self.merged,
                "diff_norm": math.sqrt(self.diff_sq) if finite else None, "max_abs": self.max_abs}


class SafetyReport:
    """Collects TensorStats key by key during a merge (in one thread) and summarises them."""

    def __init__(self, difference: str = "B − A"):
        self.difference = difference
        self.facts: dict[str, object] = {}      # top-level facts the merge adds (formula, dtypes, …)
        self.missing: dict[str, list[str]] = {}  # role ("a", "b", "c") -> output keys that model lacks
        self.ignored: list[str] = []             # keys only a subtracted model (C) has: not in the output
        self.sources: dict[str, int] = {}
        self.nonfinite: list[dict] = []
        self.out_of_range: list[dict] = []
        self._components = {c: _Tally() for c in COMPONENTS}
        self._component_source: dict[str, str] = {}
        self._blocks: dict[str, _Tally] = {}
        self._total = _Tally()

    def set_component_source(self, component: str, source: str) -> None:
        self._component_source[component] = source

    def add(self, key: str, component: str, source: str, out_dtype: torch.dtype, stats: TensorStats) -> None:
        self.sources[source] = self.sources.get(source, 0) + 1
        self._total.add(stats)
        self._components[component].add(stats)
        if component == "unet":
            self._blocks.setdefault(unet_block(key), _Tally()).add(stats)
        if not stats.finite:
            self.nonfinite.append({"key": key, "nan": stats.nan, "inf": stats.inf, "max_abs": stats.max_abs})
        elif out_dtype.is_floating_point and stats.max_abs > dtype_limit(out_dtype):
            self.out_of_range.append({"key": key, "max_abs": stats.max_abs,
                                      "dtype": DTYPE_LABELS.get(out_dtype, str(out_dtype)),
                                      "limit": dtype_limit(out_dtype)})

    @property
    def unsafe_keys(self) -> list[str]:
        return [entry["key"] for entry in self.nonfinite + self.out_of_range]

    def problem_summary(self, limit: int = 5) -> str:
        """One sentence naming the unsafe keys (empty when there are none)."""
        parts = []
        if self.nonfinite:
            shown = ", ".join(f"{e['key']} ({e['nan']} NaN, {e['inf']} inf)" for e in self.nonfinite[:limit])
            more = f" and {len(self.nonfinite) - limit} more" if len(self.nonfinite) > limit else ""
            parts.append(f"non-finite values in {len(self.nonfinite)} keys: {shown}{more}")
        if self.out_of_range:
            shown = ", ".join(f"{e['key']} (max |w| {e['max_abs']:.6g} > {e['dtype']} {e['limit']:.6g})"
                              for e in self.out_of_range[:limit])
            more = f" and {len(self.out_of_range) - limit} more" if len(self.out_of_range) > limit else ""
            parts.append(f"values beyond the output dtype's range in {len(self.out_of_range)} keys: {shown}{more}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        total = self._total.to_dict()
        components = {}
        for name, tally in self._components.items():
            if tally.keys:
                components[name] = {"source": self._component_source.get(name, ""), **tally.to_dict()}
        blocks = [{"block": name, **self._blocks[name].to_dict()}
                  for name in sorted(self._blocks, key=_block_sort_key)]
        return {
            **self.facts,
            "difference": self.difference,
            "keys": total["keys"],
            "merged_keys": total["merged"],
            "diff_norm": total["diff_norm"],
            "max_abs": total["max_abs"],
            "nonfinite_keys": len(self.nonfinite),
            "out_of_range_keys": len(self.out_of_range),
            **{f"missing_from_{role}": len(keys) for role, keys in self.missing.items()},
            "sources": dict(self.sources),
            "components": components,
            "blocks": blocks,
            "nonfinite": self.nonfinite,
            "out_of_range": self.out_of_range,
            "missing": {role: list(keys) for role, keys in self.missing.items()},
            "ignored": list(self.ignored),
        }


def _number(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def format_report(report: dict) -> str:
    """The report as the CLI prints it: summary, components, UNet blocks, problems."""
    lines = [f"{report.get('formula', 'merge')}: {report['keys']} keys, {report['merged_keys']} merged, "
             f"max |w| {_number(report['max_abs'])}, ‖{report['difference']}‖ {_number(report['diff_norm'])}"]
    for role, keys in report["missing"].items():
        if keys:
            lines.append(f"  missing from {role.upper()}: {len(keys)} keys (passed through from the others), "
                         f"e.g. {keys[0]}")
    lines.append(f"  {'component':10} {'source':7} {'keys':>5} {'‖' + report['difference'] + '‖':>12} {'max |w|':>10}")
    for name, c in report["components"].items():
        lines.append(f"  {COMPONENT_LABELS[name]:10} {c['source']:7} {c['keys']:5} {_number(c['diff_norm']):>12} "
                     f"{_number(c['max_abs']):>10}")
    if report["blocks"]:
        lines.append(f"  {'UNet block':16} {'keys':>5} {'‖' + report['difference'] + '‖':>12} {'max |w|':>10}")
        for b in report["blocks"]:
            lines.append(f"  {b['block']:16} {b['keys']:5} {_number(b['diff_norm']):>12} {_number(b['max_abs']):>10}")
    for entry in report["nonfinite"]:
        lines.append(f"  NON-FINITE {entry['key']}: {entry['nan']} NaN, {entry['inf']} inf")
    for entry in report["out_of_range"]:
        lines.append(f"  OUT OF RANGE {entry['key']}: max |w| {entry['max_abs']:.6g} > {entry['dtype']} "
                     f"{entry['limit']:.6g}")
    return "\n".join(lines)
