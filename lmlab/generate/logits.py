"""Logits processors: what turns the model's next-token scores into the distribution we pick from.

Two kinds, in Hugging Face's order. *Penalties* (every decoding method) look at the tokens so
far: repetition_penalty, presence/frequency penalties, no_repeat_ngram_size, bad words,
min_new_tokens. *Warpers* (sampling only) reshape the distribution: temperature, top-k,
top-p, min-p, typical-p. Each is a pure function of (logits, history) -> logits, with
filtered tokens set to -∞, so each can be checked against ``transformers`` on the same input.

Histories are Python lists of real token ids (prompt + generated, no padding), one per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmlab.generate.config import GenerationConfig

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- penalties
def _token_mask(seqs: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> Tensor:
    """(B, V) bool: True where token j occurs in row b's history."""
    mask = torch.zeros(len(seqs), vocab_size + 1, dtype=torch.bool, device=device)
    rows, ids = _flat(seqs, vocab_size, device)
    mask[rows, ids] = True
    return mask[:, :vocab_size]  # ids beyond the logits (a larger embedding) went to the spare column


def _flat(seqs: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows = torch.repeat_interleave(
        torch.arange(len(seqs)), torch.tensor([len(s) for s in seqs], dtype=torch.long)
    )
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long).clamp(max=vocab_size)
    return rows.to(device), ids.to(device)


def apply_repetition_penalty(logits: Tensor, seqs: Sequence[Sequence[int]], penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019), as Hugging Face applies it, once per seen token:
    z_j -> z_j / θ if z_j > 0 else z_j · θ  (θ > 1 makes every seen token less likely)."""
    seen = _token_mask(seqs, logits.shape[-1], logits.device)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(
    logits: Tensor, generated: Sequence[Sequence[int]], presence: float, frequency: float
) -> Tensor:
    """OpenAI's penalties over the generated tokens (not the prompt, as vLLM):
    z_j -> z_j - c_j · frequency - [c_j > 0] · presence, c_j = how often j was generated."""
    V = logits.shape[-1]
    counts = torch.zeros(len(generated), V + 1, dtype=logits.dtype, device=logits.device)
    rows, ids = _flat(generated, V, logits.device)
    counts.index_put_((rows, ids), torch.ones_like(ids, dtype=logits.dtype), accumulate=True)
    counts = counts[:, :V]
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_no_repeat_ngram(logits: Tensor, seqs: Sequence[Sequence[int]], n: int) -> Tensor:
    """Forbid any token that would complete an n-gram already in the history (prompt included,
    as Hugging Face): the last n-1 tokens are matched against every n-gram's first n-1."""
    out = logits.clone()
    V = logits.shape[-1]
    for b, seq in enumerate(seqs):
        if len(seq) < n:
            continue
        t = torch.tensor(seq, dtype=torch.long)
        windows = t.unfold(0, n, 1)  # (L-n+1, n): every n-gram
        prefix = t[len(seq) - n + 1 :]  # the n-1 tokens the next one would follow
        banned = windows[(windows[:, :-1] == prefix).all(dim=-1), -1]
        banned = banned[banned < V]
        out[b, banned.to(logits.device)] = NEG_INF
    return out


def apply_bad_words(
    logits: Tensor, seqs: Sequence[Sequence[int]], bad_words_ids: Sequence[Sequence[int]]
) -> Tensor:
    """Never complete a forbidden sequence: its last token is banned when the history ends with
    the rest of it (a one-token word is banned everywhere) — Hugging Face's NoBadWordsLogitsProcessor."""
    out = logits.clone()
    V = logits.shape[-1]
    always = [w[0] for w in bad_words_ids if len(w) == 1 and w[0] < V]
    if always:
        out[:, always] = NEG_INF
    for w in bad_words_ids:
        if len(w) < 2 or w[-1] >= V:
            continue
        prefix = list(w[:-1])
        for b, seq in enumerate(seqs):
            if len(seq) >= len(prefix) and list(seq[len(seq) - len(prefix) :]) == prefix:
                out[b, w[-1]] = NEG_INF
    return out


def apply_min_new_tokens(
    logits: Tensor, n_new: int, min_new_tokens: int, eos_token_id: Sequence[int]
) -> Tensor:
    """EOS is impossible (-∞) until ``min_new_tokens`` tokens have been generated."""
    if n_new >= min_new_tokens or not eos_token_id:
        return logits
    out = logits.clone()
    out[:, [e for e in eos_token_id if e < logits.shape[-1]]] = NEG_INF
    return out


def apply_forced(logits: Tensor, token_ids: Sequence[int]) -> Tensor:
    """Only ``token_ids`` remain possible (score 0, the rest -∞): Hugging Face's forced
    BOS/EOS processors, which leave the chosen token a log-probability of 0."""
    out = torch.full_like(logits, NEG_INF)
    out[:, [t for t in token_ids if t < logits.shape[-1]]] = 0.0
    return out


# --------------------------------------------------------------------------- warpers (sampling)
def apply_temperature(logits: Tensor, t: float) -> Tensor:
    """p_i ∝ exp(z_i / T): T < 1 sharpens, T > 1 flattens."""
    return logits / t


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits, set the rest to -∞ (Fan et al. 2018)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of tokens whose
    probability mass reaches p. As Hugging Face: sort ascending, drop tokens whose
    cumulative mass is ≤ 1 - p, always keep the most likely one."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Min-p sampling (Nguyen et al. 2024): keep tokens with p_i ≥ min_p · max_j p_j."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # the most likely token stays
    return logits.masked_fill(drop, NEG_INF)


def apply_typical_p(logits: Tensor, mass: float) -> Tensor:
    """Locally typical sampling (Meister et al. 2022): rank tokens by |−log p_i − H| (how far
    their surprise is from the entropy H = −Σ p log p), keep the closest until their mass
    reaches ``mass``. Hugging Face's TypicalLogitsWarper, step for step."""
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)  # H
    shifted = (-logp - ent).abs()
    sorted_shift, order = torch.sort(shifted, descending=False)
    cum = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=-1).clamp_(max=logits.shape[-1] - 1)
    drop_sorted = sorted_shift > sorted_shift.gather(-1, last.view(-1, 1))
    drop_sorted[..., :1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def process_logits(logits: Tensor, cfg: GenerationConfig) -> Tensor:
    """The sampling warpers in Hugging Face's order: temperature, top-k, top-p, min-p, typical-p."""
    logits = logits.float()
    if cfg.temperature not in (0.0, 1.0):
        logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k:
        logits = apply_top_k(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = apply_top_p(logits, cfg.top_p)
    if cfg.min_p is not None:
        logits = apply_min_p(logits, cfg.min_p)
    if cfg.typical_p is not None and cfg.typical_p < 1.0:
        logits = apply_typical_p(logits, cfg.typical_p)
    return logits


class Penalties:
    """The history-dependent processors a config asks for, applied in Hugging Face's order:
    repetition, (OpenAI presence/frequency,) no-repeat n-gram, bad words, min_new_tokens,
    forced BOS (the first new token), forced EOS (the last one max_new_tokens allows)."""

    def __init__(self, cfg: GenerationConfig, bad_words_ids: Sequence[Sequence[int]] = ()) -> None:
        self.cfg = cfg
        eos = set(cfg.eos_token_id)
        # as Hugging Face: a bad "word" that is just an EOS token is not forbidden
        words = [list(w) for w in [*cfg.bad_words_ids, *bad_words_ids] if not (len(w) == 1 and w[0] in eos)]
        self.bad_words_ids = words

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(
            c.repetition_penalty != 1.0
            or c.presence_penalty
            or c.frequency_penalty
            or c.no_repeat_ngram_size
            or self.bad_words_ids
            or (c.min_new_tokens and c.eos_token_id)
            or c.forced_bos_token_id is not None
            or c.forced_eos_token_id
        )

    def __call__(
        self, logits: Tensor, seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], n_new: int
    ) -> Tensor:
        """logits (B, V) for rows whose histories are ``seqs`` (prompt + ``n_new`` generated tokens)."""
        c = self.cfg
        if c.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seqs, c.repetition_penalty)
        if c.presence_penalty or c.frequency_penalty:
            generated = [s[p:] for s, p in zip(seqs, prompt_lens)]
            logits = apply_presence_frequency(logits, generated, c.presence_penalty, c.frequency_penalty)
        if c.no_repeat_ngram_size:
            logits = apply_no_repeat_ngram(logits, seqs, c.no_repeat_ngram_size)
        if self.bad_words_ids:
            logits = apply_bad_words(logits, seqs, self.bad_words_ids)
        if c.min_new_tokens:
            logits = apply_min_new_tokens(logits, n_new, c.min_new_tokens, c.eos_token_id)
        if c.forced_bos_token_id is not None and n_new == 0:
            logits = apply_forced(logits, [c.forced_bos_token_id])
        if c.forced_eos_token_id and n_new == c.max_new_tokens - 1:
            logits = apply_forced(logits, c.forced_eos_token_id)
        return logits
