"""Beam search, step for step as Hugging Face ``generate(num_beams=..., do_sample=False)`` does it.

Each prompt keeps ``num_beams`` running hypotheses. A step scores every continuation of every
beam by its summed log-probability, keeps the best ``2·num_beams`` candidates (more with several
EOS tokens, so that enough stay open when the best ones end), moves those that ended (EOS, a
stop string, max_new_tokens) among the best ``num_beams`` into the finished list with the score

    score(y) = Σ_t log p(y_t | y_<t) / |y|^length_penalty      (|y| = new tokens)

and continues with the best ``num_beams`` that did not end. The search stops when no running
beam can beat the worst finished one (``early_stopping``: True = as soon as ``num_beams`` have
finished; False = Hugging Face's heuristic at the current length; "never" = the bound at
max_new_tokens when length_penalty > 0). The model's state follows the beams (``state.select``, the
state protocol), whatever the model.

One step, in the order below: :func:`_expand` (score every continuation, keep the best
candidates), :func:`_ended` (which candidates end), :func:`_keep_running` (the best K that go
on), :meth:`_Finished.add` (the best K that ended), :func:`_improvable` (the stopping rule).
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


@dataclass
class _Rows:
    """Token rows with what travels with each token: its log-prob and the n best alternatives.

    tokens (B, M, T) long; logprobs (B, M, T); alt_ids, alt_logprobs (B, M, T, n_alt).
    """

    tokens: Tensor
    logprobs: Tensor
    alt_ids: Tensor
    alt_logprobs: Tensor

    @classmethod
    def zeros(cls, B: int, K: int, T: int, n_alt: int) -> _Rows:
        long = torch.long
        return cls(
            torch.zeros(B, K, T, dtype=long), torch.zeros(B, K, T),
            torch.zeros(B, K, T, n_alt, dtype=long), torch.zeros(B, K, T, n_alt),
        )  # fmt: skip

    def gather(self, index: Tensor) -> _Rows:
        """Rows ``index`` (B, M) of each prompt."""
        return _Rows(*(_gather(t, index) for t in self._fields()))

    def cat(self, other: _Rows) -> _Rows:
        """These rows, then ``other``'s, for each prompt."""
        return _Rows(*(torch.cat((a, b), dim=1) for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.tokens, self.logprobs, self.alt_ids, self.alt_logprobs


def _top(acc: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(acc.view(B, K·V), n)`` in two stages: each beam's best n+1, then the best
    n+1 of those K·(n+1), of which the first n are returned. The best n+1 overall are each
    among their own beam's best n+1, so this is the one-stage result whenever it is unique:
    when the n+1 best scores are all different. Where two of them are equal (ties: which of
    the equal candidates ``torch.topk`` keeps, and in which order, is its own choice) or
    one is NaN, the one-stage top-k decides, so beams are what Hugging Face's single
    ``topk`` gives. 2.3× faster than one top-k over K·V (0.22 vs 0.52 ms, 4 × 58,101)."""
    B, K, V = acc.shape
    m = n + 1
    if m <= V:
        s, i = acc.topk(m, dim=-1)  # (B, K, m)
        best, j = s.reshape(B, K * m).topk(m)  # (B, m): j indexes the K·m
        if not bool((best[:, 1:] == best[:, :-1]).any()) and not bool(best.isnan().any()):
            idx = i.reshape(B, K * m).gather(1, j) + (j // m) * V
            return best[:, :n], idx[:, :n]
    return torch.topk(acc.reshape(B, K * V), n)


def _expand(
    logp: Tensor, running: _Rows, running_scores: Tensor, n_keep: int, cur: int, n_alt: int
) -> tuple[Tensor, Tensor, _Rows]:
    """Score every continuation y_t of every beam by Σ log p so far + log p(y_t | y_<t) and
    keep the best ``n_keep`` of each prompt: their scores (B, n_keep), the beam each extends
    (B, n_keep), and their rows with token ``cur`` filled in."""
    B, K = running_scores.shape
    V = logp.shape[-1]
    acc = logp.view(B, K, V) + running_scores[:, :, None]  # Σ log p so far
    cand_scores, cand_idx = _top(acc, n_keep)  # (B, n_keep), indices into K·V
    src = cand_idx // V  # which beam each candidate extends
    cand = running.gather(src)
    cand.tokens[:, :, cur] = cand_idx % V
    cand.logprobs[:, :, cur] = logp.view(B, K * V).gather(1, cand_idx)
    if n_alt:
        alt_lp, alt_id = logp.topk(min(n_alt, V), dim=-1)  # (B·K, n)
        pad = n_alt - alt_lp.shape[-1]
        alt_lp = torch.nn.functional.pad(alt_lp, (0, pad), value=float("-inf"))
        alt_id = torch.nn.functional.pad(alt_id, (0, pad))
        cand.alt_ids[:, :, cur] = _gather(alt_id.view(B, K, n_alt), src)
        cand.alt_logprobs[:, :, cur] = _gather(alt_lp.view(B, K, n_alt), src)
    return cand_scores, src, cand


def _ended(
    cand: Tensor, eos: Tensor, cur: int, last: bool, is_stopped: Callable[[list[int]], bool] | None
) -> Tensor:
    """(B, n_keep) bool: the candidates that end with token ``cur``: EOS, the last allowed
    token, or a stop string."""
    tok = cand[:, :, cur]
    hits = torch.isin(tok, eos) if len(eos) else torch.zeros_like(tok, dtype=torch.bool)
    if last:
        hits[:] = True
    if is_stopped is not None:
        for b in range(hits.shape[0]):
            for j in range(hits.shape[1]):
                if not hits[b, j] and is_stopped(cand[b, j, : cur + 1].tolist()):
                    hits[b, j] = True
    return hits


def _keep_running(
    cand: _Rows, cand_scores: Tensor, src: Tensor, hits: Tensor, K: int
) -> tuple[_Rows, Tensor, Tensor]:
    """The best K candidates that did not end: their rows, scores and source beams."""
    open_scores = cand_scores + hits.to(torch.float32) * _NEG
    nxt = torch.topk(open_scores, K)[1]
    return cand.gather(nxt), _gather(open_scores, nxt), _gather(src, nxt)


@dataclass
class _Finished:
    """The K best finished hypotheses of each prompt so far (empty slots score _NEG)."""

    rows: _Rows
    scores: Tensor  # (B, K)
    length: Tensor  # (B, K) new tokens
    done: Tensor  # (B, K) bool: the slot holds a hypothesis

    @classmethod
    def empty(cls, B: int, K: int, T: int, n_alt: int) -> _Finished:
        return cls(
            _Rows.zeros(B, K, T, n_alt), torch.full((B, K), _NEG),
            torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, dtype=torch.bool),
        )  # fmt: skip

    def add(
        self,
        cand: _Rows,
        cand_scores: Tensor,
        hits: Tensor,
        cur: int,
        cfg: GenerationConfig,
        improvable: Tensor,
    ) -> None:
        """Merge in the candidates that ended among the best K, keep the best K.

        score(y) = Σ log p / |y|^length_penalty. A prompt whose list is full (early_stopping
        True) or that can no longer improve takes nothing more.
        """
        K = self.scores.shape[1]
        just_ended = hits & (torch.arange(hits.shape[1]) < K)[None, :]
        s = cand_scores / ((cur + 1) ** cfg.length_penalty)
        full = torch.all(self.done, dim=-1, keepdim=True) & (cfg.early_stopping is True)
        s += full.to(torch.float32) * _NEG
        s += (~improvable).to(torch.float32) * _NEG
        s += (~just_ended) * _NEG
        best = torch.topk(torch.cat((self.scores, s), dim=1), K)[1]
        self.rows = self.rows.cat(cand).gather(best)
        self.scores = _gather(torch.cat((self.scores, s), dim=1), best)
        self.length = _gather(
            torch.cat((self.length, torch.full_like(hits, cur + 1, dtype=torch.long)), dim=1), best
        )
        self.done = _gather(torch.cat((self.done, just_ended), dim=1), best)

    def hypotheses(self, n_ret: int, want_lp: bool) -> list[list[Hypothesis]]:
        """The ``n_ret`` best of each prompt, best first."""
        out = []
        for b in range(self.scores.shape[0]):
            hyps = []
            for j in range(n_ret):
                n = int(self.length[b, j])
                h = Hypothesis(self.rows.tokens[b, j, :n].tolist(), float(self.scores[b, j]))
                if want_lp:
                    h.logprobs = self.rows.logprobs[b, j, :n].tolist()
                    ids, lps = self.rows.alt_ids[b, j], self.rows.alt_logprobs[b, j]
                    h.top = [
                        [(int(i), float(v)) for i, v in zip(ids[t], lps[t]) if v > float("-inf")]
                        for t in range(n)
                    ]
                hyps.append(h)
            out.append(hyps)
        return out


def _improvable(
    improvable: Tensor, running_scores: Tensor, finished: _Finished, n_new: int, cfg: GenerationConfig
) -> Tensor:
    """(B, 1) bool: can a running beam of each prompt still beat its worst finished one?

    The best a running beam can reach is its score so far over |y|^length_penalty at the
    current length (early_stopping False, Hugging Face's heuristic), or at max_new_tokens
    ("never" with length_penalty > 0: longer only divides by more)."""
    lp_pow = cfg.length_penalty
    best_len = cfg.max_new_tokens if (cfg.early_stopping == "never" and lp_pow > 0.0) else n_new
    best_possible = running_scores[:, :1] / (best_len**lp_pow)
    worst = torch.where(finished.done, torch.min(finished.scores, dim=1, keepdim=True)[0], _NEG)
    return improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)


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
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.long)
    n_keep = max(2, 1 + len(cfg.eos_token_id)) * K  # candidates kept per prompt and step
    n_alt = cfg.logprobs or 0

    runner = Runner(model, T)
    logits = runner.prefill(prompts)  # (B, V)
    expand = torch.arange(B).repeat_interleave(K)  # every prompt's state, K times
    runner.select(expand)
    logits = logits[expand.to(logits.device)]
    prompt_lens = [len(prompts[b]) for b in range(B) for _ in range(K)]

    running = _Rows.zeros(B, K, T, n_alt)  # new tokens of the running beams
    running_scores = torch.zeros(B, K)
    running_scores[:, 1:] = _NEG  # at first all beams are equal: expand only the first
    finished = _Finished.empty(B, K, T, n_alt)
    improvable = torch.ones(B, 1, dtype=torch.bool)

    def histories(n: int) -> list[list[int]]:  # prompt + the first n new tokens of each beam
        rows = running.tokens.reshape(B * K, T)[:, :n].tolist()
        return [list(prompts[i // K]) + rows[i] for i in range(B * K)]

    for cur in range(T):
        # log p(y_t | y_<t), then the penalties (Hugging Face applies them to log-probs in beam search)
        logp = torch.log_softmax(logits.float().cpu(), dim=-1)
        if penalties.active:  # (the histories are built only for them)
            logp = penalties(logp, histories(cur), prompt_lens, cur)
        cand_scores, src, cand = _expand(logp, running, running_scores, n_keep, cur, n_alt)
        hits = _ended(cand.tokens, eos, cur, cur == T - 1, is_stopped)
        running, running_scores, running_src = _keep_running(cand, cand_scores, src, hits, K)
        finished.add(cand, cand_scores, hits, cur, cfg, improvable)
        improvable = _improvable(improvable, running_scores, finished, cur + 1, cfg)
        all_full = bool(torch.all(finished.done)) and cfg.early_stopping is True
        if not bool(torch.any(improvable)) or all_full or bool(torch.all(hits)):
            break
        runner.select((running_src + torch.arange(B)[:, None] * K).reshape(-1))  # (B·K,) rows to keep
        logits = runner.step(running.tokens[:, :, cur].reshape(-1), histories(cur + 1))

    return finished.hypotheses(n_ret, cfg.logprobs is not None)
