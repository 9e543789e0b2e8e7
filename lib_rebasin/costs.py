"""Cost matrices of permutation groups, built tensor by tensor, and the exact inner products matching tracks.

For a group and one of its bindings, the contribution to the group's cost is `A_w · B_wᵀ` where `A_w`, `B_w`
are the bound window of the tensor with the bound axis first, flattened to (width, rest).  Windows are
converted in pieces of bounded size, in their natural layout, into per-thread buffers that are reused (fresh
big allocations page-fault every time); the products read them through transposed views where the layout
allows.  Matching calls this from several worker threads while torch runs single-threaded.

`Partial` sums the contributions of a group.  Products run in float32, or in a low-precision dtype
(bfloat16), always with an error bound: `|computed − exact| ≤ eps · ‖a_i‖·‖b_j‖` entrywise, from the float32
norms of the bound rows, so that a computed cost can prove an optimum (`assignment.screen`) and a gain
(`assignment.certified_gain`).  The bound is the one of the arithmetic the device performs
(`precision.Arithmetic`, measured), and every product it covers goes through that arithmetic's `matmul`.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .assignment import ErrorBound
from .precision import FP32_UNIT, Arithmetic, Matmul, measure
from .spec.core import Binding

PIECE_ELEMENTS = 1 << 23      # tensors are converted and multiplied in pieces of at most this many elements
NARROW_ROWS = 64              # bindings with rows this short (biases, norms) share one product per window
LOW_PRECISION_WORK = 1 << 22  # multiply-adds below which a low-precision product is not worth its overhead


_workspace = threading.local()


def workspace_bytes(width: int, bindings: int) -> int:
    """Bytes of scratch one thread's `Partial.add` may hold for groups up to `width` wide, with up to
    `bindings` bindings in one tensor: float32, low-precision and reordered copies of a piece of A and B, the
    squares for the norms, the objective's pieces, and one product buffer per binding."""
    pieces = PIECE_ELEMENTS * (2 * 4 + 2 * 2 + 2 * 4 + 4 + 2 * 4)
    return pieces + bindings * width * width * 4


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer reused from call to call: fresh big allocations cost page faults every time (and,
    with the page cache full of the memory-mapped inputs, a page reclaim each)."""
    buffers = _workspace.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    key = (slot, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def _add_squared_norms(part: torch.Tensor, axis: int, norms: torch.Tensor, matmul: Matmul) -> None:
    """norms[i] += Σ part[..., i, ...]² over everything but `axis` (float32 sums, float64 accumulators)."""
    if axis == 0:
        norms += torch.linalg.vector_norm(part.reshape(len(part), -1), dim=1).double() ** 2
    else:  # column sums as one matrix-vector product (a strided reduction is slow)
        squares = part.square().reshape(part.shape[0], -1)
        ones = torch.ones(1, part.shape[0], dtype=part.dtype, device=part.device)
        norms += matmul(ones, squares).reshape(part.shape[1], -1).sum(1).double()


def pieces(window: torch.Tensor, axis: int) -> list[torch.Tensor]:
    """The bound window as (width, depth) pieces whose products sum to the window's: split along the depth
    (axis 0) or the leading axis (axis 1) so that no piece exceeds PIECE_ELEMENTS."""
    width = window.shape[axis]
    if axis == 0:
        rows = window.reshape(width, -1)
        step = max(1, PIECE_ELEMENTS // max(width, 1))
        return [rows[:, s:s + step] for s in range(0, rows.shape[1], step)]
    per_lead = window[0].numel() if len(window) else 1
    step = max(1, PIECE_ELEMENTS // max(per_lead, 1))
    return [window[s:s + step] for s in range(0, len(window), step)]


def convert(piece: torch.Tensor, axis: int, dtype: torch.dtype, norms: torch.Tensor | None, slot: str,
            keep: bool = False, matmul: Matmul = torch.matmul) -> torch.Tensor:
    """A piece of a window as (width, depth) rows in `dtype` (a transposed view where the layout allows),
    converted through float32 in per-thread buffers (`keep`: in fresh memory, to outlive the next call);
    with `norms`, adds the squared float32 norms of the bound positions into it.  `axis` is 0 or 1."""
    device = piece.device
    x32 = scratch(slot + ".f32", tuple(piece.shape), torch.float32, device)
    x32.copy_(piece)
    if norms is not None:
        _add_squared_norms(x32, axis, norms, matmul)
    if keep:
        x = x32.to(dtype, copy=True)
    elif dtype == torch.float32:
        x = x32
    else:
        x = scratch(slot + ".low", tuple(piece.shape), dtype, device).copy_(x32)
    if axis == 0:
        return x.reshape(x.shape[0], -1)
    if x.dim() == 2:
        return x.T
    moved = x.movedim(1, 0)
    rows = torch.empty(moved.shape, dtype=dtype, device=device) if keep else \
        scratch(slot + ".rows", tuple(moved.shape), dtype, device)
    return rows.copy_(moved).reshape(moved.shape[0], -1)


def window(tensor: torch.Tensor, b: Binding) -> torch.Tensor:
    t = tensor.narrow(b.axis, b.offset, b.width)
    return t.unsqueeze(1) if t.dim() == 1 else t


def inner_products(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(‖a‖², ‖b‖², ⟨a, b⟩) in float64, from float32 pieces."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = 0.0
    for start in range(0, fa.numel(), PIECE_ELEMENTS):
        n = min(PIECE_ELEMENTS, fa.numel() - start)
        x = scratch("stats.a", (n,), torch.float32, a.device).copy_(fa[start:start + n])
        y = scratch("stats.b", (n,), torch.float32, a.device).copy_(fb[start:start + n])
        aa += float(torch.vdot(x, x))
        bb += float(torch.vdot(y, y))
        ab += float(torch.vdot(x, y))
    return aa, bb, ab


def inner_product(a: torch.Tensor, b: torch.Tensor) -> float:
    return inner_products(a, b)[2]


@dataclass
class Partial:
    """A group's cost matrix being summed tensor by tensor (with what its error bound needs).

    Tensors may be added from several threads at once and in any order; each carries the ticket it was given
    when it was handed out, and contributions are summed in ticket order, so that the float sums (and with
    them every decision) are the same from run to run."""
    size: int
    device: torch.device
    low: torch.dtype | None        # dtype of big products; None: float32 only
    arithmetic: Arithmetic | None = None   # the device's, as measured (None: measured here)
    cost: torch.Tensor = field(init=False)
    norm_a: torch.Tensor = field(init=False)
    norm_b: torch.Tensor = field(init=False)
    narrow: dict = field(default_factory=lambda: defaultdict(list))
    eps: float = 0.0
    depth: int = 1                 # longest row a norm was summed over
    terms: int = 0
    tickets: int = 0               # handed out
    applied: int = 0               # summed in
    early: dict = field(default_factory=dict)   # ticket -> contributions that arrived before their turn
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self.arithmetic is None:
            self.arithmetic = measure(self.device)
        self.cost = torch.zeros(self.size, self.size, device=self.device)
        self.norm_a = torch.zeros(self.size, device=self.device, dtype=torch.float64)
        self.norm_b = torch.zeros(self.size, device=self.device, dtype=torch.float64)

    @property
    def nbytes(self) -> int:
        return self.size * self.size * 4

    def ticket(self) -> int:
        """The place of the next tensor in the sum (called where tensors are handed out, in a fixed order)."""
        self.tickets += 1
        return self.tickets - 1

    def add(self, a: torch.Tensor, b: torch.Tensor, bindings: list[Binding], ticket: int) -> None:
        """Add the contributions of one tensor (A's, and B's with the other groups' permutations applied)."""
        arithmetic = self.arithmetic
        matmul = arithmetic.matmul
        contributions = []  # (kind, positions, payload, error factor of a product)
        for bind in bindings:
            wa, wb = window(a, bind), window(b, bind)
            axis = min(bind.axis, 1)
            if bind.axis > 1:  # the bound axis second: the other axes' order does not matter to the products
                wa, wb = wa.movedim(bind.axis, 1), wb.movedim(bind.axis, 1)
            depth = wa.numel() // bind.width if bind.width else 0
            narrow = depth <= NARROW_ROWS
            low = self.low is not None and not narrow and bind.width * bind.width * depth >= LOW_PRECISION_WORK
            dtype = self.low if low else torch.float32
            positions = slice(bind.group_offset, bind.group_offset + bind.width)
            norms_a = torch.zeros(bind.width, dtype=torch.float64, device=self.device)
            norms_b = torch.zeros(bind.width, dtype=torch.float64, device=self.device)
            if narrow:  # biases, norms, thin convs: one product per window in finish()
                rows = (convert(wa, axis, torch.float32, norms_a, "a", keep=True, matmul=matmul),
                        convert(wb, axis, torch.float32, norms_b, "b", keep=True, matmul=matmul))
                contributions.append(("narrow", positions, rows, 0.0))
            else:
                product = None
                parts = list(zip(pieces(wa, axis), pieces(wb, axis)))
                for piece_a, piece_b in parts:
                    rows_a = convert(piece_a, axis, dtype, norms_a, "a", matmul=matmul)
                    rows_b = convert(piece_b, axis, dtype, norms_b, "b", matmul=matmul)
                    if len(parts) == 1:  # the common case: straight into a reused buffer
                        product = scratch(f"product{len(contributions)}", (bind.width, bind.width), dtype, self.device)
                        matmul(rows_a, rows_b.T, out=product)
                    elif product is None:
                        product = matmul(rows_a, rows_b.T).float()
                    else:
                        product += matmul(rows_a, rows_b.T)
                # pieces beyond the first add one float32 rounding each
                contributions.append(("product", positions, product,
                                      arithmetic.product_error(dtype, depth) + (len(parts) - 1) * FP32_UNIT))
            contributions.append(("norms", positions, (norms_a, norms_b, depth), 0.0))
        with self.lock:
            if ticket == self.applied:  # our turn: sum straight from the buffers
                self._apply(contributions)
                self.applied += 1
            else:  # wait for the earlier tensors; the buffers will be reused, so keep copies
                self.early[ticket] = [(kind, positions, payload.clone() if kind == "product" else payload, eps)
                                      for kind, positions, payload, eps in contributions]
            while self.applied in self.early:
                self._apply(self.early.pop(self.applied))
                self.applied += 1

    def _apply(self, contributions: list) -> None:
        for kind, positions, payload, eps in contributions:
            if kind == "narrow":
                self.narrow[positions.start, positions.stop - positions.start].append(payload)
            elif kind == "product":
                self.cost[positions, positions] += payload
                self.terms += 1
                self.eps = max(self.eps, eps)
            else:
                self.norm_a[positions] += payload[0]
                self.norm_b[positions] += payload[1]
                self.depth = max(self.depth, payload[2])

    def finish(self) -> tuple[torch.Tensor, ErrorBound]:
        """The cost, and its error bound for the arithmetic performed."""
        if self.applied != self.tickets:
            raise RuntimeError(f"cost finished with {self.tickets - self.applied} tensors missing")
        matmul = self.arithmetic.matmul
        for (offset, width), pairs in self.narrow.items():
            rows_a = torch.cat([p[0] for p in pairs], dim=1)
            rows_b = torch.cat([p[1] for p in pairs], dim=1)
            self.cost[offset:offset + width, offset:offset + width] += matmul(rows_a, rows_b.T)
            self.terms += 1
            self.eps = max(self.eps, self.arithmetic.product_error(torch.float32, rows_a.shape[1]))
        self.narrow.clear()
        # one float32 rounding per term summed into the cost (each at most 1 + eps times the bound's scale),
        # and the norms' own rounding: the bound uses computed norms for exact ones
        eps = (self.eps + 2 * FP32_UNIT * max(self.terms, 1)) * (1 + self.eps) * self.arithmetic.norm_slack(self.depth)
        return self.cost, ErrorBound(eps, self.norm_a.sqrt(), self.norm_b.sqrt())
