"""Norms and feed-forward blocks."""

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
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Linear(nn.Linear):
    """y = x Wᵀ + b, exactly ``nn.Linear``, with an optional fast path for decoding on the CPU.

    Decoding reads every weight once per token, so its speed is the speed at which the
    matrix-vector kernel streams W from memory. PyTorch's CPU ``F.linear`` goes to MKL,
    which on this project's AMD machine (measured: benchmarks/decode.py) reads an (out, in)
    fp32 matrix at about half the speed oneDNN does, and runs prefill-sized products at
    half of oneDNN's FLOP rate. With
    ``fast`` set (by :func:`set_fast_linear`) and autograd off, the product runs on
    oneDNN's linear kernel instead: the same W (fp32: read in place, no copy; bf16: a
    copy in oneDNN's blocked layout, made once and remade if W changes). Training, and
    any forward with autograd on, takes the plain path.
    """

    fast: bool = False
    _packed: Tensor | None = None
    _packed_key: tuple[int, int, torch.dtype] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and not torch.is_grad_enabled() and x.device.type == "cpu":
            return self._fast_forward(x)
        # A forward with autograd on is training: W is about to change, possibly in ways its
        # version counter does not see (a fused optimizer step, `.data` writes); drop the copy.
        self._packed = self._packed_key = None
        return F.linear(x, self.weight, self.bias)

    def _fast_forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype != w.dtype or w.dtype not in (torch.float32, torch.bfloat16) or not w.is_contiguous():
            return F.linear(x, w, self.bias)
        if w.dtype == torch.bfloat16:  # oneDNN's bf16 kernel wants W pre-blocked (2× faster)
            key = (w.data_ptr(), _version(w), w.dtype)
            # An inference tensor (version -1) has no write counter: never trust a copy of it.
            if self._packed is None or self._packed_key != key or key[1] < 0:
                with torch.inference_mode(False):  # a plain tensor, usable outside inference mode
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
                self._packed_key = key
            w = self._packed
        # y = x Wᵀ + b on oneDNN (the same formula as F.linear; summation order may differ)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, self.bias, "none", [], "")


def _version(t: Tensor) -> int:
    """The in-place write counter of ``t`` (an optimizer step or ``copy_`` bumps it);
    -1 for an inference tensor, which cannot be modified in place outside inference mode."""
    try:
        return t._version
    except RuntimeError:
        return -1


def fast_linear_available() -> bool:
    """oneDNN's linear op exists in this PyTorch build (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def set_fast_linear(module: nn.Module, enabled: bool = True) -> int:
    """Turn the oneDNN path of every :class:`Linear` in ``module`` on or off; returns how many.

    Checked once on a small product against ``F.linear``: where oneDNN is missing or
    refuses (an old build, an unsupported dtype), everything stays on the plain path.
    """
    linears = [m for m in module.modules() if isinstance(m, Linear)]
    if enabled and not _fast_linear_works():
        enabled = False
    for m in linears:
        m.fast = enabled
        if not enabled:
            m._packed = m._packed_key = None
    return len(linears) if enabled else 0


_FAST_OK: bool | None = None


def _fast_linear_works() -> bool:
    """oneDNN's op runs here and agrees with ``F.linear`` on a small fixed product (fp32 and
    bf16). Uses no random numbers: probing must not move torch's global generator."""
    global _FAST_OK
    if _FAST_OK is None:
        _FAST_OK = False
        if fast_linear_available():
            w = torch.linspace(-1, 1, 32).reshape(4, 8)
            b, x = torch.linspace(0, 1, 4), torch.linspace(-2, 2, 16).reshape(2, 8)
            try:
                with torch.no_grad(), torch.inference_mode(False):
                    for dt in (torch.float32, torch.bfloat16):
                        wd = w.to(dt)
                        packed = wd if dt == torch.float32 else torch.ops.mkldnn._reorder_linear_weight(wd, 1)
                        got = torch.ops.mkldnn._linear_pointwise(x.to(dt), packed, b.to(dt), "none", [], "")
                        if not torch.allclose(got.float(), F.linear(x, w, b), atol=5e-2):
                            return False
                _FAST_OK = True
            except (RuntimeError, AttributeError, NotImplementedError):
                _FAST_OK = False
    return _FAST_OK


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
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
        self.up = Linear(d_model, (2 if gated else 1) * d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.down(h))
