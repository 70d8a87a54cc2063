"""Decoding: one loop for every model family.

    repeat: logits = model(last token, state); next = choose(process(logits))

The model's ``state`` (a Transformer's KV cache, an RNN's hidden vector) makes each
step cost one token of work. Option names follow Hugging Face ``generate``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from lmlab.errors import LmlabError
from lmlab.models.base import LanguageModel


@dataclass
class GenerationConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        elif self.eos_token_id is None:
            self.eos_token_id = []
        self.validate()

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise LmlabError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if self.temperature is None or self.temperature < 0:
            raise LmlabError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy")
        if self.top_k is not None and self.top_k < 0:
            raise LmlabError(f"top_k must be >= 0 (got {self.top_k}); 0 turns it off")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise LmlabError(f"top_p must be in (0, 1] (got {self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> GenerationConfig:
        """Defaults <- a checkpoint's generation_config.json <- explicit options."""
        names = {f.name for f in fields(cls)}
        merged = {k: v for k, v in d.items() if k in names and v is not None}
        if d.get("do_sample") is False and overrides.get("temperature") is None:
            merged["temperature"] = 0.0  # Hugging Face: do_sample=False means greedy
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- logits processing
def apply_temperature(logits: Tensor, t: float) -> Tensor:
    """p_i ∝ exp(z_i / T): T < 1 sharpens, T > 1 flattens."""
    return logits / t


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits, set the rest to -∞ (Fan et al. 2018)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of tokens whose
    probability mass reaches p. As Hugging Face: sort ascending, drop tokens whose
    cumulative mass is ≤ 1 - p, always keep the most likely one."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, cfg: GenerationConfig) -> Tensor:
    """Warpers in Hugging Face's order: temperature, top-k, top-p."""
    logits = logits.float()
    if cfg.temperature not in (0.0, 1.0):
        logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k:
        logits = apply_top_k(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = apply_top_p(logits, cfg.top_p)
    return logits


def choose(logits: Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) next tokens: argmax when greedy, else a draw from softmax."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, cfg).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


# --------------------------------------------------------------------------- the loop
def _warn(msg: str) -> None:
    print(f"lmlab: warning: {msg}", file=sys.stderr)


@torch.inference_mode()
def generate_tokens(model: LanguageModel, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[int]:
    """Yield new token ids one at a time (stops at max_new_tokens or an EOS token).

    A Transformer sees at most ``max_seq_len`` tokens. A longer prompt is cut to its
    last ``max_seq_len`` tokens; once prompt + output fill the window, each new token
    is predicted from the last ``max_seq_len`` tokens (a sliding window, as nanoGPT
    crops), recomputed without the cache since absolute positions shift.
    """
    cfg.validate()
    if not prompt_ids:
        raise LmlabError("the prompt is empty and the model has no BOS token to start from; give a prompt")
    if cfg.max_new_tokens == 0:
        return
    device = model.device
    gen = None
    if not cfg.greedy:
        gen = torch.Generator(device=device)
        # No seed: draw one from torch's global generator (so torch.manual_seed makes a run
        # reproducible, as in Hugging Face) without reseeding that generator from the OS.
        seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 1 << 62, (1,)))
        gen.manual_seed(seed)
    ctx = model.config.max_seq_len if model.bounded_context else None
    tokens = list(prompt_ids)
    warned = False  # one warning per call: a truncated prompt implies the sliding window
    if ctx is not None and len(tokens) > ctx:
        _warn(
            f"the prompt has {len(tokens)} tokens, more than the model's context of {ctx}; "
            f"using its last {ctx} (and a sliding window of the last {ctx} as it continues)"
        )
        tokens = tokens[-ctx:]
        warned = True
    eos = set(cfg.eos_token_id)
    state = model.init_state(1, ctx) if ctx is not None else model.init_state(1, 0)
    ids = torch.tensor([tokens], device=device)
    logits, state = model(ids, state, last_only=True)
    sliding = False
    for i in range(cfg.max_new_tokens):
        nxt = int(choose(logits[:, -1], cfg, gen)[0])
        yield nxt
        if nxt in eos or i == cfg.max_new_tokens - 1:
            return
        tokens.append(nxt)
        if ctx is not None and (sliding or state.length >= ctx):
            if not sliding and not warned:
                _warn(
                    f"prompt + new tokens exceed the context of {ctx} tokens; "
                    f"continuing over a sliding window of the last {ctx}"
                )
            sliding = True
            logits, _ = model(torch.tensor([tokens[-ctx:]], device=device), None, last_only=True)
        else:
            logits, state = model(torch.tensor([[nxt]], device=device), state, last_only=True)


class IncrementalDecoder:
    """Token ids in, text deltas out, such that the deltas concatenate to
    ``tokenizer.decode(all_ids, skip_special_tokens=True)`` exactly.

    Byte-level BPE may split one character (a Chinese character is 3 UTF-8 bytes)
    across tokens; until it completes, the decoded text ends in U+FFFD, and we hold
    those bytes back rather than print a replacement character we cannot take back.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.startswith(self.emitted):  # pragma: no cover - decoders are prefix-stable
            _warn("streamed text and final decode differ")
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta
