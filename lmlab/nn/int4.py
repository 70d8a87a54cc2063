"""Weight-only int4 quantization, group-wise: half a byte a weight, a quarter of bf16's bytes.

Each row o of W is cut into groups of ``group_size`` consecutive inputs (llama.cpp's Q4,
GPTQ's and AWQ's layout), and each group g gets its own scale and zero point:

    s_og = (max − min) / 15,  z_og = min + 8·s_og        both rounded to bf16 (the kernel reads bf16)
    q_oi = round((W_oi − z_og) / s_og) + 8  ∈ [0, 15]
    W_oi ≈ Ŵ_oi = (q_oi − 8)·s_og + z_og                 |W_oi − Ŵ_oi| ≤ s_og/2, + z's rounding

A group's scale follows its own range, so an outlier spoils 64 weights, not a whole row. On
the CPU the product runs on PyTorch's int4 kernel (``torch.ops.aten._weight_int4pack_mm_for_cpu``:
bf16 activations, W in its own packed layout, rows padded to a multiple of 16), which streams
a cache-cold 4,864 × 896 weight 3.2× faster than oneDNN's pre-packed bf16 (0.134 vs 0.430 ms
on this project's 2-core Xeon) and the 151,936 × 896 output layer 1.9× faster (5.4 vs 10.3 ms).
Elsewhere (another device, a width the groups do not divide) Ŵ is made for the call and
multiplied with ``F.linear``: the formula above, spelled out.

    model = lmlab.load("Qwen/Qwen2.5-0.5B-Instruct", quantize="int4")   # lmlab generate ... --quantize int4
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import LmlabError

GROUP_SIZES = (32, 64, 128, 256)
GROUP_SIZE = 64
#: rows quantized at a time (a multiple of 64: the kernel's layout packs 64 rows together)
BLOCK_ROWS = 1024

_KERNEL_OK: bool | None = None


def kernel_works() -> bool:
    """PyTorch's CPU int4 kernel exists here and agrees with the formula on a small product."""
    global _KERNEL_OK
    if _KERNEL_OK is None:
        _KERNEL_OK = False
        try:
            q = (torch.arange(32 * 64, dtype=torch.int32).reshape(32, 64) * 7) % 16
            sz = torch.stack([torch.full((2, 32), 0.5), torch.full((2, 32), 0.25)], -1).to(torch.bfloat16)
            x = torch.linspace(-1, 1, 64).reshape(1, 64)
            got = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), 32, sz
            )
            want = x @ ((q.float() - 8) * 0.5 + 0.25).T
            _KERNEL_OK = bool(torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2))
        except (RuntimeError, AttributeError):
            pass
    return _KERNEL_OK


def finite_float(w: Tensor, name: str, method: str) -> Tensor:
    """A block of W's rows in fp32, or the one-line error a non-finite weight deserves."""
    w = w.float()
    if not torch.isfinite(w).all():
        raise LmlabError(
            f"layer {name or 'linear'} has NaN or infinite weights; {method} quantization needs finite "
            "weights (check the checkpoint, or load it without --quantize)"
        )
    return w


def quantize_groups(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q, s, z) for w (rows, in) in fp32: codes (rows, in) int32 in [0, 15], and per group
    scales and zero points (rows, in / group_size), rounded to bf16 (kept as fp32 numbers)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp_(min=1e-6).to(torch.bfloat16).float()
    z = (lo + 8 * s).to(torch.bfloat16).float()
    q = torch.round((g - z[..., None]) / s[..., None]).add_(8).clamp_(0, 15).to(torch.int32)
    return q.reshape(rows, cols), s, z


class Int4Linear(nn.Module):
    """A linear layer with group-wise int4 weights. Buffers: ``packed`` (the kernel's layout,
    rows padded to a multiple of 16) or ``codes`` (int8 holding q − 8, where the kernel cannot
    serve), ``scales_and_zeros`` (groups, rows, 2) bf16, ``bias`` or None. Inference only."""

    quantized_layer = True  # (lmlab.nn.fastpath.quantized: the unrolled decoding step serves it)

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("bias", bias)

    @staticmethod
    def check_group_size(group_size: int) -> None:
        if group_size not in GROUP_SIZES:
            raise LmlabError(f"--group-size {group_size}: int4 groups are {', '.join(map(str, GROUP_SIZES))} inputs")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE, name: str = "") -> Int4Linear:
        cls.check_group_size(group_size)
        out_f, in_f = linear.weight.shape
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(in_f, out_f, group_size, bias)
        if in_f % group_size:
            raise LmlabError(
                f"layer {name or 'linear'} has {in_f} inputs, not a multiple of --group-size {group_size}; "
                "choose a group size that divides it (32 divides more widths)"
            )
        weight = linear.weight.detach()
        kernel = kernel_works() and weight.device.type == "cpu"
        padded = -(-out_f // 16) * 16 if kernel else out_f
        packs, codes = [], []
        scales = torch.zeros(padded, in_f // group_size)
        zeros = torch.zeros(padded, in_f // group_size)
        for i in range(0, padded, BLOCK_ROWS):
            w = finite_float(weight[i : min(i + BLOCK_ROWS, out_f)], name, "int4")
            if w.shape[0] < min(BLOCK_ROWS, padded - i):  # the padding rows: zeros, sliced off the output
                w = torch.cat([w, w.new_zeros(min(BLOCK_ROWS, padded - i) - w.shape[0], in_f)])
            q, s, z = quantize_groups(w, group_size)
            scales[i : i + len(w)], zeros[i : i + len(w)] = s, z
            if kernel:
                packs.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
            else:
                codes.append((q - 8).to(torch.int8))
        # (groups, rows, 2): s and z side by side, the layout the kernel reads
        layer.register_buffer("scales_and_zeros", torch.stack([scales.T, zeros.T], -1).to(torch.bfloat16).contiguous())
        layer.register_buffer("packed", torch.cat(packs) if kernel else None)
        layer.register_buffer("codes", None if kernel else torch.cat(codes))
        return layer.to(weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ = (q − 8)·s + z, (out, in). From the kernel's packed layout, by multiplying the
        identity through the kernel (each output is one term: Ŵ rounded to bf16)."""
        if self.packed is not None:
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
            w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros)
            return w_t.T[: self.out_features].to(dtype)
        g = self.codes.float().reshape(self.out_features, -1, self.group_size)
        s, z = self.scales_and_zeros.float().unbind(-1)  # (groups, rows) each
        w = g * s.T[..., None] + z.T[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None and x.device.type == "cpu" and x.numel() > 0:
            shape = x.shape
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), self.packed, self.group_size,
                self.scales_and_zeros,
            )[:, : self.out_features]  # fmt: skip
            if self.bias is not None:
                y = y.float() + self.bias.float()
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        # the formula: y = x Ŵᵀ + b, Ŵ made for this call
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """``.float()``, ``.to(dtype)`` convert the bias; the scales the kernel reads stay bf16."""
        out = super()._apply(fn, recurse)
        self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"
