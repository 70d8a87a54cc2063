"""``lmlab viz KIND ...``: pictures of what a model computes (:mod:`lmlab.viz`).

    lmlab viz attention MODEL --text TEXT [--layer L] [--head H] --out attn.png
    lmlab viz alignment MODEL --text SOURCE [--target TARGET] [--layer L] [--head H] --out align.png
    lmlab viz positions --kind sinusoidal|rope|learned [MODEL] [--d-model 128] [--max-len 128] --out pe.png
    lmlab viz tokens MODEL --text TEXT [--top-k 5] --out tokens.html
    lmlab viz neurons MODEL --text TEXT [--layer L] [--units 8 [--by activity|variance] | --unit 3,17] [--cell]
                      --out neurons.png

The format follows ``--out``'s extension: .png, .html or .json. Everything a user can get
wrong is checked before the model is loaded where it can be (the extension, an empty text,
the numbers), and is one line. Nothing here imports torch or matplotlib until a command runs.
"""

from __future__ import annotations

import argparse
import sys

from lmlab.errors import LmlabError

KINDS = ("attention", "alignment", "positions", "tokens", "neurons")


def _units(value: str) -> list[int]:
    try:
        units = [int(u) for u in value.replace(" ", "").split(",") if u]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected unit numbers separated by commas, e.g. 3,17 (got {value!r})") from None
    if not units:
        raise argparse.ArgumentTypeError("expected unit numbers separated by commas, e.g. 3,17")
    return units


def add_viz_args(p: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    help_ = {
        "attention": "self-attention weights of every layer and head, as heatmaps over the tokens",
        "alignment": "an encoder-decoder's cross-attention: each target token over the source tokens",
        "positions": "positional encodings: sinusoidal, RoPE, or a model's learned positions",
        "tokens": "each token shaded by its surprisal -log p, with the likeliest alternatives",
        "neurons": "an RNN/GRU/LSTM's hidden units over a text, char-rnn style",
    }
    for kind in KINDS:
        k = kinds.add_parser(kind, help=help_[kind], description=help_[kind])
        if kind == "positions":
            k.add_argument("--kind", dest="positions", required=True, choices=["sinusoidal", "rope", "learned"])
            k.add_argument("model", nargs="?", default=None,
                           help="a checkpoint (needed for learned; for the others: take its size and layout)")
            k.add_argument("--d-model", type=int, default=128, help="dimensions (sinusoidal, rope; default 128)")
            k.add_argument("--max-len", type=int, default=128, help="positions to draw (default 128)")
        else:
            k.add_argument("model", help="an lmlab checkpoint, a Hugging Face folder or a Hub id")
            what = "the source text" if kind == "alignment" else "the text to look at"
            k.add_argument("--text", required=True, help=what)
        if kind == "alignment":
            k.add_argument("--target", default=None,
                           help="the target text (default: the model's own greedy translation)")
        if kind in ("attention", "alignment", "neurons"):
            k.add_argument("--layer", type=int, default=None, help="one layer, numbered from 0"
                           + (" (default: the top layer)" if kind == "neurons" else " (default: all)"))
        if kind in ("attention", "alignment"):
            k.add_argument("--head", type=int, default=None,
                           help="one head, numbered from 0" + (" (default: the mean over heads)"
                                                               if kind == "alignment" else " (default: all)"))
        if kind == "tokens":
            k.add_argument("--top-k", type=int, default=5, help="alternatives shown per token (default 5)")
        if kind == "neurons":
            which = k.add_mutually_exclusive_group()
            which.add_argument("--units", type=int, default=8,
                               help="how many units: the best ranked by --by (default 8)")
            which.add_argument("--unit", type=_units, default=None, metavar="U,U,...", help="these units, e.g. 3,17")
            k.add_argument("--by", choices=["activity", "variance"], default=None,
                           help="rank the units by their mean |value| over the text (activity, the default) "
                                "or by its variance (the units that change most)")
            k.add_argument("--cell", action="store_true", help="an LSTM's cell state c instead of h")
        k.add_argument("--out", required=True, help="the file to write: .png, .html (interactive) or .json")
        k.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100)")
        k.add_argument("--allow-pickle", action="store_true",
                       help="read a Hugging Face pytorch_model.bin (torch.load(weights_only=True)); trusted files only")
        k.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")


def _check(a: argparse.Namespace) -> None:
    """What can be checked before loading a model."""
    from lmlab.viz.output import out_format

    out_format(a.out)
    if not 10 <= a.dpi <= 600:
        raise LmlabError(f"--dpi must be in 10..600 (got {a.dpi})")
    text = getattr(a, "text", None)
    if text is not None and not text.strip():
        raise LmlabError("--text is empty: give a text to look at")
    for name in ("layer", "head"):
        if getattr(a, name, None) is not None and getattr(a, name) < 0:
            raise LmlabError(f"--{name} is numbered from 0 (got {getattr(a, name)})")
    if a.kind == "positions":
        if a.positions == "learned" and a.model is None:
            raise LmlabError("--kind learned draws a model's own position embeddings: give MODEL "
                             "(lmlab viz positions --kind learned runs/NAME --out pe.png)")  # fmt: skip
        if a.model is None and (a.d_model < 2 or a.d_model % 2):
            raise LmlabError(f"--d-model must be even and at least 2 (got {a.d_model})")
        if a.max_len < 2:
            raise LmlabError(f"--max-len must be at least 2 (got {a.max_len})")
    if a.kind == "tokens" and a.top_k < 1:
        raise LmlabError(f"--top-k must be >= 1 (got {a.top_k})")
    if a.kind == "neurons" and a.unit is None and a.units < 1:
        raise LmlabError(f"--units must be >= 1 (got {a.units})")
    if a.kind == "neurons" and a.unit is not None and a.by is not None:
        raise LmlabError("--by ranks the units --units shows; --unit names them itself (give one of the two)")


def cmd_viz(a: argparse.Namespace) -> int:
    _check(a)
    import lmlab
    from lmlab import viz

    model = lmlab.load(a.model, allow_pickle=a.allow_pickle) if a.model is not None else None
    if a.kind == "attention":
        path = viz.draw_attention(model, a.text, a.out, layer=a.layer, head=a.head, dpi=a.dpi)
    elif a.kind == "alignment":
        path = viz.draw_alignment(model, a.text, a.out, target=a.target, layer=a.layer, head=a.head, dpi=a.dpi)
    elif a.kind == "positions":
        path = viz.draw_positions(a.positions, a.out, model, d_model=a.d_model, max_len=a.max_len, dpi=a.dpi)
    elif a.kind == "tokens":
        path = viz.draw_tokens(model, a.text, a.out, top_k=a.top_k, dpi=a.dpi)
    else:
        units = a.unit if a.unit is not None else a.units
        path = viz.draw_neurons(model, a.text, a.out, layer=a.layer, units=units, cell=a.cell, dpi=a.dpi,
                                by=a.by or "activity")
    print(f"lmlab viz: wrote {path}", file=sys.stderr)
    return 0
