"""Training: one loop for every lmlab model, the library side of ``lmlab train``.

    minimise L = -(1/BT) Σ_b Σ_t log p(x_{b,t+1} | x_{b,≤t})   (AdamW, warmup + cosine)

- :mod:`~lmlab.training.config`   TrainConfig: every option of ``lmlab train``, its flag and its checks
- :mod:`~lmlab.training.schedule` the learning rate (warmup, cosine, re-planned) and the --time budget
- :mod:`~lmlab.training.prepare`  the Trainer's set-up: --out, tokenizer, model, corpus, optimizer, DDP
- :mod:`~lmlab.training.trainer`  the Trainer: steps, evaluation, the loop
- :mod:`~lmlab.training.state`    what a checkpoint keeps for --resume: optimizer moments, RNG states
- :mod:`~lmlab.training.signals`  Ctrl-C / SIGTERM: save after the current step and stop
- :mod:`~lmlab.training.console`  a line above the progress bar (under torchrun, rank 0's alone)
- :mod:`~lmlab.training.run`      ``train(**options)``: options -> TrainConfig -> a Trainer's run
- :mod:`~lmlab.training.distributed`, :mod:`~lmlab.training.launcher`  torchrun: the workers' side, ``--nproc``
- :mod:`~lmlab.training.plots`    loss.png and the charts of ``lmlab compare``

The public names are imported on first use (PEP 562), as in :mod:`lmlab`: ``lmlab train
--help`` reads :mod:`~lmlab.training.config` (no torch) through this package.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_LAZY = {
    "INIT_FIXED": "lmlab.training.config",
    "TrainConfig": "lmlab.training.config",
    "parse_duration": "lmlab.training.config",
    "train_argv": "lmlab.training.config",
    "train": "lmlab.training.run",
    "train_config": "lmlab.training.run",
    "TimeBudget": "lmlab.training.schedule",
    "lr_at": "lmlab.training.schedule",
    "replan_lr": "lmlab.training.schedule",
    "Trainer": "lmlab.training.trainer",
    "TrainResult": "lmlab.training.trainer",
}

__all__ = [
    "INIT_FIXED",
    "TimeBudget",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "lr_at",
    "parse_duration",
    "replan_lr",
    "train",
    "train_argv",
    "train_config",
]

if TYPE_CHECKING:
    from lmlab.training.config import INIT_FIXED, TrainConfig, parse_duration, train_argv
    from lmlab.training.run import train, train_config
    from lmlab.training.schedule import TimeBudget, lr_at, replan_lr
    from lmlab.training.trainer import Trainer, TrainResult


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmlab.training' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
