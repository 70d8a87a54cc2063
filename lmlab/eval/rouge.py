"""ROUGE of summaries, computed by Google's ``rouge-score`` (the package behind the
published numbers; it works offline).

    ROUGE-N  = F1 of the n-grams the summary shares with the reference (N = 1, 2)
    ROUGE-L  = F1 from the longest common subsequence (LCS) of the two token lists
    ROUGE-Lsum = ROUGE-L over sentences: each reference sentence's union LCS with the
               summary's sentences; sentences are split on newlines (NLTK's sentence
               splitter needs a download, so put one sentence per line if it matters)

Tokens are lowercased words with Porter stemming (``use_stemmer``: "running" = "run").
rouge-score's own tokenizer keeps only [a-z0-9] and so drops Chinese entirely; text with
Han characters is scored per character instead (each Han character a token, other words
as rouge-score makes them), as Chinese ROUGE is usually reported. Several references per
summary: the mean of the scores against each (``aggregate="max"``: the best one). Scores
are averaged over summaries and given ×100.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lmlab.errors import LmlabError
from lmlab.eval.bleu import _HAN, is_chinese

KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class HanCharTokenizer:
    """Each Han character a token; the rest as rouge-score's default tokenizer makes it
    (lowercased [a-z0-9]+ words, stemmed)."""

    def __init__(self, use_stemmer: bool = True) -> None:
        from rouge_score import tokenize

        self.words = tokenize
        self.stemmer = None
        if use_stemmer:
            from nltk.stem import porter

            self.stemmer = porter.PorterStemmer()
        self.split = re.compile(f"({_HAN.pattern})")

    def tokenize(self, text: str) -> list[str]:
        out: list[str] = []
        for part in self.split.split(text):
            if not part:
                continue
            if _HAN.fullmatch(part):
                out.append(part)
            else:
                out.extend(self.words.tokenize(part, self.stemmer))
        return out


def rouge_scores(
    summaries: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    aggregate: str = "mean",
    chinese: bool | None = None,
) -> dict[str, Any]:
    """{"rouge1", "rouge2", "rougeL", "rougeLsum"} F1 × 100 over the corpus, and "n"."""
    from rouge_score import rouge_scorer

    if aggregate not in ("mean", "max"):
        raise LmlabError(f"aggregate must be mean or max (got {aggregate!r})")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(summaries):
        raise LmlabError(f"{len(summaries)} summaries but {len(refs)} references; give one (or a list) per summary")
    if not summaries:
        raise LmlabError("nothing to score: no summaries")
    if chinese is None:
        chinese = is_chinese([r for rs in refs for r in rs])
    tokenizer = HanCharTokenizer() if chinese else None
    scorer = rouge_scorer.RougeScorer(list(KEYS), use_stemmer=True, tokenizer=tokenizer)
    total = dict.fromkeys(KEYS, 0.0)
    for i, (s, rs) in enumerate(zip(summaries, refs)):
        if not rs or not all(isinstance(r, str) for r in rs):
            raise LmlabError(f"summary {i + 1} has no reference text; give at least one reference string")
        each = [scorer.score(r, s) for r in rs]  # score(target, prediction)
        for k in KEYS:
            f = [e[k].fmeasure for e in each]
            total[k] += max(f) if aggregate == "max" else sum(f) / len(f)
    n = len(summaries)
    return {**{k: round(100 * v / n, 4) for k, v in total.items()}, "n": n, "aggregate": aggregate,
            "tokenizer": "han-char" if chinese else "rouge-score (stemmed)"}  # fmt: skip


__all__ = ["KEYS", "HanCharTokenizer", "rouge_scores"]
