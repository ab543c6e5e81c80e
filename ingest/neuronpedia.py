"""Neuronpedia's public exports into the catalog: `import_neuronpedia(location, db)`.

The layout, its fields and the four producers that write it are in
../shared/docs/neuronpedia-format.md. A source folder `<modelId>/<sourceId>/` holds one-line
`model.jsonl`, `source.jsonl`, `sourceset.jsonl` (and `release.jsonl`), and batches of
`features/`, `activations/` and `explanations/` rows (gzipped JSONL; a producer may leave
explanations plain). Batches are not aligned across folders, `index` is a string or a number,
`embedding` a string or an array, and one feature may have many explanation rows, so every row is
read and keyed by (modelId, source, index) alone, never by its batch.

An import runs in two steps, so that a bad line commits nothing and a killed import resumes:
1. stage: each file is parsed by DuckDB's JSON reader (its columns as JSON, so that no value can
   fail the read) into a Parquet file in the catalog's sidecar folder, with its line numbers, the
   typed values and, per row, the first rule it breaks. A file already staged (same path, size and
   mtime) is not read again.
2. commit: if any staged row breaks a rule, the first one is the error ("file:line: why") and
   nothing is written. Otherwise one transaction maps each source to its catalog SAE and replaces
   that SAE's Neuronpedia rows (neuronpedia_features, _activations, _explanations) and its
   neuronpedia_sources row; the staging folder is removed after the commit.

A source maps to the SAE whose `saes.neuronpedia_id` is `modelId/sourceId` (a registry sync fills
it; a ready SAE first, then the lowest key). A source no registry entry names becomes an SAE of
its own, release `neuronpedia:<modelId>`, sae_id `<sourceId>`, status 'registered': it has
Neuronpedia's statistics, examples and explanations but no decoder vectors until it is ingested.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from catalog.errors import SaecatError
from catalog.schema import NEURONPEDIA_TABLES
from catalog.store import default_path, first_row, sidecar_dir, writer
from ingest.s3 import mirror

ROOT_FILES = ("model", "source", "sourceset", "release")
NOT_SOURCES = {"config", "headvis", "jlens"}  # folders beside sources in v1/ and model folders
RELEASE_PREFIX = "neuronpedia:"
IMPORT_MEMORY = "2GB"  # DuckDB's memory for an import; without a limit it takes most of the machine


@dataclass(frozen=True)
class Field:
    """One column of an export row: its JSON key, catalog column, SQL type, and whether a row needs it."""

    key: str
    column: str
    type: str
    required: bool = False


_IDENTITY = (Field("modelId", "model_id", "VARCHAR", True), Field("layer", "layer", "VARCHAR", True),
             Field("index", "feature", "INTEGER", True))
FIELDS: dict[str, tuple[Field, ...]] = {
    "features": (*_IDENTITY, *(Field(k, c, t) for k, c, t in (
        ("maxActApprox", "max_act_approx", "DOUBLE"), ("frac_nonzero", "frac_nonzero", "DOUBLE"),
        ("freq_hist_data_bar_heights", "freq_hist_heights", "DOUBLE[]"),
        ("freq_hist_data_bar_values", "freq_hist_values", "DOUBLE[]"),
        ("logits_hist_data_bar_heights", "logits_hist_heights", "DOUBLE[]"),
        ("logits_hist_data_bar_values", "logits_hist_values", "DOUBLE[]"),
        ("pos_str", "pos_str", "VARCHAR[]"), ("pos_values", "pos_values", "DOUBLE[]"),
        ("neg_str", "neg_str", "VARCHAR[]"), ("neg_values", "neg_values", "DOUBLE[]"),
        ("topkCosSimIndices", "top_cos_sim_indices", "INTEGER[]"),
        ("topkCosSimValues", "top_cos_sim_values", "DOUBLE[]"),
        ("neuron_alignment_indices", "neuron_alignment_indices", "INTEGER[]"),
        ("neuron_alignment_values", "neuron_alignment_values", "DOUBLE[]"),
        ("neuron_alignment_l1", "neuron_alignment_l1", "DOUBLE[]"),
        ("correlated_neurons_indices", "correlated_neurons_indices", "INTEGER[]"),
        ("correlated_neurons_pearson", "correlated_neurons_pearson", "DOUBLE[]"),
        ("correlated_neurons_l1", "correlated_neurons_l1", "DOUBLE[]"),
        ("correlated_features_indices", "correlated_features_indices", "INTEGER[]"),
        ("correlated_features_pearson", "correlated_features_pearson", "DOUBLE[]"),
        ("correlated_features_l1", "correlated_features_l1", "DOUBLE[]"),
        ("decoder_weights_dist", "decoder_weights_dist", "DOUBLE[]")))),
    "activations": (*_IDENTITY, Field("id", "id", "VARCHAR", True), Field("tokens", "tokens", "VARCHAR[]", True),
                    Field("values", "values", "DOUBLE[]", True), *(Field(k, c, t) for k, c, t in (
                        ("maxValue", "max_value", "DOUBLE"), ("minValue", "min_value", "DOUBLE"),
                        ("maxValueTokenIndex", "max_value_token_index", "INTEGER"),
                        ("binMin", "bin_min", "DOUBLE"), ("binMax", "bin_max", "DOUBLE"),
                        ("binContains", "bin_contains", "DOUBLE"),
                        ("qualifyingTokenIndex", "qualifying_token_index", "INTEGER"),
                        ("dfaValues", "dfa_values", "DOUBLE[]"), ("dfaMaxValue", "dfa_max_value", "DOUBLE"),
                        ("dfaTargetIndex", "dfa_target_index", "INTEGER")))),
    "explanations": (*_IDENTITY, Field("id", "id", "VARCHAR", True),
                     Field("description", "description", "VARCHAR", True),
                     Field("typeName", "type_name", "VARCHAR"),
                     Field("explanationModelName", "explanation_model_name", "VARCHAR"),
                     Field("authorId", "author_id", "VARCHAR"), Field("embedding", "embedding", "FLOAT[]")),
}


@dataclass(frozen=True)
class SourceFolder:
    path: Path
    model_id: str
    source_id: str
    meta: dict[str, dict | None]  # model, source, sourceset, release: each file's one line, or None

    @property
    def ref(self) -> str:
        return f"{self.model_id}/{self.source_id}"

    def files(self) -> dict[str, list[Path]]:
        """Its batch files by kind, in batch order: top-level activations and features (as
        Neuronpedia's importer reads them), explanations from explanations/ (subfolders too) and
        from any explanations-<model>/ folder beside it."""
        found = {kind: _batches(self.path / kind, recursive=kind == "explanations") for kind in FIELDS}
        for extra in sorted(p for p in self.path.glob("explanations-*") if p.is_dir()):
            found["explanations"] += _batches(extra, recursive=True)
        return found


def _batch_number(path: Path) -> tuple[int, str]:
    match = re.search(r"(\d+)\.jsonl(\.gz)?$", path.name)
    return (int(match.group(1)) if match else -1, path.name)


def _batches(folder: Path, recursive: bool) -> list[Path]:
    if not folder.is_dir():
        return []
    pattern = "**/*.jsonl*" if recursive else "*.jsonl*"
    files = [p for p in folder.glob(pattern) if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz"))]
    return sorted(files, key=lambda p: (str(p.parent), *_batch_number(p)))  # batch-2 before batch-10


def _one_line(path: Path) -> dict | None:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]  # not splitlines: U+2028
    try:
        row = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError as exc:
        raise SaecatError(f"{path}:1: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise SaecatError(f"{path}:1: not a JSON object")
    return row


def _is_source(path: Path) -> bool:
    return (path / "source.jsonl").is_file() or any((path / kind).is_dir() for kind in FIELDS)


def find_sources(location: str | Path) -> list[SourceFolder]:
    """The source folders under a local copy of a source folder, a model folder or `v1/`."""
    root = Path(location)
    if not root.is_dir():
        raise SaecatError(f"{root} is not a folder: name a copy of a Neuronpedia source folder "
                          "(v1/<modelId>/<sourceId>), of a model folder, or of v1/")
    if _is_source(root):
        candidates = [root]
    else:
        models = [root] if any(_is_source(p) for p in root.iterdir() if p.is_dir()) else sorted(
            p for p in root.iterdir() if p.is_dir() and p.name not in NOT_SOURCES)
        candidates = [s for m in models for s in sorted(m.iterdir())
                      if s.is_dir() and s.name not in NOT_SOURCES and _is_source(s)]
    if not candidates:
        raise SaecatError(f"no Neuronpedia source in {root}: a source folder holds source.jsonl or "
                          "features/, activations/, explanations/")
    sources = []
    for path in candidates:
        meta = {name: _one_line(path / f"{name}.jsonl") for name in ROOT_FILES}
        source = meta["source"] or {}
        sources.append(SourceFolder(path, str(source.get("modelId") or path.parent.name),
                                    str(source.get("id") or path.name), meta))
    return sources


def _column(field: Field) -> str:
    """The SQL reading a JSON column into the field's type; NULL where the value cannot be read."""
    raw = f'"{field.key}"'
    if field.key == "index":  # a string or a number; either way an integer
        return f"try_cast({raw} ->> '$' AS INTEGER)"
    if field.key == "embedding":  # an array, or (producer A) the array written as a string
        return (f"CASE WHEN json_type({raw}) = 'VARCHAR' THEN try_cast({raw} ->> '$' AS FLOAT[]) "
                f"ELSE try_cast({raw} AS FLOAT[]) END")
    if field.type == "VARCHAR":
        return f"CASE WHEN json_type({raw}) = 'VARCHAR' THEN {raw} ->> '$' END"
    return f"try_cast({raw} AS {field.type})"


def _broken(field: Field) -> str:
    """SQL: this field's value is missing where required, or present and not of its type."""
    raw, typed = f'"raw:{field.key}"', f'"{field.column}"'
    present = f"({raw} IS NOT NULL AND json_type({raw}) <> 'NULL')"
    bad = f"({present} AND ({typed} IS NULL"
    if field.type.endswith("[]"):
        bad += f" OR list_count({typed}) < len({typed})"  # an element that is not of the type
    if field.column == "feature":
        bad += f" OR {typed} < 0"
    bad += "))"
    return f"(NOT {present} OR {bad})" if field.required else bad


_WHAT = {"VARCHAR": "a string", "VARCHAR[]": "a list of strings", "INTEGER": "an integer",
         "INTEGER[]": "a list of integers", "DOUBLE": "a number", "DOUBLE[]": "a list of numbers",
         "FLOAT[]": "a list of numbers"}


def _stage_query(kind: str, path: Path, source: SourceFolder, folder: str) -> str:
    fields = FIELDS[kind]
    columns = "{" + ", ".join(f"'{f.key}': 'JSON'" for f in fields) + "}"
    checks = [f"WHEN {_broken(f)} THEN '{f.key} is {'missing or ' if f.required else ''}not {_WHAT[f.type]}'"
              for f in fields]
    checks.append(f"WHEN model_id <> {_quote(source.model_id)} THEN 'modelId ' || model_id || ' is not this "
                  f"source''s ({_quote(source.model_id)[1:-1]})'")
    checks.append(f"WHEN layer <> {_quote(source.source_id)} THEN 'layer ' || layer || ' is not this source "
                  f"({_quote(source.source_id)[1:-1]})'")
    if kind == "activations":
        checks.append("WHEN len(tokens) <> len(\"values\") THEN 'tokens and values differ in length'")
    raw = ", ".join(f'"{f.key}" AS "raw:{f.key}"' for f in fields)
    typed = ", ".join(f'{_column(f)} AS "{f.column}"' for f in fields)
    kept = ", ".join(f'"{f.column}"' for f in fields)
    if kind == "explanations":
        kept += f", {_quote(folder)} AS folder"
    return (f"SELECT line, {kept}, CASE {' '.join(checks)} END AS broken FROM ("
            f"SELECT row_number() OVER () AS line, {raw}, {typed} FROM read_json({_quote(str(path))}, "
            f"format = 'newline_delimited', columns = {columns}))")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_unparsable(path: Path) -> str:
    """The first line of a file that is not a JSON object, as 'file:line: why' (DuckDB's reader
    says only that the file is malformed)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{path}:{number}: not JSON ({exc.msg})"
                if not isinstance(row, dict):
                    return f"{path}:{number}: not a JSON object"
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        return f"{path}: cannot be read ({exc})"
    return f"{path}: not newline-delimited JSON"


class _Stage:
    """The import's staged Parquet files, one per export file, in the catalog's sidecar folder."""

    def __init__(self, db: Path, sources: list[SourceFolder]):
        key = hashlib.sha256("\n".join(str(s.path.resolve()) for s in sources).encode()).hexdigest()[:16]
        self.folder = sidecar_dir(db) / "imports" / f"neuronpedia-{key}"

    def path(self, kind: str, file: Path) -> Path:
        stat = file.stat()
        name = hashlib.sha256(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
        return self.folder / kind / f"{name}.parquet"

    def stage(self, con: duckdb.DuckDBPyConnection, kind: str, file: Path, source: SourceFolder) -> Path:
        """The file's staged rows, read now unless an earlier run did; a SaecatError naming the
        file and line of its first broken row."""
        target = self.path(kind, file)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            query = _stage_query(kind, file, source, str(file.parent.relative_to(source.path)))
            try:
                con.execute(f"COPY ({query}) TO {_quote(str(tmp))} (FORMAT parquet)")
            except duckdb.InvalidInputException:
                tmp.unlink(missing_ok=True)
                raise SaecatError(_first_unparsable(file)) from None
            tmp.replace(target)
        broken = first_row(con, f"SELECT line, broken FROM read_parquet({_quote(str(target))}) "
                                "WHERE broken IS NOT NULL ORDER BY line LIMIT 1")
        if broken:
            raise SaecatError(f"{file}:{broken[0]}: {broken[1]}")
        return target


@dataclass(frozen=True)
class Imported:
    """One imported source, as the import reports it."""

    sae: int
    release: str
    sae_id: str
    ref: str
    status: str  # the SAE's status: 'registered' until its weights are ingested
    n_features: int
    n_activations: int
    n_explanations: int


def is_url(location: str | Path) -> bool:
    return str(location).startswith(("s3://", "https://", "http://"))


def import_neuronpedia(location: str | Path, db: str | Path | None = None, *, progress: bool = False,
                       download_to: Path | None = None) -> list[Imported]:
    """Import every Neuronpedia source under a local folder, or under a bucket address (s3://
    neuronpedia-datasets/v1/..., or its https:// form), into the catalog (see the module's
    docstring). A bucket prefix is mirrored first into `download_to` (default: the catalog's
    sidecar folder), where a rerun finds what was fetched. Returns what each source became.
    Re-importing replaces a source's rows."""
    if is_url(location):
        into = download_to or sidecar_dir(Path(db) if db is not None else default_path()) / "imports" / "bucket"
        with _bar(progress, None, "downloading") as advance:
            folder = mirror(str(location), into, advance)
    else:
        folder = Path(location)
    sources = find_sources(folder)
    files = {(source.ref, kind): paths for source in sources for kind, paths in source.files().items()}
    with writer(db) as cat, _bar(progress, sum(map(len, files.values())), "reading export files") as advance:
        cat.con.execute(f"SET memory_limit = '{IMPORT_MEMORY}'")  # its sorts spill beside the catalog beyond it
        stage = _Stage(cat.path, sources)
        jobs = [(source, kind, file) for source in sources for kind in FIELDS for file in files[source.ref, kind]]
        cursors, opened = threading.local(), []

        def staged_file(job: tuple[SourceFolder, str, Path]) -> Path:
            if not hasattr(cursors, "con"):
                cursors.con = cat.con.cursor()  # a connection of its own: DuckDB runs them side by side
                opened.append(cursors.con)
            done = stage.stage(cursors.con, job[1], job[2], job[0])
            advance(1)
            return done

        # One file a thread: DuckDB reads a gzipped JSON file on one core. map() raises the first
        # broken file in the export's order, whichever thread finds it first.
        staged: dict[tuple[str, str], list[Path]] = {(source.ref, kind): [] for source in sources for kind in FIELDS}
        try:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for (source, kind, _), path in zip(jobs, pool.map(staged_file, jobs)):
                    staged[source.ref, kind].append(path)
        finally:
            for con in opened:
                con.close()
        with cat.transaction() as con:
            done = [_commit(con, source, {k: staged[source.ref, k] for k in FIELDS}, location) for source in sources]
        shutil.rmtree(stage.folder, ignore_errors=True)
    return done


@contextmanager
def _bar(shown: bool, total: int | None, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar, advanced by the callable it yields."""
    if not shown:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _parquet_list(files: list[Path]) -> str:
    return "[" + ", ".join(_quote(str(f)) for f in files) + "]"


def _commit(con: duckdb.DuckDBPyConnection, source: SourceFolder, staged: dict[str, list[Path]],
            location: str | Path) -> Imported:
    sae = _sae_for(con, source)
    for table in NEURONPEDIA_TABLES:
        con.execute(f"DELETE FROM {table} WHERE sae = ?", [sae])
    counts = {}
    for kind, key in (("features", "feature"), ("activations", "feature, id"), ("explanations", "feature, id")):
        table = f"neuronpedia_{kind}"
        columns = [f.column for f in FIELDS[kind] if f.column not in ("model_id", "layer")]
        if kind == "explanations":
            columns.append("folder")
        if kind == "activations":  # Neuronpedia requires these; derived from the values where a producer left them out
            derived = {"max_value": 'coalesce(max_value, list_max("values"))',
                       "min_value": 'coalesce(min_value, list_min("values"))',
                       "max_value_token_index": 'coalesce(max_value_token_index, list_position("values", '
                                                'list_max("values")) - 1)'}
        else:
            derived = {}
        names = ", ".join(f'"{c}"' for c in columns)
        select = ", ".join(derived.get(c, f'"{c}"') for c in columns)
        if staged[kind]:
            rows = f"read_parquet({_parquet_list(staged[kind])})"
            # A key twice (a feature in two batches) keeps one row; sorting the wide rows to find
            # them is most of the commit's time, so only when the narrow keys say there are any.
            if first_row(con, f"SELECT count(*) > count(DISTINCT ({key})) FROM {rows}")[0]:
                rows = f"(SELECT DISTINCT ON ({key}) * FROM {rows} ORDER BY {key})"
            con.execute(f"INSERT INTO {table} (sae, {names}) SELECT {sae}, {select} FROM {rows}")
        counts[kind] = first_row(con, f"SELECT count(*) FROM {table} WHERE sae = ?", [sae])[0]
    meta = source.meta
    src = meta["source"] or {}
    con.execute("DELETE FROM neuronpedia_sources WHERE model_id = ? AND source_id = ?",
                [source.model_id, source.source_id])
    con.execute(
        "INSERT INTO neuronpedia_sources (sae, model_id, source_id, set_name, dataset, num_prompts, "
        "num_tokens_in_prompt, model, source, sourceset, release, location, n_features, n_activations, "
        "n_explanations) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [sae, source.model_id, source.source_id, src.get("setName") or _set_name(source.source_id),
         src.get("dataset"), src.get("num_prompts"), src.get("num_tokens_in_prompt"),
         *(json.dumps(meta[name]) if meta[name] is not None else None for name in ROOT_FILES),
         str(location) if is_url(location) else str(Path(location).resolve()),
         counts["features"], counts["activations"], counts["explanations"]])
    release, sae_id, status = first_row(con, "SELECT release, sae_id, status FROM saes WHERE sae = ?", [sae])
    return Imported(sae, release, sae_id, source.ref, status, counts["features"], counts["activations"],
                    counts["explanations"])


def _set_name(source_id: str) -> str | None:
    """The source set of a source id '<layer>-<set>[__<info>]' (Neuronpedia's own rule)."""
    head = source_id.split("__", 1)[0]
    return head.split("-", 1)[1] if "-" in head else None


def _layer(source_id: str) -> int | None:
    head = source_id.split("-", 1)[0]
    return int(head) if re.fullmatch(r"\d+", head) else None


def _sae_for(con: duckdb.DuckDBPyConnection, source: SourceFolder) -> int:
    """The catalog SAE a source maps to, registered here when no registry entry names it."""
    row = first_row(con, "SELECT sae FROM saes WHERE neuronpedia_id = ? ORDER BY status <> 'ready', sae LIMIT 1",
                    [source.ref])
    if row:
        return row[0]
    release = RELEASE_PREFIX + source.model_id
    con.execute("INSERT INTO releases (release, model, links) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [release, source.model_id,
                 json.dumps({"neuronpedia": f"https://www.neuronpedia.org/{source.model_id}"})])
    src = source.meta["source"] or {}
    config = src.get("saelensConfig") if isinstance(src.get("saelensConfig"), dict) else {}
    return first_row(
        con, "INSERT INTO saes (release, sae_id, source, model, hook_name, layer, d_in, d_sae, neuronpedia_id, status) "
             "VALUES (?, ?, 'neuronpedia', ?, ?, ?, ?, ?, ?, 'registered') RETURNING sae",
        [release, source.source_id, source.model_id, config.get("hook_name"), _layer(source.source_id),
         config.get("d_in"), config.get("d_sae"), source.ref])[0]


