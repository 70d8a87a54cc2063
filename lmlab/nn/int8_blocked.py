"""An int8 layer's codes in the order of lmlab's own kernel (:mod:`lmlab.nn.native`), held in
place of the plain codes, and the kernel bound to them.

Decoding reads each weight once per token, and the kernel reads its codes *blocked* (four
rows interleaved 16 codes at a time: one stream of memory per thread, ~2× the speed of
reading plain rows on 896-wide weights). So the first product of a
:class:`~lmlab.nn.quantize.QuantLinear` on the kernel reorders its codes, and the blocked copy
*replaces* them — the same N·K bytes, held once —, as oneDNN's packed copy does: ``qweight``
holds a 1-byte stand-in, and reading it (``layer.qweight``, ``state_dict()``, pickling) gives
the plain codes back exactly. After that product, the kernel is bound to the blocked codes,
scales and bias (:class:`lmlab.nn.native.Bound`): a decoding step's ~100 products skip ~15 µs
of checks each.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from lmlab.nn import native
from lmlab.nn.fastpath import _version
from lmlab.nn.heap import freed

#: guards the swap of a layer's codes and the copy that replaces them (one pair, never one
#: without the other); lmlab.nn.quantize uses it for oneDNN's copy too
LOCK = threading.RLock()
#: rows of W dequantized at a time by _from_blocked (151,936 × 896, 512 rows of x: 0.48 s
#: against 1.12 s on the kernel, which reads the codes once per 8 rows; 64 rows: even)
BLOCKED_CHUNK = 4096


class BlockedCodes:
    """The blocked copy's part of :class:`~lmlab.nn.quantize.QuantLinear` (which defines
    ``_state``, ``qweight``, ``scale``, ``bias`` and the ``_held`` pair)."""

    #: (``_held``, most rows, scale, bias, the kernel bound to them): see QuantLinear.forward
    _bound: tuple | None = None
    #: (a weak reference to the plain codes the blocked ones replaced, their write counter)
    _plain: tuple | None = None

    def _bind(self, blocked: native.Blocked, max_rows: int) -> None:
        """Bind the kernel to these blocked codes and the current scales and bias (the next
        calls skip the checks: see ``forward``), unless it already is."""
        scale, bias = self._buffers["scale"], self._buffers.get("bias")
        with LOCK:
            held, now = self.__dict__.get("_held"), self.__dict__.get("_bound")
            if held is None or held[0] is not blocked:  # unpacked by another thread meanwhile
                return
            if now is not None and now[0] is held and now[2] is scale and now[3] is bias:
                return
            call = native.Bound.make(blocked, scale, bias)
            self._bound = None if call is None else (held, max_rows, scale, bias, call)

    def _plain_written(self) -> bool:
        """The plain codes the blocked ones replaced, still held by someone (``w =
        layer.qweight`` before decoding), were written since: they are the layer's again
        (``_state`` puts them back). An inference tensor has no write counter: not seen."""
        plain = self.__dict__.get("_plain")
        if plain is None or plain[1] < 0:
            return False
        t = plain[0]()
        return t is not None and _version(t) != plain[1]

    def _from_blocked(self, x: Tensor) -> Tensor:
        """Many rows of an output-layer-sized weight whose codes are blocked: x Ŵᵀ + b with Ŵ
        made in bf16 from the codes BLOCKED_CHUNK rows of W at a time (a 7 MB transient at
        d 896, not a full bf16 copy), rounded as the prefill's dequantized products round."""
        blocked = self._state()[1]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.bfloat16)
        s16 = self.scale.to(torch.bfloat16)
        b16 = None if self.bias is None else self.bias.to(torch.bfloat16)
        for i in range(0, self.out_features, BLOCKED_CHUNK):
            j = min(self.out_features, i + BLOCKED_CHUNK)
            w = blocked.dense_rows(i, j).to(torch.bfloat16).mul_(s16[i:j, None])
            y[:, i:j] = F.linear(x2, w, None if b16 is None else b16[i:j])
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _blocked(self) -> bool:
        return isinstance(self._state()[1], native.Blocked)

    def _blocked_copy(self) -> native.Blocked | None:
        """The codes in the native kernel's order (:func:`lmlab.nn.native.block`), made once and
        then standing in place of the plain codes, as oneDNN's copy does (``qweight`` holds a
        1-byte stand-in; reading it gives the codes back): held once, the same N·K bytes.
        None where oneDNN's copy holds them already, or the codes are not plain CPU int8."""
        q, held = self._state()
        if held is not None:
            return held if isinstance(held, native.Blocked) else None
        if q is None or q.dtype != torch.int8 or q.dim() != 2 or q.device.type != "cpu" or q.shape[1] % 16:
            return None
        with torch.inference_mode(False):  # (plain tensors, whatever mode decoding runs in)
            blocked = native.block(q)
            stand_in = torch.zeros((), dtype=torch.int8).expand(q.shape)
        with LOCK:
            if self._buffers["qweight"] is not q or self._state()[1] is not None:
                return None  # assigned anew, or copied by another thread meanwhile: this call plain
            self._held, self._bound = (blocked, stand_in), None
            self._plain = (weakref.ref(q), _version(q))  # (see _plain_written)
            self._buffers["qweight"] = stand_in
        del q
        freed(self.out_features * self.in_features)
        return blocked


__all__ = ["BLOCKED_CHUNK", "LOCK", "BlockedCodes"]
