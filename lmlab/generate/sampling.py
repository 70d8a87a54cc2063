"""Greedy decoding and sampling, for a batch of rows in lockstep.

    repeat: z = model(last tokens, state); z = penalties(z, history)
            greedy: next = argmax z          sampling: next ~ softmax(warpers(z))

Each row has its own random generator, seeded with the row's seed, so a row samples the
same text in a batch as alone. A row that ends (EOS, a stop string, max_new_tokens) leaves
the batch: its state is dropped and the others go on without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmlab.generate.config import GenerationConfig
from lmlab.generate.logits import Penalties, process_logits
from lmlab.generate.runner import Runner
from lmlab.models.base import LanguageModel


@dataclass
class Choice:
    """One row's token at one step, with its log-probability when asked for."""

    row: int
    token: int
    finish: str | None = None  # 'eos' | 'stop' | 'length' when this token ends the row
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # the best alternatives (token id, log-prob)


def resolve_seed(cfg: GenerationConfig) -> int | None:
    """The seed of a sampling run. Without one, draw it from torch's global generator (so
    ``torch.manual_seed`` makes a run reproducible, as in Hugging Face) without reseeding
    that generator from the OS. Greedy decoding and beam search draw nothing."""
    if cfg.greedy or cfg.beam_search:
        return None
    return cfg.seed if cfg.seed is not None else int(torch.randint(0, 1 << 62, (1,)))


def logprob_info(logp: Tensor, tokens: Tensor, n: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """log p(chosen) per row and the n most likely tokens (finite ones only), best first."""
    chosen = logp.gather(-1, tokens[:, None].to(logp.device))[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in range(logp.shape[0])]
    if n > 0:
        vals, ids = logp.topk(min(n, logp.shape[-1]), dim=-1)
        vals_l, ids_l = vals.tolist(), ids.tolist()  # one conversion, not one per element
        tops = [[(i, v) for i, v in zip(ir, vr) if math.isfinite(v)] for ir, vr in zip(ids_l, vals_l)]
    return chosen, tops


def argmax_only(cfg: GenerationConfig, penalties: Penalties) -> list[int] | None:
    """When each step's logits serve only an argmax after masks (greedy, no log-probs, no
    penalty that rescales or follows the history's n-grams): the tokens those masks may
    remove — each bad word's last token, EOS before min_new_tokens. Forcing needs no
    logit (the forced token wins whatever its score). None: every logit is needed."""
    c = cfg
    if not c.greedy or c.logprobs is not None or c.repetition_penalty != 1.0 or c.presence_penalty:
        return None
    if c.frequency_penalty or c.no_repeat_ngram_size:
        return None
    keep = [w[-1] for w in penalties.bad_words_ids]
    return keep + list(c.eos_token_id) if c.min_new_tokens else keep


@torch.inference_mode()
def sample(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    seeds: Sequence[int | None],
    penalties: Penalties | None = None,
    should_stop: Callable[[int, int], bool] | None = None,
) -> Iterator[list[Choice]]:
    """Yield, at each step, the token of every row still running (rows indexed as ``prompts``).

    ``should_stop(row, token)`` is asked after each token that is not EOS (stop strings live
    in the text layer above); True ends the row with finish reason 'stop'.
    """
    cfg.validate()
    if cfg.max_new_tokens == 0:
        return
    penalties = penalties or Penalties(cfg)
    eos = set(cfg.eos_token_id)
    gens = None
    if not cfg.greedy:
        gens = [torch.Generator(device=model.device) for _ in prompts]
        for g, s in zip(gens, seeds):
            g.manual_seed(int(s))
    runner = Runner(model, cfg.max_new_tokens, screen_keep=argmax_only(cfg, penalties))
    seqs = [list(p) for p in prompts]
    prompt_lens = [len(p) for p in prompts]
    active = list(range(len(prompts)))
    use_penalties = penalties.active
    logits = runner.prefill(prompts)  # (N, V)
    for step in range(cfg.max_new_tokens):
        if use_penalties:
            logits = penalties(logits, [seqs[r] for r in active], [prompt_lens[r] for r in active], step)
        if cfg.greedy:
            dist = logits
            tokens = logits.max(dim=-1).indices  # (argmax, first of ties; a third of its time on a CPU)
        else:
            dist = process_logits(logits, cfg)
            probs = dist.softmax(dim=-1)
            tokens = torch.cat(
                [torch.multinomial(probs[i : i + 1], 1, generator=gens[r])[0] for i, r in enumerate(active)]
            )
        lps, tops = None, None
        if cfg.logprobs is not None:  # of the distribution the token was chosen from
            lps, tops = logprob_info(torch.log_softmax(dist, dim=-1), tokens, cfg.logprobs)
        choices, keep = [], []
        for i, (r, t) in enumerate(zip(active, tokens.tolist())):
            seqs[r].append(t)
            finish = None
            if t in eos:
                finish = "eos"
            elif should_stop is not None and should_stop(r, t):
                finish = "stop"
            elif step == cfg.max_new_tokens - 1:
                finish = "length"
            if finish is None:
                keep.append(i)
            choices.append(
                Choice(r, t, finish, None if lps is None else lps[i], None if tops is None else tops[i])
            )
        yield choices
        if not keep:
            return
        if len(keep) < len(active):  # finished rows leave the batch
            index = torch.tensor(keep, dtype=torch.long)
            runner.select(index)
            tokens = tokens[index.to(tokens.device)]
            active = [active[i] for i in keep]
        logits = runner.step(tokens, [seqs[r] for r in active])


def generate_tokens(model: LanguageModel, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[int]:
    """The new token ids of one prompt, one at a time (greedy or sampled; no beams, no text).

    A Transformer sees at most ``max_seq_len`` tokens. A longer prompt is cut to its
    last ``max_seq_len`` tokens; once prompt + output fill the window, each new token
    is predicted from the last ``max_seq_len`` tokens (a sliding window, as nanoGPT
    crops), recomputed without the cache since absolute positions shift.
    """
    for choices in sample(model, [prompt_ids], cfg, [resolve_seed(cfg)]):
        yield choices[0].token
