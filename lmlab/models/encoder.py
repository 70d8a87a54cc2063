"""The encoder-only Transformer (BERT, Devlin et al. 2019; DistilBERT; RoBERTa; XLM-R).

The encoder-decoder's encoder stack — bidirectional self-attention, every token seeing
every other real token — under BERT's embeddings:

    h₀ = Norm(E[x] + P[pos_offset + t] + S[type])        token + position + token type (segment)
    h  = Norm(h + SelfAttn(h, M_pad))                     post-norm, as BERT (prenorm: the other form)
    h  = Norm(h + FFN(h))

It reads a whole text at once and gives one vector per token; a task head
(:mod:`lmlab.models.heads`) turns them into a label or an answer span. Position rows start
at ``pos_offset``: RoBERTa numbers positions from padding_idx + 1 = 2 (rows 0 and 1 unused).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.models.seq2seq import EncoderLayer
from lmlab.models.task_config import EncoderConfig
from lmlab.nn.attention import key_padding_mask
from lmlab.nn.layers import make_norm
from lmlab.nn.positional import LearnedPositions, SinusoidalPositions


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb: nn.Module = LearnedPositions(cfg.max_seq_len + cfg.pos_offset, cfg.d_model)
        else:
            self.pos_emb = SinusoidalPositions(cfg.max_seq_len + cfg.pos_offset, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias) if cfg.final_norm else None
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's init: N(0, 0.02) weights and embeddings, zero biases, unit norms."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, LearnedPositions):
                nn.init.normal_(m.weight, 0.0, std)

    def features(
        self, ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """(B, T) ids, right-padded, with their (B, T) mask (1 = real) -> (B, T, C) states."""
        cfg = self.config
        if ids.dim() != 2:
            raise LmlabError(f"token ids must have shape (batch, time), got {tuple(ids.shape)}")
        T = ids.shape[1]
        if T > cfg.max_seq_len:
            raise LmlabError(
                f"{T} tokens are more than the encoder's {cfg.max_seq_len} positions; shorten the input"
            )
        x = self.tok_emb(ids)  # (B, T) -> (B, T, C)
        if cfg.scale_embedding:
            x = x * torch.tensor(math.sqrt(cfg.d_model), dtype=x.dtype)
        pos = torch.arange(cfg.pos_offset, cfg.pos_offset + T, device=ids.device)
        x = x + self.pos_emb(pos)[None].to(x.dtype)
        if self.type_emb is not None:
            types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
            if types.numel() and int(types.max()) >= cfg.type_vocab_size:
                raise LmlabError(
                    f"token type {int(types.max())} is beyond the model's {cfg.type_vocab_size} token types"
                )
            x = x + self.type_emb(types)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        mask = key_padding_mask(attention_mask)  # (B, 1, 1, T): padding is never a key
        for layer in self.layers:
            x = layer(x, mask)
        if self.norm_f is not None:
            x = self.norm_f(x)
        return x


__all__ = ["Encoder"]
