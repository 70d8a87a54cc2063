"""Scoring models with the field's metrics, one module each:

    perplexity.py      a language model's loss and perplexity over a corpus (lmlab eval)
    bleu.py            translation: sacreBLEU BLEU and chrF
    rouge.py           summarization: ROUGE-1/2/L/Lsum F1 (rouge-score; Chinese by character)
    classification.py  accuracy, macro-F1, the confusion matrix (and its picture)
    squad.py           question answering: SQuAD v1.1 EM/F1, CMRC 2018 for Chinese

The metric libraries are imported on first use.
"""

from lmlab.eval.bleu import translation_scores
from lmlab.eval.classification import classification_scores
from lmlab.eval.perplexity import evaluate_corpus
from lmlab.eval.rouge import rouge_scores
from lmlab.eval.squad import qa_scores

__all__ = ["classification_scores", "evaluate_corpus", "qa_scores", "rouge_scores", "translation_scores"]
