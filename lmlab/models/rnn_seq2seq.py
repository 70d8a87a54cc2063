"""The RNN encoder-decoder with attention (Bahdanau et al. 2015; Luong et al. 2015).

    Encoder:  x_j = E[src_j]
              h_j = [h→_j; h←_j]                 a bidirectional GRU/LSTM, hidden_size/2 each way
    Start:    s_0 = tanh(W_init · mean_j h_j + b) one block of W_init per decoder layer

    Bahdanau (attention = additive): the previous state asks, the context enters the cell
              c_i = Σ_j α_ij h_j,  α_i = softmax_j(score(s_{i-1}, h_j))
              s_i = Cell([E[y_{i-1}]; c_i], s_{i-1})
              t_i = tanh(W_o [s_i; c_i; E[y_{i-1}]] + b_o)              the deep output
    Luong (attention = dot | general): the new state asks, its result is fed back
              s_i = Cell([E[y_{i-1}]; h̃_{i-1}], s_{i-1})                input feeding, h̃_0 = 0
              c_i = Σ_j α_ij h_j,  α_i = softmax_j(score(s_i, h_j))
              t_i = h̃_i = tanh(W_c [c_i; s_i])                          the attentional state
    logits_i = W_out t_i + b_out                  W_out = E_tgt when tied (t_i has d_model numbers)

Design choices, and why:

- The encoder's two directions share ``hidden_size`` (OpenNMT's habit), so its states h_j
  are as wide as the decoder's state s_i: the dot score sᵀh_j is defined, and every score
  compares vectors of one size.
- The decoder starts from the mean of the encoder states over the real tokens (Sennrich et
  al. 2017, Nematus), not Bahdanau's tanh(W_s h←_1): it needs only the memory, so
  ``init_state(B, T, memory)`` is a function of what the encoder-decoder protocol passes,
  and it sees both directions. An LSTM's cell starts at zero.
- The readout t_i has d_model numbers (Nematus), so the output layer can be tied to the
  target embedding (Press & Wolf 2017) whatever the hidden size.
- Padding never reaches a row's numbers: the encoder runs on packed sequences (each row
  stops at its length), the mean and the attention weights skip it.

The decoder is one step at a time (step i needs s_{i-1}), in a Python loop over the
target, through PyTorch's one-step cell kernels on the fused layer's weights
(:func:`lmlab.nn.cells.run_layers`); teacher forcing computes Bahdanau's readout for all
steps at once after the loop.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmlab.errors import LmlabError
from lmlab.models.config import RNNSeq2SeqConfig
from lmlab.models.encdec import EncoderDecoderModel, Memory
from lmlab.nn.alignment import make_alignment
from lmlab.nn.cells import run_layers

_FUSED = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RNNSeq2SeqState:
    """The decoder's state: s (and an LSTM's cell c), each (n_layer, B, H); Luong's fed-back
    h̃ (B, d_model); and what it keeps of the source: memory (B, S, H), keys (B, S, K) (the
    score's source part, computed once), mask (B, S) bool or None. ``length`` tokens have
    been read; ``max_len`` is the most it may read (what the decoding loop calls the context).
    """

    def __init__(
        self, h: Tensor, c: Tensor | None, feed: Tensor | None, memory: Tensor, keys: Tensor,
        mask: Tensor | None, length: int, max_len: int,
    ) -> None:  # fmt: skip
        self.h, self.c, self.feed = h, c, feed
        self.memory, self.keys, self.mask = memory, keys, mask
        self.length, self.max_len = length, max_len

    @property
    def remaining(self) -> int:
        return self.max_len - self.length

    def select(self, index: Tensor) -> RNNSeq2SeqState:
        """Rows ``index`` (kept, repeated or reordered: beams follow their parents)."""
        index = index.to(self.h.device)

        def rows(t: Tensor | None, dim: int = 0) -> Tensor | None:
            return None if t is None else t.index_select(dim, index)

        return RNNSeq2SeqState(
            rows(self.h, 1), rows(self.c, 1), rows(self.feed), rows(self.memory), rows(self.keys),
            rows(self.mask), self.length, self.max_len,
        )  # fmt: skip


class RNNSeq2Seq(EncoderDecoderModel):
    """A bidirectional GRU/LSTM encoder and an attentive GRU/LSTM decoder."""

    def __init__(self, config: RNNSeq2SeqConfig) -> None:
        super().__init__()
        self.config = cfg = config
        H, d, L = cfg.hidden_size, cfg.d_model, cfg.n_layer
        self.luong = cfg.attention != "additive"
        self.src_emb = nn.Embedding(cfg.vocab_size, d)
        self.tgt_emb = self.src_emb if cfg.share_embeddings else nn.Embedding(cfg.tgt_vocab_size, d)
        between = cfg.dropout if L > 1 else 0.0  # dropout between stacked layers, as PyTorch's
        self.encoder = _FUSED[cfg.cell](
            d, H // 2 if cfg.bidirectional else H, num_layers=L, batch_first=True,
            bidirectional=cfg.bidirectional, dropout=between,
        )  # fmt: skip
        self.bridge = nn.Linear(H, L * H)  # W_init, b: mean_j h_j -> s_0 of every layer
        self.attention = make_alignment(cfg.attention, H, H, cfg.attention_size)
        fed = d if self.luong else H  # h̃_{i-1} (Luong) or c_i (Bahdanau) beside E[y_{i-1}]
        self.decoder = _FUSED[cfg.cell](d + fed, H, num_layers=L, batch_first=True, dropout=between)
        self.readout = nn.Linear(2 * H if self.luong else 2 * H + d, d)  # W_c or W_o
        self.lm_head = nn.Linear(d, cfg.tgt_vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.tie_weights()
        if self.src_emb.weight.device.type != "meta":
            self.reset_parameters()

    def tie_weights(self) -> None:
        """One embedding for both sides when shared; the output layer = the target
        embedding when tied."""
        if self.config.share_embeddings:
            self.tgt_emb = self.src_emb
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tgt_emb.weight

    def reset_parameters(self) -> None:
        """Embeddings ~ N(0, init_std) (the output layer too, tied or not); the other linear
        layers PyTorch's U(±1/√fan_in); recurrent weights PyTorch's U(±1/√H), with an LSTM
        forget-gate bias of 1 (Jozefowicz et al. 2015); zero output bias."""
        std = self.config.init_std
        for emb in {id(e): e for e in (self.src_emb, self.tgt_emb)}.values():
            nn.init.normal_(emb.weight, 0.0, std)
        for m in (self.bridge, self.readout, *self.attention.modules()):
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        nn.init.zeros_(self.lm_head.bias)
        for rnn in (self.encoder, self.decoder):
            rnn.reset_parameters()
            if self.config.cell == "lstm":
                with torch.no_grad():
                    for name, p in rnn.named_parameters():
                        if name.startswith("bias_"):  # b_f = b_if + b_hf = 1 (blocks i, f, g, o)
                            H = p.shape[0] // 4
                            p[H : 2 * H].fill_(1.0 if name.startswith("bias_ih") else 0.0)

    # ------------------------------------------------------------------ encoder
    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Memory:
        """The source read once: (B, S) ids -> memory (B, S, H) = [h→_j; h←_j]. ``src_mask``
        (B, S), 1 = real token, must be right padding (each row's tokens first)."""
        if src.dim() != 2:
            raise LmlabError(f"source ids must have shape (batch, time), got {tuple(src.shape)}")
        B, S = src.shape
        real = None if src_mask is None else src_mask.to(device=src.device, dtype=torch.bool)
        x = self.drop(self.src_emb(src))  # (B, S) -> (B, S, d)
        if real is None or bool(real.all()):
            out, _ = self.encoder(x)  # (B, S, d) -> (B, S, H)
            return Memory(out, None)
        lengths = real.sum(dim=1)  # (B,)
        if not bool((real == (torch.arange(S, device=src.device) < lengths[:, None])).all()):
            raise LmlabError(
                "the source mask must be right padding (each row: 1 … 1 then 0 … 0); pad on the right"
            )
        if not bool((lengths > 0).all()):
            raise LmlabError("a source is empty (its mask is all 0); give each row at least one token")
        # Packed: each row's recurrence stops at its own length, so padding changes nothing.
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.encoder(packed)[0], batch_first=True, total_length=S)
        return Memory(out, real)  # (B, S, H), zeros on padding

    # ------------------------------------------------------------------ state
    def state_bytes(self, batch_size: int, max_len: int) -> int:
        cfg = self.config  # s (and c), and h̃: the same size whatever the length
        n = (2 if cfg.cell == "lstm" else 1) * cfg.n_layer * cfg.hidden_size + cfg.d_model
        return batch_size * n * self.dtype.itemsize

    def init_state(self, batch_size: int, max_len: int, memory: Memory | None = None) -> RNNSeq2SeqState:
        if memory is None:
            raise LmlabError(
                "an encoder-decoder's state needs the encoded source: init_state(B, T, model.encode(src))"
            )
        states, mask = memory.states, memory.mask  # (B, S, H), (B, S) or None
        if states.shape[0] != batch_size:
            raise LmlabError(
                f"the memory holds {states.shape[0]} sources for {batch_size} rows; select its rows first"
            )
        cfg = self.config
        H, L = cfg.hidden_size, cfg.n_layer
        if mask is None:
            mean = states.mean(dim=1)  # (B, H)
        else:  # mean_j h_j over the real tokens only
            w = mask.to(states.dtype)[..., None]  # (B, S, 1)
            mean = (states * w).sum(dim=1) / w.sum(dim=1)
        # s_0 = tanh(W_init mean_j h_j + b): (B, H) -> (B, L·H) -> (L, B, H)
        h = torch.tanh(self.bridge(mean)).view(batch_size, L, H).transpose(0, 1).contiguous()
        c = torch.zeros_like(h) if cfg.cell == "lstm" else None
        feed = states.new_zeros(batch_size, cfg.d_model) if self.luong else None  # h̃_0 = 0
        keys = self.attention.keys(states)  # (B, S, K), once per source
        return RNNSeq2SeqState(h, c, feed, states, keys, mask, 0, max_len or cfg.max_target_len)

    # ------------------------------------------------------------------ decoder
    def _cell(self, x: Tensor, st: RNNSeq2SeqState) -> Tensor:
        """One step of the stacked decoder cell: x (B, I) -> s_i (B, H); updates st.h, st.c."""
        s = (st.h, st.c) if st.c is not None else st.h
        out, s = run_layers(
            self.config.cell, x[:, None], self.decoder.all_weights, s, self.decoder.dropout, self.training,
            kernels=True,
        )  # fmt: skip
        st.h, st.c = (s[0], s[1]) if isinstance(s, tuple) else (s, None)
        return out[:, 0]

    def _decode(self, ids: Tensor, st: RNNSeq2SeqState) -> tuple[Tensor, Tensor]:
        """Read ids (B, T) from state ``st`` (advanced in place): the readouts t (B, T, d)
        and the attention weights α (B, T, S)."""
        y = self.drop(self.tgt_emb(ids))  # (B, T) -> (B, T, d)
        outs, alphas = [], []
        for i in range(ids.shape[1]):  # step i needs s_{i-1}: time is sequential
            if self.luong:
                # s_i = Cell([E y_{i-1}; h̃_{i-1}], s_{i-1});  c_i, α_i from s_i;  h̃_i = tanh(W_c [c_i; s_i])
                s = self._cell(torch.cat([y[:, i], st.feed], dim=-1), st)
                c, a = self.attention(s, st.keys, st.memory, st.mask)
                st.feed = torch.tanh(self.readout(torch.cat([c, s], dim=-1)))  # (B, 2H) -> (B, d)
                outs.append(st.feed)
            else:
                # c_i, α_i from s_{i-1} (the top layer's);  s_i = Cell([E y_{i-1}; c_i], s_{i-1})
                c, a = self.attention(st.h[-1], st.keys, st.memory, st.mask)
                s = self._cell(torch.cat([y[:, i], c], dim=-1), st)
                outs.append(torch.cat([s, c, y[:, i]], dim=-1))  # (B, 2H + d)
            alphas.append(a)
        st.length += ids.shape[1]
        t = torch.stack(outs, dim=1)  # (B, T, d) or (B, T, 2H + d)
        if not self.luong:
            t = torch.tanh(self.readout(t))  # t_i = tanh(W_o [s_i; c_i; E y_{i-1}] + b_o), all steps at once
        return t, torch.stack(alphas, dim=1)

    def _start(
        self, ids: Tensor, state: RNNSeq2SeqState | None, src: Tensor | None, src_mask: Tensor | None,
        memory: Memory | None,
    ) -> RNNSeq2SeqState:  # fmt: skip
        """The state that ``ids`` continue: the given one, or a fresh one over the source."""
        if ids.dim() != 2:
            raise LmlabError(f"token ids must have shape (batch, time), got {tuple(ids.shape)}")
        if state is None:
            if memory is None:
                if src is None:
                    raise LmlabError("an encoder-decoder needs the source: pass src=... (or memory=...)")
                memory = self.encode(src, src_mask)
            state = self.init_state(ids.shape[0], self.config.max_target_len, memory)
            if ids.shape[1] > state.remaining:
                raise LmlabError(
                    f"the target has {ids.shape[1]} tokens, more than max_target_len={state.max_len}; "
                    "shorten the targets or raise max_target_len"
                )
        elif ids.shape[1] > state.remaining:
            raise LmlabError(
                f"the decoder's state has room for {state.remaining} more tokens, {ids.shape[1]} are given"
            )
        return state

    def forward(
        self,
        ids: Tensor,
        state: RNNSeq2SeqState | None = None,
        *,
        src: Tensor | None = None,
        src_mask: Tensor | None = None,
        memory: Memory | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, RNNSeq2SeqState]:
        """Decoder ids (B, T) -> logits (B, T, V) and the state after them. With a ``state``
        the ids continue the target it holds; without one, ``memory`` (or ``src``, encoded
        here) is the source and the ids are the whole target (teacher forcing)."""
        state = self._start(ids, state, src, src_mask, memory)
        t, _ = self._decode(ids, state)
        if last_only:
            t = t[:, -1:]
        return self.lm_head(self.drop(t)), state  # (B, T, d) -> (B, T, V)

    def alignments(
        self,
        ids: Tensor,
        *,
        src: Tensor | None = None,
        src_mask: Tensor | None = None,
        memory: Memory | None = None,
    ) -> Tensor:
        """The attention weights α (B, T, S) of target ids (B, T) over the source: row i says
        where the decoder looked to predict the token after ids[:, i] (alignment pictures)."""
        return self._decode(ids, self._start(ids, None, src, src_mask, memory))[1]


__all__ = ["RNNSeq2Seq", "RNNSeq2SeqState"]
