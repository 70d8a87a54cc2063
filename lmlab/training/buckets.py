"""The batches of a run whose examples have lengths (pairs, labelled texts): each epoch a
plan of length-bucketed batches (:func:`lmlab.pairs.bucket_batches`), and the batch of step
k as a pure function of k — so ``--resume`` continues with the very batch it stopped before."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch


class BucketPlan:
    """Mixin: ``_batches(epoch)`` gives an epoch's batches; ``_batch_at(step)`` walks them."""

    def _batches(self, epoch: int) -> list[list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _batch_at(self, step: int) -> list[int]:
        """The examples of step ``step``, walking the epochs' shuffled plans in order. Only the
        current epoch's plan is kept, and the number of batches of each epoch before it."""
        if not hasattr(self, "_plan_lens"):
            self._plan_lens: list[int] = []
            self._cached: tuple[int, list[list[int]]] = (-1, [])
        epoch = 0
        while True:
            if epoch == len(self._plan_lens):
                self._plan_lens.append(len(self._plan(epoch)))
                if not self._plan_lens[-1]:
                    from lmlab.errors import LmlabError

                    raise LmlabError("no training examples are left after the dev set was held out; give more data")
            if step < self._plan_lens[epoch]:
                return self._plan(epoch)[step]
            step -= self._plan_lens[epoch]
            epoch += 1

    def _plan(self, epoch: int) -> list[list[int]]:
        if self._cached[0] != epoch:
            self._cached = (epoch, self._batches(epoch))
        return self._cached[1]

    def _step_on(self: Any, rows: list[int], loss_of: Callable[[list[int]], torch.Tensor]) -> float:
        """One optimizer step on the examples ``rows``: split over the ranks × --grad-accum
        micro-batches, ``loss_of(micro)`` backpropagated on each, gradients applied once.
        A batch smaller than W × grad_accum leaves some parts empty: they still run (a row of
        the batch, weighted 0), so every rank joins every gradient all-reduce."""
        cfg = self.cfg
        W, rank = self.dist.world_size, self.dist.rank
        parts = [p.tolist() for p in np.array_split(np.array(rows), W * cfg.grad_accum)]
        mine = parts[rank * cfg.grad_accum : (rank + 1) * cfg.grad_accum]
        losses = []
        for i, micro in enumerate(mine):
            weight = 1.0 if micro else 0.0
            last = i == len(mine) - 1
            with self.model.no_sync() if self.dist.active and not last else nullcontext():
                loss = loss_of(micro or rows[:1]) * (weight / cfg.grad_accum)
                loss.backward()
            losses.append(loss.detach())
        total = self.dist.mean(sum(torch.stack(losses).tolist()) if losses else 0.0)
        return self._apply_gradients(total)

    def _keep_best(self: Any, row: dict[str, Any], key: str, value: float | None, digits: int) -> bool:
        """``value`` into the metrics row as ``key``; True when it beats ``state["best_<key>"]``."""
        if value is None:
            return False
        row[key] = round(value, digits)
        best = self.state.get(f"best_{key}")
        if best is None or value > best:
            self.state[f"best_{key}"] = value
            return True
        return False


__all__ = ["BucketPlan"]
