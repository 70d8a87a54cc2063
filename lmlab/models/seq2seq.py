"""The encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need").

One implementation whose config spans the paper's model, Marian (opus-mt), BART and T5.

    Encoder (N layers):  h₀ = E[src]·s + P          s = √d when scale_embedding
                         h  = h + SelfAttn(Norm(h), M_src)        (bidirectional)
                         h  = h + FFN(Norm(h))
    Decoder (N layers):  y₀ = E[tgt]·s + P
                         y  = y + SelfAttn(Norm(y), causal)
                         y  = y + CrossAttn(Norm(y), h, M_src)     (queries y, keys/values h)
                         y  = y + FFN(Norm(y))
    logits = (Norm_f(y)·head_scale) Wᵀ + b                         W = E when tied

That is the pre-norm form; ``prenorm=False`` gives the paper's post-norm, y = Norm(y + f(y)).
T5 replaces the added positions P by a learned bias on the attention scores
(:class:`~lmlab.nn.positional.RelativePositionBias`), computed once per stack.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.models.config import Seq2SeqConfig
from lmlab.models.encdec import EncoderDecoderModel, Memory
from lmlab.nn import fastpath
from lmlab.nn.attention import CausalSelfAttention, CrossAttention, key_padding_mask, with_bias
from lmlab.nn.cache import KVCache
from lmlab.nn.layers import MLP, make_norm
from lmlab.nn.positional import LearnedPositions, RelativePositionBias, SinusoidalPositions


def _norm(cfg: Seq2SeqConfig) -> nn.Module:
    return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)


def _self_attention(cfg: Seq2SeqConfig, causal: bool) -> CausalSelfAttention:
    return CausalSelfAttention(
        cfg.d_model, cfg.n_head, cfg.n_head, cfg.head_dim, qkv_bias=cfg.attn_bias, proj_bias=cfg.attn_bias,
        dropout=cfg.dropout, causal=causal, scale=None if cfg.attn_scale else 1.0,
    )  # fmt: skip


def _residual(prenorm: bool, x: Tensor, norm: callable, f: callable) -> Tensor:
    """pre-norm: x + f(Norm(x));  post-norm (the paper): Norm(x + f(x))."""
    return x + f(norm(x)) if prenorm else norm(x + f(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.prenorm = cfg.prenorm
        self.attn = _self_attention(cfg, causal=False)
        self.norm1 = _norm(cfg)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated_mlp, cfg.mlp_bias, cfg.dropout)
        self.norm2 = _norm(cfg)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = _residual(self.prenorm, x, self.norm1, lambda h: self.attn(h, mask=mask))
        return _residual(self.prenorm, x, self.norm2, self.mlp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.prenorm = cfg.prenorm
        self.attn = _self_attention(cfg, causal=True)
        self.norm1 = _norm(cfg)
        self.cross = CrossAttention(
            cfg.d_model, cfg.n_head, cfg.head_dim, bias=cfg.attn_bias, dropout=cfg.dropout,
            scale=None if cfg.attn_scale else 1.0,
        )  # fmt: skip
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated_mlp, cfg.mlp_bias, cfg.dropout)
        self.norm3 = _norm(cfg)

    def forward(
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int,
        kv: tuple[Tensor, Tensor], src_mask: Tensor | None,
    ) -> Tensor:  # fmt: skip
        x = _residual(self.prenorm, x, self.norm1, lambda h: self.attn(h, mask=mask, cache=cache, layer=layer))
        x = _residual(self.prenorm, x, self.norm2, lambda h: self.cross(h, kv, src_mask))
        return _residual(self.prenorm, x, self.norm3, self.mlp)

    def step(
        self, x: Tensor, mask: Tensor | None, cache: KVCache, layer: int, kv: tuple[Tensor, Tensor],
        src_mask: Tensor | None,
    ) -> Tensor:  # fmt: skip
        """:meth:`forward` for one new token per row (x: (B, 1, C)), in inference: the same
        operations on the same tensors with the module calls, dropouts and head transposes
        unrolled (each sublayer's ``step``). At batch 1 a step's Python and small ops cost as
        much as its matmuls, so the decoding loop takes this path while nothing observes the
        modules (:func:`lmlab.nn.fastpath.unrolling`)."""
        x = _residual(self.prenorm, x, self.norm1.forward, lambda h: self.attn.step(h, None, mask, cache, layer))
        x = _residual(self.prenorm, x, self.norm2.forward, lambda h: self.cross.step(h, kv, src_mask))
        return _residual(self.prenorm, x, self.norm3.forward, self.mlp.step)


class Seq2SeqState:
    """The decoder's state: its self-attention KV cache, the cross-attention keys/values of
    every layer over the source (computed once), and the source's padding mask.

    cross_k, cross_v: (n_layer, B, nh, S, hs); src_mask: (B, 1, 1, S) or None; sources: (B,)
    the source of each row (rows of one source hold the same cross keys/values; None: row b
    holds source b).
    """

    def __init__(
        self, cache: KVCache, cross_k: Tensor, cross_v: Tensor, src_mask: Tensor | None,
        sources: Tensor | None = None,
    ) -> None:  # fmt: skip
        self.cache, self.cross_k, self.cross_v, self.src_mask = cache, cross_k, cross_v, src_mask
        self.sources = torch.arange(cross_k.shape[1]) if sources is None else sources.cpu()

    @property
    def remaining(self) -> int:
        return self.cache.remaining

    @property
    def length(self) -> int:
        return self.cache.length

    def select(self, index: Tensor) -> Seq2SeqState:
        sources = self.sources[index.cpu()]
        index = index.to(self.cross_k.device)
        self.cache.select(index)
        if torch.equal(sources, self.sources):  # beams reordered within their sources: the same rows
            return self
        self.sources = sources
        self.cross_k = self.cross_k.index_select(1, index)
        self.cross_v = self.cross_v.index_select(1, index)
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, index)
        return self


class Seq2SeqTransformer(EncoderDecoderModel):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.src_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.tgt_emb = self.src_emb if cfg.share_embeddings else nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.enc_pos = self._positions(cfg.max_source_len, bidirectional=True)
        self.dec_pos = self._positions(cfg.max_target_len, bidirectional=False)
        self.enc_emb_norm = _norm(cfg) if cfg.embed_norm else None
        self.dec_emb_norm = _norm(cfg) if cfg.embed_norm else None
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layer))
        self.enc_norm = _norm(cfg) if cfg.final_norm else None
        self.dec_norm = _norm(cfg) if cfg.final_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        if cfg.logits_bias:  # Marian/BART's final_logits_bias: a (V,) bias on the logits
            self.logits_bias = nn.Parameter(torch.zeros(1, cfg.tgt_vocab_size))
        else:
            self.logits_bias = None
        self.tie_weights()
        if self.src_emb.weight.device.type != "meta":
            self.reset_parameters()

    def _positions(self, n: int, bidirectional: bool) -> nn.Module:
        cfg = self.config
        if cfg.pos == "learned":
            return LearnedPositions(n + cfg.pos_offset, cfg.d_model)
        if cfg.pos == "relative":
            return RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance, cfg.n_head, bidirectional)
        return SinusoidalPositions(n, cfg.d_model, cfg.sinusoidal_layout)

    def tie_weights(self) -> None:
        """One embedding for both sides when shared; the output layer = the target embedding
        when tied (Press & Wolf 2017; the paper shares all three)."""
        if self.config.share_embeddings:
            self.tgt_emb = self.src_emb
        if self.config.tie_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.tgt_emb.weight

    def reset_parameters(self) -> None:
        """N(0, 0.02) for weights (embeddings N(0, d^-½) when scaled by √d, so E·√d has unit
        variance, as the paper's shared embedding); zero biases; unit norms."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (LearnedPositions, RelativePositionBias)):
                nn.init.normal_(m.weight, 0.0, std)
        emb_std = self.config.d_model**-0.5 if self.config.scale_embedding else std
        for emb in {id(e): e for e in (self.src_emb, self.tgt_emb)}.values():
            nn.init.normal_(emb.weight, 0.0, emb_std)
        if self.logits_bias is not None:
            nn.init.zeros_(self.logits_bias)

    # ------------------------------------------------------------------ embeddings
    def _embed(self, emb: nn.Embedding, pos: nn.Module, norm: nn.Module | None, ids: Tensor, start: int) -> Tensor:
        x = emb(ids)  # (B, T) -> (B, T, C)
        if self.config.scale_embedding:
            x = x * torch.tensor(math.sqrt(self.config.d_model), dtype=x.dtype)
        if not isinstance(pos, RelativePositionBias):
            limit = pos.table.shape[0] if isinstance(pos, SinusoidalPositions) else pos.weight.shape[0]
            end = start + ids.shape[1] + self.config.pos_offset
            if end > limit:
                raise LmlabError(
                    f"position {end - 1 - self.config.pos_offset} is beyond the model's length of "
                    f"{limit - self.config.pos_offset} tokens; shorten the input"
                )
            p = torch.arange(start, start + ids.shape[1], device=ids.device) + self.config.pos_offset
            x = x + pos(p)[None].to(x.dtype)
        if norm is not None:
            x = norm(x)
        return self.drop(x)

    # ------------------------------------------------------------------ encoder
    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Memory:
        """The source read once: (B, S) ids -> memory (B, S, C), every token seeing every other."""
        if src.dim() != 2:
            raise LmlabError(f"source ids must have shape (batch, time), got {tuple(src.shape)}")
        x = self._embed(self.src_emb, self.enc_pos, self.enc_emb_norm, src, 0)
        mask = key_padding_mask(src_mask)  # (B, 1, 1, S) or None
        if isinstance(self.enc_pos, RelativePositionBias):
            mask = with_bias(mask, self.enc_pos(0, src.shape[1], src.shape[1]), x.dtype)
        for layer in self.encoder:
            x = layer(x, mask)
        if self.enc_norm is not None:
            x = self.enc_norm(x)
        real = None if src_mask is None or bool(src_mask.bool().all()) else src_mask.bool()
        return Memory(x, real)

    # ------------------------------------------------------------------ state
    def state_bytes(self, batch_size: int, max_len: int, source_len: int | None = None) -> int:
        """Self-attention keys/values of ``max_len`` target positions, and the cross-attention
        keys/values of ``source_len`` source positions (default: the longest source):
        2·L·B·nh·(T + S)·hs numbers."""
        cfg = self.config
        T = min(max_len, cfg.max_target_len)
        S = cfg.max_source_len if source_len is None else source_len
        return 2 * cfg.n_decoder_layer * batch_size * cfg.n_head * (T + S) * cfg.head_dim * self.dtype.itemsize

    def init_state(self, batch_size: int, max_len: int, memory: Memory | None = None) -> Seq2SeqState:
        if memory is None:
            raise LmlabError("an encoder-decoder's state needs the encoded source: init_state(B, T, model.encode(src))")
        cfg = self.config
        cache = KVCache(
            cfg.n_decoder_layer, batch_size, cfg.n_head, max_len or cfg.max_target_len, cfg.head_dim,
            device=self.device, dtype=self.dtype,
        )  # fmt: skip
        kv = [layer.cross.memory_kv(memory.states) for layer in self.decoder]
        ks, vs = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])
        return Seq2SeqState(cache, ks, vs, key_padding_mask(memory.mask), memory.source_ids())

    # ------------------------------------------------------------------ decoder
    def forward(
        self,
        ids: Tensor,
        state: Seq2SeqState | None = None,
        *,
        src: Tensor | None = None,
        src_mask: Tensor | None = None,
        memory: Memory | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Seq2SeqState | None]:
        """Decoder ids (B, T) -> logits (B, T, V). With a ``state`` the ids continue the target
        it holds; without one, ``memory`` (or ``src``, encoded here) is the source: training."""
        if ids.dim() != 2:
            raise LmlabError(f"token ids must have shape (batch, time), got {tuple(ids.shape)}")
        B, T = ids.shape
        if state is None:
            if memory is None:
                if src is None:
                    raise LmlabError("an encoder-decoder needs the source: pass src=... (or memory=...)")
                memory = self.encode(src, src_mask)
            kvs = [layer.cross.memory_kv(memory.states) for layer in self.decoder]
            src_pad = key_padding_mask(memory.mask)
            cache, start = None, 0
        else:
            if T > state.remaining:
                raise LmlabError(f"the decoder's cache has {state.remaining} free positions, {T} are needed")
            kvs = [(state.cross_k[i], state.cross_v[i]) for i in range(len(self.decoder))]
            src_pad, cache, start = state.src_mask, state.cache, state.length
        x = self._embed(self.tgt_emb, self.dec_pos, self.dec_emb_norm, ids, start)
        mask = None  # causal, the kernel's own triangle
        if isinstance(self.dec_pos, RelativePositionBias):
            S = start + T
            causal = torch.ones(T, S, dtype=torch.bool, device=ids.device).tril(diagonal=start)
            mask = with_bias(causal[None, None], self.dec_pos(start, T, S), x.dtype)
        elif cache is not None and start > 0 and T > 1:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        cross_mask = src_pad
        if fastpath.unroll_step(self, T, cache):
            for i, layer in enumerate(self.decoder):
                x = layer.step(x, mask, cache, i, kvs[i], cross_mask)
        else:
            for i, layer in enumerate(self.decoder):
                x = layer(x, mask, cache, i, kvs[i], cross_mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        if self.dec_norm is not None:
            x = self.dec_norm(x)
        if self.config.head_scale != 1.0:
            x = x * self.config.head_scale
        logits = self.lm_head(x)
        if self.logits_bias is not None:
            logits = logits + self.logits_bias
        return logits, state


__all__ = ["Seq2SeqState", "Seq2SeqTransformer"]
