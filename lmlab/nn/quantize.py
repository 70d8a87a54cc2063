"""Weight-only int8 quantization of a model's linear layers, for faster CPU decoding.

Decoding reads every weight once per token, so a weight stored in one byte instead of four
(fp32) or two (bf16) is read 4× or 2× faster. Each output channel (row o of W) gets its
own scale, symmetric around zero:

    s_o  = max_i |W_oi| / 127
    q_oi = round(W_oi / s_o)  ∈ [-127, 127]          (int8)
    W_oi ≈ s_o · q_oi                                 error ≤ s_o / 2 per weight

and y = x Wᵀ + b ≈ (x qᵀ) ⊙ s + b: the scale is applied to the output, once per channel.
Activations stay in floating point (weight-only: no calibration data needed). On a CPU with
AVX-512 the products of decoding (up to NATIVE_MAX_ROWS rows) run on lmlab's own kernel
(:mod:`lmlab.nn.native`: the codes widened to fp32 in registers, fp32 sums, 8 rows of x per
pass over q), built with g++ on first use; more rows dequantize (below). Without it, they run on PyTorch's int8-weight
kernel (``torch._weight_int8pack_mm``, which takes bfloat16 activations), and an
output-layer-sized weight on oneDNN's int8 kernel where the CPU sums int8 exactly
(VNNI/AMX), the input split into two int8 parts (~14 bits: finer than bf16), which streams
a large int8 matrix from memory where PyTorch's kernel does not (cache-cold, 58,101 × 512:
1.6 vs 2.8 ms); its packed copy then replaces the codes (they read back from it exactly).
Elsewhere, or without those kernels, the weight is dequantized on the fly and multiplied
with ``F.linear`` — the formula above, spelled out.

    model = lmlab.load("gpt2", quantize="int8")        # or: lmlab generate gpt2 --quantize int8
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.messages import warn
from lmlab.nn import int8, native
from lmlab.nn.fastpath import CopyKey, copy_key
from lmlab.nn.heap import freed, trim
from lmlab.nn.int4 import GROUP_SIZE, Int4Linear, finite_float
from lmlab.nn.int8 import quantize_rows
from lmlab.nn.int8_blocked import LOCK, BlockedCodes

QUANTIZE_CHOICES = ("none", "int8", "int4")

#: rows (tokens × batch) from which a product dequantizes its weight to bf16 instead of
#: running the int8 kernel: a prefill (measured: 512 rows 3.5–5.8× faster, 64 rows even)
DEQUANTIZE_ROWS = 128
#: rows up to which products run on oneDNN's int8 kernel (where its sums are exact): decoding
MAX_ONEDNN_ROWS = 64
#: ... for weights of at least this many numbers (an output layer): its input's two-part
#: quantization costs ~15 small ops, which a decoder-sized product cannot repay
ONEDNN_MIN_WEIGHT = 2**22
#: ... but not a weight of more than 32M numbers (an output layer of 150k × 896), whose bf16
#: copy would be a spike of 2 bytes a weight: those stay on the int8 kernel
DEQUANTIZE_MAX = 2**25
#: rows up to which products run on lmlab's own kernel (lmlab.nn.native), where it is built:
#: it reads the codes once per 8 rows, so from ~32 rows dequantizing to bf16 is faster
#: (4,864 × 896: 1.57 vs 1.76 ms at 32 rows, 3.04 vs 1.84 at 64); above, those products
#: dequantize (no oneDNN copy is made). An output-layer-sized weight (> DEQUANTIZE_MAX),
#: which is not dequantized whole, takes the kernel up to 8 rows and oneDNN's above — unless
#: its codes are blocked (it has decoded): then BLOCKED_MAX_ROWS_BIG, below.
NATIVE_MAX_ROWS, NATIVE_MAX_ROWS_BIG = 32, 8
#: rows up to which an output-layer-sized weight whose codes are blocked (it has decoded) stays
#: on the kernel; more (a long sequence's logits): BlockedCodes._from_blocked
BLOCKED_MAX_ROWS_BIG = 64


#: guards the swap of a layer's codes and the copy that replaces them (one pair, never one without the other)
_lock = LOCK

#: rows of W quantized at a time (from_linear): at most this many, and at most
#: QUANTIZE_BYTES of them in fp32 (quantize_rows makes a few transients of that size)
QUANTIZE_ROWS, QUANTIZE_BYTES = 4096, 4 << 20
#: rows of W dequantized in fp64 at a time for the one-time check of oneDNN's kernel (4 MB
#: transients at d 1024: 4096 rows left +70 MB that glibc kept after the first check)
CHECK_ROWS = 512


class QuantLinear(BlockedCodes, nn.Module):
    """A linear layer with int8 weights and one float32 scale per output channel.

    Buffers: ``qweight`` (out, in) int8, ``scale`` (out,) float32, ``bias`` (out,) or None,
    in the dtype of the layer it replaced. Inference only (nothing here has a gradient).
    """

    quantized_layer = True  # (lmlab.nn.fastpath.quantized: the unrolled decoding step serves it)

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("_ones", torch.ones(qweight.shape[0], dtype=torch.bfloat16), persistent=False)
        # False: always the dequantize-and-multiply path. The CPU kernel reads the input dimension
        # 16 values at a time and has no tail: other widths give wrong sums or crash (torch 2.13)
        self.fast = self.in_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "") -> QuantLinear:
        """Per-row codes and scales of W, made a block of rows at a time: the float32 transients
        of a 151,936-row output layer would be several times its size at once."""
        weight = linear.weight.detach()
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        block = max(1, min(QUANTIZE_ROWS, QUANTIZE_BYTES // (4 * max(1, weight.shape[1]))))
        for i in range(0, weight.shape[0], block):
            w = finite_float(weight[i : i + block], name, "int8")
            q[i : i + block], scale[i : i + block] = quantize_rows(w)  # row by row: the same codes
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """``.float()``, ``.to(dtype)`` convert the bias; the kernel's unit scales stay bf16."""
        self.unpack()  # the codes themselves go wherever the module goes
        out = super()._apply(fn, recurse)
        self._ones = self._ones.to(torch.bfloat16)
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W ≈ s_o · q_oi, as a (out, in) float tensor."""
        return (self._codes().float() * self.scale[:, None]).to(dtype)

    def _dequantized_blocks(self, rows: int = CHECK_ROWS) -> Iterator[Tensor]:
        """``dequantize()`` in fp64, ``rows`` rows at a time: no fp64 copy of all of W."""
        q = self._codes()
        for i in range(0, self.out_features, rows):
            yield (q[i : i + rows].float() * self.scale[i : i + rows, None]).double()

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            # a gradient through the layer (to x; the codes have none): the formula, whose
            # backward autograd knows (the kernels below have none)
            return self._formula(x)
        bound = self.__dict__.get("_bound")
        if bound is not None and x.numel() <= bound[1] * self.in_features:
            # a decoding step's product, on the kernel bound to these very codes, scales and bias
            d, b = self.__dict__, self._buffers
            if (
                bound[0] is d.get("_held")
                and b["qweight"] is bound[0][1]
                and b["scale"] is bound[2]
                and b.get("bias") is bound[3]
                and not self._plain_written()
            ):
                y = bound[4](x)
                if y is not None:
                    return y
        fast_cpu = self.fast and x.device.type == "cpu"
        rows, numel = x.numel() // max(1, self.in_features), self.out_features * self.in_features
        own = fast_cpu and self._native_serves(x)
        big = numel > DEQUANTIZE_MAX
        blocked = big and fast_cpu and self._blocked()
        if own and (rows <= (NATIVE_MAX_ROWS_BIG if big else NATIVE_MAX_ROWS) or (blocked and rows <= BLOCKED_MAX_ROWS_BIG)):
            # (an output layer whose codes are blocked for the kernel stays on it rather than
            # have a oneDNN copy made in their place)
            y = self._native(x)
            if y is not None:
                return y
        if blocked and x.numel() > 0 and x.shape[-1] == self.in_features:
            return self._from_blocked(x)
        dequantize = fast_cpu and rows >= (NATIVE_MAX_ROWS + 1 if own else DEQUANTIZE_ROWS) and numel <= DEQUANTIZE_MAX
        if dequantize:
            # a prefill's many rows: the int8 kernel is a matrix-vector kernel at heart (512 rows
            # of 9728×896: 75 ms); Ŵ = s ⊙ q made for the call in bf16 (2 bytes a weight, freed
            # after it) and a bf16 product take 21 ms
            b = None if self.bias is None else self.bias.to(torch.bfloat16)
            q, packed = self._state()
            if isinstance(packed, native.Blocked):
                q, packed = packed.dense(), None
            if packed is not None:
                # the codes live in oneDNN's copy, which reads back as qᵀ: Ŵᵀ = qᵀ ⊙ s from it
                # (no transposing copy), and x Ŵᵀ as a plain product with it
                w_t = packed.to_dense().to(torch.bfloat16).mul_(self.scale.to(torch.bfloat16))
                y = torch.matmul(x.to(torch.bfloat16), w_t)
                return (y if b is None else y.add_(b)).to(x.dtype)
            w = q.to(torch.bfloat16) * self.scale.to(torch.bfloat16)[:, None]
            return F.linear(x.to(torch.bfloat16), w, b).to(x.dtype)
        packed = None
        if x.device.type == "cpu" and x.numel() > 0 and numel >= ONEDNN_MIN_WEIGHT:
            packed = self._onednn_copy()
        if packed is not None and (rows <= MAX_ONEDNN_ROWS or self._replaced()):
            # more rows than decoding has, once the copy replaced the codes: 64 rows at a time
            # (no dense copy of the codes made per call)
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).float()
            y = x2.new_empty(rows, self.out_features) if rows > MAX_ONEDNN_ROWS else None
            for i in range(0, rows, MAX_ONEDNN_ROWS):
                part = self._onednn(x2[i : i + MAX_ONEDNN_ROWS], packed)
                if part is None or y is None:
                    y = part
                    break
                y[i : i + MAX_ONEDNN_ROWS] = part
            if y is not None:
                if self.bias is not None:
                    y = y + self.bias.float()
                return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if fast_cpu and x.numel() > 0 and _int8_kernel_works():
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
            # x qᵀ with unit scales (the kernel's bf16 scales would round s_o), then ⊙ s in fp32
            ones = self._ones.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(x2, self._codes(), ones).float() * self.scale.float()  # (x qᵀ) ⊙ s
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return self._formula(x)

    def _formula(self, x: Tensor) -> Tensor:
        """y = x Ŵᵀ + b with Ŵ = s ⊙ q, dequantized for this call."""
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _native_serves(self, x: Tensor) -> bool:
        """lmlab's own kernel is built and x is as wide as the layer (else the usual shape
        error, from the paths below)."""
        return x.numel() > 0 and x.shape[-1] == self.in_features and native.available()

    def _native(self, x: Tensor) -> Tensor | None:
        """Decoding's few rows on lmlab's own kernel (:mod:`lmlab.nn.native`: the codes widened
        to fp32 in registers, the input kept in fp32), from the codes blocked in its order
        (:meth:`_blocked_copy`, in place of the plain codes); None where it cannot serve (then
        oneDNN's or PyTorch's int8 kernel, as the rest of ``forward``)."""
        blocked = self._blocked_copy()
        if blocked is None:
            return None
        shape = x.shape
        y = native.int8_linear(x.reshape(-1, shape[-1]), blocked, self.scale, self.bias)
        if y is not None and "bias" not in self._parameters:  # (a bias made a Parameter: not bound)
            self._bind(blocked, BLOCKED_MAX_ROWS_BIG if self.out_features * self.in_features > DEQUANTIZE_MAX else NATIVE_MAX_ROWS)
        return None if y is None else y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"

    #: the copy of the codes that replaced them in ``qweight`` (the native kernel's blocked
    #: codes, or oneDNN's packed copy) and the stand-in that holds their place
    _held: tuple[Tensor | native.Blocked, Tensor] | None = None
    #: the codes (address, write counter) oneDNN's kernel failed its check on: not tried again
    _failed: CopyKey | None = None

    def __getattr__(self, name: str) -> Tensor | nn.Module:
        """``layer.qweight``: the codes themselves (put back from oneDNN's copy if it replaced
        them, so that a write into them is the layer's), as ``FastLinear``'s ``weight``."""
        if name == "qweight" and self._replaced():
            self.unpack()
        return super().__getattr__(name)

    def _state(self) -> tuple[Tensor | None, Tensor | None]:
        """(``qweight``'s tensor, oneDNN's copy if it replaced the codes), read together: a swap
        by another thread between the two reads would pair the stand-in with no copy."""
        with _lock:
            held, q = self.__dict__.get("_held"), self._buffers.get("qweight")
            if held is not None and q is held[1] and isinstance(held[0], native.Blocked) and self._plain_written():
                q = self.__dict__["_plain"][0]()  # written through a reference taken before: the layer's codes
                self._buffers["qweight"], self._held, self._bound, self._plain = q, None, None, None
                return q, None
            return (q, held[0]) if held is not None and q is held[1] else (q, None)

    def _codes(self) -> Tensor:
        """The codes, read back from oneDNN's copy if it replaced them, without undoing that."""
        q, packed = self._state()
        return q if packed is None else _dense_codes(packed)

    def _replaced(self) -> bool:
        return self._state()[1] is not None

    def unpack(self) -> None:
        """Put the codes back in ``qweight`` and drop the copy that replaced them (blocked, or
        oneDNN's; made again when needed) with the kernel bound to it."""
        with _lock:
            q, packed = self._state()
            if packed is not None:
                plain = self._plain[0]() if isinstance(packed, native.Blocked) and self._plain else None
                # the very tensor the blocked codes replaced, if someone still holds it (its
                # numbers: a write into it since would have put it back already), else a copy
                self._buffers["qweight"] = plain if plain is not None else _dense_codes(packed)
            self._held = self._bound = self._plain = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - nn.Module's signature
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._replaced():
            destination[prefix + "qweight"] = self._codes()  # the codes, not the stand-in

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - nn.Module's signature
        self.unpack()  # copied into the codes' own storage, not into the stand-in
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = {k: v for k, v in state.items() if k not in ("_held", "_bound", "_plain")}  # pickled, deep-copied with its codes
        state["_buffers"] = {**state["_buffers"], "qweight": self._codes()}
        return state

    def _onednn_copy(self) -> Tensor | None:
        """oneDNN's packed copy of the codes, where its int8 kernel sums exactly (VNNI/AMX):
        made once, checked once against the dequantized formula, and then standing *in place
        of* the codes (``qweight`` holds a 1-byte stand-in; reading it gives the codes back):
        an output layer's codes are held once, not twice. Codes assigned anew are packed
        anew; None where the kernel cannot serve."""
        if not int8.exact_sums():
            return None
        q, packed = self._state()
        if packed is not None:
            return None if isinstance(packed, native.Blocked) else packed
        key = copy_key(q)
        if key is None or key == self._failed:  # an inference tensor, or codes that failed before
            return None
        try:
            with torch.inference_mode(False), torch.no_grad():
                packed = torch.ops.onednn.qlinear_prepack(q, None)
                self._zero = torch.zeros(self.out_features, dtype=torch.int32)
                x = torch.sin(torch.arange(1, 2 * self.in_features + 1, dtype=torch.float32)).reshape(2, -1)
                got = self._onednn(x, packed)
                want = torch.cat([F.linear(x.double(), w) for w in self._dequantized_blocks()], dim=1)
                ok = bool(((got.double() - want).abs() <= 1e-3 * want.abs().max() + 1e-6).all())
        except RuntimeError:  # a oneDNN build without the op: PyTorch's int8-weight kernel
            ok = False
        if not ok:
            with _lock:
                self._failed = key
                if self._buffers["qweight"] is q:
                    self._held = None  # a copy of codes assigned before these: not kept
            return None
        with _lock:
            if self._buffers["qweight"] is q:  # (not assigned anew meanwhile)
                stand_in = torch.zeros((), dtype=torch.int8).expand(q.shape)
                self._held, self._bound = (packed, stand_in), None
                self._buffers["qweight"] = stand_in
        del q
        freed(self.out_features * self.in_features)
        trim()  # the codes and the check's transients, back to the system
        return packed

    def _onednn(self, x: Tensor, packed: Tensor) -> Tensor | None:
        """(x qᵀ) ⊙ s on oneDNN's int8 kernel (VNNI/AMX: exact integer sums, 1.2–1.5× faster
        than PyTorch's int8-weight kernel here), x given to it in two int8 parts:

            t = x·f/a                  f: a power of two per row bringing it to the largest, a = max|x f|/127
            q₁ = round(t),  q₂ = round(127·(t − q₁))           (|q₂| ≤ 64)
            x̂ = (a/f)(q₁ + q₂/127)     |x − x̂| ≤ a/(254 f) per number: ~14 bits, finer than bf16's 8

        Both parts go through the one weight read (2 rows per row of x); the sums are
        combined and rescaled in fp32. None for a non-finite input (one scale serves all rows:
        the other path keeps rows apart)."""
        n = x.shape[0]
        scales = int8.row_scales(x)
        if scales is None:
            return None
        a, f = scales
        t = x * f / a
        q1 = torch.round(t).clamp_(-127, 127)
        q2 = torch.round((t - q1) * 127).clamp_(-127, 127)
        q = torch.cat([q1, q2]).add_(128).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(
            q, a, 128, packed, self.scale.float(), self._zero, None, 1.0, 0,
            torch.float32, "none", [], "",
        )  # fmt: skip
        return y[:n].add_(y[n:], alpha=1 / 127).div_(f)


def _dense_codes(packed: Tensor | native.Blocked) -> Tensor:
    """q from the copy that replaced it: the native kernel's blocked codes, or oneDNN's packed
    copy (``to_dense`` gives qᵀ exactly: a reorder, no arithmetic), as a plain tensor even
    inside inference mode (its writes counted: see ``copy_key``)."""
    with torch.inference_mode(False):
        if isinstance(packed, native.Blocked):
            return packed.dense()
        return packed.to_dense().t().contiguous()


def quantize_model(module: nn.Module, method: str = "int8", group_size: int = GROUP_SIZE) -> nn.Module:
    """Replace every ``nn.Linear`` of ``module`` (in place) by its :class:`QuantLinear`
    (``"int8"``) or :class:`~lmlab.nn.int4.Int4Linear` (``"int4"``, groups of ``group_size``).

    Embedding tables stay in floating point: a token reads one row of them. A tied output
    layer gets its own int8 copy (the input embedding keeps the float one). Returns ``module``.
    """
    method = resolve_quantize(method)
    if method is None:
        return module
    if any(isinstance(m, (QuantLinear, Int4Linear)) for m in module.modules()):
        raise LmlabError("this model is already quantized; quantize a floating-point model once")
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise LmlabError(f"{type(module).__name__} has no linear layers to quantize")
    if method == "int4":
        Int4Linear.check_group_size(group_size)
    kept_int8 = 0
    shared = {id(p) for m in module.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    with torch.inference_mode(False), torch.no_grad():
        while targets:  # each float weight dropped as soon as its int8 copy exists (not all at the end)
            name, lin = targets.pop(0)
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if method == "int4" and lin.in_features % group_size == 0:
                quantized = Int4Linear.from_linear(lin, group_size, name)
            else:  # int8, or a width the int4 groups do not divide: int8 (one scale a row)
                kept_int8 += method == "int4"
                quantized = QuantLinear.from_linear(lin, name)
            setattr(parent, child, quantized.to(lin.weight.device).train(lin.training))
            if id(lin.weight) not in shared:  # (a tied output layer's W is the embedding's: it stays)
                freed(lin.weight.numel() * lin.weight.element_size())
            del lin
    if kept_int8:
        hint = "; --group-size 32 divides more widths" if group_size > 32 else ""
        warn(f"{kept_int8} linear layer(s) have a width that groups of {group_size} do not divide: "
             f"they are int8 (one scale a row){hint}")  # fmt: skip
    module.quantization = method
    trim()  # the float weights just dropped, back to the system
    return module


def resolve_quantize(method: str | None) -> str | None:
    """'int8' -> 'int8'; None or 'none' -> None; anything else is a one-line error."""
    if method is None or method == "none":
        return None
    if method not in QUANTIZE_CHOICES:
        raise LmlabError(f"unknown quantization {method!r}; lmlab implements weight-only 'int8', 'int4' (or 'none')")
    return method


_INT8_OK: bool | None = None


def _int8_kernel_works() -> bool:
    """``torch._weight_int8pack_mm`` exists and agrees with the formula on a small product."""
    global _INT8_OK
    if _INT8_OK is None:
        _INT8_OK = False
        if hasattr(torch, "_weight_int8pack_mm"):
            try:
                q = torch.arange(-16, 16, dtype=torch.int8).reshape(2, 16)  # 16 wide: see ``fast``
                x = torch.linspace(-1, 1, 16, dtype=torch.bfloat16)[None]
                got = torch._weight_int8pack_mm(x, q, torch.ones(2, dtype=torch.bfloat16)).float()
                _INT8_OK = torch.allclose(got, x.float() @ q.float().T, rtol=1e-2)  # bf16 output
            except (RuntimeError, NotImplementedError):
                _INT8_OK = False
    return _INT8_OK
