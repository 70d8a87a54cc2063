"""What a run says on stderr. Under torchrun every rank runs the same code; rank 0 alone
speaks for the job, so a message is printed once, not once per process."""

from __future__ import annotations

import sys

from tqdm import tqdm

from lmlab.training import distributed


def bar_log(bar: tqdm, msg: str) -> None:
    """A line above the progress bar (printing past the bar would break it)."""
    if distributed.is_main():
        bar.write(msg, file=sys.stderr)


def log(msg: str) -> None:
    if distributed.is_main():  # under torchrun, rank 0 speaks for the job
        print(msg, file=sys.stderr, flush=True)
