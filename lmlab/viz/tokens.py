"""Surprisal: how unexpected each token of a text was to the model.

A language model gives every token a probability given the ones before it; its surprisal is

    s_t = −log p(x_t | x_<t)        in nats (natural log): 0 = certain, log V = a uniform guess

White is 0, darker red is more surprised. The sum Σ_t s_t is the text's negative
log-likelihood (what ``lmlab eval`` averages into the loss; perplexity = exp of the mean), so
the red tokens are where the loss comes from: the start of a new word or name, a rare
character, anything the context did not announce. The first token has no context and no
prediction (hatched). On the page, pointing at a token shows its probability and the k tokens
the model thought likeliest there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.viz import colors, fonts, output
from lmlab.viz.html import esc, page
from lmlab.viz.textboxes import COLUMN_IN, LINE_IN, draw_boxes, layout, shown, used_columns

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lmlab.api import Model

NO_PREDICTION = "no prediction (the first token has no context)"


def surprisal(model: Model, text: str, top_k: int = 5) -> dict[str, Any]:
    """Tokens, ids, log-probabilities (the first None), surprisals and the top-k alternatives
    (:func:`lmlab.inspection.token_logprobs`)."""
    from lmlab.inspection import token_logprobs

    if top_k < 1:
        from lmlab.errors import LmlabError

        raise LmlabError(f"--top-k must be >= 1 (got {top_k})")
    sc = token_logprobs(model, text, top_k)
    lp = [None if math.isnan(x) else x for x in sc.logprobs]
    return {"kind": "tokens", "tokens": sc.tokens, "ids": sc.ids, "logprobs": lp,
            "surprisal": [None if x is None else -x for x in lp],
            "top": [[{"token": t, "logprob": v} for t, v in alts] for alts in sc.top]}  # fmt: skip


def scale_top(s: list[float | None]) -> float:
    """The top of the colour scale: the largest surprisal, rounded up (at least 1 nat)."""
    return float(max(1, math.ceil(max((x for x in s if x is not None), default=1.0))))


def tokens_figure_of(data: dict[str, Any], dpi: int = 100, width: int = 80) -> Figure:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    boxes, lines = layout(data["tokens"], width)
    width = used_columns(boxes)
    W, top_in, bottom_in = width * COLUMN_IN + 0.6, 0.7, 1.05
    H = top_in + lines * LINE_IN + bottom_in
    W, H = output.figsize(W, H, dpi)
    fig = Figure(figsize=(W, H), dpi=dpi)
    ax = fig.add_axes((0.3 / W, bottom_in / H, width * COLUMN_IN / W, lines * LINE_IN / H))
    top = scale_top(data["surprisal"])
    cmap, norm = colors.surprisal_cmap(), Normalize(0, top)
    faces = [cmap(norm(s)) if s is not None else "0.9" for s in data["surprisal"]]
    draw_boxes(ax, boxes, lines, width, faces, hatched={0})
    fig.suptitle("surprisal −log p(token | the tokens before), in nats\nhatched: the first token, no prediction",
                 y=1 - 0.08 / H, va="top", fontsize=10)  # fmt: skip
    cax = fig.add_axes((0.3 / W, 0.5 / H, min(4.0, W - 0.6) / W, 0.16 / H))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal", label="nats")
    return fig


@fonts.styled
def tokens_figure(model: Model, text: str, top_k: int = 5, dpi: int = 100, width: int = 80) -> Figure:
    """The tokens as boxes in lines of ``width`` columns, shaded by surprisal, and a colour bar."""
    return tokens_figure_of(surprisal(model, text, top_k), dpi, width)


def _title(data: dict[str, Any], t: int) -> str:
    tok = data["tokens"][t]
    if data["logprobs"][t] is None:
        return f"{tok!r}: {NO_PREDICTION}"
    lp = data["logprobs"][t]
    lines = [f"{tok!r}: −log p = {-lp:.3f} nats, p = {math.exp(lp):.4f}", f"the {len(data['top'][t])} likeliest:"]
    lines += [f"  {a['token']!r}  {math.exp(a['logprob']):.4f}" for a in data["top"][t]]
    return "\n".join(lines)


def tokens_page(data: dict[str, Any]) -> str:
    top = scale_top(data["surprisal"])
    spans = []
    for t, tok in enumerate(data["tokens"]):
        s = data["surprisal"][t]
        cls, style = ("tok none", "") if s is None else ("tok", f' style="background:{colors.surprisal_hex(s / top)}"')
        spans.append(f'<span class="{cls}"{style} data-t="{t}" title="{esc(_title(data, t))}">{esc(shown(tok))}</span>'
                     + ("\n" if "\n" in tok else ""))  # fmt: skip
    legend = "".join(f'<span style="background:{colors.surprisal_hex(i / 5)}{";color:#fff" if i > 2 else ""}">'
                     f"{top * i / 5:g}</span>" for i in range(6))  # fmt: skip
    total = sum(s for s in data["surprisal"] if s is not None)
    n = sum(1 for s in data["surprisal"] if s is not None)
    stats = f"{n} predictions, total {total:.2f} nats, mean {total / max(n, 1):.3f} (perplexity {math.exp(total / max(n, 1)):.2f})"
    body = (f'<div class="legend">surprisal (nats): {legend} &nbsp; <span class="tok none">&nbsp;&nbsp;</span> '
            f"{esc(NO_PREDICTION)}</div>\n<p class=\"note\">{esc(stats)}</p>\n"
            f'<div class="text">{"".join(spans)}</div>')  # fmt: skip
    note = "Each token is shaded by −log p(token | the tokens before): white = expected, dark red = surprising. " \
           "Point at a token for its probability and the model's likeliest alternatives."  # fmt: skip
    return page("surprisal of each token", body, note=note)


def draw_tokens(model: Model, text: str, out: str | Path, top_k: int = 5, dpi: int = 100, width: int = 80) -> Path:
    """Write the surprisal picture (.png), page (.html) or numbers (.json) of ``text``."""
    fmt = output.out_format(out)
    data = surprisal(model, text, top_k)
    if fmt == "json":
        return output.write_json(out, data)
    if fmt == "html":
        return output.write_text(out, tokens_page(data))
    with fonts.style():
        fig = tokens_figure_of(data, dpi, width)
    return output.save_figure(fig, out)
