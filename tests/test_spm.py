"""SentencePiece tokenizers (lmlab.spm): Marian and T5 folders encode and decode as transformers.

The references are outside lmlab: transformers' ``MarianTokenizer`` and ``T5Tokenizer`` (built
from the same tiny SentencePiece models, trained here on a few KB of English and German), and
``sentencepiece`` itself, whose ``encode`` is what T5's tokenizer reproduces. Loading a T5
folder that has only ``spiece.model`` needs ``protobuf`` in transformers; without it that one
comparison is skipped and the others still pin the behaviour down.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import MarianTokenizer, PreTrainedTokenizerFast, T5Tokenizer

from lmlab.errors import LmlabError
from lmlab.spm import (
    MarianSpmTokenizer,
    load_marian_tokenizers,
    load_seq2seq_tokenizers,
    load_spm_tokenizer,
    read_spec,
)

EN = """The quick brown fox jumps over the lazy dog.
A small frog sat on a log by the river and watched the boats go by.
Tom asked his teacher for advice about the exam next week.
It's half past twelve, isn't it? We should leave for the station soon.
Where is the train station? Turn left at the bakery and walk straight on.
Good morning! How are you today? I am fine, thank you very much.
My grandmother grows tomatoes, beans and potatoes in her garden.
The children played football in the park until it was dark.
Please close the window; the wind is cold tonight.
She reads a book every evening before she goes to sleep.
"""
DE = """Der schnelle braune Fuchs springt über den faulen Hund.
Ein kleiner Frosch saß auf einem Baumstamm am Fluss und sah den Booten zu.
Tom bat seinen Lehrer um Rat wegen der Prüfung nächste Woche.
Es ist halb eins, nicht wahr? Wir sollten bald zum Bahnhof gehen.
Wo ist der Bahnhof? Biegen Sie an der Bäckerei links ab und gehen Sie geradeaus.
Guten Morgen! Wie geht es dir heute? Mir geht es gut, vielen Dank.
Meine Großmutter baut Tomaten, Bohnen und Kartoffeln in ihrem Garten an.
Die Kinder spielten im Park Fußball, bis es dunkel war.
Bitte schließ das Fenster; der Wind ist heute Nacht kalt.
Sie liest jeden Abend ein Buch, bevor sie schlafen geht.
"""

#: Plain text of every awkward kind, none of it written with special tokens.
TEXTS = [
    "",
    " ",
    "The fox jumps over the dog.",
    "Der Fuchs springt über den Hund.",
    "  leading and trailing  ",
    "repeated   spaces\tand a tab\nand a newline",
    "中文 and 日本語 are unknown",
    "ä ö ü: known to the German side only",
    "Bäckerei Größe",
    "ﬁ ① Ｆｕｌｌ width, café, cafe\u0301, x\u00a0y",
    "emoji 🙂! #@$%^&*",
    ">> not a language code <<",
]
#: Text that transformers splits around special tokens and Marian's language codes.
MARKED = [
    ">>de<< The fox",
    " >>de<< a space before the code",
    ">>xx<< an unknown code",
    "fox </s> x <unk> y<pad>",
    "</s>>>de<<x",
    ">><<",
]
T5_MARKED = ["<extra_id_0> the fox <extra_id_4>", "a</s>b <pad>", "<unk>"]
EXTRA_IDS = 5


def _train(path: Path, text: str, **ids: int) -> Path:
    lines = [line for line in text.splitlines() if line] * 2
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(path),
        vocab_size=100,
        model_type=ids.pop("model_type", "unigram"),
        character_coverage=1.0,
        minloglevel=2,
        **ids,
    )
    return path.with_suffix(".model")


def _marian_tokenizer(**kw) -> MarianTokenizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses."
        return MarianTokenizer(**kw) if "source_spm" in kw else MarianTokenizer.from_pretrained(kw["folder"])


def _piece_vocab(*models: Path, first: tuple[str, ...] = ("</s>", "<unk>")) -> dict[str, int]:
    """An opus-mt style vocab.json: </s>, <unk>, language codes, the pieces of both models, <pad>."""
    vocab = {t: i for i, t in enumerate([*first, ">>de<<", ">>fr<<"])}
    for m in models:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(m))
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i)):
                vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    return vocab


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("spm")
    return {
        # sentencepiece's default ids (<unk> 0, <s> 1, </s> 2), as opus-mt's models have
        "source": _train(d / "source", EN),
        "target": _train(d / "target", DE),
        # T5's ids: <pad> 0, </s> 1, <unk> 2, no <s>
        "t5": _train(d / "t5", EN + DE, pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
    }


@pytest.fixture(scope="module")
def marian(models, tmp_path_factory) -> tuple[Path, MarianTokenizer]:
    d = tmp_path_factory.mktemp("marian")
    vocab = d / "vocab.json"
    vocab.write_text(json.dumps(_piece_vocab(models["source"], models["target"])))
    _marian_tokenizer(
        source_spm=str(models["source"]), target_spm=str(models["target"]), vocab=str(vocab)
    ).save_pretrained(d / "folder")
    return d / "folder", _marian_tokenizer(folder=d / "folder")


@pytest.fixture(scope="module")
def marian_separate(models, tmp_path_factory) -> tuple[Path, MarianTokenizer]:
    d = tmp_path_factory.mktemp("marian_sep")
    (d / "vocab.json").write_text(json.dumps(_piece_vocab(models["source"])))
    # special ids that differ from the source vocab's: unknown target pieces get the target <unk>
    (d / "target_vocab.json").write_text(json.dumps(_piece_vocab(models["target"], first=("<unk>", "</s>"))))
    ref = _marian_tokenizer(
        source_spm=str(models["source"]),
        target_spm=str(models["target"]),
        vocab=str(d / "vocab.json"),
        target_vocab_file=str(d / "target_vocab.json"),
        separate_vocabs=True,
    )
    ref.save_pretrained(d / "folder")
    return d / "folder", _marian_tokenizer(folder=d / "folder")


@pytest.fixture(scope="module")
def t5_folder(models, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("t5")
    (d / "spiece.model").write_bytes(models["t5"].read_bytes())
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS})
    )
    return d


def _t5_reference(model: Path) -> T5Tokenizer:
    """transformers' T5Tokenizer from the pieces and scores as sentencepiece reports them (its
    vocab order: the pieces, then <extra_id_N> down to <extra_id_0>). No normalization table:
    only for decoding and for plain ASCII text."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=EXTRA_IDS)


# --- Marian -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + MARKED)
def test_marian_encodes_as_transformers(marian, text):
    folder, ref = marian
    src, tgt = load_marian_tokenizers(folder)
    expected = ref(text).input_ids
    enc = src.encode(text)
    assert enc.ids == expected
    assert enc.tokens == ref.convert_ids_to_tokens(expected)
    assert src.encode(text, add_special_tokens=False).ids == expected[:-1]  # all but </s>
    assert tgt.encode(text).ids == ref(text_target=text).input_ids


@pytest.mark.parametrize("text", TEXTS + MARKED)
def test_marian_decodes_as_transformers(marian, text):
    folder, ref = marian
    src, tgt = load_marian_tokenizers(folder)
    for ids in (ref(text).input_ids, ref(text_target=text).input_ids):
        for skip in (True, False):
            expected = ref.decode(ids, skip_special_tokens=skip)
            assert src.decode(ids, skip_special_tokens=skip) == expected
            assert tgt.decode(ids, skip_special_tokens=skip) == expected
    assert src.decode_batch([ids, ids]) == [ref.decode(ids, skip_special_tokens=True)] * 2


def test_a_piece_unknown_to_the_source_model_keeps_its_vocab_id(marian):
    """Marian looks pieces up by their string: 'ä' is no piece of the English model, yet the shared
    vocab.json has it (from the German side), so it is not <unk>, as in transformers."""
    folder, ref = marian
    src, _ = load_marian_tokenizers(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "source.spm"))
    assert sp.piece_to_id("ä") == sp.unk_id()
    ids = src.encode(" ä").ids
    assert ids == ref(" ä").input_ids
    assert ref.convert_tokens_to_ids("ä") in ids


TEXT_CHARS = st.sampled_from(
    list("abcdefghijklmnopqrstuvwxyzTHEDF  \t\näöüßé中🙂.,!?<>/ ") + ["</s>", ">>de<<", "<unk>"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(TEXT_CHARS, max_size=25).map("".join))
def test_marian_matches_transformers_on_any_text(marian, text):
    folder, ref = marian
    src, tgt = load_marian_tokenizers(folder)
    ids = ref(text).input_ids
    assert src.encode(text).ids == ids
    assert tgt.encode(text).ids == ref(text_target=text).input_ids
    assert src.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS + MARKED[:3])
def test_marian_separate_vocabs_match_transformers(marian_separate, text):
    folder, ref = marian_separate
    src, tgt = load_marian_tokenizers(folder)
    assert src.encode(text).ids == ref(text).input_ids
    target_ids = ref(text_target=text).input_ids
    assert tgt.encode(text).ids == target_ids
    assert tgt.decode(target_ids) == ref.decode(target_ids, skip_special_tokens=True)


def test_marian_offsets_point_into_the_text(marian):
    folder, _ = marian
    src, _ = load_marian_tokenizers(folder)
    text = ">>de<< The quick fox jumps over the dog."
    enc = src.encode(text)
    assert enc.offsets[0] == (0, 6) and enc.offsets[-1] == (0, 0)  # the code; the added </s>
    for token, (start, end) in zip(enc.tokens[1:-1], enc.offsets[1:-1]):
        assert text[start:end] == token.replace("▁", " ").lstrip(" ") or text[start:end] == token.replace(
            "▁", " "
        )


def test_marian_vocabulary_and_save_round_trip(marian, tmp_path):
    folder, ref = marian
    src, tgt = load_marian_tokenizers(folder)
    assert src.get_vocab() == ref.get_vocab()
    assert src.get_vocab_size() == len(ref) == tgt.get_vocab_size()
    assert src.token_to_id(">>de<<") == ref.convert_tokens_to_ids(">>de<<")
    assert src.id_to_token(5) == ref.convert_ids_to_tokens(5)
    assert src.token_to_id("no such piece") is None and src.id_to_token(10**6) is None
    src.save(tmp_path / "out" / "tokenizer.json")  # a caller that writes a tokenizer.json gets the folder
    again = _marian_tokenizer(folder=tmp_path / "out")
    for text in TEXTS:
        assert again(text).input_ids == ref(text).input_ids
        assert again(text_target=text).input_ids == ref(text_target=text).input_ids


# --- T5 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_t5_encodes_as_sentencepiece(t5_folder, text):
    """T5's tokenizer is SentencePiece's encode plus </s> (transformers builds it to match)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(t5_folder / "spiece.model"))
    tok = load_spm_tokenizer(t5_folder)
    assert isinstance(tok, Tokenizer)
    assert tok.encode(text).ids == [*sp.encode(text), sp.eos_id()]
    assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)
    assert tok.encode(text).tokens[:-1] == sp.encode(text, out_type=str)


@pytest.mark.parametrize("text", TEXTS + T5_MARKED)
def test_t5_decodes_as_transformers(t5_folder, text):
    ref = _t5_reference(t5_folder / "spiece.model")
    tok = load_spm_tokenizer(t5_folder)
    ids = tok.encode(text).ids
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", ["The fox jumps.", "  a   b  ", *T5_MARKED])
def test_t5_special_tokens_and_sentinels_as_transformers(t5_folder, text):
    ref = _t5_reference(t5_folder / "spiece.model")
    tok = load_spm_tokenizer(t5_folder)
    assert tok.encode(text).ids == ref(text).input_ids
    assert tok.token_to_id("<extra_id_0>") == ref.convert_tokens_to_ids("<extra_id_0>") == 100 + EXTRA_IDS - 1
    assert tok.get_vocab_size() == len(ref)


@pytest.mark.parametrize("text", TEXTS + T5_MARKED)
def test_t5_folder_matches_transformers_from_pretrained(t5_folder, text):
    pytest.importorskip(
        "google.protobuf", reason="transformers reads a spiece.model-only folder with protobuf"
    )
    ref = T5Tokenizer.from_pretrained(t5_folder)
    tok = load_spm_tokenizer(t5_folder)
    ids = ref(text).input_ids
    assert tok.encode(text).ids == ids
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert json.loads(tok.to_str()) == json.loads(ref.backend_tokenizer.to_str())


def test_t5_saved_tokenizer_json_reads_in_transformers(t5_folder, tmp_path):
    load_spm_tokenizer(t5_folder).save(str(tmp_path / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(t5_folder / "spiece.model"))
    for text in TEXTS:
        assert hf(text).input_ids == [*sp.encode(text), sp.eos_id()]


def test_the_spec_reader_agrees_with_protobuf(models):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    for path in models.values():
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        proto = pb.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        spec = read_spec(sp)
        assert spec.model_type == proto.trainer_spec.model_type
        assert spec.charsmap == proto.normalizer_spec.precompiled_charsmap and spec.charsmap
        assert spec.piece_types == [p.type for p in proto.pieces]


# --- one entry point ----------------------------------------------------------------------------


def test_load_seq2seq_tokenizers_picks_by_folder(marian, t5_folder, tmp_path):
    src, tgt = load_seq2seq_tokenizers(marian[0])
    assert isinstance(src, MarianSpmTokenizer) and isinstance(tgt, MarianSpmTokenizer) and src is not tgt
    a, b = load_seq2seq_tokenizers(t5_folder)
    assert a is b and isinstance(a, Tokenizer)
    load_spm_tokenizer(t5_folder).save(str(tmp_path / "tokenizer.json"))
    c, d = load_seq2seq_tokenizers(tmp_path)
    assert c is d and c.encode("The fox").ids == a.encode("The fox").ids


# --- errors ---------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def _copy(folder: Path, to: Path, *skip: str) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        if f.name not in skip:
            (to / f.name).write_bytes(f.read_bytes())
    return to


def test_a_missing_target_spm_is_named_with_what_the_folder_has(marian, tmp_path):
    d = _copy(marian[0], tmp_path / "m", "target.spm")
    with pytest.raises(LmlabError) as e:
        load_seq2seq_tokenizers(d)
    msg = _one_line(e)
    assert "no target.spm" in msg and "source.spm, tokenizer_config.json, vocab.json" in msg


def test_a_missing_target_vocab_with_separate_vocabs(marian_separate, tmp_path):
    d = _copy(marian_separate[0], tmp_path / "m", "target_vocab.json")
    with pytest.raises(LmlabError, match="no target_vocab.json"):
        load_marian_tokenizers(d)


@pytest.mark.parametrize("name", ["source.spm", "target.spm"])
def test_a_corrupt_spm_file(marian, tmp_path, name):
    d = _copy(marian[0], tmp_path / "m")
    (d / name).write_bytes(b"<html>404 not found</html>")
    with pytest.raises(LmlabError) as e:
        load_marian_tokenizers(d)
    msg = _one_line(e)
    assert f"{name} is not a SentencePiece model" in msg and "download the file again" in msg


def test_a_corrupt_or_missing_spiece_model(t5_folder, tmp_path):
    d = _copy(t5_folder, tmp_path / "t5")
    (d / "spiece.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(LmlabError) as e:
        load_spm_tokenizer(d)
    assert "spiece.model is not a SentencePiece model" in _one_line(e)
    (d / "spiece.model").unlink()
    with pytest.raises(LmlabError) as e:
        load_spm_tokenizer(d)
    assert "no spiece.model (found: tokenizer_config.json)" in _one_line(e)


def test_a_folder_without_any_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LmlabError) as e:
        load_seq2seq_tokenizers(tmp_path)
    msg = _one_line(e)
    assert "no tokenizer in" in msg and "found: config.json" in msg and "spiece.model" in msg
    with pytest.raises(LmlabError, match="not found"):
        load_seq2seq_tokenizers(tmp_path / "nope")


def test_a_spiece_model_of_another_tokenizer_class(t5_folder, tmp_path):
    d = _copy(t5_folder, tmp_path / "albert")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "AlbertTokenizer"}))
    with pytest.raises(LmlabError, match="AlbertTokenizer; lmlab reads a spiece.model only for T5"):
        load_spm_tokenizer(d)


def test_a_bpe_spiece_model_is_refused(tmp_path):
    model = _train(tmp_path / "bpe", EN + DE, model_type="bpe")
    (tmp_path / "spiece.model").write_bytes(model.read_bytes())
    with pytest.raises(LmlabError, match="not a unigram SentencePiece model"):
        load_spm_tokenizer(tmp_path)


def test_a_vocab_without_unk(marian, tmp_path):
    d = _copy(marian[0], tmp_path / "m")
    vocab = json.loads((d / "vocab.json").read_text())
    del vocab["<unk>"]
    (d / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(LmlabError, match="has no <unk> token"):
        load_marian_tokenizers(d)
    (d / "vocab.json").write_text("[1, 2")
    with pytest.raises(LmlabError, match="not valid JSON"):
        load_marian_tokenizers(d)


# --------------------------------------------------------------------------- XLM-RoBERTa
XLMR_TEXTS = [*TEXTS, "这部电影很好看", "Le café est très bon.", "<mask> fox"]


def test_xlm_roberta_sentencepiece_model_is_converted_as_transformers_does(models, tmp_path):
    """An XLM-R folder with only sentencepiece.bpe.model (+ tokenizer_config.json): lmlab's
    encoder tokenizer gives transformers' XLMRobertaTokenizer's ids, pairs and decoding."""
    import shutil

    from transformers import XLMRobertaTokenizer

    from lmlab.hf.encoder import ENCODER_FAMILIES, load_encoder_tokenizer

    folder = tmp_path / "xlmr"
    folder.mkdir()
    shutil.copy(models["source"], folder / "sentencepiece.bpe.model")  # sentencepiece's ids: <unk> 0, <s> 1, </s> 2
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    try:
        ref = XLMRobertaTokenizer.from_pretrained(str(folder))
    except (ImportError, ValueError) as e:  # converting a .model needs protobuf in transformers
        pytest.skip(f"transformers cannot convert the model here: {e}")
    ours = load_encoder_tokenizer(folder, ENCODER_FAMILIES["xlm-roberta"])
    assert ours.get_vocab_size() == len(ref)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(models["source"]))
    assert ours.token_to_id(sp.id_to_piece(5)) == 6  # fairseq's offset of one
    for text in XLMR_TEXTS:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
        ids = ours.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    q, c = "Where is the fox?", "The quick brown fox jumps over the lazy dog."
    assert ours.encode(q, c).ids == ref(q, c)["input_ids"]
