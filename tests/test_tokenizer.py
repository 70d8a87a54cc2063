"""Tokenizers: exact round trips (char and byte-level BPE), unknown characters, the saved
``tokenizer.json`` as Hugging Face reads it, and ``load_tokenizer``'s inputs and errors.

The references are outside lmlab: Python's own ``str`` (a round trip must give the input
back), the ``tokenizers`` and ``transformers`` loaders reading our files, and
``GPT2TokenizerFast`` reading a GPT-2 style vocab.json + merges.txt folder.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, pre_tokenizers
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from lmlab.errors import LmlabError
from lmlab.tokenizer import (
    EOT,
    UNK,
    UnknownCharWarner,
    eos_token_id,
    load_tokenizer,
    tokenizer_kind,
    train_bpe_tokenizer,
    train_char_tokenizer,
)

# A few KB of mixed text: English, Chinese, code, emoji, tabs and Windows line ends.
TRAIN_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\r\n"
    "自然语言处理是人工智能的一个分支。我们训练一个小模型。\n"
    "def f(x):\n\treturn x * 2  # 中文注释\n"
    "Emoji: 😀 👍🏽 — naïve café, résumé, bob.\n"
) * 40

CHINESE = [
    "你好，世界！",
    "自然语言处理是人工智能的一个分支。",
    "机器学习模型需要大量的数据来训练，而数据的质量直接影响模型的效果。",
    "中文和English混合 text，还有数字123和标点「」《》。",
    "第一行\n第二行\t制表符\r\n第三行",
    "生僻字：龘靐齉爩，扩展区：𠀀𪚥𫝀",  # includes characters outside the BMP
]

# Characters from everywhere in Unicode (surrogates cannot be encoded as UTF-8, so they are
# not text), plus dense CJK and emoji ranges so those show up in most examples.
ANY_CHAR = st.one_of(
    st.characters(exclude_categories=("Cs",)),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK unified ideographs
    st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF),  # CJK extension B
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.sampled_from(["\n", "\r", "\t", " ", "\u200d", "\ufe0f", "\u0301", "\x00"]),
)
ANY_TEXT = st.text(ANY_CHAR, max_size=80).filter(lambda s: EOT not in s)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe_tokenizer([TRAIN_TEXT], vocab_size=400)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_char_tokenizer([TRAIN_TEXT])


# --------------------------------------------------------------------------- byte-level BPE
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ANY_TEXT)
def test_bpe_round_trips_any_unicode(bpe: Tokenizer, text: str) -> None:
    """Byte-level BPE has all 256 bytes as symbols, so no string is out of vocabulary."""
    ids = bpe.encode(text).ids
    assert all(0 <= i < bpe.get_vocab_size() for i in ids)
    assert bpe.decode(ids) == text


@pytest.mark.parametrize("text", CHINESE)
def test_bpe_round_trips_chinese(bpe: Tokenizer, text: str) -> None:
    ids = bpe.encode(text).ids
    assert bpe.decode(ids) == text
    # Every token is a run of UTF-8 bytes: their concatenation is the UTF-8 encoding.
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    raw = b"".join(bytes(byte_of[c] for c in bpe.id_to_token(i)) for i in ids)
    assert raw == text.encode("utf-8")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (written out here as an independent reference)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def test_bpe_vocab_holds_every_byte(bpe: Tokenizer) -> None:
    vocab = bpe.get_vocab()
    assert set(_bytes_to_unicode().values()) <= set(vocab)
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    assert bpe.token_to_id(EOT) is not None
    assert 256 + 1 < bpe.get_vocab_size() <= 400  # some merges were learnt, within the budget


def test_bpe_learns_merges_from_the_corpus(bpe: Tokenizer) -> None:
    """A word seen 40 times in training takes fewer tokens than its UTF-8 bytes."""
    assert len(bpe.encode("Citizen").ids) < len(b"Citizen")
    assert len(bpe.encode("自然语言处理").ids) < len("自然语言处理".encode())


def test_bpe_vocab_size_too_small() -> None:
    with pytest.raises(LmlabError, match="vocab-size"):
        train_bpe_tokenizer([TRAIN_TEXT], vocab_size=100)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ANY_TEXT)
def test_bpe_agrees_with_transformers_fast_tokenizer(bpe: Tokenizer, text: str) -> None:
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = hf.encode(text, add_special_tokens=False)
    assert ids == bpe.encode(text).ids
    assert hf.decode(ids) == text == bpe.decode(ids)


@pytest.mark.parametrize("text", CHINESE + ["hello , world . don 't", "  two  spaces  "])
def test_bpe_transformers_decode_is_exact(bpe: Tokenizer, text: str) -> None:
    """Also texts that ``clean_up_tokenization_spaces`` would alter (" ." -> ".")."""
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert hf.decode(hf.encode(text)) == text


def test_bpe_end_of_text_is_one_token(bpe: Tokenizer) -> None:
    ids = bpe.encode("a" + EOT + "b").ids
    assert ids.count(bpe.token_to_id(EOT)) == 1
    assert bpe.decode(ids, skip_special_tokens=False) == "a" + EOT + "b"
    assert eos_token_id(bpe) == bpe.token_to_id(EOT)


# --------------------------------------------------------------------------- characters
ALPHABET = sorted(set(TRAIN_TEXT))


def test_char_alphabet_is_the_training_text(char: Tokenizer) -> None:
    """One token per code point seen, plus the two special tokens."""
    assert {"\n", "\r", "\t", " ", "中", "😀", "\u00ef"} <= set(ALPHABET)
    assert char.get_vocab_size() == len(ALPHABET) + 2
    vocab = char.get_vocab()
    assert set(vocab) == set(ALPHABET) | {EOT, UNK}
    assert sorted(vocab.values()) == list(range(len(vocab)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.sampled_from(ALPHABET), max_size=120))
def test_char_round_trips_text_over_its_alphabet(char: Tokenizer, text: str) -> None:
    enc = char.encode(text)
    assert enc.tokens == list(text)  # one token per code point, whitespace included
    assert char.token_to_id(UNK) not in enc.ids
    assert char.decode(enc.ids) == text


@pytest.mark.parametrize("text", ["\n\n\t  \r\n", "自然语言处理", " 😀 ", "a\td\nc"])
def test_char_round_trips_whitespace_and_cjk(char: Tokenizer, text: str) -> None:
    assert char.decode(char.encode(text).ids) == text
    assert len(char.encode(text).ids) == len(text)


def test_char_unseen_character_is_unk(char: Tokenizer) -> None:
    unk = char.token_to_id(UNK)
    enc = char.encode("aZ龘b")  # "Z" and "龘" are not in TRAIN_TEXT
    assert "Z" not in ALPHABET and "龘" not in ALPHABET
    assert enc.ids == [char.token_to_id("a"), unk, unk, char.token_to_id("b")]


def test_unknown_char_warner_warns_exactly_once(char: Tokenizer) -> None:
    warner = UnknownCharWarner(char)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the "once" must come from the warner, not the registry
        warner.check(char.encode("abc").ids, "abc")
        assert caught == []
        for text in ["aZb", "ZZZ", "龘"]:
            warner.check(char.encode(text).ids, text)
    assert len(caught) == 1
    assert UNK in str(caught[0].message)


def test_unknown_char_warner_silent_for_bpe(bpe: Tokenizer) -> None:
    warner = UnknownCharWarner(bpe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warner.check(bpe.encode("龘 Z").ids, "龘 Z")
        warner.check([0, 1, 2, 3], "")
    assert caught == []


def test_char_vocab_is_deterministic(tmp_path: Path) -> None:
    a = train_char_tokenizer([TRAIN_TEXT])
    b = train_char_tokenizer([TRAIN_TEXT[::-1]])  # same characters, another order
    c = train_char_tokenizer(list(TRAIN_TEXT.splitlines(keepends=True)))
    a.save(str(tmp_path / "a.json"))
    b.save(str(tmp_path / "b.json"))
    c.save(str(tmp_path / "c.json"))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "c.json").read_bytes()


def test_tokenizer_kind_and_eos(char: Tokenizer, bpe: Tokenizer) -> None:
    assert tokenizer_kind(char) == "char"
    assert tokenizer_kind(bpe) == "bpe (byte-level)"
    assert eos_token_id(char) == char.token_to_id(EOT) == 0


# --------------------------------------------------------------------------- saved files
SAMPLES = ["First Citizen: 中文注释\n\treturn x", "naïve café 😀" + EOT + "résumé"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_saved_tokenizer_json_loads_in_hugging_face(
    kind: str, char: Tokenizer, bpe: Tokenizer, tmp_path: Path
) -> None:
    tok = char if kind == "char" else bpe
    f = tmp_path / "tokenizer.json"
    tok.save(str(f))
    json.loads(f.read_text(encoding="utf-8"))  # plain JSON
    rust = Tokenizer.from_file(str(f))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(f))
    for text in SAMPLES:
        ids = tok.encode(text).ids
        assert rust.encode(text).ids == ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids, skip_special_tokens=False) == text
        assert hf.decode(ids, skip_special_tokens=True) == text.replace(EOT, "")


def test_load_tokenizer_file_and_folder(bpe: Tokenizer, tmp_path: Path) -> None:
    bpe.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):
        tok = load_tokenizer(path)
        for text in SAMPLES:
            assert tok.encode(text).ids == bpe.encode(text).ids
            assert tok.decode(tok.encode(text).ids) == text.replace(EOT, "")


def test_load_tokenizer_drops_padding_and_truncation_saved_in_the_file(bpe: Tokenizer, tmp_path: Path) -> None:
    """Hub tokenizer.json files often carry padding/truncation: read as saved, every text would be
    padded with id 0 to 16 and cut to 3 tokens silently. lmlab pads and cuts on its own terms."""
    text = "the quick brown fox jumps over the lazy dog"
    whole = bpe.encode(text).ids
    assert len(whole) > 3
    padded = Tokenizer.from_str(bpe.to_str())
    padded.enable_padding(length=16, pad_id=0, pad_token=EOT)
    padded.enable_truncation(3)
    padded.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids[3:] == [0] * 13  # as saved
    tok = load_tokenizer(tmp_path)
    assert tok.encode(text).ids == whole
    assert [e.ids for e in tok.encode_batch([text, "the"])] == [whole, bpe.encode("the").ids]


def test_load_tokenizer_gpt2_vocab_and_merges(bpe: Tokenizer, tmp_path: Path) -> None:
    """A folder with GPT-2's two files (no tokenizer.json), as ``BPE.save`` writes them."""
    d = tmp_path / "gpt2style"
    d.mkdir()
    written = bpe.model.save(str(d))
    assert sorted(Path(p).name for p in written) == ["merges.txt", "vocab.json"]
    assert not (d / "tokenizer.json").exists()
    tok = load_tokenizer(d)
    reference = GPT2TokenizerFast.from_pretrained(str(d))  # transformers reading the same files
    for text in SAMPLES + CHINESE:
        ids = tok.encode(text).ids
        assert ids == bpe.encode(text).ids
        assert ids == reference.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.token_to_id(EOT) == bpe.token_to_id(EOT)


def _one_line_error(path: object) -> str:
    with pytest.raises(LmlabError) as e:
        load_tokenizer(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_tokenizer_missing(tmp_path: Path) -> None:
    assert "not found" in _one_line_error(tmp_path / "nope.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no tokenizer.json" in _one_line_error(empty)


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"version": "1.0"}', b"\xff\xfe\x00garbage", b"[1, 2, 3]"],
    ids=["empty", "truncated", "not-a-tokenizer", "binary", "a-list"],
)
def test_load_tokenizer_corrupt_json(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "tokenizer.json"
    f.write_bytes(content)
    assert "not a valid tokenizer.json" in _one_line_error(f)
    assert "not a valid tokenizer.json" in _one_line_error(tmp_path)


def test_load_tokenizer_truncated_saved_file(bpe: Tokenizer, tmp_path: Path) -> None:
    f = tmp_path / "tokenizer.json"
    bpe.save(str(f))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert str(f) in _one_line_error(f)


@pytest.mark.parametrize(
    "vocab, merges",
    [(b"{bad", b""), (b'{"a": 0}', b"a b c d\n"), (b"\xff\xfe", b"")],
    ids=["truncated-vocab", "bad-merges", "binary-vocab"],
)
def test_load_tokenizer_corrupt_gpt2_files(tmp_path: Path, vocab: bytes, merges: bytes) -> None:
    (tmp_path / "vocab.json").write_bytes(vocab)
    (tmp_path / "merges.txt").write_bytes(merges)
    assert "vocab.json" in _one_line_error(tmp_path)


# --------------------------------------------------------------------------- a vocabulary smaller than asked
def _merges(tok: Tokenizer) -> int:
    return len(json.loads(tok.to_str())["model"]["merges"])


def test_bpe_warns_when_the_corpus_gives_far_fewer_tokens_than_asked() -> None:
    """BPE merges only pairs seen twice: a few KB cannot give 4096 tokens. The warning
    names the size reached, 256 bytes + <|endoftext|> + one token per merge learned."""
    with pytest.warns(UserWarning, match="BPE vocabulary") as caught:
        tok = train_bpe_tokenizer([TRAIN_TEXT], vocab_size=4096)
    got = 256 + 1 + _merges(tok)
    assert got == tok.get_vocab_size() < 0.9 * 4096
    said = [str(w.message) for w in caught if "BPE vocabulary" in str(w.message)]
    assert len(said) == 1
    assert said[0].startswith(f"the corpus gave a BPE vocabulary of {got} tokens, not 4096: it is too small")


def test_bpe_warns_below_90_percent_of_the_size_asked() -> None:
    """The corpus tops out at N tokens: asked for ⌊N/0.9⌋ it gives ≥ 90% (quiet), asked
    for one more it gives < 90% (a warning). A size it reaches is quiet too."""
    with pytest.warns(UserWarning):
        n = train_bpe_tokenizer([TRAIN_TEXT], vocab_size=4096).get_vocab_size()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train_bpe_tokenizer([TRAIN_TEXT], vocab_size=n * 10 // 9).get_vocab_size() == n
        assert train_bpe_tokenizer([TRAIN_TEXT], vocab_size=n - 20).get_vocab_size() == n - 20
    with pytest.warns(UserWarning, match=f"vocabulary of {n} tokens, not {n * 10 // 9 + 1}"):
        train_bpe_tokenizer([TRAIN_TEXT], vocab_size=n * 10 // 9 + 1)
