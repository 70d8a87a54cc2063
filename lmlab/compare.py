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

This module reads the options, sizes the models and runs them one after the other;
:mod:`lmlab.compare_runs` runs and measures one model, :mod:`lmlab.compare_report`
writes the report.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.compare_report import plot_curves, table, write_report  # noqa: F401 - importable from here too
from lmlab.compare_runs import RunResult, collect, error_line, measure, run_child, train_command
from lmlab.config import RECURRENT
from lmlab.errors import LmlabError
from lmlab.training import TrainConfig, parse_duration

MODELS = ("gpt", *RECURRENT)
DEFAULT_MODELS = ("rnn", "gru", "lstm", "gpt")
#: Each auto-sized model lands within this fraction of the target, so any two are
#: within 1.045/0.955 - 1 < 10% of each other.
TOLERANCE = 0.045
RNN_LAYERS = 2  # recurrent models: 2 layers (char-rnn's setting) unless the user says otherwise
#: What ``--model-args`` may set per model, with the type each value is read as.
MODEL_ARGS: dict[str, type] = {
    "n_layer": int,
    "n_head": int,
    "n_kv_head": int,
    "d_model": int,
    "hidden_size": int,
    "pos": str,
    "norm": str,
    "mlp": str,
    "bias": bool,
    "tie_embeddings": bool,
    "dropout": float,
    "stateful": bool,
    "lr": float,
    "min_lr": float,
    "warmup": int,
    "weight_decay": float,
    "grad_clip": float,
}


def log(msg: str) -> None:
    print(f"lmlab: compare: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs
def parse_models(spec: str | Iterable[str]) -> list[str]:
    """'rnn,gru,lstm,gpt' (or a list) -> the names, checked and without repeats."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise LmlabError(f"--models is empty; give a comma-separated list such as {','.join(DEFAULT_MODELS)}")
    for n in names:
        if n not in MODELS:
            raise LmlabError(f"--models: unknown model {n!r}; choose from {', '.join(MODELS)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LmlabError(f"--models names {', '.join(dup)} twice; each model is trained once")
    return names


def _parse_value(key: str, text: str) -> Any:
    kind = MODEL_ARGS[key]
    t = text.strip()
    try:
        if kind is bool:
            if t.lower() in ("1", "true", "yes", "on"):
                return True
            if t.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(t)
    except ValueError:
        raise LmlabError(f"--model-args: {key}={text!r} is not a valid {kind.__name__}") from None


def parse_model_args(items: Iterable[str] | dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """['lstm:hidden_size=512,n_layer=2', 'gpt:d_model=96'] -> {'lstm': {...}, 'gpt': {...}}."""
    if not items:
        return {}
    pairs: list[tuple[str, str, Any]] = []
    if isinstance(items, dict):
        for name, kv in items.items():
            pairs += [(name, k, v) for k, v in kv.items()]
    else:
        for item in items:
            name, sep, rest = item.partition(":")
            if not sep or "=" not in rest:
                raise LmlabError(
                    f"--model-args wants MODEL:KEY=VALUE[,KEY=VALUE...], e.g. lstm:hidden_size=512,n_layer=2 "
                    f"(got {item!r})"
                )
            for kv in rest.split(","):
                k, eq, v = kv.partition("=")
                if not eq:
                    raise LmlabError(f"--model-args: {kv!r} in {item!r} is not KEY=VALUE")
                pairs.append((name.strip(), k.strip().replace("-", "_"), v))
    out: dict[str, dict[str, Any]] = {}
    for name, k, v in pairs:
        if name not in MODELS:
            raise LmlabError(f"--model-args: unknown model {name!r}; choose from {', '.join(MODELS)}")
        if k not in MODEL_ARGS:
            raise LmlabError(f"--model-args: {name} has no setting {k!r}; settable: {', '.join(MODEL_ARGS)}")
        out.setdefault(name, {})[k] = _parse_value(k, v) if isinstance(v, str) else v
    return out


# --------------------------------------------------------------------------- sizes
def count_parameters(options: dict[str, Any], vocab_size: int) -> int:
    """Parameters of the model ``lmlab train`` would build with these options, counted on
    the meta device (shapes only, no memory, no initialisation cost)."""
    from lmlab.models import build_model

    cfg = TrainConfig(**options).model_config(vocab_size)
    with torch.device("meta"):
        return build_model(cfg).num_parameters()


def _nearest(count: Callable[[int], int], step: int, target: int) -> int:
    """The multiple of ``step`` whose count is nearest ``target``; ``count`` must grow with
    its argument (it does for d_model and hidden_size). Doubling, then bisection."""
    hi = 1
    while count(hi * step) < target and hi < 1 << 20:
        hi *= 2
    lo = 1
    while lo < hi:  # the smallest k with count(k·step) ≥ target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid * step) < target else (lo, mid)
    best = [k for k in (lo - 1, lo) if k >= 1]
    return step * min(best, key=lambda k: abs(count(k * step) - target))


def _miss(n: int, target: int) -> float:
    return abs(n - target) / target  # |n - target| / target


@dataclass
class Plan:
    """One model's run: its options for the Trainer and its parameter count."""

    name: str
    options: dict[str, Any]
    n_params: int
    sized: bool  # True: lmlab chose the size; False: the user gave it


def default_target(vocab_size: int, base: dict[str, Any]) -> int:
    """The parameter count of ``lmlab train``'s default Transformer for this vocabulary."""
    return count_parameters({**base, "model": "gpt"}, vocab_size)


def size_models(
    models: list[str],
    vocab_size: int,
    base: dict[str, Any] | None = None,
    params: int | None = None,
    model_args: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[Plan], int]:
    """Each model's options and count, and the target count.

    Rule: the target is ``params`` or the default Transformer's count. A recurrent model
    keeps d_model (the embedding) and 2 layers, and takes the hidden size, a multiple of 8
    (any integer if no multiple of 8 is close enough), whose count is nearest the target.
    The Transformer keeps 4 layers and 4 heads and takes the d_model, a multiple of 8,
    nearest the target (n_layer 1-8 if 4 layers cannot get close). Each lands within
    ``TOLERANCE`` (4.5%) of the target, so any two within 10% of each other. A size the
    user gives (hidden_size for a recurrent model, d_model for the Transformer) is kept.
    """
    base = dict(base or {})
    model_args = model_args or {}
    if params is not None and params <= 0:
        raise LmlabError(f"--params must be positive (got {params})")
    target = params if params is not None else default_target(vocab_size, base)
    plans = []
    for name in models:
        user = dict(model_args.get(name, {}))
        opts = {**base, "model": name, **({"n_layer": RNN_LAYERS} if name in RECURRENT else {}), **user}
        fixed = "hidden_size" in user if name in RECURRENT else "d_model" in user
        if not fixed:
            opts = _size_one(name, opts, vocab_size, target, "n_layer" in user)
        plans.append(Plan(name, opts, count_parameters(opts, vocab_size), sized=not fixed))
    return plans, target


def _size_one(name: str, opts: dict[str, Any], vocab: int, target: int, layers_given: bool) -> dict[str, Any]:
    key = "hidden_size" if name in RECURRENT else "d_model"

    def count_with(**kw: Any) -> Callable[[int], int]:
        return lambda v: count_parameters({**opts, **kw, key: v}, vocab)

    if name in RECURRENT:
        for step in (8, 1):  # a multiple of 8 suits the kernels; any integer if none is close
            value = _nearest(count_with(), step, target)
            if _miss(count_with()(value), target) <= TOLERANCE:
                return {**opts, key: value}
        what = f"d_model {opts.get('d_model', TrainConfig.d_model)}, {opts['n_layer']} layers"
    else:
        # d_model must split into n_head heads of even size (rotary pairs): a multiple of 2·n_head
        step = 2 * opts.get("n_head", TrainConfig.n_head)
        depth = opts.get("n_layer", TrainConfig.n_layer)
        # the given depth; else 4 layers first, then the depths 1-8 nearest to 4
        layer_choices = [depth] if layers_given else sorted(range(1, 9), key=lambda n: (abs(n - depth), n))
        for n_layer in layer_choices:
            value = _nearest(count_with(n_layer=n_layer), step, target)
            if _miss(count_with(n_layer=n_layer)(value), target) <= TOLERANCE:
                return {**opts, "n_layer": n_layer, key: value}
        what = f"{opts.get('n_head', TrainConfig.n_head)} heads"
    raise LmlabError(
        f"cannot size {name} to within {TOLERANCE:.1%} of {target:,} parameters ({what}); "
        f"give another --params, or its size with --model-args {name}:{key}=N"
    )


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
    from lmlab.training import Trainer

    if tokenizer not in ("char", "bpe"):
        return load_tokenizer(tokenizer), tokenizer
    cfg = TrainConfig(data=data, tokenizer=tokenizer, vocab_size=vocab_size, encoding_errors=encoding_errors)
    tok = Trainer(cfg)._make_tokenizer()
    path = out / "tokenizer.json"
    tok.save(str(path))
    return tok, str(path)


def _default_prompt(data: str, encoding_errors: str) -> str:
    """The corpus's first line (at most 40 characters), with its newline."""
    from lmlab.data import read_corpus, resolve_data

    text = read_corpus(resolve_data(data), encoding_errors, builtin=data == "builtin")
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


def compare(
    data: str,
    out: str | Path,
    models: str | Iterable[str] = DEFAULT_MODELS,
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
) -> CompareResult:
    """Train each model on the same data under the same budget into ``out/<model>/``, then
    write ``out/report.md`` (with ``val_loss_tokens.png``, ``val_loss_time.png`` and
    ``results.json`` beside it). The library form of ``lmlab compare``."""
    names = parse_models(models)
    margs = parse_model_args(model_args)
    stray = sorted(set(margs) - set(names))
    if stray:
        raise LmlabError(f"--model-args for {', '.join(stray)}, which --models does not list")
    for flag, v in (("batch-size", batch_size), ("max-seq-len", max_seq_len), ("eval-batches", eval_batches)):
        if v <= 0:
            raise LmlabError(f"--{flag} must be positive (got {v})")
    if sample_tokens <= 0:
        raise LmlabError(f"--sample-tokens must be positive (got {sample_tokens})")
    tokens_per_step = batch_size * max_seq_len
    time, steps = _budget(time, tokens, tokens_per_step)
    if eval_every is None:
        eval_every = max(1, steps // 20) if steps else 100
    root = Path(out)
    from lmlab.checkpoint import RunDir

    taken = [n for n in names if RunDir(root / n).has_checkpoint()]
    if taken and not overwrite:
        raise LmlabError(
            f"{root} already holds runs of {', '.join(taken)}; give another --out or --overwrite"
        )
    root.mkdir(parents=True, exist_ok=True)
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
    from lmlab.api import resolve_device
    from lmlab.data import load_corpus
    from lmlab.tokenizer import tokenizer_kind

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
        measured = measure(folder, prompt, sample_tokens, seed, device)
        runs.append(collect(p, folder, cmd, rss, measured))
    facts = {
        "data": data,
        "n_tokens": len(corpus.ids),
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "tokenizer": tokenizer_kind(tok),
        "tokenizer_path": tok_arg,
        "vocab": vocab,
        "time": time,
        "steps": steps,
        "tokens": (steps or 0) * tokens_per_step,
        "params": params,
        "prompt": prompt,
        "sample_tokens": sample_tokens,
        **{k: base[k] for k in ("batch_size", "max_seq_len", "seed", "eval_batches")},
        "device": str(resolve_device(device)),
    }
    report, charts = write_report(root, runs, facts | {"target": target, "tolerance": TOLERANCE})
    return CompareResult(out=root, report=report, charts=charts, runs=runs, target_params=target)


__all__ = ["CompareResult", "RunResult", "compare", "count_parameters", "parse_models", "size_models"]
