"""Training on several processes or machines: PyTorch's own DDP under ``torchrun``.

lmlab does not ship a scheme of its own. ``torchrun`` starts the processes and sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; the
Trainer sees those variables, joins the process group (``gloo`` on CPU, ``nccl`` on
CUDA) and wraps the model in ``DistributedDataParallel``. ``lmlab train --nproc N``
is a shortcut that runs ``python -m torch.distributed.run --standalone
--nproc-per-node N -m lmlab train ...`` for you.

Why the result equals one process. A step's global batch of B windows is drawn from
one seeded stream (a pure function of the seed and the step, see
:func:`lmlab.data.step_generator`), cut into ``grad_accum`` micro-batches, and each
micro-batch into ``world_size`` equal shares. Rank r's loss on micro-step i is the
mean over its share, divided by k = grad_accum; DDP averages gradients over the W
ranks, so the gradient is
    (1/W) Σ_r (1/k) Σ_i ∇ mean(share r,i) = ∇ mean(all B windows),
the one-process gradient (equal shares make the mean of means the mean).

Failures. When a process dies (even by SIGKILL), torchrun notices within its
``--monitor-interval`` (0.1 s), sends SIGTERM to the others and SIGKILL 30 s later; a
peer waiting in a collective sees the closed connection at once and stops with an
error. A peer that hangs without dying (a network partition) is given up after
``LMLAB_DIST_TIMEOUT`` seconds (default 300): the collective timeout of the group.
The start-up wait (rank 0 tokenizes the corpus while the others wait) has its own,
longer limit, ``LMLAB_DIST_STARTUP_TIMEOUT`` (default 3600 s). What to do next
(:func:`continue_advice`) depends on the disk: ``--resume`` if a checkpoint was saved,
else the same command again.

Error messages, once. Every rank hits the same user error (the same options, files and
all-reduced loss), or one rank 0 passed on, so rank 0 alone prints it (see ``lmlab.cli``).

This module is the side that runs inside each training process (the process group, the
rank, the collectives, :class:`PeerError`); starting the processes (``--nproc``) is
:mod:`lmlab.training.launcher`'s.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmlab.errors import LmlabError

#: Seconds a collective waits for a peer before the job is given up (LMLAB_DIST_TIMEOUT).
DEFAULT_TIMEOUT_S = 300
#: Seconds the other ranks wait for rank 0 to prepare the run (LMLAB_DIST_STARTUP_TIMEOUT).
DEFAULT_STARTUP_TIMEOUT_S = 3600


class PeerError(LmlabError):
    """An error rank 0 hit and passed on: the other ranks stop with it, without repeating it."""


def launched() -> bool:
    """True inside a process started by torchrun (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


#: The world size ``--nproc N`` checks the options against before it starts N processes.
_planned_world_size: int | None = None


def env_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun), or, while
    :func:`planned_world_size` is in force, the number ``--nproc`` is about to start."""
    if _planned_world_size is not None:
        return _planned_world_size
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


@contextmanager
def planned_world_size(n: int) -> Iterator[None]:
    """Validate options as the N workers will (``TrainConfig.validate`` splits the batch
    over ``env_world_size()`` processes) before any of them exists."""
    global _planned_world_size
    prev, _planned_world_size = _planned_world_size, n
    try:
        yield
    finally:
        _planned_world_size = prev


def rank() -> int:
    """This process's global rank: 0 outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if launched() else 0


def is_main() -> bool:
    """Rank 0 alone writes files, logs and draws the progress bar."""
    return rank() == 0


def env_seconds(name: str, default: int) -> float:
    """The positive number of seconds in environment variable ``name`` (``default`` when unset)."""
    raw = os.environ.get(name)
    if raw is None:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise LmlabError(f"{name}={raw!r} is not a positive number of seconds")
    return value


@dataclass
class Dist:
    """This process's place in the job. Outside torchrun: rank 0 of 1, no collectives."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    owns_group: bool = False
    startup_group: Any = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """A process group exists (even of one process, under ``torchrun --nproc-per-node 1``)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------- collectives
    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max over the ranks (float64, on the backend's device)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def mean(self, value: float) -> float:
        """x̄ = (1/W) Σ_r x_r: with equal shares, the mean of the ranks' means is the global mean."""
        if not self.active:
            return value
        return self.all_reduce([value])[0] / self.world_size

    def max_int(self, value: int) -> int:
        return int(self.all_reduce([float(value)], op="max")[0]) if self.active else value

    def broadcast(self, obj: Any, group: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object of lmlab's own making)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------- rank 0 first
    def wait_for_main(self) -> dict[str, Any]:
        """Non-zero ranks: block until rank 0 has prepared the run (``--out``, the token
        cache, the tokenizer), then receive what it shares; raise if rank 0 failed."""
        payload = self.broadcast(None, group=self.startup_group)
        if payload.get("error"):
            raise PeerError(payload["error"])
        return payload

    def release(self, error: str | None = None, **shared: Any) -> None:
        """Rank 0: let the others start, sharing ``shared`` (or the error that stops them)."""
        if self.active and self.is_main:
            self.broadcast({"error": error, **shared}, group=self.startup_group)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def setup(device: torch.device) -> Dist:
    """Join torchrun's process group when launched by torchrun; otherwise one process.

    The backend follows the device: ``nccl`` for CUDA (each process on GPU LOCAL_RANK),
    ``gloo`` for CPU. A group the caller made already (``init_process_group`` in a
    script) is used as it is and left for the caller to close.
    """
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return Dist(device=device)
    if not dist.is_available():
        raise LmlabError("this PyTorch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LmlabError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                "start at most one process per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise LmlabError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device.type}")
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=env_seconds("LMLAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise LmlabError(
                f"could not join the process group ({e}); start lmlab with torchrun, "
                "or `lmlab train --nproc N`"
            ) from None
    backend = dist.get_backend()
    # The start-up wait may be long (rank 0 tokenizing a large corpus): a gloo side
    # group with its own, longer limit carries it, so the training timeout stays short.
    startup_timeout = timedelta(seconds=env_seconds("LMLAB_DIST_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT_S))
    startup = dist.new_group(backend="gloo", timeout=startup_timeout)
    return Dist(
        device=device,
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        backend=backend,
        owns_group=owns,
        startup_group=startup,
    )


def describe_failure(e: BaseException) -> str:
    """The first sentence of a backend's error, without its source-file prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    return text.split(". ")[0][:200]


def resumable_step(out: str | os.PathLike) -> int | None:
    """The step of the checkpoint ``--resume out`` would continue, None if there is none.

    A run folder is resumable once its first save completed: ``trainer_state.json`` at its
    top is a link that dangles until then (see :class:`lmlab.checkpoint.RunDir`), and a
    model folder without training state (an export, a Hugging Face model) has none."""
    state = Path(out) / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None  # damaged: --resume would say so; it is no advice to follow
    return step if isinstance(step, int) else None


def continue_advice(out: str | os.PathLike, resume_command: str) -> str:
    """What to do after a failed job, true to what is on disk: continue from the last
    checkpoint (``resume_command``) if one was written, else run the same command again
    (nothing to resume: ``lmlab train --resume`` would find no training checkpoint)."""
    step = resumable_step(out)
    if step is None:
        return f"no checkpoint was written in {out} yet: start again with the same command"
    return f"the last checkpoint in {out} (step {step}) is whole: continue with `{resume_command}`"


def occupied_out_message(out: str | os.PathLike, resume_command: str) -> str:
    """Why a new run refuses ``--out`` holding a checkpoint, and the ways on: ``--resume``
    only where there is training state to continue."""
    if resumable_step(out) is None:
        return (
            f"{out} already holds a model without training state (no trainer_state.json: --resume "
            "cannot continue it); start afresh with --overwrite, or give another --out"
        )
    return f"{out} already holds a checkpoint; continue it with `{resume_command}` or start afresh with --overwrite"


def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another process died, hung or left."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")
    )


__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "Dist",
    "PeerError",
    "continue_advice",
    "env_seconds",
    "env_world_size",
    "is_main",
    "describe_failure",
    "is_peer_failure",
    "launched",
    "occupied_out_message",
    "planned_world_size",
    "rank",
    "resumable_step",
    "setup",
]
