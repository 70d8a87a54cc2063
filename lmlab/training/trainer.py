"""The Trainer: one training loop for every lmlab model.

Next-token prediction: minimise the cross-entropy
    L = -(1/BT) Σ_b Σ_t log p(x_{b,t+1} | x_{b,≤t})
with AdamW (weight decay on matrices only), linear warmup then cosine decay,
gradient clipping, gradient accumulation and optional bf16 autocast.

Here: the steps, the evaluation and the loop. The set-up (tokenizer, model, corpus,
optimizer, DDP) is in :mod:`~lmlab.training.prepare`, the schedule and the ``--time``
budget in :mod:`~lmlab.training.schedule`, what a checkpoint keeps for ``--resume`` in
:mod:`~lmlab.training.state`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmlab.data import sample_starts, step_generator, windows
from lmlab.errors import LmlabError
from lmlab.messages import warn
from lmlab.models.loading import write_checkpoint
from lmlab.training.average import WeightAverage
from lmlab.training.config import TrainConfig
from lmlab.training.console import bar_log
from lmlab.training.prepare import TrainerSetup
from lmlab.training.schedule import REPLAN_NEWS, TimeBudget, budget_note, lr_at, replan_lr
from lmlab.training.signals import STOP_CODES, install_signal_handlers, restore_signal_handlers
from lmlab.training.state import state_tensors, stored_config, truncate_metrics

#: The trainer's clock (seconds); tests replace it to make --time runs deterministic.
_clock = time.perf_counter


@dataclass
class _Progress:
    """What the loop carries from step to step: the latest figures and the overfitting watch."""

    last_val: float | None = None
    train_ema: float | None = None  # exponential moving average of the training loss
    tok_s: float = 0.0
    prev_eval: tuple[float, float] | None = None  # (validation loss, train_ema) at the last evaluation
    rises: int = 0  # evaluations in a row where validation rose while training fell
    warned: bool = False

    def overfitting(self) -> bool:
        """True once, at the second evaluation in a row where validation rose while training
        fell (one alone is often the noise of a small validation sample)."""
        assert self.last_val is not None and self.train_ema is not None  # after a step, an evaluation
        prev = self.prev_eval
        rising = prev is not None and self.last_val > prev[0] and self.train_ema < prev[1]
        self.rises = self.rises + 1 if rising else 0
        self.prev_eval = (self.last_val, self.train_ema)
        if self.rises >= 2 and not self.warned:
            self.warned = True
            return True
        return False


@dataclass
class TrainResult:
    """What a run returns: where it wrote the checkpoint, how far it got and how it ended."""

    out: Path
    step: int
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    loss_png: Path | None
    stopped_early: bool = False
    stop_reason: str | None = None  # "interrupted" (SIGINT) or "terminated" (SIGTERM)
    start_step: int = 0  # where this session began (= step: a resumed run had nothing to train)
    task: str = "lm"
    #: the best dev score of a task that keeps one ({"accuracy": 0.91}, {"bleu": 35.0}), else empty
    best: dict[str, float] = field(default_factory=dict)


class Trainer(TrainerSetup):
    """One run: ``setup()`` (see :class:`~lmlab.training.prepare.TrainerSetup`), then
    ``run_loop()``; ``close()`` at the end (it leaves the torchrun process group)."""

    def __init__(self, cfg: TrainConfig, given: Collection[str] = ()) -> None:
        self.cfg = cfg
        self.given = set(given)  # the options set explicitly (``train`` passes them)
        self.stop_reason: str | None = None
        self.average: WeightAverage | None = None  # --ema-decay (made in setup)
        self.carry: dict[int, Any] = {}  # --stateful: each micro-batch's state, detached
        # --time (see _follow_budget): the step count last printed, set as the loop starts;
        # whether the hard stop ended the run before its plan's end, and that end (None:
        # not yet estimated).
        self.announced: int | None = None
        self.ran_out = False
        self.plan_at_stop: int | None = None

    def save(self, best: bool = False) -> None:
        """Every rank calls this (it gathers the RNG states); rank 0 alone writes."""
        rank_rngs = self.dist.gather(torch.get_rng_state()) if self.dist.world_size > 1 else None
        if not self.dist.is_main:
            return
        step = self.state["step"]
        meta = {**self.state, "max_steps": self.max_steps, "train_config": stored_config(self.cfg)}

        def write(folder: Path) -> None:
            with self._averaged():  # --ema-decay: the model file holds θ̄, the training state θ
                tensors = state_tensors(self.model, self.optimizer, rank_rngs)
                if self.average is not None:
                    tensors.update(self.average.raw_tensors())
                write_checkpoint(folder, self.model, self.tok, self.gen_cfg, meta, tensors,
                                 target_tokenizer=self._target_tokenizer_to_save())  # fmt: skip

        self.run.save(step, write, best=best)

    def _averaged(self) -> AbstractContextManager[None]:
        """Inside, the model holds the averaged weights θ̄ (--ema-decay); without it, nothing."""
        return self.average.swapped_in() if self.average is not None else nullcontext()

    def _target_tokenizer_to_save(self) -> Any:
        """A second tokenizer the checkpoint keeps (an encoder-decoder's target side); None."""
        return None

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
        return self._apply_gradients(total)

    def _apply_gradients(self, total: float) -> float:
        """Clip and step on the accumulated gradients; a non-finite loss or gradient skips the
        step (the caller stops the run) and returns NaN/inf."""
        cfg = self.cfg
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
        if self.average is not None:
            self.average.update(self.state["step"])  # the step just taken, counted from 0
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
        losses = []  # left on the device: one host-device sync for the whole evaluation
        for chunk in self.val_starts.split(self.cfg.batch_size):
            x, y = windows(self.val_ids, chunk.view(W, -1)[rank], T)  # this rank's share
            losses.append(self._loss(x, y))
        self.model.train()
        # All-reduced over equal shares, the mean of the ranks' means is one process's value.
        return self.dist.mean(sum(torch.stack(losses).tolist()) / len(losses))

    # ----------------------------------------------------------------- loop
    def run_loop(self) -> TrainResult:
        """Train from the current step to the end of the budget, or until a signal asks to
        stop; save on schedule, at a new best validation loss and at the end; draw loss.png."""
        main = self.dist.is_main  # rank 0 alone writes metrics.jsonl and draws the bar
        metrics_path = self.run.root / "metrics.jsonl"
        if main:
            truncate_metrics(metrics_path, self.state["step"])
        mfile = open(metrics_path, "a", encoding="utf-8") if main else None
        prev_handlers = install_signal_handlers(self)
        self.announced = self.max_steps  # the step count last printed (a resumed run's "of M")
        bar = tqdm(
            total=self.max_steps if self.max_steps else None,
            initial=self.state["step"],
            desc="train",
            unit="step",
            file=sys.stderr,
            disable=not (self.cfg.progress and main),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        seen, start = _Progress(), self.state["step"]
        try:
            step = self._steps(bar, mfile, seen)
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
            restore_signal_handlers(prev_handlers)
        return TrainResult(
            out=self.run.root,
            step=step,
            val_loss=seen.last_val,
            best_val_loss=self.state.get("best_val"),
            tokens_per_s=seen.tok_s,
            loss_png=self._plot_loss(metrics_path) if main else None,
            stopped_early=self.stop_reason is not None,
            stop_reason=self.stop_reason,
            start_step=start,
            task=self.cfg.task,
            best={k[5:]: v for k, v in self.state.items() if k.startswith("best_") and k != "best_val" and v is not None},
        )

    def _steps(self, bar: tqdm, mfile: IO[str] | None, seen: _Progress) -> int:
        """The steps, each followed by its metrics row, the --time plan, an evaluation and a
        save when due; returns the last step."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.seq_len
        start_step = step = self.state["step"]
        t_start, elapsed0 = _clock(), self.state.get("elapsed", 0.0)
        budget = TimeBudget(self.time_budget, elapsed0, start_step) if self.time_budget is not None else None
        self.model.train()
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
            now = _clock()
            stopping, elapsed = self._agree_on_stop(elapsed0 + now - t_start)
            dt = now - t0
            step += 1
            tokens = getattr(self, "step_tokens", None) or tokens_per_step  # (pairs: this step's own)
            seen.tok_s = tokens / dt if dt > 0 else 0.0
            self.state["step"] = step
            self.state["tokens"] = self.state.get("tokens", 0) + tokens
            self.state["elapsed"] = elapsed
            seen.train_ema = loss if seen.train_ema is None else 0.9 * seen.train_ema + 0.1 * loss
            row: dict[str, Any] = {
                "step": step,
                "loss": round(loss, 6),
                "lr": lr,
                "tokens_per_s": round(seen.tok_s, 1),
                "tokens": self.state["tokens"],
                "elapsed_s": round(self.state["elapsed"], 3),
            }
            moved = budget is not None and self._follow_budget(budget, step, elapsed, bar)
            is_last = self.max_steps is not None and step >= self.max_steps
            if moved or (budget is not None and is_last):  # the bar ends full, where the run ends
                bar.total = self._bar_total(step)
                bar.refresh()
            is_best = False
            if step % cfg.eval_every == 0 or is_last:
                with self._averaged():  # --ema-decay: the average is what is scored (and kept as best)
                    is_best = self._evaluate_into(row, seen)
            if mfile is not None:
                mfile.write(json.dumps(row) + "\n")
                mfile.flush()
            post = {"loss": f"{loss:.4f}", "tok/s": f"{seen.tok_s:,.0f}"}
            if seen.last_val is not None:
                post["val"] = f"{seen.last_val:.4f}"
            if "bleu" in row:
                post["bleu"] = f"{row['bleu']:.1f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if step % cfg.save_every == 0 or is_last or is_best or stopping:
                self.save(best=is_best)
                self.state["saved_step"] = step
            if stopping:
                if self.dist.is_main:
                    said = f"saved the checkpoint at step {step}; continue with `{self.resume_command()}`"
                    bar.write(f"lmlab: {stopping}: {said}", file=sys.stderr)
                break
        if budget is not None and step > start_step and not self.stop_reason:
            note = budget_note(cfg.time, step, self.announced, self.ran_out, self.plan_at_stop)
            if note:
                bar_log(bar, note)
        return step

    def _agree_on_stop(self, elapsed: float) -> tuple[str | None, float]:
        """Whether to stop after this step (a signal came), and the run's elapsed time.

        Under torchrun, a signal on any rank stops every rank after the same step: the ranks
        act on the all-reduced flag only (one arriving after it waits for the next step), or
        one rank would save while another trains on, each waiting for the other. The same
        all-reduce shares the clock: every rank takes the slowest one's elapsed time, so the
        --time decisions agree on every rank."""
        stopping = self.stop_reason
        if self.dist.active:
            code, elapsed = self.dist.all_reduce([STOP_CODES.index(stopping), elapsed], op="max")
            stopping = STOP_CODES[int(code)]
            self.stop_reason = self.stop_reason or stopping
        return stopping, elapsed

    def _evaluate_into(self, row: dict[str, Any], seen: _Progress) -> bool:
        """Evaluate, add ``val_loss`` to the metrics row, warn once of overfitting; True
        when this is the best validation loss so far (the step is then saved as best)."""
        seen.last_val = self.evaluate()
        if seen.last_val is None:
            return False
        row["val_loss"] = round(seen.last_val, 6)
        best = self.state.get("best_val")
        is_best = best is None or seen.last_val < best
        if is_best:
            self.state["best_val"] = seen.last_val
        if seen.overfitting():
            warn(
                "validation loss rose while training loss fell: the model may be overfitting "
                "(more data, --dropout, or fewer --steps help)"
            )
        return is_best

    def _plot_loss(self, metrics_path: Path) -> Path | None:
        """loss.png from metrics.jsonl; None (and a warning) if it cannot be drawn."""
        try:
            from lmlab.training.plots import plot_loss_curve

            return plot_loss_curve(metrics_path, self.run.root / "loss.png", title=f"lmlab: {self.cfg.out}")
        except Exception as e:  # a plot must never cost a training run
            warn(f"could not draw the loss curve ({e})")
            return None

    def resume_command(self) -> str:
        """The command that continues this run from its last checkpoint."""
        extra = f" --nproc {self.dist.world_size}" if self.dist.world_size > 1 else ""
        return f"lmlab train --resume {self.cfg.out}{extra}"

    def _bar_total(self, step: int) -> int | None:
        """The bar's total: the count last announced, not each silent re-plan; then the plan."""
        if self.max_steps is not None and step >= self.max_steps:
            return step
        if self.announced is not None and step < self.announced:
            return self.announced
        return self.max_steps

    def _follow_budget(self, budget: TimeBudget, step: int, elapsed: float, bar: tqdm) -> bool:
        """With --time, after each step: stop when the budget is spent (the hard stop),
        else, at an estimate point, move the end (and the lr schedule's, continuously:
        ``replan_lr``). True if the end moved.

        A new end is printed when it is news: the first, and then one that differs from
        the last printed (``self.announced``, the "was") by at least 20% (REPLAN_NEWS) of
        that plan's steps in this session and at least 2 steps, |T - A| ≥ max(2, 0.2·(A - t₀)).
        Smaller moves change the plan silently; ``budget_note`` owns up to them at the end."""
        if budget.over(elapsed):
            if self.max_steps is None or step < self.max_steps:
                self.ran_out, self.plan_at_stop = True, self.max_steps
            self.max_steps = step  # this step is the last: final evaluation and save
            return True
        new_end = budget.estimate(step, elapsed)
        if new_end is None or new_end == self.max_steps:
            return False
        self.state["lr_plan"] = replan_lr(step, self.cfg, self.lr_end, new_end, self.state.get("lr_plan"))
        self.max_steps = self.lr_end = self.state["lr_end"] = new_end
        said = self.announced
        if said is None or abs(new_end - said) >= max(2, REPLAN_NEWS * (said - budget.step0)):
            bar_log(
                bar,
                f"lmlab: --time {self.cfg.time}: {budget.per_step * 1000:.0f} ms/step, training for "
                f"{new_end} steps" + (f" (was {said})" if said is not None else ""),
            )
            self.announced = new_end
        return True
