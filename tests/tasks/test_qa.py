"""The question-answering pipeline. The spans are checked on a model built to point at known
words (its answer is known before it runs); the span search against brute force; the logits
of imported QA models against transformers are in tests/hf/test_encoder.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import tiny_hf_encoder, wordpiece_tokenizer, wordpiece_vocab

import lmlab
from lmlab.api import Model
from lmlab.errors import LmlabError
from lmlab.models.heads import TaskModel
from lmlab.models.task_config import EncoderConfig, TaskConfig
from lmlab.tasks.qa import decode_spans


def pointer_model(folder, targets=("zebra", "斑")):
    """An encoder whose span head scores the ``targets`` tokens far above every other: its
    layer adds nothing (zero output projections), so each token's state is LayerNorm(E[token]),
    and E[target] = v with the head's weights 10·v (LayerNorm(v) = v: v has mean 0, variance 1)."""
    torch.manual_seed(0)
    vocab = wordpiece_vocab()
    body = EncoderConfig(vocab_size=len(vocab), n_layer=1, n_head=4, d_model=32, d_ff=37, max_seq_len=64, dropout=0.0)
    m = TaskModel(TaskConfig(body=body, head="span", head_hidden=False, head_dropout=0.0, id2label=None)).eval()
    v = torch.randn(32)
    v = (v - v.mean()) / v.std(unbiased=False)
    with torch.no_grad():
        layer = m.body.layers[0]
        for lin in (layer.attn.proj, layer.mlp.down):
            lin.weight.zero_()
            lin.bias.zero_()
        m.body.pos_emb.weight.zero_()
        m.body.type_emb.weight.zero_()
        m.body.tok_emb.weight.normal_()
        for t in targets:
            m.body.tok_emb.weight[vocab[t]] = v
        m.out.weight[:] = 10 * v
        m.out.bias.zero_()
    Model(m, wordpiece_tokenizer(), {"pad_token_id": 0}).save(folder)
    return folder


@pytest.fixture(scope="module")
def pointer(tmp_path_factory):
    return pointer_model(tmp_path_factory.mktemp("qa") / "model")


CONTEXT = "the cat sat on the mat . " * 6 + "a zebra is in the house ."


def test_the_only_answer_in_the_last_of_three_windows_is_found(pointer):
    qa = lmlab.pipeline("question-answering", str(pointer), max_seq_len=32, doc_stride=8)
    windows = qa.windows([{"question": "where is it ?", "context": CONTEXT}], qa.options({}))
    zebra = wordpiece_vocab()["zebra"]
    assert len(windows) == 3 and [zebra in w.encoding.ids for w in windows] == [False, False, True]
    got = qa(question="where is it ?", context=CONTEXT)
    assert got["answer"] == "zebra" and CONTEXT[got["start"] : got["end"]] == "zebra" and got["score"] > 0.99
    assert got["start"] == CONTEXT.index("zebra")


def test_chinese_answers_map_back_to_character_offsets(pointer):
    context = "猫坐在垫子上。" * 8 + "斑马在房子里。"
    got = lmlab.pipeline("question-answering", str(pointer), max_seq_len=32)(question="谁在上？", context=context)
    assert got["answer"] == "斑" and context[got["start"] : got["end"]] == "斑" and got["start"] == context.index("斑")


def test_align_to_words_widens_the_span_to_the_whole_word(pointer):
    qa = lmlab.pipeline("question-answering", str(pointer))
    context = "the dog sat . zebras sat on the mat ."
    assert qa(question="who sat ?", context=context)["answer"] == "zebras"  # zebra ##s: the word
    assert qa(question="who sat ?", context=context, align_to_words=False)["answer"] == "zebra"


def test_max_answer_len_bounds_the_span_and_top_k_ranks(pointer):
    qa = lmlab.pipeline("question-answering", str(pointer))
    context = "a zebra sat on the mat with a zebra ."  # the two zebras are 6 tokens apart
    long = qa(question="who ?", context=context, top_k=3)
    assert [a["answer"] for a in long[:3]].count("zebra sat on the mat with a zebra") == 1
    short = qa(question="who ?", context=context, top_k=3, max_answer_len=3)
    assert all(len(a["answer"].split()) <= 3 for a in short)
    assert [a["answer"] for a in short[:2]] == ["zebra", "zebra"] and short[0]["start"] != short[1]["start"]
    assert all(x["score"] >= y["score"] for x, y in zip(short, short[1:]))


def test_handle_impossible_answer_lets_the_empty_answer_win(tmp_path):
    folder = pointer_model(tmp_path / "cls", targets=("[CLS]",))
    qa = lmlab.pipeline("question-answering", str(folder))
    empty = qa(question="who ?", context=CONTEXT, handle_impossible_answer=True)
    assert empty == {"score": pytest.approx(1.0, abs=1e-3), "start": 0, "end": 0, "answer": ""}
    assert qa(question="who ?", context=CONTEXT)["answer"] != ""


@pytest.mark.parametrize("top_k,max_len", [(1, 15), (3, 2), (5, 4), (40, 3)])
def test_decode_spans_equals_brute_force(top_k, max_len):
    rng = np.random.default_rng(top_k)
    T = 9
    start, end = rng.dirichlet(np.ones(T)), rng.dirichlet(np.ones(T))
    allowed = rng.random(T) > 0.3
    starts, ends, scores = decode_spans(start, end, top_k, max_len, allowed)
    spans = sorted(((start[s] * end[e], s, e) for s, e in itertools.product(range(T), range(T))
                    if s <= e < s + max_len), reverse=True)[:top_k]  # fmt: skip
    want = [(sc, s, e) for sc, s, e in spans if allowed[s] and allowed[e]]
    assert [(s, e) for _, s, e in want] == list(zip(starts.tolist(), ends.tolist()))
    assert scores == pytest.approx([sc for sc, _, _ in want])


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_imported_qa_models_answer_with_spans_of_the_context(tmp_path, family):
    folder = tiny_hf_encoder(tmp_path / family, family, "span")
    qa = lmlab.pipeline("question-answering", str(folder), max_seq_len=40, doc_stride=10)
    examples = [{"question": "where is the cat ?", "context": CONTEXT}, {"question": "谁？", "context": "猫坐在垫子上。很好的电影"}]
    for ex, got in zip(examples, qa(examples, top_k=2)):
        assert len(got) == 2
        for a in got:
            assert ex["context"][a["start"] : a["end"]] == a["answer"] and a["answer"] and 0 < a["score"] <= 1
            assert a["answer"] == a["answer"].strip()  # byte-level BPE offsets hold the space before a word


def test_input_forms_and_result_shapes(pointer):
    qa = lmlab.pipeline("question-answering", str(pointer))
    one = qa(question="who ?", context=CONTEXT)
    assert isinstance(one, dict)
    assert qa({"question": "who ?", "context": CONTEXT}) == one
    assert qa([{"question": "who ?", "context": CONTEXT}]) == one  # a list of one: one answer, as transformers
    assert qa("who ?", CONTEXT) == one  # positionally, as v4
    assert qa(question="who ?", context=CONTEXT, max_seq_len=24)["answer"] == "zebra"  # a window per call
    two = qa(question=["who ?", "where ?"], context=CONTEXT)
    assert isinstance(two, list) and two[0] == one and two[1]["answer"] == "zebra"


def test_bad_questions_get_one_line_errors(pointer, tmp_path):
    qa = lmlab.pipeline("question-answering", str(pointer))
    cases = [
        (dict(question="who ?", context="   "), "example 1 has an empty context"),
        (dict(question="", context=CONTEXT), "example 1 has an empty question"),
        (dict(question=["a", "b"], context=["c"]), "2 questions but 1 contexts"),
        (dict(question="who ?", context=CONTEXT, top_k=0), "top_k must be a positive integer"),
        (dict(question="who ?", context=CONTEXT, doc_stride=60), "leaves 59 of the model's 64 tokens for the context"),
        (dict(question="who ?", context=CONTEXT, stride=3), "unknown question-answering option stride"),
    ]
    for kw, msg in cases:
        with pytest.raises(LmlabError, match=msg) as e:
            qa(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(LmlabError, match="qa needs both a question and a context"):
        qa(question="who ?")
    clf = tiny_hf_encoder(tmp_path / "clf", "bert", "classify")
    with pytest.raises(LmlabError, match="is a text classifier; question answering needs a QA model"):
        lmlab.pipeline("question-answering", str(clf))


def test_a_character_model_answers_with_whole_words():
    from lmlab.tasks.qa import widen_to_words

    text = "Anna went to the library 在北京 yesterday."
    assert text[slice(*widen_to_words(text, 7, 17))] == "went to the"  # "nt to the " -> the words it touches
    assert text[slice(*widen_to_words(text, 26, 27))] == "北"  # a Han character is a word of its own
    assert text[slice(*widen_to_words(text, 35, 37))] == "yesterday."
