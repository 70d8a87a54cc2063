"""Classification scores: accuracy, macro-F1 and the confusion matrix.

    accuracy = correct / total                          (a fraction, 0 to 1)
    F1_c     = 2·P_c·R_c / (P_c + R_c)                  per class c: P over predicted c, R over true c
    macro-F1 = mean over classes of F1_c                (each class counts the same, however rare; the
                                                         classes that occur, as gold or predicted: sklearn's)
    confusion[i][j] = texts of true label i predicted as j
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError


def classification_scores(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Scores of ``predicted`` against ``gold`` labels, classes in the order of ``labels``."""
    if len(predicted) != len(gold):
        raise LmlabError(f"{len(predicted)} predictions but {len(gold)} gold labels")
    if not gold:
        raise LmlabError("nothing to score: no labelled texts")
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({g for g in gold if g not in index})
    if unknown:
        raise LmlabError(
            f"the data has label {unknown[0]!r}, which the model never saw (its labels: {', '.join(labels)}); "
            "score it on data with the model's labels"
        )
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for p, g in zip(predicted, gold):
        confusion[index[g]][index[p]] += 1
    f1s, per_class = [], {}
    seen = {index[g] for g in gold} | {index[p] for p in predicted if p in index}
    for c, lab in enumerate(labels):
        tp = confusion[c][c]
        pred_c = sum(confusion[i][c] for i in range(k))
        true_c = sum(confusion[c])
        p = tp / pred_c if pred_c else 0.0
        r = tp / true_c if true_c else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if c in seen:
            f1s.append(f1)
        per_class[lab] = {"precision": p, "recall": r, "f1": f1, "support": true_c}
    correct = sum(confusion[i][i] for i in range(k))
    return {
        "accuracy": correct / len(gold), "macro_f1": sum(f1s) / len(f1s), "confusion_matrix": confusion,
        "labels": list(labels), "per_class": per_class, "n": len(gold),
    }  # fmt: skip


def format_confusion(scores: dict[str, Any]) -> str:
    """The confusion matrix as a text table (rows: true label, columns: predicted)."""
    labels, m = scores["labels"], scores["confusion_matrix"]
    w = max(6, *(len(lab) for lab in labels)) + 1
    head = "true \\ predicted".ljust(w + 4) + "".join(lab.rjust(w) for lab in labels)
    rows = [lab.ljust(w + 4) + "".join(str(x).rjust(w) for x in row) for lab, row in zip(labels, m)]
    return "\n".join([head, *rows])


def plot_confusion(scores: dict[str, Any], path: str | Path) -> Path:
    """A PNG of the confusion matrix (counts in the cells, rows normalised for the colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, m = scores["labels"], scores["confusion_matrix"]
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k))
    rates = [[x / max(1, sum(row)) for x in row] for row in m]
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(m[i][j]), ha="center", va="center", color="white" if rates[i][j] > 0.5 else "black")
    ax.set_title(f"accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}")
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise LmlabError(f"--plot {path}: cannot write it ({e.strerror})") from None
    finally:
        plt.close(fig)
    return out


__all__ = ["classification_scores", "format_confusion", "plot_confusion"]
