"""lmlab's own CPU kernels for bf16 and fp32 linear layers while decoding:
``kernels/bf16_linear.cpp`` and ``kernels/f32_linear.cpp``, compiled on first use.

A decoding step reads every weight once, so a model decodes as fast as its products stream
W from memory. oneDNN's kernels stream 19–26 GB/s (bf16, W in its packed layout) and ~20
(fp32, W in place) on this project's 2-core AMD EPYC, where ``torch.sum`` reads 31–35; the
kernels here, with W in a layout of their own (:func:`pack`), ~30–46 — 1.2–2.4× oneDNN in
the same run, cache-cold (``benchmarks/int8_kernel.py``), for 1 to 512 rows of x:

    y_mn = Σ_k x_mk W_nk + b_n          (fp32 sums; bf16: rounded to bf16 once, as oneDNN)

W is stored in blocks of 16 rows; in a block, for each input k (fp32) or pair of inputs k,
k+1 (bf16), the 16 rows' weights side by side on one 64-byte cache line, so one instruction
— an FMA with x_k broadcast, or AVX-512 BF16's ``vdpbf16ps`` with the pair (x_k, x_k+1)
broadcast — adds a line into 16 sums, one per row of W, with no horizontal sums, and a
thread reads its blocks as one stream. ``fastpath.FastLinear`` keeps a layer's W in this
layout while the model decodes (it replaces W: held once).

The bf16 kernel needs AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids
and later), the fp32 one AVX-512; both a C++ compiler, built like the int8 kernel
(:mod:`lmlab.nn.native`, the same cache folder). Elsewhere, or with ``LMLAB_NATIVE=0``,
:func:`available` is False and the layers use oneDNN's kernels (or MKL's), as before.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from lmlab.nn import native


class _Kernel(NamedTuple):
    source: Path
    flags: list[str]
    symbol: str
    cpu: frozenset[str]
    pair: int  # inputs of a row side by side on a line: 2 (bf16, one vdpbf16ps), 1 (fp32, one FMA)


_AVX512 = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl"]
KERNELS = {
    torch.bfloat16: _Kernel(native.SOURCE.with_name("bf16_linear.cpp"), [*_AVX512, "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"],
                            "lmlab_bf16_linear", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}), 2),
    torch.float32: _Kernel(native.SOURCE.with_name("f32_linear.cpp"), [*_AVX512, "-fopenmp", "-shared", "-fPIC"],
                           "lmlab_f32_linear", frozenset({"avx512f", "avx512bw", "avx512vl"}), 1),
}  # fmt: skip
#: rows of W per block: one 64-byte line holds one input (fp32) or a pair of inputs (bf16) for each
BLOCK = 16

#: each dtype's kernel, once tried (None: not built here)
_libs: dict[torch.dtype, ctypes.CDLL | None] = {}
_lock = threading.Lock()


def _cpu_ok(dtype: torch.dtype = torch.bfloat16) -> bool:
    return KERNELS[dtype].cpu <= native.cpu_flags()


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """The kernel for ``dtype`` (bf16 or fp32) is built and loaded (tried once per process;
    never an error)."""
    if dtype not in _libs:
        with _lock:
            if dtype not in _libs:
                spec = KERNELS.get(dtype)
                types = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
                lib = None if spec is None else native.load(spec.source, spec.flags, spec.symbol, types, _cpu_ok(dtype))
                if lib is not None and dtype == torch.bfloat16:  # the same product with W plain (below)
                    lib.lmlab_bf16_plain.argtypes, lib.lmlab_bf16_plain.restype = types, ctypes.c_int
                _libs[dtype] = lib
    return _libs.get(dtype) is not None


class Packed:
    """W (N, K), bf16 or fp32, in the kernel's order: ``data`` is 1-D, ⌈N/16⌉·16·K numbers (the
    last block's missing rows are zeros), block j holding rows 16j..16j+15 as K/p lines of the
    16 rows' p consecutive weights (p = 2 for bf16: [W_{16j,k} W_{16j,k+1} W_{16j+1,k} ...
    W_{16j+15,k+1}]; p = 1 for fp32: [W_{16j,k} W_{16j+1,k} ... W_{16j+15,k}])."""

    __slots__ = ("cols", "data", "rows")

    def __init__(self, data: Tensor, rows: int, cols: int) -> None:
        self.data, self.rows, self.cols = data, rows, cols

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.cols))

    def to_dense(self) -> Tensor:
        """The plain (N, K) W back, bit for bit (a reordering, no arithmetic)."""
        nb, k, p = -(-self.rows // BLOCK), self.cols, KERNELS[self.data.dtype].pair
        blocks = self.data.view(nb, k // p, BLOCK, p).permute(0, 2, 1, 3)  # (nb, 16, K/p, p)
        return blocks.reshape(nb * BLOCK, k)[: self.rows].contiguous()

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor | None:
        """x Wᵀ + b for x (..., K) of W's dtype on the CPU; None where the kernel cannot serve
        (another dtype, width or device, a bias that is not N numbers of W's dtype): the caller
        multiplies by :meth:`to_dense` instead. Every size is checked here: the kernel reads
        raw memory."""
        k, n, d = self.cols, self.rows, self.data
        lib = _libs.get(d.dtype)
        if (
            lib is None
            or x.dtype != d.dtype
            or x.device.type != "cpu"
            or x.dim() < 1
            or x.shape[-1] != k
            or x.numel() == 0
            or not d.is_contiguous()
            or d.numel() != -(-n // BLOCK) * BLOCK * k
            or (bias is not None and (bias.dtype != d.dtype or bias.numel() != n or bias.device.type != "cpu"))
        ):
            return None
        x = x.contiguous()
        b = None if bias is None else bias.contiguous()
        y = torch.empty(*x.shape[:-1], n, dtype=d.dtype)
        rc = getattr(lib, KERNELS[d.dtype].symbol)(x.data_ptr(), d.data_ptr(), None if b is None else b.data_ptr(),
                                                   y.data_ptr(), x.numel() // k, n, k, torch.get_num_threads())  # fmt: skip
        return y if rc == 0 else None


#: rows of x up to which a bf16 W that must stay plain (an output layer tied to the input
#: embedding) is multiplied where it lies, by ``lmlab_bf16_plain`` (each row of W read once;
#: within ~1.0–1.5× of the packed kernel's time for 1–16 rows, 2–3× faster than PyTorch's)
#: rather than by a packed copy beside it (a tied Qwen2-0.5B's output layer is 27% of its
#: bytes); more rows of a tied layer: F.linear on the plain W (:func:`plain_serves`)
PLAIN_MAX_ROWS = 16


def plain_serves(x: Tensor, w: Tensor, any_rows: bool = False) -> bool:
    """A W that must stay plain is multiplied where it lies (:func:`plain_product`) for x: one
    row (any dtype), or up to PLAIN_MAX_ROWS rows of a bf16 x and W where the kernel is built —
    any number with ``any_rows`` (a tied or output layer, for which no copy may sit beside W:
    more rows by ``F.linear`` on the plain W)."""
    rows = x.numel() // max(1, x.shape[-1])
    return rows == 1 or (
        (rows <= PLAIN_MAX_ROWS or any_rows) and x.dtype == w.dtype == torch.bfloat16 and available(torch.bfloat16)
    )


def plain_product(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b with W plain (N, K) and contiguous, no copy of it: lmlab's bf16 kernel where it
    serves (up to PLAIN_MAX_ROWS rows of bf16 x and W on the CPU; an fp32 bias cast, as the
    packed kernel takes it), else PyTorch's matrix-vector product for one row, ``F.linear``
    for more."""
    lib = _libs.get(torch.bfloat16)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    n, k = w.shape
    if (
        lib is not None
        and x.dtype == w.dtype == torch.bfloat16
        and x.device.type == w.device.type == "cpu"
        and w.is_contiguous()
        and x.dim() >= 1
        and x.shape[-1] == k
        and 0 < x.numel() <= PLAIN_MAX_ROWS * k
        and (bias is None or (bias.numel() == n and bias.device.type == "cpu"))
    ):
        x = x.contiguous()
        b = None if bias is None else bias.contiguous()
        y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
        rc = lib.lmlab_bf16_plain(x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                                  x.numel() // k, n, k, torch.get_num_threads())  # fmt: skip
        if rc == 0:
            return y
    if x.numel() != x.shape[-1]:
        return torch.nn.functional.linear(x, w, bias)
    flat = x.reshape(-1)
    y = torch.mv(w, flat) if bias is None else torch.addmv(bias, w, flat)
    return y.view(x.shape[:-1] + (n,))


def pack(w: Tensor) -> Packed | None:
    """W (N, K), bf16 or fp32, in its kernel's order (a copy); None where the kernel cannot take
    it (not built, another dtype, not on the CPU, K odd in bf16, an empty W)."""
    spec = KERNELS.get(w.dtype)
    if spec is None or w.dim() != 2 or w.device.type != "cpu" or w.shape[1] % spec.pair or 0 in w.shape:
        return None
    if not available(w.dtype):
        return None
    (n, k), nb, p = w.shape, -(-w.shape[0] // BLOCK), spec.pair
    full = n // BLOCK
    with torch.inference_mode(False):  # a plain tensor, whatever mode decoding runs in
        data = torch.empty(nb * BLOCK * k, dtype=w.dtype)  # written in place: W and its copy, no third
        lines = data.view(nb, k // p, BLOCK, p)  # block, line, row, the line's p inputs
        lines[:full].copy_(w[: full * BLOCK].reshape(full, BLOCK, k // p, p).permute(0, 2, 1, 3))
        if full < nb:  # the last block's rows, the missing ones zeros
            lines[full].zero_()
            lines[full, :, : n - full * BLOCK].copy_(w[full * BLOCK :].reshape(-1, k // p, p).permute(1, 0, 2))
    return Packed(data, n, k)


__all__ = ["BLOCK", "KERNELS", "PLAIN_MAX_ROWS", "Packed", "available", "pack", "plain_product", "plain_serves"]
