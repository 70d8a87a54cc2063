"""BERT, DistilBERT, RoBERTa and XLM-R with a classification or QA head on lmlab's one
encoder, against ``transformers`` on tiny random models made with ``save_pretrained``:
logits (padded batches included) and tokenizers (tokenizer.json, and converted from
vocab.txt / vocab.json + merges.txt)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_hf_encoder

import lmlab
from lmlab.errors import LmlabError
from lmlab.hf import load_hf

transformers = pytest.importorskip("transformers")

FAMILIES = ["bert", "distilbert", "roberta", "xlm-roberta"]
TEXTS = ["great film", "the cat sat on the mat in the house .", "awful movie 猫坐在垫子上 !"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        for task in ("classify", "span"):
            labels = ("neg", "neu", "pos") if fam == "bert" else ("negative", "positive")
            out[fam, task] = tiny_hf_encoder(tmp_path_factory.mktemp(f"{fam}-{task}"), fam, task, labels=labels)
    return out


def _hf_logits(folder, task, enc):
    cls = transformers.AutoModelForSequenceClassification if task == "classify" else transformers.AutoModelForQuestionAnswering
    m = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        out = m(**enc)
    return out.logits if task == "classify" else torch.stack([out.start_logits, out.end_logits], -1)


@pytest.mark.parametrize("task", ["classify", "span"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_a_padded_batch(folders, family, task):
    folder = folders[family, task]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(TEXTS, ["where is the cat ?"] * 3, padding=True, return_tensors="pt")
    ref = _hf_logits(folder, task, enc)
    model = lmlab.load(folder)
    with torch.no_grad():
        ours, state = model.module(enc["input_ids"], attention_mask=enc["attention_mask"],
                                   token_type_ids=enc.get("token_type_ids"))  # fmt: skip
    assert state is None
    if task == "classify":
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    else:
        real = enc["attention_mask"].bool()
        torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)  # padding's scores are not used
    assert model.config.head == task


def test_the_config_names_the_labels_and_the_head(folders):
    cfg = lmlab.load(folders["bert", "classify"]).config
    assert cfg.labels == ["neg", "neu", "pos"] and cfg.num_labels == 3 and cfg.head_activation == "tanh"
    assert lmlab.load(folders["distilbert", "classify"]).config.head_activation == "relu"
    roberta = lmlab.load(folders["roberta", "span"]).config
    assert roberta.body.pos_offset == 2 and roberta.body.max_seq_len == 64  # 66 rows, two before padding_idx+1


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_tokenizers_converted_from_vocab_files_encode_as_transformers(tmp_path, family):
    folder = tiny_hf_encoder(tmp_path / family, family, "classify", tokenizer_files="vocab")
    assert not (folder / "tokenizer.json").exists()
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    ours = lmlab.load(folder).tokenizer
    for text in [*TEXTS, "Zebras sat, did it? 很好的电影", "  spaced   out  "]:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
        pair = ours.encode(text, "who is the dog ?")
        want = ref(text, "who is the dog ?")
        assert pair.ids == want["input_ids"]
        if "token_type_ids" in want:
            assert pair.type_ids == want["token_type_ids"]


def test_a_saved_lmlab_copy_reloads_with_the_same_logits(folders, tmp_path):
    model = lmlab.load(folders["distilbert", "classify"])
    model.save(tmp_path / "copy")
    again = lmlab.load(tmp_path / "copy")
    ids = torch.tensor([again.tokenizer.encode("great film").ids])
    with torch.no_grad():
        torch.testing.assert_close(again.module(ids)[0], model.module(ids)[0], atol=0, rtol=0)
    assert again.config.labels == model.config.labels


def test_other_heads_and_options_are_refused_by_name(tmp_path):
    m = transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                             intermediate_size=37, vocab_size=60))  # fmt: skip
    m.save_pretrained(tmp_path / "mlm")
    with pytest.raises(LmlabError, match=r"BertForMaskedLM; lmlab runs bert models with a task head: \.\.\.ForSequenceClassification"):
        load_hf(str(tmp_path / "mlm"))
    folder = tiny_hf_encoder(tmp_path / "rel", "bert", "classify")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(LmlabError, match="position_embedding_type='relative_key'; lmlab implements absolute positions only"):
        load_hf(str(folder))


def test_a_folder_without_a_tokenizer_is_refused_in_one_line(tmp_path):
    folder = tiny_hf_encoder(tmp_path / "bert", "bert", "classify")
    for f in ("tokenizer.json", "vocab.txt"):
        (folder / f).unlink(missing_ok=True)
    with pytest.raises(LmlabError, match="has no tokenizer lmlab can read for BERT") as e:
        load_hf(str(folder))
    assert "\n" not in str(e.value)
