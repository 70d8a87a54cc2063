"""The summarization and translation pipelines on a tiny T5 folder: the task's prefix and
generation settings from ``task_specific_params`` as transformers v4 applied them, against
``transformers`` ``generate`` on the same prefixed ids; results shaped as v4's pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import lmlab

transformers = pytest.importorskip("transformers")
V = 60


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    cfg.task_specific_params = {
        "summarization": {"prefix": "t7 t8 ", "num_beams": 3, "max_length": 9, "no_repeat_ngram_size": 2},
        "translation_en_to_de": {"prefix": "t9 ", "max_length": 7},
    }
    m = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else None
    d = tmp_path_factory.mktemp("t5") / "t5"
    m.save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    return d, m, tok


def _reference(m, tok, text: str, **gen) -> str:
    ids = torch.tensor([tok.encode(text).ids])
    out = m.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    return tok.decode([i for i in out[0].tolist()[1:] if i not in (0, 1)])  # after the start token; no pad/EOS


def test_summarization_takes_t5s_prefix_and_settings(t5):
    folder, m, tok = t5
    texts = ["t20 t21 t22 t23 t24", "t30 t31 t32"]
    got = lmlab.pipeline("summarization", str(folder))(texts)
    want = [_reference(m, tok, "t7 t8 " + t, num_beams=3, max_length=9, no_repeat_ngram_size=2) for t in texts]
    assert got == [{"summary_text": w} for w in want]
    one = lmlab.pipeline("summarization", str(folder))(texts[0])
    assert one == [{"summary_text": want[0]}]  # one text: a list of one, as v4


def test_translation_task_names_pick_their_params(t5):
    folder, m, tok = t5
    text = "t40 t41 t42"
    got = lmlab.pipeline("translation_en_to_de", str(folder))(text)
    assert got == [{"translation_text": _reference(m, tok, "t9 " + text, max_length=7, num_beams=1, do_sample=False)}]
    several = lmlab.pipeline("translation", str(folder), num_return_sequences=2, num_beams=2)([text, "t50"])
    assert len(several) == 2 and all(len(r) == 2 and "translation_text" in r[0] for r in several)


def test_a_classifier_is_not_a_summarizer(tmp_path):
    from helpers import tiny_hf_encoder

    folder = tiny_hf_encoder(tmp_path / "b", "bert", "classify")
    with pytest.raises(lmlab.LmlabError, match="is not an encoder-decoder; summarization needs a seq2seq model"):
        lmlab.pipeline("summarization", str(folder))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
