"""Hugging Face encoders with a task head, as settings of lmlab's one :class:`Encoder`.

    BERT         token + position + token-type embeddings, a LayerNorm, post-norm layers,
                 GELU; classifier on tanh(dense([CLS])) (the pooler)
    DistilBERT   no token types; classifier on ReLU(pre_classifier([CLS]))
    RoBERTa      BERT's layers; positions start at padding_idx + 1 (rows 0, 1 unused);
    XLM-R        classifier.dense + tanh, then classifier.out_proj

``...ForSequenceClassification`` becomes a ``classify`` head, ``...ForQuestionAnswering`` a
``span`` head (``qa_outputs``: a start and an end score per token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lmlab.errors import LmlabError
from lmlab.hf.base import Family, Rule, act_in, need
from lmlab.hf.seq2seq import linear_rules, norm_rules
from lmlab.models.task_config import EncoderConfig, TaskConfig

TASK_SUFFIXES = {"ForSequenceClassification": "classify", "ForQuestionAnswering": "span"}


def task_of(d: dict[str, Any], model_type: str) -> str:
    """classify | span from config.json's ``architectures``, or a one-line refusal."""
    archs = d.get("architectures") or []
    for arch in archs:
        for suffix, task in TASK_SUFFIXES.items():
            if str(arch).endswith(suffix):
                return task
    got = ", ".join(map(str, archs)) or "none"
    raise LmlabError(
        f"this {model_type} checkpoint is a {got}; lmlab runs {model_type} models with a task head: "
        "...ForSequenceClassification (lmlab classify) or ...ForQuestionAnswering (lmlab qa)"
    )


def labels_of(d: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """(num_labels, id2label) as transformers reads them: id2label wins, else num_labels (2)."""
    raw = d.get("id2label")
    if isinstance(raw, dict) and raw:
        try:
            ids = {str(int(k)): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise LmlabError(f"id2label must map label ids to names (got keys {list(raw)[:3]})") from None
        return len(ids), ids
    n = int(d.get("num_labels", 2))
    return n, {str(i): f"LABEL_{i}" for i in range(n)}


class EncoderFamily(Family):
    """A Hugging Face encoder family; ``to_lmlab`` gives a :class:`TaskConfig`."""

    base = ""  # where the encoder's tensors live ("bert.")
    head_activation = "tanh"
    is_encoder = True
    ignore = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")

    def body_config(self, d: dict[str, Any]) -> EncoderConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_rules(self, i: int, d: int) -> list[Rule]:  # pragma: no cover - abstract
        raise NotImplementedError

    def head_rules(self, cfg: TaskConfig) -> list[Rule]:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_lmlab(self, d: dict[str, Any]) -> TaskConfig:
        task = task_of(d, self.model_type)
        body = self.body_config(d)
        if task == "span":
            return TaskConfig(body=body, head="span", num_labels=2, head_hidden=False, id2label=None)
        n, id2label = labels_of(d)
        problem = d.get("problem_type") or None
        return TaskConfig(
            body=body, head="classify", num_labels=n, pooling="first", head_hidden=True,
            head_activation=self.head_activation, problem_type=problem, id2label=id2label,
        )  # fmt: skip

    def embedding_rules(self, cfg: EncoderConfig) -> list[Rule]:
        e = self.base + "embeddings."
        r = [Rule("body.tok_emb.weight", (e + "word_embeddings.weight",)),
             Rule("body.pos_emb.weight", (e + "position_embeddings.weight",))]  # fmt: skip
        if cfg.type_vocab_size:
            r.append(Rule("body.type_emb.weight", (e + "token_type_embeddings.weight",)))
        return r + norm_rules("body.emb_norm", e + "LayerNorm", True)

    def rules(self, cfg: TaskConfig) -> list[Rule]:
        body = cfg.body
        r = self.embedding_rules(body)
        for i in range(body.n_layer):
            r += self.layer_rules(i, body.d_model)
        return r + self.head_rules(cfg)


class Bert(EncoderFamily):
    model_type = "bert"
    display = "BERT"
    base = "bert."

    def body_config(self, d: dict[str, Any]) -> EncoderConfig:
        mt = self.model_type
        need(d.get("position_embedding_type", "absolute") == "absolute",
             f"{mt} checkpoint uses position_embedding_type={d.get('position_embedding_type')!r}; "
             "lmlab implements absolute positions only")  # fmt: skip
        need(not d.get("is_decoder", False), f"{mt} checkpoint is a decoder (is_decoder); not supported")
        offset = self.pos_offset(d)
        return EncoderConfig(
            vocab_size=int(d["vocab_size"]), n_layer=int(d.get("num_hidden_layers", 12)),
            n_head=int(d.get("num_attention_heads", 12)), d_model=int(d.get("hidden_size", 768)),
            d_ff=int(d.get("intermediate_size", 3072)),
            max_seq_len=int(d.get("max_position_embeddings", 512)) - offset, pos="learned", pos_offset=offset,
            type_vocab_size=int(d.get("type_vocab_size", 2)), norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            activation=act_in(mt, d.get("hidden_act", "gelu")), dropout=0.0,
        )  # fmt: skip

    def pos_offset(self, d: dict[str, Any]) -> int:
        return 0

    def layer_rules(self, i: int, d: int) -> list[Rule]:
        p, q = f"{self.base}encoder.layer.{i}.", f"body.layers.{i}."
        a = p + "attention."
        return (
            linear_rules(q + "attn.qkv", tuple(a + f"self.{x}" for x in ("query", "key", "value")), True, (d, d, d))
            + linear_rules(q + "attn.proj", a + "output.dense", True)
            + norm_rules(q + "norm1", a + "output.LayerNorm", True)
            + linear_rules(q + "mlp.up", p + "intermediate.dense", True)
            + linear_rules(q + "mlp.down", p + "output.dense", True)
            + norm_rules(q + "norm2", p + "output.LayerNorm", True)
        )

    def head_rules(self, cfg: TaskConfig) -> list[Rule]:
        if cfg.head == "span":
            return linear_rules("out", "qa_outputs", True)
        return linear_rules("dense", self.base + "pooler.dense", True) + linear_rules("out", "classifier", True)


class Roberta(Bert):
    """RoBERTa (and XLM-R, the same code): position ids count from padding_idx + 1."""

    model_type = "roberta"
    display = "RoBERTa"
    base = "roberta."

    def pos_offset(self, d: dict[str, Any]) -> int:
        return int(d.get("pad_token_id", 1)) + 1

    def head_rules(self, cfg: TaskConfig) -> list[Rule]:
        if cfg.head == "span":
            return linear_rules("out", "qa_outputs", True)
        return linear_rules("dense", "classifier.dense", True) + linear_rules("out", "classifier.out_proj", True)


class XLMRoberta(Roberta):
    model_type = "xlm-roberta"
    display = "XLM-RoBERTa"


class DistilBert(EncoderFamily):
    model_type = "distilbert"
    display = "DistilBERT"
    base = "distilbert."
    head_activation = "relu"

    def body_config(self, d: dict[str, Any]) -> EncoderConfig:
        mt = self.model_type
        return EncoderConfig(
            vocab_size=int(d["vocab_size"]), n_layer=int(d.get("n_layers", 6)), n_head=int(d.get("n_heads", 12)),
            d_model=int(d.get("dim", 768)), d_ff=int(d.get("hidden_dim", 3072)),
            max_seq_len=int(d.get("max_position_embeddings", 512)), pos="learned", type_vocab_size=0,
            norm_eps=1e-12, activation=act_in(mt, d.get("activation", "gelu")), dropout=0.0,
        )  # fmt: skip

    def layer_rules(self, i: int, d: int) -> list[Rule]:
        p, q = f"{self.base}transformer.layer.{i}.", f"body.layers.{i}."
        a = p + "attention."
        return (
            linear_rules(q + "attn.qkv", tuple(a + f"{x}_lin" for x in "qkv"), True, (d, d, d))
            + linear_rules(q + "attn.proj", a + "out_lin", True)
            + norm_rules(q + "norm1", p + "sa_layer_norm", True)
            + linear_rules(q + "mlp.up", p + "ffn.lin1", True)
            + linear_rules(q + "mlp.down", p + "ffn.lin2", True)
            + norm_rules(q + "norm2", p + "output_layer_norm", True)
        )

    def head_rules(self, cfg: TaskConfig) -> list[Rule]:
        if cfg.head == "span":
            return linear_rules("out", "qa_outputs", True)
        return linear_rules("dense", "pre_classifier", True) + linear_rules("out", "classifier", True)


ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    f.model_type: f for f in (Bert(), DistilBert(), Roberta(), XLMRoberta())
}


# --------------------------------------------------------------------------- tokenizers
def load_encoder_tokenizer(folder: Path, family: EncoderFamily) -> Tokenizer:
    """The folder's ``tokenizer.json`` (with its post-processor: [CLS] A [SEP] B [SEP], or
    <s> A </s></s> B </s>), or one converted from BERT's ``vocab.txt`` (WordPiece) or RoBERTa's
    ``vocab.json`` + ``merges.txt`` (byte-level BPE), or XLM-R's ``sentencepiece.bpe.model``. Truncation and padding stored in the file
    are switched off: the pipelines decide both."""
    from lmlab.tokenizer import load_tokenizer

    if (folder / "tokenizer.json").is_file():
        tok = load_tokenizer(folder / "tokenizer.json")
    elif (folder / "vocab.txt").is_file():
        tok = _wordpiece(folder)
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = _roberta_bpe(folder)
    elif (folder / "sentencepiece.bpe.model").is_file():  # XLM-RoBERTa's
        from lmlab.spm import read_spm, spm_to_xlmr_tokenizer

        tc = _tokenizer_config(folder)
        names = [_token_text(tc.get(f"{k}_token") or d) for k, d in
                 (("bos", "<s>"), ("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"), ("mask", "<mask>"))]  # fmt: skip
        path = folder / "sentencepiece.bpe.model"
        tok = spm_to_xlmr_tokenizer(read_spm(path), names, str(path))
    else:
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        raise LmlabError(
            f"{folder} has no tokenizer lmlab can read for {family.display} (found: {', '.join(found)}); "
            "it needs tokenizer.json, vocab.txt (WordPiece), vocab.json + merges.txt (BPE) or "
            "sentencepiece.bpe.model (XLM-R): save the "
            "tokenizer with transformers' save_pretrained to write tokenizer.json"
        )
    tok.no_truncation()
    tok.no_padding()
    return tok


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    f = folder / "tokenizer_config.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, ValueError) as e:
        raise LmlabError(f"{f} is not valid JSON ({e}); fix or re-download it") from None


def _token_text(value: Any) -> str:
    """A token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return str(value["content"]) if isinstance(value, dict) else str(value)


def _wordpiece(folder: Path) -> Tokenizer:
    """BERT's WordPiece from vocab.txt, as transformers' BertTokenizerFast builds it."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    tc = _tokenizer_config(folder)
    try:
        vocab = models.WordPiece.read_file(str(folder / "vocab.txt"))
    except Exception as e:  # the Rust side raises plain Exceptions
        raise LmlabError(f"{folder}/vocab.txt is not a WordPiece vocabulary ({str(e).splitlines()[0]})") from None
    cls, sep, unk = tc.get("cls_token", "[CLS]"), tc.get("sep_token", "[SEP]"), tc.get("unk_token", "[UNK]")
    for t in (cls, sep, unk):
        if t not in vocab:
            raise LmlabError(f"{folder}/vocab.txt has no {t} token; it is not a BERT vocabulary")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(tc.get("tokenize_chinese_chars", True)),
        strip_accents=tc.get("strip_accents"), lowercase=bool(tc.get("do_lower_case", True)),
    )  # fmt: skip
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )  # fmt: skip
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [t for t in (tc.get("pad_token", "[PAD]"), unk, cls, sep, tc.get("mask_token", "[MASK]")) if t in vocab]
    tok.add_special_tokens(specials)
    return tok


def _roberta_bpe(folder: Path) -> Tokenizer:
    """RoBERTa's byte-level BPE from vocab.json + merges.txt, with <s> A </s></s> B </s>."""
    from tokenizers import decoders, models, pre_tokenizers, processors

    tc = _tokenizer_config(folder)
    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except Exception as e:  # the Rust side raises plain Exceptions; json errors too
        raise LmlabError(f"{folder}/vocab.json + merges.txt are not a BPE tokenizer ({str(e).splitlines()[0]})") from None
    bos, eos = tc.get("cls_token", "<s>"), tc.get("sep_token", "</s>")
    for t in (bos, eos):
        if t not in vocab:
            raise LmlabError(f"{folder}/vocab.json has no {t} token; it is not a RoBERTa vocabulary")
    tok = Tokenizer(bpe)
    prefix = bool(tc.get("add_prefix_space", False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=bool(tc.get("trim_offsets", True)), add_prefix_space=prefix
    )
    tok.add_special_tokens([t for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>") if t in vocab])
    return tok


__all__ = ["ENCODER_FAMILIES", "EncoderFamily", "labels_of", "load_encoder_tokenizer", "task_of"]
