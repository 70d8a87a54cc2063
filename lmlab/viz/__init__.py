"""Pictures of what a model computes (``lmlab viz``): attention, alignments, positional
encodings, token surprisal and recurrent hidden units.

Each kind has a module that says what its picture teaches, with the math beside the code:

    attention   :mod:`lmlab.viz.attention`  softmax(QKᵀ/√d + M) of every layer and head
    alignment   :mod:`lmlab.viz.attention`  an encoder-decoder's cross-attention over the source
    positions   :mod:`lmlab.viz.positions`  sinusoidal, RoPE and learned position encodings
    tokens      :mod:`lmlab.viz.tokens`     −log p of each token, with the likeliest alternatives
    neurons     :mod:`lmlab.viz.neurons`    an RNN/GRU/LSTM's units over a text, char-rnn style

and two functions: ``X_figure(...)`` builds the matplotlib Figure (nothing written: count its
panels, save it yourself), ``draw_X(..., out)`` writes ``out`` and returns its path. The format
follows the extension (:mod:`lmlab.viz.output`): ``.png`` a picture, ``.html`` a self-contained
interactive page (:mod:`lmlab.viz.html`), ``.json`` the numbers. :func:`draw` is all of them
by name. The numbers come from :mod:`lmlab.inspection` (``Model.attention`` and friends), the
fonts from :mod:`lmlab.viz.fonts` (Chinese, Japanese and Korean text included).

matplotlib is imported only when a figure is built (Agg: a ``Figure`` without pyplot, so no
display and no global state).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError
from lmlab.viz.attention import alignment_figure, attention_figure, draw_alignment, draw_attention
from lmlab.viz.neurons import draw_neurons, neurons_figure
from lmlab.viz.positions import draw_positions, positions_figure
from lmlab.viz.tokens import draw_tokens, tokens_figure

if TYPE_CHECKING:
    from lmlab.api import Model

KINDS = ("attention", "alignment", "positions", "tokens", "neurons")


def draw(what: str, model: Model | None = None, *, out: str | Path, **options: Any) -> Path:
    """Write the picture ``what`` (one of KINDS) to ``out``; ``options`` are those of ``draw_<what>``:

    - attention: text, layer, head
    - alignment: text (the source), target, layer, head
    - positions: kind (sinusoidal, rope, learned), d_model, max_len (``model`` optional)
    - tokens: text, top_k
    - neurons: text, layer, units, cell, by (activity or variance: how ``units`` are ranked)

    and ``dpi`` for a PNG. Returns the path written."""
    if what not in KINDS:
        raise LmlabError(f"unknown picture {what!r}; the kinds are {', '.join(KINDS)}")
    if what == "positions":
        return draw_positions(options.pop("kind", "sinusoidal"), out, model, **options)
    if model is None:
        raise LmlabError(f"lmlab viz {what} needs a model")
    if what == "alignment":
        return draw_alignment(model, options.pop("text"), out, **options)
    fn = {"attention": draw_attention, "tokens": draw_tokens, "neurons": draw_neurons}[what]
    return fn(model, options.pop("text"), out, **options)


__all__ = [
    "KINDS", "alignment_figure", "attention_figure", "draw", "draw_alignment", "draw_attention", "draw_neurons",
    "draw_positions", "draw_tokens", "neurons_figure", "positions_figure", "tokens_figure",
]  # fmt: skip
