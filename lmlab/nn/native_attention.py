"""lmlab's own CPU kernel for a decoding step's attention: ``kernels/attend_one.cpp``.

One new query per row attends over the keys and values cached so far,

    y = softmax(scale · q Kᵀ + M) V          (fp32 inside; y in the input's dtype)

with grouped-query attention (each key/value head serving n_head / n_kv_head query heads)
read in place from the cache's tensors. PyTorch's fused attention spends ~100 µs a layer on
this at a few hundred keys on 2 threads — its blocking and buffers are built for many
queries — which at 24 layers is ~2.5 ms of every token of a Qwen2-0.5B in bf16 (~40 ms at
2,048 keys); the loop here takes ~20 µs (~150 µs at 2,048 keys). Built like the int8 kernel (:mod:`lmlab.nn.native`: g++, AVX-512, the same cache
folder); without it (or with ``LMLAB_NATIVE=0``) :func:`attend_one` returns None and the
model calls ``F.scaled_dot_product_attention`` as before.
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch
from torch import Tensor

from lmlab.nn import native

SOURCE = native.SOURCE.with_name("attend_one.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp", "-shared", "-fPIC"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
#: fp32 attention over fewer keys stays on PyTorch's kernel, which is fast there (measured on 2
#: threads, Qwen2-0.5B's 14 query and 2 key/value heads of 64: 13 µs at 64 keys against 18 here,
#: 50 against 41 at 512, 205 against 150 at 2,048). In bf16 PyTorch's is slow at any length:
#: 53 µs against 19 at 64 keys, 419 against 47 at 512, 1,723 against 148 at 2,048.
FP32_MIN_KEYS = 512

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def available() -> bool:
    """The kernel is built and loaded (tried once per process; never an error)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                types = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int64]
                _lib = native.load(SOURCE, FLAGS, "lmlab_attend_one", types, native._cpu_ok())
                _tried = True
    return _lib is not None


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor | None:
    """softmax(scale·q kᵀ + M) v for q (B, nh, 1, hs), k and v (B, nkv, S, hs) — the cache's
    views, any strides with each position's numbers contiguous — and mask (B or 1, 1, 1, S)
    bool (True: may attend) or None; scale None is 1/√hs, as F.scaled_dot_product_attention.
    Returns (B, nh, 1, hs) in q's dtype, or None where the kernel cannot serve (not built,
    another dtype or device, shapes it does not take) or is not the faster one (fp32 over
    fewer than ``FP32_MIN_KEYS`` keys): the caller uses PyTorch's attention."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[2] != 1 or not available():
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None  # the kernel computes no gradient: PyTorch's attention does
    B, nh, _, hs = q.shape
    _, nkv, S, _ = k.shape
    dtype = _DTYPES.get(q.dtype)
    if (
        dtype is None
        or (dtype == 0 and S < FP32_MIN_KEYS)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
        or k.shape[0] != B
        or k.shape[3] != hs
        or nkv < 1
        or nh % nkv
        or S < 1
        or hs % 16
        or not 16 <= hs <= 256
        or any(t.device.type != "cpu" or t.stride(-1) != 1 for t in (q, k, v))
    ):
        return None
    m_ptr, m_stride = None, 0
    if mask is not None:
        if mask.dtype != torch.bool or mask.device.type != "cpu" or mask.dim() != 4 or mask.shape[1:] != (1, 1, S):
            return None
        if mask.shape[0] not in (1, B) or mask.stride(-1) != 1:
            return None
        m_ptr, m_stride = mask.data_ptr(), (mask.stride(0) if mask.shape[0] == B else 0)
    strides = (ctypes.c_int64 * 9)(q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], m_stride)
    y = torch.empty(B, nh, 1, hs, dtype=q.dtype)
    s = 1.0 / math.sqrt(hs) if scale is None else float(scale)
    assert _lib is not None
    rc = _lib.lmlab_attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), m_ptr, y.data_ptr(), B, nh, nkv, S, hs,
                               strides, s, dtype, torch.get_num_threads())  # fmt: skip
    return y if rc == 0 else None


__all__ = ["attend_one", "available"]
