"""Feeding a batch of token sequences to a model one step at a time, whatever its state.

    logits = runner.prefill(prompts)       # (N, V): the next-token scores after each prompt
                                           #   (512 prompt tokens per pass: chunked prefill)
    runner.select(index)                   # keep / repeat / reorder rows (finished rows, beams)
    logits = runner.step(tokens, seqs)     # (N, V) after appending tokens (N,)

A Transformer's prompts of different lengths are left-padded into one batch, with an
attention mask and per-row position ids (Hugging Face's ``cumsum(mask) - 1``), so each row
sees exactly what it would see alone. A recurrent model runs each prompt on its own (its
state has no mask to skip padding), then decodes the rows together: the states are stacked
along their batch dimension (``RecurrentState.cat``). Past that, the loop touches a state
only through the protocol every state follows (:class:`lmlab.models.base.State`):
``select(index)`` and ``remaining``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from lmlab.errors import LmlabError
from lmlab.messages import warn
from lmlab.models.base import LanguageModel, State
from lmlab.models.rnn import RecurrentState
from lmlab.nn import fastpath, screen


def cache_slots(prompt_len: int, max_new_tokens: int, ctx: int) -> int:
    """KV cache positions a request needs, allocated once before its first token.

    slots = min(P + max_new_tokens - 1, ctx), at least P: the prompt and every new token but
    the last (it is never fed back), never more than the context (past it, the sliding window
    recomputes without a cache). Not ``ctx`` itself: a short request on a 32k-context model
    would hold 32k positions of keys and values for nothing.
    """
    return max(prompt_len, min(prompt_len + max_new_tokens - 1, ctx))


#: prompt tokens per forward pass of a prefill (vLLM's and llama.cpp's micro-batch: 512)
PREFILL_CHUNK = 512


def _left_pad(seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """ids, attention mask and position ids of left-padded rows.

    mask_bt = 1 for real tokens; position_bt = max(cumsum_t(mask_b) - 1, 0), so each row's
    first real token has position 0 whatever its padding (as Hugging Face)."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, T - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[b, T - len(s) :] = 1
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


class Runner:
    """The model side of decoding: prefill, one-token steps, row selection, the sliding window."""

    def __init__(self, model: LanguageModel, max_new_tokens: int, screen_keep: Sequence[int] | None = None) -> None:
        """``screen_keep``: set by a greedy loop whose logits only pick an argmax (after masks
        that may remove these tokens): the output layer may then screen in bf16 and give
        exact logits for its candidates only, −∞ elsewhere (:mod:`lmlab.nn.screen`)."""
        self.model = model
        self.device = model.device
        self.max_new_tokens = max_new_tokens
        self.ctx: int | None = model.config.max_seq_len if model.bounded_context else None
        self.state: State | None = None
        self.padded = False
        self.next_pos: Tensor | None = None  # (N,) the position of each row's next token
        self.sliding = False
        self.warned = False
        fast = fastpath.prepare(model)  # on the CPU: oneDNN matmuls, unless model.fast_decoding is False
        # one-token steps without module calls (an int8/int4 model's layers are not FastLinear)
        self.unroll = (bool(fast) or fastpath.quantized(model)) and fastpath.unobserved(model)
        self.keep, self.bias = None, None
        asked = getattr(model, "screen_output", None)
        if fast and asked is not None and not asked:
            screen.prepare(model, on=False)  # its int8/bf16 copy goes too
        elif fast:  # (every decode: a bf16 head's copy goes once it is no longer asked for)
            n, self.bias = screen.prepare(model, bf16=bool(asked))
            if n and screen_keep is not None:
                self.keep = screen.keep_tensor(screen_keep).to(self.device)

    def _call(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the model's own signature
        with screen.screening(self.keep, self.bias) if self.keep is not None else nullcontext(), fastpath.unrolling(self.unroll):
            return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ prefill
    def prefill(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        """(N, V) float logits of the token after each prompt."""
        if any(len(p) == 0 for p in prompts):
            raise LmlabError(
                "the prompt is empty and the model has no BOS token to start from; give a prompt"
            )
        if self.ctx is None:
            return self._prefill_recurrent(prompts)
        ctx = self.ctx
        longest = max(len(p) for p in prompts)
        if longest > ctx:
            self._warn(
                f"the prompt has {longest} tokens, more than the model's context of {ctx}; "
                f"using its last {ctx} (and a sliding window of the last {ctx} as it continues)"
            )
            prompts = [p[-ctx:] for p in prompts]
        elif longest + self.max_new_tokens - 1 > ctx:
            # Said now, before the first token is streamed, rather than when the window slides
            # (mid-text on a terminal). The last new token is predicted from prompt + n - 1
            # tokens, so the window slides iff P + n - 1 > ctx; EOS or a stop string may end
            # generation before that, hence "may".
            self._warn(
                f"the prompt ({longest} tokens) + max_new_tokens ({self.max_new_tokens}) may run past "
                f"the model's context of {ctx} tokens; past it, generation continues over a sliding "
                f"window of the last {ctx} tokens"
            )
        lengths = [len(p) for p in prompts]
        P = max(lengths)
        self.state = self.model.init_state(len(prompts), cache_slots(P, self.max_new_tokens, ctx))
        self.padded = min(lengths) != P
        if self.padded:
            ids, mask, pos = _left_pad(prompts, self.device)
        else:
            ids, mask, pos = torch.tensor([list(p) for p in prompts], device=self.device), None, None
        # Chunked prefill: a long prompt goes through the cache PREFILL_CHUNK tokens at a time,
        # each chunk attending to the slots before it, so no activation is ever (T × d_ff) or
        # (T × S) for the whole prompt: a 4k-token prompt's transients are an eighth as large.
        for a in range(0, P, PREFILL_CHUNK):
            part = slice(a, a + PREFILL_CHUNK)
            extra = {"attention_mask": mask[:, part], "position_ids": pos[:, part]} if self.padded else {}
            logits, self.state = self._call(ids[:, part], self.state, last_only=True, **extra)
        self.next_pos = torch.tensor(lengths, device=self.device)
        return logits[:, -1].float()

    def _prefill_recurrent(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        if len({len(p) for p in prompts}) == 1:  # equal lengths: one batched call
            ids = torch.tensor([list(p) for p in prompts], device=self.device)
            logits, self.state = self._call(ids, None, last_only=True)
            return logits[:, -1].float()
        rows, states = [], []
        for p in prompts:  # each prompt alone: an RNN cannot skip padding
            logits, state = self._call(torch.tensor([list(p)], device=self.device), None, last_only=True)
            rows.append(logits[:, -1])
            states.append(state)
        self.state = RecurrentState.cat(states)
        return torch.cat(rows).float()

    # ------------------------------------------------------------------ rows
    def select(self, index: Tensor) -> None:
        """Keep rows ``index`` (a LongTensor, may repeat rows: beams, samples of one prompt)."""
        index = index.to(self.device)
        if not self.sliding and self.state is not None:
            self.state = self.state.select(index)
        if self.next_pos is not None:
            self.next_pos = self.next_pos.index_select(0, index)

    # ------------------------------------------------------------------ steps
    def step(self, tokens: Tensor, seqs: Sequence[Sequence[int]]) -> Tensor:
        """(N, V) logits after appending ``tokens`` (N,); ``seqs`` are the rows' full histories
        (ending with ``tokens``), needed only once the window slides."""
        tokens = tokens.to(self.device)
        if self.ctx is None:
            logits, self.state = self._call(tokens[:, None], self.state, last_only=True)
            return logits[:, -1].float()
        if not self.sliding and self.state.remaining > 0:
            if not self.padded:  # every row's position is its slot: the model's default
                logits, self.state = self._call(tokens[:, None], self.state, last_only=True)
                return logits[:, -1].float()
            pos = self.next_pos[:, None]
            logits, self.state = self._call(tokens[:, None], self.state, position_ids=pos, last_only=True)
            self.next_pos = self.next_pos + 1
            return logits[:, -1].float()
        return self._window(seqs)

    def _window(self, seqs: Sequence[Sequence[int]]) -> Tensor:
        """Beyond the cache: recompute each row's last ``ctx`` tokens without a cache, as nanoGPT
        crops (absolute positions shift, so the cache cannot be reused)."""
        ctx = self.ctx  # (prefill warned about this up front)
        self.sliding, self.state = True, None
        windows = [s[-ctx:] for s in seqs]
        if len({len(w) for w in windows}) == 1:
            logits, _ = self._call(torch.tensor(windows, device=self.device), None, last_only=True)
        else:
            ids, mask, pos = _left_pad(windows, self.device)
            logits, _ = self._call(ids, None, attention_mask=mask, position_ids=pos, last_only=True)
        return logits[:, -1].float()

    def _warn(self, msg: str) -> None:
        """One warning per call, from prefill: a truncated prompt already implies the sliding
        window, and a window that will slide is known from P + max_new_tokens before the first
        token (so the warning never lands in the middle of streamed text)."""
        if not self.warned:
            warn(msg)
            self.warned = True
