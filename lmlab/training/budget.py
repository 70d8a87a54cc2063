"""The budget of a run and the split of its batch: ``--time`` durations, one budget, the
global batch over processes and micro-steps. (Read by the options' checks in
:mod:`lmlab.training.config`, which re-exports them, and by the launcher.)"""

from __future__ import annotations

import re

from lmlab.errors import LmlabError


def check_one_budget(steps: int | None, time: str | None) -> None:
    """A run has one budget: --steps or --time (checked on the options given, before a
    resumed run's stored budget is replaced, and again on the config)."""
    if steps is not None and time is not None:
        raise LmlabError(f"give one budget, --steps {steps} or --time {time}, not both")


def check_batch_split(batch_size: int, grad_accum: int, world: int) -> None:
    """The global batch B splits into ``world`` processes × ``grad_accum`` micro-steps of
    equal size (checked on the options, with torchrun's or --nproc's planned world size,
    and again once the process group is joined)."""
    if batch_size % grad_accum:
        raise LmlabError(f"--batch-size {batch_size} is not divisible by --grad-accum {grad_accum}")
    if batch_size % (world * grad_accum):
        raise LmlabError(
            f"--batch-size {batch_size} (the global batch) is not divisible by {world} processes "
            f"× --grad-accum {grad_accum}; give a multiple of {world * grad_accum}"
        )


def parse_duration(s: str | float | int) -> float:
    """'90s', '5m', '1.5h', '300' -> seconds."""
    if isinstance(s, int | float):
        return float(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(s))
    if not m:
        raise LmlabError(f"--time {s!r} is not a duration; write e.g. 90s, 5m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
