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
def screening(keep: Tensor, bias: Tensor | None = None) -> Iterator[None]:
    """While inside (this thread only), screened heads return exact logits on their
    candidates and −∞ elsewhere; ``keep`` (LongTensor) are the tokens always rescored,
    ``bias`` a (1, V) bias the model adds after the head (Marian's ``final_logits_bias``)."""
    prev = getattr(_local, "state", None)
    _local.state = (keep, bias)
    try:
        yield
    finally:
        _local.state = prev


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
    _screen_src: object = None  # W's storage: held, so its address is not reused while the copy lives
    _screen_ok: bool = True

    def forward(self, x: Tensor) -> Tensor:
        state = getattr(_local, "state", None)
        if state is None or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
            if torch.is_grad_enabled():
                release(self)
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or self.weight.dtype != torch.float32:
            return super().forward(x)
        copy = self._copy()
        if copy is None:
            return super().forward(x)
        out = self._screened(x.reshape(rows, x.shape[-1]), copy, *state)
        return super().forward(x) if out is None else out.reshape(*x.shape[:-1], out.shape[-1])

    def _copy(self) -> tuple[Tensor, Tensor] | None:
        w = self.weight
        key = (w.data_ptr(), _version(w))
        if key[1] < 0 or not w.is_contiguous():  # an inference tensor: a copy can't be kept in step with it
            return None
        if self._screen is None or self._screen_key != key:
            if self._screen_key is not None and self._screen_key[0] == key[0] and not self._screen_ok:
                return None  # this very weight failed the check before
            with torch.inference_mode(False), torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16), 1)
                norms = w.detach().norm(dim=1)
            self._screen, self._screen_key, self._screen_src = (packed, norms), key, w.untyped_storage()
            self._screen_ok = self._bound_holds(packed, norms)
            if not self._screen_ok:
                self._screen = self._screen_src = None
                return None
        return self._screen

    def _approx(self, x: Tensor, packed: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
        """ẑ (rows, V) fp32 and its error bound b."""
        z = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "").float()
        scale = _epsilon(x.shape[-1]) * torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (rows, 1)
        return z, z.abs().mul_(2 * U).addcmul_(norms, scale)  # b = 2u|ẑ| + ε‖x‖‖W_v‖

    def _bound_holds(self, packed: Tensor, norms: Tensor) -> bool:
        """The kernel's error on this W is within half the bound, on fixed inputs (no RNG) of
        one row and of ``MAX_ROWS`` (oneDNN may pick another kernel for each)."""
        d = self.weight.shape[1]
        with torch.no_grad():
            for rows in (1, MAX_ROWS):
                x = torch.sin(torch.arange(1, rows * d + 1, dtype=torch.float32)).reshape(rows, d) * 3.0
                exact = F.linear(x.double(), self.weight.detach().double())
                z, b = self._approx(x, packed, norms)
                if not bool(((z.double() - exact).abs() <= b.double() / 2).all()):
                    return False
        return True

    def _screened(self, x: Tensor, copy: tuple[Tensor, Tensor], keep: Tensor, bias: Tensor | None) -> Tensor | None:
        z, b = self._approx(x, *copy)
        V = z.shape[1]
        c = bias
        if self.bias is not None:
            c = self.bias if c is None else c + self.bias
        if c is not None:
            z += c
        # fp32 rounding of ẑ + c ± b itself (and of the plain path's own z + c): a relative 2⁻²², generous
        b.add_(z.abs().add_(b), alpha=2.0**-22)
        keep = keep[(keep >= 0) & (keep < V)]  # ids beyond the logits: no mask touches them either
        lo = z - b
        if keep.numel():
            lo.index_fill_(1, keep, float("-inf"))
        t = lo.amax(dim=1, keepdim=True)  # NaN if any ẑ is NaN; ±inf on an overflow
        if not bool(torch.isfinite(t).all()):  # no bound to trust: the plain product
            return None
        hi = z.add_(b)  # ẑ + c + b (ẑ + c is hi − b from here on)
        cand = hi >= t
        if keep.numel():
            cand.index_fill_(1, keep, True)
        idx = (cand[0] if cand.shape[0] == 1 else cand.any(dim=0)).nonzero().squeeze(1)
        if idx.numel() > MAX_CANDIDATES * V:
            return None
        exact = F.linear(x, self.weight.index_select(0, idx), None if self.bias is None else self.bias[idx])
        # The copy must still be W's: the exact logits lie within the bound of the screened ones
        # (a write through .data moves W without a version bump; caught here on the candidates).
        seen = (hi[:, idx] - b[:, idx]) - (exact if bias is None else exact + bias[..., idx])
        if not bool((seen.abs() <= b[:, idx]).all()):
            release(self)
            return None
        out = torch.full_like(z, float("-inf"))
        out.index_copy_(1, idx, exact)
        return out


def release(head: nn.Module) -> None:
    """Drop a screened head's bf16 copy (training, ``screen_output = False``)."""
    for k in ("_screen", "_screen_key", "_screen_src"):
        head.__dict__.pop(k, None)


def prepare(model: nn.Module, on: bool = True) -> tuple[int, Tensor | None]:
    """Make each large fp32 ``lm_head`` of a fast-path model screenable (``on``; off: drop
    their copies). Returns how many, and the bias its owner adds after it (one head only:
    a model with several output layers is not screened). Only :class:`FastLinear` heads
    (the fast path is on: CPU, ``fast_decoding``)."""
    heads = []
    for m in model.modules():
        head = getattr(m, "lm_head", None)
        if not on:
            if isinstance(head, ScreenedLinear):
                release(head)
            continue
        if type(head) is FastLinear and head.weight.dtype == torch.float32 and head.weight.numel() >= MIN_WEIGHT:
            head.__class__ = ScreenedLinear
        if isinstance(head, ScreenedLinear):
            heads.append((head, getattr(m, "logits_bias", None)))
    if len(heads) != 1:
        return 0, None
    bias = heads[0][1]
    return 1, (bias.detach() if isinstance(bias, Tensor) else None)


def keep_tensor(tokens: Sequence[int]) -> Tensor:
    return torch.tensor(sorted(set(tokens)), dtype=torch.long)


__all__ = ["ScreenedLinear", "keep_tensor", "prepare", "release", "screening"]
