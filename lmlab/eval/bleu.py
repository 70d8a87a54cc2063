"""BLEU and chrF of translations, computed by sacreBLEU.

sacreBLEU is the field's reference implementation: it tokenizes detokenized text itself,
so scores are comparable across papers, and its *signature* (``nrefs:1|case:mixed|
eff:no|tok:13a|smooth:exp|version:2.6.0``) records every choice that changes the number.
Scores are cased (the default) and corpus-level: n-gram counts are summed over all
sentences before the ratios are taken, not averaged per sentence.

    BLEU = BP · exp(¼ Σₙ₌₁⁴ log pₙ),   pₙ = clipped matching n-grams / hypothesis n-grams,
    BP = min(1, exp(1 − r/c)),          r = reference length, c = hypothesis length

(a zero pₙ is smoothed: the k-th zero becomes 1 / (2ᵏ · total n-grams), sacreBLEU's 'exp').
chrF is the F-score (β = 2: recall weighs twice) of character n-grams, n = 1..6; it
needs no tokenizer and rewards a nearly right word that BLEU counts as wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lmlab.errors import LmlabError

#: Han ideographs (the unified blocks, their extensions and the compatibility ones).
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
#: Hiragana and katakana: text with Han characters and kana is Japanese, not Chinese.
_KANA = re.compile("[\u3040-\u30ff\u31f0-\u31ff]")


def is_chinese(texts: Sequence[str]) -> bool:
    """True when most of the non-empty ``texts`` are Chinese: they hold Han characters and
    no kana. sacreBLEU's 13a tokenizer splits on spaces, which Chinese does not use, so a
    whole Chinese sentence would be one "word"; its 'zh' tokenizer splits every Han
    character apart instead (and treats any other text as 13a does)."""
    texts = [t for t in texts if t.strip()]
    chinese = sum(1 for t in texts if _HAN.search(t) and not _KANA.search(t))
    return bool(texts) and 2 * chinese > len(texts)


def _tokenizers() -> list[str]:
    from sacrebleu.metrics.bleu import BLEU

    return sorted(BLEU.TOKENIZERS)


def _reference_streams(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-hypothesis references (a string, or a list of strings each) -> sacreBLEU's
    layout: one stream per reference slot, ``streams[k][i]`` = the k-th reference of
    hypothesis i, None where hypothesis i has fewer (sacreBLEU skips those)."""
    per_item = [[r] if isinstance(r, str) else [x for x in r if x is not None] for r in references]
    for i, refs in enumerate(per_item):
        if not refs:
            raise LmlabError(f"hypothesis {i} has no reference; give at least one reference per hypothesis")
        bad = [x for x in refs if not isinstance(x, str)]
        if bad:
            raise LmlabError(
                f"reference {i} holds a {type(bad[0]).__name__}, not text; give strings (or lists of strings)"
            )
    width = max(len(refs) for refs in per_item)
    return [[refs[k] if k < len(refs) else None for refs in per_item] for k in range(width)]


def translation_scores(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    tokenize: str | None = None,
) -> dict:
    """Corpus BLEU and chrF of ``hypotheses`` against ``references`` (one string per
    hypothesis, or a list of strings per hypothesis for several references).

    ``tokenize``: sacreBLEU's tokenizer for BLEU; None picks 'zh' for Chinese references
    (:func:`is_chinese`) and sacreBLEU's default '13a' otherwise. Returns
    ``{"bleu", "chrf", "signature": {"bleu", "chrf"}, "n", "tokenize"}``; scores are 0..100.
    """
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise LmlabError("give the hypotheses and references as lists of strings, not a single string")
    if len(hypotheses) != len(references):
        raise LmlabError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; give one reference "
            "(or one list of references) per hypothesis"
        )
    if not hypotheses:
        raise LmlabError("no hypotheses to score; give at least one translation and its reference")
    bad = [h for h in hypotheses if not isinstance(h, str)]
    if bad:
        raise LmlabError(
            f"a hypothesis is a {type(bad[0]).__name__}, not text; give the translations as strings"
        )
    streams = _reference_streams(references)
    if tokenize is None:
        tokenize = "zh" if is_chinese([r for r in streams[0] if r is not None]) else "13a"
    valid = _tokenizers()
    if tokenize not in valid:
        raise LmlabError(
            f"unknown BLEU tokenizer '{tokenize}'; sacreBLEU's tokenizers are: {', '.join(valid)}"
        )

    from sacrebleu.metrics import BLEU, CHRF

    try:
        bleu = BLEU(tokenize=tokenize)
    except ImportError as e:
        raise LmlabError(
            f"sacreBLEU's '{tokenize}' tokenizer needs a package that is not installed ({e}); install it "
            "or choose another tokenizer"
        ) from None
    chrf = CHRF()
    hyps = list(hypotheses)
    bleu_score = bleu.corpus_score(hyps, streams)
    chrf_score = chrf.corpus_score(hyps, streams)
    return {
        "bleu": float(bleu_score.score),
        "chrf": float(chrf_score.score),
        "signature": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())},
        "n": len(hyps),
        "tokenize": tokenize,
    }
