"""From token ids to text: streaming deltas, stop strings, and the result objects.

Two promises hold for every output:

- the streamed deltas concatenate to the non-streamed text exactly;
- a delta never shows text that is later taken back: a character still missing some of
  its UTF-8 bytes (byte-level BPE splits Chinese characters across tokens) is held until
  complete, and so is any ending that could be the start of a stop string.

A stop string ends generation at its first occurrence in the decoded text, wherever the
token boundaries fall (it may span several tokens or start inside one); the text is cut
before it. The token ids keep every generated token, including those that spelled it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError
from lmlab.generate.beam import beam_search
from lmlab.generate.config import GenerationConfig
from lmlab.generate.logits import Penalties
from lmlab.generate.sampling import resolve_seed, sample
from lmlab.generate.speculative import check_speculative, speculative_sample
from lmlab.messages import warn
from lmlab.models.base import LanguageModel

_PARTIAL = "\ufffd"  # what decode shows for bytes that do not (yet) form a character


@dataclass
class TokenAlternative:
    """One of the most likely tokens at a step: its id, text and log-probability."""

    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    """A token with its log-probability; ``top`` holds the best alternatives at that step
    (plain :class:`TokenAlternative` objects: an alternative has no alternatives of its own)."""

    token_id: int
    token: str
    logprob: float
    top: list[TokenAlternative] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One generated sequence.

    ``finish_reason``: 'length' (max_new_tokens), 'eos' (an EOS token, kept in ``token_ids``)
    or 'stop' (a stop string, cut from ``text``). ``logprobs`` (when asked for) are those of
    the distribution each token was chosen from: after the penalties and, when sampling, the
    temperature and top-k/top-p/min-p/typical-p filters — Hugging Face's
    ``compute_transition_scores(..., normalize_logits=True)`` over ``output_scores``. Beam
    search reports its processed log-probs (what it sums) and ``score``, Hugging Face's
    ``sequences_scores``.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None


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
        if text.endswith(_PARTIAL) or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.startswith(self.emitted):  # pragma: no cover - decoders are prefix-stable
            warn("streamed text and final decode differ")
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest ending of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """One sequence's text as its tokens arrive, with stop strings (see the module's promises)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.stops = list(stops)
        self.ids: list[int] = []
        self.decoded = ""
        self.stop_at: int | None = None  # where the first stop string starts in ``decoded``
        self.emitted = ""

    def push(self, token_id: int) -> bool:
        """Add a token; True when the text now contains a stop string."""
        self.ids.append(token_id)
        self.decoded = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.stops and self.stop_at is None:
            found = [i for i in (self.decoded.find(s) for s in self.stops) if i >= 0]
            if found:
                self.stop_at = min(found)
        return self.stop_at is not None

    @property
    def text(self) -> str:
        return self.decoded if self.stop_at is None else self.decoded[: self.stop_at]

    def delta(self) -> str:
        """The text that became certain since the last call."""
        if self.stop_at is not None:
            safe = self.text
        else:
            safe = self.decoded.rstrip(_PARTIAL)  # an incomplete character may still complete
            safe = safe[: len(safe) - _held_back(safe, self.stops)]
        return self._emit(safe)

    def finish(self) -> str:
        """Everything not yet emitted (incomplete bytes as ``decode`` renders them)."""
        if not self.text.startswith(self.emitted):  # pragma: no cover - decoders are prefix-stable
            warn("streamed text and final decode differ")
            return ""
        return self._emit(self.text)

    def _emit(self, safe: str) -> str:
        if len(safe) <= len(self.emitted) or not safe.startswith(self.emitted):
            return ""
        delta, self.emitted = safe[len(self.emitted) :], safe
        return delta


def contains_stop(tokenizer: Any, stops: Sequence[str], ids: list[int]) -> bool:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in stops)


def bad_words_to_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Each forbidden string as the token ids the tokenizer gives it (no special tokens)."""
    return [ids for ids in (tokenizer.encode(w, add_special_tokens=False).ids for w in words) if ids]


def _logprobs(
    tokenizer: Any, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]]
) -> list[TokenLogprob]:
    def piece(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False)

    return [
        TokenLogprob(t, piece(t), lp, [TokenAlternative(a, piece(a), alp) for a, alp in top])
        for t, lp, top in zip(ids, lps, tops)
    ]


#: Bytes of bookkeeping per sequence beside its model state (token lists, text streams,
#: penalties' counts): a rough, generous figure, only used to refuse absurd batches.
ROW_OVERHEAD = 16 << 10


def check_rows_fit(model: LanguageModel, rows: int, max_len: int) -> None:
    """Refuse, before anything is allocated, a batch whose states and bookkeeping exceed the
    machine's memory (``num_return_sequences=10_000_000`` would otherwise grind for minutes)."""
    from lmlab.runtime import machine_memory

    per_row = ROW_OVERHEAD + model.state_bytes(1, max_len)
    have = machine_memory()
    if have is not None and rows * per_row > have:
        raise LmlabError(
            f"generating {rows:,} sequences at once (prompts × num_return_sequences × num_beams) needs about "
            f"{rows * per_row / 2**30:,.0f} GiB, more than this machine's {have / 2**30:,.0f} GiB; generate fewer at once"
        )


def generate_stream(
    model: LanguageModel,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    draft: LanguageModel | None = None,
) -> Iterator[tuple[int, str, GenerationResult | None]]:
    """Generate for a batch of tokenized prompts; yield ``(sequence, delta, result)``.

    Sequence ``i·n + j`` is the j-th of ``n = num_return_sequences`` for prompt i. ``result``
    is set (once) when that sequence ends. Beam search yields each sequence whole, at the end.
    With ``cfg.prompt_lookup_num_tokens`` or a ``draft`` (assistant) model, decoding is
    speculative (:mod:`lmlab.generate.speculative`): the same greedy text, fewer passes.
    """
    cfg.validate()
    speculative = draft is not None or cfg.prompt_lookup_num_tokens is not None
    if speculative:
        check_speculative(model, cfg, len(prompts) * cfg.num_return_sequences, draft)
    cfg.check_token_ids(model.config.vocab_size)  # the logits' width: the ids the model can produce
    n = cfg.num_return_sequences
    longest = max((len(p) for p in prompts), default=0) + cfg.max_new_tokens
    check_rows_fit(model, len(prompts) * n * cfg.num_beams, longest)
    penalties = Penalties(cfg, bad_words_to_ids(tokenizer, cfg.bad_words))
    stops = cfg.stop
    if cfg.beam_search:
        check = (lambda ids: contains_stop(tokenizer, stops, ids)) if stops else None
        for i, hyps in enumerate(beam_search(model, prompts, cfg, penalties, check)):
            for j, h in enumerate(hyps):
                ts = TextStream(tokenizer, stops)
                for t in h.tokens:
                    ts.push(t)
                if ts.stop_at is not None:
                    reason = "stop"
                elif h.tokens and h.tokens[-1] in cfg.eos_token_id:
                    reason = "eos"
                else:
                    reason = "length"
                lps = None if h.logprobs is None else _logprobs(tokenizer, h.tokens, h.logprobs, h.top)
                yield i * n + j, ts.text, GenerationResult(ts.text, h.tokens, reason, lps, h.score)
        return

    rows = [list(p) for p in prompts for _ in range(n)]
    base = resolve_seed(cfg)
    seeds = [None if base is None else base + j for _ in prompts for j in range(n)]  # copies differ
    streams = [TextStream(tokenizer, stops) for _ in rows]
    record: list[list[tuple[float, list[tuple[int, float]]]]] = [[] for _ in rows]
    if cfg.max_new_tokens == 0:
        for r in range(len(rows)):
            yield r, "", GenerationResult("", [], "length", [] if cfg.logprobs is not None else None)
        return
    should_stop = (lambda r, t: streams[r].push(t)) if stops else None
    steps = (
        speculative_sample(model, rows, cfg, seeds, should_stop, draft=draft)
        if speculative
        else sample(model, rows, cfg, seeds, penalties, should_stop)
    )
    for choices in steps:
        for c in choices:
            ts = streams[c.row]
            if not stops or c.finish == "eos":
                ts.push(c.token)  # (with stop strings, should_stop pushed it already)
            if c.logprob is not None:
                record[c.row].append((c.logprob, c.top or []))
            if c.finish is None:
                delta = ts.delta()
                if delta:
                    yield c.row, delta, None
                continue
            lps = None
            if cfg.logprobs is not None:
                lps = _logprobs(
                    tokenizer, ts.ids, [a for a, _ in record[c.row]], [b for _, b in record[c.row]]
                )
            yield c.row, ts.finish(), GenerationResult(ts.text, list(ts.ids), c.finish, lps)
