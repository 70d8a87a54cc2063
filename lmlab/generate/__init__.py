"""Decoding: one loop for every model family.

    repeat: logits = model(last tokens, state); next = choose(process(logits, history))

The model's ``state`` (a Transformer's KV cache, an RNN's hidden vector) makes each step
cost one token of work. Option names follow Hugging Face ``generate``.

- :mod:`~lmlab.generate.config`   the options and their checks
- :mod:`~lmlab.generate.logits`   penalties and sampling warpers (each = a transformers processor)
- :mod:`~lmlab.generate.runner`   the model side: left-padded batches, state selection, sliding window
- :mod:`~lmlab.generate.sampling` greedy and sampled decoding, batched
- :mod:`~lmlab.generate.beam`     beam search (Hugging Face's algorithm)
- :mod:`~lmlab.generate.text`     streaming text, stop strings, result objects
"""

from lmlab.generate.beam import Hypothesis, beam_search
from lmlab.generate.config import GenerationConfig
from lmlab.generate.logits import (
    Penalties,
    apply_bad_words,
    apply_min_new_tokens,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
    process_logits,
)
from lmlab.generate.runner import Runner
from lmlab.generate.sampling import Choice, generate_tokens, sample
from lmlab.generate.text import (
    GenerationResult,
    IncrementalDecoder,
    TextStream,
    TokenAlternative,
    TokenLogprob,
    generate_stream,
)

__all__ = [
    "Choice",
    "GenerationConfig",
    "GenerationResult",
    "Hypothesis",
    "IncrementalDecoder",
    "Penalties",
    "Runner",
    "TextStream",
    "TokenAlternative",
    "TokenLogprob",
    "apply_bad_words",
    "apply_min_new_tokens",
    "apply_min_p",
    "apply_no_repeat_ngram",
    "apply_presence_frequency",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_typical_p",
    "beam_search",
    "generate_stream",
    "generate_tokens",
    "process_logits",
    "sample",
]
