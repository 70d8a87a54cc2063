"""The Trainer: what a run writes, exact resume after a real SIGKILL, SIGTERM, NaN
stops, gradient accumulation, the learning-rate schedule, time budgets, and the
overfitting warning. Every run is a tiny model on a small corpus written to tmp_path.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import SHAKESPEARE_TEXT as TEXT
from helpers import (
    assert_grads_of_one_batch,
    char_tokenizer,
    fake_clock,
    finish,
    last_step,
    lmlab_cmd,
    lmlab_warnings,
    popen,
    read_metrics,
    recorded_warnings,
    saved_step,
    tiny_checkpoint,
    train_once,
    wait_for_step,
)
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

import lmlab
from lmlab.cli import main as cli_main
from lmlab.data import sample_starts, step_generator, windows
from lmlab.errors import LmlabError
from lmlab.models.config import RNNConfig
from lmlab.models.loading import write_checkpoint
from lmlab.models.rnn import RNNLanguageModel
from lmlab.training import TrainConfig, Trainer, TrainResult, lr_at, parse_duration, replan_lr

# Small explicit sizes, so a change of TrainConfig's defaults never slows these tests.
SMALL = dict(
    n_layer=2,
    n_head=2,
    d_model=32,
    max_seq_len=32,
    batch_size=4,
    seed=7,
    warmup=4,
    lr=3e-3,
    dropout=0.0,
    precision="fp32",
    device="cpu",
    progress=False,
)
SMALL_ARGS = [
    "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--max-seq-len", "32", "--batch-size", "4",
    "--seed", "5", "--warmup", "20", "--lr", "3e-3", "--precision", "fp32", "--device", "cpu", "--no-progress",
]  # fmt: skip
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


# `corpus` (module-wide) and `corpus_path` (a test's own): TEXT in a file, from conftest.py.
@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus: Path) -> Path:
    """One finished 40-step run, shared by the layout and metrics tests."""
    opts = dict(data=str(corpus), steps=40, eval_every=15, save_every=10)
    return train_once(tmp_path_factory, "out", **opts, **SMALL)


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return lmlab_cmd("train", "--data", str(data), "--out", str(out), *SMALL_ARGS, *extra)


# --------------------------------------------------------------------------- what a run writes
def test_checkpoint_folder_layout(trained: Path) -> None:
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "trainer_state.json",
        "training_state.safetensors",
        "metrics.jsonl",
        "loss.png",
    ):
        assert (trained / f).is_file(), f
    # loss.png is a real PNG: signature, then an IHDR chunk with a non-empty image
    png = (trained / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100

    # No pickle anywhere, hidden folders included.
    everything = [Path(d) / f for d, _, files in os.walk(trained) for f in files]
    assert not [p for p in everything if p.suffix in PICKLE_SUFFIXES]
    with safe_open(str(trained / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if n.startswith(("module.", "_orig_mod."))]

    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["step"] == 40
    model = lmlab.load(trained)
    saved = load_file(str(trained / "model.safetensors"))
    for name, t in saved.items():
        assert torch.equal(model.module.state_dict()[name], t)
    # The optimizer moments are stored by parameter name, in safetensors.
    moments = load_file(str(trained / "training_state.safetensors"))
    assert any(k.endswith(".exp_avg_sq") for k in moments)

    # best/ is a complete model: the one with the lowest validation loss.
    rows = read_metrics(trained)
    evals = [(r["val_loss"], r["step"]) for r in rows if "val_loss" in r]
    best_step = min(evals)[1]
    best = trained / "best"
    assert saved_step(best) == best_step
    best_model = lmlab.load(best)
    assert isinstance(best_model.generate("All", max_new_tokens=5, temperature=0), str)


def test_metrics_jsonl_has_one_line_per_step(trained: Path) -> None:
    rows = read_metrics(trained)
    assert [r["step"] for r in rows] == list(range(1, 41))
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    # validation on every 15th step and at the end
    assert [r["step"] for r in rows if "val_loss" in r] == [15, 30, 40]
    # lr by hand: warmup w = min(4, 40 // 10) = 4, lr(t) = 3e-3·(t+1)/(w+1) for t < w
    assert rows[0]["lr"] == pytest.approx(3e-3 * 1 / 5)
    assert rows[3]["lr"] == pytest.approx(3e-3 * 4 / 5)
    assert rows[4]["lr"] == pytest.approx(3e-3)  # the peak, t = w
    # a character model starts near ln(vocab) and learns this repetitive text quickly
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5


def test_refuses_a_folder_with_a_checkpoint_unless_overwrite(tmp_path: Path, corpus_path: Path) -> None:
    out = tmp_path / "run"
    lmlab.train(data=str(corpus_path), out=str(out), steps=3, **SMALL)
    with pytest.raises(LmlabError, match=r"already holds a checkpoint.*--resume.*--overwrite"):
        lmlab.train(data=str(corpus_path), out=str(out), steps=3, **SMALL)
    assert saved_step(out) == 3  # untouched

    lmlab.train(data=str(corpus_path), out=str(out), steps=2, overwrite=True, **SMALL)
    assert saved_step(out) == 2
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # the old run's log is gone


# --------------------------------------------------------------------------- exact resume
def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, corpus_path: Path) -> None:
    """Run A trains 2N steps straight. Run B is the same command with frequent saves,
    SIGKILLed mid-run, then resumed: its final weights, optimizer state and every logged
    loss must equal A's exactly. Once with dropout 0, once with dropout (RNG state)."""
    steps = 160
    variants = {"nodrop": [], "dropout": ["--dropout", "0.2"]}
    runs: dict[str, subprocess.Popen] = {}
    for name, extra in variants.items():
        common = ["--steps", str(steps), "--eval-every", "40", *extra]
        runs[f"A-{name}"] = popen(train_cmd(corpus_path, tmp_path / f"A-{name}", *common))
        runs[f"B-{name}"] = popen(
            train_cmd(corpus_path, tmp_path / f"B-{name}", *common, "--save-every", "20")
        )

    killed_at = {}
    deadline = time.monotonic() + 180
    pending = {f"B-{n}" for n in variants}
    while pending and time.monotonic() < deadline:
        for key in sorted(pending):
            p = runs[key]
            step = last_step(tmp_path / key)
            if p.poll() is not None:
                pytest.fail(f"{key} ended (rc {p.returncode}) before the kill; {p.stderr.read()[-2000:]}")
            if step >= 45:  # past the checkpoints at 20 and 40, far from the end
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                killed_at[key] = step
                pending.discard(key)
        time.sleep(0.005)
    assert not pending, "run B never got past step 45"
    for key in killed_at:
        assert runs[key].returncode == -signal.SIGKILL
        saved = saved_step(tmp_path / key)
        assert 20 <= saved < steps, (key, saved)

    resumed = {
        key: popen(lmlab_cmd("train", "--resume", str(tmp_path / key)))
        for key in killed_at
    }
    for p in [*(v for k, v in runs.items() if k.startswith("A-")), *resumed.values()]:
        finish(p)

    for name in variants:
        a, b = tmp_path / f"A-{name}", tmp_path / f"B-{name}"
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert wa.keys() == wb.keys()
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not diff, f"{name}: weights differ after resume: {diff[:5]}"
        sa = load_file(str(a / "training_state.safetensors"))
        sb = load_file(str(b / "training_state.safetensors"))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        ra, rb = read_metrics(a), read_metrics(b)
        assert [r["step"] for r in rb] == list(range(1, steps + 1))  # replayed steps logged once
        assert [r["loss"] for r in rb] == [r["loss"] for r in ra]
        assert [r.get("val_loss") for r in rb] == [r.get("val_loss") for r in ra]
    # dropout really was on: the two variants trained differently
    assert not torch.equal(
        load_file(str(tmp_path / "A-nodrop" / "model.safetensors"))["tok_emb.weight"],
        load_file(str(tmp_path / "A-dropout" / "model.safetensors"))["tok_emb.weight"],
    )


def test_sigterm_saves_the_current_step_and_resume_continues(tmp_path: Path, corpus_path: Path) -> None:
    out = tmp_path / "run"
    p = popen(train_cmd(corpus_path, out, "--steps", "100000", "--save-every", "100000", "--eval-every", "7"))
    wait_for_step(out, 10, p)
    p.send_signal(signal.SIGTERM)
    _, err = finish(p, timeout=60, rc=143)  # saved, then exits as SIGTERM would: the run did not finish
    n = saved_step(out)
    assert 10 <= n < 100000
    assert f"terminated: saved the checkpoint at step {n}" in err
    assert last_step(out) == n  # the checkpoint is the step the log ended on
    lmlab.load(out)  # a complete model

    finish(popen(lmlab_cmd("train", "--resume", str(out), "--steps", str(n + 15))))
    assert saved_step(out) == n + 15
    assert [r["step"] for r in read_metrics(out)] == list(range(1, n + 16))


# --------------------------------------------------------------------------- NaN
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, corpus_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    real_loss = Trainer._loss
    poison_at = [7]

    def poisoned(self, x, y, *args):  # the model's loss turns NaN during the 8th step
        loss = real_loss(self, x, y, *args)
        return loss * float("nan") if self.state["step"] == poison_at[0] else loss

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    with pytest.raises(
        LmlabError, match=r"loss or its gradient became nan at step 8.*last good checkpoint \(step 6\)"
    ):
        lmlab.train(data=str(corpus_path), out=str(out), steps=20, save_every=3, eval_every=100, **SMALL)
    assert saved_step(out) == 6
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert lmlab.load(out).generate("All", max_new_tokens=3, temperature=0) is not None
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 8))

    # After a resume, the checkpoint resumed from is the last good one until the next save.
    poison_at[0] = 8
    with pytest.raises(LmlabError, match=r"at step 9; .*last good checkpoint \(step 6\)"):
        lmlab.train(resume=str(out), steps=20, save_every=5)


def test_absurd_learning_rate_stops_with_a_clear_error(tmp_path: Path, corpus_path: Path) -> None:
    """No patching: lr 1e30 without clipping really overflows the weights."""
    opts = {**SMALL, "lr": 1e30, "grad_clip": 0.0, "warmup": 0}
    with pytest.raises(LmlabError, match=r"the loss or its gradient became (nan|inf)") as e:
        lmlab.train(data=str(corpus_path), out=str(tmp_path / "run"), steps=30, save_every=1, **opts)
    assert "--lr" in str(e.value)
    lmlab.load(tmp_path / "run")  # the last checkpoint before the blow-up is whole
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


# --------------------------------------------------------------------------- one step
def test_gradient_accumulation_equals_the_full_batch(tmp_path: Path, corpus_path: Path) -> None:
    """4 micro-batches of 2 must give the gradient of the mean loss over all 8 sequences:
    ∇(1/4 Σ_k L_k) where each L_k is a mean over its 2·T tokens = ∇ of the mean over 8·T."""
    opts = {**SMALL, "batch_size": 8, "grad_accum": 4, "grad_clip": 0.0}
    cfg = TrainConfig(data=str(corpus_path), out=str(tmp_path / "run"), steps=5, **opts)
    cfg.validate()
    tr = Trainer(cfg)
    tr.setup()
    model = tr.model
    grads: dict[str, torch.Tensor] = {}
    tr.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    accum_loss = tr.train_step(3)
    assert grads and all(p.grad is None for p in model.parameters())

    # The reference: the same 8 windows as one batch, loss computed here from the logits.
    T = cfg.max_seq_len
    x, y = windows(tr.train_ids, sample_starts(len(tr.train_ids), T, 8, step_generator(cfg.seed, 3)), T)
    assert_grads_of_one_batch(model, x, y, accum_loss, grads)


def test_lr_schedule_by_hand() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=100)
    T = 2000  # warmup = min(100, T // 10) = 100
    assert lr_at(0, cfg, T) == pytest.approx(1e-3 * 1 / 101)  # lr·(t+1)/(w+1)
    assert lr_at(49, cfg, T) == pytest.approx(1e-3 * 50 / 101)
    assert lr_at(99, cfg, T) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg, T) == pytest.approx(1e-3)  # cos(0) = 1: the peak
    assert lr_at(1050, cfg, T) == pytest.approx(5.5e-4)  # halfway: min + ½(lr - min)
    # min + ½(1 + cos(π·1899/1900))(lr - min), one step before the end
    assert lr_at(1999, cfg, T) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 1899 / 1900)) * 9e-4)
    assert lr_at(2000, cfg, T) == pytest.approx(1e-4)
    assert lr_at(5000, cfg, T) == pytest.approx(1e-4)
    after = [lr_at(t, cfg, T) for t in range(100, 2001)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    # min_lr defaults to lr/10; a short run caps the warmup at a tenth of its steps
    short = TrainConfig(lr=2e-3, warmup=100)
    assert lr_at(50, short, 50) == pytest.approx(2e-4)
    assert lr_at(0, short, 50) == pytest.approx(2e-3 / 6)  # w = 50 // 10 = 5
    assert lr_at(5, short, 50) == pytest.approx(2e-3)


# --------------------------------------------------------------------------- time budgets
@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("1.5h", 5400), ("300", 300), (" 2m ", 120), (45, 45)]
)
def test_parse_duration(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "soon", "", "-5s", "1d", "m"])
def test_parse_duration_rejects_nonsense(text) -> None:
    with pytest.raises(LmlabError, match="is not a duration"):
        parse_duration(text)
    with pytest.raises(LmlabError, match="is not a duration"):
        TrainConfig(out="x", time=text).validate()


def test_time_budget_run_stops_near_the_budget(tmp_path: Path, corpus_path: Path) -> None:
    out = tmp_path / "run"
    res = lmlab.train(data=str(corpus_path), out=str(out), time="2s", eval_every=1000, **SMALL)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == res.step == state["max_steps"]  # the step count was fixed mid-run
    assert len(read_metrics(out)) == res.step
    assert 0.5 < state["elapsed"] < 20  # loosely: it neither stopped at once nor ran away


def test_lr_replan_is_continuous_by_hand() -> None:
    """A --time run's end moves from T=100 to 155 at step 55: the cosine goes on from
    the phase it had, p₀ = (55-10)/90 = ½, to p = 1 at the new end."""
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10)
    plan = replan_lr(55, cfg, 100, 155, None)
    assert plan["lr"] == pytest.approx(5.5e-4) == pytest.approx(lr_at(55, cfg, 100))  # ½(1 + cos ½π)
    assert lr_at(55, cfg, 155, plan) == pytest.approx(5.5e-4)  # no jump at the move
    # p(105) = ½ + ½·50/100 = ¾: min + ½(1 + cos ¾π)(lr - min)
    assert lr_at(105, cfg, 155, plan) == pytest.approx(1e-4 + 0.5 * (1 - math.sqrt(0.5)) * 9e-4)
    assert lr_at(155, cfg, 155, plan) == pytest.approx(1e-4)
    assert lr_at(154, cfg, 155, plan) > lr_at(155, cfg, 155, plan)
    # An end moved again keeps the warmup, and the lr the step had under the last plan.
    again = replan_lr(105, cfg, 155, 120, plan)
    assert again["warmup"] == 10 and again["lr"] == pytest.approx(lr_at(105, cfg, 155, plan))


def test_lr_first_estimate_on_the_warmup_ramp_by_hand() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=100)
    # Step 3 of the measuring ramp (lr·4/101), the end found at 200: w = min(100, 200/10)
    # = 20, and the ramp runs straight from there to the peak at step 20.
    plan = replan_lr(3, cfg, None, 200, None)
    low = 1e-3 * 4 / 101
    assert plan == {"warmup": 20, "at": 3, "lr": pytest.approx(low)}
    assert lr_at(3, cfg, 200, plan) == pytest.approx(low)
    assert lr_at(10, cfg, 200, plan) == pytest.approx(low + (1e-3 - low) * 7 / 17)
    assert lr_at(20, cfg, 200, plan) == pytest.approx(1e-3)
    # Step 30 (lr·31/101), the end found at 150: w = 15 is behind; the ramp goes on at
    # lr/15 per step: the peak after ⌈(1 - 31/101)·15⌉ = 11 more steps.
    plan = replan_lr(30, cfg, None, 150, None)
    assert plan["warmup"] == 41
    assert lr_at(30, cfg, 150, plan) == pytest.approx(1e-3 * 31 / 101)
    assert lr_at(41, cfg, 150, plan) == pytest.approx(1e-3)
    assert lr_at(150, cfg, 150, plan) == pytest.approx(1e-4)




def _timed_run(out: Path, corpus: Path, time: str, **kw) -> tuple[TrainResult, dict, list[dict]]:
    res = lmlab.train(data=str(corpus), out=str(out), time=time, eval_every=1000, **{**SMALL, **kw})
    return res, json.loads((out / "trainer_state.json").read_text()), read_metrics(out)


def _assert_smooth_decay(rows: list[dict], lr: float = 3e-3, min_lr: float = 3e-4) -> None:
    """After the warmup the lr only falls, and ends at min_lr: no jump where the end moved."""
    lrs = [r["lr"] for r in rows[SMALL["warmup"] :]]
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), "the lr rose after the warmup"
    assert lrs[-1] - min_lr < 0.1 * (lr - min_lr)


def test_time_budget_follows_a_slowdown(tmp_path, corpus_path, monkeypatch, capsys) -> None:
    """Steps take 1 s, then 5 s from t = 50 s. The first estimate (at t = 10 s, 1 s/step)
    is T = 10 + ⌊(100 - 8 - 10)/1⌋ = 92; fixed there, the run would end near 260 s."""
    fake_clock(monkeypatch, lambda now: 1.0 if now < 50 else 5.0)
    res, state, rows = _timed_run(tmp_path / "run", corpus_path, "100s")
    assert "1000 ms/step, training for 92 steps" in capsys.readouterr().err
    assert 80 <= state["elapsed"] <= 100 + 5  # within the budget, give or take one step
    assert res.step == state["step"] == state["max_steps"] == len(rows) < 92
    assert "val_loss" in rows[-1]  # the last step evaluated and saved
    _assert_smooth_decay(rows)
    drops = [a["lr"] - b["lr"] for a, b in zip(rows, rows[1:])]
    assert max(drops) < 0.15 * 3e-3  # re-planned without a cliff


def test_time_budget_uses_a_speedup(tmp_path, corpus_path, monkeypatch) -> None:
    """Steps take 1 s, then 0.2 s from t = 50 s: more steps than the first estimate (92)."""
    fake_clock(monkeypatch, lambda now: 1.0 if now < 50 else 0.2)
    res, state, rows = _timed_run(tmp_path / "run", corpus_path, "100s")
    assert res.step > 92 + 100  # 42 s at 0.2 s/step would be 210 more steps
    assert 85 <= state["elapsed"] <= 100
    _assert_smooth_decay(rows)


def test_time_budget_hard_stop(tmp_path, corpus_path, monkeypatch) -> None:
    """A step that stalls for 40 s at t = 85 s, after the last estimate: the run stops
    right after it (step 86, t = 125 s), with its final evaluation and checkpoint."""
    fake_clock(monkeypatch, lambda now: 40.0 if now == 85 else 1.0)
    res, state, rows = _timed_run(tmp_path / "run", corpus_path, "100s")
    assert (res.step, state["max_steps"], state["elapsed"]) == (86, 86, 125.0)
    assert rows[-1]["step"] == 86 and "val_loss" in rows[-1]
    assert saved_step(tmp_path / "run") == 86


def test_resume_with_time_adds_time_and_keeps_the_lr_continuous(tmp_path, corpus_path, monkeypatch) -> None:
    fake_clock(monkeypatch, lambda now: 1.0)
    out = tmp_path / "run"
    first, state, rows = _timed_run(out, corpus_path, "50s", min_lr=1e-3)
    assert 45 <= state["elapsed"] <= 50
    res = lmlab.train(resume=str(out), time="20s", progress=False)  # 20 s more
    state2 = json.loads((out / "trainer_state.json").read_text())
    assert state["elapsed"] + 17 <= state2["elapsed"] <= state["elapsed"] + 20
    assert res.step > first.step + 15
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, res.step + 1))
    # The first run ended at min_lr; its extension goes on from there, not from the peak.
    assert rows[first.step - 1]["lr"] == pytest.approx(1e-3, rel=0.02)
    assert all(r["lr"] == pytest.approx(1e-3, rel=0.02) for r in rows[first.step :])


def test_resume_after_the_hard_stop_goes_on_from_its_lr(tmp_path, corpus_path, monkeypatch) -> None:
    """A run cut short by the hard stop (a 40 s stall at t = 85 s, the plan still ~6 steps
    from its end) resumed with --time: the lr goes on from where it was, falling to min_lr
    over the new time, not at min_lr from the first resumed step."""
    fake_clock(monkeypatch, lambda now: 40.0 if now == 85 else 1.0)
    out = tmp_path / "run"
    first, state, rows = _timed_run(out, corpus_path, "100s", min_lr=1e-4)
    assert first.step == 86 and state["lr_end"] > 86  # stopped before the schedule's end
    lr_at_stop = rows[-1]["lr"]
    assert lr_at_stop > 1e-4 * 1.5
    res = lmlab.train(resume=str(out), time="20s", progress=False)
    rows = read_metrics(out)
    resumed = [r["lr"] for r in rows[first.step :]]
    assert res.step > first.step + 10
    assert resumed[0] == pytest.approx(lr_at_stop, rel=0.2)  # continuous, not min_lr
    assert all(b <= a + 1e-12 for a, b in zip(resumed, resumed[1:]))
    assert resumed[-1] == pytest.approx(1e-4, rel=0.2)


# --------------------------------------------------------------------------- overfitting
def _run_with_val_losses(tmp_path, corpus_path, monkeypatch, capsys, values: list[float]) -> str:
    """stderr and every warning raised (each one, not once per place: "always")."""
    seq = iter(values)
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(seq))
    with recorded_warnings() as caught:
        lmlab.train(data=str(corpus_path), out=str(tmp_path / "run"), steps=30, eval_every=10, **SMALL)
    return capsys.readouterr().err + "\n".join(f"lmlab: warning: {m}" for m in lmlab_warnings(caught))


def test_overfitting_warning_when_val_rises_and_train_falls(
    tmp_path, corpus_path, monkeypatch, capsys
) -> None:
    err = _run_with_val_losses(tmp_path, corpus_path, monkeypatch, capsys, [2.0, 2.5, 3.0])
    assert err.count("validation loss rose while training loss fell") == 1  # once, not every eval
    rows = read_metrics(tmp_path / "run")
    assert rows[19]["loss"] < rows[9]["loss"]  # the premise: training loss did fall


def test_no_overfitting_warning_when_val_falls(tmp_path, corpus_path, monkeypatch, capsys) -> None:
    err = _run_with_val_losses(tmp_path, corpus_path, monkeypatch, capsys, [3.0, 2.5, 2.0])
    assert "validation loss rose" not in err


def test_no_overfitting_warning_for_a_single_rise(tmp_path, corpus_path, monkeypatch, capsys) -> None:
    """One evaluation up, then down again, is noise in a small validation sample."""
    err = _run_with_val_losses(tmp_path, corpus_path, monkeypatch, capsys, [2.0, 2.5, 2.2])
    assert "validation loss rose" not in err


# --------------------------------------------------------------------------- option errors
@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(steps=10, time="1m"), r"give one budget, --steps 10 or --time 1m, not both"),
        (dict(time="0s"), r"--time must be positive \(got 0s\)"),
        (dict(warmup=-1), r"--warmup must be 0 or more steps \(got -1\)"),
        (dict(min_lr=1e-2), r"--min-lr must be between 0 and --lr 0.003 \(got 0.01\)"),
        (dict(min_lr=-1e-4), r"--min-lr must be between 0 and --lr"),
        (dict(hidden_size=64), r"--hidden-size is for recurrent models .*--model gpt .*drop --hidden-size"),
        (dict(model="gpt", stateful=True), r"--stateful needs a recurrent model"),
        (dict(lr=0.0), r"--lr must be positive \(got 0.0\)"),
        (dict(lr=-1e-3), r"--lr must be positive"),
        (dict(batch_size=0), r"--batch-size must be positive \(got 0\)"),
        (dict(grad_accum=0), r"--grad-accum must be positive \(got 0\)"),
        (dict(eval_every=0), r"--eval-every must be positive \(got 0\)"),
        (dict(save_every=-5), r"--save-every must be positive \(got -5\)"),
    ],
)
def test_bad_training_options_are_one_line_errors(tmp_path, corpus_path, kw, msg) -> None:
    with pytest.raises(LmlabError, match=msg) as e:
        lmlab.train(data=str(corpus_path), out=str(tmp_path / "o"), **{**SMALL, **kw})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_bad_options_from_the_cli_are_one_line(tmp_path, capsys) -> None:
    rc = cli_main(["train", "--out", str(tmp_path / "o"), "--steps", "5", "--time", "1m"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lmlab: error: give one budget") and len(err.strip().splitlines()) == 1
    # --hidden-size given, --model left at its default (gpt)
    rc = cli_main(["train", "--out", str(tmp_path / "o"), "--hidden-size", "64"])
    assert rc == 2 and "drop --hidden-size" in capsys.readouterr().err
    # the defaults themselves never count as given: a plain gpt run passes validation
    TrainConfig(out="x").validate({"out"})


def test_resume_refuses_two_budgets(tmp_path, corpus_path) -> None:
    out = tmp_path / "run"
    lmlab.train(data=str(corpus_path), out=str(out), steps=2, **SMALL)
    with pytest.raises(LmlabError, match="give one budget"):
        lmlab.train(resume=str(out), steps=4, time="1m")


# --------------------------------------------------------------------------- --init (fine-tuning)
@pytest.fixture
def init_model(tmp_path) -> Path:
    """A random tiny Transformer (learned positions, a 32-token context) with a character
    tokenizer of the training text: a fine-tuning source on disk."""
    return tiny_checkpoint(tmp_path / "src", tokenizer=char_tokenizer(TEXT), max_seq_len=32, d_model=32)


INIT_OPTS = dict(batch_size=4, lr=1e-3, warmup=2, device="cpu", progress=False, eval_every=100)


def _fine_tune(source: Path, corpus: Path, out: Path, **kw) -> TrainResult:
    return lmlab.train(init=str(source), data=str(corpus), out=str(out), **{**INIT_OPTS, **kw})


@pytest.mark.parametrize(
    ("kw", "dropped"),
    [
        (dict(n_layer=3), "--n-layer"),
        (dict(tokenizer="bpe", d_model=64), "--tokenizer, --d-model"),
        (dict(model="lstm"), "--model"),
        (dict(model="gpt"), "--model"),  # even the model's own kind: nothing here is chosen
        (dict(pos="rope", norm="layernorm", bias=True), "--pos, --norm, --bias"),
        (dict(hidden_size=64, vocab_size=100, dropout=0.1), "--vocab-size, --dropout, --hidden-size"),
    ],
)
def test_init_refuses_architecture_and_tokenizer_flags(tmp_path, corpus_path, init_model, kw, dropped):
    with pytest.raises(LmlabError) as e:
        _fine_tune(init_model, corpus_path, tmp_path / "ft", steps=2, **kw)
    assert str(e.value) == f"--init uses the model's own architecture and tokenizer; drop {dropped}"


def test_init_refuses_a_window_beyond_the_context(tmp_path, corpus_path, init_model, capsys) -> None:
    msg = r"--max-seq-len 48 is longer than the context of .*src \(32 tokens\); give --max-seq-len 32 or less"
    with pytest.raises(LmlabError, match=msg):
        _fine_tune(init_model, corpus_path, tmp_path / "ft", steps=2, max_seq_len=48)
    capsys.readouterr()
    argv = ["train", "--init", str(init_model), "--data", str(corpus_path), "--out", str(tmp_path / "c")]
    rc = cli_main([*argv, "--n-layer", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (
        "lmlab: error: --init uses the model's own architecture and tokenizer; drop --n-layer"
    )


def test_init_trains_on_a_shorter_window_and_stores_what_it_used(tmp_path, corpus_path, init_model) -> None:
    out = tmp_path / "ft"
    _fine_tune(init_model, corpus_path, out, steps=3, max_seq_len=16)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["tokens"] == 3 * 4 * 16  # steps × batch × the 16-token window
    used = state["train_config"]
    src = json.loads((init_model / "config.json").read_text())
    # The model's own settings (learned positions, 2 layers), not TrainConfig's defaults (rope, 4).
    keys = ("pos", "n_layer", "d_model", "n_head")
    assert used["model"] == "gpt" and [used[k] for k in keys] == [src[k] for k in keys]
    assert (used["pos"], used["n_layer"], used["max_seq_len"]) == ("learned", 2, 16)
    assert used["tokenizer"] == str(init_model)
    assert used["vocab_size"] == char_tokenizer(TEXT).get_vocab_size()
    assert json.loads((out / "config.json").read_text())["max_seq_len"] == 32  # the model keeps its context
    # A resume goes on with the same window.
    lmlab.train(resume=str(out), steps=5)
    assert json.loads((out / "trainer_state.json").read_text())["tokens"] == 5 * 4 * 16


def test_init_window_defaults_to_64_within_the_context(tmp_path, corpus_path, init_model) -> None:
    out = tmp_path / "ft"
    _fine_tune(init_model, corpus_path, out, steps=1)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["train_config"]["max_seq_len"] == 32 and state["tokens"] == 4 * 32  # min(64, 32)


def test_init_from_an_rnn_may_use_a_longer_window(tmp_path, corpus_path) -> None:
    """An RNN has no context limit: its max_seq_len is only the window it was trained on."""
    tok = char_tokenizer(TEXT)
    torch.manual_seed(0)
    rnn = RNNLanguageModel(RNNConfig(cell="gru", vocab_size=tok.get_vocab_size(), d_model=8, hidden_size=16,
                                     n_layer=1, max_seq_len=8))  # fmt: skip
    src = write_checkpoint(tmp_path / "gru", rnn, tok, {})
    out = tmp_path / "ft"
    _fine_tune(src, corpus_path, out, steps=2, max_seq_len=24, stateful=True)
    state = json.loads((out / "trainer_state.json").read_text())
    used = state["train_config"]
    assert state["tokens"] == 2 * 4 * 24
    assert (used["model"], used["hidden_size"], used["n_layer"], used["max_seq_len"]) == ("gru", 16, 1, 24)
    # --stateful with a Transformer source: refused once the source shows what it is.
    tr_src = tiny_checkpoint(tmp_path / "tr", tokenizer=tok)
    with pytest.raises(LmlabError, match=r"--stateful needs a recurrent model; .* is a Transformer"):
        _fine_tune(tr_src, corpus_path, tmp_path / "x", steps=1, stateful=True)


# --------------------------------------------------------------------------- --time: what it says
def _time_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lmlab: --time ")]


def _record_plans(monkeypatch) -> list[int | None]:
    """Each step's plan (``max_steps`` as the step starts): the re-plans, printed or not."""
    plans: list[int | None] = []
    fake = Trainer.train_step

    def step(self, step):
        plans.append(self.max_steps)
        return fake(self, step)

    monkeypatch.setattr(Trainer, "train_step", step)
    return plans


def test_time_plan_lines_say_what_was_printed_last(tmp_path, corpus_path, monkeypatch, capsys) -> None:
    """1 s/step, 0.97 s from t = 20 s (the end moves from 92 by two steps: too little to
    print), 4 s from t = 40 s (a move worth a line: its "was" is the 92 printed, not the
    unprinted 94), and the last small move (less than 20%) is owned up to at the end."""
    fake_clock(monkeypatch, lambda now: 1.0 if now < 20 else (0.97 if now < 40 else 4.0))
    plans = _record_plans(monkeypatch)
    res, state, rows = _timed_run(tmp_path / "run", corpus_path, "100s")
    lines = _time_lines(capsys.readouterr().err)
    printed = [re.search(r"training for (\d+) steps(?: \(was (\d+)\))?$", s) for s in lines[:-1]]
    assert all(printed), lines
    said = [int(m[1]) for m in printed]
    assert said[0] == 92 and printed[0][2] is None and len(said) == 2
    assert [int(m[2]) for m in printed[1:]] == said[:-1]  # each "was" is the line before's
    moves = [p for a, p in zip([None, *plans], plans) if p != a and p is not None]
    assert 94 in moves and 94 not in said  # a move too small to print happened
    # The rule (docs/training.md): a move is printed when it is ≥ 20% of the plan last printed and ≥ 2 steps.
    expected: list[int] = []
    for p in moves:
        if not expected or abs(p - expected[-1]) >= max(2, 0.2 * expected[-1]):
            expected.append(p)
    assert said == expected
    assert res.step == len(rows) == state["step"] != said[-1]
    assert lines[-1] == (
        f"lmlab: --time 100s: {res.step} steps, not the {said[-1]} announced: later estimates moved "
        "the end by less than 20%, too little to announce"
    )


@pytest.mark.parametrize(
    ("per_step", "note"),
    [
        # A 40 s stall at t = 85 s after the plan of 92 (test_time_budget_hard_stop): step 86.
        (lambda now: 40.0 if now == 85 else 1.0,
         "stopped at step 86, not the 92 announced: the time budget ran out 6 steps before the plan"),
        # The first step outlasts the budget: no plan was ever made.
        (lambda now: 200.0,
         "the time budget ran out at step 1, before the first estimate of the step count"),
        # 1 s/step throughout: the plan of 92 holds, and there is nothing to add.
        (lambda now: 1.0, None),
    ],
)  # fmt: skip
def test_time_run_says_why_it_ended_elsewhere(tmp_path, corpus_path, monkeypatch, capsys, per_step, note):
    fake_clock(monkeypatch, per_step)
    res, _, _ = _timed_run(tmp_path / "run", corpus_path, "100s")
    lines = _time_lines(capsys.readouterr().err)
    if note is None:
        assert res.step == 92 and lines == ["lmlab: --time 100s: 1000 ms/step, training for 92 steps"]
    else:
        assert lines[-1] == f"lmlab: --time 100s: {note}"


# --------------------------------------------------------------------------- a failed run leaves no empty --out
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, c: dict(data=str(d / "missing.txt")), "does not exist"),
        (lambda d, c: dict(data=str(d / "latin1.txt")), "is not valid UTF-8"),
        (lambda d, c: dict(data=str(d / "empty.txt")), "is empty"),
        (lambda d, c: dict(data=str(c), tokenizer=str(d / "nope.json")), "not found"),
        (lambda d, c: dict(data=str(d / "short.txt")), "training needs more than one context window"),
    ],
)  # fmt: skip
def test_a_failed_run_removes_the_out_folder_it_made(tmp_path, corpus_path, make, message) -> None:
    """--out runs/new (both folders new): gone after the failure. An --out that existed,
    empty or not, stays as it was."""
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short\n")
    opts = {**SMALL, "steps": 2, **make(tmp_path, corpus_path)}
    out = tmp_path / "runs" / "new"
    with pytest.raises(LmlabError, match=message):
        lmlab.train(out=str(out), **opts)
    assert not (tmp_path / "runs").exists()
    out.mkdir(parents=True)  # made by the user: kept, empty
    with pytest.raises(LmlabError, match=message):
        lmlab.train(out=str(out), **opts)
    assert out.is_dir() and list(out.iterdir()) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LmlabError, match=message):
        lmlab.train(out=str(out), **opts)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failed_cli_run_leaves_no_out_folder(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    rc = cli_main(
        ["train", "--data", str(tmp_path / "missing.txt"), "--out", str(out), *SMALL_ARGS, "--steps", "2"]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_bpe_vocabulary_smaller_than_asked_is_one_warning_line(tmp_path, corpus_path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(corpus_path, out, "--tokenizer", "bpe", "--vocab-size", "4096", "--steps", "1")
    _, err = finish(popen(cmd))
    n = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    warns = [line for line in err.splitlines() if "warning" in line]
    assert warns == [
        f"lmlab: warning: the corpus gave a BPE vocabulary of {n} tokens, not 4096: it is too small for "
        "more merges (a merge needs a pair of symbols seen at least twice); more text gives more tokens"
    ]
