"""Norms and feed-forward blocks.

Plain PyTorch layers: the CPU decoding kernel for the linear layers lives beside them, in
:mod:`lmlab.nn.fastpath`, and is switched on by the decoding loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Zhang & Sennrich (2019): y = x / sqrt(mean(x²) + eps) · w — no mean, no bias.

    Computed in float32 whatever the input dtype (as Llama does), then cast back.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fused, same formula
        x = x.float()
        if x.device.type == "cpu":
            # x·rsqrt(mean(x²) + eps) in float32 as one fused op (2% faster bf16 decoding): on the
            # CPU it rounds as the formula below does; on CUDA it does not, by an ulp
            return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps).to(dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """The config's norm by name: "rmsnorm" (Llama) or "layernorm" (GPT-2)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    # LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) · w + b
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def gelu_new(x: Tensor) -> Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), one op at a time as in GPT-2's code.

    The same function as ``F.gelu(x, approximate="tanh")``; in bf16, where every op rounds,
    only this spelling gives transformers' ``gelu_new`` values bit for bit.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACT = {
    "gelu": lambda x: F.gelu(x),  # exact: x·Φ(x)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation, fused
    "gelu_new": lambda x: gelu_new(x),  # the same, op by op as GPT-2 (and transformers) compute it
    "silu": F.silu,  # x·σ(x), a.k.a. swish
    "relu": F.relu,
}


class MLP(nn.Module):
    """The position-wise feed-forward network.

    plain:  down(act(up(x)))                       (GPT-2, 4× expansion)
    gated:  down(act(gate(x)) ⊙ up(x))             (SwiGLU, Shazeer 2020; Llama)
    The gated form keeps gate and up in one matrix (``gate_up``) so one matmul
    computes both halves.
    """

    def __init__(
        self, d_model: int, d_ff: int, activation: str, gated: bool, bias: bool, dropout: float
    ) -> None:
        super().__init__()
        self.gated = gated
        self.act = _ACT[activation]
        self.up = nn.Linear(d_model, (2 if gated else 1) * d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.down(h))

    def step(self, x: Tensor) -> Tensor:
        """:meth:`forward` in inference without the module calls and the dropout (a decoding
        step's unrolled path, :func:`lmlab.nn.fastpath.unrolling`)."""
        h = self.up.forward(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down.forward(h)
