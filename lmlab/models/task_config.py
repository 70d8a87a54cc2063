"""The encoder-only Transformer's config and the task-head config (a body of any kind with
a classification or span head), registered with :func:`lmlab.models.config.config_from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError
from lmlab.models.config import (
    ACTIVATIONS,
    NORMS,
    RNNConfig,
    TransformerConfig,
    _values,
    config_from_dict,
    config_to_dict,
    head_dim_of,
    register_config,
)
from lmlab.models.limits import check_field_types

ENCODER_POSITIONS = ("learned", "sinusoidal")


@register_config
@dataclass
class EncoderConfig:
    """A bidirectional Transformer encoder (BERT, DistilBERT, RoBERTa, XLM-R): the
    encoder-decoder's encoder stack under BERT's embeddings

        h₀ = Norm(E[x] + P[pos_offset + t] + S[type])      (token, position, token type)

    then post-norm layers of bidirectional self-attention and a GELU MLP (``prenorm``, as
    in the encoder-decoder, gives the pre-norm form with a final norm).
    """

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    head_dim: int | None = None  # None = d_model // n_head
    d_ff: int | None = None  # None = 4·d_model
    max_seq_len: int = 512  # positions (tokens, special tokens included)
    pos: str = "learned"  # learned | sinusoidal
    pos_offset: int = 0  # RoBERTa: position rows start after padding_idx (2)
    type_vocab_size: int = 2  # token-type (segment A/B) embeddings; 0 = none (DistilBERT)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-12
    norm_bias: bool = True
    prenorm: bool = False  # BERT is post-norm: Norm(x + f(x))
    final_norm: bool | None = None  # None = prenorm
    embed_norm: bool = True  # BERT's LayerNorm after the embeddings
    scale_embedding: bool = False
    activation: str = "gelu"
    gated_mlp: bool = False
    attn_bias: bool = True
    mlp_bias: bool = True
    attn_scale: bool = True
    dropout: float = 0.1
    init_std: float = 0.02
    model_type: str = field(default="encoder", init=False)

    def __post_init__(self) -> None:
        check_field_types(type(self), _values(self))
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

        for name in ("vocab_size", "n_layer", "n_head", "d_model", "head_dim", "d_ff", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be positive (got {getattr(self, name)})")
        need(self.pos in ENCODER_POSITIONS, f"pos must be one of {', '.join(ENCODER_POSITIONS)} (got {self.pos!r})")
        need(self.norm in NORMS, f"norm must be one of {', '.join(NORMS)} (got {self.norm!r})")
        need(self.activation in ACTIVATIONS,
             f"activation must be one of {', '.join(ACTIVATIONS)} (got {self.activation!r})")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) (got {self.dropout})")
        need(self.norm_eps > 0, f"norm_eps must be positive (got {self.norm_eps})")
        need(self.pos_offset >= 0, f"pos_offset must be >= 0 (got {self.pos_offset})")
        need(self.type_vocab_size >= 0, f"type_vocab_size must be >= 0 (got {self.type_vocab_size})")
        need(self.pos != "sinusoidal" or self.d_model % 2 == 0, "sinusoidal positions need an even d_model")

    @property
    def n_params_hint(self) -> str:
        return f"encoder {self.n_layer}L/{self.n_head}H/{self.d_model}d"


TASK_HEADS = ("classify", "span", "mlm")
POOLINGS = ("first", "last", "mean", "max")
HEAD_ACTIVATIONS = ("tanh", "relu", "gelu")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


@register_config
@dataclass
class TaskConfig:
    """Any lmlab model as the body of a task head (``body``: its config):

        classify   pool the body's states (first = [CLS], last = last real token, mean, max)
                   -> [dense + activation] -> num_labels logits        (BERT's pooler + classifier)
        span       every token's state -> (start, end) logits          (extractive QA)
        mlm        every token's state -> Norm(gelu(W h + b)) Eᵀ + c   (BERT's masked-LM head, E: the body's
                                                                        token embeddings; pretraining)

    ``id2label`` names the classes as Hugging Face does ({"0": "negative", ...}).
    """

    body: Any = None  # the body's ModelConfig (a dict in config.json)
    head: str = "classify"  # classify | span | mlm
    num_labels: int = 2
    pooling: str = "first"  # first | last | mean | max (classify)
    head_hidden: bool = True  # a d->d layer and activation before the classifier
    head_activation: str = "tanh"  # tanh (BERT, RoBERTa) | relu (DistilBERT) | gelu
    head_dropout: float = 0.1
    problem_type: str | None = None  # None: sigmoid for one label, softmax for several (transformers)
    id2label: dict[str, str] | None = None
    model_type: str = field(default="task", init=False)

    def __post_init__(self) -> None:
        check_field_types(type(self), {k: v for k, v in _values(self).items() if k != "body"})
        if isinstance(self.body, dict):
            self.body = config_from_dict(self.body, where="the body of a task model")
        if not isinstance(self.body, (TransformerConfig, RNNConfig, EncoderConfig)):
            raise LmlabError(
                "a task head needs a body: a transformer, rnn or encoder config "
                f"(got {type(self.body).__name__})"
            )
        if self.id2label is None and self.head == "classify":
            self.id2label = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LmlabError(msg)

        need(self.head in TASK_HEADS, f"head must be one of {', '.join(TASK_HEADS)} (got {self.head!r})")
        need(self.head != "mlm" or isinstance(self.body, EncoderConfig),
             "a masked-LM head (mlm) goes on an encoder body (it predicts from both sides of each token)")
        need(self.pooling in POOLINGS, f"pooling must be one of {', '.join(POOLINGS)} (got {self.pooling!r})")
        need(self.head_activation in HEAD_ACTIVATIONS,
             f"head_activation must be one of {', '.join(HEAD_ACTIVATIONS)} (got {self.head_activation!r})")
        need(self.problem_type is None or self.problem_type in PROBLEM_TYPES,
             f"problem_type must be one of {', '.join(PROBLEM_TYPES)} (got {self.problem_type!r})")
        need(0.0 <= self.head_dropout < 1.0, f"head_dropout must be in [0, 1) (got {self.head_dropout})")
        if self.head == "classify":
            need(self.num_labels > 0, f"num_labels must be positive (got {self.num_labels})")
            ids = self.id2label or {}
            need(sorted(ids) == sorted(str(i) for i in range(self.num_labels)),
                 f"id2label must name each of the {self.num_labels} labels by its id 0..{self.num_labels - 1} "
                 f"(got ids {', '.join(sorted(map(str, ids))) or 'none'}: ids are strings, as in config.json)")
            need(all(isinstance(v, str) and v for v in ids.values()), "id2label's names must be non-empty strings")
            need(len(set(ids.values())) == len(ids), "id2label names a label twice")

    @property
    def labels(self) -> list[str]:
        """The label names in id order."""
        return [self.id2label[str(i)] for i in range(self.num_labels)] if self.id2label else []

    @property
    def d_model(self) -> int:
        if isinstance(self.body, RNNConfig):  # the top layer's output: [h→; h←] when bidirectional
            return self.body.hidden_size * (2 if self.body.bidirectional else 1)
        return self.body.d_model

    @property
    def max_seq_len(self) -> int:
        return self.body.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.body.vocab_size

    # what the Hugging Face weight filler reads of a config
    @property
    def n_head(self) -> int:
        return getattr(self.body, "n_head", 1)

    @property
    def head_dim(self) -> int:
        return getattr(self.body, "head_dim", 1)

    tie_embeddings = False

    @property
    def n_params_hint(self) -> str:
        what = {"classify": f"{self.num_labels}-way classifier", "span": "span (QA) head"}.get(self.head, "masked-LM head")
        return f"{self.body.n_params_hint} + {what}"

    def to_dict(self) -> dict[str, Any]:
        """config.json's form: the body nested as its own config.json."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "body"}
        d["id2label"] = dict(self.id2label) if self.id2label else None
        return {"body": config_to_dict(self.body), **d}


__all__ = ["POOLINGS", "TASK_HEADS", "EncoderConfig", "TaskConfig"]
