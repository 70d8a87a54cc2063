"""The colour scales, the same in the PNGs (matplotlib colormaps) and the pages (hex colours).

    attention   white (0) → dark blue (1), by √weight      a probability; the square root lets
                                                           the small weights of a long row show
    surprisal   white (0 nats) → dark red (the largest)    −log p: how unexpected a token was
    activation  blue (−1) → white (0) → red (+1)           a unit's value, tanh's range (``bwr``)

Each scale is linear between its end colours, so a page colours a value exactly as the PNG.
"""

from __future__ import annotations

from typing import Any

BLUE = (0.031, 0.188, 0.420)  # #08306b
RED = (0.647, 0.0, 0.0)  # #a50000
WHITE = (1.0, 1.0, 1.0)


def _mix(a: tuple[float, ...], b: tuple[float, ...], x: float) -> tuple[float, ...]:
    x = max(0.0, min(1.0, x))
    return tuple(p + (q - p) * x for p, q in zip(a, b))


def _hex(rgb: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


def attention_hex(w: float) -> str:
    return _hex(_mix(WHITE, BLUE, max(w, 0.0) ** 0.5))


def surprisal_hex(x: float) -> str:
    """``x`` = surprisal / the scale's top, in [0, 1]."""
    return _hex(_mix(WHITE, RED, x))


def activation_hex(v: float) -> str:
    """Blue at −1, white at 0, red at +1 (clipped)."""
    return _hex(_mix(WHITE, (1.0, 0.0, 0.0), v) if v >= 0 else _mix(WHITE, (0.0, 0.0, 1.0), -v))


def attention_cmap() -> tuple[Any, Any]:
    """(colormap, norm) for attention weights in [0, 1]."""
    from matplotlib.colors import LinearSegmentedColormap, PowerNorm

    return LinearSegmentedColormap.from_list("lmlab_attention", [WHITE, BLUE]), PowerNorm(0.5, vmin=0.0, vmax=1.0)


def surprisal_cmap() -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("lmlab_surprisal", [WHITE, RED])


def activation_cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["bwr"]
