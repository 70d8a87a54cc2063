"""The text-classification pipeline against transformers' own (still in transformers 5) on the
same tiny random folders: labels, scores, result shapes, truncation; and its refusals."""

from __future__ import annotations

import pytest
from helpers import lmlab_warnings, recorded_warnings, tiny_hf_encoder, tiny_seq2seq_checkpoint

import lmlab
from lmlab.errors import LmlabError

transformers = pytest.importorskip("transformers")

TEXTS = ["great film", "the cat sat on the mat in the house .", "awful movie 猫坐在垫子上 !", "not very good"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_hf_encoder(tmp_path_factory.mktemp("bert"), "bert", "classify", labels=("neg", "neu", "pos"))


def _close(a, b):
    """Same structure, same labels, scores within float32 rounding."""
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
        return
    assert a.keys() == b.keys() and a["label"] == b["label"]
    assert a["score"] == pytest.approx(b["score"], abs=1e-5)


@pytest.mark.parametrize("options", [{}, {"top_k": 1}, {"top_k": 2}, {"top_k": None}, {"function_to_apply": "sigmoid"},
                                     {"function_to_apply": "none", "top_k": None}])  # fmt: skip
def test_results_match_the_transformers_pipeline(bert, options):
    ref = transformers.pipeline("text-classification", model=str(bert))
    ours = lmlab.pipeline("sentiment-analysis", str(bert))
    for x in (TEXTS[0], TEXTS):
        _close(ours(x, **options), ref(x, **options))


def test_options_given_to_the_pipeline_are_defaults(bert):
    ref = transformers.pipeline("text-classification", model=str(bert), top_k=2)
    ours = lmlab.pipeline("text-classification", str(bert), top_k=2)
    _close(ours(TEXTS), ref(TEXTS))


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_other_families_match_too(tmp_path, family):
    folder = tiny_hf_encoder(tmp_path / family, family, "classify")
    _close(lmlab.pipeline("sentiment-analysis", str(folder))(TEXTS, top_k=None),
           transformers.pipeline("text-classification", model=str(folder))(TEXTS, top_k=None))  # fmt: skip


def test_one_label_is_a_sigmoid_and_a_batch_gives_what_each_text_gives_alone(tmp_path):
    folder = tiny_hf_encoder(tmp_path / "one", "bert", "classify", labels=("toxic",))
    ours = lmlab.pipeline("sentiment-analysis", str(folder), batch_size=3)
    _close(ours(TEXTS), transformers.pipeline("text-classification", model=str(folder))(TEXTS))
    alone = [ours(t)[0] for t in TEXTS]
    assert [r["score"] for r in ours(TEXTS)] == pytest.approx([r["score"] for r in alone], abs=1e-6)
    assert all(0 < r["score"] < 1 for r in alone)


def test_text_pairs(bert):
    pair = {"text": "the cat sat", "text_pair": "where is the dog ?"}
    _close(lmlab.pipeline("sentiment-analysis", str(bert))(pair, top_k=None),
           transformers.pipeline("text-classification", model=str(bert))(pair, top_k=None))  # fmt: skip


def test_long_texts_are_cut_to_the_model_length_with_one_warning(bert):
    long = " ".join(["the cat sat on the mat"] * 30)  # 180 words > 64 positions
    ours = lmlab.pipeline("sentiment-analysis", str(bert))
    with recorded_warnings() as caught:
        got = ours([long, "good film", long])
    msgs = lmlab_warnings(caught)
    assert len(msgs) == 1 and "2 of 3 texts were longer than the model's 64 tokens" in msgs[0]
    ref = transformers.pipeline("text-classification", model=str(bert))
    _close(got, ref([long, "good film", long], truncation=True))


def test_bad_inputs_get_one_line_errors(bert, tmp_path):
    clf = lmlab.pipeline("sentiment-analysis", str(bert))
    for bad, msg in [("", "input 1 is an empty text"), (["ok", "  "], "input 2 is an empty text"),
                     ([3], "input 1 is int")]:  # fmt: skip
        with pytest.raises(LmlabError, match=msg):
            clf(bad)
    with pytest.raises(LmlabError, match="top_k must be a positive integer"):
        clf("good", top_k=0)
    with pytest.raises(LmlabError, match="function_to_apply must be one of softmax, sigmoid, none"):
        clf("good", function_to_apply="relu")
    seq2seq = tiny_seq2seq_checkpoint(tmp_path / "s2s")
    with pytest.raises(LmlabError, match="is an encoder-decoder .*; text classification needs a classifier"):
        lmlab.pipeline("sentiment-analysis", str(seq2seq))
    qa = tiny_hf_encoder(tmp_path / "qa", "bert", "span")
    with pytest.raises(LmlabError, match="is an extractive question-answering model; text classification needs"):
        lmlab.pipeline("text-classification", str(qa))
    with pytest.raises(LmlabError, match=r"unknown task 'sentiment' \(did you mean 'sentiment-analysis'\?\)"):
        lmlab.pipeline("sentiment", str(bert))


def test_options_transformers_has_and_lmlab_does_not_are_named(bert):
    clf = lmlab.pipeline("sentiment-analysis", str(bert))
    with pytest.raises(LmlabError, match="unknown text-classification option truncation .texts longer"):
        clf("good", truncation=True)
    with pytest.raises(LmlabError, match="batch_size must be a positive integer, not '8'"):
        clf("good", batch_size="8")
    with pytest.raises(LmlabError, match="text_pair must be a str, not int"):
        clf({"text": "good", "text_pair": 3})
    one = clf({"text": "the cat sat", "text_pair": "where is the dog ?"})
    assert isinstance(one, dict) and one["label"] in ("neg", "neu", "pos")  # one pair: a dict, as transformers
