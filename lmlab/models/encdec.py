"""The encoder-decoder protocol: read the source once, then decode like any language model.

    memory = model.encode(src, src_mask)                 # the source, read once
    state  = model.init_state(batch, max_len, memory)    # + the decoder's own state
    logits, state = model(ids, state)                     # the target, a step at a time

Training calls ``model(tgt_in, src=src, src_mask=src_mask)`` (teacher forcing: the whole
target at once). For decoding, :meth:`EncoderDecoderModel.bind` fixes the sources and
returns a :class:`Conditioned` model: a language model of the target whose state starts
from the encoded sources, so the one decoding loop of :mod:`lmlab.generate` (greedy,
sampling, beam search, penalties) serves translation and summarization unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from lmlab.models.base import LanguageModel


@dataclass
class Memory:
    """The encoder's output: ``states`` (B, S, C) and ``mask`` (B, S) bool, True = a real
    source token (None: no padding); ``sources`` (B,) the source each row holds (None: row b
    holds source b), so that a decoder state can tell when reordering its rows (beams
    following their parents) leaves what it keeps of the sources unchanged."""

    states: Tensor
    mask: Tensor | None = None
    sources: Tensor | None = None

    def source_ids(self) -> Tensor:
        return torch.arange(self.states.shape[0]) if self.sources is None else self.sources

    def select(self, index: Tensor) -> Memory:
        """Rows ``index`` (repeated for several samples or beams of one source)."""
        sources = self.source_ids()[index.cpu()]
        index = index.to(self.states.device)
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return Memory(self.states.index_select(0, index), mask, sources)


class EncoderDecoderModel(LanguageModel):
    """Base class of lmlab's encoder-decoders (the Transformer, the RNN with attention)."""

    is_encoder_decoder = True

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Memory:  # pragma: no cover
        """src: (B, S) token ids; src_mask: (B, S), 1 for real tokens, 0 for padding."""
        raise NotImplementedError

    def init_state(self, batch_size: int, max_len: int, memory: Memory | None = None) -> Any:  # pragma: no cover
        """The decoder's state for ``batch_size`` rows of ``memory``: its own cache (or
        recurrent state) for up to ``max_len`` target tokens, and what it keeps of the source."""
        raise NotImplementedError

    @property
    def target_vocab_size(self) -> int:
        return self.config.tgt_vocab_size

    def bind(self, src: Tensor, src_mask: Tensor | None = None) -> Conditioned:
        """The target language model given these sources (encoded now, once)."""
        return Conditioned(self, src, src_mask)


class Conditioned(LanguageModel):
    """An encoder-decoder with its sources fixed: to the decoding loop, a language model of
    the target. Rows of the decoding batch map to sources in order, each source repeated
    ``batch / n_sources`` times (the loop's copies of a prompt are adjacent)."""

    def __init__(self, model: EncoderDecoderModel, src: Tensor, src_mask: Tensor | None = None) -> None:
        super().__init__()
        self.training = model.training  # a wrapper: in the model's mode (not nn.Module's default, training)
        self.model = model
        self.config = SimpleNamespace(max_seq_len=model.config.max_target_len, vocab_size=model.target_vocab_size)
        self.bounded_context = True
        self.fast_decoding = model.fast_decoding
        self.screen_output = model.screen_output
        self.pack_in_place = getattr(model, "pack_in_place", True)
        self.hf_origin = model.hf_origin
        with torch.no_grad():
            self.memory = model.encode(src, src_mask)
        self.n_sources = src.shape[0]

    def _rows(self, batch_size: int) -> Memory:
        if batch_size == self.n_sources:
            return self.memory
        if batch_size % self.n_sources:
            raise ValueError(f"{batch_size} decoding rows for {self.n_sources} sources")
        rep = batch_size // self.n_sources
        return self.memory.select(torch.arange(self.n_sources).repeat_interleave(rep))

    def init_state(self, batch_size: int, max_len: int | None = None) -> Any:
        return self.model.init_state(batch_size, max_len or self.config.max_seq_len, self._rows(batch_size))

    def state_bytes(self, batch_size: int, max_len: int) -> int:
        """The decoder's state for these sources (its cache and what it keeps of each source),
        and the encoder's output repeated for every row."""
        S = self.memory.states.shape[1]
        try:
            own = self.model.state_bytes(batch_size, max_len, source_len=S)
        except TypeError:  # a model whose state does not depend on the source length
            own = self.model.state_bytes(batch_size, max_len)
        return own + batch_size * self.memory.states[0].numel() * self.memory.states.element_size()

    def forward(
        self, ids: Tensor, state: Any = None, *, last_only: bool = False, **_: Any
    ) -> tuple[Tensor, Any]:
        """The decoder's step; decoder prompts are never padded (all start at the decoder
        start token), so the loop's attention mask and position ids are not needed."""
        if state is None:
            state = self.init_state(ids.shape[0], ids.shape[1])
        return self.model(ids, state, last_only=last_only)


__all__ = ["Conditioned", "EncoderDecoderModel", "Memory"]
