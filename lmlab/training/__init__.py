"""Training: one loop for every lmlab model, the library side of ``lmlab train``.

    minimise L = -(1/BT) Σ_b Σ_t log p(x_{b,t+1} | x_{b,≤t})   (AdamW, warmup + cosine)

- :mod:`~lmlab.training.config`   TrainConfig: every option of ``lmlab train`` and its checks
- :mod:`~lmlab.training.schedule` the learning rate (warmup, cosine, re-planned) and the --time budget
- :mod:`~lmlab.training.prepare`  the Trainer's set-up: --out, tokenizer, model, corpus, optimizer, DDP
- :mod:`~lmlab.training.trainer`  the Trainer: steps, evaluation, the loop
- :mod:`~lmlab.training.state`    what a checkpoint keeps for --resume: optimizer moments, RNG states
- :mod:`~lmlab.training.signals`  Ctrl-C / SIGTERM: save after the current step and stop
- :mod:`~lmlab.training.console`  messages on stderr (under torchrun, rank 0 speaks for the job)
- :mod:`~lmlab.training.run`      ``train(**options)``: options -> TrainConfig -> a Trainer's run
"""

from lmlab.training.config import INIT_FIXED, TrainConfig, parse_duration
from lmlab.training.console import log
from lmlab.training.run import train, train_config
from lmlab.training.schedule import TimeBudget, lr_at, replan_lr
from lmlab.training.trainer import Trainer, TrainResult

__all__ = [
    "INIT_FIXED",
    "TimeBudget",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "log",
    "lr_at",
    "parse_duration",
    "replan_lr",
    "train",
    "train_config",
]
