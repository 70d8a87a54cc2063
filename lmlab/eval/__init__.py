"""Scoring models with the field's metrics.

Today: a language model's loss and perplexity over a corpus (:mod:`lmlab.eval.perplexity`,
``lmlab eval``). Each task's metric joins here as its own module (BLEU and chrF for
translation, ROUGE for summaries, accuracy and F1 for classification, SQuAD EM/F1).
"""

from lmlab.eval.bleu import translation_scores  # light: sacreBLEU is imported on first use
from lmlab.eval.perplexity import evaluate_corpus

__all__ = ["evaluate_corpus", "translation_scores"]
