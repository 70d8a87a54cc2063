"""Ctrl-C (SIGINT) and SIGTERM stop a run cleanly: the handler only notes why
(``trainer.stop_reason``); the loop then saves after the current step and ends. Under
torchrun the reason travels as a number in ``STOP_CODES``, all-reduced (max) with the
clock, so every rank stops after the same step."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmlab.training.trainer import Trainer

#: Why a run stops early, as a number all-reduced (max) so that every rank stops alike.
STOP_CODES = (None, "interrupted", "terminated")


def install_signal_handlers(trainer: Trainer) -> dict:
    """Route SIGINT/SIGTERM to ``trainer.stop_reason``; returns the handlers they replace
    (none off the main thread, where Python cannot set handlers)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):  # noqa: ARG001
        trainer.stop_reason = "interrupted" if signum == signal.SIGINT else "terminated"

    prev = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        prev[s] = signal.signal(s, handler)
    return prev


def restore_signal_handlers(prev: dict) -> None:
    for s, h in prev.items():
        signal.signal(s, h)
