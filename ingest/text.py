"""Documents to run through the model: a hub dataset or local files, always streamed.

Streaming keeps a corpus larger than memory workable and lets an interrupted ingestion resume
by skipping the documents it has already counted.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from catalog.errors import SaecatError, one_line

# File suffix -> `datasets` builder.
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".py": "text",
             ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def local_files(spec: str) -> list[str]:
    """Files named by a path, a folder or a glob; [] if `spec` names nothing on disk."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in _BUILDERS)
    return sorted(glob.glob(str(path), recursive=True))


def _open(spec: str, split: str):
    import datasets

    files = local_files(spec)
    if files:
        suffixes = {Path(f).suffix for f in files}
        builders = {_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise SaecatError(f"dataset files must share one format (text, json/jsonl, parquet, csv); got {sorted(suffixes)}")
        if all(Path(f).stat().st_size == 0 for f in files):
            raise SaecatError(f"dataset {spec!r} is empty: no text to count")
        builder = builders.pop()
        # A text file is one document (not one per line), so blocks never straddle files.
        extra = {"sample_by": "document"} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
        except Exception as err:  # the readers raise many types; StopIteration on some empty files
            raise SaecatError(f"cannot read dataset {spec!r}: {one_line(err)}") from err
    if Path(spec).suffix in _BUILDERS or spec.startswith((".", "/", "~")):
        raise SaecatError(f"no dataset files match {spec!r}")
    try:
        return datasets.load_dataset(spec, split=split, streaming=True)
    except (ConnectionError, OSError) as err:
        raise SaecatError(
            f"cannot open dataset {spec!r}: the Hugging Face hub is unreachable and it is not cached. "
            "Pass local files instead (--dataset ./texts/*.jsonl)"
        ) from err
    except (ValueError, FileNotFoundError) as err:
        raise SaecatError(f"cannot open dataset {spec!r}: {str(err).splitlines()[0]}") from err


class Document(NamedTuple):
    text: str
    group: str | None = None  # the value of the group column, as text; None without one (or when null)


_MISSING = object()


def _field(row: dict[str, Any], path: str) -> Any:
    """row[path], or the dotted path into nested dicts (`meta.pile_set_name`); _MISSING if absent.
    A null on the way down is a null value, not a missing field (a row without that part)."""
    if path in row:
        return row[path]
    value: Any = row
    for key in path.split("."):
        if value is None:
            return None
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def iter_documents(spec: str, text_column: str = "text", split: str = "train", skip: int = 0,
                   group_column: str | None = None) -> Iterator[Document]:
    """The dataset's documents in order, after the first `skip`: each text, with its group value
    when a group column is named."""
    stream = _open(spec, split)
    if skip:
        stream = stream.skip(skip)
    rows = iter(stream)
    checked = False
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:  # the readers raise many types (arrow, json, csv, StopIteration-as-RuntimeError)
            raise SaecatError(f"cannot read dataset {spec!r}: {one_line(err)}") from err
        if not checked:
            if text_column not in row:
                raise SaecatError(f"dataset {spec!r} has no column {text_column!r}; it has {', '.join(row)}")
            checked = True
        text = row[text_column]
        group = None
        if group_column is not None:
            group = _field(row, group_column)
            if group is _MISSING:
                raise SaecatError(f"dataset {spec!r} has no field {group_column!r} (the group column); "
                                  f"its columns are {', '.join(row)}")
        yield Document(text if isinstance(text, str) else ("" if text is None else str(text)), _as_text(group))
