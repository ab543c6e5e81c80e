"""What every figure shares: matplotlib's object API (no pyplot, so no global state: the server
draws figures from several threads), fonts that cover the scripts tokens come in, and tokens
written so that each character is drawn.

Fonts: DejaVu Sans first, then every installed Noto Sans family (Debian's fonts-noto-core and
fonts-noto-cjk, which `make test` installs), as matplotlib's per-glyph fallback list. A character
no installed font has is written as its escape (`\\u0e1a`) instead of a missing-glyph box.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import matplotlib
from matplotlib import font_manager, ft2font
from matplotlib.figure import Figure

FIRST = "DejaVu Sans"


@lru_cache(maxsize=1)
def families() -> tuple[str, ...]:
    """DejaVu Sans, then the installed Noto Sans families (CJK first: the most glyphs), by name.
    Noto files installed after matplotlib cached its font list are added to it here."""
    manager = font_manager.fontManager
    known = {f.fname for f in manager.ttflist}
    for path in font_manager.findSystemFonts():
        if Path(path).name.startswith("NotoSans") and path not in known:
            manager.addfont(path)
    names = {f.name for f in manager.ttflist}
    noto = sorted((n for n in names if n.startswith("Noto Sans") and "Mono" not in n),
                  key=lambda n: ("CJK" not in n, n))
    return (FIRST, *noto)


@lru_cache(maxsize=1)
def covered() -> frozenset[int]:
    """Every code point one of `families()` draws."""
    points: set[int] = set()
    for name in families():
        path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
        points.update(ft2font.FT2Font(path).get_charmap())
    return frozenset(points)


def legible(text: str) -> str:
    """`text` with each character that no installed font draws, or that draws nothing (controls,
    zero-width marks), written as its escape."""
    have = covered()
    return "".join(c if c == "\n" or (ord(c) in have and (c.isprintable() or c == " ")) else _escape(c) for c in text)


def _escape(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def figure(width: float, height: float, **options) -> Figure:
    """A new figure in the shared fonts (options as for matplotlib's Figure: layout, ...)."""
    matplotlib.rcParams["font.family"] = list(families())
    return Figure(figsize=(width, height), **options)
