"""``lmlab train --nproc N``: starting the training processes under torchrun, and
saying why a job failed.

The launcher side of distributed training, run in the process the user started, never
in a worker (the workers' side, the process group and the collectives, is
:mod:`lmlab.training.distributed`). It checks the options once, before any worker starts
(:func:`check_before_launch`), turns them back into ``lmlab train`` flags
(:func:`~lmlab.training.config.train_argv`, read from TrainConfig's fields, re-exported
here), and runs torchrun without its ``ChildFailedError`` traceback and log
(:func:`torchrun_main`), so that what a failed job prints is lmlab's own lines: the
workers' (rank 0's) error, :func:`failure_reason` for what no worker could say, and
:func:`continue_advice` for what to do next (``--resume`` only if a checkpoint was saved).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.training.config import train_argv
from lmlab.training.distributed import (
    DEFAULT_STARTUP_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    continue_advice,
    describe_failure,
    env_seconds,
    launched,
    occupied_out_message,
    planned_world_size,
)

#: The exit status of a process that stopped on a user error (printed by it or by rank 0).
USER_ERROR_STATUS = 2
#: --nproc reads a corpus of at most this many bytes before it starts the workers (empty? UTF-8?).
CHECK_READ_BYTES = 1 << 20


def check_before_launch(options: dict[str, Any], nproc: int) -> None:
    """What each worker of ``lmlab train --nproc N`` checks at start-up, checked once
    before any starts: the options (the batch split over N processes), ``--resume``, the
    data path (and a small corpus's text), a tokenizer file, ``--out``, the device and the
    ``LMLAB_DIST_*`` variables. A mistake then prints one line, and no process starts."""
    from lmlab.checkpoint import RunDir
    from lmlab.data import read_corpus, resolve_data
    from lmlab.runtime import resolve_device
    from lmlab.tokenizer import load_tokenizer
    from lmlab.training import train_config

    _check_nproc(nproc)
    env_seconds("LMLAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    env_seconds("LMLAB_DIST_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT_S)
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
        raise LmlabError(occupied_out_message(cfg.out, f"lmlab train --resume {cfg.out} --nproc {nproc}"))


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
    # A process killed from outside (SIGKILL, the OOM killer) first: the others' exits
    # (a lost peer, an abort in the collective library) follow from it.
    failures = sorted(causes or failures, key=lambda f: (f["exitcode"] >= 0, f["rank"]))
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
    "import sys\nfrom lmlab.training.launcher import torchrun_main\nsys.exit(torchrun_main(sys.argv[1], sys.argv[2:]))"
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
    "CHECK_READ_BYTES",
    "USER_ERROR_STATUS",
    "LaunchResult",
    "check_before_launch",
    "continue_advice",
    "failure_reason",
    "launch",
    "torchrun_main",
    "train_argv",
]
