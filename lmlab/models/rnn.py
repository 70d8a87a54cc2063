"""Recurrent language models: Elman RNN, GRU and LSTM over token embeddings.

    x_t      = E[id_t]                                  token embedding (d_model)
    h_t, s_t = Cell(x_t, s_{t-1})                       n_layer stacked cells (hidden_size)
    logits_t = W_out · (P h_t) + b                      P: hidden -> d_model, only when tied

The cells run in PyTorch's fused ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (oneDNN / cuDNN
kernels); :mod:`lmlab.nn.cells` writes out what they compute, and ``explicit = True`` runs
those equations instead, on the same weights. A single token on a CPU (a decoding step)
goes through PyTorch's one-step cell kernels, on the same weights: the same numbers,
without oneDNN's per-call set-up. The state s (:class:`RecurrentState`) is the hidden
vector h (RNN, GRU) or the pair (h, c) (LSTM), each (n_layer, B, hidden_size):
it is the whole memory of the past, so generating N tokens costs N single-step
updates whatever the length of the prefix, and there is no context limit —
``max_seq_len`` is only the window of truncated backpropagation through time.

As the body of a classifier it may read each text both ways (``bidirectional``, a BiLSTM:
h_t = [h→_t; h←_t], 2·hidden_size numbers, the backward pass starting at each row's last
real token). Such a model sees the future, so it has no next-token head: it cannot generate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.models.base import LanguageModel
from lmlab.models.config import RNNConfig
from lmlab.nn.cells import GATES, CellState, run_layers

_FUSED = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
_NAMES = {"rnn": "an Elman RNN", "gru": "a GRU", "lstm": "an LSTM"}


class RecurrentState:
    """An RNN's or GRU's h, an LSTM's (h, c); each (n_layer, B, hidden_size).

    The whole memory of the past, so it never fills: ``remaining`` is None. Rows are
    dimension 1 of each tensor (``select``; ``cat`` stacks states of separate prompts).
    """

    remaining: int | None = None

    def __init__(self, h: Tensor, c: Tensor | None = None) -> None:
        self.h, self.c = h, c

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """(h,) or (h, c): the form ``nn.RNN/GRU`` and ``nn.LSTM`` take."""
        return (self.h,) if self.c is None else (self.h, self.c)

    def select(self, index: Tensor) -> RecurrentState:
        """Rows ``index`` of every tensor (dim 1, the batch)."""
        index = index.to(self.h.device)
        return RecurrentState(*(t.index_select(1, index) for t in self.tensors))

    def detach(self) -> RecurrentState:
        """The same values, cut from the graph (truncated backpropagation through time)."""
        return RecurrentState(*(t.detach() for t in self.tensors))

    @staticmethod
    def cat(states: Sequence[RecurrentState]) -> RecurrentState:
        """One batch from the states of separate rows, stacked along dim 1."""
        parts = zip(*(s.tensors for s in states))
        return RecurrentState(*(torch.cat(list(p), dim=1) for p in parts))


#: What the model accepts as a state: a RecurrentState, or h / (h, c) as PyTorch's layers take.
RNNState = RecurrentState | Tensor | tuple[Tensor, Tensor]


class RNNLanguageModel(LanguageModel):
    """An autoregressive language model over a stack of recurrent layers."""

    #: The state summarises the whole past: generation never crops the context.
    bounded_context = False
    #: True: run the equations of :mod:`lmlab.nn.cells` (slow, the same numbers) instead of
    #: PyTorch's fused layer and one-step kernels, on the same weights.
    explicit: bool = False

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.bigram_emb = nn.Embedding(cfg.bigram_buckets, cfg.d_model) if cfg.bigram_buckets else None
        # Dropout on the non-recurrent connections only (Zaremba et al. 2014): the
        # embeddings, between layers (inside the fused layer) and before the output.
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.rnn = _FUSED[cfg.cell](
            cfg.d_model,
            cfg.hidden_size,
            num_layers=cfg.n_layer,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
            bidirectional=cfg.bidirectional,
        )
        # Tying the output layer to the embedding (Press & Wolf 2017) needs outputs of
        # size d_model: project h when the hidden size differs.
        tied_proj = cfg.tie_embeddings and cfg.hidden_size != cfg.d_model and not cfg.bidirectional
        self.proj = nn.Linear(cfg.hidden_size, cfg.d_model, bias=False) if tied_proj else None
        # a bidirectional body has read the next token already: no next-token head
        out = cfg.d_model if tied_proj else cfg.hidden_size
        self.lm_head = None if cfg.bidirectional else nn.Linear(out, cfg.vocab_size)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the output layer's weight with the input embedding (when configured)."""
        if self.config.tie_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """PyTorch's own inits — embedding ~ N(0, 1) (unit-scale inputs, like char-rnn's
        one-hot vectors), linear layers ~ U(-1/√fan_in, 1/√fan_in), recurrent weights
        ~ U(-1/√H, 1/√H) — with a zero output bias and an LSTM forget-gate bias of 1
        (Jozefowicz et al. 2015), so that at the start the cell keeps its memory rather
        than halving it each step. (Smaller embeddings, U(-0.1, 0.1), left a small char
        model stuck at the unigram loss for a hundred steps longer.)"""
        self.tok_emb.reset_parameters()
        if self.bigram_emb is not None:  # zeros: the model starts as the one without bigrams
            nn.init.zeros_(self.bigram_emb.weight)
        if self.lm_head is not None:
            if not self.config.tie_embeddings:
                self.lm_head.reset_parameters()
            nn.init.zeros_(self.lm_head.bias)
        if self.proj is not None:
            self.proj.reset_parameters()
        self.rnn.reset_parameters()
        if self.config.cell == "lstm":
            H = self.config.hidden_size
            ways = ("", "_reverse") if self.config.bidirectional else ("",)
            with torch.no_grad():
                for k in range(self.config.n_layer):
                    for way in ways:
                        # b_f = b_if + b_hf = 1 (rows H:2H are the forget gate's, order i, f, g, o)
                        getattr(self.rnn, f"bias_ih_l{k}{way}")[H : 2 * H].fill_(1.0)
                        getattr(self.rnn, f"bias_hh_l{k}{way}")[H : 2 * H].zero_()

    # ------------------------------------------------------------------ state
    def state_bytes(self, batch_size: int, max_len: int) -> int:
        cfg = self.config  # h (and c): n_layer · B · hidden numbers each, whatever the length
        return (2 if cfg.cell == "lstm" else 1) * cfg.n_layer * batch_size * cfg.hidden_size * self.dtype.itemsize

    def init_state(self, batch_size: int, max_len: int | None = None) -> RecurrentState:
        """Zeros, (n_layer, B, hidden) — two of them (h, c) for the LSTM. ``max_len`` is
        accepted for the protocol and ignored: the state's size does not grow."""
        cfg = self.config
        h = torch.zeros(cfg.n_layer, batch_size, cfg.hidden_size, device=self.device, dtype=self.dtype)
        return RecurrentState(h, h.clone() if cfg.cell == "lstm" else None)

    def _check_state(self, state: Any, batch_size: int) -> CellState | None:
        """The state as the fused layer wants it (h, or (h, c)), or a one-line error saying
        what is wrong."""
        if state is None:
            return None
        if isinstance(state, RecurrentState):
            state = state.tensors if state.c is not None else state.h
        cfg = self.config
        want = (cfg.n_layer, batch_size, cfg.hidden_size)
        what = "(h, c)" if cfg.cell == "lstm" else "h"
        hint = f"use model.init_state({batch_size}) or the state the model returned"
        if cfg.cell == "lstm":
            if not (isinstance(state, tuple | list) and len(state) == 2):
                raise LmlabError(f"an LSTM's state is a pair (h, c) of tensors {want}; {hint}")
            parts = tuple(state)
        else:
            if not isinstance(state, Tensor):
                raise LmlabError(f"{_NAMES[cfg.cell]}'s state is one tensor h of shape {want}; {hint}")
            parts = (state,)
        for t in parts:
            if not isinstance(t, Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise LmlabError(
                    f"state {what} must be (n_layer, batch, hidden_size) = {want}, got {got}; {hint}"
                )
        return (parts[0], parts[1]) if cfg.cell == "lstm" else parts[0]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        ids: Tensor,
        state: RNNState | None = None,
        *,
        last_only: bool = False,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,  # noqa: ARG002 - the protocol's; an RNN has no positions
        hidden: bool = False,
    ) -> tuple[Tensor, RecurrentState]:
        """ids: (B, T) continuing the sequence ``state`` summarises (None = start fresh).

        Returns logits (B, T, vocab) — (B, 1, vocab) with ``last_only`` — and the state
        after the last token. Padded batches are refused: a pad token would flow into
        the state (an RNN has no mask to skip it).
        """
        if ids.dim() != 2:
            raise LmlabError(f"token ids must have shape (batch, time), got {tuple(ids.shape)}")
        if self.config.bidirectional and not hidden:
            raise LmlabError(
                f"a bidirectional {self.config.cell.upper()} reads each text both ways: it is the body of a "
                "classifier and cannot predict the next token; train a language model without --bidirectional"
            )
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise LmlabError(
                f"{_NAMES[self.config.cell]} cannot skip padding tokens; "
                "give sequences one at a time (or of equal length) without an attention mask"
            )
        s = self._check_state(state, ids.shape[0])
        x = self._embed(ids)  # (B, T) -> (B, T, d_model)
        if (self.explicit or self._steps_cells(ids)) and not self.config.bidirectional:
            # (B, T, d_model) -> (B, T, hidden): the equations, or their one-step kernels
            out, s = run_layers(
                self.config.cell, x, self.rnn.all_weights, s, self.rnn.dropout, self.training,
                kernels=not self.explicit,
            )  # fmt: skip
        else:
            out, s = self.rnn(x, s)  # (B, T, d_model) -> (B, T, hidden): the fused layer
        state = RecurrentState(*s) if isinstance(s, tuple) else RecurrentState(s)
        if last_only:
            out = out[:, -1:]
        out = self.drop(out)
        if hidden:  # the top layer's outputs (a task head's input)
            return out, state
        if self.proj is not None:
            out = self.proj(out)  # (B, T, hidden) -> (B, T, d_model)
        return self.lm_head(out), state  # (B, T, vocab)

    def features(self, ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        """(B, T) right-padded ids -> (B, T, hidden): the top layer's output at every step (a task
        head's input). The forward recurrence never reaches padding at the end before a real
        token's output; the head reads real tokens only. Bidirectional: (B, T, 2·hidden)."""
        del token_type_ids
        if not self.config.bidirectional or attention_mask is None or bool(attention_mask.bool().all()):
            return self.forward(ids, hidden=True)[0]
        # The backward pass must start at each row's last real token, not at its padding. Each
        # row's real tokens are reversed in place (padding stays at the end), the backward
        # weights run forward over that, and the result is reversed back: right padding then
        # never reaches a real token in either direction. (Packed sequences would say the same,
        # but on a CPU they leave oneDNN's fused kernel: 30x slower at 256 tokens.)
        if ids.dim() != 2:
            raise LmlabError(f"token ids must have shape (batch, time), got {tuple(ids.shape)}")
        B, T = ids.shape
        lengths = attention_mask.long().sum(1).clamp(min=1).to(ids.device)  # (B,)
        t = torch.arange(T, device=ids.device)[None]  # (1, T)
        flip = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # its own inverse
        x = self._embed(ids)
        w = self.rnn._flat_weights  # per layer, per direction: w_ih, w_hh, b_ih, b_hh
        for k in range(self.config.n_layer):
            if k > 0 and self.training and self.config.dropout > 0:
                x = torch.nn.functional.dropout(x, self.config.dropout, True)
            fwd = self._one_way(x, w[8 * k : 8 * k + 4])
            back = _rows_gather(self._one_way(_rows_gather(x, flip), w[8 * k + 4 : 8 * k + 8]), flip)
            x = torch.cat([fwd, back], dim=-1)
        return self.drop(x * attention_mask[..., None].to(x.dtype))  # (B, T, 2·hidden), zeros at padding

    def _embed(self, ids: Tensor) -> Tensor:
        """(B, T) -> (B, T, d_model): the token embeddings, with ``bigram_buckets`` plus an
        embedding of each (previous, current) pair hashed into N buckets (fastText's n-gram
        buckets; the first token pairs with a start mark, id V):

            x_t = E[id_t] + G[bucket(id_{t-1}, id_t)]        (see :func:`bigram_bucket`)

        For Chinese characters the pairs are word-like units (很好, 不错, 失望) that the
        characters keep beside them, where a tokenizer of words would replace them."""
        x = self.tok_emb(ids)
        if self.bigram_emb is not None:
            V = self.config.vocab_size
            prev = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=V)  # (B, T): id_{t-1}, V at t = 0
            x = x + self.bigram_emb(bigram_bucket(prev, ids, V, self.config.bigram_buckets))
        return self.drop(x)

    def _one_way(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        """One recurrent layer, one direction, over (B, T, I): PyTorch's fused kernel, these weights."""
        cfg = self.config
        h = x.new_zeros(1, x.shape[0], cfg.hidden_size)
        if cfg.cell == "lstm":
            return torch._VF.lstm(x, (h, h), weights, True, 1, 0.0, self.training, False, True)[0]
        fn = torch._VF.gru if cfg.cell == "gru" else torch._VF.rnn_tanh
        return fn(x, h, weights, True, 1, 0.0, self.training, False, True)[0]

    def _steps_cells(self, ids: Tensor) -> bool:
        """Whether this call takes PyTorch's one-step cell kernels (``torch.lstm_cell`` /
        ``gru_cell`` / ``rnn_tanh_cell``, through :func:`~lmlab.nn.cells.run_layers`) on the
        fused layer's own weights: one token on a CPU (a decoding step), where nothing makes
        the fused layer compute something else — no dropout between layers (training with
        dropout > 0), no autocast (bf16 training). The same numbers as ``self.rnn``.

        Why: on a CPU ``nn.LSTM`` hands each call to oneDNN, whose set-up for a call
        outweighs one step's arithmetic: a decoding step through it ran 2× (hidden 128)
        to over 10× (hidden 512) slower than through these kernels (one thread; GRU and
        RNN, which do not use oneDNN, run about as fast either way). A window of tokens
        (training, the prompt) keeps the fused kernel: one call runs every step.
        """
        return (
            ids.shape[1] == 1
            and ids.device.type == "cpu"
            and not (self.training and self.rnn.dropout > 0)
            and not torch.is_autocast_enabled("cpu")
        )

    # ------------------------------------------------------------------ loading
    def check_weights(self, tensors: dict[str, Tensor], source: str) -> None:
        """Name the family when a checkpoint's recurrent weights are another cell's
        (say an LSTM's weights under a config that says gru): clearer than a shape list."""
        w_ih, w_hh = tensors.get("rnn.weight_ih_l0"), tensors.get("rnn.weight_hh_l0")
        if w_ih is None or w_hh is None:
            if any(k.startswith("blocks.") for k in tensors):
                raise LmlabError(
                    f"the weights in {source} are a Transformer's but its config.json describes "
                    f"{_NAMES[self.config.cell]} ({self.config.model_type}); the config was changed "
                    "or belongs to another checkpoint"
                )
            return  # load_weights lists what is missing
        H = w_hh.shape[1]
        found = next((c for c, g in GATES.items() if w_ih.shape[0] == g * H), None)
        if found is not None and found != self.config.cell:
            raise LmlabError(
                f"the weights in {source} are {_NAMES[found]}'s but its config.json says "
                f"cell={self.config.cell!r}; load it with cell={found!r} (the config was changed "
                "or belongs to another checkpoint)"
            )


#: The hash's prime modulus (2³¹ − 1) and multiplier (Knuth's 2654435761 ≈ 2³²/φ).
_HASH_M, _HASH_A = 2_147_483_647, 2_654_435_761


def bigram_bucket(prev: Tensor, ids: Tensor, vocab_size: int, buckets: int) -> Tensor:
    """The bucket of each pair: the pair's number p = prev·(V + 1) + id, mixed before it is
    cut to N buckets,

        bucket = ((p mod M) · A mod M) mod N        (M = 2³¹ − 1, a prime; A = 2654435761)

    (p mod N alone would be linear: the previous token would count only through
    prev·(V + 1) mod N, as few as 5 classes when V + 1 and N share a large factor.) Every
    product stays below 2⁶³."""
    p = (prev * (vocab_size + 1) + ids) % _HASH_M
    return p * _HASH_A % _HASH_M % buckets


def _rows_gather(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, t]] for (B, T, C) x and (B, T) index."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


__all__ = ["RNNLanguageModel", "RNNState", "RecurrentState", "bigram_bucket"]
