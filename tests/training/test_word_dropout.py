"""``--token-dropout p`` (word dropout): each training token of a classifier becomes the
tokenizer's unknown token with probability p. Checked on what the model is actually fed: the
kept tokens are the text's own, the dropped ones the unknown token, at about the asked rate;
dev texts are read whole; special tokens stay; a resumed run draws the same; bad values and
the wrong task are refused in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_resume_is_exact
from test_tasks import SMALL, toy_rows, write_tsv
from tokenizers import Tokenizer

import lmlab
from lmlab.errors import LmlabError
from lmlab.training.classify import ClassifyTrainer, word_dropout


def test_word_dropout_replaces_about_p_of_the_tokens_and_keeps_the_special_ones():
    ids = [5, 6, 7, 8, 2] * 4000
    out = word_dropout(ids, 0.3, blank=1, keep=frozenset({2}), rng=np.random.default_rng(0))
    assert len(out) == len(ids)
    changed = [i for i, (a, b) in enumerate(zip(ids, out)) if a != b]
    assert all(out[i] == 1 for i in changed)  # a dropped token is the blank, never another word
    assert all(out[i] == 2 for i in range(4, len(ids), 5))  # the special token: never dropped
    rate = len(changed) / (len(ids) * 4 / 5)
    assert 0.28 < rate < 0.32, rate  # 16,000 droppable tokens: σ ≈ 0.004
    assert word_dropout(ids, 0.3, 1, frozenset({2}), np.random.default_rng(0)) == out  # seeded: the same draw
    assert word_dropout(ids, 0.0, 1, frozenset(), np.random.default_rng(0)) == ids


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("wdrop")
    return write_tsv(d / "train.tsv", toy_rows(400)), write_tsv(d / "dev.tsv", toy_rows(80, seed=1), header=False)


def _fed(monkeypatch, **opts) -> tuple[list, list, Tokenizer]:
    """Every (training, dev) id list the model was given, and the run's tokenizer."""
    seen: dict[str, list] = {"train": [], "dev": []}
    real = ClassifyTrainer._logits

    def spy(self, rows, xs):
        which = "dev" if xs is self.val_x else "train"
        seen[which] += [(list(xs[i]), list(self.train_x[i] if which == "train" else self.val_x[i])) for i in rows]
        return real(self, rows, xs)

    monkeypatch.setattr(ClassifyTrainer, "_logits", spy)
    lmlab.train(**opts)
    return seen["train"], seen["dev"], Tokenizer.from_file(str(opts["out"]) + "/tokenizer.json")


@pytest.mark.parametrize("tokenizer, blank", [("char", "<unk>"), ("bpe", "<|endoftext|>")])
def test_the_model_is_fed_the_text_with_about_p_of_its_tokens_blank(data, tmp_path, monkeypatch, tokenizer, blank):
    train, dev = data
    fed, dev_fed, tok = _fed(monkeypatch, data=str(train), valid=str(dev), out=str(tmp_path / "r"), model="lstm",
                             steps=20, eval_every=10, token_dropout=0.25, tokenizer=tokenizer,
                             **({"vocab_size": 300} if tokenizer == "bpe" else {}), **SMALL)  # fmt: skip
    blank_id = tok.token_to_id(blank)
    assert blank_id is not None
    n = dropped = 0
    for got, text in fed:
        assert len(got) == len(text)
        for g, t in zip(got, text):
            assert g == t or g == blank_id
            n, dropped = n + 1, dropped + (g != t)
    assert n > 2000 and 0.21 < dropped / n < 0.29, (n, dropped)
    assert dev_fed and all(got == text for got, text in dev_fed)  # evaluations read every token


def test_off_by_default(data, tmp_path, monkeypatch):
    train, dev = data
    fed, _, _ = _fed(monkeypatch, data=str(train), valid=str(dev), out=str(tmp_path / "r"), model="lstm", steps=5,
                     **SMALL)  # fmt: skip
    assert fed and all(got == text for got, text in fed)


def test_a_classifier_with_word_dropout_learns_and_resumes_exactly(data, tmp_path, monkeypatch):
    train, dev = data
    res = lmlab.train(data=str(train), valid=str(dev), out=str(tmp_path / "clf"), model="lstm", bidirectional=True,
                      hidden_size=32, steps=60, eval_every=30, token_dropout=0.1, **SMALL)  # fmt: skip
    assert res.best["accuracy"] >= 0.95, res.best
    opts = dict(data=str(train), valid=str(dev), model="gru", steps=20, save_every=10, eval_every=10, token_dropout=0.3,
                **SMALL)  # fmt: skip
    assert_resume_is_exact(ClassifyTrainer, monkeypatch, tmp_path / "a", tmp_path / "b", **opts)


@pytest.mark.parametrize("bad", [1.0, -0.1, 3])
def test_a_rate_outside_zero_to_one_is_refused(data, tmp_path, bad):
    with pytest.raises(LmlabError, match=r"--token-dropout must be in \[0, 1\)"):
        lmlab.train(data=str(data[0]), out=str(tmp_path / "x"), model="lstm", steps=1, token_dropout=bad, **SMALL)


def test_the_cli_flag_is_for_classifiers_only(data, tmp_path):
    cmd = [sys.executable, "-m", "lmlab", "train", "--data", str(data[0]), "--steps", "2", "--d-model", "16",
           "--n-layer", "1", "--no-progress", "--token-dropout", "0.2"]  # fmt: skip
    ok = subprocess.run([*cmd, "--task", "classify", "--model", "lstm", "--out", str(tmp_path / "c")],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "lm")], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("lmlab: error:") and "--token-dropout" in last, last
