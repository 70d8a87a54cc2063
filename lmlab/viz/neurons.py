"""Hidden units of a recurrent model over a text, char-rnn style (Karpathy, Johnson and Fei-Fei,
"Visualizing and understanding recurrent networks", 2015).

An RNN reads one token at a time and carries its memory in a vector: for layer ℓ,

    RNN    h_t = tanh(W_ih x_t + W_hh h_{t−1} + b)
    GRU    h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t−1}                 n_t = tanh(…)
    LSTM   c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t,   h_t = o_t ⊙ tanh(c_t)

so every unit of h lies in tanh's range [−1, 1]. One line of text per unit, each token shaded
by that unit's value just after reading it: blue −1, white 0, red +1. Most units look like
noise; a few track something readable: inside quotes or brackets, the position in a line,
the start of a word, indentation. The units shown are the ones chosen, or by default the most
active over the text: the largest mean |h_t| over t (``by="activity"``). ``by="variance"``
ranks them by the variance of h_t over t instead, the units that change most along the text
(a unit stuck at ±1 is very active but varies little: it says nothing about where it is).
An LSTM's cell state c (``cell``) is not squashed: it can grow past ±1 and counts (the colour
scale then reaches the largest |c|).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError
from lmlab.viz import colors, fonts, output
from lmlab.viz.html import esc, page
from lmlab.viz.textboxes import COLUMN_IN, LINE_IN, draw_boxes, layout, shown, used_columns

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from lmlab.api import Model

#: the longest text drawn (tokens): a picture of more is unreadable
MAX_TOKENS = 2000
#: how the units shown are ranked when not chosen: the mean |value| over the text, or its variance
RANKINGS = ("activity", "variance")


def rank_units(values: Tensor, by: str = "activity") -> list[int]:
    """The units of ``values`` (units, T), best first: by mean |value| over t (``activity``) or by
    variance over t (``variance``); ties keep the lower unit number first."""
    if by not in RANKINGS:
        raise LmlabError(f"--by must be one of {', '.join(RANKINGS)} (got {by!r})")
    score = values.abs().mean(dim=1) if by == "activity" else values.var(dim=1, unbiased=False)
    return score.argsort(descending=True, stable=True).tolist()


def activations(model: Model, text: str, layer: int | None = None, units: int | list[int] = 8,
                cell: bool = False, by: str = "activity") -> dict[str, Any]:  # fmt: skip
    """The values (units, T) of the chosen units of ``layer`` (default: the top layer) over the
    text: h, or an LSTM's c. ``units``: how many of the best ranked ``by`` (:func:`rank_units`:
    the most active, or the most varying), or which."""
    from lmlab.inspection import hidden_states

    if by not in RANKINGS:
        raise LmlabError(f"--by must be one of {', '.join(RANKINGS)} (got {by!r})")
    module = model.module
    if model.is_encoder_decoder or not hasattr(module, "rnn"):
        raise LmlabError("hidden units are drawn for recurrent language models (RNN, GRU, LSTM: lmlab train "
                         "--model lstm); a Transformer has no recurrent state: lmlab viz attention shows it")  # fmt: skip
    kind = module.config.cell
    if cell and kind != "lstm":
        raise LmlabError(f"--cell: only an LSTM has a cell state; this model is a {kind.upper()} (show h instead)")
    states = hidden_states(model, text)
    values = states["cell" if cell else "hidden"]  # (layers, T, H)
    L, T, H = values.shape
    if T > MAX_TOKENS:
        raise LmlabError(f"the text has {T} tokens; draw at most {MAX_TOKENS} (give a shorter text)")
    (li,) = output.pick("layer", L - 1 if layer is None else layer, L, "the model")
    v = values[li].T  # (H, T)
    if isinstance(units, int):
        if units < 1:
            raise LmlabError(f"--units must be >= 1 (got {units})")
        chosen = rank_units(v, by)[: min(units, H)]
    else:
        if not units:
            raise LmlabError("--unit: give unit numbers, e.g. --unit 3,17")
        bad = [u for u in units if not 0 <= u < H]
        if bad:
            raise LmlabError(f"--unit {bad[0]}: layer {li} has {H} units, numbered 0..{H - 1}")
        chosen = list(units)
    return {"kind": "neurons", "cell": kind, "state": "c" if cell else "h", "layer": li, "tokens": states["tokens"],
            "units": chosen, "ranked_by": by if isinstance(units, int) else "chosen", "values": v[chosen],
            "mean_abs": v[chosen].abs().mean(dim=1), "variance": v[chosen].var(dim=1, unbiased=False)}  # fmt: skip


def scale_top(data: dict[str, Any]) -> float:
    """±1 for h (tanh's range); the largest |c| (at least 1) for a cell state."""
    return 1.0 if data["state"] == "h" else max(1.0, float(data["values"].abs().max()))


def neurons_figure_of(data: dict[str, Any], dpi: int = 100, width: int = 80) -> Figure:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    boxes, lines = layout(data["tokens"], width)
    width = used_columns(boxes)
    n = len(data["units"])
    label_in, top_in, bottom_in = 0.24, 0.7, 1.05
    block = lines * LINE_IN + label_in
    W, H = width * COLUMN_IN + 0.6, top_in + n * block + bottom_in
    W, H = output.figsize(W, H, dpi)
    fig = Figure(figsize=(W, H), dpi=dpi)
    top = scale_top(data)
    cmap, norm = colors.activation_cmap(), Normalize(-top, top)
    for k, (unit, vals) in enumerate(zip(data["units"], data["values"])):
        y = H - top_in - (k + 1) * block
        ax = fig.add_axes((0.3 / W, y / H, width * COLUMN_IN / W, lines * LINE_IN / H))
        draw_boxes(ax, boxes, lines, width, [cmap(norm(float(x))) for x in vals])
        ax.set_title(f"unit {unit}", loc="left", fontsize=9, pad=2)
    state = "cell state c" if data["state"] == "c" else "hidden state h"
    fig.suptitle(f"{data['cell'].upper()} layer {data['layer']}, {state}: one line of text per unit\n"
                 "each token shaded by the unit's value after reading it", y=1 - 0.08 / H, va="top",
                 fontsize=10)  # fmt: skip
    cax = fig.add_axes((0.3 / W, 0.5 / H, min(4.0, W - 0.6) / W, 0.16 / H))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal",
                 label=f"value of {data['state']}")  # fmt: skip
    return fig


@fonts.styled
def neurons_figure(model: Model, text: str, layer: int | None = None, units: int | list[int] = 8,
                   cell: bool = False, dpi: int = 100, width: int = 80, by: str = "activity") -> Figure:  # fmt: skip
    """One block of text per unit, each token shaded blue (−) … white (0) … red (+)."""
    return neurons_figure_of(activations(model, text, layer, units, cell, by), dpi, width)


def neurons_page(data: dict[str, Any]) -> str:
    top = scale_top(data)
    blocks = []
    for unit, vals in zip(data["units"], data["values"].tolist()):
        spans = "".join(
            f'<span class="tok" style="background:{colors.activation_hex(v / top)}" '
            f'title="{esc(repr(tok))}: {v:+.3f}">{esc(shown(tok))}</span>' + ("\n" if "\n" in tok else "")
            for tok, v in zip(data["tokens"], vals)
        )
        blocks.append(f'<div class="unit" data-unit="{unit}"><div class="label">unit {unit}</div>'
                      f'<div class="text">{spans}</div></div>')  # fmt: skip
    legend = "".join(f'<span style="background:{colors.activation_hex(x / 2)}">{top * x / 2:+g}</span>'
                     for x in (-2, -1, 0, 1, 2))  # fmt: skip
    state = "cell state c" if data["state"] == "c" else "hidden state h"
    title = f"{data['cell'].upper()} layer {data['layer']}: {state} of {len(data['units'])} units"
    ranked = {"activity": f"the most active units (largest mean |{data['state']}| over the text).",
              "variance": f"the most varying units (largest variance of {data['state']} over the text)."}  # fmt: skip
    note = ("One line of text per unit; each token is shaded by the unit's value just after the model read it "
            "(blue negative, white 0, red positive). Point at a token for the value. Shown: "
            + ranked.get(data.get("ranked_by", ""), "the units chosen."))  # fmt: skip
    return page(title, f'<div class="legend">value: {legend}</div>\n' + "\n".join(blocks), note=note)


def draw_neurons(model: Model, text: str, out: str | Path, layer: int | None = None, units: int | list[int] = 8,
                 cell: bool = False, dpi: int = 100, width: int = 80, by: str = "activity") -> Path:  # fmt: skip
    """Write the units picture (.png), page (.html) or numbers (.json) of ``text``."""
    fmt = output.out_format(out)
    data = activations(model, text, layer, units, cell, by)
    if fmt == "json":
        return output.write_json(out, data)
    if fmt == "html":
        return output.write_text(out, neurons_page(data))
    with fonts.style():
        fig = neurons_figure_of(data, dpi, width)
    return output.save_figure(fig, out)
