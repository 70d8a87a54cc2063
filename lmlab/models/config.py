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
from lmlab.models.limits import check_field_types

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "POSITIONS",
    "RECURRENT",
    "ModelConfig",
    "RNNConfig",
    "TransformerConfig",
    "config_from_dict",
    "config_to_dict",
]

POSITIONS = ("sinusoidal", "learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "gelu_new", "silu", "relu")
RECURRENT = ("rnn", "gru", "lstm")


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
            if self.n_head <= 0 or self.d_model % self.n_head:
                raise LmlabError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    "choose --d-model as a multiple of --n-head"
                )
            self.head_dim = self.d_model // self.n_head
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

    @property
    def n_params_hint(self) -> str:
        return f"{self.cell.upper()} {self.n_layer}x{self.hidden_size} (embedding {self.d_model})"


def _values(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


ModelConfig = TransformerConfig | RNNConfig
_BY_TYPE: dict[str, type] = {"transformer": TransformerConfig, "rnn": RNNConfig}


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
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
