"""``lmlab.pipeline(task, model)``: one call per application, results shaped as Hugging Face's.

    task                                  model                          a call returns
    "translation" ("translation_en_to_fr") an encoder-decoder            [{"translation_text"}]
    "summarization"                       an encoder-decoder             [{"summary_text"}]
    "sentiment-analysis" = "text-classification"  a classifier           [{"label", "score"}]
    "question-answering"                  a span (QA) model              {"answer", "score", "start", "end"}
    "text-generation"                     a language model               [{"generated_text"}]

``model`` is an lmlab run folder, a Hugging Face folder, a Hub id (online), or a loaded
:class:`lmlab.Model`. Options given here are defaults for every call; a call may override them.
(``transformers`` 5 removed the translation, summarization and question-answering pipelines:
these give what its v4 pipelines gave, by the same names.)
"""

from __future__ import annotations

import difflib
from typing import Any

from lmlab.api import Model, load
from lmlab.errors import LmlabError
from lmlab.tasks.batching import check_texts
from lmlab.tasks.classify import TextClassificationPipeline
from lmlab.tasks.qa import QuestionAnsweringPipeline


class Text2TextPipeline:
    """Translation and summarization: an encoder-decoder writes a text for each input.

    A text gives ``[{key: output}]``, a list of texts a list of ``{key: output}`` (a list of
    lists with ``num_return_sequences`` > 1), as transformers v4's pipelines returned them."""

    task = "text2text"
    key = "generated_text"

    def __init__(self, model: Model, task: str | None = None, batch_size: int = 16, **options: Any) -> None:
        if not model.is_encoder_decoder:
            raise LmlabError(
                f"{model.source or 'this model'} is not an encoder-decoder; {self.task} needs a seq2seq model "
                "(trained with --task translate or --task summarize, or a Marian/BART/T5 folder)"
            )
        self.model, self.hf_task, self.batch_size, self.options = model, task or self.task, batch_size, options

    def __call__(self, inputs: str | list[str], batch_size: int | None = None, on_batch: Any = None, **options: Any) -> list:
        texts, single = check_texts(inputs)
        opts = {**self.options, **options}
        outs = self.model.translate(
            texts, task=self.hf_task, batch_size=batch_size or self.batch_size, on_batch=on_batch, **opts
        )
        results = [[{self.key: t} for t in (o if isinstance(o, list) else [o])] for o in outs]
        if single:
            return results[0]
        return [r[0] for r in results] if all(len(r) == 1 for r in results) else results


class TranslationPipeline(Text2TextPipeline):
    task = "translation"
    key = "translation_text"


class SummarizationPipeline(Text2TextPipeline):
    task = "summarization"
    key = "summary_text"


class TextGenerationPipeline:
    """A language model continues each prompt: ``[{"generated_text": prompt + continuation}]``
    per prompt (``return_full_text=False``: the continuation alone)."""

    task = "text-generation"

    def __init__(self, model: Model, return_full_text: bool = True, **options: Any) -> None:
        if getattr(model.config, "head", None) is not None:
            raise LmlabError(f"{model.source or 'this model'} has a task head; text generation needs a language model")
        self.model, self.return_full_text, self.options = model, return_full_text, options

    def __call__(self, inputs: str | list[str], return_full_text: bool | None = None, **options: Any) -> list:
        prompts, single = check_texts(inputs, "prompt")
        full = self.return_full_text if return_full_text is None else return_full_text
        outs = self.model.generate(prompts, **{**self.options, **options})
        results = [
            [{"generated_text": (p if full else "") + t} for t in (o if isinstance(o, list) else [o])]
            for p, o in zip(prompts, outs)
        ]
        return results[0] if single else results


TASKS: dict[str, type] = {
    "translation": TranslationPipeline,
    "summarization": SummarizationPipeline,
    "text-classification": TextClassificationPipeline,
    "sentiment-analysis": TextClassificationPipeline,
    "question-answering": QuestionAnsweringPipeline,
    "text-generation": TextGenerationPipeline,
}


def pipeline(
    task: str, model: str | Model, *, dtype: Any = None, device: Any = None, allow_pickle: bool = False,
    quantize: str | None = None, **options: Any,
) -> Any:  # fmt: skip
    """The pipeline for ``task`` over ``model`` (see the table above)."""
    if not isinstance(task, str):
        raise LmlabError(f"task must be a str, one of {', '.join(TASKS)} (got {type(task).__name__})")
    kind = "translation" if task.startswith("translation_") else task
    cls = TASKS.get(kind)
    if cls is None:
        close = difflib.get_close_matches(task, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LmlabError(f"unknown task {task!r}{hint} (tasks: {', '.join(TASKS)})")
    m = model if isinstance(model, Model) else load(model, dtype=dtype, device=device, allow_pickle=allow_pickle, quantize=quantize)
    if issubclass(cls, Text2TextPipeline):
        return cls(m, task=task, **options)
    return cls(m, **options)


__all__ = [
    "TASKS",
    "SummarizationPipeline",
    "Text2TextPipeline",
    "TextGenerationPipeline",
    "TranslationPipeline",
    "pipeline",
]
