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
from tokenizers import Tokenizer, models, processors

import lmlab
from lmlab.errors import LmlabError
from lmlab.tokenizer import train_bpe_tokenizer, train_char_tokenizer
from lmlab.training.classify import ClassifyTrainer, blank_token, word_dropout
from lmlab.training.mlm import mlm_tokenizer


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


def _with_specials(model, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(model)
    tok.add_special_tokens(specials)
    return tok


WP = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "bad": 5}


@pytest.mark.parametrize("make, blank, keep", [
    (lambda: train_char_tokenizer(["好坏"]), "<unk>", {"<|endoftext|>"}),  # lmlab's characters
    (lambda: train_bpe_tokenizer(["good film, bad film"] * 20, 300), "<|endoftext|>", set()),  # byte-level: no unk
    (lambda: mlm_tokenizer(train_bpe_tokenizer(["good film"] * 20, 300)), "[MASK]",
     {"<|endoftext|>", "[PAD]", "[CLS]", "[SEP]"}),
    (lambda: _with_specials(models.WordPiece(WP, unk_token="[UNK]"), ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]),
     "[UNK]", {"[PAD]", "[CLS]", "[SEP]"}),  # BERT
    (lambda: _with_specials(models.BPE({"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3}, [], unk_token=None),
                            ["<s>", "</s>", "<unk>"]), "<unk>", {"<s>", "</s>"}),  # RoBERTa: no unk in the model
    (lambda: _with_specials(models.Unigram([("<pad>", 0.0), ("[UNK]", 0.0), ("a", -1.0)], unk_id=1),
                            ["<pad>", "[UNK]"]), "[UNK]", {"<pad>"}),  # SentencePiece: unk_id, not a name
])  # fmt: skip
def test_the_blank_is_the_unknown_token_else_the_mask_else_the_end_of_text(make, blank, keep):
    tok = make()
    got, kept = blank_token(tok)
    assert tok.id_to_token(got) == blank
    assert {tok.id_to_token(i) for i in kept} == keep


def _templated(model, processor) -> Tokenizer:
    tok = Tokenizer(model)  # [CLS]/[SEP], <s>/</s>: plain vocabulary entries, not registered specials
    tok.post_processor = processor
    return tok


@pytest.mark.parametrize("make, keep", [
    (lambda: _templated(models.WordPiece(WP, unk_token="[UNK]"), processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])),
     {"[CLS]", "[SEP]"}),
    (lambda: _templated(models.WordPiece(WP, unk_token="[UNK]"), processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))),
     {"[CLS]", "[SEP]"}),
    (lambda: _templated(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"),
                        processors.Sequence([processors.ByteLevel(),
                                             processors.RobertaProcessing(("</s>", 1), ("<s>", 0))])),
     {"<s>", "</s>"}),
])  # fmt: skip
def test_the_post_processors_tokens_are_kept_even_when_not_registered(make, keep):
    """A text's [CLS] and [SEP] come from the post-processor's template; a tokenizer converted
    from a vocab file may hold them as ordinary entries. Dropping one would hand the model a
    [CLS] position holding [UNK]."""
    tok = make()
    blank, kept = blank_token(tok)
    assert {tok.id_to_token(i) for i in kept} == keep
    ids = tok.encode("good").ids
    out = word_dropout(ids * 500, 0.9, blank, kept, np.random.default_rng(0))
    specials = {tok.token_to_id(t) for t in keep}
    assert all(o == i for o, i in zip(out, ids * 500) if i in specials)
    assert sum(o == blank for o in out) > 0.8 * (len(out) - sum(i in specials for i in ids * 500))


def test_a_tokenizer_with_no_blank_is_refused():
    with pytest.raises(LmlabError, match="--token-dropout replaces tokens by the tokenizer's unknown token"):
        blank_token(Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token=None)))


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


def test_a_classifier_from_a_masked_lm_blanks_with_mask_and_keeps_cls_and_sep(data, tmp_path, monkeypatch):
    train, dev = data
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(t for t, _ in toy_rows(300, seed=3)), encoding="utf-8")
    mlm = tmp_path / "mlm"
    lmlab.train(data=str(plain), out=str(mlm), task="mlm", tokenizer="bpe", vocab_size=300, steps=2, d_model=32,
                n_layer=1, n_head=2, max_seq_len=64, batch_size=8, progress=False)  # fmt: skip
    fed, _, tok = _fed(monkeypatch, data=str(train), valid=str(dev), out=str(tmp_path / "c"), init=str(mlm), steps=6,
                       token_dropout=0.5, **{k: v for k, v in SMALL.items() if k not in ("d_model", "n_layer")})  # fmt: skip
    cls, sep, mask = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
    assert fed
    for got, text in fed:
        assert text[0] == got[0] == cls and text[-1] == got[-1] == sep  # the pooled [CLS] is never dropped
        assert all(g == t or g == mask for g, t in zip(got, text))
    assert sum(g != t for got, text in fed for g, t in zip(got, text)) > 0


def test_a_length_with_no_room_for_text_beside_cls_and_sep_is_refused():
    from types import SimpleNamespace

    t = ClassifyTrainer.__new__(ClassifyTrainer)
    t.tok = mlm_tokenizer(train_bpe_tokenizer(["good film"] * 20, 300))
    t.model, t._cut = SimpleNamespace(config=SimpleNamespace(max_seq_len=2)), 0
    with pytest.raises(LmlabError, match="--max-seq-len 2 leaves no room for text beside the tokenizer's 2 special"):
        t._encode(["good film"])
    t.model.config.max_seq_len = 3
    assert len(t._encode(["good film good film"])[0]) == 3 and t._cut == 1  # [CLS] one token [SEP]
