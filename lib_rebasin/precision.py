"""The arithmetic of cost products on a device, measured, and the error bounds that follow from it.

The certificates that let matching skip the solver (`assignment.screen`, the acceptance test in `matching`)
rest on entrywise bounds `|computed − exact| ≤ eps · ‖a_i‖·‖b_j‖`.  Such a bound holds only for the arithmetic
actually performed, and a device may round float32 inputs of a product without saying so: TF32 on NVIDIA
tensor cores (10 fraction bits, which the hardware may truncate), oneDNN's bfloat16 or TF32 modes on CPUs and
Intel GPUs, whatever a DirectML driver does.  So:

- `ieee_products()` asks torch for IEEE float32 products (and float32 reductions of bfloat16 products) while
  matching runs, through whichever of torch's two flag APIs the process uses, and restores them after;
- `measure()` then finds out what the device does: how many fraction bits of a float32 input survive a
  product, and whether bfloat16 products are summed in float32;
- `Arithmetic.product_error` charges exactly that.

`Arithmetic.matmul` is the product itself: the costs call it for every product they bound, so that a test can
hand in a software model of another device's arithmetic (inputs masked to TF32 or bfloat16) and check the
certificates against float64 on the CPU.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

FP32_UNIT = 2.0 ** -24        # unit roundoff of float32 (24 significant bits)
BF16_UNIT = 2.0 ** -8         # of bfloat16, rounded to nearest as torch converts (8 significant bits)
FP32_FRACTION_BITS = 23
MIN_FRACTION_BITS = 7         # a device keeping fewer bits of float32 inputs than bfloat16 is not used for costs
BF16_SPEEDUP = 0.7            # bfloat16 screening is used where its products take < 70 % of float32's time

Matmul = Callable[..., torch.Tensor]   # torch.matmul's signature: (a, b, *, out=None)


def input_unit(fraction_bits: int) -> float:
    """Relative error of a float32 input kept to `fraction_bits` (truncated, the worst case): 0 when all kept."""
    return 0.0 if fraction_bits >= FP32_FRACTION_BITS else 2.0 ** -fraction_bits


def accumulation_error(depth: int) -> float:
    """γ_n for float32 sums of `depth` terms in any order (Higham, Accuracy and Stability, §3.1)."""
    nu = depth * FP32_UNIT
    if nu >= 1:
        raise ValueError(f"float32 sums of {depth} terms have no useful error bound")
    return nu / (1 - nu)


@dataclass(frozen=True)
class Arithmetic:
    """How one device computes the products of a cost matrix, as measured by `measure`."""
    device: str
    float32_fraction_bits: int = FP32_FRACTION_BITS  # fraction bits of float32 inputs that survive a product
    bf16_sums_in_float32: bool = True                # bfloat16 products are accumulated in float32
    matmul: Matmul = field(default=torch.matmul, compare=False, repr=False)

    @property
    def ieee(self) -> bool:
        return self.float32_fraction_bits >= FP32_FRACTION_BITS

    @property
    def usable(self) -> bool:
        """Whether float32 products keep enough bits for costs whose error bound still decides anything."""
        return self.float32_fraction_bits >= MIN_FRACTION_BITS

    def input_unit(self, dtype: torch.dtype) -> float:
        """Relative error of a product's input of `dtype`, converted from exact float32 values."""
        if dtype == torch.bfloat16:
            return BF16_UNIT  # the conversion rounds to nearest; bfloat16 inputs pass the product unchanged
        if dtype == torch.float32:
            return input_unit(self.float32_fraction_bits)
        raise ValueError(f"no error model for {dtype} products")

    def product_error(self, dtype: torch.dtype, depth: int, out: torch.dtype | None = None) -> float:
        """eps with |computed − exact| ≤ eps · Σ_k |a_k·b_k| for a product of rows of length `depth`.

        Both inputs rounded (1 + u_in)², the products of the rounded inputs exact in float32 (at most 2 × 11
        significant bits), float32 sums (1 + γ_depth), the result stored in `out` (1 + u_out)."""
        if dtype == torch.bfloat16 and not self.bf16_sums_in_float32:
            raise ValueError(f"{self.device} sums bfloat16 products in low precision: no useful error bound")
        u_in = self.input_unit(dtype)
        u_out = BF16_UNIT if (out or dtype) == torch.bfloat16 else 0.0
        return (1 + u_in) ** 2 * (1 + accumulation_error(depth)) * (1 + u_out) - 1

    def norm_slack(self, depth: int) -> float:
        """Factor f with ‖x‖²_exact ≤ f · ‖x‖²_computed for float32 sums of squares over `depth` entries: the
        squares (and a norm's square root, squared again) rounded in float32, the squares rounded once more as
        a product's input, float32 sums."""
        return 1 / ((1 - 4 * FP32_UNIT) * (1 - self.input_unit(torch.float32)) * (1 - accumulation_error(depth)))


def measure(device: torch.device | str, matmul: Matmul = torch.matmul) -> Arithmetic:
    """What `matmul` does on `device`, found with products whose exact results float32 represents.

    Fraction bits: X @ I and I @ Xᵀ, the rows of X being 1 + 2⁻ʳ for r = 1…23: every sum has one non-zero
    term, so any difference from X is input rounding.  bfloat16 sums: 1 + 255 terms of 2⁻⁹ (exact in
    bfloat16): a float32 sum gives 1.498…, a bfloat16 one stays at 1."""
    device = torch.device(device)
    n = 128
    r = torch.arange(1, FP32_FRACTION_BITS + 1, dtype=torch.float64)
    x = torch.ones(n, n, dtype=torch.float64)
    x[:FP32_FRACTION_BITS] = (1 + 2.0 ** -r)[:, None]
    x = x.float()
    eye = torch.eye(n)
    left = matmul(x.to(device), eye.to(device)).cpu()
    right = matmul(eye.to(device), x.T.contiguous().to(device)).cpu()
    exact_rows = (left == x).all(1) & (right.T == x).all(1)
    bits = FP32_FRACTION_BITS
    for index in range(FP32_FRACTION_BITS):
        if not bool(exact_rows[index]):
            bits = index  # rows 0…index-1 (r = 1…index) survived
            break
    terms = torch.full((n, 256), 2.0 ** -9)
    terms[:, 0] = 1.0
    exact = 1 + 255 * 2.0 ** -9
    try:
        sums = matmul(terms.to(device, torch.bfloat16), torch.ones(256, n).to(device, torch.bfloat16)).cpu()
        bf16_float32 = bool(((sums.double() - exact).abs() <= BF16_UNIT * exact).all())
    except (RuntimeError, TypeError, NotImplementedError):
        bf16_float32 = False
    return Arithmetic(str(device), bits, bf16_float32, matmul)


@contextlib.contextmanager
def ieee_products() -> Iterator[None]:
    """IEEE float32 products (no TF32, no bfloat16 inside float32 products) and float32 reductions of
    bfloat16 products for the duration; then every flag as it was.

    torch has two APIs for these flags and refuses to read the legacy one after the new one was set (a
    webui sets the legacy `allow_tf32`): both are saved as they are readable, and restored in that order."""
    matmul = torch.backends.cuda.matmul
    new_api = [(obj, "fp32_precision") for obj in (matmul, getattr(torch.backends.mkldnn, "matmul", None),
                                                   torch.backends) if hasattr(obj, "fp32_precision")]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # only the new API is in use
        legacy = None
    saved_new = [getattr(obj, name) for obj, name in new_api]
    saved_reduction = matmul.allow_bf16_reduced_precision_reduction
    try:
        torch.set_float32_matmul_precision("highest")
        matmul.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved_reduction
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for (obj, name), value in zip(new_api, saved_new):
            setattr(obj, name, value)


# --- is bfloat16 screening worth it here ---------------------------------------------------------------------

_SPEED: dict[str, bool] = {}


def _seconds(x: torch.Tensor, runs: int = 5) -> float:
    float((x @ x)[0, 0])  # warm-up (and kernel selection)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        float((x @ x)[0, 0])  # reading an entry waits for the device
        best = min(best, time.perf_counter() - start)
    return best


def _native_cuda_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 counts only native support
        return torch.cuda.is_bf16_supported()


def bf16_faster(device: torch.device | str) -> bool:
    """Whether bfloat16 products run in < BF16_SPEEDUP of float32's time on `device` (measured once; False
    where bfloat16 is missing, or only emulated on a CUDA device older than Ampere)."""
    device = torch.device(device)
    key = str(device)
    if key not in _SPEED:
        if device.type == "cuda" and not _native_cuda_bf16():
            _SPEED[key] = False
        else:
            n = 512 if device.type == "cpu" else 2048
            x = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device)
            try:
                with ieee_products():
                    _SPEED[key] = _seconds(x.to(torch.bfloat16)) < BF16_SPEEDUP * _seconds(x)
            except (RuntimeError, TypeError, NotImplementedError):
                _SPEED[key] = False
    return _SPEED[key]


def screen_dtype(option: str, arithmetic: Arithmetic) -> torch.dtype | None:
    """The dtype of screening products for a `MatchOptions.screen` choice on a measured device: bfloat16 where
    its products are summed in float32 (so that they can be bounded) and, for "auto", faster; else None."""
    if option not in ("auto", "on", "off"):
        raise ValueError(f"unknown screening choice {option!r}: use auto, on or off")
    if option == "off" or not arithmetic.bf16_sums_in_float32:
        return None
    if option == "on" or bf16_faster(arithmetic.device):
        return torch.bfloat16
    return None
