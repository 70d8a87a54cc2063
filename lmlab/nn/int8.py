"""int8 numbers shared by the screened output layer (:mod:`lmlab.nn.screen`) and int8 models
(:mod:`lmlab.nn.quantize`): per-row weight codes, an input's scales for oneDNN's int8
kernel, and whether this CPU's int8 dot products sum exactly.

    s_o = max_i |W_oi| / 127,  q_oi = round(W_oi / s_o) ∈ [-127, 127]       W ≈ s ⊙ q, per row
    a = max |x| / 127,  f_r = 2^⌊log₂(max|x| / max|x_r|)⌋                  x ≈ (a / f) ⊙ q_x

The kernel takes one input scale ``a`` for all rows; multiplying row r by the power of two
f_r first (exact in floating point) brings a small row up to the largest, so it is not
quantized more coarsely than the others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmlab.nn.native import cpu_flags


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q, s) with W_oi ≈ s_o · q_oi, symmetric per row. A row of zeros gets s_o = 1 (q = 0)."""
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # s_o = max_i |W_oi| / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.float()


def row_scales(x: Tensor) -> tuple[float, Tensor] | None:
    """a and f (rows, 1) for x (rows, d) as above; None if x holds a NaN or an infinity (one
    scale serves every row: a non-finite one would spoil the others)."""
    big = x.abs().amax(dim=1, keepdim=True)
    top = float(big.max())
    if not math.isfinite(top):
        return None
    f = torch.where(big > 0, torch.exp2(torch.floor(torch.log2(top / big)).clamp_(max=64)), torch.ones_like(big))
    return (top / 127) or 1.0, f


_EXACT: bool | None = None


def exact_sums() -> bool:
    """oneDNN's int8 linear exists and the CPU has VNNI/AMX int8 dot products: older x86
    kernels sum pairs of u8·s8 products in int16 with saturation, so their sums are not exact."""
    global _EXACT
    if _EXACT is None:
        _EXACT = False
        try:
            _EXACT = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags()) and hasattr(
                torch.ops.onednn, "qlinear_pointwise"
            )
        except (RuntimeError, AttributeError):
            _EXACT = False
    return _EXACT


__all__ = ["exact_sums", "quantize_rows", "row_scales"]
