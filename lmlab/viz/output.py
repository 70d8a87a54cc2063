"""Where a picture goes: the format follows the output file's extension.

    .png    a picture (matplotlib's Agg renderer: no display needed)
    .html   one self-contained page (inline CSS and JavaScript, no external URL)
    .json   the numbers behind the picture

A figure is ``figsize × dpi`` pixels exactly: it is saved without ``bbox_inches="tight"``,
which would crop it to a size that depends on the labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError
from lmlab.viz import fonts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".html": "html", ".htm": "html", ".json": "json"}


def figsize(width_in: float, height_in: float, dpi: int) -> tuple[float, float]:
    """A figure size rounded to whole pixels at ``dpi`` (Agg drops a fraction of a pixel)."""
    return round(width_in * dpi) / dpi, round(height_in * dpi) / dpi


def out_format(out: str | Path) -> str:
    """``png``, ``html`` or ``json`` from the extension of ``out``; anything else is an error."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        shown = f"{suffix!r}" if suffix else "no extension"
        raise LmlabError(f"--out {str(out)!r} has {shown}; the picture's format follows the extension: "
                         ".png (a picture), .html (an interactive page) or .json (the numbers)")  # fmt: skip
    return FORMATS[suffix]


def _target(out: str | Path) -> Path:
    path = Path(out)
    if path.is_dir():
        raise LmlabError(f"--out {str(out)!r} is a folder; give a file name ending in .png, .html or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: Figure, out: str | Path) -> Path:
    """Write ``fig`` as a PNG of exactly its size (figsize × dpi pixels)."""
    path = _target(out)
    with fonts.quiet_glyphs():
        fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def figure_png(fig: Figure) -> bytes:
    """The PNG bytes of ``fig`` (to embed in a page)."""
    import io

    buf = io.BytesIO()
    with fonts.quiet_glyphs():
        fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def write_text(out: str | Path, text: str) -> Path:
    path = _target(out)
    path.write_text(text, encoding="utf-8")
    return path


def jsonable(x: Any) -> Any:
    """Tensors and arrays as nested lists of floats; NaN (which JSON lacks) as null."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def write_json(out: str | Path, data: dict[str, Any]) -> Path:
    return write_text(out, json.dumps(jsonable(data), ensure_ascii=False) + "\n")


def pick(name: str, value: int | None, n: int, what: str) -> list[int]:
    """The indices ``--name`` selects among ``n`` (all of them when None), checked."""
    if value is None:
        return list(range(n))
    if not 0 <= value < n:
        raise LmlabError(f"--{name} {value}: {what} has {n} {name}s, numbered 0..{n - 1}")
    return [value]
