"""``lmlab compare``: several model families trained on the same text, the same tokenizer,
the same split and the same budget, then one report (``report.md`` with PNG charts).

The question it answers on the user's own text is the seed's: what does self-attention
buy over recurrence? To make the fight fair every run shares the data, the tokenizer
(trained once, saved as ``DIR/tokenizer.json``), the train/validation split, the batch,
the window, the seed, the optimiser settings and the validation windows, and the models
are sized to about the same number of parameters. Each model is trained by the one
Trainer, in its own ``lmlab train`` child process, so the kernel can report the peak
memory of that training alone (``wait4``'s ``ru_maxrss``), and the exact command of each
run is written into the report.

This module runs the models one after the other; :mod:`lmlab.compare.sizing` reads the
options and sizes the models, :mod:`lmlab.compare.runs` runs and measures one model, :mod:`lmlab.compare.report`
writes the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.compare.report import plot_curves, table, write_report  # noqa: F401 - importable from here too
from lmlab.compare.runs import RunResult, collect, error_line, measure, run_child, train_command
from lmlab.compare.sizing import (  # noqa: F401 - the sizing API, importable from here too
    DEFAULT_MODELS,
    MODEL_ARGS,
    MODELS,
    RNN_LAYERS,
    TOLERANCE,
    Plan,
    count_parameters,
    default_target,
    parse_model_args,
    parse_models,
    size_models,
)
from lmlab.errors import LmlabError
from lmlab.messages import say
from lmlab.training.config import TrainConfig, parse_duration


def log(msg: str) -> None:
    """A progress line of the comparison, ``lmlab: compare: ...`` on stderr."""
    say(f"lmlab: compare: {msg}")


# --------------------------------------------------------------------------- runs
@dataclass
class CompareResult:
    """What ``compare`` wrote: the folder, the report, its charts and every run's figures."""

    out: Path
    report: Path
    charts: list[Path]
    runs: list[RunResult]
    target_params: int


def _make_tokenizer(data: str, tokenizer: str, vocab_size: int, encoding_errors: str, out: Path):
    """Train the tokenizer once (as ``lmlab train`` would) and save it for every run."""
    from lmlab.tokenizer import load_tokenizer
    from lmlab.training.prepare import make_tokenizer

    if tokenizer not in ("char", "bpe"):
        return load_tokenizer(tokenizer), tokenizer
    cfg = TrainConfig(data=data, tokenizer=tokenizer, vocab_size=vocab_size, encoding_errors=encoding_errors)
    tok = make_tokenizer(cfg)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return tok, str(path)


def _default_prompt(data: str, encoding_errors: str) -> str:
    """The corpus's first line (at most 40 characters), with its newline."""
    from lmlab.data import iter_corpus, resolve_data

    text = ""  # read only as far as the first line (the corpus may be gigabytes)
    for chunk in iter_corpus(resolve_data(data), encoding_errors, builtin=data == "builtin", chunk_chars=4096):
        text += chunk
        head = text.lstrip("\n")
        if "\n" in head or len(head) >= 40:
            break
    first = text.lstrip("\n").split("\n", 1)[0][:40]
    return first + "\n" if first else ""


def _budget(time: str | None, tokens: int | None, tokens_per_step: int) -> tuple[str | None, int | None]:
    """(--time, --steps) for each run: a time budget, or the steps that read ``tokens``."""
    if time is not None and tokens is not None:
        raise LmlabError("give one budget, --time or --tokens, not both")
    if tokens is None:
        time = time or "5m"
        if parse_duration(time) <= 0:
            raise LmlabError(f"--time must be positive (got {time})")
        return time, None
    if tokens < tokens_per_step:
        raise LmlabError(
            f"--tokens {tokens} is less than one step (--batch-size × --max-seq-len = {tokens_per_step} "
            "tokens); give at least that many"
        )
    return None, math.ceil(tokens / tokens_per_step)  # steps = ⌈tokens / (B·T)⌉


def _check_options(names: list[str], margs: dict[str, Any], **positive: int) -> None:
    """What no run could fix: --model-args for a model not compared, a size that is not
    positive (``positive``: flag name in snake case -> value)."""
    stray = sorted(set(margs) - set(names))
    if stray:
        raise LmlabError(f"--model-args for {', '.join(stray)}, which --models does not list")
    for key, v in positive.items():
        if v <= 0:
            raise LmlabError(f"--{key.replace('_', '-')} must be positive (got {v})")


def _check_out(root: Path, names: list[str], overwrite: bool) -> None:
    """Refuse to train over finished runs unless --overwrite; make the folder."""
    from lmlab.checkpoint import RunDir

    taken = [n for n in names if RunDir(root / n).has_checkpoint()]
    if taken and not overwrite:
        raise LmlabError(
            f"{root} already holds runs of {', '.join(taken)}; give another --out or --overwrite"
        )
    root.mkdir(parents=True, exist_ok=True)


def _train_each(
    plans: list[Plan],
    root: Path,
    base: dict[str, Any],
    measuring: dict[str, Any],
    overwrite: bool,
    progress: bool,
) -> list[RunResult]:
    """Train the models one after the other, each in its own ``lmlab train`` child, and
    measure each (``measuring``: the prompt, sample_tokens, seed and device of ``measure``)."""
    runs = []
    for i, p in enumerate(plans, 1):
        folder = root / p.name
        folder.mkdir(parents=True, exist_ok=True)
        opts = {**base, **p.options, "out": str(folder), "overwrite": overwrite or None, "progress": progress}
        cmd = train_command(opts)
        log(f"[{i}/{len(plans)}] training {p.name} ({p.n_params:,} parameters) into {folder}/")
        rc, rss = run_child(cmd, folder / "train.log", echo=progress)
        if rc != 0:
            raise LmlabError(f"training {p.name} failed: {error_line(folder / 'train.log')}")
        measured = measure(
            folder, measuring["prompt"], measuring["sample_tokens"], base["seed"], base["device"]
        )
        runs.append(collect(p, folder, cmd, rss, measured))
    return runs


def compare(
    data: str,
    out: str | Path,
    models: str | Iterable[str] | None = None,
    time: str | None = None,
    tokens: int | None = None,
    tokenizer: str = "char",
    vocab_size: int = 4096,
    seed: int = 1337,
    params: int | None = None,
    model_args: Iterable[str] | dict[str, dict[str, Any]] | None = None,
    max_seq_len: int = 64,
    batch_size: int = 12,
    eval_every: int | None = None,
    eval_batches: int = 20,
    encoding_errors: str = "strict",
    prompt: str | None = None,
    sample_tokens: int = 200,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    task: str = "lm",
    **translate: Any,
) -> CompareResult:
    """Train each model on the same data under the same budget into ``out/<model>/``, then
    write ``out/report.md`` (with ``val_loss_tokens.png``, ``val_loss_time.png`` and
    ``results.json`` beside it). The library form of ``lmlab compare``. ``task="translate"``
    compares encoder-decoders on parallel text instead (:mod:`lmlab.compare.translate`;
    ``translate``: its options, e.g. ``target_data``, ``valid``, ``bleu_samples``)."""
    from lmlab.data import load_corpus
    from lmlab.runtime import resolve_device
    from lmlab.tokenizer import tokenizer_kind

    if task == "translate":
        from lmlab.compare.translate import compare_translate

        if tokens is not None:
            raise LmlabError("--task translate compares under a time budget: give --time, not --tokens")
        extra = {k: v for k, v in translate.items() if v is not None}
        return compare_translate(
            data, out, models=models or "rnn-attention,transformer", time=time, tokenizer=tokenizer,
            vocab_size=vocab_size, seed=seed, params=params, model_args=model_args, max_seq_len=max_seq_len,
            batch_size=batch_size, eval_every=eval_every, device=device, overwrite=overwrite, progress=progress,
            **extra,
        )  # fmt: skip
    if task != "lm":
        raise LmlabError(f"--task must be lm or translate (got {task!r})")
    unknown = sorted(k for k, v in translate.items() if v is not None)
    if unknown:
        raise LmlabError(f"{', '.join('--' + k.replace('_', '-') for k in unknown)}: for --task translate only")
    names = parse_models(models if models is not None else DEFAULT_MODELS)
    margs = parse_model_args(model_args)
    _check_options(
        names, margs, batch_size=batch_size, max_seq_len=max_seq_len, eval_batches=eval_batches,
        sample_tokens=sample_tokens,
    )  # fmt: skip
    tokens_per_step = batch_size * max_seq_len
    time, steps = _budget(time, tokens, tokens_per_step)
    if eval_every is None:
        eval_every = max(1, steps // 20) if steps else 100
    root = Path(out)
    _check_out(root, names, overwrite)
    tok, tok_arg = _make_tokenizer(data, tokenizer, vocab_size, encoding_errors, root)
    vocab = tok.get_vocab_size()
    base = {
        "data": data,
        "tokenizer": tok_arg,
        "encoding_errors": encoding_errors,
        "max_seq_len": max_seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "steps": steps,
        "time": time,
        "eval_every": eval_every,
        "eval_batches": eval_batches,
        "device": device,
    }
    # Tokenized (and cached for the runs) here, so a corpus too short fails before any training.
    corpus = load_corpus(data, tok, encoding_errors)
    train_ids, val_ids = corpus.split(TrainConfig.val_fraction, max_seq_len)
    plans, target = size_models(names, vocab, {"max_seq_len": max_seq_len}, params, margs)
    for p in plans:  # every setting checked before the first run starts
        TrainConfig(**{**base, **p.options, "out": str(root / p.name)}).validate()
    if prompt is None:
        prompt = _default_prompt(data, encoding_errors)
    budget = f"{time} each" if time else f"{steps} steps × {tokens_per_step:,} tokens each"
    log(f"{len(plans)} models ({', '.join(f'{p.name} {p.n_params:,}' for p in plans)}), {budget}")

    measuring = {"prompt": prompt, "sample_tokens": sample_tokens}
    runs = _train_each(plans, root, base, measuring, overwrite, progress)
    split = {"n_tokens": len(corpus.ids), "n_train": len(train_ids), "n_val": len(val_ids)}
    facts = {
        "data": data,
        **split,
        "tokenizer": tokenizer_kind(tok),
        "tokenizer_path": tok_arg,
        "vocab": vocab,
        "tokens": (steps or 0) * tokens_per_step,
        "params": params,
        "target": target,
        "tolerance": TOLERANCE,
        **measuring,
        **{k: base[k] for k in ("time", "steps", "batch_size", "max_seq_len", "seed", "eval_batches")},
        "device": str(resolve_device(device)),
    }
    report, charts = write_report(root, runs, facts)
    return CompareResult(out=root, report=report, charts=charts, runs=runs, target_params=target)


__all__ = ["CompareResult", "RunResult", "compare", "count_parameters", "parse_models", "size_models"]
