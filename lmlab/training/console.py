"""A status line above the training progress bar.

What :func:`lmlab.messages.say` adds nothing for: printed past an active tqdm bar, a
line would break it, so the trainer's lines written while the bar is drawn go through the
bar (``tqdm.write``). Warnings go through :func:`lmlab.messages.warn`, which the command
line also writes above the bar. Under torchrun rank 0 alone speaks for the job.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from lmlab.messages import is_main_process


def bar_log(bar: tqdm, msg: str) -> None:
    """``msg`` on stderr, above the progress bar (rank 0 only)."""
    if is_main_process():
        bar.write(msg, file=sys.stderr)
