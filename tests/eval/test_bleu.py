"""lmlab.eval.bleu: BLEU and chrF against values worked out by hand and against sacreBLEU itself."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from lmlab.errors import LmlabError
from lmlab.eval import translation_scores as exported
from lmlab.eval.bleu import is_chinese, translation_scores


def bleu_by_hand(precisions: list[float], hyp_len: int, ref_len: int) -> float:
    """BLEU = BP · (Π pₙ)^(1/4), BP = min(1, exp(1 − r/c)), on the 0..100 scale."""
    bp = min(1.0, math.exp(1 - ref_len / hyp_len))
    return 100 * bp * math.prod(precisions) ** 0.25


def test_bleu_with_brevity_penalty_by_hand():
    hyp, ref = "a b c d x f", "a b c d e f g h"
    # 1-grams: a b c d f of 6 match; 2-grams: ab bc cd of 5; 3-grams: abc bcd of 4; 4-grams: abcd of 3.
    # The hypothesis has 6 tokens, the reference 8: BP = exp(1 − 8/6).
    expected = bleu_by_hand([5 / 6, 3 / 5, 2 / 4, 1 / 3], hyp_len=6, ref_len=8)
    s = translation_scores([hyp], [ref])
    assert s["bleu"] == pytest.approx(expected, abs=1e-9)
    assert s["bleu"] == pytest.approx(38.50, abs=0.005)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu([hyp], [[ref]]).score, abs=1e-9)
    assert (s["n"], s["tokenize"]) == (1, "13a")


def test_bleu_with_exp_smoothing_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # 1: the the cat on mat = 5/6; 2: "the cat" "on the" "the mat" = 3/5; 3: "on the mat" = 1/4;
    # 4: none of 3, smoothed ('exp', the first zero) to 1 / (2¹ · 3). Equal lengths: BP = 1.
    expected = bleu_by_hand([5 / 6, 3 / 5, 1 / 4, 1 / 6], hyp_len=6, ref_len=6)
    assert translation_scores([hyp], [ref])["bleu"] == pytest.approx(expected, abs=1e-9)


def test_corpus_bleu_sums_counts_over_sentences():
    hyps = ["the cat sat on the mat", "a b c d x f", "There is a dog ."]
    refs = ["the cat is on the mat", "a b c d e f g h", "There is a dog ."]
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    s = translation_scores(hyps, refs)
    assert s["bleu"] == pytest.approx(expected, abs=1e-9)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    # Corpus BLEU is not the mean of sentence BLEUs.
    mean = sum(translation_scores([h], [r])["bleu"] for h, r in zip(hyps, refs)) / 3
    assert abs(s["bleu"] - mean) > 1


def test_bleu_is_cased():
    assert translation_scores(["The Cat"], ["the cat"])["bleu"] < 100
    assert translation_scores(["the cat sat down"], ["the cat sat down"])["bleu"] == pytest.approx(100)


def test_chrf_of_identical_text_is_100_and_signatures():
    s = translation_scores(["Ein kleiner Test .", "Noch einer"], ["Ein kleiner Test .", "Noch einer"])
    assert s["chrf"] == pytest.approx(100) and s["bleu"] == pytest.approx(100)
    assert s["signature"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert s["signature"]["chrf"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert set(s) == {"bleu", "chrf", "signature", "n", "tokenize"}
    assert isinstance(s["bleu"], float) and isinstance(s["chrf"], float)


def test_chinese_references_pick_the_zh_tokenizer():
    hyp, ref = "我喜欢猫", "我喜欢狗"
    # zh splits every Han character: 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> 1/(2·1).
    expected = bleu_by_hand([3 / 4, 2 / 3, 1 / 2, 1 / 2], hyp_len=4, ref_len=4)
    s = translation_scores([hyp], [ref])
    assert s["tokenize"] == "zh" and "tok:zh" in s["signature"]["bleu"]
    assert s["bleu"] == pytest.approx(expected, abs=1e-9)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu([hyp], [[ref]], tokenize="zh").score, abs=1e-9)
    # Under 13a the whole sentence is one word, and that word is wrong.
    assert translation_scores([hyp], [ref], tokenize="13a")["bleu"] < 1


def test_is_chinese():
    assert is_chinese(["我喜欢猫。", "今天天气很好", "I like Python"])
    assert not is_chinese(["I like cats", "我喜欢猫", "hello"])
    assert not is_chinese(["猫が好きです", "今日は天気がいい"])  # Japanese: Han with kana
    assert not is_chinese([]) and not is_chinese(["", "  "])


def test_multiple_references_per_hypothesis():
    hyps = ["the cat is on the mat", "a dog barks"]
    refs = [["the cat sat on the mat", "the cat is on the mat"], ["a dog is barking", "the dog barks loudly"]]
    s = translation_scores(hyps, refs)
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score, abs=1e-9)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score, abs=1e-9)
    assert s["signature"]["bleu"].startswith("nrefs:2|")
    # The first hypothesis matches its second reference exactly: with one sentence, 100.
    assert translation_scores(hyps[:1], refs[:1])["bleu"] == pytest.approx(100)


def test_a_variable_number_of_references():
    hyps = ["the cat is on the mat", "a dog barks"]
    refs = [["the cat sat on the mat", "the cat is on the mat"], ["a dog is barking"]]
    expected = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs], [refs[0][1], None]]).score
    s = translation_scores(hyps, refs)
    assert s["bleu"] == pytest.approx(expected, abs=1e-9)
    assert s["signature"]["bleu"].startswith("nrefs:var|")


def test_the_package_exports_it():
    assert exported is translation_scores


def error(match: str, *args, **kwargs) -> str:
    with pytest.raises(LmlabError) as e:
        translation_scores(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_errors():
    error("2 hypotheses but 1 references", ["a", "b"], ["a"])
    error("no hypotheses to score", [], [])
    msg = error("unknown BLEU tokenizer 'spacy'", ["a"], ["a"], tokenize="spacy")
    assert "13a, char, " in msg and "zh" in msg
    error("hypothesis 0 has no reference", ["a"], [[]])
    error("not a single string", "a b", "a b")
    error("a hypothesis is a NoneType, not text", [None], ["a"])
    error("reference 0 holds a int, not text", ["a"], [[1]])
