"""lmlab's own CPU kernel for int8 decoding: ``kernels/int8_linear.cpp``, compiled on first use.

Decoding at batch 1 streams every weight from memory once per token, so an int8 weight
should be read twice as fast as a bf16 one. PyTorch's int8-weight kernel
(``torch._weight_int8pack_mm``) streams ~4× slower than that here, and oneDNN's int8 kernel
needs the input quantized first (~15 small ops per product). This kernel reads the codes
and widens them to fp32 in registers,

    y_mn = s_n · Σ_k x_mk q_nk + b_n                 (fp32 sums; 8 rows of x per pass over q)

from the codes *blocked* (:func:`block`: rows in blocks of 16, each 64-byte cache line the
16 rows' codes of four inputs, so that a line adds into 16 sums, one per row, and a thread
reads one stream front to back): 28–31 GB/s cache-cold on a 2-core AMD EPYC where
``torch.sum`` reads ~31–35, against ~16 GB/s for four plain rows read at once on 896-wide
weights and 25 for the earlier order (four rows interleaved) on 4,864-wide ones
(``benchmarks/int8_kernel.py``).

It is built with the system's C++ compiler (``g++``, or ``$CXX``) into ``$LMLAB_CACHE/kernels``
(default ``~/.cache/lmlab``; a folder under the temporary directory if that cannot be written)
the first time an int8 model decodes, keyed by a hash of the source, compiler and flags
(under a second, once). Without a compiler, without AVX-512 (or off x86),
or with ``LMLAB_NATIVE=0``, :func:`int8_linear` returns None and int8 layers use PyTorch's
kernels, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels") / "int8_linear.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC"]

_lib: ctypes.CDLL | None = None
_tried = False
_build_lock = threading.Lock()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return set(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _cpu_ok() -> bool:
    """An x86 CPU with AVX-512 F and BW (what the kernel's instructions need)."""
    return {"avx512f", "avx512bw", "avx512vl", "fma"} <= cpu_flags()


def _folders() -> list[Path]:
    """Where the compiled kernel may live: $LMLAB_CACHE/kernels (~/.cache/lmlab), else a
    folder of this user's under the temporary directory (a read-only or absent home)."""
    found = []
    try:
        found.append(Path(os.environ.get("LMLAB_CACHE") or Path.home() / ".cache" / "lmlab") / "kernels")
    except RuntimeError:  # no home directory (an arbitrary uid in a container)
        pass
    found.append(Path(tempfile.gettempdir()) / f"lmlab-kernels-{os.getuid()}")
    return found


def _compile(cxx: list[str], lib: Path, source: Path = SOURCE, flags: list[str] = FLAGS) -> None:
    """Compile into ``lib`` through a file of our own and an atomic rename: processes building
    at once each write their own file, and one wins."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=lib.parent)
    os.close(fd)
    try:
        subprocess.run([*cxx, *flags, str(source), "-o", tmp], check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
        os.chmod(tmp, 0o755)  # (mkstemp's 0600: another user sharing the cache could not load it)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(source: Path = SOURCE, flags: list[str] = FLAGS) -> ctypes.CDLL | None:
    """The compiled ``source``, built once per source, compiler and flags; None without a
    compiler that works. A cached library that will not load (corrupt, or built on another
    system) is built again. (Also lmlab.nn.native_packed's.)"""
    cxx = shlex.split(os.environ.get("CXX") or shutil.which("g++") or "")
    if not cxx or not source.exists():
        return None
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what a source may include
    key = hashlib.sha256(source.read_bytes() + headers + " ".join([*cxx, *flags]).encode()).hexdigest()[:16]
    for folder in _folders():
        lib = folder / f"{source.stem}-{key}.so"
        try:
            if not lib.exists():
                _compile(cxx, lib, source, flags)
            try:
                return ctypes.CDLL(str(lib))
            except OSError:
                _compile(cxx, lib, source, flags)
                return ctypes.CDLL(str(lib))
        except OSError:  # an unwritable folder: the next one
            continue
    return None


def load(source: Path, flags: list[str], symbol: str, argtypes: list, cpu: bool) -> ctypes.CDLL | None:
    """``source`` built and loaded, ``symbol`` typed (returns int); None — never an error — off
    Linux, with ``LMLAB_NATIVE=0``, on a CPU without the instructions (``cpu`` False), or with
    a compiler that fails or hangs. Every lmlab kernel module loads through here, once."""
    if os.environ.get("LMLAB_NATIVE", "1") == "0" or sys.platform != "linux" or not cpu:
        return None
    try:
        handle = build(source, flags)
        if handle is not None:
            fn = getattr(handle, symbol)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return handle
    except Exception:  # noqa: BLE001 - a compiler that fails or hangs, anything: no kernel
        return None


def available() -> bool:
    """The kernel is built and loaded (tried once per process; never an error)."""
    global _lib, _tried
    if not _tried:
        with _build_lock:
            if not _tried:
                # torch (imported above) has loaded its own libgomp.so.1: the kernel's OpenMP calls
                # bind to that one, so its threads are PyTorch's
                _lib = load(SOURCE, FLAGS, "lmlab_int8_linear", [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4, _cpu_ok())
                _tried = True
    return _lib is not None


class Blocked(NamedTuple):
    """Int8 codes (N, K) in the kernel's order (``kernels/int8_linear.cpp``): rows in blocks of
    16, each block as K/4 cache lines, line g the 16 rows' codes of input 4g, then of 4g+1,
    4g+2, 4g+3; then the last N mod 16 rows plain. ``codes`` is 1-D, N·K bytes: the same size
    as the plain codes."""

    codes: Tensor
    rows: int
    cols: int

    def dense(self) -> Tensor:
        """The plain (N, K) codes back (a copy; a reordering, no arithmetic)."""
        return self.dense_rows(0, self.rows)

    def dense_rows(self, i: int, j: int) -> Tensor:
        """Plain codes of rows i..j−1 (a copy), i a multiple of 16, j a multiple of 16 or N."""
        n16, k = self.rows - self.rows % BLOCK, self.cols
        parts = []
        if min(j, n16) > i:
            b = min(j, n16)
            blocks = self.codes[i * k : b * k].view((b - i) // BLOCK, k // 4, 4, BLOCK)  # [block][group][input][row]
            parts.append(blocks.permute(0, 3, 1, 2).reshape(b - i, k))
        if j > n16:
            parts.append(self.codes[max(i, n16) * k : j * k].view(-1, k))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


#: rows of W per block of the kernel's order
BLOCK = 16


def block(q: Tensor, out: Tensor | None = None) -> Blocked:
    """q (N, K) int8, K a multiple of 16, in the kernel's order (a copy, written in place into
    one buffer — ``out``, N·K int8, if given: the codes and their copy are the only two held,
    even for an output layer)."""
    (n, k), n16 = q.shape, q.shape[0] - q.shape[0] % BLOCK
    out = torch.empty(n * k, dtype=q.dtype, device=q.device) if out is None else out.view(n * k)
    rows = q[:n16].view(n16 // BLOCK, BLOCK, k // 4, 4).permute(0, 2, 3, 1)  # [block][group][input][row]
    out[: n16 * k].view(n16 // BLOCK, k // 4, 4, BLOCK).copy_(rows)
    out[n16 * k :].copy_(q[n16:].reshape(-1))
    return Blocked(out, n, k)


def int8_linear(x: Tensor, q: Tensor | Blocked, scale: Tensor, bias: Tensor | None) -> Tensor | None:
    """(x qᵀ) ⊙ s + b in fp32 for x (M, K), q (N, K) int8 — plain, blocked for this call (a
    copy), or already :func:`block`-ed, as an int8 layer keeps its codes —, s (N,) and b (N,)
    or None; None where the kernel cannot serve (not built, shapes that do not fit together
    or that it does not take, dtypes, a tensor not on the CPU). It reads raw memory: every
    size is checked here, not trusted."""
    if x.dim() != 2:
        return None
    if isinstance(q, Blocked):
        codes, N, Kq = q
        if codes.dim() != 1 or codes.numel() != N * Kq:
            return None
    elif q.dim() == 2:
        (N, Kq), codes = q.shape, q
    else:
        return None
    M, K = x.shape
    tensors = (x, codes, scale) if bias is None else (x, codes, scale, bias)
    if (
        M < 1
        or N < 1
        or K % 16
        or Kq != K
        or scale.numel() != N
        or (bias is not None and bias.numel() != N)
        or codes.dtype != torch.int8
        or not codes.is_contiguous()
        or any(t.device.type != "cpu" for t in tensors)
        or not available()
    ):
        return None
    if not isinstance(q, Blocked):
        codes = block(q).codes
    x = x.float().contiguous()
    s = scale.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(M, N, dtype=torch.float32, device="cpu")
    assert _lib is not None
    rc = _lib.lmlab_int8_linear(x.data_ptr(), codes.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr(),
                                y.data_ptr(), M, N, K, torch.get_num_threads())  # fmt: skip
    return y if rc == 0 else None


class Bound:
    """:func:`int8_linear` for one layer's blocked codes, fp32 scales and bias, checked in full
    once: each call then checks only the input (an fp32 CPU matrix of the right width) and
    that each tensor is still what the kernel reads raw (its dtype, size and contiguity; its
    address is read afresh, so storage swapped under the same tensor, ``t.data = ...``, is
    followed) — a decoding step makes ~100 of these products, and the full checks cost
    ~15 µs each, as much as the product of a small weight."""

    __slots__ = ("codes", "k", "n", "scale", "bias")

    def __init__(self, q: Blocked, scale: Tensor, bias: Tensor | None) -> None:
        self.codes, self.scale, self.bias = q.codes, scale, bias
        self.n, self.k = q.rows, q.cols

    @staticmethod
    def make(q: Blocked, scale: Tensor, bias: Tensor | None) -> Bound | None:
        """None unless the kernel is built and every piece is what it reads raw: int8 codes
        of N·K numbers (N ≥ 1, K a positive multiple of 16), contiguous fp32 scales and bias of
        N numbers, all on the CPU."""
        if q.rows < 1 or q.cols < 16 or q.cols % 16 or not available():
            return None
        bound = Bound(q, scale, bias)
        return bound if bound._pointers() is not None else None

    def _pointers(self) -> tuple[int, int, int | None] | None:
        """The three addresses, or None if a tensor is no longer what the kernel reads."""
        c, s, b = self.codes, self.scale, self.bias
        if c.dtype != torch.int8 or c.numel() != self.n * self.k or not c.is_contiguous() or c.device.type != "cpu":
            return None
        for t in (s, b):
            if t is not None and (
                t.dtype != torch.float32 or t.numel() != self.n or not t.is_contiguous() or t.device.type != "cpu"
            ):
                return None
        return c.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr()

    def __call__(self, x: Tensor) -> Tensor | None:
        """(x qᵀ) ⊙ s + b for x (..., K) fp32 on the CPU, contiguous; None for any other x (or
        a tensor that changed: see the class)."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.shape[-1] != self.k:
            return None
        rows = x.numel() // self.k
        ptrs = self._pointers() if rows >= 1 else None
        if ptrs is None:
            return None
        y = torch.empty(*x.shape[:-1], self.n, dtype=torch.float32, device="cpu")
        assert _lib is not None
        rc = _lib.lmlab_int8_linear(x.data_ptr(), *ptrs, y.data_ptr(), rows, self.n, self.k, torch.get_num_threads())
        return y if rc == 0 else None


__all__ = ["BLOCK", "Blocked", "Bound", "available", "block", "build", "cpu_flags", "int8_linear", "load"]
