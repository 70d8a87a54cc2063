"""Speculative decoding: guess the next k tokens cheaply, check them with the model in one pass.

Decoding one token reads every weight once, so a step over k+1 positions costs about what a
step over one does (the weights are read once either way). If something cheap can guess
what the model would say next, the model checks the guesses d₁..d_k in one forward pass
and keeps those it agrees with: several tokens for the price of one read of the weights.

    propose   d₁..d_k           prompt lookup: the k tokens that followed the last time the
                                text's final n-gram occurred (no second model; it pays off when
                                the output copies its input: summaries, QA, code edits), or a
                                small draft model sharing the tokenizer, run k steps
    verify    p₁..p_{k+1}       = model(x, d₁..d_k): one forward pass, k+1 next-token distributions
    accept    greedy:    the longest prefix with d_i = argmax p_i, then argmax p_{j+1}
              sampling:  keep d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
                         rejection draw from norm(max(0, p_i − q_i)) and stop; all kept: one
                         more token from p_{k+1}

q_i is the proposer's distribution (a point mass for prompt lookup, so a guess is kept with
probability p_i(d_i) and a rejection draws from p_i without d_i). This rule makes every
token distributed exactly as the model's own sample (Leviathan et al. 2023, Chen et al.
2023); greedy decoding gives the plain greedy output token for token. The names follow
Hugging Face: ``prompt_lookup_num_tokens``, ``max_matching_ngram_size``, ``assistant_model``,
``num_assistant_tokens``.

Both models keep a KV cache of the whole text; rejected guesses are dropped by moving the
cache's end back (:meth:`lmlab.nn.cache.KVCache.rewind`). One sequence at a time (batch 1),
Transformers only (an RNN's state cannot be moved back), no penalties (they depend on the
tokens that a rejection would take back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lmlab.errors import LmlabError
from lmlab.generate.config import GenerationConfig
from lmlab.generate.logits import Penalties, process_logits
from lmlab.generate.sampling import Choice, logprob_info
from lmlab.models.base import LanguageModel
from lmlab.nn import fastpath
from lmlab.nn.cache import KVCache


def lookup_candidates(seq: Sequence[int], k: int, max_ngram: int) -> list[int]:
    """Prompt lookup: the (up to) k tokens that followed the most recent earlier occurrence of
    the text's last n-gram, trying n = max_ngram down to 1 (Hugging Face's
    ``PromptLookupCandidateGenerator``, which also takes the first match scanning from the start;
    here the most recent, the likelier continuation of what is being written now)."""
    n_seq = len(seq)
    for n in range(min(max_ngram, n_seq - 1), 0, -1):
        tail = list(seq[n_seq - n :])
        for start in range(n_seq - n - 1, -1, -1):  # latest match first, never the tail itself
            if list(seq[start : start + n]) == tail:
                follow = list(seq[start + n : start + n + k])
                if follow:
                    return follow
    return []


def check_speculative(model: LanguageModel, cfg: GenerationConfig, n_rows: int, draft: LanguageModel | None) -> None:
    """Refuse, by name, what speculative decoding does not do."""
    what = "assistant_model" if draft is not None else "prompt_lookup_num_tokens"
    if draft is not None and cfg.prompt_lookup_num_tokens is not None:
        raise LmlabError("give prompt_lookup_num_tokens or assistant_model, not both (one way of guessing at a time)")
    if n_rows != 1:
        raise LmlabError(f"{what} decodes one sequence at a time: give one prompt and num_return_sequences=1")
    if cfg.beam_search:
        raise LmlabError(f"{what} does not combine with beam search (num_beams={cfg.num_beams}): use num_beams=1")
    if Penalties(cfg).active or cfg.bad_words:
        raise LmlabError(
            f"{what} does not combine with repetition/presence/frequency penalties, no_repeat_ngram_size, "
            "bad words, min_new_tokens or forced tokens (they depend on tokens a rejected guess takes back): drop "
            "them, or set them to their neutral values (repetition_penalty=1, ...) where the model's own "
            "generation settings turn them on"
        )
    check_draft(model, draft, what)


def check_draft(model: LanguageModel, draft: LanguageModel | None, what: str = "assistant_model") -> None:
    """The models speculative decoding can rewind and compare: Transformers (a recurrent state
    cannot move back) with the same token ids. Also what ``lmlab serve --draft`` checks at load."""
    for m, name in ((model, "the model"), (draft, "the assistant model")):
        if m is not None and not m.bounded_context:
            raise LmlabError(
                f"{what} needs a Transformer ({name} is a recurrent network, whose state cannot be rewound)"
            )
    if draft is not None and draft.config.vocab_size != model.config.vocab_size:
        raise LmlabError(
            f"the assistant model has {draft.config.vocab_size} token ids, the model {model.config.vocab_size}: "
            "they must share the tokenizer"
        )


class _Cached:
    """One model over one growing sequence: a KV cache that can move back."""

    def __init__(self, model: LanguageModel, slots: int) -> None:
        self.model = model
        fastpath.prepare(model)
        self.cache: KVCache = model.init_state(1, slots)
        if not hasattr(self.cache, "rewind"):
            raise LmlabError("speculative decoding needs a model whose state is a KV cache")

    @property
    def length(self) -> int:
        return self.cache.length

    def feed(self, ids: Sequence[int]) -> Tensor:
        """(len(ids), V) float logits after each of ``ids``, appended to the cache."""
        x = torch.tensor([list(ids)], device=self.model.device)
        logits, self.cache = self.model(x, self.cache)
        return logits[0].float()

    def rewind(self, length: int) -> None:
        self.cache.rewind(self.cache.length - length)


@torch.inference_mode()
def speculative_sample(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    seeds: Sequence[int | None],
    should_stop: Callable[[int, int], bool] | None = None,
    *,
    draft: LanguageModel | None = None,
    stats: dict[str, Any] | None = None,
) -> Iterator[list[Choice]]:
    """:func:`lmlab.generate.sampling.sample`'s protocol, for one prompt (each yield: the list of
    tokens one pass produced, in order, the last one ending the row if it does), with the next tokens guessed by prompt lookup (``cfg.prompt_lookup_num_tokens``) or
    by ``draft`` (``cfg.num_assistant_tokens`` at a time) and verified k at a time.
    ``stats`` (optional) receives the counts: proposed, accepted, forward passes."""
    cfg.validate()
    check_speculative(model, cfg, len(prompts), draft)
    if cfg.max_new_tokens == 0:
        return
    k = cfg.num_assistant_tokens if draft is not None else cfg.prompt_lookup_num_tokens
    if not k or k < 1:
        raise LmlabError("speculative decoding needs prompt_lookup_num_tokens >= 1 or an assistant_model")
    prompt = list(prompts[0])
    if not prompt:
        raise LmlabError("the prompt is empty and the model has no BOS token to start from; give a prompt")
    ctx = model.config.max_seq_len
    whose = "the model's"
    if draft is not None and draft.config.max_seq_len < ctx:
        ctx, whose = draft.config.max_seq_len, "the assistant model's"
    if len(prompt) + cfg.max_new_tokens > ctx:
        fix = (f"use max_new_tokens <= {ctx - len(prompt)}" if len(prompt) < ctx
               else "shorten the prompt, or decode without speculative decoding (a sliding window)")  # fmt: skip
        raise LmlabError(
            f"speculative decoding keeps the whole text in the cache: the prompt ({len(prompt)} tokens) + "
            f"max_new_tokens ({cfg.max_new_tokens}) must fit {whose} context of {ctx} tokens; {fix}"
        )
    k = min(k, ctx)  # guesses past the context could never be checked
    gen = None
    if not cfg.greedy:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(int(seeds[0]) if seeds[0] is not None else 0)
    eos = set(cfg.eos_token_id)
    slots = len(prompt) + cfg.max_new_tokens + k
    target = _Cached(model, min(slots, ctx + k))
    helper = _Cached(draft, min(slots, ctx + k)) if draft is not None else None
    counts = stats if stats is not None else {}
    counts.update(proposed=0, accepted=0, forwards=1)

    def dist_of(logits: Tensor) -> Tensor:  # the distribution a token is chosen from (processed logits)
        return logits if cfg.greedy else process_logits(logits, cfg)

    seq = list(prompt)
    if len(prompt) > 1:  # the target's cache holds every token but the last, which each round reads first
        target.feed(prompt[:-1])
    helper_pending = list(prompt)  # tokens the draft's cache has not read yet
    produced = 0
    while True:
        room = min(k, cfg.max_new_tokens - produced - 1)  # the last token is never checked against a guess
        guesses: list[int] = []
        q_rows: list[Tensor] = []
        if room > 0 and helper is not None:
            for _ in range(room):
                q_logits = dist_of(helper.feed(helper_pending)[-1:])
                if cfg.greedy:
                    d = int(q_logits.argmax(-1))
                else:
                    q = q_logits.softmax(-1)
                    d = int(torch.multinomial(q, 1, generator=gen))
                    q_rows.append(q[0])
                guesses.append(d)
                helper_pending = [d]
        elif room > 0:
            guesses = lookup_candidates(seq, room, cfg.max_matching_ngram_size)
        counts["proposed"] += len(guesses)
        # verify: one pass over the last token and the guesses gives p_1..p_{len+1}
        dists = dist_of(target.feed([seq[-1], *guesses]))  # (len+1, V)
        counts["forwards"] += 1
        accepted: list[int] = []
        final: int | None = None
        for i, d in enumerate(guesses):
            if cfg.greedy:
                best = int(dists[i].argmax())
                if best == d:
                    accepted.append(d)
                    continue
                final = best
                break
            p = dists[i].softmax(-1)
            q_d = float(q_rows[i][d]) if q_rows else 1.0
            if float(torch.rand((), generator=gen)) * q_d < float(p[d]):  # u < p(d) / q(d)
                accepted.append(d)
                continue
            if q_rows:  # the residual max(0, p − q), renormalised
                residual = (p - q_rows[i]).clamp(min=0)
            else:  # q a point mass at d: p without d
                residual = p.clone()
                residual[d] = 0.0
            total = float(residual.sum())
            final = int(torch.multinomial(residual / total, 1, generator=gen)) if total > 0 else int(p.argmax())
            break
        j = len(accepted)
        if final is None:  # every guess kept: one more token from the distribution after the last
            row = dists[j : j + 1]
            final = int(row.argmax()) if cfg.greedy else int(torch.multinomial(row.softmax(-1), 1, generator=gen))
        counts["accepted"] += j
        # The target's cache read seq and every guess: keep seq and the accepted ones.
        target.rewind(len(seq) + j)
        new = [*accepted, final]
        if helper is not None:  # the draft read seq and the guesses but the last: keep what stands
            keep = min(helper.length, len(seq) + j)
            helper.rewind(keep)
            helper_pending = ([*seq, *new])[keep:]
        round_choices: list[Choice] = []
        for i, t in enumerate(new):
            seq.append(t)
            produced += 1
            finish = None
            if t in eos:
                finish = "eos"
            elif should_stop is not None and should_stop(0, t):
                finish = "stop"
            elif produced == cfg.max_new_tokens:
                finish = "length"
            lp, top = None, None
            if cfg.logprobs is not None:  # of the distribution the token was chosen from
                lps, tops = logprob_info(torch.log_softmax(dists[i : i + 1], dim=-1), torch.tensor([t]), cfg.logprobs)
                lp, top = lps[0], tops[0]
            round_choices.append(Choice(0, t, finish, lp, top))
            if finish is not None:
                break
        yield round_choices  # the tokens of one pass together (a server streams them at once)
        if round_choices[-1].finish is not None:
            return


__all__ = ["check_speculative", "lookup_candidates", "speculative_sample"]
