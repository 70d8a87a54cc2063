"""ROUGE, SQuAD/CMRC EM and F1, accuracy/macro-F1/confusion: against values worked out by hand."""

from __future__ import annotations

import pytest

from lmlab.errors import LmlabError
from lmlab.eval.classification import classification_scores, format_confusion, plot_confusion
from lmlab.eval.rouge import rouge_scores
from lmlab.eval.squad import cmrc_em, cmrc_f1, qa_scores, squad_em, squad_f1


def test_rouge_by_hand():
    # unigrams: 5 of 6 shared; bigrams: the-cat, on-the, the-mat = 3 of 5; LCS "the cat on the mat" = 5 of 6
    s = rouge_scores(["the cat sat on the mat"], ["the cat was on the mat"])
    assert (s["rouge1"], s["rouge2"], s["rougeL"]) == pytest.approx((500 / 6, 60.0, 500 / 6), abs=1e-3)


def test_rouge_several_references_mean_or_max():
    refs = [["the cat was on the mat", "a dog"]]
    assert rouge_scores(["the cat sat on the mat"], refs)["rouge1"] == pytest.approx(250 / 6, abs=1e-3)
    assert rouge_scores(["the cat sat on the mat"], refs, aggregate="max")["rouge1"] == pytest.approx(500 / 6, abs=1e-3)


def test_rouge_stems_and_lsum_splits_sentences_on_newlines():
    assert rouge_scores(["running dogs"], ["run dog"])["rouge1"] == pytest.approx(100.0)
    # LCS of [b c a] and [a b c] is 2 of 3; per sentence, "a" and "b c" are each found whole
    s = rouge_scores(["b c\na"], ["a\nb c"])
    assert s["rougeL"] == pytest.approx(200 / 3, abs=1e-3) and s["rougeLsum"] == pytest.approx(100.0)


def test_chinese_is_scored_by_character_not_dropped():
    # 猫坐在垫子上 vs 猫在垫子上: 5 of 6 / 5 of 5 characters -> F = 10/11; bigrams 3 of 5 / 3 of 4 -> 2/3
    s = rouge_scores(["猫坐在垫子上"], ["猫在垫子上"])
    assert (s["rouge1"], s["rouge2"]) == pytest.approx((1000 / 11, 200 / 3), abs=1e-3)
    assert s["tokenizer"] == "han-char"


def test_squad_scores_by_hand():
    assert squad_em("the Denver Broncos!", "Denver Broncos") == 1.0  # articles and punctuation go
    assert squad_f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)  # P 1, R 1/2
    s = qa_scores(["the Denver Broncos", "Denver"], [["Denver Broncos", "Broncos"], ["Denver Broncos"]])
    assert (s["exact_match"], s["f1"]) == pytest.approx((50.0, 100 * (1 + 2 / 3) / 2), abs=1e-3)


def test_cmrc_scores_by_hand():
    assert cmrc_f1("北京大学", "北京") == pytest.approx(2 / 3)  # LCS 2: P 2/4, R 2/2
    assert cmrc_em("北京。", "北京") == 1.0 and cmrc_f1("北京。", "北京") == 1.0
    assert cmrc_f1("在1990年", "1990年") == pytest.approx(0.8)  # [在 1990 年] vs [1990 年]
    s = qa_scores(["北京大学"], [["北京", "北京大学"]])
    assert s["exact_match"] == 100.0 and s["scoring"].startswith("cmrc")


def test_classification_scores_by_hand(tmp_path):
    s = classification_scores(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "c"], ["a", "b", "c"])
    assert s["confusion_matrix"] == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    assert s["accuracy"] == pytest.approx(0.8)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)
    assert "true \\ predicted" in format_confusion(s)
    png = plot_confusion(s, tmp_path / "cm.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_label_the_model_never_saw_is_named():
    with pytest.raises(LmlabError, match="the data has label 'maybe', which the model never saw"):
        classification_scores(["a"], ["maybe"], ["a", "b"])


def test_macro_f1_averages_the_classes_that_occur():
    # c never occurs (neither gold nor predicted): sklearn's macro-F1 leaves it out
    s = classification_scores(["a", "b", "b"], ["a", "b", "a"], ["a", "b", "c"])
    f1_a, f1_b = 2 * 1 * 0.5 / 1.5, 2 * 0.5 * 1 / 1.5
    assert s["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
