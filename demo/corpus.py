"""The demo's text: the running Python's standard library, as code and as prose.

Every machine with Python has it, so the demo needs no dataset hub. Each module gives prose (its
docstrings, doctest paragraphs dropped) and code (its source with the docstrings taken out), cut
into documents of about `chunk_chars` at paragraph and top-level statement boundaries. Prose and
code documents alternate, each kind shuffled across modules with a fixed seed, so that any prefix
of the stream holds both kinds from many modules: the lobes analysis gets two kinds of text to
separate, recorded in the `kind` column.

    python -m demo.corpus demo/build/stdlib.jsonl
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import random
import sysconfig
from pathlib import Path
from typing import Iterator

# Test suites, vendored wheels and demo scripts are not the library's own code and prose.
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled",
              "turtledemo", "idlelib"}


def _chunks(pieces: list[str], chunk_chars: int, sep: str) -> Iterator[str]:
    """Join consecutive pieces into documents of about chunk_chars (a longer piece stands alone)."""
    current: list[str] = []
    size = 0
    for piece in pieces:
        if current and size + len(piece) > chunk_chars:
            yield sep.join(current)
            current, size = [], 0
        current.append(piece)
        size += len(piece) + len(sep)
    if current:
        yield sep.join(current)


def _docstring_nodes(tree: ast.Module) -> list[ast.Expr]:
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [node.body[0] for node in ast.walk(tree)
            if isinstance(node, owners) and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)]


def module_documents(source: str, chunk_chars: int) -> tuple[list[str], list[str]]:
    """(prose documents, code documents) of one module's source."""
    tree = ast.parse(source)
    lines = source.splitlines()
    docstrings = _docstring_nodes(tree)
    paragraphs = [p.strip() for node in docstrings
                  for p in ast.get_docstring(ast.Module(body=[node], type_ignores=[]), clean=True).split("\n\n")]
    prose = [p for p in paragraphs if len(p) > 40 and ">>>" not in p]
    in_docstring = {line for node in docstrings for line in range(node.lineno - 1, node.end_lineno)}
    # top-level statements, each with the comments and blank lines after it, docstrings removed
    starts = [node.lineno - 1 for node in tree.body] + [len(lines)]
    statements = ["\n".join(lines[i] for i in range(a, b) if i not in in_docstring).strip("\n")
                  for a, b in zip([0] + starts[1:-1], starts[1:])]
    code = [s for s in statements if s.strip()]
    return list(_chunks(prose, chunk_chars, "\n\n")), list(_chunks(code, chunk_chars, "\n\n"))


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))


def documents(chunk_chars: int = 2000, seed: int = 0, root: Path | None = None) -> Iterator[dict[str, str]]:
    """The stream of {"text", "kind", "module"} records, prose and code alternating."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    prose: list[dict[str, str]] = []
    code: list[dict[str, str]] = []
    for path in stdlib_files(root):
        try:
            module_prose, module_code = module_documents(path.read_text(encoding="utf-8"), chunk_chars)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # the odd file that is not Python 3 source (lib2to3 fixtures, say)
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        prose += [{"text": t, "kind": "prose", "module": module} for t in module_prose]
        code += [{"text": t, "kind": "code", "module": module} for t in module_code]
    rng = random.Random(seed)
    rng.shuffle(prose)
    rng.shuffle(code)
    for pair in itertools.zip_longest(prose, code):
        yield from (doc for doc in pair if doc is not None)


def write(path: Path, chunk_chars: int = 2000, seed: int = 0) -> dict[str, int]:
    """Write the corpus as JSON lines; returns the number of documents and characters per kind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {"prose documents": 0, "code documents": 0, "prose characters": 0, "code characters": 0}
    tmp = path.with_suffix(path.suffix + ".partial")
    with tmp.open("w", encoding="utf-8") as out:
        for doc in documents(chunk_chars, seed):
            out.write(json.dumps(doc) + "\n")
            counts[f"{doc['kind']} documents"] += 1
            counts[f"{doc['kind']} characters"] += len(doc["text"])
    tmp.replace(path)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON-lines file to write")
    parser.add_argument("--chunk-chars", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(write(args.out, args.chunk_chars, args.seed)))


if __name__ == "__main__":
    main()
