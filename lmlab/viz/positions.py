"""Positional encodings: how a Transformer knows where each token is.

Attention alone is blind to order (permuting the tokens permutes the outputs). Three answers,
all in :mod:`lmlab.nn.positional` and drawn here from that same code:

Sinusoidal (Vaswani et al. 2017), added to the token embedding. For position p and i < d/2,

    PE(p, 2i) = sin(p / 10000^(2i/d)),    PE(p, 2i+1) = cos(p / 10000^(2i/d))

(lmlab's layout: sine and cosine interleaved; a model with ``sinusoidal_layout="halves"``,
Marian's, keeps the sines in the first half). Each pair of dimensions is a clock turning at
its own frequency ω_i = 10000^(−2i/d), from one turn per 2π positions down to one per
10000·2π: the left of the matrix flickers, the right changes slowly. Since
sin²+cos² = 1, every row has norm √(d/2), and the dot product of two rows

    PE(p)·PE(q) = Σ_i cos((p − q) ω_i)

depends only on the offset p − q: normalised by d/2 it is 1 at offset 0 and falls off with
|p − q| (with ripples). The similarity matrix is a Toeplitz band along the diagonal.

RoPE (Su et al. 2021) rotates queries and keys instead: the pair i of a vector at position m
turns by the angle m·θ_i, θ_i = base^(−2i/d). Rotations compose, R_mᵀ R_n = R_{n−m}, so

    ⟨R_m q, R_n k⟩ = ⟨q, R_{n−m} k⟩

depends on m − n alone. Drawn: the frequencies θ_i, the rotation table cos(m·θ_i), and for
one random vector x (q = k = x) the score ⟨R_m x, R_n x⟩/|x|² of *every* pair (m, n) plotted
against m − n: all the dots fall on one curve.

Learned (GPT-2, BERT): a trainable row per position, whatever training made of it. Drawn:
the model's own table, the cosine similarity of every pair of rows, and its mean against
|i − j|. A trained model's rows are often smooth in the position (neighbours alike), some
even nearly sinusoidal; untrained, they are noise and only the diagonal is 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmlab.errors import LmlabError
from lmlab.viz import fonts, output

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lmlab.api import Model

KINDS = ("sinusoidal", "rope", "learned")
#: the most positions (and dimensions) drawn: the similarity matrix is max_len²
MAX_LEN = 4096
#: the figure's size in inches (three panels side by side)
FIGSIZE = (15.0, 4.6)


def _modules(model: Model, cls: type) -> list[Any]:
    return [m for m in model.module.modules() if isinstance(m, cls)]


def _model_kind(model: Model) -> str:
    from lmlab.nn.positional import (
        LearnedPositions,
        RelativePositionBias,
        RotaryEmbedding,
        SinusoidalPositions,
    )

    for cls, name in ((RotaryEmbedding, "rope"), (LearnedPositions, "learned"), (SinusoidalPositions, "sinusoidal"),
                      (RelativePositionBias, "relative (T5's learned attention bias)")):  # fmt: skip
        if _modules(model, cls):
            return name
    return "none that lmlab can draw"


def _refuse(model: Model, kind: str) -> LmlabError:
    has = _model_kind(model)
    hint = f"; draw its own with --kind {has}" if has in KINDS else ""
    return LmlabError(f"this model's positions are {has}, not {kind}{hint}")


def by_offset(sim: Tensor) -> tuple[Tensor, Tensor]:
    """The mean of sim[i, j] over the pairs with |i − j| = Δ, for Δ = 0..P−1."""
    P = sim.shape[0]
    offsets = torch.arange(P)
    return offsets, torch.stack([torch.diagonal(sim, int(k)).mean() for k in offsets])


def sinusoidal(d_model: int = 128, max_len: int = 128, model: Model | None = None) -> dict[str, Any]:
    """The table PE (max_len, d_model) from :func:`lmlab.nn.positional.sinusoidal_table`
    (the model's own d_model and layout when ``model`` is given) and its similarity."""
    from lmlab.nn.positional import SinusoidalPositions, sinusoidal_table

    layout = "interleaved"
    if model is not None:
        found = _modules(model, SinusoidalPositions)
        if not found:
            raise _refuse(model, "sinusoidal")
        layout, d_model = found[0].layout, found[0].table.shape[1]
    _check(d_model, max_len)
    pe = sinusoidal_table(max_len, d_model, layout).double()
    sim = pe @ pe.T / (d_model / 2)  # every row has norm² d/2: this is the cosine similarity
    offsets, mean = by_offset(sim)
    return {"kind": "sinusoidal", "layout": layout, "d_model": d_model, "max_len": max_len, "matrix": pe,
            "similarity": sim, "offsets": offsets, "similarity_by_offset": mean}  # fmt: skip


def rope(d_model: int = 128, max_len: int = 128, model: Model | None = None, seed: int = 0) -> dict[str, Any]:
    """θ_i, the table cos(m·θ_i) and the score ⟨R_m x, R_n x⟩/|x|² of every pair, computed with
    :class:`lmlab.nn.positional.RotaryEmbedding` and ``apply_rope`` (the model's rotary size
    and base when ``model`` is given; ``d_model`` is then a head's rotary dimension)."""
    from lmlab.nn.positional import RotaryEmbedding, apply_rope

    base = 10000.0
    if model is not None:
        found = _modules(model, RotaryEmbedding)
        if not found:
            raise _refuse(model, "rope")
        d_model, base = found[0].rotary_dim, float(found[0].base)
    _check(d_model, max_len)
    emb = RotaryEmbedding(d_model, max_len, base)
    cos, sin = emb(torch.arange(max_len))  # (P, d): both halves share θ_i
    x = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    rotated = apply_rope(x.expand(1, 1, max_len, d_model), cos[None, None], sin[None, None])[0, 0]  # (P, d): R_m x
    scores = (rotated @ rotated.T / (x @ x)).double()  # [m, n] = ⟨R_m x, R_n x⟩ / |x|²
    rel = torch.arange(max_len)[:, None] - torch.arange(max_len)[None, :]  # m − n
    return {"kind": "rope", "d_model": d_model, "max_len": max_len, "base": base, "theta": emb.inv_freq.double(),
            "cos": cos[:, : d_model // 2].double(), "scores": scores, "m_minus_n": rel}  # fmt: skip


def learned(model: Model | None, max_len: int = 128) -> dict[str, Any]:
    """The model's learned position embeddings (its first table: a seq2seq model's encoder's),
    the cosine similarity of every pair of rows and its mean per offset."""
    from lmlab.nn.positional import LearnedPositions

    if model is None:
        raise LmlabError("--kind learned draws a model's own position embeddings: give MODEL (a checkpoint with "
                         "learned positions, e.g. GPT-2 or BERT)")  # fmt: skip
    found = _modules(model, LearnedPositions)
    if not found:
        raise _refuse(model, "learned")
    start = int(getattr(model.config, "pos_offset", 0) or 0)  # RoBERTa: rows 0 and 1 are never used
    table = found[0].weight.detach().double()[start:]
    if not 2 <= max_len <= MAX_LEN:
        raise LmlabError(f"--max-len must be in 2..{MAX_LEN} (got {max_len})")
    table = table[:max_len]
    unit = table / table.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.T
    offsets, mean = by_offset(sim)
    return {"kind": "learned", "d_model": table.shape[1], "max_len": table.shape[0], "matrix": table,
            "similarity": sim, "offsets": offsets, "similarity_by_offset": mean}  # fmt: skip


def _check(d_model: int, max_len: int) -> None:
    if d_model < 2 or d_model % 2:
        raise LmlabError(f"--d-model must be even and at least 2 (got {d_model}): dimensions come in sin/cos pairs")
    if max_len < 2:
        raise LmlabError(f"--max-len must be at least 2 (got {max_len})")
    if max_len > MAX_LEN or d_model > MAX_LEN:
        raise LmlabError(f"--d-model {d_model} and --max-len {max_len}: draw at most {MAX_LEN} of each "
                         "(a picture has fewer pixels than that)")  # fmt: skip


def positions(kind: str, model: Model | None = None, d_model: int = 128, max_len: int = 128) -> dict[str, Any]:
    """The numbers behind the picture of ``kind`` (sinusoidal, rope or learned)."""
    if kind not in KINDS:
        raise LmlabError(f"--kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if kind == "learned":
        return learned(model, max_len)
    return (sinusoidal if kind == "sinusoidal" else rope)(d_model, max_len, model)


def _matrix(fig: Figure, ax: Any, m: Tensor, title: str, xlabel: str, ylabel: str, cmap: str = "RdBu_r") -> None:
    top = float(m.abs().max()) or 1.0
    im = ax.imshow(m.numpy(), cmap=cmap, vmin=-top, vmax=top, aspect="auto", interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, shrink=0.85)


@fonts.styled
def positions_figure(kind: str, model: Model | None = None, d_model: int = 128, max_len: int = 128,
                     dpi: int = 100) -> Figure:  # fmt: skip
    """Three panels: the encoding and two views of how position i relates to position j."""
    from matplotlib.figure import Figure

    return _draw(positions(kind, model, d_model, max_len), Figure(figsize=FIGSIZE, dpi=dpi, layout="constrained"))


def _draw(data: dict[str, Any], fig: Figure) -> Figure:
    a, b, c = fig.subplots(1, 3)
    kind, d, P = data["kind"], data["d_model"], data["max_len"]
    if kind == "rope":
        theta = data["theta"]
        a.semilogy(range(len(theta)), theta.numpy(), marker=".", lw=1)
        a.set_title(f"RoPE frequencies θ_i = {data['base']:g}^(−2i/d), d = {d}")
        a.set_xlabel("pair i (dimensions i and i + d/2)")
        a.set_ylabel("θ_i (radians per position)")
        a.grid(alpha=0.3)
        _matrix(fig, b, data["cos"], "rotation table cos(m·θ_i)", "pair i", "position m")
        rel, s = data["m_minus_n"].flatten().numpy(), data["scores"].flatten().numpy()
        n = P // 2
        c.plot([m - n for m in range(P)], data["scores"][:, n].numpy(), color="C3", lw=2.5, alpha=0.5,
               label=f"n = {n}, m = 0..{P - 1}", zorder=1)  # fmt: skip
        c.scatter(rel, s, s=3, lw=0, color="C0", label="every pair (m, n)", zorder=2)
        c.set_title("⟨R_m x, R_n x⟩ / |x|²  depends only on m − n")
        c.set_xlabel("m − n")
        c.set_ylabel("score (q = k = x, random)")
        c.legend(loc="upper right", fontsize=8)
        c.grid(alpha=0.3)
    else:
        what = {"sinusoidal": f"sinusoidal PE ({data.get('layout')}), d = {d}",
                "learned": f"the model's learned positions, d = {d}"}[kind]  # fmt: skip
        _matrix(fig, a, data["matrix"].float(), what, "dimension", "position")
        sim_title = "PE(i)·PE(j) / (d/2)" if kind == "sinusoidal" else "cosine similarity of positions i, j"
        _matrix(fig, b, data["similarity"].float(), sim_title, "position j", "position i")
        c.plot(data["offsets"].numpy(), data["similarity_by_offset"].numpy(), lw=1.2)
        c.axhline(0, color="0.6", lw=0.8)
        c.set_title("similarity against the offset |i − j|" + (" (mean)" if kind == "learned" else ""))
        c.set_xlabel("|i − j|")
        c.set_ylabel("similarity")
        c.grid(alpha=0.3)
    return fig


def draw_positions(kind: str, out: str | Path, model: Model | None = None, d_model: int = 128, max_len: int = 128,
                   dpi: int = 100) -> Path:  # fmt: skip
    """Write the positions picture (.png), a page holding it (.html) or the numbers (.json)."""
    from matplotlib.figure import Figure

    fmt = output.out_format(out)
    data = positions(kind, model, d_model, max_len)
    if fmt == "json":
        return output.write_json(out, data)
    with fonts.style():
        fig = _draw(data, Figure(figsize=FIGSIZE, dpi=dpi, layout="constrained"))
    if fmt == "png":
        return output.save_figure(fig, out)
    from lmlab.viz.html import img, page

    note = {"sinusoidal": "Each row: the encoding added to the token at that position. Rows at the same offset "
                          "have the same dot product.",
            "rope": "RoPE rotates each pair of a query's (and key's) dimensions by m·θ_i; the score of two "
                    "rotated vectors depends only on their offset.",
            "learned": "The model's own position embeddings and how alike the rows are."}[kind]  # fmt: skip
    return output.write_text(out, page(f"positional encoding: {kind}", img(output.figure_png(fig), kind), note=note))
