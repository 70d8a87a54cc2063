"""What the batching engine (:mod:`lmlab.serve.engine`) works on: a request (:class:`Job`),
one of its choices running in the batch (:class:`Row`), and what it reports (:class:`TokenEvent`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmlab.errors import LmlabError
from lmlab.generate.config import GenerationConfig
from lmlab.generate.logits import Penalties
from lmlab.generate.text import TextStream


class QueueFull(LmlabError):
    """More requests are waiting than ``max_queue`` allows (the server answers 429)."""


@dataclass
class TokenEvent:
    """One generated token of one choice, as the engine reports it (from its own thread).

    ``delta`` is the text that became certain with this token (UTF-8 and stop-string safe,
    see :class:`~lmlab.generate.text.TextStream`); ``finish`` is set on a choice's last
    event: 'stop' (EOS or a stop string, OpenAI's name for both) or 'length'."""

    index: int
    token_id: int
    delta: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish: str | None = None
    text: str | None = None  # the whole text, on the last event
    token_ids: list[int] | None = None  # every generated id, on the last event


@dataclass
class Job:
    """A request as the engine sees it: prompt ids, decoding options, ``n`` choices, and where
    its events go (``sink`` is called from the engine's thread; an exception ends the job)."""

    prompt_ids: list[int]
    cfg: GenerationConfig
    sink: Callable[[TokenEvent | Exception], None]
    n: int = 1
    cancelled: bool = False
    finished: int = 0

    def cancel(self) -> None:
        """The client went away: its rows leave the batch at the next step."""
        self.cancelled = True


@dataclass
class Row:
    """One choice of a request, running in the batch: its tokens so far, its text stream,
    penalties and generator."""

    job: Job
    index: int
    seq: list[int]
    stream: TextStream
    penalties: Penalties
    gen: torch.Generator | None
    prompt_len: int = 0
    generated: int = 0
    done: bool = False
    ids: list[int] = field(default_factory=list)


__all__ = ["Job", "QueueFull", "Row", "TokenEvent"]
