"""Text as a row of coloured boxes, one per token, wrapped into lines (the tokens and neurons
pictures): the text reads as text, and each token's box is shaded by a number.

The layout counts columns of a monospaced font: a Chinese, Japanese or Korean character (East
Asian width W or F) takes two, a combining mark none. A line break token ends its line and
shows as ↵; a token that does not fit in what is left of a line starts the next one.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.viz import fonts

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: inches per column and per line
COLUMN_IN = 0.11
LINE_IN = 0.27
#: DejaVu Sans Mono's advance is 0.602 em: this size makes one character one column
FONT_PT = COLUMN_IN * 72 / 0.602 * 0.95


@dataclass
class Box:
    line: int
    col: int
    width: int
    text: str


def shown(token: str) -> str:
    """A token as drawn in running text: line breaks and tabs visible, other spaces kept."""
    return token.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "→")


def columns(text: str) -> int:
    n = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        n += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return n


def layout(tokens: list[str], width: int = 80) -> tuple[list[Box], int]:
    """Each token's box and the number of lines, for lines of ``width`` columns."""
    boxes: list[Box] = []
    line = col = 0
    for tok in tokens:
        text = shown(tok)
        w = max(1, columns(text))
        if col > 0 and col + w > width:
            line, col = line + 1, 0
        if w > width:  # one token longer than a line: cut
            text, w = text[: width - 1] + "…", width
        boxes.append(Box(line, col, w, text))
        col += w
        if "\n" in tok or "\r" in tok:
            line, col = line + 1, 0
    lines = line + (1 if col > 0 or not boxes else 0)
    return boxes, max(lines, 1)


def used_columns(boxes: list[Box], least: int = 56) -> int:
    """The columns the picture needs: its longest line (at least ``least``, for the title)."""
    return max([least, *(b.col + b.width for b in boxes)])


def draw_boxes(ax: Axes, boxes: list[Box], lines: int, width: int, facecolors: list[Any],
               hatched: set[int] | None = None) -> None:  # fmt: skip
    """Fill ``ax`` with the boxes (colours in token order) and their text; ``hatched``: the
    indices drawn grey and hatched (no value)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    hatched = hatched or set()
    rects = [Rectangle((b.col, b.line + 0.06), b.width, 0.88) for i, b in enumerate(boxes) if i not in hatched]
    cols = [c for i, c in enumerate(facecolors) if i not in hatched]
    ax.add_collection(PatchCollection(rects, facecolors=cols, edgecolors="none"))
    for i in sorted(hatched):
        b = boxes[i]
        ax.add_patch(Rectangle((b.col, b.line + 0.06), b.width, 0.88, facecolor="0.92", edgecolor="0.6",
                               hatch="///", lw=0.5))  # fmt: skip
    family = fonts.families(mono=True)
    for b in boxes:
        ax.text(b.col + b.width / 2, b.line + 0.5, b.text, ha="center", va="center", fontsize=FONT_PT,
                family=family, color="black")  # fmt: skip
    ax.set_xlim(0, width)
    ax.set_ylim(lines, 0)
    ax.set_axis_off()
