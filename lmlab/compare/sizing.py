"""How ``lmlab compare`` reads its options and sizes each model to about the same
number of parameters: the :class:`Plan` of one run, made before anything trains."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.models.config import RECURRENT
from lmlab.training import TrainConfig

MODELS = ("gpt", *RECURRENT)
DEFAULT_MODELS = ("rnn", "gru", "lstm", "gpt")
#: ``--task translate``: the encoder-decoders, and the default comparison
SEQ2SEQ_MODELS = ("rnn-attention", "transformer")
#: models sized by their hidden size (the rest by d_model)
SIZED_BY_HIDDEN = (*RECURRENT, "rnn-attention")
#: Each auto-sized model lands within this fraction of the target, so any two are
#: within 1.045/0.955 - 1 < 10% of each other.
TOLERANCE = 0.045
RNN_LAYERS = TrainConfig.RNN_LAYERS  # recurrent models: 2 layers, as `lmlab train` builds them
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


# --------------------------------------------------------------------------- inputs
def parse_models(spec: str | Iterable[str], allowed: tuple[str, ...] = MODELS) -> list[str]:
    """'rnn,gru,lstm,gpt' (or a list) -> the names, checked and without repeats."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise LmlabError(f"--models is empty; give a comma-separated list such as {','.join(allowed)}")
    for n in names:
        if n not in allowed:
            raise LmlabError(f"--models: unknown model {n!r}; choose from {', '.join(allowed)}")
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
        if name not in (*MODELS, *SEQ2SEQ_MODELS):
            raise LmlabError(f"--model-args: unknown model {name!r}; choose from {', '.join(MODELS + SEQ2SEQ_MODELS)}")
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
    model = "transformer" if base.get("task") == "translate" else "gpt"
    return count_parameters({**base, "model": model}, vocab_size)


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
        opts = {**base, "model": name, **({"n_layer": RNN_LAYERS} if name in SIZED_BY_HIDDEN else {}), **user}
        fixed = "hidden_size" in user if name in SIZED_BY_HIDDEN else "d_model" in user
        if not fixed:
            opts = _size_one(name, opts, vocab_size, target, "n_layer" in user)
        plans.append(Plan(name, opts, count_parameters(opts, vocab_size), sized=not fixed))
    return plans, target


def _size_one(name: str, opts: dict[str, Any], vocab: int, target: int, layers_given: bool) -> dict[str, Any]:
    key = "hidden_size" if name in SIZED_BY_HIDDEN else "d_model"

    def count_with(**kw: Any) -> Callable[[int], int]:
        return lambda v: count_parameters({**opts, **kw, key: v}, vocab)

    if name in SIZED_BY_HIDDEN:
        # a multiple of 8 suits the kernels; any integer if none is close (an even one for a
        # bidirectional encoder, whose two directions share the hidden size)
        for step in (8, 2 if name == "rnn-attention" else 1):
            value = _nearest(count_with(), step, target)
            if _miss(count_with()(value), target) <= TOLERANCE:
                return {**opts, key: value}
        what = f"d_model {opts.get('d_model', TrainConfig.d_model)}, {opts['n_layer']} layers"
    else:
        # d_model must split into n_head heads of even size (rotary pairs): a multiple of 2·n_head
        step = 2 * opts.get("n_head", TrainConfig.n_head)
        depth = opts.get("n_layer", TrainConfig.GPT_LAYERS)
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
