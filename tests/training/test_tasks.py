"""``lmlab train --task classify`` (and ``--task summarize``, ``--task qa``): a classifier on each kind of
body learns a toy sentiment task, resumes exactly, starts from a language model trained here
(--init), weighs unbalanced classes, and refuses bad data in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import assert_resume_is_exact
from safetensors.torch import load_file

import lmlab
from lmlab.errors import LmlabError

POS = ["a great film", "very good movie", "i loved it", "wonderful and moving", "great acting", "这部电影很好看"]
NEG = ["an awful film", "very bad movie", "i hated it", "boring and dull", "terrible acting", "房间太小服务很差"]
SMALL = dict(task="classify", d_model=32, n_layer=1, batch_size=16, progress=False, overwrite=True, lr=3e-3, warmup=5)


def toy_rows(n: int, seed: int = 0, share_pos: float = 0.5) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos = rng.random() < share_pos
        words = POS if pos else NEG
        rows.append((f"{rng.choice(words)} , {rng.choice(words)}", "positive" if pos else "negative"))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str]], header: bool = True) -> Path:
    path.write_text(("text\tlabel\n" if header else "") + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


def tiny_lstm_lm(folder: Path, n_layer: int) -> Path:
    """A 16-wide LSTM language model trained 5 steps on the toy texts without labels (an --init)."""
    plain = folder / "plain.txt"
    plain.write_text("\n".join(t for t, _ in toy_rows(400, seed=3)) * 3, encoding="utf-8")
    lm = folder / "lm"
    lmlab.train(data=str(plain), out=str(lm), model="lstm", steps=5, d_model=16, hidden_size=16, n_layer=n_layer,
                max_seq_len=64, progress=False)  # fmt: skip
    return lm


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cls")
    return write_tsv(d / "train.tsv", toy_rows(400)), write_tsv(d / "dev.tsv", toy_rows(80, seed=1), header=False)


@pytest.mark.parametrize("model", ["encoder", "lstm", "gru", "gpt"])
def test_each_body_learns_to_classify(data, tmp_path, model):
    train, dev = data
    out = tmp_path / model
    res = lmlab.train(data=str(train), valid=str(dev), out=str(out), model=model, steps=60, eval_every=30, **SMALL)
    assert res.best["accuracy"] >= 0.95, res.best
    clf = lmlab.pipeline("sentiment-analysis", str(out / "best"))
    assert [r["label"] for r in clf(["i loved it , great acting", "boring and dull , very bad movie"])] == ["positive", "negative"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "task" and cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert cfg["pooling"] == {"encoder": "mean", "gpt": "last"}.get(model, "max")


def test_resume_continues_exactly(data, tmp_path, monkeypatch):
    from lmlab.training.classify import ClassifyTrainer

    train, dev = data
    opts = dict(SMALL, data=str(train), valid=str(dev), model="encoder", steps=20, eval_every=10, save_every=10, dropout=0.1)
    assert_resume_is_exact(ClassifyTrainer, monkeypatch, tmp_path / "a", tmp_path / "b", **opts)


def test_init_from_a_language_model_trained_here(data, tmp_path):
    train, dev = data
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(t for t, _ in toy_rows(400, seed=3)) * 3, encoding="utf-8")
    lm = tmp_path / "lm"
    lmlab.train(data=str(plain), out=str(lm), steps=10, d_model=32, n_layer=1, max_seq_len=64, progress=False)
    out = tmp_path / "clf"
    lmlab.train(task="classify", init=str(lm), data=str(train), valid=str(dev), out=str(out), steps=1, lr=1e-12,
                warmup=0, progress=False)  # fmt: skip
    body, start = load_file(out / "model.safetensors"), load_file(lm / "model.safetensors")
    for name, t in start.items():  # the body starts as the language model (lr ~ 0: one step moves nothing)
        torch.testing.assert_close(body["body." + name], t, atol=1e-6, rtol=0)
    assert {"out.weight", "out.bias"} <= body.keys()
    assert lmlab.load(out).tokenizer.to_str() == lmlab.load(lm).tokenizer.to_str()


def test_a_bidirectional_lstm_classifier_trains_from_scratch_and_from_a_language_model(data, tmp_path):
    train, dev = data
    out = tmp_path / "bi"
    res = lmlab.train(data=str(train), valid=str(dev), out=str(out), model="lstm", bidirectional=True, hidden_size=32,
                      steps=60, eval_every=30, **SMALL)  # fmt: skip
    assert res.best["accuracy"] >= 0.95, res.best
    body = json.loads((out / "config.json").read_text())["body"]
    assert body["bidirectional"] is True and body["tie_embeddings"] is False
    clf = lmlab.pipeline("sentiment-analysis", str(out / "best"))
    texts = ["i loved it , great acting", "bad", "boring and dull , very bad movie , truly awful"]
    together, alone = clf(texts, batch_size=3), [clf(t)[0] for t in texts]  # padding changes nothing
    assert [r["label"] for r in together] == [r["label"] for r in alone]
    assert [r["score"] for r in together] == pytest.approx([r["score"] for r in alone], abs=1e-5)
    lm = tiny_lstm_lm(tmp_path, n_layer=2)
    clf_dir = tmp_path / "bi-init"
    lmlab.train(task="classify", init=str(lm), bidirectional=True, data=str(train), valid=str(dev), out=str(clf_dir),
                steps=1, lr=1e-12, warmup=0, progress=False)  # fmt: skip
    got, start = load_file(clf_dir / "model.safetensors"), load_file(lm / "model.safetensors")
    torch.testing.assert_close(got["body.rnn.weight_hh_l1"], start["rnn.weight_hh_l1"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["body.rnn.weight_ih_l1"][:, :16], start["rnn.weight_ih_l1"], atol=1e-6, rtol=0)
    assert "body.rnn.weight_hh_l1_reverse" in got and "body.lm_head.weight" not in got


def test_bidirectional_is_for_recurrent_classifier_bodies(data, tmp_path):
    train, _ = data
    with pytest.raises(LmlabError, match="--bidirectional is for recurrent bodies .* not --model encoder"):
        lmlab.train(data=str(train), out=str(tmp_path / "o"), model="encoder", bidirectional=True, steps=1, **SMALL)
    with pytest.raises(LmlabError, match="--bidirectional: for --task classify only"):
        lmlab.train(data=str(train), out=str(tmp_path / "o"), model="lstm", bidirectional=True, steps=1, progress=False)


def test_balanced_class_weights(tmp_path):
    from lmlab.training.classify import ClassifyTrainer
    from lmlab.training.run import train_config

    rows = toy_rows(100, share_pos=0.8)
    npos = sum(lab == "positive" for _, lab in rows)
    cfg, given = train_config(data=str(write_tsv(tmp_path / "t.tsv", rows)), out=str(tmp_path / "o"),
                              class_weight="balanced", steps=1, **{k: v for k, v in SMALL.items() if k != "overwrite"})  # fmt: skip
    trainer = ClassifyTrainer(cfg, given)
    trainer.setup()
    try:
        n = len(trainer.train_y)
        kept_pos = sum(trainer.train_y)  # label 1 = positive (sorted)
        want = [n / (2 * (n - kept_pos)), n / (2 * kept_pos)]  # n / (k · n_c)
        assert trainer.class_weights.tolist() == pytest.approx(want)
        assert 0.7 < kept_pos / n < 0.9 and npos > 50
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "content,message",
    [
        ("good film\tpositive\nbad film\n", r"t\.tsv line 2 has 1 tab-separated field; a row is text<TAB>label"),
        ("good film\t\n", r"line 1 has an empty label"),
    ],
)
def test_bad_data_is_one_line(tmp_path, content, message):
    (tmp_path / "t.tsv").write_text(content, encoding="utf-8")
    with pytest.raises(LmlabError, match=message):
        lmlab.train(data=str(tmp_path / "t.tsv"), out=str(tmp_path / "o"), steps=1, **SMALL)


def test_a_dev_label_never_trained_on_and_bad_options_are_named(data, tmp_path):
    train, _ = data
    dev = write_tsv(tmp_path / "dev.tsv", [("so so", "neutral")])
    with pytest.raises(LmlabError, match="have label 'neutral', which the training data do not"):
        lmlab.train(data=str(train), valid=str(dev), out=str(tmp_path / "o"), steps=1, **SMALL)
    with pytest.raises(LmlabError, match="--task classify puts a classifier on --model gpt, rnn, gru, lstm, encoder"):
        lmlab.train(data=str(train), out=str(tmp_path / "o"), model="rnn-attention", steps=1, **SMALL)
    with pytest.raises(LmlabError, match="--pooling: for --task classify only"):
        lmlab.train(data=str(train), out=str(tmp_path / "o"), pooling="max", steps=1, progress=False)


def test_summarize_trains_with_rouge_on_the_dev_set(tmp_path):
    rows = [{"dialogue": f"#Person1#: where is {n}?\n#Person2#: {n} went home.", "summary": f"{n} went home."}
            for n in ["Tom", "Mary", "Anna", "Li"] * 30]  # fmt: skip
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = lmlab.train(task="summarize", data=str(f), source_field="dialogue", target_field="summary", out=str(tmp_path / "s"),
                      steps=4, eval_every=2, d_model=32, n_layer=1, batch_size=8, bleu_samples=4, progress=False)  # fmt: skip
    assert "rougeL" in res.best
    assert any("rougeL" in json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines())


def toy_squad(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names, places = ["Tom", "Mary", "Anna", "Li"], ["the market", "the park", "Paris", "北京"]
    out = []
    for i in range(n):
        name, place = rng.choice(names), rng.choice(places)
        filler = " ".join(rng.choice(["It was sunny.", "Birds sang.", "The bus was late."]) for _ in range(rng.randint(0, 4)))
        ctx = f"{filler} {name} went to {place} yesterday. {filler}".strip()
        start = ctx.index(f"{name} went to ") + len(f"{name} went to ")
        out.append({"id": str(i), "question": f"Where did {name} go?", "context": ctx,
                    "answers": [{"text": place, "answer_start": start}]})  # fmt: skip
    return out


def test_qa_trains_an_encoder_to_point_at_answers(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in toy_squad(300)), encoding="utf-8")
    res = lmlab.train(task="qa", data=str(f), out=str(tmp_path / "qa"), steps=150, eval_every=50, d_model=64, n_layer=2,
                      max_seq_len=64, batch_size=16, lr=2e-3, progress=False)  # fmt: skip
    assert res.best["span_f1"] > 50, res.best
    cfg = json.loads((tmp_path / "qa" / "config.json").read_text())
    assert cfg["head"] == "span" and cfg["body"]["type_vocab_size"] == 2
    qa = lmlab.pipeline("question-answering", str(tmp_path / "qa" / "best"))
    got = qa(question="Where did Anna go?", context="Birds sang. Anna went to the park yesterday.")
    context = "Birds sang. Anna went to the park yesterday."
    assert context[got["start"] : got["end"]] == got["answer"] and got["answer"]


def test_qa_learns_from_answers_given_as_text_only(tmp_path):
    rows = [{"question": r["question"], "context": r["context"], "answers": [r["answers"][0]["text"]]} for r in toy_squad(60)]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    from lmlab.training.qa import QATrainer
    from lmlab.training.run import train_config

    cfg, given = train_config(task="qa", data=str(f), out=str(tmp_path / "o"), steps=1, d_model=32, n_layer=1,
                              max_seq_len=64, progress=False)  # fmt: skip
    trainer = QATrainer(cfg, given)
    trainer.setup()
    try:  # every window holding the answer points at it: the text found in the context
        held = [w for w in trainer.train_w if w[2] > 0]
        assert len(held) >= 40  # each of the ~54 training questions has a window that holds its answer, most several
        for ids, _, s, e, _ in held[:20]:
            assert trainer.tok.decode(ids[s : e + 1]).replace(" ", "") in {"themarket", "thepark", "Paris", "北京"}
    finally:
        trainer.close()


def test_one_labelled_text_is_not_enough(tmp_path):
    with pytest.raises(LmlabError, match="holds 1 labelled text; training needs at least 2"):
        lmlab.train(data=str(write_tsv(tmp_path / "t.tsv", [("good", "pos")])), out=str(tmp_path / "o"), steps=1, **SMALL)


def test_qa_refuses_a_decoder_body(tmp_path):
    with pytest.raises(LmlabError, match="--task qa trains an extractive reader: --model encoder"):
        lmlab.train(task="qa", model="lstm", data=str(tmp_path / "x.json"), out=str(tmp_path / "o"), steps=1)


def test_a_long_text_is_cut_as_the_pipeline_cuts_it_keeping_sep(tmp_path, monkeypatch):
    """An encoder from a masked LM reads [CLS] text [SEP]: a text longer than the model is cut
    by the tokenizer's truncation, which keeps [SEP], in training as in the pipeline (slicing
    the ids would train on texts without it and predict on texts with it)."""
    from lmlab.training.classify import ClassifyTrainer

    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(t for t, _ in toy_rows(300, seed=3)), encoding="utf-8")
    lmlab.train(data=str(plain), out=str(tmp_path / "mlm"), task="mlm", tokenizer="bpe", vocab_size=300, steps=2,
                d_model=32, n_layer=1, n_head=2, max_seq_len=12, batch_size=8, progress=False)  # fmt: skip
    rows = [(f"{t} , {t} , {t}", y) for t, y in toy_rows(60)]  # 3× a toy text: longer than 12 tokens
    train = write_tsv(tmp_path / "long.tsv", rows)
    fed = []
    real = ClassifyTrainer._logits
    monkeypatch.setattr(ClassifyTrainer, "_logits", lambda self, r, xs: (fed.extend(list(xs[i]) for i in r),
                                                                         real(self, r, xs))[1])  # fmt: skip
    lmlab.train(data=str(train), out=str(tmp_path / "c"), init=str(tmp_path / "mlm"), steps=2, **{
        k: v for k, v in SMALL.items() if k not in ("d_model", "n_layer")})  # fmt: skip
    clf = lmlab.pipeline("sentiment-analysis", str(tmp_path / "c"))
    tok = clf.model.tokenizer
    want = {tuple(clf.tokenizer.encode(t).ids) for t, _ in rows}  # what the pipeline reads
    assert fed and all(len(x) == 12 and x[0] == tok.token_to_id("[CLS]") and x[-1] == tok.token_to_id("[SEP]")
                       for x in fed)  # fmt: skip
    assert {tuple(x) for x in fed} <= want
