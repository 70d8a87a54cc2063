"""Greedy decoding's output layer read at half the bytes: screen in bf16, rescore in fp32.

A greedy step needs one thing from the output layer: which token has the largest logit.
In fp32 that layer is the largest single read of a step (opus-mt's 58,101 × 512 head is
119 MB, more than its whole decoder), and decoding is memory-bound. So, while a greedy
loop asks for it (:func:`screening`), the head of a CPU fp32 model computes

    ẑ = bf16(x) · bf16(W)ᵀ                  half the bytes of W, fp32 sums, a bf16 result
    |ẑ_v − z_v| ≤ b_v = ε ‖x‖ ‖W_v‖ + 2u |ẑ_v|      u = 2⁻⁸, bf16's unit roundoff; ε ≥ 2u + u² + γ_d
    t = max_{v ∉ K} (ẑ_v + c_v − b_v)         the best lower bound (c: the logits' bias)
    C = {v : ẑ_v + c_v + b_v ≥ t} ∪ K          every token that can still be the largest
    z_C = x · W_Cᵀ in fp32                    the exact logits of those few rows

and returns z_C at C and −∞ elsewhere. The argmax of that vector is the argmax of the
full fp32 logits: a token outside C has an upper bound below the lower bound of some token
(the proof is the line defining C). ``K`` are tokens a mask may remove before the argmax
(bad words, EOS before ``min_new_tokens``): always rescored and never the threshold's
witness, so the largest *allowed* logit is still in C. Every other consumer of logits
(sampling, beams, penalties that rescale, log-probabilities) needs all of them and never
asks. The bound is the standard one for a dot product of rounded inputs (Higham, *Accuracy
and Stability of Numerical Algorithms*, §3.1) with Cauchy–Schwarz for Σ|x_i||W_vi|; it is
checked once per weight against the fp32 product, and a kernel that breaks it is not used.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.nn.fastpath import FastLinear, _version

#: bf16's unit roundoff (8 significant bits, round to nearest)
U = 2.0**-8
#: heads smaller than this (numbers in W) stay plain: their fp32 read is cheap, often cached
MIN_WEIGHT = 2**22
#: rows screened at once (a greedy batch); more, and the fp32 product is compute-bound anyway
MAX_ROWS = 32
#: rescoring more than this fraction of the vocabulary means the screen is not separating
#: (a freshly initialised model's near-equal logits): the full fp32 product instead
MAX_CANDIDATES = 1 / 16

_local = threading.local()


@contextmanager
def screening(keep: Tensor) -> Iterator[None]:
    """While inside (this thread only), screened heads return exact logits on their
    candidates and −∞ elsewhere; ``keep`` (LongTensor) are the tokens always rescored."""
    prev = getattr(_local, "keep", None)
    _local.keep = keep
    try:
        yield
    finally:
        _local.keep = prev


def _epsilon(d: int) -> float:
    """Twice the bound on |Σ x̂_i Ŵ_i − Σ x_i W_i| / Σ|x_i W_i| over d terms: each product
    of two rounded factors is off by 2u + u², fp32 sums in any order add γ_d = d·2⁻²⁴/(1 − d·2⁻²⁴)."""
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    return 2 * (2 * U + U * U + gamma * (1 + U) ** 2)


class ScreenedLinear(FastLinear):
    """An output layer (``lm_head``) that screens while a greedy loop asks; otherwise exactly
    :class:`FastLinear`. Holds a bf16 copy of W in oneDNN's layout and the rows' norms, made
    on first use and remade when W changes (dropped when the model trains)."""

    _screen: tuple[Tensor, Tensor] | None = None
    _screen_key: tuple[int, int] | None = None
    _screen_ok: bool = True
    _owner: weakref.ref | None = None  # the module holding a logits bias added after this layer

    def forward(self, x: Tensor) -> Tensor:
        keep = getattr(_local, "keep", None)
        if keep is None or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
            if torch.is_grad_enabled():
                self._screen = self._screen_key = None
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or not self._screen_ok or self.weight.dtype != torch.float32:
            return super().forward(x)
        copy = self._copy()
        if copy is None:
            return super().forward(x)
        out = self._screened(x.reshape(rows, x.shape[-1]), copy, keep)
        return super().forward(x) if out is None else out.reshape(*x.shape[:-1], out.shape[-1])

    def _copy(self) -> tuple[Tensor, Tensor] | None:
        w = self.weight
        key = (w.data_ptr(), _version(w))
        if key[1] < 0 or not w.is_contiguous():  # an inference tensor: a copy can't be kept in step with it
            return None
        if self._screen is None or self._screen_key != key:
            with torch.inference_mode(False), torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16), 1)
                norms = w.detach().norm(dim=1)
            self._screen, self._screen_key = (packed, norms), key
            self._screen_ok = self._bound_holds(packed, norms)
            if not self._screen_ok:
                self._screen = self._screen_key = None
                return None
        return self._screen

    def _approx(self, x: Tensor, packed: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
        """ẑ (rows, V) fp32 and its error bound b."""
        z = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "").float()
        scale = _epsilon(x.shape[-1]) * torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (rows, 1)
        return z, z.abs().mul_(2 * U).addcmul_(norms, scale)  # b = 2u|ẑ| + ε‖x‖‖W_v‖

    def _bound_holds(self, packed: Tensor, norms: Tensor) -> bool:
        """The kernel's error on this W is within half the bound, on a fixed input (no RNG)."""
        d = self.weight.shape[1]
        x = torch.sin(torch.arange(1, 2 * d + 1, dtype=torch.float32)).reshape(2, d) * 3.0
        with torch.no_grad():
            exact = F.linear(x.double(), self.weight.detach().double())
            z, b = self._approx(x, packed, norms)
        return bool(((z.double() - exact).abs() <= b.double() / 2).all())

    def _screened(self, x: Tensor, copy: tuple[Tensor, Tensor], keep: Tensor) -> Tensor | None:
        z, b = self._approx(x, *copy)
        owner = self._owner() if self._owner is not None else None
        c = getattr(owner, "logits_bias", None)
        if self.bias is not None:
            c = self.bias if c is None else c + self.bias
        if c is not None:
            z += c
        lo = z - b
        if keep.numel():
            lo.index_fill_(1, keep, float("-inf"))
        t = lo.amax(dim=1, keepdim=True)  # NaN if any ẑ is NaN; ±inf on an overflow
        if not bool(torch.isfinite(t).all()):  # no bound to trust: the plain product
            return None
        cand = z.add_(b).ge_(t)  # ẑ + c + b ≥ t (ẑ is not needed after this)
        if keep.numel():
            cand.index_fill_(1, keep, 1.0)
        idx = (cand[0] if cand.shape[0] == 1 else cand.amax(dim=0)).nonzero().squeeze(1)
        if idx.numel() > MAX_CANDIDATES * z.shape[1]:
            return None
        exact = F.linear(x, self.weight.index_select(0, idx), None if self.bias is None else self.bias[idx])
        out = torch.full_like(z, float("-inf"))
        out.index_copy_(1, idx, exact)
        return out


def prepare(model: nn.Module) -> int:
    """Make each large fp32 ``lm_head`` of a fast-path model screenable; returns how many.
    Only :class:`FastLinear` heads (the fast path is on: CPU, ``fast_decoding``)."""
    n = 0
    for m in model.modules():
        head = getattr(m, "lm_head", None)
        if type(head) is FastLinear and head.weight.dtype == torch.float32 and head.weight.numel() >= MIN_WEIGHT:
            head.__class__ = ScreenedLinear
            head.__dict__["_owner"] = weakref.ref(m)  # not a submodule: no registration, no cycle
        n += isinstance(head, ScreenedLinear)
    return n


def keep_tensor(tokens: Sequence[int]) -> Tensor:
    return torch.tensor(sorted(set(tokens)), dtype=torch.long)


__all__ = ["ScreenedLinear", "keep_tensor", "prepare", "screening"]
