"""The learning-rate schedule and the ``--time`` budget: the two pieces of arithmetic that
decide how fast a run learns and when it ends.

- ``lr_at``: linear warmup, then cosine decay to ``min_lr``; ``replan_lr`` keeps the curve
  continuous when a ``--time`` run moves its end.
- ``TimeBudget``: how many steps fit in ``--time``, estimated again as the run goes.
"""

from __future__ import annotations

import math
from typing import Any

from lmlab.training.config import TrainConfig

#: A --time re-plan is printed when it moves the end by this fraction of the announced steps.
#: 20%: a run on a machine whose load varies re-estimates every tenth of its budget, and
#: at 5% a three-minute run printed up to ten plans; what moves less is summed up once at
#: the end (``budget_note``).
REPLAN_NEWS = 0.20


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


def budget_note(
    time: str | None, step: int, announced: int | None, ran_out: bool, plan_at_stop: int | None
) -> str | None:
    """Why a --time run ended at ``step``, elsewhere than the step count last printed
    (``announced``): the budget ran out first (the hard stop, ``ran_out``, before the plan's
    end ``plan_at_stop``), or moves too small to print (less than REPLAN_NEWS, see the
    Trainer's ``_follow_budget``) shifted the end; None when it ended where it said."""
    said, head = announced, f"lmlab: --time {time}:"
    if not ran_out:
        if said is None or said == step:
            return None
        return (
            f"{head} {step} steps, not the {said} announced: later estimates moved the end by less "
            f"than {REPLAN_NEWS:.0%}, too little to announce"
        )
    plan = plan_at_stop
    if said is None or plan is None:
        return f"{head} the time budget ran out at step {step}, before the first estimate of the step count"
    lead = f"{head} stopped at step {step}, not the {said} announced: "
    if plan == said:
        return lead + f"the time budget ran out {plan - step} step{'s' * (plan - step != 1)} before the plan"
    return lead + (
        f"later estimates moved the end to {plan} (by less than {REPLAN_NEWS:.0%}, not announced), "
        f"and the time budget ran out {plan - step} step{'s' * (plan - step != 1)} before it"
    )
