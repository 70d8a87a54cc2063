"""Multi-head (and grouped-query) causal self-attention, its mask, over a static KV cache.

Attention(Q, K, V) = softmax(QKᵀ/√d_k + M) V, computed per head, where the mask M
is 0 where a query may look and -∞ elsewhere (the future, and padding).

Written once and used by every Transformer in lmlab. Two paths compute the same
thing: ``F.scaled_dot_product_attention`` (fast, fused kernels) and an explicit
path that spells out the formula and can return the attention weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.nn import native_attention
from lmlab.nn.cache import KVCache
from lmlab.nn.positional import apply_rope


def causal_padding_mask(
    T: int, padding: Tensor | None, cache: KVCache | None, device: torch.device
) -> Tensor | None:
    """The mask M of T new queries: boolean (B, 1, T, S), True = may attend; None = plain causal.

    ``padding`` is the (B, T) attention mask of the new tokens (1 real, 0 left padding) or
    None; with a ``cache``, the new tokens sit at slots [start, start+T) after the cached
    ones (call ``cache.mark`` first, so the cache knows which of its slots are real).

        M[b, i, j] = (j ≤ start+i) ∧ (key j is a real token ∨ j = start+i)

    query i (slot start+i) sees the keys up to itself that are real tokens; a padding
    query may always see itself, so no softmax row is empty.
    """
    start = cache.length if cache is not None else 0
    padded = (padding is not None and not bool(padding.bool().all())) or (
        cache is not None and cache.has_padding
    )
    if not padded and start == 0:
        return None  # causal: the fused kernel's is_causal path
    if not padded and T == 1:
        return None  # one new token attends to everything before it (T == 1: not causal)
    S = start + T
    q_pos = torch.arange(start, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # j ≤ start+i: (1, 1, T, S)
    if padded:
        real = cache.key_mask(S) if cache is not None else padding.to(device=device, dtype=torch.bool)
        allowed = allowed & (real[:, None, None, :] | (k_pos == q_pos)[None, None])  # (B, 1, T, S)
    return allowed


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, n_kv, S, hs) -> (B, n_kv·n_rep, S, hs): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def key_padding_mask(padding: Tensor | None) -> Tensor | None:
    """An encoder's mask: (B, S) 1 = real token -> bool (B, 1, 1, S), True = may attend.

    Bidirectional: every query sees every real key (no triangle), so only padding is masked.
    None when nothing is padding (the kernel's unmasked path)."""
    if padding is None or bool(padding.bool().all()):
        return None
    return padding.bool()[:, None, None, :]


def with_bias(mask: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An additive mask: a bias B (T5's relative positions, (1 or B, nh, T, S)) plus -∞ where
    the boolean ``mask`` forbids, so that softmax(QKᵀ·s + B + M) is one SDPA call."""
    if bias is None:
        return mask
    bias = bias.to(dtype)
    if mask is None:
        return bias
    return bias.masked_fill(~mask, torch.finfo(dtype).min)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; ``n_kv_head < n_head`` gives grouped-query attention.

    Q, K and V come from one fused projection ``qkv`` (one matmul instead of three),
    laid out as [Q (n_head·hs) | K (n_kv_head·hs) | V (n_kv_head·hs)].

    ``causal=False`` makes it an encoder's bidirectional attention (a query sees every real
    key); ``scale`` replaces 1/√d_k (T5 uses 1: its initialisation absorbs the factor). The
    mask may be boolean (True = may attend) or additive floats (a position bias with -∞).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        head_dim: int,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        dropout: float = 0.0,
        use_rope: bool = False,
        causal: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.use_rope = use_rope
        self.causal = causal
        self.scale = scale
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_head * head_dim, d_model, bias=proj_bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.fast = True  # False: use the explicit path (slower, same result)
        self.record: list[Tensor] | None = None  # a list: each forward appends its weights (lmlab.inspection)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, C). mask: bool (B or 1, 1, T, S), True = may attend; None = causal.

        With a cache, the new keys/values are written at the cache's position and attention
        runs over every slot up to them (``cache.update``); the caller advances the cache.
        """
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, T, nh·hs) -> (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs): the cached slots and the new ones
        causal = self.causal and mask is None and T > 1
        if causal and k.shape[-2] != T:
            # SDPA's is_causal aligns the triangle top-left; a chunk after cached slots needs
            # query i (slot S-T+i) to see keys 0..S-T+i: bottom-right, so spell the mask out
            S = k.shape[-2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            causal = False
        p = self.dropout if self.training else 0.0
        if need_weights or not self.fast or self.record is not None:
            y, w = attention_explicit(q, k, v, mask, causal, p, self.scale)
            if self.record is not None:
                self.record.append(w.detach())
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, enable_gqa=nkv != nh, scale=self.scale
            )
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, nh, T, hs) -> (B, T, C)
        y = self.resid_dropout(self.proj(y))
        return (y, w) if need_weights else y

    def step(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache, layer: int
    ) -> Tensor:  # fmt: skip
        """:meth:`forward` for one new token per row (x: (B, 1, C)) in inference, unrolled: the
        same operations without the module calls, dropout and transposes. With one query the
        fused (B, 1, [Q|K|V]·hs) output already is the heads' layout (B, heads, 1, hs)."""
        B = x.shape[0]
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv.forward(x).view(B, nh + 2 * nkv, 1, hs).split([nh, nkv, nkv], dim=1)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(layer, k, v)
        y = native_attention.attend_one(q, k, v, mask, self.scale)  # one query: lmlab's loop, ~5× faster
        if y is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh, scale=self.scale)
        return self.proj.forward(y.reshape(B, 1, nh * hs))


class CrossAttention(nn.Module):
    """The decoder looking at the source: queries from the target, keys and values from the
    encoder's output ``memory`` (Vaswani et al. 2017, §3.2.3, "encoder-decoder attention").

        CrossAttn(x, m) = softmax((x W_q)(m W_k)ᵀ/√d_k + M_src) (m W_v)

    The source does not change while the target grows, so its keys and values are computed
    once per source (:meth:`memory_kv`) and reused at every decoding step; ``kv`` is fused
    [K | V] (one matmul). M_src hides the source's padding.
    """

    def __init__(
        self, d_model: int, n_head: int, head_dim: int, bias: bool = False, dropout: float = 0.0,
        scale: float | None = None, d_memory: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.n_head, self.head_dim, self.scale, self.dropout = n_head, head_dim, scale, dropout
        self.q = nn.Linear(d_model, n_head * head_dim, bias=bias)
        self.kv = nn.Linear(d_memory or d_model, 2 * n_head * head_dim, bias=bias)
        self.proj = nn.Linear(n_head * head_dim, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.fast = True
        self.record: list[Tensor] | None = None  # a list: each forward appends its weights (lmlab.inspection)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, C) encoder output -> keys, values (B, nh, S, hs), once per source."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None = None, need_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, C); kv from :meth:`memory_kv`; mask (B, 1, 1, S) bool or additive, or None."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = kv
        p = self.dropout if self.training else 0.0
        if need_weights or not self.fast or self.record is not None:
            y, w = attention_explicit(q, k, v, mask, False, p, self.scale)
            if self.record is not None:
                self.record.append(w.detach())
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        y = self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))
        return (y, w) if need_weights else y

    def step(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None = None) -> Tensor:
        """:meth:`forward` for one query per row (x: (B, 1, C)) in inference, unrolled."""
        B, nh, hs = x.shape[0], self.n_head, self.head_dim
        q = self.q.forward(x).view(B, nh, 1, hs)  # (B, 1, nh·hs) is (B, nh, 1, hs)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=self.scale)
        return self.proj.forward(y.reshape(B, 1, nh * hs))


def attention_explicit(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The formula, step by step. Returns the output and the attention weights (B, nh, T, S)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    T, S = q.shape[-2], k.shape[-2]
    # scores = QKᵀ/√d_k : (B, nh, T, hs) @ (B, nh, hs, S) -> (B, nh, T, S)
    scores = q @ k.transpose(-2, -1)
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
    if causal:  # query i sits at position S-T+i and may see keys 0..S-T+i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if mask is not None and mask.dtype == torch.bool:  # + M: -∞ where the mask forbids
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # an additive mask (a position bias, -∞ or a very negative number)
        scores = scores + mask
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)
