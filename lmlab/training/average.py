"""``--ema-decay d``: an exponential moving average of the weights (Polyak averaging).

After each optimizer step t (counted from 0),

    θ̄ ← d_t · θ̄ + (1 − d_t) · θ,        d_t = min(d, (1 + t) / (10 + t))

The weights of late training wander around a minimum with the noise of each batch; their
average sits nearer its centre and usually scores better than any single step (Polyak &
Juditsky 1992; the "EMA" of timm and of TensorFlow's ``ExponentialMovingAverage``, whose
warm-up ``(1 + t) / (10 + t)`` this borrows: early on, when θ moves fast, the average
follows it instead of remembering the random init). A decay d averages over about
1 / (1 − d) steps: 0.999 over the last ~1,000.

The average is what the run is for: evaluations (so ``DIR/best`` is chosen by it) and the
saved ``model.safetensors`` use θ̄. The raw θ that training goes on from is kept beside the
optimizer's moments (``training_state.safetensors``, as ``raw.<name>``) so that
``--resume`` continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lmlab.checkpoint import unwrap
from lmlab.errors import LmlabError

#: The prefix of the raw weights in training_state.safetensors.
RAW = "raw."


class WeightAverage:
    """θ̄ for every trainable parameter of ``model``, in the parameter's own dtype and device."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        """d_t: the decay of update ``step`` (0 for the first), warmed up as TensorFlow's."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """θ̄ ← θ̄ + (1 − d_t)(θ − θ̄): after the optimizer's step ``step``."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay_at(step))

    @torch.no_grad()
    def _swap(self) -> None:
        for a, p in zip(self.average, self.params):
            held = p.detach().clone()
            p.copy_(a)
            a.copy_(held)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside, the model's parameters hold θ̄ (and ``self.average`` holds θ); outside, θ."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def raw_tensors(self) -> dict[str, torch.Tensor]:
        """θ by name, for training_state.safetensors; called inside ``swapped_in`` (θ is then
        the held copy), as Trainer.save does."""
        return {RAW + n: a.detach().to("cpu").contiguous() for n, a in zip(self.names, self.average)}

    @torch.no_grad()
    def resume(self, stored: dict[str, torch.Tensor], folder: str) -> None:
        """On --resume the model was loaded from model.safetensors, which holds θ̄: that
        becomes the average, and training goes on from the stored raw θ."""
        missing = [n for n in self.names if RAW + n not in stored]
        if missing:
            raise LmlabError(
                f"{folder}/training_state.safetensors has no raw weights for --ema-decay ({missing[0]}); "
                "it cannot be resumed exactly: start a new run from its weights with --init"
            )
        for a, p, n in zip(self.average, self.params, self.names):
            raw = stored[RAW + n]
            if raw.shape != p.shape:
                raise LmlabError(f"{folder}/training_state.safetensors: raw.{n} has shape {tuple(raw.shape)}, the "
                                 f"model's {tuple(p.shape)}; the file is damaged or another run's: resume another "
                                 "checkpoint")  # fmt: skip
            a.copy_(p.detach())
            p.copy_(raw.to(p.device, p.dtype))


__all__ = ["RAW", "WeightAverage"]
