"""Attention over an RNN encoder's states: the alignment models of Bahdanau et al. (2015)
and Luong et al. (2015).

A decoder state s (the query) scores every encoder state h_j (B, S rows of memory), the
scores become weights over the real source tokens, and the weights average the memory:

    e_j = score(s, h_j)                            one number per source position
    α   = softmax(e + M)                           M_j = -∞ on padding: α_j = 0 there, Σ_j α_j = 1
    c   = Σ_j α_j h_j                              the context vector

    additive (Bahdanau, "concat" in Luong):  score = vᵀ tanh(W s + U h_j + b)
    dot      (Luong):                        score = sᵀ h_j
    general  (Luong):                        score = sᵀ W h_j

The part of each score that depends on the source alone (U h_j + b, W h_j, h_j) is the
*key*: :meth:`Alignment.keys` computes it once per source, so a decoding step costs
O(S·A) for the additive score, not O(S·A·C). Unlike the multi-head scaled dot-product
attention of :mod:`lmlab.nn.attention` (one query per token of a Transformer), these score
one recurrent state at a time and return the weights α for alignment pictures.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: The scores this module knows, by the names config files use.
SCORES = ("additive", "dot", "general")


class Alignment(nn.Module):
    """The shared part: masked softmax over the scores, then the weighted average.

    Subclasses say how a query scores the keys (:meth:`scores`) and what the keys are
    (:meth:`keys`, computed once per source)."""

    #: a list: each forward appends its weights α (B, S) (lmlab.inspection's alignment pictures)
    record: list[Tensor] | None = None

    def keys(self, memory: Tensor) -> Tensor:
        """memory (B, S, C) -> keys (B, S, K): the source's part of every score."""
        raise NotImplementedError  # pragma: no cover

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """query (B, Q), keys (B, S, K) -> e (B, S)."""
        raise NotImplementedError  # pragma: no cover

    def forward(
        self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """query (B, Q); keys (B, S, K) from :meth:`keys`; memory (B, S, C); mask (B, S) bool,
        True = a real source token (None: no padding). Returns the context (B, C) and the
        weights α (B, S), exactly 0 on padding."""
        e = self.scores(query, keys)  # (B, S)
        if mask is not None:
            # α = softmax(e + M), M_j = -∞ on padding (finfo.min: exp underflows to exactly 0)
            e = e.masked_fill(~mask, torch.finfo(e.dtype).min)
        alpha = torch.softmax(e.float(), dim=-1).to(memory.dtype)  # (B, S)
        # c = Σ_j α_j h_j:  (B, 1, S) @ (B, S, C) -> (B, C)
        context = torch.bmm(alpha[:, None], memory)[:, 0]
        if self.record is not None:
            self.record.append(alpha.detach())
        return context, alpha


class AdditiveAttention(Alignment):
    """Bahdanau's alignment model, a one-hidden-layer network over [s; h_j]:
    e_j = vᵀ tanh(W s + U h_j + b)."""

    def __init__(self, query_size: int, memory_size: int, attention_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(query_size, attention_size, bias=False)  # W
        self.key = nn.Linear(memory_size, attention_size)  # U, b
        self.v = nn.Linear(attention_size, 1, bias=False)  # vᵀ

    def keys(self, memory: Tensor) -> Tensor:
        # U h_j + b: (B, S, C) -> (B, S, A), once per source
        return self.key(memory)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        # e_j = vᵀ tanh(W s + U h_j + b): (B, 1, A) + (B, S, A) -> (B, S, A) -> (B, S)
        return self.v(torch.tanh(self.query(query)[:, None] + keys))[..., 0]


class DotAttention(Alignment):
    """Luong's dot score, e_j = sᵀ h_j: no parameters; needs len(s) = len(h_j)."""

    def keys(self, memory: Tensor) -> Tensor:
        return memory

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        # e_j = sᵀ h_j: (B, S, C) @ (B, C, 1) -> (B, S)
        return torch.bmm(keys, query[:, :, None])[..., 0]


class GeneralAttention(DotAttention):
    """Luong's general score, e_j = sᵀ W h_j: the dot score against keys W h_j, so W is
    applied once per source rather than once per step."""

    def __init__(self, query_size: int, memory_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(memory_size, query_size, bias=False)  # W

    def keys(self, memory: Tensor) -> Tensor:
        # W h_j: (B, S, C) -> (B, S, Q)
        return self.key(memory)


def make_alignment(score: str, query_size: int, memory_size: int, attention_size: int) -> Alignment:
    """The alignment model named ``score`` (one of :data:`SCORES`)."""
    if score == "additive":
        return AdditiveAttention(query_size, memory_size, attention_size)
    if score == "general":
        return GeneralAttention(query_size, memory_size)
    if score == "dot":
        if query_size != memory_size:
            raise ValueError(f"the dot score needs equal query and key sizes: {query_size} != {memory_size}")
        return DotAttention()
    raise ValueError(f"attention must be one of {', '.join(SCORES)} (got {score!r})")


__all__ = ["SCORES", "AdditiveAttention", "Alignment", "DotAttention", "GeneralAttention", "make_alignment"]
