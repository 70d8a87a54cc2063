"""One model's run in ``lmlab compare``: its ``lmlab train`` child process, that process's
peak memory, and the figures read back from the finished run (metrics, generation speed,
a seeded sample).

Why a child process per model: the kernel then reports the peak memory of that training
alone (``wait4``'s ``ru_maxrss``), and the exact command of each run can be written into
the report, so a reader can repeat any one of them.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError
from lmlab.training.config import TrainConfig, train_argv
from lmlab.training.plots import read_metrics

if TYPE_CHECKING:
    from lmlab.compare.sizing import Plan


@dataclass
class RunResult:
    """One model's figures, as the report's table shows them."""

    name: str
    folder: str
    config: str
    n_params: int
    sized: bool
    steps: int
    tokens: int
    elapsed_s: float
    val_loss: float | None
    train_tokens_per_s: float
    generate_tokens_per_s: float
    peak_rss_bytes: int | None
    sample: str
    command: list[str]
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (tokens, seconds, val loss)

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.val_loss) if self.val_loss is not None else None


def train_command(options: dict[str, Any]) -> list[str]:
    """The ``lmlab train`` command line for these TrainConfig options."""
    return [sys.executable, "-m", "lmlab", "train", *train_argv(options)]


#: Runs ``argv[2:]`` as its own child and writes that child's peak resident set size to
#: ``argv[1]``. Why a launcher: Linux counts in a process's ``ru_maxrss`` the memory of the
#: process it was forked from (kept across exec), so a trainer forked from this process,
#: which holds PyTorch and the models measured so far, would report our size, not its own.
#: The launcher imports nothing heavy, so what it adds is a few MiB.
_LAUNCHER = r"""
import json, os, signal, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execv(cmd[0], cmd)
    finally:
        os._exit(127)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the trainer saves, then exits; wait for it
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"ru_maxrss": usage.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str], log_path: Path, echo: bool) -> tuple[int, int | None]:
    """Run ``cmd``, copying its output to ``log_path`` (and to stderr when ``echo``);
    return its exit code and peak resident set size in bytes (None where unknown)."""
    import tempfile

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd, usage_path = tempfile.mkstemp(prefix="lmlab-compare-", suffix=".json")
    os.close(fd)
    launch = [sys.executable, "-c", _LAUNCHER, usage_path] if hasattr(os, "fork") else []
    try:
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen([*launch, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            try:
                while chunk := os.read(proc.stdout.fileno(), 65536):
                    logf.write(chunk)
                    if echo:
                        sys.stderr.write(decoder.decode(chunk))
                        sys.stderr.flush()
            finally:
                proc.stdout.close()
                proc.wait()
        try:
            maxrss = json.loads(Path(usage_path).read_text())["ru_maxrss"]
        except (OSError, ValueError, KeyError):
            return proc.returncode, None
    finally:
        os.unlink(usage_path)
    # ru_maxrss is in kibibytes on Linux, in bytes on macOS
    return proc.returncode, maxrss * (1 if sys.platform == "darwin" else 1024)


def error_line(log_path: Path) -> str:
    lines = log_path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    errors = [ln.split("error:", 1)[1].strip() for ln in lines if ln.startswith("lmlab: error:")]
    return errors[-1] if errors else (lines[-1].strip() if lines else "no output")


def measure(folder: Path, prompt: str, n_tokens: int, seed: int, device: str) -> tuple[float, str, int]:
    """Generation speed (tokens/s, greedy, batch 1, after a short warm-up), a seeded
    sample, and the model's parameter count as loaded from its checkpoint."""
    from lmlab.api import load

    model = load(folder, device=device)  # where it trained
    # The end-of-text token is held back so every model generates exactly n_tokens.
    timed = {"temperature": 0, "max_new_tokens": n_tokens, "min_new_tokens": n_tokens}
    with contextlib.redirect_stderr(io.StringIO()):  # the sliding-window notice, said in the report
        model.generate_ids(prompt, **{**timed, "max_new_tokens": 8, "min_new_tokens": 8})
        t0 = _time.perf_counter()
        ids = model.generate_ids(prompt, **timed)
        dt = _time.perf_counter() - t0
        res = model.generate(prompt, max_new_tokens=n_tokens, temperature=0.8, seed=seed, return_details=True)
    assert not isinstance(res, list)
    # A sample that drew the end-of-text token stops there; the report says so.
    sample = res.text + ("\n[end of text]" if res.finish_reason == "eos" else "")
    return len(ids) / dt, sample, model.module.num_parameters()


def collect(plan: Plan, folder: Path, cmd: list[str], rss: int | None, measured: tuple) -> RunResult:
    """The figures of one finished run, read back from its metrics.jsonl."""
    rows = read_metrics(folder / "metrics.jsonl")
    if not rows:
        raise LmlabError(f"{folder}/metrics.jsonl is empty: the {plan.name} run trained no step")
    curve = [(r["tokens"], r["elapsed_s"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    gen_tok_s, sample, n_loaded = measured
    return RunResult(
        name=plan.name,
        folder=str(folder),
        config=TrainConfig(**plan.options).model_config(1).n_params_hint,
        n_params=n_loaded,
        sized=plan.sized,
        steps=rows[-1]["step"],
        tokens=rows[-1]["tokens"],
        elapsed_s=rows[-1]["elapsed_s"],
        val_loss=curve[-1][2] if curve else None,
        # median over steps of (batch × window) / step time: evaluation and saves excluded
        train_tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
        generate_tokens_per_s=gen_tok_s,
        peak_rss_bytes=rss,
        sample=sample,
        command=cmd,
        curve=curve,
    )


__all__ = ["RunResult", "collect", "error_line", "measure", "run_child", "train_command"]
