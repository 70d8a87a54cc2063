"""``lmlab.train(...)``, the library form of ``lmlab train``: the options become a checked
:class:`~lmlab.training.config.TrainConfig` (with ``--resume``: the run's stored one,
updated where a resumed run may change), then one :class:`~lmlab.training.trainer.Trainer`
runs it. A peer process lost under torchrun becomes one line that says how to continue.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from lmlab.checkpoint import read_json
from lmlab.errors import LmlabError
from lmlab.messages import warn
from lmlab.training import distributed
from lmlab.training.config import TrainConfig, check_one_budget
from lmlab.training.trainer import Trainer, TrainResult


def train(**options: Any) -> TrainResult:
    """Train a model (the library form of ``lmlab train``: the same options, see
    :class:`~lmlab.training.config.TrainConfig`); returns where it wrote what."""
    cfg, explicit = train_config(**options)
    return _train(cfg, explicit)


def train_config(**options: Any) -> tuple[TrainConfig, Collection[str]]:
    """``lmlab train``'s options -> the validated TrainConfig (with ``resume``: that run's
    stored one, updated where a resumed run may change), and the options given explicitly.
    ``lmlab train --nproc N`` calls it too, to find mistakes before it starts N processes."""
    resume = options.get("resume")
    given = {k: v for k, v in options.items() if v is not None}  # the CLI passes only the flags set
    check_one_budget(given.get("steps"), given.get("time"))  # before a resumed run's budget is replaced
    if resume is not None:
        stored = _stored_train_config(resume)
        _check_stored(stored, resume)
        if stored.get("steps") is not None:  # a run stored with both budgets: its steps decided
            stored["time"] = None
        if given.get("model", stored.get("model")) != stored.get("model"):
            raise LmlabError(
                f"--resume {resume}: that run trains --model {stored.get('model')}, it cannot continue "
                f"as --model {given['model']}; start a new run with --out DIR"
            )
        allowed = {"steps", "time", "resume", "progress", "device", "out", "save_every", "eval_every", "data"}
        ignored = sorted(
            k for k, v in given.items() if k not in allowed and v != stored.get(k) and k != "allow_pickle"
        )
        if ignored:
            warn(
                "a resumed run keeps its stored settings; ignoring "
                + ", ".join("--" + k.replace("_", "-") for k in ignored)
            )
        stored.update({k: v for k, v in given.items() if k in allowed})
        # A budget given again replaces the stored one: --steps N, or --time T more from now.
        stored["extend_time"] = False
        if "steps" in given:
            stored["time"] = None
        elif "time" in given:
            stored["steps"] = None
            stored["extend_time"] = True
        stored["out"] = given.get("out") or resume
        stored["resume"] = resume
        options = stored
    else:
        options = _absolute_paths(options)
    fields_ = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - fields_)
    if unknown:
        raise LmlabError(f"unknown training option(s): {', '.join(unknown)}")
    cfg = TrainConfig(**{k: v for k, v in options.items() if v is not None or k in ("steps", "time")})
    explicit = () if resume is not None else set(given)  # a resumed run keeps its stored settings
    cfg.validate(explicit)
    if cfg.resume is not None and Path(cfg.out).resolve() != Path(cfg.resume).resolve():
        raise LmlabError("--resume continues in its own folder; leave out --out, or give the same folder")
    return cfg, explicit


def _check_stored(stored: dict[str, Any], resume: str) -> None:
    """The stored options of a run, each of its type (a null where a value belongs, ``"fast"``
    for a learning rate): a damaged trainer_state.json is named, not silently replaced by
    defaults (which would make the resumed run a different one)."""
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    probe = TrainConfig.__new__(TrainConfig)
    for name, f in known.items():
        value = stored.get(name, f.default if f.default is not dataclasses.MISSING else None)
        object.__setattr__(probe, name, value)
    try:
        probe._check_types()
    except LmlabError as e:
        raise LmlabError(
            f"{resume}/trainer_state.json: train_config: {str(e).removeprefix('--').replace('-', '_', 1)}; "
            "the file is damaged (restore it, or start a new run from this checkpoint with --init)"
        ) from None


def _train(cfg: TrainConfig, explicit: Collection[str]) -> TrainResult:
    if cfg.task in ("translate", "summarize"):
        from lmlab.training.seq2seq import Seq2SeqTrainer

        trainer: Trainer = Seq2SeqTrainer(cfg, explicit)
    elif cfg.task == "classify":
        from lmlab.training.classify import ClassifyTrainer

        trainer = ClassifyTrainer(cfg, explicit)
    elif cfg.task == "qa":
        from lmlab.training.qa import QATrainer

        trainer = QATrainer(cfg, explicit)
    elif cfg.task == "mlm":
        from lmlab.training.mlm import MLMTrainer

        trainer = MLMTrainer(cfg, explicit)
    else:
        trainer = Trainer(cfg, explicit)
    try:
        trainer.setup()
        return trainer.run_loop()
    except Exception as e:
        if isinstance(e, LmlabError) or not distributed.is_peer_failure(e):
            raise
        advice = distributed.continue_advice(cfg.out, f"lmlab train --resume {cfg.out}")
        if distributed.resumable_step(cfg.out) is not None:
            advice += " under torchrun or with --nproc N (any N)"
        raise LmlabError(
            f"another training process stopped or cannot be reached ({distributed.describe_failure(e)}); "
            f"the whole job stops. {advice[0].upper()}{advice[1:]}"
        ) from None
    finally:
        trainer.close()


def _absolute_paths(options: dict[str, Any]) -> dict[str, Any]:
    """Store paths absolute, so that --resume works from any folder."""
    out = dict(options)
    for key in ("data", "target_data", "valid"):
        value = out.get(key)
        if value is not None and str(value) != "builtin":
            out[key] = os.path.abspath(os.path.expanduser(str(value)))
    tok = out.get("tokenizer")
    if tok is not None and tok not in ("char", "bpe"):
        out["tokenizer"] = os.path.abspath(os.path.expanduser(str(tok)))
    init = out.get("init")
    if init is not None and Path(str(init)).expanduser().exists():
        out["init"] = os.path.abspath(os.path.expanduser(str(init)))
    return out


def _stored_train_config(folder: str) -> dict[str, Any]:
    p = Path(folder)
    if not (p / "trainer_state.json").exists():
        if not p.exists():
            raise LmlabError(f"--resume {folder}: the folder does not exist")
        raise LmlabError(f"--resume {folder}: no training checkpoint there (no trainer_state.json)")
    st = read_json(p / "trainer_state.json", "trainer state")
    cfg = st.get("train_config")
    if not isinstance(cfg, dict):
        raise LmlabError(f"{p / 'trainer_state.json'} has no train_config; it cannot be resumed")
    return dict(cfg)
