"""The one protocol every lmlab language model follows.

    logits, state = model(ids, state)

``ids`` is a (B, T) tensor of token ids; ``logits`` is (B, T, vocab) — or (B, 1, vocab)
with ``last_only=True`` — the scores of the *next* token after each position.
``state`` is what the model carries forward: the key/value cache of a Transformer,
the hidden (and cell) vectors of an RNN. Pass ``None`` to start fresh. Because every
model speaks this protocol, one trainer, one decoding loop and one checkpoint format
serve them all, and comparing an LSTM with a Transformer is a fair fight.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lmlab.nn.int4 import Int4Linear
from lmlab.nn.quantize import QuantLinear


@runtime_checkable
class State(Protocol):
    """What the decoding loop may do with a model's state, whatever the family: a
    Transformer's :class:`~lmlab.nn.cache.KVCache`, an RNN's
    :class:`~lmlab.models.rnn.RecurrentState`. The rest of it is the model's business.
    """

    def select(self, index: Tensor) -> State:
        """The state of batch rows ``index`` (kept, repeated or reordered: finished rows
        leave, beams follow their parents). May update in place and return itself."""
        ...

    @property
    def remaining(self) -> int | None:
        """How many more tokens fit (a KV cache's free slots); None when unbounded (an RNN)."""
        ...


class LanguageModel(nn.Module):
    """Base class: subclasses implement ``forward`` and ``init_state``."""

    config: Any
    #: True if the model sees a bounded window (a Transformer's max_seq_len).
    bounded_context: bool = True
    #: Where an imported model came from (model_type, folder, its config and tokenizer
    #: config): what ``export`` needs to write the family back as it was. None: trained here.
    hf_origin: dict[str, Any] | None = None
    #: The weight quantization applied after loading ("int8"), None for float weights.
    quantization: str | None = None
    #: Decode on a CPU with the faster kernel of :mod:`lmlab.nn.fastpath` (oneDNN linear
    #: layers, the same function); set False to decode on the plain ``F.linear`` path.
    fast_decoding: bool = True
    #: Greedy decoding on that path reads a large fp32 output layer as an int8 (or bf16) copy
    #: and rescores its few candidates in fp32 (:mod:`lmlab.nn.screen`: the exact argmax, a
    #: quarter of the layer's bytes a step, a copy of that size kept). None (the default): fp32
    #: output layers only — a bf16 one's int8 copy is half its bytes, +14% of a Qwen2-0.5B's
    #: memory for ~9% faster greedy steps, so only on request; True: bf16 ones too; False: none.
    screen_output: bool | None = None
    #: On that path a bf16 layer's packed copy (an fp32 one's, on lmlab's fp32 kernel) *replaces* its weight (the weights held once:
    #: :class:`lmlab.nn.fastpath.FastLinear`; read back whole through the module or state_dict);
    #: set False to keep plain weights beside the copies, for code that reads ``parameters()``
    #: while the model decodes.
    pack_in_place: bool = True

    def forward(  # pragma: no cover - abstract
        self, ids: Tensor, state: Any = None, *, last_only: bool = False, **kw: Any
    ) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def init_state(self, batch_size: int, max_len: int) -> Any:  # pragma: no cover
        """A fresh state for ``batch_size`` sequences of up to ``max_len`` tokens."""
        raise NotImplementedError

    def state_bytes(self, batch_size: int, max_len: int) -> int:
        """Bytes of the state ``init_state(batch_size, max_len)`` would allocate (checked
        against the machine's memory before a batch starts)."""
        return 0

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen: set[int] = set()
        n = 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and ("emb" in name.split(".")[0]):
                continue
            n += p.numel()
        # an int8 or int4 model's linear layers keep their weights and biases as buffers: still parameters
        for m in self.modules():
            if isinstance(m, (QuantLinear, Int4Linear)):
                n += m.out_features * m.in_features + (0 if m.bias is None else m.bias.numel())
        return n
