"""A faster CPU kernel for the linear layers of a model that is decoding: speed code kept
beside the model, not inside it.

Decoding reads every weight once per token, so its speed is the speed at which the
matrix-vector kernel streams W from memory. PyTorch's CPU ``F.linear`` goes to MKL, which
on this project's AMD machine (measured: benchmarks/decode.py) reads an (out, in) fp32
matrix at about half the speed oneDNN does, and runs prefill-sized products at half of
oneDNN's FLOP rate. So while a model decodes on the CPU, each of its plain ``nn.Linear``
layers becomes a :class:`FastLinear` — the same module with the same parameters (only its
``__class__`` changes, so the ``state_dict`` keys and tied weights stay as they are) whose
no-grad forwards run on oneDNN's linear kernel.

    fastpath.prepare(model)        # the decoding loop and lmlab.load: on when model.fast_decoding, on a CPU
    fastpath.enable(model, False)  # every FastLinear back to nn.Linear

Anything that is not exactly ``nn.Linear`` (an int8 ``QuantLinear``, a user's subclass) is
left alone.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.nn import native_packed
from lmlab.nn.heap import freed


class FastLinear(nn.Linear):
    """y = x Wᵀ + b, exactly ``nn.Linear``, computed by oneDNN (bf16: by lmlab's kernel, where it
    is built) when autograd is off on a CPU.

    The same W — fp32: read in place, no copy, or (a layer's own W, off Intel CPUs, where lmlab's
    fp32 kernel is built) a packed copy that replaces it as below; bf16: a copy in a packed
    layout, made once and remade if W changes — lmlab's own, multiplied by
    :mod:`lmlab.nn.native_packed`'s kernels, on CPUs with AVX-512 BF16; oneDNN's blocked layout
    elsewhere. Training, and any forward with autograd on, takes the
    plain path — and drops the bf16 copy, since W is about to change.

    A bf16 (or, as above, fp32) W that is this layer's alone (not tied to an embedding, not an
    output layer whose rows the greedy screen reads) is *replaced* by its packed copy: the parameter keeps its
    shape and dtype but its data becomes a 2-byte stand-in (NaN broadcast to W's shape), so a
    decoding model holds its weights once, not twice (a Qwen2-0.5B after its first token:
    2.07× → 1.06× its weights' bytes; benchmarks/load_memory.py). W comes back, bit for bit
    (``to_dense`` is a reorder, in either layout), whenever it is read through the module: ``layer.weight``,
    ``state_dict``, ``load_state_dict``, ``.to()``, pickling and deepcopy, a forward with
    autograd on, :func:`enable` off. Parameters read past the module — ``model.parameters()``,
    ``named_parameters()`` — hold the stand-in while their layer is packed: read ``state_dict()``
    instead, or set ``model.pack_in_place = False`` before decoding (copies beside W, as before).
    A W with a gradient (between a backward and an optimizer step) is never replaced.
    """

    #: (packed copy, the key of the W it was made from, the stand-in W holds meanwhile or None,
    #: the Parameter whose data was replaced or None): swapped whole, so a reader sees one state
    _held: tuple[Tensor | native_packed.Packed, CopyKey, Tensor | None, nn.Parameter | None] | None = None
    #: set by :func:`prepare`: the packed copy may stand in for W (see the class docstring)
    _replaces: bool = False
    #: set by :func:`prepare`: W must stay plain and no copy may sit beside it (tied, or an output layer)
    _plain_only: bool = False

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave out the kernel's copies of W (oneDNN's opaque layout
        cannot be copied; they are remade on the next forward), after giving W back."""
        with _lock:
            self.unpack()
            state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
            return {k: v for k, v in state.items() if not k.startswith(("_held", "_screen"))}

    def __getattr__(self, name: str) -> object:
        if name == "weight" and "_parameters" in self.__dict__:
            held, w = self.__dict__.get("_held"), self._parameters.get("weight")
            if held is not None and held[2] is not None:
                self.unpack()  # someone reads W: give it back in its plain layout
            elif w is not None:
                _give_back(w, self)  # (another layer's stand-in)
        return super().__getattr__(name)

    def unpack(self) -> None:
        """W in its plain layout again (exactly: oneDNN's reorder back), the packed copy dropped;
        also where W holds another layer's stand-in (one Parameter in two models: _give_back)."""
        if self._held is not None:
            with _lock:
                held, self._held = self._held, None
                if held is not None and held[2] is not None and held[3].data_ptr() == held[2].data_ptr():
                    with torch.inference_mode(False), torch.no_grad():
                        held[3].data = held[0].to_dense()  # into the Parameter that was replaced
        w = self.__dict__.get("_parameters", {}).get("weight")
        if w is not None:  # (every training forward comes here: one is_contiguous, then out)
            _give_back(w, self)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        with _lock:  # no decoding thread may pack W again before the conversion has read it
            self.unpack()  # .to(), .half(), .cuda() convert the plain W
            return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        with _lock:
            self.unpack()
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        with _lock:
            self.unpack()  # copied into the plain W
            super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        w = self._parameters.get("weight")
        if torch.is_grad_enabled() or x.device.type != "cpu" or w is None:
            # A forward with autograd on is training: W is about to change, possibly in ways its
            # version counter does not see (a fused optimizer step, `.data` writes); drop the copy.
            # (No W in _parameters: a pruned or parametrized layer computes its own.)
            self.unpack()  # (another layer's stand-in in W included)
            return F.linear(x, self.weight, self.bias)
        held = self._held
        if held is not None and held[2] is not None and w.data_ptr() == held[2].data_ptr() and x.dtype == w.dtype:
            return _product(x, held[0], self._parameters["bias"])
        if x.dtype is torch.float32 and w.dtype is torch.float32 and x.numel() <= 2 * x.shape[-1] and _MKL_ROWS:
            return F.linear(x, w, self._parameters["bias"])  # a greedy step's fp32 rows on Intel: MKL (below), no more checks
        return self._onednn_forward(x)

    def _onednn_forward(self, x: Tensor) -> Tensor:
        w, bias = self._parameters["weight"], self._parameters["bias"]
        if x.dtype == w.dtype and (w.dtype == torch.bfloat16 or (w.dtype == torch.float32 and self._fp32_packs(w))):
            return self._packed(x, bias)  # (W packed or to be packed; one another thread just replaced included)
        _give_back(w, self)  # (W may be another layer's stand-in; _packed looks under the lock)
        if self._held is not None:
            with _lock:  # another input dtype (autocast), or W no longer to be packed: the plain W, never a stand-in
                self.unpack()
                w = self._parameters["weight"]
        if x.dtype != w.dtype or w.dtype != torch.float32 or not w.is_contiguous():
            return F.linear(x, w, bias)
        if _few_rows(x.numel() // max(1, x.shape[-1]), w.numel()) and mkl_for_fp32_rows():
            return F.linear(x, w, bias)  # a few fp32 rows: MKL is the faster kernel here
        # y = x Wᵀ + b on oneDNN (the same formula as F.linear; summation order may differ)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, bias, "none", [], "")

    def _fp32_packs(self, w: Tensor) -> bool:
        """An fp32 W is packed for lmlab's fp32 kernel only where the copy replaces it (never a
        second fp32 copy beside it: a layer's own W, no gradient held) and not on Intel CPUs,
        where MKL's kernel is the rule for a few rows."""
        return self._replaces and w.grad is None and w.numel() > 0 and not mkl_for_fp32_rows() and native_packed.available(torch.float32)

    def _packed(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """A bf16 W (any CPU: oneDNN's kernel wants W pre-blocked, 2× faster; lmlab's, packed its
        way) or an fp32 W that may be replaced (lmlab's fp32 kernel) multiplied packed. The
        operand is chosen under the lock — the packed copy, made (and standing in for W) if need be, or W's plain storage —
        and multiplied outside it: a reference to either stays valid whatever another thread
        does to the layer meanwhile."""
        with _lock:
            held, w = self._held, self._parameters["weight"]
            _give_back(w, self)  # (another layer replaced W meanwhile)
            if held is not None and held[2] is not None and held[3] is not w:
                self.unpack()  # W was assigned anew (or swapped for a call): the original is restored
                held = None
            if held is not None and held[2] is not None and w.data_ptr() == held[2].data_ptr():
                operand = held[0]  # replaced by another thread a moment ago
            elif w.is_contiguous() and not self._replaces and native_packed.plain_serves(x, w, self._plain_only):
                # W must stay plain (tied to an embedding, or rows read by the screen): a few rows
                # multiply it where it lies, no copy beside it (more: a copy, unless _plain_only)
                operand = None
                plain = w.detach()
            else:
                key = copy_key(w)
                if key is None or not w.is_contiguous():  # an inference tensor: packing per call costs more than it saves
                    return F.linear(x, w, bias)
                if held is not None and held[1] == key:
                    operand = held[0]
                else:
                    with torch.inference_mode(False):  # a plain tensor, usable outside inference mode
                        operand = _packed_copy(w.detach())
                    self._held = (operand, key, None, None)
                if self._replaces and w.grad is None and isinstance(w, nn.Parameter):
                    # the packed copy is W from now on (a W with a gradient is between a
                    # backward and an optimizer step: it stays plain)
                    with torch.inference_mode(False):
                        stand_in = torch.full((), float("nan"), dtype=w.dtype).expand(w.shape)
                    self._held = (operand, key, stand_in, w)
                    _REPLACED[id(w)] = self  # (before W changes: another layer meeting the stand-in finds us)
                    w.data = stand_in
                    freed(w.numel() * w.element_size())
        if operand is None:
            return native_packed.plain_product(x, plain, bias)
        return _product(x, operand, bias)


#: id(W) → the layer whose packed copy stands in for W; Parameters two models share (_give_back)
_REPLACED: weakref.WeakValueDictionary[int, FastLinear] = weakref.WeakValueDictionary()
_SHARED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()  # (by id: tensors' == is elementwise)


def _give_back(w: Tensor, taker: FastLinear) -> None:
    """One Parameter in two separately prepared models (``b.proj.weight = a.proj.weight``), ``w``
    holding the stand-in a layer of the other put in: that layer gives W back, and neither
    replaces it again (both read it plain, as tied layers do) — else this forward multiplied
    the stand-in's NaNs. Within one model, :func:`mark_replaceable` sees the sharing itself."""
    if w.is_contiguous():  # (a stand-in never is: one number broadcast to W's shape)
        return
    with _lock:
        owner = _REPLACED.get(id(w))
        held = None if owner is None or owner is taker else owner._held
        if held is not None and held[3] is w:
            owner.unpack()
            _SHARED[id(w)] = w
            for m in (owner, taker):
                m._replaces, m._plain_only = False, True


def _packed_copy(w: Tensor) -> Tensor | native_packed.Packed:
    """W in the layout of the faster kernel here: lmlab's own (:mod:`lmlab.nn.native_packed`; bf16
    on CPUs with AVX-512 BF16, fp32 with AVX-512: 1.2–2.4× oneDNN's speed), else oneDNN's blocked
    layout."""
    return native_packed.pack(w) or torch.ops.mkldnn._reorder_linear_weight(w, 1)


def _product(x: Tensor, operand: Tensor | native_packed.Packed, bias: Tensor | None) -> Tensor:
    """y = x Wᵀ + b, W a packed copy (the same formula as F.linear; summation order may differ)."""
    if type(operand) is native_packed.Packed:
        if bias is not None and bias.dtype != x.dtype:  # (an fp32 bias beside a bf16 W, as oneDNN takes it)
            bias = bias.to(x.dtype)
        y = operand(x, bias) if x.numel() <= PACKED_MAX_ROWS[x.dtype] * x.shape[-1] else None
        if y is not None:
            return y
        # more rows than the kernel is fast for (a long prompt's pass): W plain for this product
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), operand.to_dense(), bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), operand, bias, "none", [], "")


#: rows of x up to which lmlab's packed kernels multiply (decoding steps, a batch's, a prompt's
#: chunk); a pass over more makes W plain for the product and runs oneDNN's: the kernels read
#: the rows of x once per pair of 16-row blocks, and past a few hundred rows x no longer stays
#: in the cache (fp32, GPT-2's weights cache-cold, ms lmlab vs oneDNN: 104 vs 138 at 64 rows,
#: 400 vs 430 at 256, 1,767 vs 872 at 512; bf16, Qwen2-0.5B's: 845 vs 879 at 512)
PACKED_MAX_ROWS = {torch.bfloat16: 512, torch.float32: 256}
CopyKey = tuple[int, int, tuple[int, ...]]  # (address, write counter, shape): see copy_key


#: guards every change of a FastLinear's packed state (re-entrant: unpack inside _apply)
_lock = threading.RLock()


_MKL_ROWS: bool | None = None

#: fp32 products that stay on MKL (on Intel): up to 2 rows of any weight (a greedy or 2-beam step,
#: the output layer included), up to 8 rows of a weight of at most 4M numbers (a beam search's
#: decoder layers). Measured on this project's Xeon, cache-cold, ms MKL vs oneDNN: 4 rows of
#: 1536×512 0.32 vs 0.50, of 2048×512 0.34 vs 0.58; but 4 rows of the 58101×512 output
#: layer 9.0 vs 7.6, and at 16 rows the two are even. Beam 4 translation: 10% faster.
_MKL_MAX_ROWS, _MKL_MAX_ROWS_SMALL, _MKL_SMALL_WEIGHT = 2, 8, 4 * 2**20


def _few_rows(rows: int, weight_numel: int) -> bool:
    return rows <= _MKL_MAX_ROWS or (rows <= _MKL_MAX_ROWS_SMALL and weight_numel <= _MKL_SMALL_WEIGHT)


def mkl_for_fp32_rows() -> bool:
    """Whether fp32 products of a few rows (decoding one sequence, a few beams) should stay
    on MKL (see ``_few_rows``): on Intel CPUs MKL's gemv is the faster kernel (measured on
    this project's Xeon: 20% faster greedy seq2seq decoding, benchmarks/seq2seq_decode.py), on AMD oneDNN's (about 2×, the decode
    benchmark). A fixed rule per CPU vendor, not a timing taken at run time, so that the
    kernel — and the last bits of the logits — are the same on every run of a machine."""
    global _MKL_ROWS
    if _MKL_ROWS is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                _MKL_ROWS = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
        except OSError:
            _MKL_ROWS = False
    return _MKL_ROWS


def _version(t: Tensor) -> int:
    """The in-place write counter of ``t`` (an optimizer step or ``copy_`` bumps it);
    -1 for an inference tensor, which cannot be modified in place outside inference mode."""
    try:
        return t._version
    except RuntimeError:
        return -1


def copy_key(t: Tensor) -> CopyKey | None:
    """(address, write counter, shape; ``w.data = w.data[:n]`` keeps the first two): what a copy
    derived from ``t`` (packed, screened, int8) is kept in step with. None for an inference
    tensor, which has no counter: a copy of it can't be trusted (a write through ``.data`` bumps
    no counter either; the copies' owners say how they deal with that)."""
    v = _version(t)
    return None if v < 0 else (t.data_ptr(), v, tuple(t.shape))


def available() -> bool:
    """oneDNN's linear op exists in this PyTorch build (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


#: Set on a module by :func:`enable`: whether its linears are fast, and how many there are.
_ENABLED_ATTR = "_lmlab_fastpath"


def enable(module: nn.Module, on: bool = True) -> int:
    """Swap every plain ``nn.Linear`` in ``module`` to :class:`FastLinear` (``on``), or back;
    returns how many layers now take the fast path (0 when off).

    Checked once on a small product against ``F.linear``: where oneDNN is missing or
    refuses (an old build, an unsupported dtype), everything stays on the plain path.
    A second call with the same ``on`` returns at once, without walking the modules.
    """
    on = on and works()
    done = module.__dict__.get(_ENABLED_ATTR)
    if done is not None and done[0] == on:
        return done[1]
    n = 0
    for m in module.modules():
        if on and type(m) is nn.Linear:
            m.__class__ = FastLinear  # parameters untouched: only the forward changes
        elif not on and isinstance(m, FastLinear):
            m.unpack()
            for k in [k for k in m.__dict__ if k.startswith(("_held", "_screen", "_replaces"))]:
                del m.__dict__[k]  # the bf16 copies (and a screened head's, lmlab.nn.screen)
            m.__class__ = nn.Linear
        n += isinstance(m, FastLinear)
    module.__dict__[_ENABLED_ATTR] = (on, n)
    return n


def prepare(module: nn.Module) -> int:
    """What the decoding loop (and ``lmlab.load``) calls before a model runs without
    gradients: the fast path on when ``module.fast_decoding`` (default True) and the model
    is on a CPU, off otherwise. Returns how many layers take it."""
    param = next(module.parameters(), None)
    on_cpu = param is not None and param.device.type == "cpu"
    n = enable(module, bool(getattr(module, "fast_decoding", True)) and on_cpu)
    if n:
        mark_replaceable(module)
    return n


def mark_replaceable(module: nn.Module) -> None:
    """Which layers' packed copies (bf16; fp32 on lmlab's kernel) may replace their W (``FastLinear._replaces``): W held
    by this layer alone (not tied to an embedding), not an output layer (a greedy screen, when
    on, reads rows of its plain W), and ``module.pack_in_place`` (default True). Done at every
    :func:`prepare`, so weights tied after loading are seen; a layer that may no longer
    replace its W gets it back."""
    allowed = bool(getattr(module, "pack_in_place", True))
    users: dict[int, int] = {}  # parameter -> how many modules hold it (tied weights: 2)
    heads = set()
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                users[id(p)] = users.get(id(p), 0) + 1
        heads.add(id(getattr(m, "lm_head", None)))
    for m in module.modules():
        if isinstance(m, FastLinear):
            w = m._parameters.get("weight")
            m._replaces = allowed and w is not None and users.get(id(w), 0) == 1 and id(m) not in heads and _SHARED.get(id(w)) is not w
            m._plain_only = allowed and not m._replaces
            if not m._replaces and m._held is not None and m._held[2] is not None:
                m.unpack()


_local = threading.local()


@contextmanager
def unrolling(on: bool = True) -> Iterator[None]:
    """While inside (this thread only), a model that has an unrolled one-token step (the
    encoder-decoder Transformer's ``DecoderLayer.step``) may take it: the same operations
    without the module calls. The decoding loop turns it on when :func:`unobserved`."""
    prev = getattr(_local, "unrolled", False)
    _local.unrolled = on
    try:
        yield
    finally:
        _local.unrolled = prev


def unrolled() -> bool:
    return getattr(_local, "unrolled", False)


def unroll_step(module: nn.Module, new_tokens: int, cache: object) -> bool:
    """Whether ``module``'s forward may take its unrolled one-token step now: one new token per
    row, a cache to extend, inference, and the decoding loop has allowed it (:func:`unrolling`)."""
    return new_tokens == 1 and cache is not None and unrolled() and not module.training and not torch.is_grad_enabled()


def quantized(model: nn.Module) -> bool:
    """``model``'s linear layers are int8 or int4 (:mod:`lmlab.nn.quantize`, ``.int4``): none is
    a :class:`FastLinear` for :func:`prepare` to count, but they decode on kernels of their own,
    and the unrolled one-token step serves them as it serves the fast path (unless
    ``model.fast_decoding`` is False)."""
    return bool(getattr(model, "fast_decoding", True)) and any(
        getattr(m, "quantized_layer", False) for m in model.modules()
    )


def unobserved(model: nn.Module) -> bool:
    """Nothing watches the model's modules run: no forward hooks (lmlab.inspection's neuron
    traces use them), no attention recording its weights or set to the explicit path, no
    module in training mode (dropout kept on for MC dropout). An unrolled step skips the
    module calls, so it would skip those too. Checked once per decoding call (a hook added
    while tokens stream applies from the next call)."""
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return False
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or m.training:
            return False
        if hasattr(m, "record") and (m.record is not None or getattr(m, "fast", True) is False):  # attention
            return False
    return True


_WORKS: bool | None = None


def works() -> bool:
    """oneDNN's op runs here and agrees with ``F.linear`` on a small fixed product (fp32 and
    bf16). Uses no random numbers: probing must not move torch's global generator."""
    global _WORKS
    if _WORKS is None:
        _WORKS = False
        if available():
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
                _WORKS = True
            except (RuntimeError, AttributeError, NotImplementedError):
                _WORKS = False
    return _WORKS


__all__ = ["FastLinear", "available", "enable", "prepare", "quantized", "unobserved", "unroll_step", "unrolled", "unrolling", "works"]
