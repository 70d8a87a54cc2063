"""The one way lmlab talks to its user outside a command's own output.

``warn`` raises a :class:`LmlabWarning` through Python's ``warnings``, attributed to the
first frame outside lmlab (the user's own line), so a Python user can filter, catch or
silence it like any other warning; the command line shows it as one line,
``lmlab: warning: ...`` (:func:`cli_format`). ``say`` prints a progress or status line on
stderr. Under torchrun every process runs the same code; only rank 0 speaks for the job.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any


class LmlabWarning(UserWarning):
    """A warning about the user's data, options or model (never about lmlab itself)."""


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process (read from torchrun's variables: no torch)."""
    return os.environ.get("RANK", "0") == "0"


def warn(msg: str) -> None:
    """``lmlab: warning: msg`` on the command line; a LmlabWarning in Python."""
    if is_main_process():
        warnings.warn(msg, LmlabWarning, stacklevel=_stacklevel_outside_lmlab())


def say(line: str) -> None:
    """A status line on stderr, flushed at once (rank 0 only)."""
    if is_main_process():
        print(line, file=sys.stderr, flush=True)


def cli_format() -> None:
    """Show every warning as ``lmlab: warning: ...``, written above any progress bar."""

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = f"lmlab: warning: {message}"
        try:
            from tqdm import tqdm

            tqdm.write(text, file=file or sys.stderr)  # keeps an active bar whole
        except ImportError:  # pragma: no cover - tqdm is a dependency
            print(text, file=file or sys.stderr, flush=True)

    warnings.showwarning = show


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: Frames of these files sit between lmlab and its caller without being the caller (torch's
#: decorators that wrap a generator: inference_mode, no_grad).
_WRAPPERS = (os.sep + os.path.join("torch", "utils", "_contextlib.py"),)


def _stacklevel_outside_lmlab() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` made by our caller) of the first frame
    outside the lmlab package: the depth varies (encode, generate, stream, a list
    comprehension's frame on Python < 3.12), so every lmlab frame is skipped."""
    frame, level = sys._getframe(2), 2  # level 1 would be warn() itself
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename.endswith(_WRAPPERS)
    ):
        frame, level = frame.f_back, level + 1
    return level
