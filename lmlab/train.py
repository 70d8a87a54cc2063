"""The Trainer: one training loop for every lmlab model.

Next-token prediction: minimise the cross-entropy
    L = -(1/BT) Σ_b Σ_t log p(x_{b,t+1} | x_{b,≤t})
with AdamW (weight decay on matrices only), linear warmup then cosine decay,
gradient clipping, gradient accumulation and optional bf16 autocast.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tqdm import tqdm

from lmlab import distributed
from lmlab.api import resolve_device
from lmlab.checkpoint import RunDir, load_weights, read_checkpoint, read_json, unwrap, write_checkpoint
from lmlab.config import RECURRENT, RNNConfig, TransformerConfig
from lmlab.data import load_corpus, read_corpus, resolve_data, sample_starts, step_generator, windows
from lmlab.errors import LmlabError
from lmlab.models import build_model
from lmlab.tokenizer import (
    EOT,
    iter_chunks,
    load_tokenizer,
    tokenizer_kind,
    train_bpe_tokenizer,
    train_char_tokenizer,
)

#: With --init the model brings these: its architecture and its tokenizer (an error if given).
INIT_FIXED = (
    "tokenizer", "vocab_size", "model", "n_layer", "n_head", "n_kv_head", "d_model", "pos", "norm", "mlp",
    "bias", "tie_embeddings", "dropout", "hidden_size",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Every option of ``lmlab train`` (the CLI flags are these names in kebab-case)."""

    data: str = "builtin"
    out: str | None = None
    # tokenizer
    tokenizer: str = "char"  # char | bpe | PATH to tokenizer.json or a folder
    vocab_size: int = 4096  # for bpe
    encoding_errors: str = "strict"
    # model (the default: lmlab's recipe for small CPU runs, see README)
    model: str = "gpt"  # gpt (the Transformer) | rnn | gru | lstm
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    max_seq_len: int = 64
    pos: str = "rope"
    norm: str = "rmsnorm"
    mlp: str = "swiglu"  # swiglu | gelu
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    hidden_size: int = 512  # recurrent models: units per layer (d_model is the embedding size)
    stateful: bool = False  # recurrent models: carry the state across consecutive chunks
    # optimisation
    steps: int | None = None  # default 2000 when neither steps nor time is given
    time: str | None = None  # a budget such as "5m", "90s", "1h"
    batch_size: int = 12  # the global batch, in sequences
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float | None = None  # default lr/10
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 1337
    # bookkeeping
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 500
    val_fraction: float = 0.1
    precision: str = "fp32"
    device: str = "auto"
    resume: str | None = None
    extend_time: bool = False  # internal: --resume with --time T trains for T more
    init: str | None = None  # fine-tune from an lmlab checkpoint, a HF folder or a Hub id
    allow_pickle: bool = False  # with --init: accept a pickle .bin checkpoint (weights_only)
    overwrite: bool = False
    progress: bool = True

    def validate(self, given: Collection[str] = ()) -> None:
        """Check the options; ``given`` names those set explicitly (see ``_check_given``)."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LmlabError(msg)

        need(self.out is not None, "give --out DIR, the folder to write the checkpoint to")
        need(self.precision in ("fp32", "bf16"), f"--precision must be fp32 or bf16 (got {self.precision})")
        need(self.mlp in ("swiglu", "gelu"), f"--mlp must be swiglu or gelu (got {self.mlp})")
        need(
            self.model in ("gpt", *RECURRENT),
            f"--model must be gpt, {', '.join(RECURRENT)} (got {self.model!r})",
        )
        need(self.n_layer > 0, f"--n-layer must be positive (got {self.n_layer})")
        need(
            self.model not in RECURRENT or self.hidden_size > 0,
            f"--hidden-size must be positive (got {self.hidden_size})",
        )
        need(
            not self.stateful or self.model in RECURRENT or self.init is not None,  # --init: checked on load
            f"--stateful needs a recurrent model (--model {', '.join(RECURRENT)}); "
            f"--model {self.model} has no state to carry from one chunk to the next",
        )
        need(self.batch_size > 0, f"--batch-size must be positive (got {self.batch_size})")
        need(self.grad_accum > 0, f"--grad-accum must be positive (got {self.grad_accum})")
        need(
            self.batch_size % self.grad_accum == 0,
            f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}",
        )
        world = distributed.env_world_size()  # under torchrun, each process takes an equal share
        need(
            self.batch_size % (world * self.grad_accum) == 0,
            f"--batch-size {self.batch_size} (the global batch) is not divisible by {world} processes "
            f"× --grad-accum {self.grad_accum}; give a multiple of {world * self.grad_accum}",
        )
        need(self.steps is None or self.steps > 0, f"--steps must be positive (got {self.steps})")
        need(
            self.steps is None or self.time is None,
            f"give one budget, --steps {self.steps} or --time {self.time}, not both",
        )
        need(self.lr > 0, f"--lr must be positive (got {self.lr})")
        need(
            self.min_lr is None or 0 <= self.min_lr <= self.lr,
            f"--min-lr must be between 0 and --lr {self.lr} (got {self.min_lr}); it is where the cosine ends",
        )
        need(self.warmup >= 0, f"--warmup must be 0 or more steps (got {self.warmup})")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        need(self.eval_every > 0, f"--eval-every must be positive (got {self.eval_every})")
        need(self.save_every > 0, f"--save-every must be positive (got {self.save_every})")
        need(
            self.encoding_errors in ("strict", "replace", "ignore"),
            "--encoding-errors must be strict, replace or ignore",
        )
        if self.time is not None:
            need(parse_duration(self.time) > 0, f"--time must be positive (got {self.time})")
        self._check_given(set(given))

    def _check_given(self, given: set[str]) -> None:
        """Flags that make sense only together with others: an error names the flag to
        drop. ``given`` are the options the user set (the CLI passes only those), so a
        default never counts as a choice."""
        if self.init is not None:
            fixed = [k for k in INIT_FIXED if k in given]
            if fixed:
                raise LmlabError(
                    "--init uses the model's own architecture and tokenizer; drop "
                    + ", ".join("--" + k.replace("_", "-") for k in fixed)
                )
        elif "hidden_size" in given and self.model not in RECURRENT:
            raise LmlabError(
                f"--hidden-size is for recurrent models (--model {', '.join(RECURRENT)}); "
                f"--model {self.model} takes its width from --d-model: drop --hidden-size"
            )

    def model_config(self, vocab_size: int) -> TransformerConfig | RNNConfig:
        if self.model in RECURRENT:
            return RNNConfig(
                cell=self.model,
                vocab_size=vocab_size,
                d_model=self.d_model,
                hidden_size=self.hidden_size,
                n_layer=self.n_layer,
                dropout=self.dropout,
                tie_embeddings=self.tie_embeddings,
                max_seq_len=self.max_seq_len,
            )
        return TransformerConfig(
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_kv_head=self.n_kv_head,
            d_model=self.d_model,
            max_seq_len=self.max_seq_len,
            pos=self.pos,
            norm=self.norm,
            norm_bias=self.bias,
            activation="silu" if self.mlp == "swiglu" else "gelu",
            gated_mlp=self.mlp == "swiglu",
            qkv_bias=self.bias,
            proj_bias=self.bias,
            mlp_bias=self.bias,
            tie_embeddings=self.tie_embeddings,
            dropout=self.dropout,
        )


def parse_duration(s: str | float | int) -> float:
    """'90s', '5m', '1.5h', '300' -> seconds."""
    if isinstance(s, int | float):
        return float(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(s))
    if not m:
        raise LmlabError(f"--time {s!r} is not a duration; write e.g. 90s, 5m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def lr_at(step: int, cfg: TrainConfig, max_steps: int, plan: dict[str, Any] | None = None) -> float:
    """Linear warmup to lr over ``warmup`` steps, then cosine decay to min_lr at the end.

    lr(t) = lr·(t+1)/(w+1)                                  for t < w
    lr(t) = min_lr + ½(1 + cos(π·(t-w)/(T-w)))·(lr - min_lr)   for w ≤ t ≤ T

    ``plan`` (a --time run whose end T moved at step s, see ``replan_lr``) keeps the
    curve continuous through the move: {"warmup": w, "at": s, "lr": L}, L the lr step s
    had before. In the warmup, the ramp runs straight from L at s to lr at w; after it,
    the cosine goes on from the phase p₀ where it gave L, to its end at the new T:
    p(t) = p₀ + (1 - p₀)·(t - s)/(T - s),  cos(π·p₀) = 2(L - min_lr)/(lr - min_lr) - 1.
    """
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    if plan is None:
        warmup = min(cfg.warmup, max(1, max_steps // 10)) if max_steps else cfg.warmup
        at, at_lr = 0, None
    else:
        warmup, at, at_lr = plan["warmup"], plan["at"], plan["lr"]
    if step < warmup:
        if at_lr is not None and at <= step:  # re-anchored ramp: from L at s up to lr at w
            return at_lr + (cfg.lr - at_lr) * (step - at) / (warmup - at)
        return cfg.lr * (step + 1) / (warmup + 1)
    if step >= max_steps:
        return min_lr
    if at_lr is None or at <= warmup:  # the cosine starts at its peak, at w
        ratio = (step - warmup) / max(1, max_steps - warmup)
    else:
        p0 = _cosine_phase(at_lr, cfg.lr, min_lr)
        ratio = p0 + (1.0 - p0) * (step - at) / max(1, max_steps - at)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (cfg.lr - min_lr)


def _cosine_phase(lr_now: float, lr: float, min_lr: float) -> float:
    """p ∈ [0, 1] with min_lr + ½(1 + cos πp)(lr - min_lr) = lr_now (clamped to the curve)."""
    if lr <= min_lr:
        return 0.0
    c = 2.0 * (lr_now - min_lr) / (lr - min_lr) - 1.0
    return math.acos(max(-1.0, min(1.0, c))) / math.pi


def replan_lr(step: int, cfg: TrainConfig, old_end: int | None, new_end: int, plan: dict | None) -> dict:
    """The schedule's plan when a --time run's end moves from ``old_end`` (None: not known
    yet) to ``new_end`` before step ``step``: anchored at the lr that step had, so the
    curve does not jump. The warmup w is fixed once, when the end is first known."""
    now = lr_at(step, cfg, old_end or 10**9, plan)
    if plan is not None:
        warmup = plan["warmup"]
    elif old_end is not None:  # a --steps run extended with --time keeps its warmup
        warmup = min(cfg.warmup, max(1, old_end // 10))
    else:
        # The first estimate: w = min(--warmup, T/10). Made on the --warmup ramp, already
        # past w, the ramp goes on at the slope of a w-step warmup, lr/w per step, to the peak.
        warmup = min(cfg.warmup, max(1, new_end // 10))
        if warmup <= step < cfg.warmup:
            warmup = step + math.ceil((cfg.lr - now) / cfg.lr * warmup)
    return {"warmup": warmup, "at": step, "lr": now}


def _bar_log(bar: tqdm, msg: str) -> None:
    if distributed.is_main():
        bar.write(msg, file=sys.stderr)


def log(msg: str) -> None:
    if distributed.is_main():  # under torchrun, rank 0 speaks for the job
        print(msg, file=sys.stderr, flush=True)


#: The trainer's clock (seconds); tests replace it to make --time runs deterministic.
_clock = time.perf_counter


class TimeBudget:
    """--time: how many steps fit in the budget, estimated again as the run goes.

    Times are the run's elapsed seconds e (stored in the checkpoint: a resumed run counts
    what it spent before). This session started at e₀ and must end by E; training aims to
    stop at E - r, r = 8% of (E - e₀), which is left for the final evaluation and save.
    First estimate: after the first steps (at least 2, then 20 or a tenth of the budget;
    the first step is left out of the rate: it carries one-off costs, 7.9 s for a GRU whose
    later steps took 0.2 s). Then again each time another tenth of the budget is spent or
    another tenth of the planned steps done (whichever comes first: a run that speeds up
    must not reach its old end before it notices), from the rate of the steps since the
    last estimate (evaluations and saves included):
        T = t + ⌊(E - r - e) / (seconds per recent step)⌋
    A machine that slows down (or speeds up) mid-run moves the end; ``over`` is the hard
    stop for what no estimate foresaw.
    """

    def __init__(self, end: float, elapsed: float, step: int) -> None:
        self.end = end  # E
        self.start = elapsed  # e₀
        self.session = max(end - elapsed, 1e-9)  # E - e₀
        self.reserve = 0.08 * self.session  # r
        self.step0 = step
        self.mark: tuple[int, float] | None = None  # (t, e) the rate is measured from
        self.measuring = True  # before the first estimate
        self.next_at = math.inf  # the elapsed time of the next estimate
        self.next_step = math.inf  # or the step, if it comes first
        self.per_step = math.nan  # seconds per step at the last estimate

    def over(self, elapsed: float) -> bool:
        return elapsed >= self.end

    def estimate(self, step: int, elapsed: float) -> int | None:
        """Called after every step (``step`` steps done): the new step count T at an
        estimate point, else None."""
        if self.mark is None:  # the first step of this session: the rate starts after it
            self.mark = (step, elapsed)
            return None
        if self.measuring:
            if step - self.step0 < 20 and elapsed - self.start < 0.1 * self.session:
                return None
            self.measuring = False
        elif elapsed < self.next_at and step < self.next_step:
            return None
        self.per_step = max((elapsed - self.mark[1]) / max(1, step - self.mark[0]), 1e-9)
        self.mark = (step, elapsed)
        end = step + max(0, int((self.end - self.reserve - elapsed) / self.per_step))
        self.next_at = elapsed + 0.1 * self.session
        self.next_step = step + max(1, (end - self.step0) // 10)
        return end


@dataclass
class TrainResult:
    out: Path
    step: int
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    loss_png: Path | None
    stopped_early: bool = False
    stop_reason: str | None = None  # "interrupted" (SIGINT) or "terminated" (SIGTERM)


class Trainer:
    def __init__(self, cfg: TrainConfig, given: Collection[str] = ()) -> None:
        self.cfg = cfg
        self.given = set(given)  # the options set explicitly (``train`` passes them)
        self.stop_reason: str | None = None
        self.carry: dict[int, Any] = {}  # --stateful: each micro-batch's state, detached

    # ----------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        self.run = RunDir(cfg.out)
        resuming = cfg.resume is not None
        # Under torchrun: join the process group (gloo on CPU, nccl on CUDA). Rank 0
        # prepares the run first (--out, the tokenizer, the token cache, a download) while
        # the others wait; then they do the same from its tokenizer and caches.
        self.dist = distributed.setup(resolve_device(cfg.device))
        self.device = self.dist.device
        shared = {} if self.dist.is_main else self.dist.wait_for_main()
        try:
            mcfg, corpus = self._prepare(resuming, shared.get("tokenizer"))
        except BaseException as e:
            self.dist.release(error=str(e) if isinstance(e, LmlabError) else f"rank 0 failed: {e!r}")
            raise
        if self.dist.active:
            self.dist.release(tokenizer=self.tok.to_str())
        if self.dist.rank > 0:  # dropout: each rank its own stream (rank 0 keeps one process's)
            torch.manual_seed(_rank_seed(cfg.seed, self.dist.rank))
        self._setup_rest(mcfg, corpus, resuming)

    def _prepare(self, resuming: bool, tokenizer: str | None) -> tuple[Any, Any]:
        """Check --out; make or read the tokenizer and the model; tokenize the corpus."""
        cfg = self.cfg
        if self.dist.is_main and not resuming and self.run.has_checkpoint():
            if not cfg.overwrite:
                raise LmlabError(
                    f"{cfg.out} already holds a checkpoint; continue it with `lmlab train --resume "
                    f"{cfg.out}` or start afresh with --overwrite"
                )
            self.run.clear()
        if self.dist.is_main:
            try:
                self.run.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LmlabError(
                    f"cannot create --out {cfg.out} ({e.strerror}); choose another folder"
                ) from None
        torch.manual_seed(cfg.seed)

        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed": 0.0, "best_val": None}
        if resuming:
            mcfg, tensors, self.tok, self.gen_cfg = read_checkpoint(cfg.resume)
            self.state.update(read_json(Path(cfg.resume) / "trainer_state.json", "trainer state"))
            self.state["saved_step"] = self.state["step"]  # the checkpoint resumed from
        elif cfg.init is not None:  # fine-tune: an lmlab checkpoint, a HF folder or Hub id
            from lmlab.api import load

            source = load(cfg.init, dtype="float32", allow_pickle=cfg.allow_pickle)
            self.tok, mcfg, self.gen_cfg = source.tokenizer, source.config, dict(source.generation_config)
            log(f"lmlab: starting from {cfg.init} ({source.module.num_parameters() / 1e6:.1f}M parameters)")
        else:
            self.tok = Tokenizer.from_str(tokenizer) if tokenizer else self._make_tokenizer()
            mcfg = cfg.model_config(self.tok.get_vocab_size())
            self.gen_cfg = {
                "eos_token_id": self.tok.token_to_id(EOT),
                "bos_token_id": self.tok.token_to_id(EOT),
            }
        if cfg.init is not None and not resuming:
            self.model = source.module.train()
        else:
            self.model = build_model(mcfg)
        if resuming:
            load_weights(self.model, tensors, cfg.resume)
        self.model.to(self.device)
        self.seq_len = self._window(mcfg, resuming)
        if cfg.init is not None and not resuming:
            self._adopt_init_config(mcfg)

        corpus = load_corpus(cfg.data, self.tok, cfg.encoding_errors)
        return mcfg, corpus

    def _window(self, mcfg: Any, resuming: bool) -> int:
        """The training window: the model's context; with --init, --max-seq-len (default 64:
        a 1024-token window is slow on a CPU), within the context of a Transformer (an
        RNN has none: its max_seq_len is only the window it was trained on)."""
        cfg = self.cfg
        if cfg.init is None:
            return mcfg.max_seq_len
        bounded = getattr(self.model, "bounded_context", True)
        if "max_seq_len" in self.given and bounded and cfg.max_seq_len > mcfg.max_seq_len:
            raise LmlabError(
                f"--max-seq-len {cfg.max_seq_len} is longer than the context of {cfg.init} "
                f"({mcfg.max_seq_len} tokens); give --max-seq-len {mcfg.max_seq_len} or less"
            )
        if not bounded and ("max_seq_len" in self.given or resuming):
            return cfg.max_seq_len
        return min(cfg.max_seq_len, mcfg.max_seq_len)

    def _adopt_init_config(self, mcfg: Any) -> None:
        """With --init, the stored train_config says what was used: the model's own
        architecture and tokenizer (config.json has every detail), and the window."""
        cfg = self.cfg
        if isinstance(mcfg, RNNConfig):
            arch = dict(model=mcfg.cell, hidden_size=mcfg.hidden_size)
        else:
            arch = dict(
                model="gpt",
                n_head=mcfg.n_head,
                n_kv_head=mcfg.n_kv_head,
                pos=mcfg.pos,
                norm=mcfg.norm,
                mlp="swiglu" if mcfg.gated_mlp else "gelu",
                bias=any((mcfg.norm_bias, mcfg.qkv_bias, mcfg.proj_bias, mcfg.mlp_bias)),
            )
        arch.update(n_layer=mcfg.n_layer, d_model=mcfg.d_model, tie_embeddings=mcfg.tie_embeddings)
        arch.update(dropout=mcfg.dropout, tokenizer=cfg.init, vocab_size=self.tok.get_vocab_size())
        for k, v in arch.items():
            setattr(cfg, k, v)
        cfg.max_seq_len = self.seq_len
        if cfg.stateful and cfg.model not in RECURRENT:
            raise LmlabError(
                f"--stateful needs a recurrent model; {cfg.init} is a Transformer, which has no "
                "state to carry from one chunk to the next: drop --stateful"
            )

    def _setup_rest(self, mcfg: Any, corpus: Any, resuming: bool) -> None:
        cfg = self.cfg
        self.train_ids, self.val_ids = corpus.split(cfg.val_fraction, self.seq_len)
        if cfg.stateful and (len(self.train_ids) - 1) // cfg.batch_size < self.seq_len:
            raise LmlabError(
                f"--stateful reads the {len(self.train_ids):,} training tokens as --batch-size "
                f"{cfg.batch_size} parallel streams, each shorter than one window of --max-seq-len "
                f"{mcfg.max_seq_len}; give more text, a smaller --batch-size or a smaller --max-seq-len"
            )
        log(
            f"lmlab: corpus {corpus.name}: {len(corpus.ids):,} tokens; train {len(self.train_ids):,} "
            f"(first {1 - cfg.val_fraction:.0%}), validation {len(self.val_ids):,} (last {cfg.val_fraction:.0%})"
        )
        log(
            f"lmlab: model {mcfg.n_params_hint if hasattr(mcfg, 'n_params_hint') else ''} "
            f"{self.model.num_parameters() / 1e6:.2f}M parameters, tokenizer "
            f"{tokenizer_kind(self.tok)} ({self.tok.get_vocab_size()} tokens), device {self.device}"
        )
        self.optimizer = self._make_optimizer()
        if resuming:
            self._load_training_state(Path(cfg.resume))
        self.max_steps = self.state.get("max_steps") or cfg.steps
        if cfg.steps is not None and resuming:
            self.max_steps = cfg.steps  # --steps given again extends (or shortens) the run
            self.state["lr_plan"] = None  # and the schedule is the plain one to the new end
        self.time_budget = parse_duration(cfg.time) if cfg.time is not None else None
        self.lr_end = self.max_steps  # where the lr schedule ends; a --time run moves it
        if resuming and cfg.extend_time and self.time_budget is not None:
            self.max_steps = None  # measured again: T more seconds from here
            self.time_budget += self.state.get("elapsed", 0.0)
        if self.max_steps is None and cfg.time is None:
            self.max_steps = self.lr_end = 2000
        if resuming:
            done = self.state["step"]
            if self.max_steps is not None and done >= self.max_steps:
                log(
                    f"lmlab: {cfg.resume} is already at step {done} of {self.max_steps}: nothing to train "
                    f"(give --steps N with N > {done}, or --time T, to continue)"
                )
            else:
                total = self.max_steps if self.max_steps is not None else f"--time {cfg.time}"
                log(f"lmlab: resuming {cfg.resume} at step {done} (of {total})")
        self.val_starts = (
            sample_starts(
                len(self.val_ids),
                self.seq_len,
                cfg.eval_batches * cfg.batch_size,
                step_generator(cfg.seed, 0, stream=1),
            )
            if len(self.val_ids) > self.seq_len
            else None
        )
        self._setup_ddp()

    def _setup_ddp(self) -> None:
        """Say how the global batch is split; under torchrun, wrap the model in DDP."""
        cfg = self.cfg
        W, k = self.dist.world_size, cfg.grad_accum
        if cfg.batch_size % (W * k):
            raise LmlabError(
                f"--batch-size {cfg.batch_size} (the global batch) is not divisible by {W} processes "
                f"× --grad-accum {k}; give a multiple of {W * k}"
            )
        if W > 1 or k > 1:  # B = W processes × k micro-steps × b sequences
            log(
                f"lmlab: batch {cfg.batch_size} sequences per step = {W} process{'es' if W > 1 else ''} "
                f"× {k} micro-step{'s' if k > 1 else ''} × {cfg.batch_size // (W * k)} sequences"
                + (f" (DDP, {self.dist.backend})" if self.dist.active else "")
            )
        if self.dist.active:
            # DDP broadcasts rank 0's weights now and averages the gradients in backward.
            # Buffers (RoPE tables) are computed, not learned: no need to sync them each step.
            DDP = torch.nn.parallel.DistributedDataParallel
            no_sync_buffers = (
                {"forward_sync_buffers": False}  # torch >= 2.13's name
                if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False}
            )
            self.model = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **no_sync_buffers,
            )

    def close(self) -> None:
        """Leave the process group this Trainer joined (nothing outside torchrun)."""
        if getattr(self, "dist", None) is not None:
            self.dist.close()

    def _make_tokenizer(self):
        cfg = self.cfg
        if cfg.tokenizer in ("char", "bpe"):
            files = resolve_data(cfg.data)
            text = read_corpus(files, cfg.encoding_errors, builtin=cfg.data == "builtin")
            if cfg.tokenizer == "char":
                return train_char_tokenizer([text.replace(EOT, "")])
            return train_bpe_tokenizer(iter_chunks(text.replace(EOT, "\n")), cfg.vocab_size)
        return load_tokenizer(cfg.tokenizer)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay only on matrices (embeddings, linear weights), not on
        biases and norm gains, which decay would pull toward zero for no benefit."""
        cfg = self.cfg
        decay, no_decay = [], []
        for _, p in unwrap(self.model).named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)

    # ----------------------------------------------------------------- state
    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in unwrap(self.model).named_parameters()}

    def _state_tensors(self, rank_rngs: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Optimizer moments by parameter name, and the RNG state: safetensors, no pickle.
        Under torchrun, ranks r > 0 store theirs as ``rng.torch_cpu.rank{r}``."""
        names = self._param_names()
        out: dict[str, torch.Tensor] = {"rng.torch_cpu": torch.get_rng_state()}
        for r, rng in enumerate(rank_rngs or []):
            if r > 0:
                out[f"rng.torch_cpu.rank{r}"] = rng
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for k, v in self.optimizer.state.get(p, {}).items():
                    out[f"optim.{names[id(p)]}.{k}"] = v.detach().to("cpu").contiguous().reshape(v.shape)
        return out

    def _load_training_state(self, folder: Path) -> None:
        path = folder / "training_state.safetensors"
        if not path.is_file():
            raise LmlabError(
                f"{folder} has no training_state.safetensors; it cannot be resumed "
                "(start a new run from its weights instead)"
            )
        try:
            t = load_file(str(path))
        except Exception as e:
            raise LmlabError(f"{path} is damaged ({e}); resume from another checkpoint") from None
        names = self._param_names()
        sd = self.optimizer.state_dict()
        idx = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = {}
                for k in ("step", "exp_avg", "exp_avg_sq"):
                    key = f"optim.{names[id(p)]}.{k}"
                    if key in t:
                        st[k] = t[key].to(self.device) if k != "step" else t[key]
                if st:
                    sd["state"][idx] = st
                idx += 1
        self.optimizer.load_state_dict(sd)
        # Each rank its own RNG stream: the one it saved when the run had as many ranks
        # (bit-identical resume), else a fresh one drawn from (seed, step, rank).
        rank = self.dist.rank
        key = "rng.torch_cpu" if rank == 0 else f"rng.torch_cpu.rank{rank}"
        if key in t:
            torch.set_rng_state(t[key])
        elif rank > 0:
            torch.manual_seed(_rank_seed(self.cfg.seed, rank, self.state["step"]))

    def save(self, best: bool = False) -> None:
        """Every rank calls this (it gathers the RNG states); rank 0 alone writes."""
        rank_rngs = self.dist.gather(torch.get_rng_state()) if self.dist.world_size > 1 else None
        if not self.dist.is_main:
            return
        step = self.state["step"]
        meta = {**self.state, "max_steps": self.max_steps, "train_config": self._stored_config()}

        def write(folder: Path) -> None:
            tensors = self._state_tensors(rank_rngs)
            write_checkpoint(folder, self.model, self.tok, self.gen_cfg, meta, tensors)

        self.run.save(step, write, best=best)

    def _stored_config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.cfg)
        for k in ("resume", "overwrite", "progress"):
            d.pop(k, None)
        return d

    # ----------------------------------------------------------------- steps
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def _loss(self, x: torch.Tensor, y: torch.Tensor, carry: int | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy. With ``carry`` (--stateful), micro-batch
        ``carry`` starts from the state the previous step left and leaves its own."""
        state = self.carry.get(carry) if carry is not None else None
        with self._autocast():
            logits, state = self.model(x.to(self.device), state)
        if carry is not None:
            # Truncated BPTT: keep the values, cut the graph, so the next step's
            # backward pass stops at this chunk's first token.
            self.carry[carry] = (
                tuple(t.detach() for t in state) if isinstance(state, tuple) else state.detach()
            )
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.to(self.device).reshape(-1))

    def train_step(self, step: int) -> float:
        cfg = self.cfg
        T = self.seq_len
        if cfg.stateful:
            starts = self._stream_starts(step)
        else:
            starts = sample_starts(len(self.train_ids), T, cfg.batch_size, step_generator(cfg.seed, step))
        micro = starts.chunk(cfg.grad_accum)
        W, rank = self.dist.world_size, self.dist.rank
        parts: list[torch.Tensor] = []  # each micro-step's loss, left on the device until the end
        for i, m in enumerate(micro):
            # This rank's share of the micro-batch: rows [r·b, (r+1)·b) of its W·b windows.
            x, y = windows(self.train_ids, m.view(W, -1)[rank], T)
            # DDP averages the gradients over the ranks on the last micro-step only; before
            # it, no_sync() lets each rank accumulate its own (one all-reduce per step).
            last = i == len(micro) - 1
            with nullcontext() if last or not self.dist.active else self.model.no_sync():
                # L = (1/k) Σ_i mean(share i): k micro-batches of b = one batch of k·b
                loss = self._loss(x, y, i if cfg.stateful else None) / cfg.grad_accum
                loss.backward()
            parts.append(loss.detach())
        # One host-device sync per step, not one per micro-step (.item() each); summed as floats.
        total = self.dist.mean(sum(torch.stack(parts).tolist()))  # the global loss: (1/W) Σ_r L_r
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            return total
        # ‖g‖₂ over all parameters. A finite loss can still have an inf/NaN gradient
        # (an overflow in the backward pass): stepping on it would write NaN weights
        # into the next checkpoint, so it stops training like a NaN loss does.
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        if cfg.grad_clip > 0:  # g ← g · min(1, clip / ‖g‖₂), as clip_grad_norm_ does
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _stream_starts(self, step: int) -> torch.Tensor:
        """--stateful batches (char-rnn's, Zaremba et al.'s): the training tokens cut into
        ``batch_size`` contiguous streams of L tokens; step k reads the k-th window of
        each, so row b of one step continues row b of the step before, and the carried
        state is the true summary of everything before the window. A pure function of
        the step (resume needs nothing else); each pass over the streams starts from a
        zero state. Resuming also restarts from zeros (the state is not checkpointed).
        """
        B, T = self.cfg.batch_size, self.seq_len
        L = (len(self.train_ids) - 1) // B  # tokens per stream (+1 for the last target)
        k = step % (L // T)  # the window within the stream
        if k == 0:
            self.carry.clear()
        return torch.arange(B) * L + k * T  # (B,) stream b starts at b·L

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_starts is None:
            return None
        self.model.eval()
        T = self.seq_len
        W, rank = self.dist.world_size, self.dist.rank
        losses = []
        for chunk in self.val_starts.split(self.cfg.batch_size):
            x, y = windows(self.val_ids, chunk.view(W, -1)[rank], T)  # this rank's share
            losses.append(self._loss(x, y).item())
        self.model.train()
        # All-reduced over equal shares, the mean of the ranks' means is one process's value.
        return self.dist.mean(sum(losses) / len(losses))

    # ----------------------------------------------------------------- loop
    def run_loop(self) -> TrainResult:
        cfg = self.cfg
        metrics_path = self.run.root / "metrics.jsonl"
        main = self.dist.is_main  # rank 0 alone writes metrics.jsonl and draws the bar
        if main:
            _truncate_metrics(metrics_path, self.state["step"])
        mfile = open(metrics_path, "a", encoding="utf-8") if main else None
        tokens_per_step = cfg.batch_size * self.seq_len
        prev_handlers = _install_signal_handlers(self)
        start_step = self.state["step"]
        t_start = _clock()
        elapsed0 = self.state.get("elapsed", 0.0)
        budget = TimeBudget(self.time_budget, elapsed0, start_step) if self.time_budget is not None else None
        bar_total = self.max_steps if self.max_steps else None
        bar = tqdm(
            total=bar_total,
            initial=start_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            disable=not (cfg.progress and main),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        last_val = None
        prev_eval: tuple[float, float] | None = None
        overfit_evals = 0
        warned_overfit = False
        train_ema = None
        tok_s = 0.0
        self.model.train()
        step = start_step
        try:
            while self.max_steps is None or step < self.max_steps:
                t0 = _clock()
                lr = lr_at(step, cfg, self.lr_end or 10**9, self.state.get("lr_plan"))
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                loss = self.train_step(step)
                if not math.isfinite(loss):
                    raise LmlabError(
                        f"the loss or its gradient became {loss} at step {step + 1}; training stopped and "
                        f"the last good checkpoint (step {self.state.get('saved_step', 'none')}) in {cfg.out} "
                        "is kept. Try a lower --lr, or --precision fp32"
                    )
                # Stop after this step if a signal came. Under torchrun, a signal on any rank
                # stops every rank after the same step: the ranks act on the all-reduced
                # flag only (one arriving after it waits for the next step), or one rank
                # would save while another trains on, each waiting for the other.
                # The same all-reduce shares the clock: every rank takes the slowest one's
                # elapsed time, so the --time decisions below agree on every rank.
                now = _clock()
                elapsed = elapsed0 + now - t_start
                stopping = self.stop_reason
                if self.dist.active:
                    code, elapsed = self.dist.all_reduce([_STOP_CODES.index(stopping), elapsed], op="max")
                    stopping = _STOP_CODES[int(code)]
                    self.stop_reason = self.stop_reason or stopping
                dt = now - t0
                step += 1
                tok_s = tokens_per_step / dt if dt > 0 else 0.0
                self.state["step"] = step
                self.state["tokens"] = self.state.get("tokens", 0) + tokens_per_step
                self.state["elapsed"] = elapsed
                train_ema = loss if train_ema is None else 0.9 * train_ema + 0.1 * loss
                row: dict[str, Any] = {
                    "step": step,
                    "loss": round(loss, 6),
                    "lr": lr,
                    "tokens_per_s": round(tok_s, 1),
                    "tokens": self.state["tokens"],
                    "elapsed_s": round(self.state["elapsed"], 3),
                }
                if budget is not None and self._follow_budget(budget, step, elapsed, bar):
                    bar.total = self.max_steps
                    bar.refresh()
                is_last = self.max_steps is not None and step >= self.max_steps
                is_best = False
                if step % cfg.eval_every == 0 or is_last:
                    last_val = self.evaluate()
                    if last_val is not None:
                        row["val_loss"] = round(last_val, 6)
                        best = self.state.get("best_val")
                        is_best = best is None or last_val < best
                        if is_best:
                            self.state["best_val"] = last_val
                        # Two evaluations in a row where validation rose while training fell:
                        # one alone is often the noise of a small validation sample.
                        rising = (
                            prev_eval is not None and last_val > prev_eval[0] and train_ema < prev_eval[1]
                        )
                        overfit_evals = overfit_evals + 1 if rising else 0
                        if overfit_evals >= 2 and not warned_overfit:
                            warned_overfit = True
                            _bar_log(
                                bar,
                                "lmlab: warning: validation loss rose while training loss fell: the "
                                "model may be overfitting (more data, --dropout, or fewer --steps help)",
                            )
                        prev_eval = (last_val, train_ema)
                if mfile is not None:
                    mfile.write(json.dumps(row) + "\n")
                    mfile.flush()
                post = {"loss": f"{loss:.4f}", "tok/s": f"{tok_s:,.0f}"}
                if last_val is not None:
                    post["val"] = f"{last_val:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if step % cfg.save_every == 0 or is_last or is_best or stopping:
                    self.save(best=is_best)
                    self.state["saved_step"] = step
                if stopping:
                    if main:
                        bar.write(f"lmlab: {stopping}: saved the checkpoint at step {step}", file=sys.stderr)
                    break
        except BaseException:
            # A failing job under torchrun: its agent's SIGTERM must not cut the error
            # message short, so the stop handler stays (the process ends right after).
            if self.dist.active:
                prev_handlers = {}
            raise
        finally:
            bar.close()
            if mfile is not None:
                mfile.close()
            _restore_signal_handlers(prev_handlers)
        png = None
        if main:
            try:
                from lmlab.plots import plot_loss_curve

                png = plot_loss_curve(metrics_path, self.run.root / "loss.png", title=f"lmlab: {cfg.out}")
            except Exception as e:  # a plot must never cost a training run
                log(f"lmlab: warning: could not draw the loss curve ({e})")
        return TrainResult(
            out=self.run.root,
            step=step,
            val_loss=last_val,
            best_val_loss=self.state.get("best_val"),
            tokens_per_s=tok_s,
            loss_png=png,
            stopped_early=self.stop_reason is not None,
            stop_reason=self.stop_reason,
        )

    def _follow_budget(self, budget: TimeBudget, step: int, elapsed: float, bar: tqdm) -> bool:
        """With --time, after each step: stop when the budget is spent (the hard stop),
        else, at an estimate point, move the end (and the lr schedule's, continuously:
        ``replan_lr``). True if the end moved."""
        if budget.over(elapsed):
            self.max_steps = step  # this step is the last: final evaluation and save
            return True
        new_end = budget.estimate(step, elapsed)
        if new_end is None or new_end == self.max_steps:
            return False
        was = self.max_steps
        self.state["lr_plan"] = replan_lr(step, self.cfg, self.lr_end, new_end, self.state.get("lr_plan"))
        self.max_steps = self.lr_end = new_end
        if was is None or abs(new_end - was) >= max(2, 0.05 * (was - budget.step0)):  # news, not noise
            _bar_log(
                bar,
                f"lmlab: --time {self.cfg.time}: {budget.per_step * 1000:.0f} ms/step, training for "
                f"{new_end} steps" + (f" (was {was})" if was is not None else ""),
            )
        return True


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for rank r's own RNG stream (dropout), distinct per (seed, rank, step)."""
    return (seed * 0x9E3779B1 + rank * 0x632BE5AB + step * 0x85EBCA77) % (1 << 62)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (a killed run wrote them)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")


#: Why a run stops early, as a number all-reduced (max) so that every rank stops alike.
_STOP_CODES = (None, "interrupted", "terminated")


def _install_signal_handlers(trainer: Trainer) -> dict:
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):  # noqa: ARG001
        trainer.stop_reason = "interrupted" if signum == signal.SIGINT else "terminated"

    prev = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        prev[s] = signal.signal(s, handler)
    return prev


def _restore_signal_handlers(prev: dict) -> None:
    for s, h in prev.items():
        signal.signal(s, h)


def train(**options: Any) -> TrainResult:
    """Train a model (the library form of ``lmlab train``); returns where it wrote what."""
    cfg, explicit = train_config(**options)
    return _train(cfg, explicit)


def train_config(**options: Any) -> tuple[TrainConfig, Collection[str]]:
    """``lmlab train``'s options -> the validated TrainConfig (with ``resume``: that run's
    stored one, updated where a resumed run may change), and the options given explicitly.
    ``lmlab train --nproc N`` calls it too, to find mistakes before it starts N processes."""
    resume = options.get("resume")
    given = {k: v for k, v in options.items() if v is not None}  # the CLI passes only the flags set
    if "steps" in given and "time" in given:
        raise LmlabError(f"give one budget, --steps {given['steps']} or --time {given['time']}, not both")
    if resume is not None:
        stored = _stored_train_config(resume)
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
            log(
                "lmlab: warning: a resumed run keeps its stored settings; ignoring "
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


def _train(cfg: TrainConfig, explicit: Collection[str]) -> TrainResult:
    trainer = Trainer(cfg, explicit)
    try:
        trainer.setup()
        return trainer.run_loop()
    except Exception as e:
        if isinstance(e, LmlabError) or not distributed.is_peer_failure(e):
            raise
        raise LmlabError(
            f"another training process stopped or cannot be reached ({distributed.describe_failure(e)}); "
            f"the whole job stops. The last checkpoint in {cfg.out} is whole: continue with "
            f"`lmlab train --resume {cfg.out}` under torchrun or with --nproc N (any N)"
        ) from None
    finally:
        trainer.close()


def _absolute_paths(options: dict[str, Any]) -> dict[str, Any]:
    """Store paths absolute, so that --resume works from any folder."""
    out = dict(options)
    data = out.get("data")
    if data is not None and str(data) != "builtin":
        out["data"] = os.path.abspath(os.path.expanduser(str(data)))
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


__all__ = ["TrainConfig", "TrainResult", "Trainer", "lr_at", "parse_duration", "train"]
