"""Documents to run through the model: a hub dataset or local files, always streamed.

Streaming keeps a corpus larger than memory workable and lets an interrupted ingestion resume
by skipping the documents it has already counted.
"""

from __future__ import annotations

import glob
import json
import logging
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
        _quiet_readers()
        try:
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
        except Exception as err:  # the readers raise many types; StopIteration on some empty files
            raise _read_error(spec, err) from err
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


def _quiet_readers() -> None:
    """The `datasets` readers log an error before raising it; saecat reports it once, by file and line."""
    for reader in ("json", "csv", "parquet", "text"):
        logging.getLogger(f"datasets.packaged_modules.{reader}.{reader}").setLevel(logging.CRITICAL)


def _read_error(spec: str, err: Exception) -> SaecatError:
    """A reader's failure as one line naming the file and line at fault, found by reading the
    files again (only now that something failed: the normal path streams them once)."""
    files = local_files(spec)
    where = next(filter(None, (_first_fault(Path(f)) for f in files)), None) if files else None
    if where is not None:
        return SaecatError(f"cannot read dataset file {where}")
    return SaecatError(f"cannot read dataset {spec!r}: {one_line(err)}")


def _first_fault(path: Path) -> str | None:
    """The first thing in one local dataset file that its reader rejects, as 'FILE line N: what',
    or None if this check finds nothing wrong with it."""
    builder = _BUILDERS.get(path.suffix)
    if builder == "parquet":
        with path.open("rb") as f:
            head = f.read(4)
            f.seek(max(0, path.stat().st_size - 4))
            tail = f.read(4)
        return None if head == tail == b"PAR1" else f"{path} is not a Parquet file (no PAR1 magic bytes)"
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"{path} line {number}, column {err.start + 1}: invalid UTF-8 (byte 0x{raw[err.start]:02x})"
    if builder != "json":
        return None
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # one JSON document, not JSON lines
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path} line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path} line {number}, column {err.colno}: not valid JSON ({err.msg})"
        if not isinstance(record, dict):
            return f"{path} line {number}: a JSON object was expected, not a {type(record).__name__}"
    return None


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
            raise _read_error(spec, err) from err
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
