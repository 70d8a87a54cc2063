"""Fonts for the pictures: DejaVu Sans (matplotlib's own) first, a CJK font as its fallback.

A token label is drawn glyph by glyph: matplotlib (≥ 3.6) looks each character up in the
families of ``font.family`` in order, so ``["DejaVu Sans", "Noto Sans CJK SC"]`` draws Latin
text in DejaVu and 学而时习之 in Noto. DejaVu has no Chinese, Japanese or Korean glyphs; without
a fallback they are drawn as empty boxes (tofu) and matplotlib warns once per glyph.

The CJK font is found among the fonts installed on the system (``matplotlib.font_manager``).
matplotlib caches its font list, so a font installed after the cache was written (``apt-get
install fonts-noto-cjk``) is not in it: the system's font files are then scanned by name and
added. With none, the pictures are still drawn (boxes in place of the characters), matplotlib's
per-glyph warnings are silenced and lmlab warns once, saying what to install.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

from lmlab.messages import warn

#: CJK families, best first (Simplified Chinese first: the docs' examples are Chinese).
CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans CJK HK",
    "Noto Serif CJK SC", "Noto Serif CJK JP", "Noto Serif CJK TC", "Noto Serif CJK KR",
    "Source Han Sans SC", "Source Han Sans CN", "Source Han Sans", "Source Han Serif SC", "Source Han Serif",
    "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN",
)  # fmt: skip
CJK_MONO_FAMILIES = ("Noto Sans Mono CJK SC", "Noto Sans Mono CJK JP", "WenQuanYi Zen Hei Mono",
                     "WenQuanYi Micro Hei Mono")  # fmt: skip
#: file names of CJK fonts, for a font installed after matplotlib wrote its cache
CJK_FILES = re.compile(r"cjk|wqy|wenquanyi|sourcehan|droidsansfallback|uming|ukai", re.I)
INSTALL_HINT = "apt-get install fonts-noto-cjk"
#: matplotlib's warning for a character no font in the family list has
GLYPH_WARNING = r"Glyph \d+ .* missing from font"

_found: dict[str, str | None] = {}
_warned = False
F = TypeVar("F", bound=Callable[..., Any])


def find_cjk_font(mono: bool = False) -> str | None:
    """The family name of an installed CJK font (a monospaced one when ``mono`` and there
    is one), or None. Cached per process."""
    key = "mono" if mono else "sans"
    if key not in _found:
        _found[key] = _search(mono)
    return _found[key]


def _search(mono: bool) -> str | None:
    from matplotlib import font_manager as fm

    def known() -> set[str]:
        return {f.name for f in fm.fontManager.ttflist}

    names = known()
    if not any(_is_cjk_name(n) for n in names):  # maybe installed after matplotlib's cache was written
        for path in fm.findSystemFonts():
            if CJK_FILES.search(path.rsplit("/", 1)[-1]):
                try:
                    fm.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):  # an unreadable font file: skip it
                    continue
        names = known()
    order = (CJK_MONO_FAMILIES if mono else ()) + CJK_FAMILIES
    return next((n for n in order if n in names), next((n for n in sorted(names) if _is_cjk_name(n)), None))


def _is_cjk_name(name: str) -> bool:
    return bool(re.search(r"CJK|WenQuanYi|Source Han|Droid Sans Fallback|AR PL U", name))


def families(mono: bool = False) -> list[str]:
    """The ``font.family`` list: DejaVu Sans (Mono) and the CJK fallback when there is one."""
    base = "DejaVu Sans Mono" if mono else "DejaVu Sans"
    cjk = find_cjk_font(mono)
    return [base, cjk] if cjk else [base]


@contextmanager
def style() -> Iterator[None]:
    """matplotlib settings for building a figure: the fonts above, and no mathtext (a token
    like ``$x$`` is text, not a formula). Text takes its font when created: build inside."""
    import matplotlib as mpl

    with mpl.rc_context({"font.family": families(), "text.parse_math": False, "font.size": 9}):
        yield


def styled(build: F) -> F:
    """Decorate a figure builder so that it runs inside :func:`style`."""

    @wraps(build)
    def run(*args: Any, **kwargs: Any) -> Any:
        with style():
            return build(*args, **kwargs)

    return run  # type: ignore[return-value]


@contextmanager
def quiet_glyphs() -> Iterator[None]:
    """Around drawing: matplotlib's per-glyph warnings become one lmlab warning at most."""
    global _warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing = [w for w in caught if re.search(GLYPH_WARNING, str(w.message))]
    for w in caught:  # pass the others on, as they were
        if w not in missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing and not _warned:
        _warned = True
        if find_cjk_font() is None:
            warn(f"no Chinese/Japanese/Korean font is installed: those characters are drawn as boxes "
                 f"({INSTALL_HINT}, or any CJK font matplotlib can find)")  # fmt: skip
        else:
            warn("some characters have no glyph in the installed fonts and are drawn as boxes")


def reset() -> None:
    """Forget the fonts found and the warning given (tests)."""
    global _warned
    _found.clear()
    _warned = False
