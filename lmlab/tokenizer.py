"""Tokenizers: character-level and byte-level BPE, both as a ``tokenizers.Tokenizer``.

Whatever its kind, a tokenizer is saved as one ``tokenizer.json`` that Hugging Face's
``tokenizers`` and ``transformers`` load as they are, so a checkpoint stays usable
outside lmlab.

- char: one token per Unicode code point of the training text, plus ``<unk>`` for
  characters never seen. Round-trips any text over its alphabet exactly.
- bpe: byte-level BPE (GPT-2's scheme): text -> UTF-8 bytes -> merges learned from
  the corpus. Every string round-trips exactly, Chinese and emoji included, because
  the 256 byte symbols are always in the vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import LmlabError
from lmlab.messages import say, warn

EOT = "<|endoftext|>"  # separates documents; the end-of-sequence token of our models
UNK = "<unk>"


def train_char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """A vocabulary of every distinct character, sorted by code point (deterministic)."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    chars.discard("")
    specials = [EOT, UNK]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(chars):
        if ch not in vocab:
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Each code point is its own "word": split on any single character.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join tokens with nothing between them
    tok.add_special_tokens(specials)
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Byte-level BPE trained with Hugging Face ``tokenizers`` (GPT-2's pre-tokenizer)."""
    if vocab_size < 257 + 1:
        raise LmlabError(
            f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs the 256 byte "
            "symbols plus the special token (use at least 258; 4096 is a good start)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _warn_short_vocab(tok.get_vocab_size(), vocab_size)
    return tok


#: A trained BPE vocabulary below this fraction of the size asked for is worth a warning.
SHORT_VOCAB_FRACTION = 0.9


def _warn_short_vocab(got: int, asked: int) -> None:
    """BPE stops merging when no pair of symbols occurs twice more (``min_frequency=2``):
    a small corpus runs out of merges long before a large --vocab-size, silently."""
    if got < SHORT_VOCAB_FRACTION * asked:
        warn(
            f"the corpus gave a BPE vocabulary of {got} tokens, not {asked}: it is too small for more "
            "merges (a merge needs a pair of symbols seen at least twice); more text gives more tokens"
        )


#: BPE merges are learned from at most this many characters of a corpus: a sample this big
#: gives the same merges to within the rare ones, and tokenizer training stays bounded in
#: time and memory (SentencePiece samples its input the same way).
BPE_SAMPLE_CHARS = 200_000_000


def train_tokenizer(kind: str, chunks: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """A ``char`` or ``bpe`` tokenizer trained on a corpus given as text chunks (streamed:
    the corpus is never whole in memory). End-of-text markers between files are not text:
    the char tokenizer skips them, BPE sees a line break there."""
    if kind == "char":
        return train_char_tokenizer(c.replace(EOT, "") for c in chunks)
    if kind != "bpe":
        raise LmlabError(f"unknown tokenizer kind {kind!r} (use char or bpe)")

    def sample() -> Iterator[str]:
        seen = 0
        for c in chunks:
            yield c.replace(EOT, "\n")
            seen += len(c)
            if seen >= BPE_SAMPLE_CHARS:
                say(f"lmlab: BPE merges learned from the first {seen / 1e6:,.0f}M characters of the corpus")
                return

    return train_bpe_tokenizer(sample(), vocab_size)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or a directory holding one (a checkpoint or HF model).

    Padding and truncation saved in the file are switched off: lmlab pads its batches itself
    (with masks) and cuts long inputs with a warning, where the file's settings would put pad
    ids into a training stream and cut every text silently to their length."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _gpt2_files_tokenizer(p)
        else:
            raise LmlabError(
                f"no tokenizer.json in {path} (a tokenizer is a tokenizer.json file, or a "
                "directory holding one, or GPT-2's vocab.json + merges.txt)"
            )
    if not p.is_file():
        raise LmlabError(f"tokenizer {path} not found (expected a tokenizer.json file or a directory)")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises plain Exceptions
        raise LmlabError(f"{p} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def _gpt2_files_tokenizer(d: Path) -> Tokenizer:
    try:
        tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    except Exception as e:  # the Rust side raises plain Exceptions; json/UTF-8 errors too
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise LmlabError(
            f"{d}/vocab.json + merges.txt are not a valid GPT-2 BPE tokenizer ({first}); "
            "fix or replace these files"
        ) from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if EOT in vocab:
        tok.add_special_tokens([EOT])
    return tok


def tokenizer_kind(tok: Tokenizer) -> str:
    """'char', 'bpe', or the model type of a foreign tokenizer (for ``lmlab info``)."""
    if not hasattr(tok, "to_str"):  # not a tokenizers.Tokenizer: Marian's SentencePiece pair
        return getattr(tok, "kind", "sentencepiece")
    d = json.loads(tok.to_str())
    model = d.get("model", {}).get("type", "?")
    pre = json.dumps(d.get("pre_tokenizer"))
    if model == "WordLevel" and "[\\\\s\\\\S]" in pre:
        return "char"
    if model == "BPE" and "ByteLevel" in pre:
        return "bpe (byte-level)"
    return model


def eos_token_id(tok: Tokenizer) -> int | None:
    """The end-of-text token if the tokenizer has a known one."""
    for name in (EOT, "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def truncating(tok: Tokenizer, max_length: int | None = None, stride: int = 0, strategy: str = "longest_first") -> Tokenizer:
    """A copy of ``tok`` without padding that cuts to ``max_length`` tokens (None: never) by the
    tokenizers library's own truncation, which keeps a template's special tokens; the
    tokenizer a model was saved with keeps its own settings."""
    t = Tokenizer.from_str(tok.to_str())
    t.no_padding()
    if max_length:
        t.enable_truncation(max_length, stride=stride, strategy=strategy)
    else:
        t.no_truncation()
    return t


def template_token_ids(tok: Tokenizer) -> set[int]:
    """The ids a post-processor puts around a text ([CLS] … [SEP], <s> … </s>): special by
    position even when the vocabulary holds them as plain entries, not registered tokens."""
    found: set[int] = set()

    def walk(pp: object) -> None:
        if not isinstance(pp, dict):
            return
        for sub in pp.get("processors") or []:  # a Sequence of processors
            walk(sub)
        for spec in (pp.get("special_tokens") or {}).values():  # TemplateProcessing
            found.update(i for i in spec.get("ids", []) if isinstance(i, int))
        for key in ("cls", "sep"):  # BertProcessing, RobertaProcessing: [token, id]
            pair = pp.get(key)
            if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int):
                found.add(pair[1])

    walk(json.loads(tok.to_str()).get("post_processor"))
    return found


def unk_token_id(tok: Tokenizer) -> int | None:
    """The unknown token as the tokenizer's model names it (WordPiece, BPE, WordLevel:
    ``unk_token``; Unigram: ``unk_id``), else one of the usual names; None if it has none
    (a byte-level BPE reads every byte and needs none)."""
    model = json.loads(tok.to_str()).get("model", {})
    if model.get("type") == "Unigram" and isinstance(model.get("unk_id"), int):
        return model["unk_id"]
    for name in (model.get("unk_token"), UNK, "[UNK]"):
        i = tok.token_to_id(name) if isinstance(name, str) else None
        if i is not None:
            return i
    return None


class UnknownCharWarner:
    """Warns once when text contains characters a char tokenizer never saw."""

    def __init__(self, tok: Tokenizer) -> None:
        self.unk = tok.token_to_id(UNK) if tokenizer_kind(tok) == "char" else None
        self.warned = False

    def check(self, ids: list[int], text: str) -> None:
        if self.unk is None or self.warned or self.unk not in ids:
            return
        self.warned = True
        msg = (
            f"the text contains characters the tokenizer never saw; they become {UNK} "
            "(train the tokenizer on text that includes them)"
        )
        warn(msg)  # attributed to the caller's line, not lmlab's
