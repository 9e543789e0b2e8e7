"""Cost matrices of permutation groups, built tensor by tensor, and the exact inner products matching tracks.

For a group and one of its bindings, the contribution to the group's cost is `A_w · B_wᵀ` where `A_w`, `B_w`
are the bound window of the tensor with the bound axis first, flattened to (width, rest).  Windows are
converted once, in their natural layout and in slices small enough for torch to run each on the calling
thread (on a busy machine element-wise ops split over several threads stall on each other); a matrix product
then reads them through a transposed view where the layout allows.

`Partial` sums the contributions of a group.  Products run in float32, or in a low-precision dtype
(bfloat16) with an error bound: `|computed − exact| ≤ eps · ‖a_i‖·‖b_j‖` entrywise, from the float32 norms
of the bound rows, so that an approximate cost can still prove an optimum (`assignment.screen`).
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .spec.core import Binding

BF16_UNIT = 2.0 ** -8         # unit roundoff of bfloat16 (8 significant bits)
FP32_UNIT = 2.0 ** -24
SLICE_ELEMENTS = 1 << 14      # element-wise ops this small run on the calling thread (no thread hand-offs)
NARROW_ROWS = 64              # bindings with rows this short (biases, norms) share one product per window
LOW_PRECISION_WORK = 1 << 22  # multiply-adds below which a low-precision product is not worth its overhead


def product_error(dtype: torch.dtype, depth: int) -> float:
    """eps with |computed − exact| ≤ eps · Σ_k |a_k·b_k| for a product of rows of length `depth`.

    Inputs rounded to `dtype` (2u), the result rounded to `dtype` (u), accumulation in float32 (bfloat16
    products on the CPU accumulate in float32; on CUDA `matching.match` disables reduced-precision reductions).
    """
    unit = BF16_UNIT if dtype == torch.bfloat16 else 0.0
    accumulate = depth * FP32_UNIT / (1 - depth * FP32_UNIT)
    return 3 * unit + 2 * unit * unit + accumulate * (1 + unit) ** 3


def convert(window: torch.Tensor, axis: int, dtype: torch.dtype, norms: torch.Tensor | None = None) -> torch.Tensor:
    """`window` converted to `dtype` through float32, same layout; with `norms` (one per position along `axis`),
    also adds the squared float32 norms of the positions into it."""
    out = torch.empty(window.shape, dtype=dtype, device=window.device)
    lead = window.shape[0] if window.dim() else 1
    per_lead = window[0].numel() if window.dim() and lead else 1
    step = max(1, SLICE_ELEMENTS // max(per_lead, 1)) if window.device.type == "cpu" else max(lead, 1)
    others = tuple(d for d in range(window.dim()) if d != axis)
    for start in range(0, lead, step):
        part = window[start:start + step].float()
        if norms is not None:
            if axis == 0:
                norms[start:start + step] += torch.linalg.vector_norm(part.reshape(len(part), -1), dim=1).double() ** 2
            else:
                norms += torch.linalg.vector_norm(part, dim=others).double() ** 2
        out[start:start + step] = part
    return out


def as_rows(converted: torch.Tensor, axis: int) -> torch.Tensor:
    """A converted window as (width, rest) rows: a view where the layout allows (axis 0, or the columns of a
    matrix), else a copy."""
    if converted.dim() == 1:
        return converted.unsqueeze(1)
    if axis == 0:
        return converted.reshape(converted.shape[0], -1)
    if converted.dim() == 2:
        return converted.T
    return converted.movedim(axis, 0).reshape(converted.shape[axis], -1)


def window(tensor: torch.Tensor, b: Binding) -> torch.Tensor:
    return tensor.narrow(b.axis, b.offset, b.width)


@dataclass
class Partial:
    """A group's cost matrix being summed binding by binding (with what its error bound needs)."""
    size: int
    device: torch.device
    low: torch.dtype | None        # dtype of big products; None: float32 only (the cost is taken as exact)
    cost: torch.Tensor = field(init=False)
    norm_a: torch.Tensor = field(init=False)
    norm_b: torch.Tensor = field(init=False)
    narrow: dict = field(default_factory=lambda: defaultdict(list))
    eps: float = 0.0
    terms: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.cost = torch.zeros(self.size, self.size, device=self.device)
        self.norm_a = torch.zeros(self.size, device=self.device, dtype=torch.float64)
        self.norm_b = torch.zeros(self.size, device=self.device, dtype=torch.float64)

    @property
    def nbytes(self) -> int:
        return self.size * self.size * 4

    def add(self, a: torch.Tensor, b: torch.Tensor, bindings: list[Binding]) -> None:
        """Add the contributions of one tensor (A's, and B's with the other groups' permutations applied).
        Safe to call from several threads at once: products are computed outside the lock."""
        bounded = self.low is not None
        for bind in bindings:
            wa, wb = window(a, bind), window(b, bind)
            depth = wa.numel() // bind.width if bind.width else 0
            narrow = depth <= NARROW_ROWS
            low = bounded and not narrow and bind.width * bind.width * depth >= LOW_PRECISION_WORK
            dtype = self.low if low else torch.float32
            norms_a = torch.zeros(bind.width, dtype=torch.float64, device=self.device) if bounded else None
            norms_b = torch.zeros(bind.width, dtype=torch.float64, device=self.device) if bounded else None
            rows_a = as_rows(convert(wa, bind.axis, dtype, norms_a), bind.axis)
            rows_b = as_rows(convert(wb, bind.axis, dtype, norms_b), bind.axis)
            product = None if narrow else (rows_a @ rows_b.T).float()
            positions = slice(bind.group_offset, bind.group_offset + bind.width)
            with self.lock:
                self.terms += 1
                if bounded:
                    self.norm_a[positions] += norms_a
                    self.norm_b[positions] += norms_b
                if narrow:  # biases, norms, thin convs: one product per window in finish()
                    self.narrow[bind.group_offset, bind.width].append((rows_a, rows_b))
                    continue
                self.cost[positions, positions] += product
                self.eps = max(self.eps, product_error(dtype, depth))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cost, and its entrywise error bound (None for a float32-only cost, taken as exact)."""
        for (offset, width), pairs in self.narrow.items():
            rows_a = torch.cat([p[0] for p in pairs], dim=1)
            rows_b = torch.cat([p[1] for p in pairs], dim=1)
            self.cost[offset:offset + width, offset:offset + width] += rows_a @ rows_b.T
            self.eps = max(self.eps, product_error(torch.float32, rows_a.shape[1]))
        self.narrow.clear()
        if self.low is None:
            return self.cost, None
        # one float32 rounding per term summed into the cost, and slack for the norms' own rounding
        eps = (self.eps + 4 * FP32_UNIT * max(self.terms, 1)) * 1.01
        return self.cost, eps * torch.outer(self.norm_a.sqrt(), self.norm_b.sqrt()).float()


def inner_products(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(‖a‖², ‖b‖², ⟨a, b⟩) in float64, from slices converted to float32."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    step = SLICE_ELEMENTS if a.device.type == "cpu" else max(fa.numel(), 1)
    aa = bb = ab = 0.0
    for start in range(0, fa.numel(), step):
        x, y = fa[start:start + step].float(), fb[start:start + step].float()
        aa += float(torch.vdot(x, x))
        bb += float(torch.vdot(y, y))
        ab += float(torch.vdot(x, y))
    return aa, bb, ab


def inner_product(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ in float64, from slices converted to float32."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    step = SLICE_ELEMENTS if a.device.type == "cpu" else max(fa.numel(), 1)
    return sum(float(torch.vdot(fa[s:s + step].float(), fb[s:s + step].float())) for s in range(0, fa.numel(), step))
