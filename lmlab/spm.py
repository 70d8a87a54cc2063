"""SentencePiece tokenizers of Hugging Face seq2seq folders (T5's ``spiece.model``, Marian's
``source.spm`` + ``target.spm`` + ``vocab.json``), behind ``tokenizers.Tokenizer``'s methods.

Two shapes, each encoding and decoding exactly as ``transformers`` does:

- T5 (``spiece.model``) is *converted* into a real ``tokenizers.Tokenizer``, as transformers'
  ``T5Tokenizer`` builds it: a Unigram model over the pieces and their scores, the model's
  own normalization table (``Precompiled``), Metaspace word splitting, ``</s>`` appended,
  ``<extra_id_N>`` sentinels after the pieces. lmlab keeps one tokenizer type, and ``save``
  writes a ``tokenizer.json`` that transformers reads.
- Marian cannot be converted faithfully: its ids come from ``vocab.json`` (shared by both
  languages), looked up by the *string* of each SentencePiece piece, so a piece that the
  source model calls unknown still gets a real id when the target side knows it. The
  :class:`MarianSpmTokenizer` keeps SentencePiece itself and mirrors ``MarianTokenizer``.

The model file is a protobuf, and ``protobuf`` is no dependency: what the processor API hides
(model type, normalization table, piece types) is read with a small wire-format reader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmlab.errors import LmlabError
from lmlab.tokenizer import load_tokenizer

SPIECE_UNDERLINE = "▁"  # SentencePiece's visible space, U+2581
MARIAN_FILES = ("source.spm", "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json")
T5_CLASSES = {None, "T5Tokenizer", "T5TokenizerFast", "MT5Tokenizer", "MT5TokenizerFast"}
SPECIALS = (("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>"))  # transformers' defaults
UNIGRAM, USER_DEFINED = 1, 4  # TrainerSpec.ModelType and SentencePiece.Type values


# --- reading the files ------------------------------------------------------------------------


def _found(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"


def _require(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise LmlabError(
            f"{what} in {folder} has no {name} (found: {_found(folder)}); "
            "copy it from the model's Hugging Face repository"
        )
    return path


def read_spm(path: Path) -> sentencepiece.SentencePieceProcessor:
    """A SentencePiece model file, or one line saying why it cannot be one."""
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(path.read_bytes())
    except Exception as e:  # sentencepiece raises RuntimeError with a C++ location in it
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise LmlabError(
            f"{path} is not a SentencePiece model (sentencepiece cannot read it: {first}); "
            "download the file again"
        ) from None
    return sp


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmlabError(f"{path} is not valid JSON ({e}); download the file again") from None


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    cfg = _read_json(path) if path.is_file() else {}
    return cfg if isinstance(cfg, dict) else {}


def _content(value: Any) -> str:
    """A token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return str(value["content"]) if isinstance(value, dict) else str(value)


# --- the model proto, read without protobuf ---------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes, keep: set[int]) -> dict[int, list[Any]]:
    """The fields numbered in ``keep`` of one protobuf message: varints as ints, the
    length-delimited ones (strings, bytes, sub-messages) as bytes."""
    out: dict[int, list[Any]] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        else:  # 2: length-delimited; 1, 5: fixed 64 / 32 bits (sentencepiece has checked the file)
            n, i = _varint(buf, i) if wire == 2 else ({1: 8, 5: 4}[wire], i)
            value, i = buf[i : i + n], i + n
        if field in keep:
            out.setdefault(field, []).append(value)
    return out


@dataclass(frozen=True)
class SpmSpec:
    """What the processor API hides: ModelProto.trainer_spec.model_type (field 2.3), the
    normalizer's precompiled_charsmap (field 3.2), and each piece's type (field 1.3)."""

    model_type: int
    charsmap: bytes
    piece_types: list[int]


def read_spec(sp: sentencepiece.SentencePieceProcessor) -> SpmSpec:
    top = _fields(sp.serialized_model_proto(), {1, 2, 3})
    trainer = _fields(top.get(2, [b""])[0], {3})
    normalizer = _fields(top.get(3, [b""])[0], {2})
    types = [_fields(piece, {3}).get(3, [1])[0] for piece in top.get(1, [])]
    return SpmSpec(trainer.get(3, [UNIGRAM])[0], bytes(normalizer.get(2, [b""])[0]), types)


# --- T5: convert into a tokenizers.Tokenizer --------------------------------------------------


def spm_to_t5_tokenizer(
    sp: sentencepiece.SentencePieceProcessor,
    extra_ids: int = 100,
    specials: Sequence[str] = ("</s>", "<unk>", "<pad>"),
    source: str = "spiece.model",
) -> Tokenizer:
    """The ``tokenizers`` pipeline transformers' ``T5Tokenizer`` builds from a spiece.model;
    ``specials`` are eos, unk and pad (added if the model lacks them). One deliberate difference:
    the unknown id is the model's own (transformers hard-codes 2, T5's, which for another model
    would turn unknown text into some other piece)."""
    spec = read_spec(sp)
    if spec.model_type != UNIGRAM:
        raise LmlabError(
            f"{source} is not a unigram SentencePiece model (model type {spec.model_type}); lmlab converts "
            "only unigram ones (T5's): save a tokenizer.json with transformers' AutoTokenizer.save_pretrained"
        )
    n = sp.get_piece_size()
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]  # <extra_id_0> is the last id
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    if spec.charsmap:
        tok.normalizer = normalizers.Precompiled(spec.charsmap)
    # Split on whitespace, then "▁" before every word: SentencePiece's dummy prefix, per word.
    meta: dict[str, Any] = {"replacement": SPIECE_UNDERLINE, "prepend_scheme": "always", "split": True}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**meta)]
    )
    tok.decoder = decoders.Metaspace(**meta)
    # Control pieces (<pad>, </s>) and the unknown piece are special: matched whole in the text,
    # dropped by skip_special_tokens. User-defined pieces are matched whole but kept.
    controls = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    added = dict.fromkeys([*controls, *specials, *sentinels])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in added])
    user = [sp.id_to_piece(i) for i, t in enumerate(spec.piece_types) if t == USER_DEFINED]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    eos = specials[0]
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, tok.token_to_id(eos))]
    )
    return tok


def spm_to_xlmr_tokenizer(
    sp: sentencepiece.SentencePieceProcessor,
    specials: Sequence[str] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
    source: str = "sentencepiece.bpe.model",
) -> Tokenizer:
    """XLM-RoBERTa's tokenizer from its ``sentencepiece.bpe.model`` (a unigram model, despite
    the name), as transformers' ``XLMRobertaTokenizer`` builds it. fairseq's ids: <s> 0,
    <pad> 1, </s> 2, <unk> 3, then SentencePiece's own pieces from its id 3 on (piece i gets
    id i + 1), then <mask>; ``<s> A </s>`` and ``<s> A </s></s> B </s>``."""
    spec = read_spec(sp)
    if spec.model_type != UNIGRAM:
        raise LmlabError(f"{source} is not a unigram SentencePiece model (model type {spec.model_type}); "
                         "save a tokenizer.json with transformers' AutoTokenizer.save_pretrained")  # fmt: skip
    bos, pad, eos, unk, mask = specials
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(3, sp.get_piece_size())]
    vocab = [(bos, 0.0), (pad, 0.0), (eos, 0.0), (unk, 0.0), *pieces, (mask, 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    if spec.charsmap:
        tok.normalizer = normalizers.Precompiled(spec.charsmap)
    meta: dict[str, Any] = {"replacement": SPIECE_UNDERLINE, "prepend_scheme": "always", "split": True}
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**meta)])
    tok.decoder = decoders.Metaspace(**meta)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=[bos, "$A", eos], pair=[bos, "$A", eos, eos, "$B", eos], special_tokens=[(bos, 0), (eos, 2)]
    )
    return tok


def load_spm_tokenizer(path: str | Path) -> Tokenizer:
    """A T5-style folder holding ``spiece.model`` (or the file itself) as a ``tokenizers.Tokenizer``;
    the folder's tokenizer_config.json gives ``extra_ids`` (default 100, as transformers)."""
    p = Path(path)
    folder, model = (p.parent, p) if p.is_file() else (p, p / "spiece.model")
    if not folder.is_dir():
        raise LmlabError(f"tokenizer folder {folder} not found")
    _require(folder, model.name, "the SentencePiece tokenizer")
    cfg = _config(folder)
    cls = cfg.get("tokenizer_class")
    if cls not in T5_CLASSES:
        raise LmlabError(
            f"{folder} holds a {cls}; lmlab reads a spiece.model only for T5 tokenizers (write a tokenizer.json "
            "with transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
        )
    specials = [_content(cfg.get(f"{name}_token") or default) for name, default in SPECIALS]
    return spm_to_t5_tokenizer(read_spm(model), int(cfg.get("extra_ids", 100)), specials, str(model))


# --- Marian: SentencePiece pieces, ids from vocab.json ----------------------------------------


@dataclass(frozen=True)
class SpmEncoding:
    """What ``tokenizers.Encoding`` offers that lmlab uses: ids, their tokens, and for each
    token its (start, end) character span in the text ((0, 0) for an added ``</s>``)."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]


class MarianSpmTokenizer:
    """One side of a Marian tokenizer (the source or the target), with ``tokenizers.Tokenizer``'s
    methods, encoding and decoding as transformers' ``MarianTokenizer``:

    - encode: the text is split around special tokens written in it (``</s>``, ``<unk>``,
      ``<pad>``); a chunk that starts with a language code ``>>xx<<`` keeps it as one token;
      the rest is cut into pieces by this side's .spm, and each piece *string* is looked up in
      this side's vocab (unknown -> ``<unk>``); ``</s>`` is appended.
    - decode (the same on both sides, as in transformers): ids -> pieces through the target
      vocab if the vocabs are separate, else the shared one; pieces -> text with the target
      .spm if separate, else the *source* .spm; ``▁`` -> space; stripped.
    """

    def __init__(
        self,
        encode_sp: sentencepiece.SentencePieceProcessor,
        vocab: dict[str, int],
        decode_sp: sentencepiece.SentencePieceProcessor,
        decode_vocab: dict[str, int],
        specials: dict[str, int],  # eos, unk, pad, then any others: token -> id
        files: dict[str, bytes],
    ) -> None:
        self._sp, self._decode_sp = encode_sp, decode_sp
        self._vocab = {**vocab, **specials}
        self._pieces = {i: p for p, i in decode_vocab.items()} | {i: t for t, i in specials.items()}
        self._special_ids = set(specials.values())
        self._eos, self._unk = list(specials)[:2]
        self.eos_id, self.unk_id = specials[self._eos], vocab.get(self._unk, specials[self._unk])
        self._split = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        self._files = files

    # encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> SpmEncoding:
        ids: list[int] = []
        tokens: list[str] = []
        offsets: list[tuple[int, int]] = []

        def add(token: str, span: tuple[int, int]) -> None:
            known = token in self._vocab
            ids.append(self._vocab[token] if known else self.unk_id)  # this side's <unk>, as transformers
            tokens.append(token if known else self._unk)
            offsets.append(span)

        start = 0
        for m in [*self._split.finditer(text), None]:
            end = m.start() if m else len(text)
            self._encode_chunk(text[start:end], start, add)
            if m:
                add(m.group(), m.span())
                start = m.end()
        if add_special_tokens:
            add(self._eos, (0, 0))
        return SpmEncoding(ids, tokens, offsets)

    def _encode_chunk(self, chunk: str, base: int, add: Any) -> None:
        if chunk.startswith(">>") and (end := chunk.find("<<")) != -1:  # a language code: one token
            add(chunk[: end + 2], (base, base + end + 2))
            chunk, base = chunk[end + 2 :], base + end + 2
        if not chunk:
            return
        out = self._sp.encode(chunk, return_type="offset_mapping")
        for piece, (s, e) in zip(out["pieces"], out["offsets"], strict=True):
            add(piece, (base + s, base + e))

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[SpmEncoding]:
        return [self.encode(t, add_special_tokens) for t in texts]

    encode_batch_fast = encode_batch

    # decoding
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """MarianTokenizer's convert_tokens_to_string: a special token kept in the text is
        written as itself plus a space, never passed to SentencePiece."""
        out, run = "", []
        for i in ids:
            i = int(i)
            if i in self._special_ids:
                if not skip_special_tokens:
                    out += self._decode_sp.decode_pieces(run) + self._pieces[i] + " "
                    run = []
                continue
            run.append(self._piece(i))
        out += self._decode_sp.decode_pieces(run)
        return out.replace(SPIECE_UNDERLINE, " ").strip()

    def _piece(self, i: int) -> str:
        if i in self._pieces:
            return self._pieces[i]
        # transformers falls back to the .spm's own numbering for ids the vocab lacks
        return self._decode_sp.id_to_piece(i) if 0 <= i < self._decode_sp.get_piece_size() else self._unk

    def decode_batch(self, batch: Iterable[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # vocabulary
    def id_to_token(self, i: int) -> str | None:
        return self._pieces.get(i)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return dict(self._vocab)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        """Ids run from 0 to this minus one (the model's embedding size)."""
        return max(self._vocab.values()) + 1

    # saving
    def save_pretrained(self, folder: str | Path) -> None:
        """The Marian files as they were read, so transformers' MarianTokenizer loads the folder."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (out / name).write_bytes(data)

    def save(self, path: str | Path, pretty: bool = True) -> None:
        """``Tokenizer.save``'s signature for callers that write ``folder/tokenizer.json``: a
        Marian tokenizer is no tokenizer.json, so its files go into that folder instead."""
        p = Path(path)
        self.save_pretrained(p.parent if p.suffix == ".json" else p)


def load_marian_tokenizers(folder: str | Path) -> tuple[MarianSpmTokenizer, MarianSpmTokenizer]:
    """(source, target) tokenizers of a Marian folder: source.spm, target.spm, vocab.json, and
    target_vocab.json when tokenizer_config.json says ``separate_vocabs``."""
    d = Path(folder)
    cfg = _config(d)
    separate = bool(cfg.get("separate_vocabs", False))
    names = ["source.spm", "target.spm", "vocab.json", *(["target_vocab.json"] if separate else [])]
    paths = {n: _require(d, n, "the Marian tokenizer") for n in names}
    src_sp, tgt_sp = read_spm(paths["source.spm"]), read_spm(paths["target.spm"])
    src_vocab = _read_vocab(paths["vocab.json"])
    tgt_vocab = _read_vocab(paths["target_vocab.json"]) if separate else src_vocab
    eos, unk, pad = (_content(cfg.get(f"{name}_token") or default) for name, default in SPECIALS)
    if unk not in src_vocab:
        raise LmlabError(f"{paths['vocab.json']} has no {unk} token; download the file again")
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    specials: dict[str, int] = {}
    for t in dict.fromkeys([eos, unk, pad, *map(_content, extra)]):  # one the vocab lacks is added after it
        specials[t] = src_vocab.get(t, max([*src_vocab.values(), *specials.values()]) + 1)
    files = {n: (d / n).read_bytes() for n in MARIAN_FILES if (d / n).is_file()}
    decode_sp = tgt_sp if separate else src_sp
    src = MarianSpmTokenizer(src_sp, src_vocab, decode_sp, tgt_vocab, specials, files)
    tgt = MarianSpmTokenizer(tgt_sp, tgt_vocab, decode_sp, tgt_vocab, specials, files)
    return src, tgt


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise LmlabError(f"{path} is not a piece -> id map (a JSON object of integers); download it again")
    return vocab


# --- one entry point for seq2seq folders ------------------------------------------------------

AnyTokenizer = Tokenizer | MarianSpmTokenizer


def load_seq2seq_tokenizers(folder: str | Path) -> tuple[AnyTokenizer, AnyTokenizer]:
    """(source, target) tokenizers of a Hugging Face seq2seq folder: Marian's two .spm files
    give two; a tokenizer.json or T5's spiece.model give one tokenizer, returned twice."""
    d = Path(folder)
    if not d.is_dir():
        raise LmlabError(f"model folder {folder} not found (expected a folder with the tokenizer's files)")
    if (d / "source.spm").is_file() or (d / "target.spm").is_file():
        return load_marian_tokenizers(d)
    if (d / "tokenizer.json").is_file():
        tok = load_tokenizer(d)
        return tok, tok
    if (d / "spiece.model").is_file():
        tok = load_spm_tokenizer(d)
        return tok, tok
    raise LmlabError(
        f"no tokenizer in {d} (found: {_found(d)}); expected tokenizer.json, spiece.model (T5), "
        "or source.spm + target.spm + vocab.json (Marian): copy them from the model's repository"
    )
