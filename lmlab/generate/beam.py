"""Beam search, step for step as Hugging Face ``generate(num_beams=..., do_sample=False)`` does it.

Each prompt keeps ``num_beams`` running hypotheses. A step scores every continuation of every
beam by its summed log-probability, keeps the best ``2·num_beams`` candidates (more with several
EOS tokens, so that enough stay open when the best ones end), moves those that ended (EOS, a
stop string, max_new_tokens) among the best ``num_beams`` into the finished list with the score

    score(y) = Σ_t log p(y_t | y_<t) / |y|^length_penalty      (|y| = new tokens)

and continues with the best ``num_beams`` that did not end. The search stops when no running
beam can beat the worst finished one (``early_stopping``: True = as soon as ``num_beams`` have
finished; False = Hugging Face's heuristic at the current length; "never" = the bound at
max_new_tokens when length_penalty > 0). The model's state follows the beams: a KV cache's rows
(:meth:`KVCache.reorder`) or an RNN's (index_select on dim 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmlab.generate.config import GenerationConfig
from lmlab.generate.logits import Penalties
from lmlab.generate.runner import Runner
from lmlab.models.base import LanguageModel

_NEG = -1.0e9  # Hugging Face's "impossible" score (finite, so sums stay ordered)


@dataclass
class Hypothesis:
    """A finished beam: its new tokens, its score, and per-token log-probs when asked for."""

    tokens: list[int]
    score: float
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """t[b, index[b, m], ...] for a (B, K, ...) tensor and (B, M) indices -> (B, M, ...)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.inference_mode()
def beam_search(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    penalties: Penalties | None = None,
    is_stopped: Callable[[list[int]], bool] | None = None,
) -> list[list[Hypothesis]]:
    """The ``num_return_sequences`` best hypotheses of each prompt, best first.

    ``is_stopped(new_tokens)`` says whether a candidate has hit a stop string (text layer).
    """
    cfg.validate()
    B, K, T = len(prompts), cfg.num_beams, cfg.max_new_tokens
    n_ret = cfg.num_return_sequences
    if T == 0:
        return [[Hypothesis([], 0.0, [], []) for _ in range(n_ret)] for _ in prompts]
    penalties = penalties or Penalties(cfg)
    use_penalties = penalties.active
    lp_pow = cfg.length_penalty
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.long)
    n_keep = max(2, 1 + len(cfg.eos_token_id)) * K  # candidates kept per prompt and step
    top_k_mask = torch.arange(n_keep) < K  # only the best K candidates may enter the finished list
    n_alt = cfg.logprobs or 0
    want_lp = cfg.logprobs is not None

    runner = Runner(model, T)
    logits = runner.prefill(prompts)  # (B, V)
    V = logits.shape[-1]
    expand = torch.arange(B).repeat_interleave(K)  # every prompt's state, K times
    runner.select(expand)
    logits = logits[expand.to(logits.device)]
    prompt_lens = [len(prompts[b]) for b in range(B) for _ in range(K)]

    running = torch.zeros(B, K, T, dtype=torch.long)  # new tokens of the running beams
    running_scores = torch.zeros(B, K)
    running_scores[:, 1:] = _NEG  # at first all beams are equal: expand only the first
    finished = running.clone()
    finished_scores = torch.full((B, K), _NEG)
    finished_len = torch.zeros(B, K, dtype=torch.long)
    is_finished = torch.zeros(B, K, dtype=torch.bool)
    improvable = torch.ones(B, 1, dtype=torch.bool)
    # per-token log-probs (and the n best alternatives), carried along with the tokens
    run_lp, fin_lp = torch.zeros(B, K, T), torch.zeros(B, K, T)
    run_alt_id, fin_alt_id = (
        torch.zeros(B, K, T, n_alt, dtype=torch.long),
        torch.zeros(B, K, T, n_alt, dtype=torch.long),
    )
    run_alt_lp, fin_alt_lp = torch.zeros(B, K, T, n_alt), torch.zeros(B, K, T, n_alt)

    for cur in range(T):
        # log p(y_t | y_<t), then the penalties (Hugging Face applies them to log-probs in beam search)
        logp = torch.log_softmax(logits.float().cpu(), dim=-1)
        if use_penalties:  # (the histories are built only for them)
            rows = running.reshape(B * K, T)[:, :cur].tolist()
            seqs = [list(prompts[i // K]) + rows[i] for i in range(B * K)]
            logp = penalties(logp, seqs, prompt_lens, cur)
        acc = (logp.view(B, K, V) + running_scores[:, :, None]).reshape(B, K * V)  # Σ log p so far
        cand_scores, cand_idx = torch.topk(acc, n_keep)  # (B, n_keep)
        src = cand_idx // V  # which beam each candidate extends
        tok = cand_idx % V
        cand = _gather(running, src)
        cand[:, :, cur] = tok
        if want_lp:
            cand_lp = _gather(run_lp, src)
            cand_lp[:, :, cur] = logp.view(B, K * V).gather(1, cand_idx)
            cand_alt_id, cand_alt_lp = _gather(run_alt_id, src), _gather(run_alt_lp, src)
            if n_alt:
                alt_lp, alt_id = logp.topk(min(n_alt, V), dim=-1)  # (B·K, n)
                pad = n_alt - alt_lp.shape[-1]
                alt_lp = torch.nn.functional.pad(alt_lp, (0, pad), value=float("-inf"))
                alt_id = torch.nn.functional.pad(alt_id, (0, pad))
                cand_alt_id[:, :, cur] = _gather(alt_id.view(B, K, n_alt), src)
                cand_alt_lp[:, :, cur] = _gather(alt_lp.view(B, K, n_alt), src)

        # which candidates end here: EOS, the last allowed token, or a stop string
        hits = torch.isin(tok, eos) if len(eos) else torch.zeros_like(tok, dtype=torch.bool)
        if cur == T - 1:
            hits[:] = True
        if is_stopped is not None:
            for b in range(B):
                for j in range(n_keep):
                    if not hits[b, j] and is_stopped(cand[b, j, : cur + 1].tolist()):
                        hits[b, j] = True

        # the best K candidates that go on
        open_scores = cand_scores + hits.to(torch.float32) * _NEG
        nxt = torch.topk(open_scores, K)[1]
        running, running_scores, running_src = (
            _gather(cand, nxt),
            _gather(open_scores, nxt),
            _gather(src, nxt),
        )
        if want_lp:
            run_lp, run_alt_id, run_alt_lp = (
                _gather(cand_lp, nxt),
                _gather(cand_alt_id, nxt),
                _gather(cand_alt_lp, nxt),
            )

        # the finished list: merge in candidates that ended among the best K, keep the best K
        just_ended = hits & top_k_mask[None, :]
        s = cand_scores / ((cur + 1) ** lp_pow)  # score = Σ log p / |y|^length_penalty
        full = torch.all(is_finished, dim=-1, keepdim=True) & (cfg.early_stopping is True)
        s += full.to(torch.float32) * _NEG
        s += (~improvable).to(torch.float32) * _NEG
        s += (~just_ended) * _NEG
        best = torch.topk(torch.cat((finished_scores, s), dim=1), K)[1]
        finished = _gather(torch.cat((finished, cand), dim=1), best)
        finished_scores = _gather(torch.cat((finished_scores, s), dim=1), best)
        finished_len = _gather(torch.cat((finished_len, torch.full_like(tok, cur + 1)), dim=1), best)
        is_finished = _gather(torch.cat((is_finished, just_ended), dim=1), best)
        if want_lp:
            fin_lp = _gather(torch.cat((fin_lp, cand_lp), dim=1), best)
            fin_alt_id = _gather(torch.cat((fin_alt_id, cand_alt_id), dim=1), best)
            fin_alt_lp = _gather(torch.cat((fin_alt_lp, cand_alt_lp), dim=1), best)

        # can a running beam still beat the worst finished one?
        n_new = cur + 1
        best_len = T if (cfg.early_stopping == "never" and lp_pow > 0.0) else n_new
        best_possible = running_scores[:, :1] / (best_len**lp_pow)
        worst = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)
        all_full = bool(torch.all(is_finished)) and cfg.early_stopping is True
        if not bool(torch.any(improvable)) or all_full or bool(torch.all(hits)):
            break

        flat = (running_src + torch.arange(B)[:, None] * K).reshape(-1)  # (B·K,) rows to keep
        runner.select(flat)
        rows = running.reshape(B * K, T)[:, : cur + 1].tolist()
        logits = runner.step(
            running[:, :, cur].reshape(-1), [list(prompts[i // K]) + rows[i] for i in range(B * K)]
        )

    out = []
    for b in range(B):
        hyps = []
        for j in range(n_ret):
            n = int(finished_len[b, j])
            h = Hypothesis(finished[b, j, :n].tolist(), float(finished_scores[b, j]))
            if want_lp:
                h.logprobs = fin_lp[b, j, :n].tolist()
                h.top = [
                    [
                        (int(i), float(v))
                        for i, v in zip(fin_alt_id[b, j, t], fin_alt_lp[b, j, t])
                        if v > float("-inf")
                    ]
                    for t in range(n)
                ]
            hyps.append(h)
        out.append(hyps)
    return out
