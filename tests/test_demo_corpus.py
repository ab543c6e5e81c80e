"""The demo corpus: the standard library split into prose (docstrings) and code (the rest),
proven on sources written here, and on the real standard library for the properties the demo
relies on (both kinds, alternating, reproducible)."""

from __future__ import annotations

import ast
import itertools
import json

from demo import corpus

SOURCE = '''"""Module docstring, long enough to be kept as a paragraph of prose.

>>> 1 + 1
2
"""
import os

X = 1  # a comment stays with its statement


class Thing:
    """A class docstring that is long enough to be kept as prose here."""

    def method(self):
        """Short."""
        return os.sep


def function(a, b):
    """Function docstring: also long enough to be kept as a paragraph."""
    return a + b
'''


def test_docstrings_are_prose_and_the_rest_is_code():
    prose, code = corpus.module_documents(SOURCE, chunk_chars=10_000)
    assert prose == ["Module docstring, long enough to be kept as a paragraph of prose.\n\n"
                     "A class docstring that is long enough to be kept as prose here.\n\n"
                     "Function docstring: also long enough to be kept as a paragraph."]
    [text] = code
    assert '"""' not in text and "docstring" not in text and "Short." not in text
    assert "# a comment stays with its statement" in text and "return a + b" in text
    ast.parse(text)  # still Python: docstring-only bodies keep their other statements
    # every non-docstring line of the source is in the code, in order
    kept = [line for line in SOURCE.splitlines() if line.strip() and '"""' not in line
            and not line.startswith((">>>", "2", "Module"))]
    assert [line for line in text.splitlines() if line.strip()] == kept


def test_documents_are_cut_near_chunk_chars_at_statement_boundaries():
    source = "\n".join(f"def f{i}():\n    return {i}\n" for i in range(50))
    _, code = corpus.module_documents(source, chunk_chars=200)
    assert len(code) > 5 and all(len(doc) <= 200 for doc in code)
    assert "\n\n".join(code).replace("\n\n\n", "\n\n").count("def ") == 50


def test_stream_alternates_kinds_skips_tests_and_is_reproducible(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.py").write_text(SOURCE)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text(SOURCE)
    (tmp_path / "old.py").write_text("print 'python 2'\n")
    docs = list(corpus.documents(root=tmp_path))
    assert [d["kind"] for d in docs] == ["prose", "code"] * 3
    assert sorted({d["module"] for d in docs}) == ["a", "b", "c"]
    assert docs == list(corpus.documents(root=tmp_path))


def test_the_standard_library_gives_both_kinds_from_the_first_documents(tmp_path):
    out = tmp_path / "stdlib.jsonl"
    counts = corpus.write(out)
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(docs) == counts["prose documents"] + counts["code documents"]
    assert counts["prose characters"] > 500_000 and counts["code characters"] > 2_000_000
    head = docs[:200]
    assert [d["kind"] for d in head] == ["prose", "code"] * 100
    assert len({d["module"] for d in head}) > 100  # shuffled across modules, not one module's run
    assert not any(d["module"].startswith(("test.", "idlelib.")) for d in docs)
    assert list(itertools.islice(corpus.documents(), 20)) == docs[:20]
