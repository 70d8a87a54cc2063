"""Task heads: any lmlab model as the body, a small layer on top.

    classify   z = pool(h)                     first token ([CLS]), last real token, mean or max
               z = act(W₁ z + b₁)              optional (BERT's pooler: tanh; DistilBERT: ReLU)
               logits = W₂ z + b₂              (B, num_labels)
    span       logits = h W + b                (B, T, 2): each token's start and end score
    mlm        logits = Norm(gelu(h W + b)) Eᵀ + c   (B, T, V): each token's vocabulary scores, E the
               body's token embeddings (tied, as BERT's masked-LM head): pretraining an encoder

The body is an encoder (BERT), a decoder-only Transformer or an RNN; it gives one vector
per token (``features``), so one head serves all of them and a classifier can start from
a language model trained here (GPT-1's and ULMFiT's recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.models.base import LanguageModel
from lmlab.models.config import RNNConfig, TransformerConfig
from lmlab.models.task_config import EncoderConfig, TaskConfig
from lmlab.nn.layers import make_norm

_ACT = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}


def build_body(cfg: EncoderConfig | TransformerConfig | RNNConfig) -> nn.Module:
    if isinstance(cfg, EncoderConfig):
        from lmlab.models.encoder import Encoder

        return Encoder(cfg)
    if isinstance(cfg, TransformerConfig):
        from lmlab.models.transformer import Transformer

        return Transformer(cfg)
    from lmlab.models.rnn import RNNLanguageModel

    return RNNLanguageModel(cfg)


def pool(h: Tensor, mask: Tensor | None, how: str) -> Tensor:
    """(B, T, C) states of right-padded rows -> (B, C), reading real tokens only (mask: (B, T), 1 = real)."""
    if how == "first":
        return h[:, 0]
    m = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask.bool()
    if how == "last":  # the last real token of each row (a decoder has seen the whole text there)
        last = m.long().sum(1).clamp(min=1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    if how == "mean":  # Σ_t m_t h_t / Σ_t m_t
        w = m[..., None].to(h.dtype)
        return (h * w).sum(1) / w.sum(1).clamp(min=1)
    return h.masked_fill(~m[..., None], torch.finfo(h.dtype).min).amax(1)  # max over time


class TaskModel(LanguageModel):
    """A body with a classification or span head. ``forward`` keeps the protocol's shape,
    ``logits, state = model(ids)``, with no state: (B, num_labels) or (B, T, 2) logits."""

    def __init__(self, config: TaskConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.body = build_body(cfg.body)
        d = cfg.d_model
        self.drop = nn.Dropout(cfg.head_dropout)
        if cfg.head == "classify":
            self.dense = nn.Linear(d, d) if cfg.head_hidden else None
            self.out = nn.Linear(d, cfg.num_labels)
        elif cfg.head == "span":
            self.dense = None
            self.out = nn.Linear(d, 2)
        else:  # mlm: the output layer is the body's own embedding matrix (tied), plus a bias
            self.dense = nn.Linear(d, d)
            body_cfg = cfg.body
            self.mlm_norm = make_norm(body_cfg.norm, d, body_cfg.norm_eps, True)
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
            self.out = None
        if (self.dense if self.out is None else self.out).weight.device.type != "meta":
            self.reset_head()

    def reset_head(self) -> None:
        """N(0, 0.02) weights, zero biases (BERT's init for its heads)."""
        for m in (self.dense, self.out):
            if m is not None:
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
        if self.config.head == "mlm":
            nn.init.zeros_(self.mlm_bias)

    def tie_weights(self) -> None:
        if hasattr(self.body, "tie_weights"):
            self.body.tie_weights()

    @property
    def task(self) -> str:
        return self.config.head

    @property
    def bounded_context(self) -> bool:  # type: ignore[override]
        """A recurrent body reads any length (its max_seq_len is the training window)."""
        return getattr(self.body, "bounded_context", True)

    def features(self, ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None) -> Tensor:
        body = self.body
        if not hasattr(body, "features"):  # pragma: no cover - every body has one
            raise LmlabError(f"a {type(body).__name__} cannot be the body of a task head")
        return body.features(ids, attention_mask, token_type_ids)

    def forward(
        self,
        ids: Tensor,
        state: None = None,
        *,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        last_only: bool = False,  # noqa: ARG002 - the protocol's
        positions: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        """``positions`` (mlm): a (B, T) bool mask; the logits of those tokens only, (n, V) —
        pretraining asks about 15% of the tokens, and the (B, T, V) product is most of a step."""
        h = self.features(ids, attention_mask, token_type_ids)  # (B, T, C)
        if self.config.head == "span":
            return self.out(self.drop(h)), None  # (B, T, 2)
        if self.config.head == "mlm":  # Norm(gelu(h W + b)) Eᵀ + c
            if positions is not None:
                h = h[positions]  # (n, C)
            z = self.mlm_norm(F.gelu(self.dense(h)))
            return F.linear(z, self.body.tok_emb.weight, self.mlm_bias), None  # (B, T, V) or (n, V)
        z = self.drop(pool(h, attention_mask, self.config.pooling))  # (B, C)
        if self.dense is not None:
            z = self.drop(_ACT[self.config.head_activation](self.dense(z)))
        return self.out(z), None  # (B, num_labels)


__all__ = ["TaskModel", "build_body", "pool"]
