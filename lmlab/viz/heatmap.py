"""Grids of token-by-token heatmaps: what the attention and alignment pictures share.

A panel is one matrix A (rows × columns) whose row i is a probability distribution: how much
the token of row i reads each token of the columns (Σ_j A_ij = 1). The grid has a row per
layer and a column per head (or one column: the mean over heads); a single layer and head is
one large panel. The page (``.html``) shows one panel at a time, chosen with a layer and a
head selector, the two tokens and the weight under the pointer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.viz import colors, fonts, output
from lmlab.viz.html import data_script, page

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor


@dataclass
class Heatmaps:
    """The panels to draw: ``weights`` (layers, heads, rows, cols) for the ``layers`` and
    ``heads`` chosen (``heads`` None: one column, the mean over all heads)."""

    title: str
    weights: Tensor
    layers: list[int]
    heads: list[int] | None
    rows: list[str]
    cols: list[str]
    row_name: str = "query"
    col_name: str = "key"


def label(token: str) -> str:
    """A token as a tick label: spaces and line breaks made visible."""
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "→").replace("\r", "␍") or "∅"


def panel_inches(n_rows: int, n_cols: int, tokens: int) -> float:
    """The side of one panel: larger for more tokens, smaller for a larger grid."""
    if n_cols == 1:  # one panel, or one per layer (an alignment): large, but a grid fits on a screen
        return min(max(4.0, min(9.0, 1.5 + 0.22 * tokens)), max(3.0, 16.0 / n_rows))
    side = max(1.6, min(3.2, 0.8 + 0.1 * tokens))
    return min(side, 24.0 / n_cols)  # at most ~24 inches wide


@fonts.styled
def heatmap_figure(h: Heatmaps, dpi: int = 100) -> Figure:
    """The grid (rows = layers, columns = heads) as a matplotlib Figure, one image per panel."""
    from matplotlib.figure import Figure

    L, H, R, C = h.weights.shape
    side = panel_inches(L, H, max(R, C))
    single = L * H == 1
    size = output.figsize(H * side + 1.4, L * side * max(R, 1) / max(R, C, 1) + 1.0, dpi)
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    axes = fig.subplots(L, H, squeeze=False)
    cmap, norm = colors.attention_cmap()
    fontsize = max(3.5, min(9.0, 0.75 * side * 72 / max(R, C, 1)))
    step = 1 if fontsize > 3.5 or max(R, C) <= 60 else -(-max(R, C) // 60)
    image = None
    for li, layer in enumerate(h.layers):
        for hi in range(H):
            ax = axes[li][hi]
            image = ax.imshow(h.weights[li, hi].numpy(), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            head = "mean of heads" if h.heads is None else f"head {h.heads[hi]}"
            if li == 0 and not single:
                ax.set_title(head, fontsize=9)
            ax.set_yticks(range(0, R, step))
            ax.set_xticks(range(0, C, step))
            ax.set_yticklabels([label(t) for t in h.rows[::step]] if hi == 0 else [], fontsize=fontsize)
            ax.set_xticklabels([label(t) for t in h.cols[::step]] if li == L - 1 else [], fontsize=fontsize,
                               rotation=90 if max(map(len, h.cols), default=1) > 1 else 0)  # fmt: skip
            ax.tick_params(length=0, pad=1)
            if hi == 0 and not single:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
    if single:
        axes[0][0].set_ylabel(f"{h.row_name} token")
        axes[0][0].set_xlabel(f"{h.col_name} token")
    fig.suptitle(h.title, fontsize=11)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6 if L > 1 else 0.9, label="weight")
    return fig


SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
const tip = document.getElementById('tip'), box = document.getElementById('map');
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const shown = s => s.replace(/ /g, '\u2423').replace(/\n/g, '\u21b5').replace(/\t/g, '\u2192') || '\u2205';
D.layers.forEach((l, i) => layerSel.add(new Option('layer ' + l, i)));
if (D.heads.length > 1) headSel.add(new Option('mean of heads', -1));
D.heads.forEach((h, i) => headSel.add(new Option('head ' + h, i)));
headSel.value = D.mean && D.heads.length > 1 ? -1 : 0;
function colour(w) {
  const x = Math.sqrt(Math.max(0, Math.min(1, w)));
  const c = [1 + (0.031 - 1) * x, 1 + (0.188 - 1) * x, 1 + (0.420 - 1) * x].map(v => Math.round(255 * v));
  return 'rgb(' + c.join(',') + ')';
}
function matrix() {
  const W = D.weights[+layerSel.value], hi = +headSel.value;
  if (hi >= 0) return W[hi];
  return W[0].map((row, r) => row.map((_, c) => W.reduce((s, h) => s + h[r][c], 0) / W.length));
}
let M = [];
function draw() {
  M = matrix();
  const R = D.rows.length, C = D.cols.length;
  const cell = Math.max(8, Math.min(30, Math.floor(720 / Math.max(R, C))));
  const left = 120, top = 110, fs = Math.min(13, Math.max(7, cell - 3));
  let s = '<svg width="' + (left + C * cell + 10) + '" height="' + (top + R * cell + 10) + '">';
  D.rows.forEach((t, r) => { s += '<text class="rl" id="r' + r + '" x="' + (left - 4) + '" y="' + (top + r * cell + cell * 0.7) +
    '" text-anchor="end" font-size="' + fs + '">' + esc(shown(t)) + '</text>'; });
  D.cols.forEach((t, c) => { const x = left + c * cell + cell * 0.7;
    s += '<text class="cl" id="c' + c + '" transform="translate(' + x + ',' + (top - 4) + ') rotate(-90)" font-size="' + fs + '">' +
      esc(shown(t)) + '</text>'; });
  for (let r = 0; r < R; r++) for (let c = 0; c < C; c++)
    s += '<rect x="' + (left + c * cell) + '" y="' + (top + r * cell) + '" width="' + cell + '" height="' + cell +
      '" fill="' + colour(M[r][c]) + '" data-r="' + r + '" data-c="' + c + '"></rect>';
  box.innerHTML = s + '</svg>';
}
let lit = [];
box.addEventListener('mouseover', e => {
  const t = e.target;
  if (t.tagName.toLowerCase() !== 'rect') return;
  const r = +t.dataset.r, c = +t.dataset.c;
  lit.forEach(x => x.classList.remove('lit'));
  lit = [document.getElementById('r' + r), document.getElementById('c' + c)];
  lit.forEach(x => x.classList.add('lit'));
  tip.textContent = D.row_name + ' ' + r + ' \u00ab' + D.rows[r] + '\u00bb  \u2192  ' + D.col_name + ' ' + c +
    ' \u00ab' + D.cols[c] + '\u00bb :  ' + M[r][c].toFixed(4);
});
layerSel.addEventListener('change', draw);
headSel.addEventListener('change', draw);
draw();
"""

STYLE = "<style>svg text { fill: #333; } svg text.lit { fill: #c00; font-weight: bold; } rect:hover { stroke: #c00; }</style>"


def heatmap_page(h: Heatmaps, all_weights: Tensor, mean: bool = False, note: str = "") -> str:
    """The page: ``all_weights`` (layers, heads, rows, cols) of ``h.layers`` with every head,
    a layer and head selector (``mean``: the mean of heads first and chosen)."""
    heads = list(range(all_weights.shape[1]))
    if h.heads is not None and len(h.heads) == 1 and not mean:
        heads = h.heads
        all_weights = all_weights[:, h.heads]
    data: dict[str, Any] = {
        "rows": h.rows, "cols": h.cols, "layers": h.layers, "heads": heads, "mean": mean,
        "row_name": h.row_name, "col_name": h.col_name,
        "weights": all_weights.float().round(decimals=5).tolist(),
    }  # fmt: skip
    body = (STYLE + '<div class="controls"><label>layer <select id="layer"></select></label>'
            '<label>head <select id="head"></select></label></div>\n<div id="tip">point at a square</div>\n'
            '<div id="map"></div>\n' + data_script(data))  # fmt: skip
    return page(h.title, body, SCRIPT, note)
