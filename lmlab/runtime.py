"""Devices and dtypes: the names a user types (``cpu``, ``auto``, ``bf16``) to torch's objects.

Kept apart from the public API so that every layer above it (models, training, the
Hugging Face importer) can turn a user's choice into torch objects the same way.
"""

from __future__ import annotations

import os

import torch

from lmlab.errors import LmlabError

DTYPES: dict[str | None, torch.dtype | None] = {
    None: None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``; None stays None (the caller's default applies)."""
    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype
    if dtype not in DTYPES:
        raise LmlabError(f"unknown dtype {dtype!r} (use float32/fp32, bfloat16/bf16 or float16/fp16)")
    return DTYPES[dtype]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LmlabError(f"unknown device {device!r}; use cpu, cuda, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if dev.type == "mps" and not _mps_available():
        raise LmlabError("--device mps was asked for but this machine has no MPS; use --device cpu")
    return dev


def machine_memory() -> int | None:
    """Physical memory in bytes, or None where the system does not say: what a model or a
    KV cache is checked against before it is allocated (an allocation past it swaps the
    machine for minutes, or fails deep inside torch)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
