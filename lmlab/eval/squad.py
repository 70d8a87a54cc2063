"""Question-answering scores: exact match and F1, as the official scripts compute them.

English (SQuAD v1.1's ``evaluate-v1.1.py``): both texts are normalized — lowercased,
punctuation removed, the articles a/an/the removed, whitespace collapsed — then

    EM = 1 if the normalized prediction equals a normalized answer
    F1 = 2PR / (P + R) over the bag of words they share (P over the prediction's words,
         R over the answer's), the best over the answers

Chinese (CMRC 2018's evaluation script): text is segmented into single Han characters and
(non-Han) words, punctuation dropped; F1 takes the longest common *substring* of the two
segment lists as the overlap; EM compares the texts without punctuation. Both are ×100,
averaged over questions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lmlab.errors import LmlabError
from lmlab.eval.bleu import is_chinese

# --------------------------------------------------------------------------- SQuAD v1.1


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop articles, collapse whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, answer: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


# --------------------------------------------------------------------------- CMRC 2018
#: the punctuation CMRC 2018's script removes (and splits on)
CMRC_PUNCT = set("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』") | {"……"}


#: the Han characters CMRC 2018's script treats one by one (its own range, narrower than lmlab's)
_CMRC_HAN = re.compile("[\u4e00-\u9fa5]")


def _words(text: str) -> list[str]:
    """``nltk.word_tokenize``'s word tokenizer (NLTKWordTokenizer), without the sentence
    splitter that runs first in word_tokenize (it needs a download; within an answer's words
    it changes nothing). nltk comes with rouge-score."""
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize(text)


def mixed_segmentation(text: str, remove_punct: bool = True) -> list[str]:
    """Han characters (and CMRC's punctuation) one by one; other runs as words."""
    out: list[str] = []
    run = ""
    for ch in str(text).lower().strip():
        if remove_punct and ch in CMRC_PUNCT:
            continue
        if _CMRC_HAN.match(ch) or ch in CMRC_PUNCT:
            if run:
                out.extend(_words(run))
                run = ""
            out.append(ch)
        else:
            run += ch
    if run:
        out.extend(_words(run))
    return out


def _longest_common_substring(a: list[str], b: list[str]) -> int:
    """Length of the longest run of segments a and b share: m[i][j] = m[i-1][j-1] + 1 where equal."""
    best, row = 0, [0] * (len(b) + 1)
    for x in a:
        new = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                new[j + 1] = row[j] + 1
                best = max(best, new[j + 1])
        row = new
    return best


def cmrc_f1(prediction: str, answer: str) -> float:
    p, g = mixed_segmentation(prediction), mixed_segmentation(answer)
    n = _longest_common_substring(g, p)
    if n == 0:
        return 0.0
    precision, recall = n / len(p), n / len(g)
    return 2 * precision * recall / (precision + recall)


def cmrc_em(prediction: str, answer: str) -> float:
    def strip(s: str) -> str:
        return "".join(ch for ch in str(s).lower().strip() if ch not in CMRC_PUNCT)

    return float(strip(prediction) == strip(answer))


# --------------------------------------------------------------------------- corpus
def qa_scores(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], chinese: bool | None = None
) -> dict[str, Any]:
    """{"exact_match", "f1"} (0–100, the best over each question's answers, averaged), "n"."""
    if len(predictions) != len(answers):
        raise LmlabError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise LmlabError("nothing to score: no predictions")
    if chinese is None:
        chinese = is_chinese([a for golds in answers for a in golds])
    em_of, f1_of = (cmrc_em, cmrc_f1) if chinese else (squad_em, squad_f1)
    em = f1 = 0.0
    for i, (p, golds) in enumerate(zip(predictions, answers)):
        if not golds:
            raise LmlabError(f"question {i + 1} has no reference answer")
        em += max(em_of(p, g) for g in golds)
        f1 += max(f1_of(p, g) for g in golds)
    n = len(predictions)
    return {"exact_match": round(100 * em / n, 4), "f1": round(100 * f1 / n, 4), "n": n,
            "scoring": "cmrc2018 (characters)" if chinese else "squad v1.1"}  # fmt: skip


__all__ = ["cmrc_em", "cmrc_f1", "mixed_segmentation", "normalize_answer", "qa_scores", "squad_em", "squad_f1"]
