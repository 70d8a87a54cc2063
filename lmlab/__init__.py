"""lmlab: build, train, run and apply language models on your own machine.

The public names (``lmlab.load``, ``lmlab.train``, ``lmlab.Model``, ``lmlab.LmlabError``)
are imported on first use (PEP 562), so ``import lmlab.cli`` and ``lmlab --help`` answer
without loading torch.
"""

from __future__ import annotations

import importlib as _importlib
import os as _os
import sys as _sys
from typing import TYPE_CHECKING, Any

# OpenMP threads spin while they wait for work; when the machine is busy with anything
# else, the spinning makes each step of a small model many times slower (2 cores, two
# busy processes beside training: 4.0k tokens/s by default, 6.6k with a short spin; at a
# load of 6, 95 vs 2.8k). A short spin costs nothing on an idle machine (21.9k vs 21.4k),
# unlike OMP_WAIT_POLICY=PASSIVE (12.5k). Only possible before torch loads; set
# GOMP_SPINCOUNT or OMP_WAIT_POLICY yourself to choose otherwise.
_SHORT_SPIN = not ({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ)) and "torch" not in _sys.modules
if _SHORT_SPIN:
    _os.environ["GOMP_SPINCOUNT"] = "1000"


def _spin_for_decoding() -> None:
    """Undo the short spin, for a process that will decode (``lmlab generate``, ``translate``,
    ``serve``), if torch has not loaded yet and the user did not choose. Decoding runs ~40 small
    products per token, and a thread pool that falls asleep between them costs far more than
    it saves: measured on 2 cores, idle, greedy fp32, 1.6x slower (a Marian-shaped translator:
    0.86 s vs 0.54 s for 64 tokens; transformers the same: 1.04 s vs 0.64 s)."""
    if _SHORT_SPIN and "torch" not in _sys.modules:
        _os.environ.pop("GOMP_SPINCOUNT", None)

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "LmlabError": "lmlab.errors",
    "Model": "lmlab.api",
    "load": "lmlab.api",
    "pipeline": "lmlab.tasks",
    "train": "lmlab.training",
}

__all__ = ["LmlabError", "Model", "load", "pipeline", "train", "__version__"]

if TYPE_CHECKING:
    from lmlab.api import Model, load
    from lmlab.errors import LmlabError
    from lmlab.tasks import pipeline
    from lmlab.training import train


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmlab' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
