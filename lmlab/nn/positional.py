"""Positional encodings: sinusoidal, learned absolute, and rotary (RoPE).

Self-attention is permutation-invariant; these tell it where each token sits.
Sinusoidal and learned tables are *added* to the token embedding; RoPE instead
*rotates* queries and keys, so their dot product depends only on the offset m - n.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n_pos: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """Vaswani et al. (2017), section 3.5.

    PE(pos, 2i)   = sin(pos / 10000^(2i/d))
    PE(pos, 2i+1) = cos(pos / 10000^(2i/d))

    ``layout="halves"`` puts the same numbers as [all sines | all cosines] (Marian, fairseq):
    PE(pos, i) = sin(pos/10000^(2i/d)) and PE(pos, d/2 + i) = cos(...) for i < d/2.
    """
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (d/2,)
    angle = pos / (10000.0 ** (two_i / d_model))  # (P, d/2)
    pe = torch.zeros(n_pos, d_model, dtype=torch.float64)
    if layout == "halves":
        half = d_model // 2
        pe[:, :half], pe[:, half:] = torch.sin(angle), torch.cos(angle)
    else:
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle)
    return pe.float()


class SinusoidalPositions(nn.Module):
    """A fixed table, stored as a non-persistent buffer (nothing to learn or save)."""

    def __init__(self, max_seq_len: int, d_model: int, layout: str = "interleaved") -> None:
        super().__init__()
        self.layout = layout
        self.register_buffer("table", sinusoidal_table(max_seq_len, d_model, layout), persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.table[position_ids]


class LearnedPositions(nn.Module):
    """GPT-2's ``wpe``: one trainable vector per position."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_seq_len, d_model))

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.weight[position_ids]


#: rows of RoPE's cos/sin table made up front (more on demand)
INITIAL_POSITIONS = 4096


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) in the "rotate half" layout used by Llama and GPT-NeoX.

    For frequency θ_i = base^(-2i/d), the pair (x_i, x_{i+d/2}) at position m is rotated
    by the angle m·θ_i:  x' = x·cos(mθ) + rotate_half(x)·sin(mθ),
    where rotate_half(x) = (-x_2, x_1) for x = (x_1, x_2) split in halves.
    Then ⟨R_m q, R_n k⟩ depends on m - n only: relative position for free.
    Only the first ``rotary_dim`` channels of each head rotate (partial rotary).
    """

    def __init__(self, rotary_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        # float32 arithmetic, as Hugging Face does, so imported models match bit for bit
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # The table starts at no more than INITIAL_POSITIONS rows and grows on demand (forward):
        # a 32k-token model's full table is 16 MiB that a short chat never reads. Row m is
        # m·θ whatever the table's length, so growing changes no value.
        cos, sin = self._table(min(max_seq_len, INITIAL_POSITIONS))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, n: int) -> tuple[Tensor, Tensor]:
        """cos and sin of m·θ_i for m < n, in float32 from ``base`` (not from the ``inv_freq``
        buffer, which a model cast to bf16 carries in bf16), on the CPU."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.rotary_dim, 2).float() / self.rotary_dim))
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (n, rd/2): m·θ_i
        emb = torch.cat([freqs, freqs], dim=-1)  # (n, rd): both halves share θ_i
        return emb.cos(), emb.sin()

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin for the given positions: (..., T) -> (..., T, rotary_dim)."""
        if int(position_ids.max()) >= self.cos.shape[0]:  # grow the table on demand
            cos, sin = self._table(max(int(position_ids.max()) + 1, 2 * self.cos.shape[0]))
            # as the first rows were made: fp32, then cast like the model (bf16: rounded once)
            self.cos, self.sin = cos.to(self.cos.device, self.cos.dtype), sin.to(self.sin.device, self.sin.dtype)
        return self.cos[position_ids], self.sin[position_ids]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, nh, T, hs); cos/sin: (B or 1, 1, T, rd). Rotates the first rd channels."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def rope_reference_angle(m: int, i: int, d: int, base: float = 10000.0) -> float:
    """m·θ_i with θ_i = base^(-2i/d): used by tests to check the table by hand."""
    return m * base ** (-2 * i / d)


def relative_bucket(rel: Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position ``rel = key position − query position``.

    Near offsets get a bucket each; far ones share logarithmically wider buckets, up to
    ``max_distance`` (Raffel et al. 2020, §2.1). With ``bidirectional`` (the encoder) half
    the buckets are for keys after the query; a decoder sees only the past (rel ≤ 0).

        n = |rel|                      (decoder: n = max(−rel, 0))
        bucket = n                                           if n < n_exact
               = n_exact + ⌊log(n/n_exact)/log(max_distance/n_exact) · (N − n_exact)⌋  (≤ N−1)
    with N the buckets per direction and n_exact = N/2.
    """
    bucket = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        bucket = bucket + (rel > 0).long() * n_buckets
        n = rel.abs()
    else:
        n = (-rel).clamp(min=0)
    exact = n_buckets // 2
    far = exact + (
        torch.log(n.float() / exact) / math.log(max_distance / exact) * (n_buckets - exact)
    ).long()
    far = far.clamp(max=n_buckets - 1)
    return bucket + torch.where(n < exact, n, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores: T5's only position
    signal. Computed once per forward and shared by every layer of the stack."""

    def __init__(self, n_buckets: int, max_distance: int, n_head: int, bidirectional: bool) -> None:
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(n_buckets, n_head))

    def forward(self, q_start: int, T: int, S: int) -> Tensor:
        """(1, nh, T, S): the bias of queries at positions [q_start, q_start+T) over keys [0, S)."""
        q = torch.arange(q_start, q_start + T, device=self.weight.device)[:, None]
        k = torch.arange(S, device=self.weight.device)[None, :]
        b = relative_bucket(k - q, self.bidirectional, self.n_buckets, self.max_distance)  # (T, S)
        return self.weight[b].permute(2, 0, 1)[None]  # (T, S, nh) -> (1, nh, T, S)
