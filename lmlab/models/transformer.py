"""The decoder-only Transformer (Radford et al. 2018/2019; Touvron et al. 2023).

One implementation whose config spans GPT-2 (learned positions, LayerNorm, GELU,
biases) and Llama/Qwen2 (RoPE, RMSNorm, SwiGLU, grouped-query attention).

    x₀ = E[ids]·s (+ P[pos])                  token (+ absolute position) embedding
    x  = x + Attn(Norm₁(x))                    pre-norm residual blocks, N times
    x  = x + MLP(Norm₂(x))
    logits = Norm_f(x) Wᵀ                      W = E when embeddings are tied
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.models.base import LanguageModel
from lmlab.models.config import TransformerConfig
from lmlab.nn import fastpath
from lmlab.nn.attention import CausalSelfAttention, causal_padding_mask
from lmlab.nn.cache import KVCache
from lmlab.nn.layers import MLP, make_norm
from lmlab.nn.positional import LearnedPositions, RotaryEmbedding, SinusoidalPositions


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.attn = CausalSelfAttention(
            cfg.d_model,
            cfg.n_head,
            cfg.n_kv_head,
            cfg.head_dim,
            qkv_bias=cfg.qkv_bias,
            proj_bias=cfg.proj_bias,
            dropout=cfg.dropout,
            use_rope=cfg.pos == "rope",
        )
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated_mlp, cfg.mlp_bias, cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        a = self.attn(self.norm1(x), rope, mask, cache, layer)
        if self.parallel:  # x + Attn(N₁x) + MLP(N₂x)   (GPT-NeoX, GPT-J)
            return x + a + self.mlp(self.norm2(x))
        x = x + a
        return x + self.mlp(self.norm2(x))

    def step(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache, layer: int
    ) -> Tensor:  # fmt: skip
        """:meth:`forward` for one new token per row in inference, its module calls unrolled
        (the decoding loop's path while nothing observes the modules: fastpath.unrolling)."""
        a = self.attn.step(self.norm1.forward(x), rope, mask, cache, layer)
        if self.parallel:
            return x + a + self.mlp.step(self.norm2.forward(x))
        x = x + a
        return x + self.mlp.step(self.norm2.forward(x))


class Transformer(LanguageModel):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb: nn.Module | None = None
        if cfg.pos == "learned":
            self.pos_emb = LearnedPositions(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos == "sinusoidal":
            self.pos_emb = SinusoidalPositions(cfg.max_seq_len, cfg.d_model)
        self.rope = (
            RotaryEmbedding(cfg.rotary_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.pos == "rope" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        if self.tok_emb.weight.device.type != "meta":  # on meta, weights come from a file
            self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the output layer with the input embedding (Press & Wolf 2017)."""
        if self.config.tie_embeddings and isinstance(self.lm_head, nn.Linear):  # (not int8: its own copy)
            self.lm_head.weight = self.tok_emb.weight

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere; residual projections N(0, 0.02/√(2·n_layer)).

        Each block adds two residual branches, so the scaled init keeps the variance
        of the residual stream from growing with depth.
        """
        std = self.config.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                s = (
                    std / math.sqrt(2 * self.config.n_layer)
                    if name.endswith(("attn.proj", "mlp.down"))
                    else std
                )
                nn.init.normal_(m.weight, 0.0, s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, LearnedPositions):
                nn.init.normal_(m.weight, 0.0, std)

    @property
    def dtype(self) -> torch.dtype:
        """What it computes in: its final norm's dtype (an int8 model read from bf16 keeps its
        token embedding in bf16 and computes in fp32, see :func:`lmlab.api.load`)."""
        return self.norm_f.weight.dtype

    # ------------------------------------------------------------------ state
    def state_bytes(self, batch_size: int, max_len: int) -> int:
        # keys and values: 2 · n_layer · B · n_kv_head · S · head_dim numbers
        cfg = self.config
        S = min(max_len, cfg.max_seq_len)
        return 2 * cfg.n_layer * batch_size * cfg.n_kv_head * S * cfg.head_dim * self.dtype.itemsize

    def init_state(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache of ``max_len`` positions (default: the whole context, ``max_seq_len``).

        Its memory grows with ``max_len``, so the decoding loop passes what a request needs
        (prompt + max_new_tokens - 1, at most ``max_seq_len``) rather than the default.
        """
        cfg = self.config
        return KVCache(
            cfg.n_layer,
            batch_size,
            cfg.n_kv_head,
            max_len or cfg.max_seq_len,
            cfg.head_dim,
            device=self.device,
            dtype=self.dtype,
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        ids: Tensor,
        state: KVCache | None = None,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        last_only: bool = False,
        hidden: bool = False,
    ) -> tuple[Tensor, KVCache | None]:
        """ids: (B, T). attention_mask: (B, T), 1 for real tokens, 0 for (left) padding.

        With a ``state`` (KV cache), ``ids`` continue the sequence it holds. Position
        ids default to the slot index; with left padding pass them explicitly.
        """
        cfg = self.config
        if ids.dim() != 2:
            raise LmlabError(f"token ids must have shape (batch, time), got {tuple(ids.shape)}")
        B, T = ids.shape
        start = state.length if state is not None else 0
        if state is not None and T > state.remaining:
            raise LmlabError(
                f"KV cache holds {state.max_len} positions but {start + T} are needed; "
                "make a bigger state with model.init_state(batch, max_len)"
            )
        if state is not None and state.batch_size != B:
            raise LmlabError(f"state is for batch size {state.batch_size}, ids have batch size {B}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=ids.device)[None]  # (1, T)
        if cfg.pos != "rope" and int(position_ids.max()) >= cfg.max_seq_len:
            raise LmlabError(
                f"position {int(position_ids.max())} is beyond max_seq_len={cfg.max_seq_len} "
                f"of a model with {cfg.pos} positions; crop the input to the last {cfg.max_seq_len} tokens"
            )

        x = self.tok_emb(ids).to(self.dtype)  # (B, T) -> (B, T, C); a bf16 table upcast
        if cfg.embed_scale != 1.0:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids).to(x.dtype)
        x = self.drop(x)
        rope = None
        if self.rope is not None:
            cos, sin = self.rope(position_ids)  # (B or 1, T, rd)
            rope = (cos[:, None].to(x.dtype), sin[:, None].to(x.dtype))  # broadcast over heads

        if state is not None:
            state.mark(attention_mask, T)  # which new slots are real tokens (not left padding)
        mask = causal_padding_mask(T, attention_mask, state, ids.device)
        if fastpath.unroll_step(self, T, state):
            for i, block in enumerate(self.blocks):
                x = block.step(x, rope, mask, state, i)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, rope, mask, state, i)
        if state is not None:
            state.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.norm_f(x)
        if hidden:  # the states the output layer reads (a task head's input)
            return x, state
        return self.lm_head(x), state  # (B, T, vocab)

    def features(self, ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        """(B, T) right-padded ids -> (B, T, C): the states the output layer reads (a task head's
        input). Causal attention keeps padding at the end out of every real token's state."""
        del attention_mask, token_type_ids  # right padding is never attended to by a real token
        return self.forward(ids, hidden=True)[0]
