"""Attention maps and alignments: where each token looks.

Self-attention (``attention``). In every layer ℓ and head h, token i's query meets every
key j it may see:

    A^{ℓh} = softmax(Q Kᵀ / √d_head + M)      row i: a distribution over the keys, Σ_j A_ij = 1

M is −∞ above the diagonal in a decoder-only model (token i sees tokens ≤ i: the upper
triangle is white) and 0 in an encoder (BERT, or a translator's encoder: every token sees
every other). The grid has a row per layer and a column per head; heads of one layer learn
different patterns — the previous token, the first token ("attention sink"), the same
character or word earlier (induction), the end of the sentence.

Alignment (``alignment``). An encoder-decoder's decoder attends over the encoded source: the
cross-attention of the step that wrote target token t, averaged over the heads,

    ᾱ_t = (1/H) Σ_h softmax(q_t^h K^{hᵀ} / √d_head)      a distribution over the source tokens

is the soft alignment of Bahdanau et al. (2015): for a translator it follows the words being
translated, a near-diagonal for languages of similar word order. The target is the model's
own greedy translation unless ``target`` is given (then teacher-forced).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmlab.errors import LmlabError
from lmlab.viz import output
from lmlab.viz.heatmap import Heatmaps, heatmap_figure, heatmap_page

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from lmlab.api import Model


def attention_maps(
    model: Model, text: str, layer: int | None = None, head: int | None = None
) -> tuple[Heatmaps, Tensor]:
    """The self-attention weights of ``text`` for the chosen layer and head (all when None;
    ``head`` alone: that head of every layer). Returns the maps and the full (layers, heads,
    T, T) tensor of the chosen layers."""
    from lmlab.inspection import attention

    att = attention(model, text)
    L, H = att.weights.shape[:2]
    layers = output.pick("layer", layer, L, "the model")
    heads = output.pick("head", head, H, "each layer")
    where = "the encoder" if model.is_encoder_decoder else "the model"
    title = f"self-attention of {where}: {L} layers × {H} heads"
    if layer is not None:
        title = f"self-attention of {where}, layer {layer}" + (f", head {head}" if head is not None else "")
    elif head is not None:
        title = f"self-attention of {where}, head {head} of each layer"
    full = att.weights[layers]
    return Heatmaps(title, full[:, heads], layers, heads, att.queries, att.keys), full


def alignment_maps(
    model: Model, source: str, target: str | None = None, layer: int | None = None, head: int | None = None
) -> tuple[Heatmaps, Tensor]:
    """The cross-attention of each target token over the source, per layer, averaged over the
    heads (or the one ``head``). Returns the maps and the full (layers, heads, T, S) tensor."""
    from lmlab.inspection import cross_attention

    if target is not None and not target.strip():
        raise LmlabError("--target is empty: give the target text, or leave it out to use the model's translation")
    att = cross_attention(model, source, target)
    L, H = att.weights.shape[:2]
    layers = output.pick("layer", layer, L, "the decoder")
    heads = output.pick("head", head, H, "each layer")
    w = att.weights[layers]
    shown = w[:, heads] if head is not None else w.mean(dim=1, keepdim=True)
    what = f"head {head}" if head is not None else f"mean of {H} heads"
    title = "alignment: cross-attention" + (f", layer {layer}" if layer is not None else "") + f"\n({what})"
    maps = Heatmaps(title, shown, layers, [head] if head is not None else None, att.queries, att.keys,
                    row_name="target", col_name="source")  # fmt: skip
    return maps, att.weights


def attention_figure(model: Model, text: str, layer: int | None = None, head: int | None = None,
                     dpi: int = 100) -> Figure:  # fmt: skip
    """Rows = layers, columns = heads; one panel when both ``layer`` and ``head`` are given."""
    return heatmap_figure(attention_maps(model, text, layer, head)[0], dpi)


def alignment_figure(model: Model, source: str, target: str | None = None, layer: int | None = None,
                     head: int | None = None, dpi: int = 100) -> Figure:  # fmt: skip
    """One panel per decoder layer (or the chosen ``layer``): target tokens × source tokens."""
    return heatmap_figure(alignment_maps(model, source, target, layer, head)[0], dpi)


def draw_attention(model: Model, text: str, out: str | Path, layer: int | None = None, head: int | None = None,
                   dpi: int = 100) -> Path:  # fmt: skip
    """Write the attention picture (.png), page (.html) or numbers (.json) of ``text``."""
    fmt = output.out_format(out)
    maps, full = attention_maps(model, text, layer, head)
    if fmt == "json":
        return output.write_json(out, {"kind": "attention", "tokens": maps.rows, "layers": maps.layers,
                                       "heads": maps.heads, "weights": maps.weights})  # fmt: skip
    if fmt == "html":
        note = ("Each square: how much the token of its row (the query) attends to the token of its column "
                "(the key); each row sums to 1. Point at a square for the tokens and the weight.")  # fmt: skip
        return output.write_text(out, heatmap_page(maps, full, note=note))
    return output.save_figure(heatmap_figure(maps, dpi), out)


def draw_alignment(model: Model, source: str, out: str | Path, target: str | None = None, layer: int | None = None,
                   head: int | None = None, dpi: int = 100) -> Path:  # fmt: skip
    """Write the alignment picture (.png), page (.html) or numbers (.json)."""
    fmt = output.out_format(out)
    maps, full = alignment_maps(model, source, target, layer, head)
    if fmt == "json":
        return output.write_json(out, {
            "kind": "alignment", "source": maps.cols, "target": maps.rows, "layers": maps.layers,
            "head": head, "weights": full[maps.layers], "shown": maps.weights[:, 0],
        })  # fmt: skip
    if fmt == "html":
        note = ("Row t: the decoder's attention over the source tokens while it wrote target token t "
                "(the mean over heads unless a head is chosen).")  # fmt: skip
        return output.write_text(out, heatmap_page(maps, full[maps.layers], mean=head is None, note=note))
    return output.save_figure(heatmap_figure(maps, dpi), out)
