"""Training on several processes (issue 6): real ``torchrun`` with gloo on the CPU.

A 2-process run must reach the weights of a 1-process run with the same global batch
(and resume on 1 process to the same end), a step's windows must be split among the
ranks without overlap, gradient accumulation under DDP must sync only on the last
micro-step and equal one large batch, and a lost process must stop the whole job with
a clear error, after which ``--resume`` completes. Tiny models, a few steps each.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    assert_grads_of_one_batch,
    cli_env,
    finish,
    last_step,
    lmlab_cmd,
    popen,
    private_cache,
    read_metrics,
    saved_step,
    tiny_checkpoint,
    wait_for_step,
)
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import lmlab
from lmlab.checkpoint import RunDir
from lmlab.cli import build_parser
from lmlab.cli.args import train_keys
from lmlab.data import sample_starts, step_generator, windows
from lmlab.errors import LmlabError
from lmlab.training import TrainConfig, Trainer, distributed, launcher

# Constant learning rate (warmup 0, min-lr = lr): a 6-step run resumed to 12 steps then
# follows the same schedule as a 12-step run.
TINY = [
    "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--max-seq-len", "32", "--seed", "5",
    "--warmup", "0", "--lr", "3e-3", "--min-lr", "3e-3", "--precision", "fp32", "--device", "cpu",
    "--no-progress",
]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
#: A lost process stops the job within torchrun's 30 s SIGTERM->SIGKILL grace period (README).
STOP_WITHIN_S = 60


# `corpus`: SHAKESPEARE_TEXT in a file the module shares, from conftest.py.
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return cli_env(LMLAB_CACHE=str(private_cache(tmp_path_factory)))


def worker_pid(root: int, rank: int) -> int:
    """The pid of torchrun's worker of global ``rank`` among ``root``'s descendants."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            environ = []
        if b"LOCAL_RANK=%d" % rank in environ and b"RANK=%d" % rank in environ:
            return pid
        todo += children.get(pid, [])
    raise AssertionError(f"no worker of rank {rank} under pid {root}")


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


# --------------------------------------------------------------------------- 2 processes = 1 process
@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus: Path, env: dict[str, str]) -> dict[str, Path]:
    """6 steps of batch 8 on 1 process (one), on 1 process in 2 micro-steps (acc) and on
    2 processes under torchrun (two), snapshotted; then one and two resumed on 1 process
    to step 12."""
    root = tmp_path_factory.mktemp("ddp")
    common = [*TINY, "--data", str(corpus), "--batch-size", "8", "--eval-every", "3", "--eval-batches", "3"]
    one = popen(lmlab_cmd("train", *common, "--steps", "6", "--out", str(root / "one")), env)
    acc = popen(
        lmlab_cmd("train", *common, "--steps", "6", "--grad-accum", "2", "--out", str(root / "acc")), env
    )
    two = popen([*TORCHRUN, "-m", "lmlab", "train", *common, "--steps", "6", "--out", str(root / "two")], env)
    finish(one)
    finish(acc)
    (root / "two.err").write_text(finish(two)[1])
    for name in ("one", "two"):  # the step-6 files, before the resumed runs replace them
        snap = root / f"{name}-6"
        snap.mkdir()
        for f in ("model.safetensors", "metrics.jsonl"):
            shutil.copy(root / name / f, snap / f)
    resumed = [
        popen(lmlab_cmd("train", "--resume", str(root / n), "--steps", "12"), env) for n in ("one", "two")
    ]
    for p in resumed:
        finish(p)
    return {"root": root, "one": root / "one-6", "two": root / "two-6", "acc": root / "acc"}


def test_two_processes_reach_the_weights_of_one(runs: dict[str, Path]) -> None:
    one, two = runs["one"], runs["two"]
    err = (runs["root"] / "two.err").read_text()
    assert "batch 8 sequences per step = 2 processes × 1 micro-step × 4 sequences (DDP, gloo)" in err
    assert err.count("lmlab: trained 6 steps") == 1  # rank 0 alone reports
    # Same tensor names, none with DDP's `module.` prefix; same values within 1e-5.
    with safe_open(str(two / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if n.startswith(("module.", "_orig_mod."))]
    assert_same_weights(one, two, atol=1e-5)
    # One metrics line per step (rank 0 alone writes), the same global losses, and the
    # validation loss averaged over the ranks equals the one-process value.
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in m2] == list(range(1, 7))
    for a, b in zip(m1, m2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b.get("val_loss", 0) == pytest.approx(a.get("val_loss", 0), abs=1e-5)
    assert [r["step"] for r in m2 if "val_loss" in r] == [3, 6]
    assert m2[-1]["loss"] < m2[0]["loss"] - 0.1  # it did train


def test_two_processes_equal_two_micro_steps_bit_for_bit(runs: dict[str, Path]) -> None:
    """Rank r's share of the batch is micro-batch r of a 1-process run with --grad-accum 2,
    and (g₀ + g₁)/2 = g₀/2 + g₁/2 exactly in floating point (halving is exact): the two
    runs must agree in every bit, which a wrong split or a wrong average would break."""
    two, acc = weights(runs["two"]), weights(runs["acc"])
    assert two.keys() == acc.keys()
    assert [k for k in two if not torch.equal(two[k], acc[k])] == []
    assert [r["loss"] for r in read_metrics(runs["two"])] == [r["loss"] for r in read_metrics(runs["acc"])]


def test_a_two_process_run_resumes_on_one_process(runs: dict[str, Path]) -> None:
    """The data position is the step number and the optimizer state is rank 0's: a run
    started on 2 processes continues on 1 as if it had been on 1 all along."""
    root = runs["root"]
    assert saved_step(root / "two") == 12
    assert [r["step"] for r in read_metrics(root / "two")] == list(range(1, 13))
    assert_same_weights(root / "one", root / "two", atol=1e-5)
    # a 2-process checkpoint stores rank 1's RNG stream beside rank 0's
    state = load_file(str(root / "two" / "training_state.safetensors"))
    assert "rng.torch_cpu" in state


# --------------------------------------------------------------------------- one step, in process
def _trainer(tmp_path: Path, corpus: Path, **opts) -> Trainer:
    cfg = TrainConfig(
        data=str(corpus), out=str(tmp_path / "run"), steps=5, n_layer=2, n_head=2, d_model=32,
        max_seq_len=32, seed=7, dropout=0.0, device="cpu", progress=False, **opts,
    )  # fmt: skip
    cfg.validate()
    return Trainer(cfg)


def test_each_rank_takes_its_share_of_each_micro_batch(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    """B = 8 windows, k = 2 micro-steps, W = 2 ranks: rank r's micro-step i reads windows
    [4i + 2r, 4i + 2r + 2) of the step's one global draw; over the ranks, each once."""
    tr = _trainer(tmp_path, corpus, batch_size=8, grad_accum=2)
    tr.setup()
    T = tr.seq_len
    starts = sample_starts(len(tr.train_ids), T, 8, step_generator(7, 3))
    seen: dict[int, list[torch.Tensor]] = {}
    real_loss = Trainer._loss

    def spy(self, x, y, *args):
        seen.setdefault(self.dist.rank, []).append(x.clone())
        return real_loss(self, x, y, *args)

    monkeypatch.setattr(Trainer, "_loss", spy)
    for r in range(2):  # the arithmetic of rank r of 2 (no process group: means are local)
        tr.dist = distributed.Dist(device=torch.device("cpu"), rank=r, world_size=2)
        tr.train_step(3)
    for r in range(2):
        for i in range(2):
            want, _ = windows(tr.train_ids, starts[4 * i + 2 * r : 4 * i + 2 * r + 2], T)
            assert torch.equal(seen[r][i], want), (r, i)
    every = torch.cat([x for r in range(2) for x in seen[r]])
    assert sorted(map(tuple, every.tolist())) == sorted(
        map(tuple, windows(tr.train_ids, starts, T)[0].tolist())
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_accumulation_syncs_once_and_equals_one_big_batch(
    tmp_path: Path, corpus: Path, monkeypatch
) -> None:
    """Under DDP (a real gloo group of one process), 4 micro-batches of 2 give the
    gradient of one batch of 8 within 1e-6, and gradients are all-reduced only during
    the last micro-step's backward (no_sync before it)."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    tr = _trainer(tmp_path, corpus, batch_size=8, grad_accum=4, grad_clip=0.0)
    try:
        tr.setup()
        assert isinstance(tr.model, torch.nn.parallel.DistributedDataParallel) and tr.dist.backend == "gloo"
        forwards = [0]
        real_loss = Trainer._loss

        def counting(self, x, y, *args):
            forwards[0] += 1
            return real_loss(self, x, y, *args)

        monkeypatch.setattr(Trainer, "_loss", counting)
        synced_after: list[int] = []

        def hook(state, bucket):  # DDP's all-reduce of one gradient bucket
            synced_after.append(forwards[0])
            return default_hooks.allreduce_hook(None, bucket)

        tr.model.register_comm_hook(None, hook)
        grads: dict[str, torch.Tensor] = {}
        model = tr.model.module
        tr.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
        accum_loss = tr.train_step(3)
        assert synced_after and set(synced_after) == {4}, synced_after  # only in the 4th backward
    finally:
        tr.close()
    assert not torch.distributed.is_initialized()

    T = 32  # the reference: the same 8 windows as one batch, loss computed here
    x, y = windows(tr.train_ids, sample_starts(len(tr.train_ids), T, 8, step_generator(7, 3)), T)
    assert_grads_of_one_batch(model, x, y, accum_loss, grads)


def test_batch_must_split_evenly_over_processes_and_micro_steps(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    TrainConfig(out="x", batch_size=8, grad_accum=2).validate()  # 8 = 2 processes × 2 × 2
    with pytest.raises(LmlabError, match=r"--batch-size 6 \(the global batch\).*2 processes.*multiple of 4"):
        TrainConfig(out="x", batch_size=6, grad_accum=2).validate()
    with pytest.raises(LmlabError, match="--nproc starts torchrun itself"):
        launcher.launch(["--out", "x"], 2)


def test_nproc_relaunches_the_same_command() -> None:
    """`lmlab train --nproc N ...` hands torchrun flags that parse back to the same options."""
    ap = build_parser()
    argv = ["train", "--out", "o", "--no-bias", "--stateful", "--lr", "1e-3", "--no-progress",
            "--overwrite", "--time", "5m", "--model", "lstm", "--nproc", "2"]  # fmt: skip
    a = ap.parse_args(argv)
    opts = {k: getattr(a, k) for k in train_keys() if getattr(a, k, None) is not None}
    again = ap.parse_args(["train", *launcher.train_argv(opts)])
    assert again.nproc is None
    assert {k: getattr(again, k) for k in train_keys() if getattr(again, k, None) is not None} == opts
    assert opts["bias"] is False and opts["stateful"] is True and opts["progress"] is False


# --------------------------------------------------------------------------- errors, once
def _main_nproc(tmp_path: Path, capsys, monkeypatch, *args: str) -> tuple[int, list[str]]:
    """`lmlab train --nproc 2 ARGS` in this process; torchrun must not be started."""
    from lmlab.cli import main

    def no_launch(*a, **kw):
        raise AssertionError("--nproc started torchrun for options it could have rejected")

    monkeypatch.setattr(launcher, "launch", no_launch)
    rc = main(["train", "--nproc", "2", *TINY, "--out", str(tmp_path / "run"), *args])
    return rc, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda c, d: ["--data", str(c), "--batch-size", "3"],
         "--batch-size 3 (the global batch) is not divisible by 2 processes × --grad-accum 1; "
         "give a multiple of 2"),
        (lambda c, d: ["--data", str(d / "missing.txt")], "data path {d}/missing.txt does not exist"),
        (lambda c, d: ["--data", str(d / "empty.txt")], "the corpus ({d}/empty.txt) is empty"),
        (lambda c, d: ["--data", str(c), "--resume", str(d / "nothing")], "--resume {d}/nothing: the folder"),
    ],
)  # fmt: skip
def test_nproc_rejects_bad_options_once_before_starting_processes(
    tmp_path: Path, corpus: Path, capsys, monkeypatch, make_args, message: str
) -> None:
    (tmp_path / "empty.txt").write_text("")
    rc, lines = _main_nproc(tmp_path, capsys, monkeypatch, *make_args(corpus, tmp_path))
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("lmlab: error: "), lines
    assert message.format(d=tmp_path) in lines[0]
    assert not (tmp_path / "run").exists()  # no process started to create --out


def test_nproc_refuses_a_folder_with_a_checkpoint_before_starting(
    tmp_path: Path, corpus: Path, capsys, monkeypatch
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # a model, no training state: --resume cannot help
    rc, lines = _main_nproc(tmp_path, capsys, monkeypatch, "--data", str(corpus))
    assert rc == 2 and len(lines) == 1, lines
    assert f"{tmp_path / 'run'} already holds a model without training state" in lines[0]
    assert "--overwrite" in lines[0] and "lmlab train --resume" not in lines[0]
    shutil.rmtree(tmp_path / "run")
    lmlab.train(data=str(corpus), out=str(tmp_path / "run"), steps=1, batch_size=4, progress=False,
                n_layer=1, n_head=2, d_model=16, max_seq_len=16)  # fmt: skip
    capsys.readouterr()  # the training run's own lines
    rc, lines = _main_nproc(tmp_path, capsys, monkeypatch, "--data", str(corpus))
    assert rc == 2 and len(lines) == 1, lines
    assert f"{tmp_path / 'run'} already holds a checkpoint" in lines[-1]
    assert f"`lmlab train --resume {tmp_path / 'run'} --nproc 2`" in lines[-1]


def test_failure_reason_names_what_no_process_printed() -> None:
    """Exit status 2 is an lmlab error its process (or rank 0) printed: nothing to add.
    A signal or another status is said in words (negative codes: killed by signal -code);
    the SIGTERM torchrun sends the other processes once one failed is not a cause."""
    said = {"failures": [{"rank": 0, "pid": 11, "exitcode": 2}, {"rank": 1, "pid": 12, "exitcode": -15}]}
    assert launcher.failure_reason(said, 1) is None
    killed = {"failures": [{"rank": 0, "pid": 11, "exitcode": -15}, {"rank": 1, "pid": 12, "exitcode": -9}]}
    assert launcher.failure_reason(killed, 1) == (
        "the process of rank 1 (pid 12) was killed by SIGKILL (signal 9)"
    )
    crashed = {"failures": [{"rank": 1, "pid": 12, "exitcode": 1}]}
    assert launcher.failure_reason(crashed, 1) == (
        "the process of rank 1 (pid 12) exited with status 1 (its traceback, if any, is above)"
    )
    # torchrun's own SIGTERM to the others is no cause, unless nothing else failed
    terminated = {"failures": [{"rank": 0, "pid": 11, "exitcode": -15}]}
    assert (
        launcher.failure_reason(terminated, 1)
        == "the process of rank 0 (pid 11) was killed by SIGTERM (signal 15)"
    )
    assert launcher.failure_reason({}, 1) == "torchrun exit status 1"
    # a process killed from outside comes first, before the exit its loss caused elsewhere
    both = {"failures": [{"rank": 0, "pid": 11, "exitcode": 1}, {"rank": 1, "pid": 12, "exitcode": -9}]}
    assert launcher.failure_reason(both, 1) == (
        "the process of rank 1 (pid 12) was killed by SIGKILL (signal 9); "
        "the process of rank 0 (pid 11) exited with status 1 (its traceback, if any, is above)"
    )


def test_a_rank_above_0_leaves_a_user_error_to_rank_0(monkeypatch, capsys) -> None:
    """Rank 1 of 2 (torchrun's variables) waits before it reports: torchrun's SIGTERM, sent
    once rank 0 exited (having printed the error they share), ends the wait silently with
    status 2; a wait that runs out (the error was rank 1's own) prints it, tagged."""
    from lmlab import cli

    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    argv = ["train", "--out", "x", "--batch-size", "0"]
    real_sleep = time.sleep

    def torchrun_stops_us(seconds: float) -> None:
        assert seconds == cli.QUIET_RANK_GRACE_S
        os.kill(os.getpid(), signal.SIGTERM)
        real_sleep(5)  # the handler interrupts this

    prev = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        monkeypatch.setattr(cli.time, "sleep", torchrun_stops_us)
        with pytest.raises(SystemExit) as stopped:
            cli.main(argv)
        assert stopped.value.code == 2
        assert capsys.readouterr().err == ""
        monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)  # the wait runs out
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmlab: error: [rank 1] --batch-size") and err.count("\n") == 1, err
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)


def test_a_failing_nproc_run_prints_one_error_line(tmp_path: Path, env: dict[str, str]) -> None:
    """A corpus shorter than one window passes the checks before the launch (it must be
    tokenized to tell) and fails in both processes: rank 0 alone prints it, torchrun's
    ChildFailedError traceback is not shown, and the status is lmlab's 2."""
    short = tmp_path / "short.txt"
    short.write_text("too short\n", encoding="utf-8")  # 10 tokens; a window needs 33
    out = tmp_path / "run"
    p = popen(lmlab_cmd("train", *TINY, "--data", str(short), "--out", str(out), "--nproc", "2"), env)
    _, err = finish(p, timeout=120, rc=2)
    assert err.count("lmlab: error:") == 1, err
    assert "lmlab: error: the corpus " in err and "training needs more than one context window" in err
    assert "Traceback" not in err and "ChildFailedError" not in err and "[rank 1]" not in err, err


def test_under_torchrun_only_rank_0_prints_an_error(
    tmp_path: Path, corpus: Path, env: dict[str, str]
) -> None:
    """Plain torchrun: each rank finds --batch-size 3 does not split over 2 processes; one
    line says so, and no traceback runs through lmlab's code (torchrun's own report
    follows it: lmlab does not run that torchrun)."""
    args = [*TINY, "--data", str(corpus), "--out", str(tmp_path / "run"), "--batch-size", "3"]
    p = popen([*TORCHRUN, "-m", "lmlab", "train", *args], env)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert err.count("lmlab: error:") == 1, err
    assert "lmlab: error: --batch-size 3 (the global batch) is not divisible by 2 processes" in err
    assert f'File "{REPO / "lmlab"}' not in err, err


# --------------------------------------------------------------------------- signals and a lost process
def test_sigterm_on_one_rank_stops_all_and_sigkill_stops_the_job(
    tmp_path: Path, corpus: Path, env: dict[str, str]
) -> None:
    out = tmp_path / "run"
    args = [*TINY, "--data", str(corpus), "--batch-size", "4", "--eval-every", "1000", "--save-every", "5"]

    # SIGTERM to rank 1 alone: every rank stops after the same step; rank 0 saves it.
    p = popen([*TORCHRUN, "-m", "lmlab", "train", *args, "--steps", "100000", "--out", str(out)], env)
    wait_for_step(out, 8, p)
    os.kill(worker_pid(p.pid, 1), signal.SIGTERM)
    _, err = finish(p, timeout=STOP_WITHIN_S)
    n = saved_step(out)
    assert f"terminated: saved the checkpoint at step {n}" in err
    assert last_step(out) == n

    # `lmlab train --nproc 2 --resume`; then SIGKILL rank 1: the whole job stops, clearly.
    p = popen(lmlab_cmd("train", "--resume", str(out), "--nproc", "2"), env)
    wait_for_step(out, n + 12, p)  # past a save at a multiple of 5
    pid = worker_pid(p.pid, 1)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=STOP_WITHIN_S)
    assert time.monotonic() - t0 < STOP_WITHIN_S
    assert p.returncode == 2, err[-3000:]
    # rank 0's error, then lmlab's line naming the lost process; no torchrun traceback
    assert err.count("lmlab: error: another training process stopped or cannot be reached") == 1, err
    # The killed process is named first; another line may follow if rank 0 died of the loss.
    assert "the 2-process run failed: the process of rank " in err, err[-3000:]
    assert f"the process of rank 1 (pid {pid}) was killed by SIGKILL" in err, err[-3000:]
    assert f"continue with `lmlab train --resume {out} --nproc 2`" in err
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    s = saved_step(out)
    assert s >= n + 5

    # --resume from the last checkpoint completes (here on one process).
    finish(popen(lmlab_cmd("train", "--resume", str(out), "--steps", str(s + 3)), env))
    assert saved_step(out) == s + 3
    assert [r["step"] for r in read_metrics(out)] == list(range(1, s + 4))


# --------------------------------------------------------------------------- what to do after a failure
def test_advice_after_a_failure_follows_what_is_on_disk(tmp_path: Path, corpus: Path) -> None:
    """--resume only where it would work (a trainer_state.json, as `lmlab train --resume`
    reads it); else the same command again. A run's top-level links dangle until its
    first save completes (RunDir), and a model folder has no training state."""
    cmd = "lmlab train --resume X --nproc 2"
    again = "no checkpoint was written in {} yet: start again with the same command"
    empty = tmp_path / "empty"
    empty.mkdir()
    dangling = tmp_path / "dangling"
    (dangling / ".ckpt").mkdir(parents=True)
    (dangling / "trainer_state.json").symlink_to(Path(".ckpt") / "latest" / "trainer_state.json")
    model = tiny_checkpoint(tmp_path / "model")
    for folder in (tmp_path / "missing", empty, dangling, model):
        assert distributed.resumable_step(folder) is None
        assert distributed.continue_advice(folder, cmd) == again.format(folder)
        with pytest.raises(LmlabError, match="no training checkpoint there|does not exist"):
            lmlab.train(resume=str(folder))  # what the advice would have led to
    run = tmp_path / "run"
    lmlab.train(data=str(corpus), out=str(run), steps=2, batch_size=4, progress=False,
                n_layer=1, n_head=2, d_model=16, max_seq_len=16)  # fmt: skip
    assert distributed.resumable_step(run) == 2
    assert (
        distributed.continue_advice(run, cmd)
        == f"the last checkpoint in {run} (step 2) is whole: continue with `{cmd}`"
    )
    # A new run into the model folder is refused without pointing to --resume.
    with pytest.raises(LmlabError) as refused:
        lmlab.train(data=str(corpus), out=str(model), steps=1)
    assert "without training state" in str(refused.value) and "--overwrite" in str(refused.value)
    assert "lmlab train --resume" not in str(refused.value)


def test_a_job_lost_before_its_first_checkpoint_says_start_again(
    tmp_path: Path, corpus: Path, env: dict[str, str]
) -> None:
    """SIGKILL rank 1 of `--nproc 2` before anything was saved: neither rank 0 nor the
    launcher sends the user to --resume (there is nothing to resume); the same command
    passes the checks it failed before (no checkpoint in --out)."""
    out = tmp_path / "run"
    opts = [*TINY, "--data", str(corpus), "--batch-size", "4", "--eval-every", "100000",
            "--save-every", "100000", "--steps", "100000", "--out", str(out), "--nproc", "2"]  # fmt: skip
    p = popen(lmlab_cmd("train", *opts), env)
    wait_for_step(out, 3, p)
    pid = worker_pid(p.pid, 1)
    os.kill(pid, signal.SIGKILL)
    _, err = p.communicate(timeout=STOP_WITHIN_S)
    assert p.returncode == 2, err[-3000:]
    again = f"o checkpoint was written in {out} yet: start again with the same command"
    assert f"the whole job stops. N{again}" in err  # rank 0
    assert f"was killed by SIGKILL (signal 9); n{again}" in err  # the launcher
    assert "--resume" not in err, err
    assert not RunDir(out).has_checkpoint() and distributed.resumable_step(out) is None
    a = build_parser().parse_args(["train", *opts])
    launcher.check_before_launch(
        {k: getattr(a, k) for k in train_keys() if getattr(a, k, None) is not None}, 2
    )
