"""lmlab's own CPU kernel for bf16 linear layers: ``kernels/bf16_linear.cpp``, compiled on first use.

A decoding step reads every weight once, so a bf16 model decodes as fast as its products
stream W from memory. oneDNN's bf16 kernel (W in its own packed layout) streams 19–26 GB/s
on this project's 2-core AMD EPYC, where ``torch.sum`` reads 31–35; the kernel here, with
W in a layout of its own (:func:`pack`), 30–46 — 1.3–1.8× oneDNN in the same run, cache-cold
over a Qwen2-0.5B's decoder weights (``benchmarks/int8_kernel.py``), for 1 to 512 rows of x:

    y_mn = bf16( Σ_k x_mk W_nk + b_n )          (fp32 sums, rounded once: as oneDNN)

W is stored in blocks of 16 rows; in a block, the two weights of each row for inputs k and
k+1 side by side, 16 rows across one 64-byte cache line, so one AVX-512 BF16 instruction
(``vdpbf16ps``) multiplies a line by the pair (x_k, x_k+1) broadcast and adds into 16 sums,
one per row of W, and a thread reads its blocks as one stream. ``fastpath.FastLinear``
keeps a bf16 layer's W in this layout while the model decodes (it replaces W, as oneDNN's
copy did: held once).

Needs an x86 CPU with AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids
and later) and a C++ compiler; built like the int8 kernel (:mod:`lmlab.nn.native`, the same
cache folder). Elsewhere, or with ``LMLAB_NATIVE=0``, :func:`available` is False and bf16
layers use oneDNN's kernel, as before.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

import torch
from torch import Tensor

from lmlab.nn import native

SOURCE = native.SOURCE.with_name("bf16_linear.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
#: rows of W per block: one 64-byte line holds a pair of inputs for each
BLOCK = 16

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def _cpu_ok() -> bool:
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= native.cpu_flags()


def available() -> bool:
    """The kernel is built and loaded (tried once per process; never an error)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                ok = os.environ.get("LMLAB_NATIVE", "1") != "0" and sys.platform == "linux" and _cpu_ok()
                try:
                    handle = native.build(SOURCE, FLAGS) if ok else None
                    if handle is not None:
                        fn = handle.lmlab_bf16_linear
                        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
                        fn.restype = ctypes.c_int
                    _lib = handle
                except Exception:  # noqa: BLE001 - a compiler that fails or hangs, anything: no kernel
                    _lib = None
                _tried = True
    return _lib is not None


class Packed:
    """A bf16 W (N, K) in the kernel's order: ``data`` is 1-D, ⌈N/16⌉·16·K numbers (the last
    block's missing rows are zeros), block j holding rows 16j..16j+15 as K/2 lines of
    [W_{16j,k} W_{16j,k+1} W_{16j+1,k} W_{16j+1,k+1} ... W_{16j+15,k+1}]."""

    __slots__ = ("cols", "data", "rows")

    def __init__(self, data: Tensor, rows: int, cols: int) -> None:
        self.data, self.rows, self.cols = data, rows, cols

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.cols))

    def to_dense(self) -> Tensor:
        """The plain (N, K) W back, bit for bit (a reordering, no arithmetic)."""
        nb, k = -(-self.rows // BLOCK), self.cols
        blocks = self.data.view(nb, k // 2, BLOCK, 2).permute(0, 2, 1, 3)  # (nb, 16, K/2, 2)
        return blocks.reshape(nb * BLOCK, k)[: self.rows].contiguous()

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor | None:
        """x Wᵀ + b for x (..., K) bf16 on the CPU; None where the kernel cannot serve (another
        dtype, width or device, a bias that is not N bf16 numbers): the caller multiplies by
        :meth:`to_dense` instead. Every size is checked here: the kernel reads raw memory."""
        k, n, d = self.cols, self.rows, self.data
        if (
            x.dtype != torch.bfloat16
            or x.device.type != "cpu"
            or x.dim() < 1
            or x.shape[-1] != k
            or x.numel() == 0
            or d.dtype != torch.bfloat16
            or not d.is_contiguous()
            or d.numel() != -(-n // BLOCK) * BLOCK * k
            or (bias is not None and (bias.dtype != torch.bfloat16 or bias.numel() != n or bias.device.type != "cpu"))
            or _lib is None
        ):
            return None
        x = x.contiguous()
        b = None if bias is None else bias.contiguous()
        y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
        rc = _lib.lmlab_bf16_linear(x.data_ptr(), d.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                                    x.numel() // k, n, k, torch.get_num_threads())  # fmt: skip
        return y if rc == 0 else None


def pack(w: Tensor) -> Packed | None:
    """W (N, K) bf16 in the kernel's order (a copy); None where the kernel cannot take it
    (not built, not bf16 on the CPU, K odd or zero)."""
    if w.dim() != 2 or w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.shape[1] % 2 or 0 in w.shape:
        return None
    if not available():
        return None
    (n, k), nb = w.shape, -(-w.shape[0] // BLOCK)
    padded = w if n == nb * BLOCK else torch.cat([w, w.new_zeros(nb * BLOCK - n, k)])
    data = padded.reshape(nb, BLOCK, k // 2, 2).permute(0, 2, 1, 3).reshape(-1)  # (nb, K/2, 16, 2)
    if data.data_ptr() == w.data_ptr():  # K = 2: the order is W's own, and reshape gave a view
        data = data.clone()
    return Packed(data, n, k)


__all__ = ["BLOCK", "Packed", "available", "pack"]
