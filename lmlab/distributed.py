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
longer limit, ``LMLAB_DIST_STARTUP_TIMEOUT`` (default 3600 s).

Error messages, once. Every rank hits the same user error (the same options, files and
all-reduced loss), or one rank 0 passed on, so rank 0 alone prints it (see ``lmlab.cli``).
``lmlab train --nproc N`` checks the options before it starts any worker
(:func:`check_before_launch`), and runs torchrun without its ``ChildFailedError``
traceback and log (:func:`torchrun_main`): what a failed job prints is lmlab's own lines.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
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


def _seconds(name: str, default: int) -> float:
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
        timeout = timedelta(seconds=_seconds("LMLAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
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
    startup_timeout = timedelta(seconds=_seconds("LMLAB_DIST_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT_S))
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


def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another process died, hung or left."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")
    )


# --------------------------------------------------------------------------- lmlab train --nproc N
def train_argv(options: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """The command-line flags of ``parser`` (``lmlab train``'s) that reproduce ``options``."""
    argv: list[str] = []
    for action in parser._actions:
        if action.dest not in options or not action.option_strings:
            continue
        value = options[action.dest]
        positive = [s for s in action.option_strings if not s.startswith("--no-")]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(positive[0] if value else f"--no-{positive[0][2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif isinstance(action, argparse._StoreFalseAction):  # --no-progress
            argv += [] if value else [action.option_strings[0]]
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


#: The exit status of a process that stopped on a user error (printed by it or by rank 0).
USER_ERROR_STATUS = 2
#: --nproc reads a corpus of at most this many bytes before it starts the workers (empty? UTF-8?).
CHECK_READ_BYTES = 1 << 20


def check_before_launch(options: dict[str, Any], nproc: int) -> None:
    """What each worker of ``lmlab train --nproc N`` checks at start-up, checked once
    before any starts: the options (the batch split over N processes), ``--resume``, the
    data path (and a small corpus's text), a tokenizer file, ``--out``, the device and the
    ``LMLAB_DIST_*`` variables. A mistake then prints one line, and no process starts."""
    from lmlab.api import resolve_device
    from lmlab.checkpoint import RunDir
    from lmlab.data import read_corpus, resolve_data
    from lmlab.tokenizer import load_tokenizer
    from lmlab.training import train_config

    _check_nproc(nproc)
    _seconds("LMLAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    _seconds("LMLAB_DIST_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT_S)
    with planned_world_size(nproc), redirect_stderr(io.StringIO()):  # rank 0 will say its warnings
        cfg, _ = train_config(**options)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise LmlabError(
            f"--nproc {nproc} on cuda starts one process per GPU, but this machine has "
            f"{torch.cuda.device_count()} GPU(s); give --nproc {torch.cuda.device_count()} or fewer"
        )
    if device.type not in ("cpu", "cuda"):
        raise LmlabError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device.type}")
    files = resolve_data(cfg.data)
    if cfg.data != "builtin" and sum(f.stat().st_size for f in files) <= CHECK_READ_BYTES:
        read_corpus(files, cfg.encoding_errors)  # an empty corpus, bad UTF-8: cheap to find now
    if cfg.resume is None and cfg.init is None and cfg.tokenizer not in ("char", "bpe"):
        load_tokenizer(cfg.tokenizer)
    if cfg.resume is None and not cfg.overwrite and RunDir(cfg.out).has_checkpoint():
        raise LmlabError(
            f"{cfg.out} already holds a checkpoint; continue it with `lmlab train --resume {cfg.out} "
            f"--nproc {nproc}` or start afresh with --overwrite"
        )


def _check_nproc(nproc: int) -> None:
    if launched():
        raise LmlabError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    if nproc < 1:
        raise LmlabError(f"--nproc must be at least 1 (got {nproc})")


@dataclass
class LaunchResult:
    """How a ``--nproc`` job ended."""

    status: int  # 0; 1 when a process failed (torchrun's status); 128 + N when stopped by signal N
    reason: str | None = None  # what failed, where the processes' own lines do not say it


def launch(argv: list[str], nproc: int, debug: bool = False) -> LaunchResult:
    """Run ``lmlab train ARGV`` on ``nproc`` local processes under torchrun.

    The same command as ``torchrun --standalone --nproc-per-node N -m lmlab train ...``,
    run by :func:`torchrun_main` so that a failure prints no torchrun traceback (with
    ``debug``: torchrun itself, everything it prints). Each process gets ``cores / N``
    threads unless OMP_NUM_THREADS is set. SIGTERM is passed on to torchrun, which passes
    it to the workers (they save and stop); the status is then 143 (128 + SIGTERM).
    """
    _check_nproc(nproc)
    torchrun_args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "lmlab"]
    torchrun_args += [*(["--debug"] if debug else []), "train", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    root = str(Path(__file__).resolve().parents[1])  # the workers import this same lmlab
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    fd, report = tempfile.mkstemp(prefix="lmlab-torchrun-", suffix=".json")
    os.close(fd)
    if debug:
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args]
    else:
        cmd = [sys.executable, "-c", _TORCHRUN_MAIN, report, *torchrun_args]
    try:
        rc = _wait_forwarding_sigterm(subprocess.Popen(cmd, env=env))
        text = Path(report).read_text(encoding="utf-8")
    finally:
        Path(report).unlink(missing_ok=True)
    if rc == 0 or rc >= 128:
        return LaunchResult(rc)
    return LaunchResult(rc, failure_reason(json.loads(text) if text.strip() else {}, rc))


def _wait_forwarding_sigterm(proc: subprocess.Popen) -> int:
    """torchrun's exit status; 128 + SIGTERM when a SIGTERM we passed on stopped it."""
    forwarded: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        forwarded.append(signum)
        proc.send_signal(signum)

    prev = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too: wait for it to stop the workers
                continue
    finally:
        signal.signal(signal.SIGTERM, prev)
    if rc < 0:  # torchrun itself killed by a signal
        rc = 128 - rc
    return 128 + forwarded[0] if forwarded and rc != 0 else rc  # 143: stopped by SIGTERM, as asked


def failure_reason(report: dict[str, Any], status: int) -> str | None:
    """What failed, in words, from :func:`torchrun_main`'s report. None when every failed
    process stopped on a user error (status 2): lmlab printed that one already."""
    if report.get("error"):
        return f"torchrun could not run the processes: {report['error']}"
    failures = report.get("failures")
    if not failures:
        return f"torchrun exit status {status}"
    # Once a process fails, torchrun stops the others with SIGTERM and lists them too (one
    # that is past its own handler, exiting, dies of it): consequences, not causes.
    causes = [f for f in failures if f["exitcode"] != -signal.SIGTERM]
    failures = causes or failures
    said = []
    for f in failures:
        who = f"the process of rank {f['rank']} (pid {f['pid']})"
        if f["exitcode"] < 0:  # Popen's convention: -N = killed by signal N
            said.append(f"{who} was killed by {_signal_name(-f['exitcode'])}")
        elif f["exitcode"] != USER_ERROR_STATUS:
            said.append(f"{who} exited with status {f['exitcode']} (its traceback, if any, is above)")
    return "; ".join(said) or None


def _signal_name(n: int) -> str:
    try:
        return f"{signal.Signals(n).name} (signal {n})"
    except ValueError:
        return f"signal {n}"


#: The launcher process of ``--nproc``: ``python -c _TORCHRUN_MAIN REPORT TORCHRUN-ARGS...``.
_TORCHRUN_MAIN = (
    "import sys\nfrom lmlab.distributed import torchrun_main\n"
    "sys.exit(torchrun_main(sys.argv[1], sys.argv[2:]))"
)


def torchrun_main(report: str, args: list[str]) -> int:
    """torchrun (``torch.distributed.run``) as ``--nproc`` runs it; its exit status.

    torchrun's own ``main`` turns a failed worker into a ``ChildFailedError`` traceback with
    a summary table, and logs each process it stops: after the worker's one-line lmlab
    error, some 30 lines of noise. Here its ``run`` is called with logging off and that
    error caught; the failed ranks, their pids and exit codes go to ``report`` (JSON), for
    lmlab to say what was not said (:func:`failure_reason`)."""
    import logging

    logging.disable(logging.CRITICAL)
    info: dict[str, Any] = {}
    try:
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        try:
            run(parse_args(args))
            status = 0
        except ChildFailedError as e:
            info["failures"] = [
                {"rank": r, "pid": f.pid, "exitcode": f.exitcode} for r, f in sorted(e.failures.items())
            ]
            status = 1
        except SignalException as e:  # torchrun stopped the workers on SIGTERM / SIGINT
            status = 128 + int(e.sigval)
    except KeyboardInterrupt:
        status = 130
    except Exception as e:  # could not start: the rendezvous, a port
        info["error"] = describe_failure(e)
        status = 1
    Path(report).write_text(json.dumps(info), encoding="utf-8")
    return status


__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "USER_ERROR_STATUS",
    "Dist",
    "LaunchResult",
    "PeerError",
    "check_before_launch",
    "env_world_size",
    "failure_reason",
    "is_main",
    "describe_failure",
    "is_peer_failure",
    "launch",
    "launched",
    "planned_world_size",
    "rank",
    "setup",
    "torchrun_main",
    "train_argv",
]
