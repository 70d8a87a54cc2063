"""``--ema-decay``: the saved model is the moving average of the weights, computed here by
hand from each step's weights; training itself goes on from the raw weights (a run without
the average trains to exactly them); evaluations score the average; resume is exact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_resume_is_exact
from safetensors.torch import load_file, save_file

import lmlab
from lmlab.errors import LmlabError
from lmlab.training.average import WeightAverage
from lmlab.training.trainer import Trainer

SMALL = dict(d_model=32, n_layer=1, n_head=2, max_seq_len=32, batch_size=4, progress=False, warmup=2, lr=3e-3)


def test_the_saved_model_is_the_hand_computed_average_and_training_is_unchanged(tmp_path, corpus_path, monkeypatch):
    decay, steps = 0.8, 12
    seen: list[dict[str, torch.Tensor]] = []  # θ at the start, then after each step
    real_init, real_update = WeightAverage.__init__, WeightAverage.update

    def init(self, model, d):
        real_init(self, model, d)
        seen.append({n: p.detach().clone() for n, p in zip(self.names, self.params)})

    def update(self, step):
        assert step == len(seen) - 1  # the step just taken, counted from 0
        seen.append({n: p.detach().clone() for n, p in zip(self.names, self.params)})
        real_update(self, step)

    monkeypatch.setattr(WeightAverage, "__init__", init)
    monkeypatch.setattr(WeightAverage, "update", update)
    lmlab.train(data=str(corpus_path), out=str(tmp_path / "ema"), steps=steps, ema_decay=decay, **SMALL)
    lmlab.train(data=str(corpus_path), out=str(tmp_path / "plain"), steps=steps, **SMALL)
    assert len(seen) == steps + 1

    # θ̄_0 = θ_0; θ̄ ← d_t θ̄ + (1 − d_t) θ_{t+1}, d_t = min(d, (1 + t) / (10 + t)): d_0 = 0.1, ..., then 0.8
    expected = {n: t.double() for n, t in seen[0].items()}
    for t in range(steps):
        d = min(decay, (1 + t) / (10 + t))
        expected = {n: d * expected[n] + (1 - d) * seen[t + 1][n].double() for n in expected}
    saved = load_file(tmp_path / "ema" / "model.safetensors")
    for n, want in expected.items():
        torch.testing.assert_close(saved[n].double(), want, atol=1e-6, rtol=1e-5)
        assert not torch.equal(saved[n], seen[-1][n])  # the average, not the last step
    # The raw weights: kept for --resume, and exactly what the run without an average reached.
    state, plain = load_file(tmp_path / "ema" / "training_state.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    for n in expected:
        assert torch.equal(state["raw." + n], plain[n]), n
    assert not any(k.startswith("raw.") for k in load_file(tmp_path / "plain" / "training_state.safetensors"))


def test_evaluations_score_the_average(tmp_path, corpus_path, monkeypatch):
    at_eval: list[torch.Tensor] = []
    real = Trainer.evaluate

    def evaluate(self):
        at_eval.append(next(self.model.parameters()).detach().clone())
        return real(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    out = tmp_path / "run"
    lmlab.train(data=str(corpus_path), out=str(out), steps=10, eval_every=10, ema_decay=0.9, **SMALL)
    name = next(iter(lmlab.load(out).module.state_dict()))
    saved, raw = load_file(out / "model.safetensors")[name], load_file(out / "training_state.safetensors")["raw." + name]
    assert torch.equal(at_eval[-1], saved) and not torch.equal(saved, raw)


def test_resume_with_an_average_is_exact(tmp_path, corpus_path, monkeypatch):
    opts = dict(SMALL, data=str(corpus_path), steps=20, eval_every=10, save_every=10, ema_decay=0.95, dropout=0.1)
    assert_resume_is_exact(Trainer, monkeypatch, tmp_path / "a", tmp_path / "b", **opts)
    sa, sb = (load_file(tmp_path / x / "training_state.safetensors") for x in "ab")
    raw = [k for k in sa if k.startswith("raw.")]
    assert raw and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in raw)


def test_a_classifier_with_an_average(tmp_path):
    from test_tasks import SMALL as CLS
    from test_tasks import toy_rows, write_tsv

    train, dev = write_tsv(tmp_path / "train.tsv", toy_rows(400)), write_tsv(tmp_path / "dev.tsv", toy_rows(80, seed=1))
    out = tmp_path / "clf"
    res = lmlab.train(data=str(train), valid=str(dev), out=str(out), model="lstm", steps=60, eval_every=30,
                      ema_decay=0.9, **CLS)  # fmt: skip
    assert res.best["accuracy"] >= 0.95, res.best
    clf = lmlab.pipeline("sentiment-analysis", str(out / "best"))
    assert [r["label"] for r in clf(["i loved it , great acting", "boring and dull , very bad movie"])] == ["positive", "negative"]


@pytest.mark.parametrize("bad", [1.0, -0.1, 2])
def test_a_decay_outside_zero_to_one_is_refused(tmp_path, corpus_path, bad):
    with pytest.raises(LmlabError, match=r"--ema-decay must be in \[0, 1\)"):
        lmlab.train(data=str(corpus_path), out=str(tmp_path / "x"), steps=1, ema_decay=bad, **SMALL)


def test_the_cli_flag_and_a_bad_value(tmp_path, corpus_path):
    cmd = [sys.executable, "-m", "lmlab", "train", "--data", str(corpus_path), "--out", str(tmp_path / "r"),
           "--steps", "3", "--d-model", "16", "--n-layer", "1", "--no-progress"]  # fmt: skip
    ok = subprocess.run([*cmd, "--ema-decay", "0.5"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "r" / "trainer_state.json").read_text())["train_config"]["ema_decay"] == 0.5
    bad = subprocess.run([*cmd, "--ema-decay", "1", "--overwrite"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("lmlab: error: --ema-decay must be in [0, 1)")


def test_a_checkpoint_without_its_raw_weights_is_not_resumed(tmp_path, corpus_path):
    out = tmp_path / "run"
    lmlab.train(data=str(corpus_path), out=str(out), steps=4, save_every=2, ema_decay=0.9, **SMALL)
    path = out / "training_state.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("raw.")}, str(path))
    with pytest.raises(LmlabError, match="no raw weights for --ema-decay"):
        lmlab.train(resume=str(out), steps=6)


def test_a_translation_run_that_decodes_its_dev_set_keeps_real_weights_for_the_average(tmp_path, monkeypatch):
    """Dev BLEU decodes between steps, inside the weight average's swap: a model in training
    keeps its parameters real tensors while it decodes (``pack_in_place`` off: a packed copy
    that replaced a weight — bf16, or fp32 on lmlab's fp32 kernel — left a one-number stand-in
    that the average's swap-out could not write into; a review found the crash)."""
    import random

    import lmlab.generate.seq2seq as s2s

    words = "the a cat dog sees likes big small red house tree".split()
    de = dict(zip(words, "der ein katze hund sieht mag grosse kleine rote haus baum".split()))
    rng = random.Random(0)
    pairs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for _ in range(200)]
    data = tmp_path / "p.tsv"
    data.write_text("source\ttarget\n" + "".join(f"{s}\t{' '.join(de[w] for w in s.split())}\n" for s in pairs))
    stand_ins, real = [], s2s.seq2seq_generate

    def spy(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        stand_ins.extend(n for n, p in model.named_parameters() if p.dim() == 2 and 0 in p.stride())
        return out

    monkeypatch.setattr(s2s, "seq2seq_generate", spy)
    lmlab.train(task="translate", data=str(data), out=str(tmp_path / "run"), d_model=32, n_layer=1, n_head=2,
                batch_size=16, tokenizer="char", lr=1e-3, progress=False, steps=6, eval_every=2, save_every=100,
                bleu_samples=3, ema_decay=0.9)  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("bleu" in r for r in rows) >= 2 and not stand_ins
