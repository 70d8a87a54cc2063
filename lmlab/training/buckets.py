"""The batches of a run whose examples have lengths (pairs, labelled texts): each epoch a
plan of length-bucketed batches (:func:`lmlab.pairs.bucket_batches`), and the batch of step
k as a pure function of k — so ``--resume`` continues with the very batch it stopped before."""

from __future__ import annotations


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


__all__ = ["BucketPlan"]
