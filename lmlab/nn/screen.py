"""Greedy decoding's output layer read at a quarter of the bytes: screen in int8, rescore in fp32.

A greedy step needs one thing from the output layer: which token has the largest logit.
In fp32 that layer is the largest single read of a step (opus-mt's 58,101 × 512 head is
119 MB, more than its whole decoder), and decoding is memory-bound. So, while a greedy
loop asks for it (:func:`screening`), the head of a CPU fp32 model computes, from a
low-precision copy of W,

    ẑ ≈ x · Wᵀ,  |ẑ_v − z_v| ≤ b_v             a screen and a proven bound on each error
    t = max_{v ∉ K} (ẑ_v + c_v − b_v)         the best lower bound (c: the logits' bias)
    C = {v : ẑ_v + c_v + b_v ≥ t} ∪ K          every token that can still be the largest
    z_C = x · W_Cᵀ in fp32                    the exact logits of those few rows

and returns z_C at C and −∞ elsewhere. The argmax of that vector is the argmax of the
full fp32 logits: a token outside C has an upper bound below the lower bound of some token
(the proof is the line defining C). ``K`` are tokens a mask may remove before the argmax
(bad words, EOS before ``min_new_tokens``): always rescored and never the threshold's
witness, so the largest *allowed* logit is still in C. Every other consumer of logits
(sampling, beams, penalties that rescale, log-probabilities) needs all of them and never
asks. Two screens:

- **int8** (:class:`_Int8Copy`, a quarter of W's bytes), where the CPU has int8 dot products
  whose sums are exact (VNNI, AMX): Ŵ_v = s_v·q_v per row, x̂ = a·q_x, and
  b_v = ‖x‖‖W_v − Ŵ_v‖ + ‖x − x̂‖‖Ŵ_v‖ + 2⁻²¹|ẑ_v| (Cauchy–Schwarz on the exact residuals).
- **native** (:class:`_NativeCopy`) for a bf16 head where lmlab's own int8 kernel is built:
  the same codes, blocked, multiplied by x in fp32 (no quantized input), b_v = ‖x‖‖W_v − Ŵ_v‖
  + 2γ_d‖x‖‖Ŵ_v‖ + 2⁻²²|ẑ_v|.
- **bf16** (:class:`_Bf16Copy`, half the bytes) elsewhere: ẑ = bf16(x)·bf16(W)ᵀ and
  b_v = ε‖x‖‖W_v‖ + 2u|ẑ_v|, the standard bound for a dot product of rounded inputs (Higham,
  *Accuracy and Stability of Numerical Algorithms*, §3.1).

A bf16 model's head, on request (``screen_output = True``: its copy is half its bytes), is
screened by the int8 copy and returns what its plain kernel returns: the bound is widened by
the kernel's roundings to bf16 (of z, then of z + a logits bias), so every token that can
reach the largest rounded value is a candidate, and the candidates' fp32 sums are rounded to
bf16: the same values, and the argmax's first-of-equals choice among them.

Each copy checks its kernel once per weight on fixed inputs (the int8 one: that its integer
sums are exact, and the bound), and a kernel that fails is not used.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.nn import heap, int8, native
from lmlab.nn.fastpath import CopyKey, FastLinear, copy_key

#: bf16's unit roundoff (8 significant bits, round to nearest)
U = 2.0**-8
#: heads smaller than this (numbers in W) stay plain: their fp32 read is cheap, often cached
MIN_WEIGHT = 2**22
#: rows screened at once (a greedy batch); more, and the fp32 product is compute-bound anyway
MAX_ROWS = 32
#: ... of a bf16 head, whose int8 copy saves only half its bytes: one (batch-1 decoding).
#: Measured on opus-mt's shape in bf16, screen on vs off: 1.07× at 1 row, 0.98× at 4, 0.87× at 16
MAX_ROWS_BF16 = 1
#: rescoring more than this fraction of the vocabulary means the screen is not separating
#: (a freshly initialised model's near-equal logits): the full fp32 product instead
MAX_CANDIDATES = 1 / 16

_local = threading.local()
_building = threading.Lock()


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


def _probes(d: int) -> list[Tensor]:
    """Fixed inputs (no RNG) of one row and of ``MAX_ROWS`` for a kernel's check; the second
    with rows of very different sizes (one activation scale serves them all)."""
    one = torch.sin(torch.arange(1, d + 1, dtype=torch.float32))[None] * 3.0
    many = torch.sin(torch.arange(1, MAX_ROWS * d + 1, dtype=torch.float32)).reshape(MAX_ROWS, d) * 3.0
    return [one, many * torch.logspace(-3, 3, MAX_ROWS)[:, None]]


def _norms(x: Tensor) -> Tensor:
    """Each row's ‖x‖ (rows, 1) in fp32, computed in fp64 (d numbers: no cost) so that it
    neither underflows nor rounds below the true norm by more than the widening covers."""
    return torch.linalg.vector_norm(x.double(), dim=-1, keepdim=True).mul_(1 + 2.0**-20).float()


CHUNK = 1024  # rows of W handled at a time while building and checking a copy: small transients
#: the int8 copy is packed in parts of about this many bytes (Qwen2-0.5B's head: 5 parts), so
#: that building it holds one part's codes twice, not the whole head's (+130 MiB at the peak)
PART_BYTES = 32 << 20


def _coded_parts(w: Tensor, r: Tensor, m: Tensor, scale: Tensor, part: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """(lo, hi, q) for W's rows in parts of about ``part`` (PART_BYTES) codes, a multiple of CHUNK rows,
    filling r, m and scale (:meth:`_Int8Copy._codes`) as it goes: one part's codes at a time."""
    V, d = w.shape
    step = max(CHUNK, (PART_BYTES if part is None else part) // max(1, d) // CHUNK * CHUNK)
    for lo in range(0, V, step):
        hi = min(V, lo + step)
        q = torch.empty(hi - lo, d, dtype=torch.int8)  # filled in place: no list of pieces to concatenate
        for i in range(lo, hi, CHUNK):
            rows = slice(i, min(hi, i + CHUNK))
            q[i - lo : rows.stop - lo], r[rows], m[rows], scale[rows] = _Int8Copy._codes(w[rows])
        yield lo, hi, q


class _Bf16Copy:
    """ẑ = bf16(x) · bf16(W)ᵀ on oneDNN (W pre-blocked), b = ε‖x‖‖W_v‖ + 2u|ẑ_v|."""

    def __init__(self, w: Tensor) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), 1)
        self.norms = w.norm(dim=1)

    def check(self, w: Tensor) -> bool:
        """The kernel's error on W is within half the bound, on fixed inputs of one row and of
        ``MAX_ROWS`` (oneDNN may pick another kernel for each)."""
        for x in _probes(w.shape[1]):
            z, b = self.approx(x)
            for i in range(0, w.shape[0], CHUNK):
                part = slice(i, i + CHUNK)
                exact = F.linear(x.double(), w[part].double())
                if not bool(((z[:, part].double() - exact).abs() <= b[:, part].double() / 2).all()):
                    return False
        return True

    def approx(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "").float()
        scale = _epsilon(x.shape[-1]) * _norms(x)  # (rows, 1)
        return z, z.abs().mul_(2 * U).addcmul_(self.norms, scale)  # b = 2u|ẑ| + ε‖x‖‖W_v‖


class _Int8Copy:
    """A quarter of W's bytes: per-row int8 weights Ŵ_v = s_v·q_v, and x quantized as
    x̂_r = 2^(−k_r)·a·q_r (row r brought to the batch's largest magnitude by a power of two,
    exact, since the kernel takes one scale a = max|x|/127 for all rows), multiplied on
    oneDNN's int8 kernel, whose integer sums are exact. Then

        x·W_v − x̂·Ŵ_v = x·(W_v − Ŵ_v) + (x − x̂)·Ŵ_v
        |z_v − ẑ_v| ≤ ‖x‖ r_v + ‖x − x̂‖ m_v + 2⁻²¹|ẑ_v|       (Cauchy–Schwarz, twice)

    with r_v = ‖W_v − Ŵ_v‖ and m_v = ‖Ŵ_v‖ computed once in fp64, and 2⁻²¹|ẑ| for the
    kernel's conversion of Σ to fp32 (exact while |Σ| ≤ d·127² < 2²⁴, i.e. d ≤ 1040) and its
    scaling by a·s_v: three roundings at most. Both terms are residuals measured, not worst
    cases: the bound is about as tight as the bf16 screen's, at half its bytes. The input
    goes in as uint8 with zero point 128 (q + 128), the form every oneDNN build accepts."""

    def __init__(self, w: Tensor) -> None:
        V, d = w.shape
        self.scale, self.r, self.m = torch.empty(V), torch.empty(V), torch.empty(V)
        self.parts: list[tuple[int, int, Tensor]] = []  # (first row, end row, oneDNN's packed codes)
        for lo, hi, q in _coded_parts(w, self.r, self.m, self.scale):  # the codes and their packed form, a part at a time
            self.parts.append((lo, hi, torch.ops.onednn.qlinear_prepack(q, None)))
        self.zero = torch.zeros(V, dtype=torch.int32)

    @staticmethod
    def _codes(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, r_v, m_v, s_v of some rows of W (r and m in fp64, widened for their fp32 rounding)."""
        part = w.float()  # a bf16 weight's numbers, exactly
        q, s = int8.quantize_rows(part)
        deq = q.double() * s.double()[:, None]
        widen = 1 + 2.0**-20  # fp64 -> fp32 may round down
        return q, (part.double() - deq).norm(dim=1) * widen, deq.norm(dim=1) * widen, s

    def check(self, w: Tensor) -> bool:
        """On fixed inputs of one row and (unless a bf16 head is screened at one row only,
        ``MAX_ROWS_BF16``) of ``MAX_ROWS``: the kernel computes
        a·s_v·Σ q_x q_v with exact integer sums (to the 3–4·2⁻²⁴ of its fp32 roundings; checked
        at 2⁻²⁰: a kernel that saturates or rounds its sums is off by far more), and its error
        against x·W_v is within the bound. In row blocks (the codes made again): no fp64 copy
        of all of W, no second copy of the codes."""
        probes = _probes(w.shape[1])
        for x in probes if w.dtype == torch.float32 or MAX_ROWS_BF16 > 1 else probes[:1]:  # bf16: the rows it screens
            z, b = self.approx(x)
            a, qx, f = self._quantized(x)  # the probes are finite
            for i in range(0, w.shape[0], CHUNK):
                part = slice(i, i + CHUNK)
                q = int8.quantize_rows(w[part].float())[0]
                want = F.linear(qx.double() - 128, q.double()) * (a * self.scale[part].double()) / f.double()
                got = z[:, part].double()
                exact = F.linear(x.double(), w[part].double())
                if not bool(((got - want).abs() <= want.abs() * 2.0**-20).all()):
                    return False
                if not bool(((got - exact).abs() <= b[:, part].double()).all()):
                    return False
        return True

    @staticmethod
    def _quantized(x: Tensor) -> tuple[float, Tensor, Tensor] | None:
        """a, q_x (uint8, q + 128) and f (rows, 1): x̂ = a·(q_x − 128)/f (:func:`int8.row_scales`)."""
        scales = int8.row_scales(x)
        if scales is None:
            return None
        a, f = scales
        return a, torch.round(x * f / a).clamp_(-127, 127).add_(128).to(torch.uint8), f

    def approx(self, x: Tensor) -> tuple[Tensor, Tensor]:
        quantized = self._quantized(x)
        if quantized is None:  # a NaN or an infinity: no bound (the caller takes the plain product)
            nan = torch.full((x.shape[0], self.zero.shape[0]), float("nan"))
            return nan, nan.clone()
        a, qx, f = quantized
        z = torch.empty(x.shape[0], self.zero.shape[0])
        for lo, hi, packed in self.parts:
            z[:, lo:hi] = torch.ops.onednn.qlinear_pointwise(
                qx, a, 128, packed, self.scale[lo:hi], self.zero[lo:hi], None, 1.0, 0, torch.float32, "none", [], ""
            )  # fmt: skip
        z.div_(f)
        err = _norms(x - (qx.float() - 128) * a / f)  # ‖x − x̂‖ (x̂ itself rounds by 2⁻²⁴: below)
        nx = _norms(x)
        b = z.abs().mul_(2.0**-21).addcmul_(self.r, nx).addcmul_(self.m, err.add_(nx, alpha=2.0**-22))
        return z, b


class _NativeCopy:
    """A bf16 head's screen on lmlab's own int8 kernel (:mod:`lmlab.nn.native`): the per-row
    codes Ŵ_v = s_v·q_v of :class:`_Int8Copy`, blocked in the kernel's order (a quarter of W's
    bytes, read at ~30 GB/s where oneDNN's int8 kernel reads ~18 after quantizing x), and x kept
    in fp32 — no ‖x − x̂‖ term:

        ẑ_v = fl(s_v · fl(Σ_k x_k q_vk))          fp32 sums (FMAs; q widened exactly)
        |z_v − ẑ_v| ≤ ‖x‖ r_v + 2γ_d ‖x‖ m_v + 2⁻²²|ẑ_v| + 2⁻¹⁴⁰

    x·(W_v − Ŵ_v) by Cauchy–Schwarz (r_v = ‖W_v − Ŵ_v‖); an fp32 sum of d products in any order
    is within γ_d Σ|x_k Ŵ_vk| ≤ γ_d ‖x‖ m_v (Higham §3.1; m_v = ‖Ŵ_v‖; the kernel's longest
    chain of roundings is d/16 + 4), doubled; the scaling by s_v rounds once (2⁻²⁴|ẑ|, taken
    4×), and 2⁻¹⁴⁰ for fp32's subnormal range. The bound is computed in fp64 from fp64 r_v,
    m_v and ‖x‖, widened, then rounded to fp32. A ẑ that overflowed (a finite x with huge
    entries) gives no bound: the plain product."""

    def __init__(self, w: Tensor) -> None:
        V, d = w.shape
        if d % 16 or CHUNK % native.BLOCK or not native.available():  # (parts of CHUNK rows keep blocks whole)
            raise RuntimeError("lmlab's int8 kernel is not built here, or d is not a multiple of 16")
        self.scale = torch.empty(V)
        r, m = torch.empty(V, dtype=torch.float64), torch.empty(V, dtype=torch.float64)
        codes = torch.empty(V * d, dtype=torch.int8)
        for lo, hi, q in _coded_parts(w, r, m, self.scale, 0):  # CHUNK rows at a time: blocks stay whole
            native.block(q, out=codes[lo * d : hi * d])  # (rows lo.. blocked are that stretch)
        self.blocked = native.Blocked(codes, V, d)
        self.gamma = 2 * d * 2.0**-24 / (1 - d * 2.0**-24)
        self.m = m
        self.rm = r.add_(m, alpha=self.gamma)  # r_v + 2γ_d m_v, in fp64

    def check(self, w: Tensor) -> bool:
        """On the fixed one-row input: the kernel's sums are within their own rounding term of
        s_v·(x·q_v) in fp64 (a layout or kernel error is off by far more), and ẑ within the
        bound of x·W_v."""
        x = _probes(w.shape[1])[0]
        z, b = self.approx(x)
        nx = torch.linalg.vector_norm(x.double())
        for i in range(0, w.shape[0], CHUNK):
            part = slice(i, min(w.shape[0], i + CHUNK))
            q = self.blocked.dense_rows(part.start, part.stop).double()
            got = z[:, part].double()
            want = F.linear(x.double(), q) * self.scale[part].double()
            own = self.m[part] * (self.gamma * nx) + got.abs() * 2.0**-22 + 2.0**-140
            if not bool(((got - want).abs() <= own).all()):
                return False
            exact = F.linear(x.double(), w[part].double())
            if not bool(((got - exact).abs() <= b[:, part].double()).all()):
                return False
        return True

    def approx(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = native.int8_linear(x, self.blocked, self.scale, None) if x.shape[0] <= MAX_ROWS_BF16 else None
        if z is None or not bool(torch.isfinite(z).all()):  # more rows than a bf16 head screens (1),
            # the kernel refused, or a sum overflowed: no bound (the plain product)
            nan = torch.full((x.shape[0], self.blocked.rows), float("nan"))
            return nan, nan.clone()
        nx = torch.linalg.vector_norm(x.double(), dim=-1, keepdim=True)
        b = (self.rm * nx).add_(z.double().abs(), alpha=2.0**-22).mul_(1 + 2.0**-20).add_(2.0**-140)
        return z, b.float()


#: None: the int8 screen where oneDNN's int8 kernel sums exactly (VNNI or AMX), else the
#: bf16 one; True/False force it (tests)
INT8: bool | None = None
#: None: a bf16 head screens on lmlab's own int8 kernel (_NativeCopy) where built; False: not
NATIVE: bool | None = None


def int8_screen() -> bool:
    return int8.exact_sums() if INT8 is None else INT8


def screenable(w: Tensor) -> bool:
    """fp32 weights (either screen); bf16 ones with an int8 screen only, oneDNN's or lmlab's (a
    bf16 copy of a bf16 weight would save nothing)."""
    return w.dtype == torch.float32 or (
        w.dtype == torch.bfloat16 and (int8_screen() or (NATIVE is not False and native.available()))
    )


class ScreenedLinear(FastLinear):
    """An output layer (``lm_head``) that screens while a greedy loop asks; otherwise exactly
    :class:`FastLinear`. Holds a low-precision copy of W (int8 per row where the CPU sums
    int8 exactly, else bf16 in oneDNN's layout) with what its bound needs, made on first use
    and remade when W changes (dropped when the model trains)."""

    _screen: _NativeCopy | _Int8Copy | _Bf16Copy | None = None
    _screen_key: CopyKey | None = None
    _screen_src: object = None  # W's storage: held, so its address is not reused while the copy lives
    _screen_ok: bool = True

    def forward(self, x: Tensor) -> Tensor:
        state = getattr(_local, "state", None)
        if state is None or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != self.weight.dtype:
            if torch.is_grad_enabled():
                release(self)
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        if rows > (MAX_ROWS if self.weight.dtype == torch.float32 else MAX_ROWS_BF16) or not screenable(self.weight):
            return super().forward(x)
        copy = self._copy()
        if copy is None:
            return super().forward(x)
        out = self._screened(x.reshape(rows, x.shape[-1]).float(), copy, *state)
        return super().forward(x) if out is None else out.reshape(*x.shape[:-1], out.shape[-1])

    def _copy(self) -> _NativeCopy | _Int8Copy | _Bf16Copy | None:
        w = self.weight
        key = copy_key(w)
        if key is None or not w.is_contiguous():
            return None
        if self._screen is not None and self._screen_key == key:
            return self._screen
        with _building:  # one thread builds (and checks) a copy at a time: one transient, no unchecked copy seen
            if self._screen is not None and self._screen_key == key:
                return self._screen
            if self._screen_key is not None and self._screen_key[0] == key[0] and not self._screen_ok:
                return None  # this very weight failed the check before
            copy = None
            kinds = [_NativeCopy] if w.dtype == torch.bfloat16 and NATIVE is not False and native.available() else []
            kinds += [_Int8Copy] if int8_screen() else []
            kinds += [_Bf16Copy] if w.dtype == torch.float32 else []  # a bf16 copy of a bf16 W saves nothing
            for kind in kinds:
                try:
                    with torch.inference_mode(False), torch.no_grad():
                        made = kind(w.detach())
                        if made.check(w.detach()):
                            copy = made
                            break
                except RuntimeError:  # a oneDNN build without this op or input type: the next kind
                    continue
            self._screen, self._screen_key, self._screen_ok = copy, key, copy is not None
            self._screen_src = None if copy is None else w.untyped_storage()
            heap.trim()  # the build's transients, back to the system
            return copy

    def _screened(
        self, x: Tensor, copy: _NativeCopy | _Int8Copy | _Bf16Copy, keep: Tensor, bias: Tensor | None
    ) -> Tensor | None:
        (z, b), V = copy.approx(x), self.weight.shape[0]
        parts = [t.float() for t in (bias, self.bias) if t is not None]  # in fp32: no rounding of their sum
        c = sum(parts) if parts else None
        if self.weight.dtype == torch.bfloat16:
            # The plain bf16 path rounds z (+ its own bias) to bf16, then again after + the logits'
            # bias: |P_v − (z_v + c_v)| ≤ 2⁻⁸(|z_v| + |b_own|) + 2⁻⁸(|z_v| + |b_own| + |c_v|) + tiny.
            # Widened by that (doubled), every token whose plain value can reach the plain maximum
            # is a candidate, and rounding the candidates as the plain path does reproduces its
            # choice, first of equal values included.
            b.add_(z.abs().add_(b).add_(sum(t.abs() for t in parts)), alpha=2.0**-6)
            b.add_(2.0**-132)  # bf16 rounds |z| < 2⁻¹³⁴ to 0: a relative widening alone misses that
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
        w, b_own = self.weight.index_select(0, idx).float(), None if self.bias is None else self.bias[idx].float()
        exact = F.linear(x, w, b_own)  # fp32 sums (a bf16 model's numbers, exactly multiplied)
        # The copy must still be W's: the exact logits lie within the bound of the screened ones
        # (a write through .data moves W without a version bump; caught here on the candidates).
        seen = (hi[:, idx] - b[:, idx]) - (exact if bias is None else exact + bias[..., idx].float())
        broken = ~(seen.abs() <= b[:, idx])  # NaN included: an exact logit gone NaN is a W that moved
        if bool(broken.any()):  # released unless the copy's own ẑ or bound overflowed there (a kept token's)
            if bool((broken & torch.isfinite(hi[:, idx]) & torch.isfinite(b[:, idx])).any()):
                release(self)
            return None
        # a bf16 model's logits as its plain kernel gives them: fp32 sums rounded once to bf16
        out = torch.full_like(z, float("-inf"), dtype=self.weight.dtype)
        out.index_copy_(1, idx, exact.to(out.dtype))
        return out


def release(head: nn.Module) -> None:
    """Drop a screened head's copy (training; ``screen_output`` False, or None for a bf16 head)."""
    for k in ("_screen", "_screen_key", "_screen_src"):
        head.__dict__.pop(k, None)


def prepare(model: nn.Module, on: bool = True, bf16: bool = True) -> tuple[int, Tensor | None]:
    """Make each large :class:`FastLinear` ``lm_head`` screenable — fp32, and bf16 with ``bf16`` (else
    its copy goes) — or (``on`` False) drop every copy. Returns how many, and the bias its
    owner adds after it (one head only: several output layers are not screened)."""
    heads = []
    for m in model.modules():
        head = getattr(m, "lm_head", None)
        if not on:
            if isinstance(head, ScreenedLinear):
                release(head)
            continue
        if type(head) is FastLinear and screenable(head.weight) and head.weight.numel() >= MIN_WEIGHT:
            head.__class__ = ScreenedLinear
        if isinstance(head, ScreenedLinear):
            heads.append((head, getattr(m, "logits_bias", None)))
            if not bf16 and head.weight.dtype == torch.bfloat16:
                release(head)  # (a bf16 head screens only on request: model.screen_output)
    if len(heads) != 1 or (not bf16 and heads[0][0].weight.dtype == torch.bfloat16):
        return 0, None
    bias = heads[0][1]
    return 1, (bias.detach() if isinstance(bias, Tensor) else None)


def keep_tensor(tokens: Sequence[int]) -> Tensor:
    return torch.tensor(sorted(set(tokens)), dtype=torch.long)


__all__ = ["ScreenedLinear", "keep_tensor", "prepare", "release", "screening"]
