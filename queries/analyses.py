"""What the three geometry analyses share: read inputs from the catalog, compute, store the result.

An analysis reads what it needs under a read-only catalog and closes it before computing (so an
ingestion can commit meanwhile), then writes its summary and result rows in one short
transaction. Each stored run records its parameters and the catalog state it read (the SAE's
ingestion time and size, the schema and saecat versions): asked again with the same parameters
over the same state, `run` returns the stored result instead of recomputing; after a
re-ingestion the state differs, so it recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Callable, TypeVar

import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from catalog import Catalog
from catalog.errors import NotFound, SaecatError
from catalog.query import json_value
from catalog.schema import ANALYSIS_TABLES, SCHEMA_VERSION
from catalog.store import SaeRecord, first_row, insert_keyed, writer

# kind -> (module, its parameters class). Modules load when first asked for (scikit-learn,
# matplotlib and the model stack are slow to import).
MODULES = {
    "crystals": ("queries.crystals", "CrystalParams"),
    "word_pairs": ("queries.word_pairs", "WordPairParams"),
    "lobes": ("queries.lobes", "LobesParams"),
    "spectra": ("queries.spectra", "SpectraParams"),
}
KINDS = tuple(MODULES)

Params = TypeVar("Params")
Inputs = TypeVar("Inputs")


@dataclass
class Analysis:
    """One analysis of one SAE: what was asked, what was read, what was found.

    `tables` maps a result table's name (`crystals`, `lobes`, ...) to its rows, without the
    `analysis` column; `analysis` is the key in the catalog's `analyses` table.
    """

    kind: str
    sae: int
    release: str
    sae_id: str
    params: dict[str, Any]
    inputs: dict[str, Any]
    summary: dict[str, Any]
    tables: dict[str, pa.Table] = field(default_factory=dict)
    seconds: float = 0.0
    analysis: int | None = None
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: everything, result tables as lists of row objects."""
        return {
            "analysis": self.analysis, "kind": self.kind, "sae": self.sae, "release": self.release,
            "sae_id": self.sae_id, "params": self.params, "inputs": self.inputs,
            "summary": json_value(self.summary), "seconds": self.seconds, "cached": self.cached,
            "tables": {name: json_value(table.to_pylist()) for name, table in self.tables.items()},
        }


def module(kind: str):
    """The module implementing an analysis kind: its `run`, `plot` and parameters class."""
    if kind not in MODULES:
        raise SaecatError(f"unknown analysis {kind!r}; saecat has {', '.join(KINDS)}")
    return importlib.import_module(MODULES[kind][0])


def params_class(kind: str) -> type:
    return getattr(module(kind), MODULES[kind][1])


def make_params(kind: str, values: dict[str, Any]) -> Any:
    """A kind's parameters from plain values (JSON, CLI), with unknown names refused by name."""
    cls = params_class(kind)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(values) - set(known)
    if unknown:
        raise SaecatError(f"unknown {kind} parameter(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(known))}")
    try:  # pydantic checks the values against the dataclass's annotations (and makes lists tuples)
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise SaecatError(f"bad {kind} parameters: {problems}") from err


def plot(analysis: "Analysis", path: str | os.PathLike):
    """Draw a stored or fresh analysis's figure (PNG or SVG, by the path's suffix)."""
    return module(analysis.kind).plot(analysis, path)


def params_dict(params: Any) -> dict[str, Any]:
    """A params dataclass as a plain, JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(params), default=list))


def params_hash(kind: str, params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([kind, params], sort_keys=True).encode()).hexdigest()[:16]


def catalog_inputs(cat: Catalog, record: SaeRecord) -> dict[str, Any]:
    """The catalog state an analysis of this SAE reads: it changes when the SAE is re-ingested."""
    ingested_at, n_tokens, n_blocks = first_row(
        cat.con, "SELECT ingested_at, n_tokens, n_blocks FROM saes WHERE sae = ?", [record.sae])
    return {
        "ingested_at": json_value(ingested_at), "n_tokens": n_tokens, "n_blocks": n_blocks,
        "d_sae": record.d_sae, "d_in": record.d_in, "schema_version": SCHEMA_VERSION,
        "saecat_version": version("saecat"),
    }


def resolve(cat: Catalog, release: str | None, sae_id: str | None, sae: int | None = None) -> SaeRecord:
    """The ready SAE named by (release, sae_id) or by its key."""
    if sae is not None:
        record = cat.sae_by_key(sae)
        if record.status != "ready":
            raise SaecatError(f"SAE {sae} is {record.status}, not ingested yet")
        return record
    if release is None or sae_id is None:
        raise SaecatError("name the SAE: release and sae_id, or its key")
    return cat.find_sae(release, sae_id)


def run(
    kind: str,
    params: Params,
    load: Callable[[Catalog, SaeRecord, Params], Inputs],
    compute: Callable[[Inputs, Params], tuple[dict[str, Any], dict[str, pa.Table]]],
    *,
    db: str | os.PathLike | None = None,
    release: str | None = None,
    sae_id: str | None = None,
    sae: int | None = None,
    force: bool = False,
    store: bool = True,
) -> Analysis:
    """Run one analysis of one SAE: `load` reads its inputs from the open catalog, `compute` turns
    them into (summary, result tables) with the catalog closed. A stored result with the same
    parameters over the same catalog state is returned as it is, unless `force`."""
    if kind not in KINDS:
        raise ValueError(f"unknown analysis kind {kind!r}")
    asked = params_dict(params)
    digest = params_hash(kind, asked)
    with Catalog.open(db) as cat:
        path = cat.path
        record = resolve(cat, release, sae_id, sae)
        inputs = catalog_inputs(cat, record)
        if not force:
            stored = _find(cat, kind, record, digest, inputs)
            if stored is not None:
                return stored
        data = load(cat, record, params)
    started = time.perf_counter()
    summary, tables = compute(data, params)
    unknown = set(tables) - set(ANALYSIS_TABLES)
    if unknown:
        raise ValueError(f"not analysis tables: {sorted(unknown)}")
    result = Analysis(kind=kind, sae=record.sae, release=record.release, sae_id=record.sae_id, params=asked,
                      inputs=inputs, summary=json_value(summary), tables=tables,
                      seconds=time.perf_counter() - started)
    if store:
        result.analysis = _store(path, result, digest)
    return result


def _find(cat: Catalog, kind: str, record: SaeRecord, digest: str, inputs: dict[str, Any]) -> Analysis | None:
    row = first_row(
        cat.con,
        "SELECT analysis FROM analyses WHERE kind = ? AND sae = ? AND params_hash = ? AND inputs::VARCHAR = ? "
        "ORDER BY analysis DESC LIMIT 1",
        [kind, record.sae, digest, json.dumps(inputs, sort_keys=True)],
    )
    return None if row is None else load_analysis(cat, row[0])


def _store(db: str | os.PathLike, result: Analysis, digest: str) -> int:
    """Write the run and its result rows in one transaction."""
    with writer(db) as cat, cat.transaction() as con:
        key = first_row(
            con,
            "INSERT INTO analyses (kind, sae, params, params_hash, inputs, summary, seconds) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING analysis",
            [result.kind, result.sae, json.dumps(result.params, sort_keys=True), digest,
             json.dumps(result.inputs, sort_keys=True), json.dumps(result.summary), result.seconds],
        )[0]
        for table, data in result.tables.items():
            insert_keyed(con, table, "analysis", key, data)
    return key


def load_analysis(cat: Catalog, analysis: int) -> Analysis:
    """A stored analysis with its result rows, as `run` returned it."""
    row = first_row(
        cat.con,
        "SELECT a.kind, a.sae, s.release, s.sae_id, a.params, a.inputs, a.summary, a.seconds "
        "FROM analyses a JOIN saes s USING (sae) WHERE a.analysis = ?",
        [analysis],
    )
    if row is None:
        raise NotFound(f"no analysis {analysis} in catalog {cat.path}")
    kind, sae, release, sae_id, params, inputs, summary, seconds = row
    tables = {}
    for table in ANALYSIS_TABLES:
        data = cat.con.sql(f"SELECT * EXCLUDE (analysis) FROM {table} WHERE analysis = ? ORDER BY ALL",
                           params=[analysis]).to_arrow_table()
        if data.num_rows:
            tables[table] = data
    return Analysis(kind=kind, sae=sae, release=release, sae_id=sae_id, params=json.loads(params),
                    inputs=json.loads(inputs), summary=json.loads(summary), tables=tables, seconds=seconds,
                    analysis=analysis, cached=True)


def list_analyses(cat: Catalog, kind: str | None = None, sae: int | None = None) -> pa.Table:
    """Stored analyses, newest first, without their result rows."""
    return cat.con.sql(
        "SELECT a.analysis, a.kind, a.sae, s.release, s.sae_id, a.params, a.summary, a.seconds, a.created_at "
        "FROM analyses a JOIN saes s USING (sae) "
        "WHERE (?::VARCHAR IS NULL OR a.kind = ?) AND (?::INTEGER IS NULL OR a.sae = ?) ORDER BY a.analysis DESC",
        params=[kind, kind, sae, sae],
    ).to_arrow_table()
