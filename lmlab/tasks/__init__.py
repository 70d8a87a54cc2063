"""The applications: translation, summarization, text classification, question answering
and text generation behind one call, :func:`lmlab.pipeline`."""

from lmlab.tasks.pipeline import TASKS, pipeline

__all__ = ["TASKS", "pipeline"]
