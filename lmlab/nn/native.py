"""lmlab's own CPU kernel for int8 decoding: ``kernels/int8_linear.cpp``, compiled on first use.

Decoding at batch 1 streams every weight from memory once per token, so an int8 weight
should be read twice as fast as a bf16 one. PyTorch's int8-weight kernel
(``torch._weight_int8pack_mm``) streams ~4× slower than that here, and oneDNN's int8 kernel
needs the input quantized first (~15 small ops per product). This kernel reads the codes
and widens them to fp32 in registers,

    y_mn = s_n · Σ_k x_mk q_nk + b_n                 (fp32 sums; 8 rows of x per pass over q)

at 19–27 GB/s cache-cold on the 2-core Xeon where ``torch.sum`` reads 24 GB/s.

It is built with the system's C++ compiler (``g++``, or ``$CXX``) into ``$LMLAB_CACHE/kernels``
(default ``~/.cache/lmlab``) the first time an int8 model decodes, keyed by a hash of the
source and flags (under a second, once). Without a compiler, without AVX-512 (or off x86),
or with ``LMLAB_NATIVE=0``, :func:`int8_linear` returns None and int8 layers use PyTorch's
kernels, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels") / "int8_linear.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC"]

_lib: ctypes.CDLL | None = None
_tried = False
_build_lock = threading.Lock()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return set(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _cpu_ok() -> bool:
    """An x86 CPU with AVX-512 F and BW (what the kernel's instructions need)."""
    return {"avx512f", "avx512bw", "avx512vl", "fma"} <= _cpu_flags()


def _cache() -> Path:
    return Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab")) / "kernels"


def _build() -> ctypes.CDLL | None:
    """The compiled kernel, built once per source and compiler (an atomic rename: processes
    building at once each write their own file and one wins)."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not SOURCE.exists():
        return None
    flags = FLAGS
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
    lib = _cache() / f"int8_linear-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    # torch (imported above) has loaded its own libgomp.so.1: the kernel's OpenMP calls bind
    # to that one, so its threads are PyTorch's (torch.set_num_threads applies)
    handle = ctypes.CDLL(str(lib))
    fn = handle.lmlab_int8_linear
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    fn.restype = ctypes.c_int
    return handle


def available() -> bool:
    """The kernel is built and loaded (tried once per process; never an error)."""
    global _lib, _tried
    if not _tried:
        with _build_lock:
            if not _tried:
                ok = os.environ.get("LMLAB_NATIVE", "1") != "0" and sys.platform == "linux" and _cpu_ok()
                try:
                    _lib = _build() if ok else None
                except (OSError, subprocess.SubprocessError, AttributeError):
                    _lib = None  # no compiler that works, or a library that will not load
                _tried = True
    return _lib is not None


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor | None:
    """(x qᵀ) ⊙ s + b in fp32 for x (M, K), q (N, K) int8, s (N,) fp32;
    None where the kernel cannot serve (not built, shapes, dtypes, a non-CPU tensor)."""
    M, K = x.shape
    N = q.shape[0]
    if (
        not available()
        or M < 1
        or K % 16
        or q.dtype != torch.int8
        or q.device.type != "cpu"
        or not q.is_contiguous()
    ):
        return None
    x = x.float().contiguous()
    s = scale.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    assert _lib is not None
    rc = _lib.lmlab_int8_linear(x.data_ptr(), q.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr(),
                                y.data_ptr(), M, N, K)  # fmt: skip
    return y if rc == 0 else None


__all__ = ["available", "int8_linear"]
