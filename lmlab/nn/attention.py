"""Multi-head (and grouped-query) causal self-attention with a static KV cache.

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

from lmlab.nn.layers import Linear
from lmlab.nn.positional import apply_rope


class KVCache:
    """Keys and values of every layer for every position seen so far.

    Preallocated once at its full size, (n_layer, B, n_kv_head, max_len, head_dim),
    so that decoding allocates nothing per token: step t writes slot t and attends
    over slots [0, t]. ``key_valid`` marks real tokens (False for left padding).

    ``max_len`` is what the request needs, not the model's context: the decoding loop asks
    for P + max_new_tokens - 1 slots (the last new token is never fed back), at most
    ``max_seq_len``; 2·n_layer·B·n_kv_head·max_len·head_dim numbers in all, so a 20-token
    prompt on a 32k-context model costs 19 + max_new_tokens slots, not 32k.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self.has_padding = False
        self.length = 0  # slots filled

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search keeps the cache of the surviving beams)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.key_valid = self.key_valid.index_select(0, index)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, n_kv, S, hs) -> (B, n_kv·n_rep, S, hs): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; ``n_kv_head < n_head`` gives grouped-query attention.

    Q, K and V come from one fused projection ``qkv`` (one matmul instead of three),
    laid out as [Q (n_head·hs) | K (n_kv_head·hs) | V (n_kv_head·hs)].
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
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.use_rope = use_rope
        self.dropout = dropout
        self.qkv = Linear(d_model, (n_head + 2 * n_kv_head) * head_dim, bias=qkv_bias)
        self.proj = Linear(n_head * head_dim, d_model, bias=proj_bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.fast = True  # False: use the explicit path (slower, same result)

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

        With a cache, the new keys/values are written at slots [length, length+T) and
        attention runs over slots [0, length+T); the caller advances ``cache.length``.
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
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k = cache.k[layer, :, :, : start + T]  # (B, nkv, S, hs)
            v = cache.v[layer, :, :, : start + T]
        causal = mask is None and T > 1
        if causal and k.shape[-2] != T:
            # SDPA's is_causal aligns the triangle top-left; a chunk after cached slots needs
            # query i (slot S-T+i) to see keys 0..S-T+i: bottom-right, so spell the mask out
            S = k.shape[-2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            causal = False
        p = self.dropout if self.training else 0.0
        if need_weights or not self.fast:
            y, w = attention_explicit(q, k, v, mask, causal, p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, enable_gqa=nkv != nh
            )
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, nh, T, hs) -> (B, T, C)
        y = self.resid_dropout(self.proj(y))
        return (y, w) if need_weights else y


def attention_explicit(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The formula, step by step. Returns the output and the attention weights (B, nh, T, S)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    T, S = q.shape[-2], k.shape[-2]
    # scores = QKᵀ/√d_k : (B, nh, T, hs) @ (B, nh, hs, S) -> (B, nh, T, S)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:  # query i sits at position S-T+i and may see keys 0..S-T+i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if mask is not None:  # + M: -∞ where the mask forbids
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)
