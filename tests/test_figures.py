"""Figures draw every token: the fonts cover the scripts tokens come in (with Debian's Noto fonts,
which `make test` installs), and a character no font draws is written as its escape, never as a
missing-glyph box (matplotlib warns "Glyph ... missing from font(s)" when it draws one)."""

from __future__ import annotations

import io
import warnings

from queries.figures import covered, figure, legible

TOKENS = ["Paris", " 東京", "서울", "กรุงเทพ", "القاهرة", "दिल्ली", "Αθήνα", "Москва", "ירושלים", "ঢাকা", "�",
          "\u200c", "\t", "\ue000", "\U000f0000"]


def test_every_token_is_drawn_without_a_missing_glyph():
    fig = figure(6, 4)
    ax = fig.subplots()
    for i, token in enumerate(TOKENS):
        ax.annotate(legible(repr(token)), (0.1, i / len(TOKENS)))
    fig.suptitle(legible(" ".join(TOKENS)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph is a warning, here an error
        fig.savefig(io.BytesIO(), format="png")


def test_what_no_font_draws_is_escaped_and_the_rest_kept():
    assert legible("Paris 東京 กรุงเทพ") == "Paris 東京 กรุงเทพ"
    assert legible("a\u200cb\tc") == "a\\u200cb\\u0009c"  # drawn as nothing: escaped too
    assert 0xE000 not in covered() and legible("\ue000") == "\\ue000"
    assert legible("\U000f0000") == "\\U000f0000"
