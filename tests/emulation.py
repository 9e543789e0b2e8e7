"""Software models of how GPUs (and CPUs in reduced-precision modes) round the inputs of float32 products, so
that the CPU can run the cost products the way those devices do.

- TF32 (NVIDIA tensor cores since Ampere): 10 fraction bits; the hardware may simply drop the other 13 (the
  worst case, modelled here by masking them off).
- bfloat16 inside float32 products (oneDNN's "medium" precision, some drivers): 7 fraction bits, rounded to
  nearest.
- bfloat16 products summed in bfloat16 (cuBLAS with reduced-precision reductions): the sums themselves rounded.

bfloat16 inputs pass a product unchanged on every device (they are already exact).
"""
from __future__ import annotations

import torch

from lib_rebasin import precision


def truncated(bits: int):
    """float32 inputs with all but `bits` fraction bits masked off (rounded toward zero)."""
    mask = -(1 << (precision.FP32_FRACTION_BITS - bits))

    def round_inputs(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return x
        return (x.contiguous().view(torch.int32) & mask).view(torch.float32)
    return round_inputs


def bf16_rounded(x: torch.Tensor) -> torch.Tensor:
    """float32 inputs rounded to nearest bfloat16."""
    return x.to(torch.bfloat16).float() if x.dtype == torch.float32 else x


TF32 = truncated(10)


def matmul_with(round_inputs):
    """torch.matmul on inputs rounded as a device would."""
    def matmul(a, b, *, out=None):
        return torch.matmul(round_inputs(a), round_inputs(b), out=out)
    return matmul


def bf16_summed_matmul(a, b, *, out=None):
    """bfloat16 products summed in bfloat16, term by term (float32 products unchanged)."""
    if a.dtype != torch.bfloat16:
        return torch.matmul(a, b, out=out)
    total = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    for k in range(a.shape[1]):
        total = (total.float() + a[:, k:k + 1].float() * b[k:k + 1].float()).to(torch.bfloat16)
    return total if out is None else out.copy_(total)


def emulate(monkeypatch, matmul) -> None:
    """Make every matching on the CPU compute its cost products with `matmul`, charged as `precision.measure`
    finds that arithmetic to be."""
    real = precision.measure
    monkeypatch.setattr(precision, "measure", lambda device, _=torch.matmul: real(device, matmul))
