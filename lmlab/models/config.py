"""Model configurations: dataclasses that round-trip through ``config.json``.

One :class:`TransformerConfig` spans the GPT-2 and Llama families (litgpt's habit):
every difference between them is a field, never a second model file. Field names
follow Hugging Face where one exists (``n_kv_head`` ~ ``num_key_value_heads``,
``rope_theta``, ``max_seq_len`` ~ ``max_position_embeddings``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError
from lmlab.models.limits import MAX_FIELD, check_field_types

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "POSITIONS",
    "RECURRENT",
    "ModelConfig",
    "RNNConfig",
    "RNNSeq2SeqConfig",
    "Seq2SeqConfig",
    "TransformerConfig",
    "config_from_dict",
    "config_to_dict",
    "head_dim_of",
    "register_config",
]

POSITIONS = ("sinusoidal", "learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "gelu_new", "silu", "relu")
RECURRENT = ("rnn", "gru", "lstm")


def head_dim_of(d_model: int, n_head: int) -> int:
    """d_model split evenly over the heads (the default head size of both Transformers)."""
    if n_head <= 0 or d_model % n_head:
        raise LmlabError(
            f"d_model={d_model} is not divisible by n_head={n_head}; choose --d-model as a multiple of --n-head"
        )
    return d_model // n_head


@dataclass
class TransformerConfig:
    """A decoder-only Transformer (GPT-2, Llama, Qwen2, ... by setting fields)."""

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (multi-head); 1 = multi-query
    d_model: int = 128
    head_dim: int | None = None  # None = d_model // n_head
    d_ff: int | None = None  # None = 4*d_model (plain MLP) or ~8/3*d_model (gated)
    max_seq_len: int = 256
    pos: str = "rope"  # sinusoidal | learned | rope
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # None = head_dim (partial rotary as in GPT-NeoX)
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm bias (GPT-2 has one)
    activation: str = "silu"  # gelu | gelu_tanh | gelu_new (tanh, unfused: GPT-2) | silu | relu
    gated_mlp: bool = True  # SwiGLU/GeGLU: down(act(gate(x)) * up(x))
    qkv_bias: bool = False
    proj_bias: bool = False  # attention output projection
    mlp_bias: bool = False
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX)
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(d_model)
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    model_type: str = field(default="transformer", init=False)

    def __post_init__(self) -> None:
        check_field_types(type(self), _values(self))  # types, signs, sizes: before any arithmetic
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = head_dim_of(self.d_model, self.n_head)
        if self.d_ff is None:
            if self.gated_mlp:  # keep parameters ~ equal to a 4x plain MLP, rounded to 8
                self.d_ff = int(8 * self.d_model / 3 + 7) // 8 * 8
            else:
                self.d_ff = 4 * self.d_model
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LmlabError(msg)

        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be positive (got {getattr(self, name)})")
        need(
            0 < self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0,
            f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
            "(grouped-query attention shares each key/value head among n_head/n_kv_head heads)",
        )
        need(self.pos in POSITIONS, f"pos must be one of {', '.join(POSITIONS)} (got {self.pos!r})")
        need(self.norm in NORMS, f"norm must be one of {', '.join(NORMS)} (got {self.norm!r})")
        need(
            self.activation in ACTIVATIONS,
            f"activation must be one of {', '.join(ACTIVATIONS)} (got {self.activation!r})",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) (got {self.dropout})")
        need(self.norm_eps > 0, f"norm_eps must be positive (got {self.norm_eps})")
        need(self.rope_theta > 0, f"rope_theta must be positive (got {self.rope_theta})")
        need(
            self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
            f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}",
        )
        need(
            self.pos != "sinusoidal" or self.d_model % 2 == 0,
            "sinusoidal positions need an even d_model",
        )

    @property
    def n_params_hint(self) -> str:
        return f"{self.n_layer}L/{self.n_head}H/{self.d_model}d"


@dataclass
class RNNConfig:
    """A recurrent language model (Elman RNN, GRU or LSTM) over token embeddings."""

    cell: str = "lstm"  # rnn | gru | lstm
    vocab_size: int = 256
    d_model: int = 128  # embedding size
    hidden_size: int = 512
    n_layer: int = 2
    dropout: float = 0.0
    tie_embeddings: bool = False
    max_seq_len: int = 128  # the BPTT window used in training; generation is unbounded
    # read each text both ways, hidden_size units per direction (a BiLSTM): the body of a
    # task head only — it sees the future, so it has no next-token head and cannot generate
    bidirectional: bool = False
    # > 0: add a hashed embedding of each pair of adjacent tokens (see RNNLanguageModel._embed);
    # a classifier's bidirectional body only (a generating model would need the previous token)
    bigram_buckets: int = 0
    model_type: str = field(default="rnn", init=False)

    def __post_init__(self) -> None:
        check_field_types(type(self), _values(self))
        if self.cell not in RECURRENT:
            raise LmlabError(f"cell must be one of {', '.join(RECURRENT)} (got {self.cell!r})")
        for name in ("vocab_size", "d_model", "hidden_size", "n_layer", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise LmlabError(f"{name} must be positive (got {getattr(self, name)})")
        if not 0.0 <= self.dropout < 1.0:
            raise LmlabError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.bigram_buckets > MAX_FIELD:
            raise LmlabError(f"bigram_buckets = {self.bigram_buckets} is out of range (0 to {MAX_FIELD:,})")
        if self.bigram_buckets < 0 or (self.bigram_buckets and not self.bidirectional):
            raise LmlabError(f"bigram_buckets must be 0, or positive for a bidirectional body (got {self.bigram_buckets}"
                             f"{'' if self.bidirectional else ', one-way'}): a classifier's --bidirectional body reads them")  # fmt: skip

    @property
    def n_params_hint(self) -> str:
        bi = "bidirectional " if self.bidirectional else ""
        bi += f"bigram-embedding ({self.bigram_buckets} buckets) " if self.bigram_buckets else ""
        return f"{bi}{self.cell.upper()} {self.n_layer}x{self.hidden_size} (embedding {self.d_model})"


SEQ2SEQ_POSITIONS = ("sinusoidal", "learned", "relative")


class TargetSide:
    """What the decoding loop reads of an encoder-decoder's config (both kinds share it)."""

    target_vocab_size: int | None
    vocab_size: int
    max_target_len: int

    @property
    def tgt_vocab_size(self) -> int:
        """The target vocabulary: the width of the logits."""
        return self.target_vocab_size or self.vocab_size

    @property
    def max_seq_len(self) -> int:
        """What the decoding loop calls the context: the target's length."""
        return self.max_target_len


@dataclass
class Seq2SeqConfig(TargetSide):
    """The encoder-decoder Transformer (Vaswani et al. 2017) and, by setting fields, Marian
    (opus-mt), BART and T5: every difference between them is a field, as for the decoder-only
    :class:`TransformerConfig`. Lengths are in tokens; ``n_layer`` sizes both stacks unless
    ``n_decoder_layer`` is given.
    """

    vocab_size: int = 256  # the source vocabulary (and the target's when shared)
    target_vocab_size: int | None = None  # None: one vocabulary for both sides
    n_layer: int = 3  # encoder layers (and decoder layers unless n_decoder_layer)
    n_decoder_layer: int | None = None
    n_head: int = 4
    d_model: int = 256
    head_dim: int | None = None  # None = d_model // n_head (T5 sets d_kv)
    d_ff: int | None = None  # None = 4·d_model
    max_source_len: int = 256
    max_target_len: int = 256
    pos: str = "sinusoidal"  # sinusoidal | learned | relative (T5's bucketed bias)
    sinusoidal_layout: str = "interleaved"  # interleaved (the paper) | halves (Marian: sin | cos)
    pos_offset: int = 0  # BART's learned positions start at row 2
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_bias: bool = True
    prenorm: bool = True  # x + f(Norm(x)); False: the paper's Norm(x + f(x)) (Marian, BART)
    final_norm: bool | None = None  # a norm after each stack; None = prenorm
    embed_norm: bool = False  # a norm right after the embeddings (BART's layernorm_embedding)
    scale_embedding: bool = True  # embeddings × √d_model (the paper, Marian)
    activation: str = "gelu"  # gelu | gelu_tanh | gelu_new | silu | relu
    gated_mlp: bool = False  # T5 v1.1: down(act(gate x) ⊙ up x)
    attn_bias: bool = True  # biases in q, k, v and the output projection
    mlp_bias: bool = True
    attn_scale: bool = True  # scores / √d_k; False: T5 (no scaling)
    share_embeddings: bool = True  # one embedding for source and target (needs one vocabulary)
    tie_embeddings: bool = True  # output layer = target embedding
    logits_bias: bool = False  # a bias on the logits (Marian and BART's final_logits_bias)
    head_scale: float = 1.0  # the decoder output × this before the output layer (tied T5: d^-0.5)
    dropout: float = 0.1
    init_std: float = 0.02
    model_type: str = field(default="seq2seq", init=False)

    def __post_init__(self) -> None:
        check_field_types(type(self), _values(self))
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.head_dim is None:
            self.head_dim = head_dim_of(self.d_model, self.n_head)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.final_norm is None:
            self.final_norm = self.prenorm
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LmlabError(msg)

        for name in ("vocab_size", "n_layer", "n_decoder_layer", "n_head", "d_model", "head_dim", "d_ff",
                     "max_source_len", "max_target_len"):
            need(getattr(self, name) > 0, f"{name} must be positive (got {getattr(self, name)})")
        need(self.target_vocab_size is None or self.target_vocab_size > 0,
             f"target_vocab_size must be positive (got {self.target_vocab_size})")
        need(self.pos in SEQ2SEQ_POSITIONS, f"pos must be one of {', '.join(SEQ2SEQ_POSITIONS)} (got {self.pos!r})")
        need(self.sinusoidal_layout in ("interleaved", "halves"),
             f"sinusoidal_layout must be interleaved or halves (got {self.sinusoidal_layout!r})")
        need(self.norm in NORMS, f"norm must be one of {', '.join(NORMS)} (got {self.norm!r})")
        need(self.activation in ACTIVATIONS,
             f"activation must be one of {', '.join(ACTIVATIONS)} (got {self.activation!r})")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) (got {self.dropout})")
        need(self.norm_eps > 0, f"norm_eps must be positive (got {self.norm_eps})")
        need(self.pos_offset >= 0, f"pos_offset must be >= 0 (got {self.pos_offset})")
        need(self.pos != "sinusoidal" or self.d_model % 2 == 0, "sinusoidal positions need an even d_model")
        need(self.pos != "relative" or (self.relative_buckets >= 4 and self.relative_max_distance > 1),
             "relative positions need relative_buckets >= 4 and relative_max_distance > 1")
        need(not self.share_embeddings or self.target_vocab_size in (None, self.vocab_size),
             f"shared embeddings need one vocabulary (vocab_size={self.vocab_size}, "
             f"target_vocab_size={self.target_vocab_size}); set share_embeddings false")

    @property
    def n_params_hint(self) -> str:
        return f"{self.n_layer}+{self.n_decoder_layer}L/{self.n_head}H/{self.d_model}d"


ATTENTION_SCORES = ("additive", "dot", "general")


@dataclass
class RNNSeq2SeqConfig(TargetSide):
    """The RNN encoder-decoder with attention (Bahdanau et al. 2015; Luong et al. 2015):
    a bidirectional GRU/LSTM reads the source, a GRU/LSTM decoder attends over its states.
    ``attention`` picks the paper: additive = Bahdanau (the previous state queries, the
    context enters the cell), dot | general = Luong (the new state queries, input feeding).
    """

    cell: str = "gru"  # rnn | gru | lstm
    vocab_size: int = 256  # the source vocabulary (and the target's when shared)
    target_vocab_size: int | None = None  # None: one vocabulary for both sides
    d_model: int = 128  # embeddings, and the readout before the output layer (so it can be tied)
    hidden_size: int = 256  # the decoder's state and each encoder state (both directions together)
    n_layer: int = 2  # recurrent layers of the encoder and of the decoder
    attention: str = "additive"  # additive (Bahdanau) | dot | general (Luong)
    attention_size: int | None = None  # the additive score's hidden layer; None = hidden_size
    bidirectional: bool = True  # the encoder reads the source both ways (hidden_size/2 each)
    dropout: float = 0.1
    share_embeddings: bool = True  # one embedding for source and target (needs one vocabulary)
    tie_embeddings: bool = True  # output layer = target embedding
    max_source_len: int = 256  # the longest source the pipelines pass (the encoder reads any length)
    max_target_len: int = 256  # the most target tokens the decoder produces
    init_std: float = 0.1  # embeddings and attention/readout weights ~ N(0, init_std)
    model_type: str = field(default="rnn_seq2seq", init=False)

    def __post_init__(self) -> None:
        check_field_types(type(self), _values(self))
        if self.attention_size is None:
            self.attention_size = self.hidden_size
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LmlabError(msg)

        need(self.cell in RECURRENT, f"cell must be one of {', '.join(RECURRENT)} (got {self.cell!r})")
        need(self.attention in ATTENTION_SCORES,
             f"attention must be one of {', '.join(ATTENTION_SCORES)} (got {self.attention!r})")
        for name in ("vocab_size", "d_model", "hidden_size", "n_layer", "attention_size",
                     "max_source_len", "max_target_len"):
            need(getattr(self, name) > 0, f"{name} must be positive (got {getattr(self, name)})")
        need(self.target_vocab_size is None or self.target_vocab_size > 0,
             f"target_vocab_size must be positive (got {self.target_vocab_size})")
        need(not self.bidirectional or self.hidden_size % 2 == 0,
             f"a bidirectional encoder splits hidden_size={self.hidden_size} over two directions; "
             "choose an even hidden_size (or bidirectional false)")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) (got {self.dropout})")
        need(self.init_std > 0, f"init_std must be positive (got {self.init_std})")
        need(not self.share_embeddings or self.target_vocab_size in (None, self.vocab_size),
             f"shared embeddings need one vocabulary (vocab_size={self.vocab_size}, "
             f"target_vocab_size={self.target_vocab_size}); set share_embeddings false")

    @property
    def n_params_hint(self) -> str:
        return f"{self.cell.upper()} {self.n_layer}x{self.hidden_size} + {self.attention} attention"


def _values(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


#: every config (the encoder and task-head configs of :mod:`lmlab.models.task_config` too)
ModelConfig = Any
_BY_TYPE: dict[str, type] = {
    "transformer": TransformerConfig, "rnn": RNNConfig, "seq2seq": Seq2SeqConfig,
    "rnn_seq2seq": RNNSeq2SeqConfig,
}


def register_config(cls: type) -> type:
    """Make ``config_from_dict`` read ``model_type == cls.model_type`` as ``cls``."""
    _BY_TYPE[cls.__dataclass_fields__["model_type"].default] = cls
    return cls


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):  # a config with a nested one (a task head's body)
        return cfg.to_dict()
    d = dataclasses.asdict(cfg)
    d["model_type"] = cfg.model_type
    return d


def config_from_dict(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """A config from its JSON form, every field's type, sign and size checked first (no
    model is built here; the caller checks the weights fit: :mod:`lmlab.models.limits`)."""
    d = {k: v for k, v in d.items() if k != "lmlab"}
    kind = d.pop("model_type", "transformer")
    if not isinstance(kind, str):
        raise LmlabError(f"{where}: model_type must be a string, not {kind!r}")
    cls = _BY_TYPE.get(kind)
    if cls is None:
        raise LmlabError(
            f"unknown lmlab model_type {kind!r} in config.json (expected one of {', '.join(_BY_TYPE)})"
        )
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise LmlabError(
            f"{where} has fields this lmlab does not know: {', '.join(unknown)} "
            "(was it written by a newer lmlab?)"
        )
    try:
        return cls(**d)
    except LmlabError as e:
        raise LmlabError(f"{where}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise LmlabError(f"{where} does not describe a valid {kind} model: {e}") from None
