"""``lmlab classify`` / ``sentiment`` / ``qa`` / ``summarize`` and ``lmlab evaluate`` for those
tasks, run as a user runs them; outputs checked against the library calls they wrap."""

from __future__ import annotations

import json

import pytest
from helpers import run_lmlab, tiny_hf_encoder, tiny_seq2seq_checkpoint

import lmlab

pytest.importorskip("transformers")

TEXTS = ["great film", "awful movie 猫坐在垫子上 !"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_hf_encoder(tmp_path_factory.mktemp("clf"), "bert", "classify", labels=("negative", "positive"))


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory):
    return tiny_hf_encoder(tmp_path_factory.mktemp("qa"), "bert", "span")


def test_classify_prints_the_top_label_and_its_score(bert, tmp_path):
    want = lmlab.pipeline("sentiment-analysis", str(bert))(TEXTS)
    out = run_lmlab("classify", str(bert), "--text", TEXTS[0], "--text", TEXTS[1]).stdout
    assert out.splitlines() == [f"{r['label']} {r['score']:.2f}" for r in want]
    (tmp_path / "in.txt").write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n", encoding="utf-8")
    got = run_lmlab("sentiment", str(bert), "--input", str(tmp_path / "in.txt"), "--json", "--top-k", "2").stdout
    rows = [json.loads(x) for x in got.splitlines()]
    assert rows[1] == {} and [r[0]["label"] for r in (rows[0], rows[2])] == [w["label"] for w in want]
    assert all(len(r) == 2 for r in (rows[0], rows[2]))


def test_qa_answers_and_reads_squad_files(qa_model, tmp_path):
    context = "the cat sat on the mat in the house ."
    want = lmlab.pipeline("question-answering", str(qa_model))(question="where is the cat ?", context=context)
    out = run_lmlab("qa", str(qa_model), "--question", "where is the cat ?", "--context", context).stdout
    assert out == want["answer"] + "\n"
    squad = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "where is the cat ?", "answers": [{"text": "the mat", "answer_start": 15}]},
        {"id": "bad", "question": "who ?", "answers": [{"text": "dog", "answer_start": 3}]},
    ]}]}]}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(squad), encoding="utf-8")
    proc = run_lmlab("qa", str(qa_model), "--input", str(tmp_path / "s.json"), "--json")
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["q1"] and rows[0]["answer"] == want["answer"]
    assert "1 question of" in proc.stderr and "(id bad)" in proc.stderr and "skipped" in proc.stderr
    strict = run_lmlab("qa", str(qa_model), "--input", str(tmp_path / "s.json"), "--strict", check_rc=2)
    assert strict.stderr.count("\n") == 1 and "answer_start does not point" in strict.stderr
    scores = json.loads(run_lmlab("evaluate", str(qa_model), "--data", str(tmp_path / "s.json"), "--json").stdout)
    assert {"exact_match", "f1", "n"} <= scores.keys() and scores["n"] == 2  # scored as the official script: every question


def test_evaluate_classify(bert, tmp_path):
    data = tmp_path / "dev.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in zip(TEXTS, ["positive", "negative"])),
                    encoding="utf-8")  # fmt: skip
    got = json.loads(run_lmlab("evaluate", str(bert), "--data", str(data), "--json", "--plot", str(tmp_path / "cm.png")).stdout)
    predicted = [r["label"] for r in lmlab.pipeline("sentiment-analysis", str(bert))(TEXTS)]
    assert got["accuracy"] == sum(p == g for p, g in zip(predicted, ["positive", "negative"])) / 2
    assert {"macro_f1", "confusion_matrix"} <= got.keys() and (tmp_path / "cm.png").is_file()
    data.write_text("".join(f"{t}\t{i}\n" for t, i in zip(TEXTS, ["1", "0"])), encoding="utf-8")  # label ids
    ids = run_lmlab("evaluate", str(bert), "--data", str(data), "--json")
    assert json.loads(ids.stdout)["accuracy"] == got["accuracy"] and "0 = negative, 1 = positive" in ids.stderr
    proc = run_lmlab("eval", str(bert), "--data", str(data), check_rc=2)
    assert "is a classifier, not a language model: score it with `lmlab evaluate" in proc.stderr
    data.write_text("great film\tmaybe\n", encoding="utf-8")
    bad = run_lmlab("evaluate", str(bert), "--task", "classify", "--data", str(data), check_rc=2)
    assert "label 'maybe', which the model never saw" in bad.stderr and bad.stderr.count("\n") == 1


def test_summarize_and_evaluate_rouge(tmp_path):
    ckpt = tiny_seq2seq_checkpoint(tmp_path / "s2s")
    want = lmlab.load(ckpt).translate(["the cat sat", "a dog"], task="summarization", max_new_tokens=8)
    out = run_lmlab("summarize", str(ckpt), "--text", "the cat sat", "--text", "a dog", "--max-new-tokens", "8").stdout
    assert out.splitlines() == [" ".join(w.splitlines()) for w in want]
    data = tmp_path / "d.jsonl"
    rows = [{"dialogue": "the cat sat", "summary1": "a cat", "summary2": "the cat sat"},
            {"dialogue": "a dog", "summary1": "dog", "summary2": "a dog ran"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = json.loads(run_lmlab("evaluate", str(ckpt), "--task", "summarize", "--data", str(data), "--source-field",
                               "dialogue", "--target-field", "summary1,summary2", "--max-new-tokens", "8",
                               "--json").stdout)  # fmt: skip
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= got.keys() and got["n"] == 2


def test_a_model_of_another_task_is_refused_in_one_line(bert, tmp_path):
    ckpt = tiny_seq2seq_checkpoint(tmp_path / "s2s")
    proc = run_lmlab("classify", str(ckpt), "--text", "hi", check_rc=2)
    assert "is an encoder-decoder" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_lmlab("summarize", str(bert), "--text", "hi", check_rc=2)
    assert "is not an encoder-decoder; summarization needs a seq2seq model" in proc.stderr
