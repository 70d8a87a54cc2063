"""Text classification (sentiment analysis): texts in, labels and scores out.

    logits = model(text)                       (num_labels,)
    scores = softmax(logits)                   several labels (single-label classification)
           = sigmoid(logits)                   one label, or multi-label classification
           = logits                            regression

The results have the shapes of Hugging Face's text-classification pipeline: a text gives
``[{"label", "score"}]``; a list of texts a list of ``{"label", "score"}``; with ``top_k``
each text gives its ``top_k`` best labels (``None``: all), best first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.messages import warn
from lmlab.tasks.batching import batches, check_texts, pad_id_of, padded, positive_int, task_tokenizer

FUNCTIONS = ("softmax", "sigmoid", "none")
_UNSET: Any = object()


def require_head(model: Any, head: str, command: str) -> None:
    """A one-line refusal when ``model`` has no ``head`` (classify | span)."""
    cfg = model.config
    have = getattr(cfg, "head", None)
    if have == head:
        return
    what = {
        "classify": "a text classifier",
        "span": "an extractive question-answering model",
        "mlm": "an encoder pretrained by masked-token prediction (fine-tune it first: `lmlab train --task "
        f"{'classify' if head == 'classify' else 'qa'} --init {model.source or 'RUN'} ...`)",
    }.get(have or "", "an encoder-decoder (translation, summarization)" if model.is_encoder_decoder else "a language model")
    want = {
        "classify": "a classifier: one trained with `lmlab train --task classify`, or a Hugging Face "
        "...ForSequenceClassification (BERT, DistilBERT, RoBERTa)",
        "span": "a QA model: one trained with `lmlab train --task qa`, or a Hugging Face "
        "...ForQuestionAnswering (BERT, DistilBERT, RoBERTa)",
    }[head]
    raise LmlabError(f"{model.source or 'this model'} is {what}; {command} needs {want}")


def _refuse(unknown: dict[str, Any]) -> None:
    if unknown:
        name = sorted(unknown)[0]
        hint = " (texts longer than the model's length are always cut, with a warning)" if name in ("truncation", "max_length") else ""
        raise LmlabError(f"unknown text-classification option {name}{hint}; options: top_k, function_to_apply, batch_size")


def scores_of(logits: torch.Tensor, function: str) -> torch.Tensor:
    x = logits.float()
    if function == "softmax":
        return torch.softmax(x, dim=-1)
    if function == "sigmoid":
        return torch.sigmoid(x)
    return x


class TextClassificationPipeline:
    """``clf = lmlab.pipeline("sentiment-analysis", MODEL)``; ``clf("great film")``."""

    task = "text-classification"

    def __init__(
        self, model: Any, top_k: Any = _UNSET, function_to_apply: str | None = None, batch_size: int = 8,
        **unknown: Any,
    ) -> None:  # fmt: skip
        require_head(model, "classify", "text classification")
        _refuse(unknown)
        self.model = model
        self.top_k = top_k
        self.function_to_apply = function_to_apply
        self.batch_size = positive_int(batch_size, "batch_size")
        self.max_length = model.config.max_seq_len
        self.tokenizer = task_tokenizer(model, self.max_length)

    def function(self, name: str | None) -> str:
        """transformers' choice: none for regression, sigmoid for one label or multi-label, else softmax."""
        if name is not None:
            name = str(name).lower()
            if name not in FUNCTIONS:
                raise LmlabError(f"function_to_apply must be one of {', '.join(FUNCTIONS)} (got {name!r})")
            return name
        cfg = self.model.config
        if cfg.problem_type == "regression":
            return "none"
        if cfg.problem_type == "multi_label_classification" or cfg.num_labels == 1:
            return "sigmoid"
        return "softmax"

    def logits(self, items: list[Any], on_batch: Callable[[int], None] | None = None, batch_size: int | None = None) -> torch.Tensor:
        """(N, num_labels) logits, each row what its text gives alone (padding is masked)."""
        encs = []
        for x in items:
            e = self.tokenizer.encode(x["text"], x.get("text_pair")) if isinstance(x, dict) else self.tokenizer.encode(x)
            encs.append(e)
        cut = sum(1 for e in encs if e.overflowing)
        if cut:
            warn(f"{cut} of {len(items)} texts were longer than the model's {self.max_length} tokens; "
                 "each was cut to fit (the end of the text was not read)")  # fmt: skip
        module, pad = self.model.module, pad_id_of(self.model)
        out = torch.empty(len(items), self.model.config.num_labels)
        with torch.inference_mode():
            for rows in batches(len(encs), [len(e.ids) for e in encs], batch_size or self.batch_size):
                batch = padded([encs[i] for i in rows], pad, module.device)
                logits, _ = module(batch["input_ids"], attention_mask=batch["attention_mask"],
                                   token_type_ids=batch["token_type_ids"])  # fmt: skip
                out[rows] = logits.float().cpu()
                if on_batch is not None:
                    on_batch(len(rows))
        return out

    def __call__(
        self, inputs: str | dict | list, top_k: Any = _UNSET, function_to_apply: str | None = None,
        batch_size: int | None = None, on_batch: Callable[[int], None] | None = None, **unknown: Any,
    ) -> list:  # fmt: skip
        _refuse(unknown)
        items, single = check_texts(inputs)
        if batch_size is not None:
            positive_int(batch_size, "batch_size")
        top_k = self.top_k if top_k is _UNSET else top_k
        legacy = top_k is _UNSET  # no top_k anywhere: one {"label", "score"} per text
        if not legacy and top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise LmlabError(f"top_k must be a positive integer or None (all labels), not {top_k!r}")
        fn = self.function(function_to_apply or self.function_to_apply)
        labels = self.model.config.labels
        results: list[Any] = []
        for row in scores_of(self.logits(items, on_batch, batch_size), fn):
            if legacy:
                results.append({"label": labels[int(row.argmax())], "score": float(row.max())})
                continue
            ranked = sorted(({"label": labels[i], "score": float(s)} for i, s in enumerate(row)),
                            key=lambda r: r["score"], reverse=True)  # fmt: skip
            results.append(ranked if top_k is None else ranked[:top_k])
        if single and legacy and isinstance(inputs, str):
            return results  # transformers returns a list for one text too (a dict for one text pair)
        return results[0] if single else results


__all__ = ["FUNCTIONS", "TextClassificationPipeline", "require_head", "scores_of"]
