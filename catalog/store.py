"""The catalog store: one embedded DuckDB file and a sidecar folder beside it.

DuckDB allows one writer process per file, and readers in other processes only while no writer
holds it. So saecat never keeps a write connection open for long: ingestion computes outside
the database and opens a writer only to record progress and to commit a finished SAE, in one
short transaction, retrying while another process holds the file.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from catalog.errors import CatalogBusy, NotFound, SaecatError, one_line
from catalog.schema import LABEL_TABLES, MIGRATIONS, SAE_TABLES, SCHEMA_VERSION, SCHEMA_VERSION_TABLE

if TYPE_CHECKING:
    from catalog.query import QueryResult

DEFAULT_DB = "saecat.duckdb"
LOCK_WAIT_S = 60.0
RETRY_MAX_S = 0.1  # the longest pause between two tries to open a catalog another process holds


def default_path() -> Path:
    """The catalog used when none is named: $SAECAT_DB, else ./saecat.duckdb."""
    return Path(os.environ.get("SAECAT_DB") or DEFAULT_DB)


def sidecar_dir(db_path: Path) -> Path:
    """Folder beside the DuckDB file holding vector indexes and ingestion checkpoints."""
    return db_path.with_name(db_path.name + ".d")


# What `saes` records of an SAE that stores every pair with n11 > 0 (ingest.pair_policy's default).
COMPLETE_PAIRS = {"pair_min_blocks": 1, "pair_top_partners": None, "pair_rank_by": None, "pairs_complete": True}

_RECORD_COLUMNS = "sae, release, sae_id, status, d_in, d_sae, model, hook_name, ingested_at"


@dataclass(frozen=True)
class SaeRecord:
    """One row of `saes`, as the rest of saecat sees it."""

    sae: int
    release: str
    sae_id: str
    status: str
    d_in: int | None
    d_sae: int | None
    model: str | None
    hook_name: str | None
    ingested_at: Any


def first_row(con: duckdb.DuckDBPyConnection, query: str, params: list | None = None) -> tuple | None:
    """The first row of a query, or None. (In DuckDB 2.0 a fetchone() that leaves rows unread
    keeps the connection busy, so every single-row read goes through here.)"""
    rows = con.execute(query, params or []).fetchall()
    return rows[0] if rows else None


def insert_keyed(con: duckdb.DuckDBPyConnection, table: str, key_column: str, key: int,
                 data: pa.Table | pa.RecordBatchReader) -> None:
    """Insert an Arrow table's rows, or a reader's (pulled batch by batch as DuckDB inserts them,
    so a stream of any size is never whole in memory), into `table`, each with `key_column` = key."""
    failed: list[BaseException] = []
    if isinstance(data, pa.RecordBatchReader):
        data = pa.RecordBatchReader.from_batches(data.schema, _noting_failure(data, failed))
    con.register("_incoming", data)
    try:
        names = ", ".join(data.schema.names)
        con.execute(f"INSERT INTO {table} ({key_column}, {names}) SELECT {int(key)}, {names} FROM _incoming")
    except duckdb.Error:
        if failed:  # DuckDB reports a failing stream as its own error: raise what the stream raised
            raise failed[0] from None
        raise
    finally:
        # in a transaction a failed insert aborted, DuckDB refuses even this: the caller rolls back,
        # and the next insert's register replaces the name
        with suppress(duckdb.TransactionException):
            con.unregister("_incoming")


def _noting_failure(reader: pa.RecordBatchReader, failed: list[BaseException]) -> Iterator[pa.RecordBatch]:
    try:
        yield from reader
    except BaseException as err:
        failed.append(err)
        raise


def _is_lock_error(err: Exception) -> bool:
    text = str(err).lower()
    return "lock" in text or "conflicting" in text or "different configuration" in text


def _connect(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    """Connect, waiting (with back-off) while another process holds the file."""
    config = {"enable_external_access": False} if read_only else {}
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except (duckdb.IOException, duckdb.ConnectionException) as err:
            # ConnectionException: this process has the file open the other way (a server storing
            # an analysis while another request reads); it frees up like another process's lock.
            if not _is_lock_error(err):
                raise SaecatError(f"cannot open catalog {path}: {one_line(err)}") from err
            if time.monotonic() >= deadline:
                raise CatalogBusy(
                    f"catalog {path} is held by another process (an ingestion committing?); "
                    f"waited {wait_s:.0f}s"
                ) from err
            time.sleep(delay)
            # A writer waiting on a busy server gets in only between two of its requests'
            # connections, gaps of milliseconds: it must try often (a 1 s cap starved it for 10 s).
            delay = min(delay * 2, RETRY_MAX_S)


def _schema_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The catalog's schema version; 0 for an empty DuckDB file. A DuckDB file that another
    application made (its own tables, no saecat version table, or one of another shape) is
    refused: saecat never migrates a database that is not its own."""
    columns = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = ? ORDER BY column_index", [SCHEMA_VERSION_TABLE]).fetchall()
    if not columns:
        others = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "UNION ALL SELECT view_name FROM duckdb_views() WHERE database_name = current_database() "
            "AND NOT internal ORDER BY 1 LIMIT 6").fetchall()]
        if others:
            raise _foreign_error(path, f"it has {', '.join(others[:5])}{', ...' if len(others) > 5 else ''} "
                                       f"and no {SCHEMA_VERSION_TABLE} table")
        return 0
    if [c[0] for c in columns] != ["version", "applied_at"] or columns[0][1] != "INTEGER":
        raise _foreign_error(path, f"its {SCHEMA_VERSION_TABLE} table is not saecat's "
                                   f"({', '.join(f'{n} {t}' for n, t in columns)})")
    return first_row(con, f"SELECT coalesce(max(version), 0) FROM {SCHEMA_VERSION_TABLE}")[0]


def _foreign_error(path: Path, why: str) -> SaecatError:
    return SaecatError(f"{path} is a DuckDB database but not a saecat catalog ({why}); saecat leaves it "
                       "as it is: pass another --db")


def check_writable(path: Path) -> None:
    """Say now, before any work, if a catalog cannot be written here: a directory, a read-only
    file, or a new file in a folder that cannot be written. (Whether it is a saecat catalog is
    checked when it is opened.)"""
    if path.is_dir():
        raise SaecatError(f"catalog {path} is a directory, not a DuckDB file: pass --db a file path")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise SaecatError(f"catalog {path} is read-only (no write permission); writing needs a writable file")
        return
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise SaecatError(f"cannot create catalog {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SaecatError(f"cannot create catalog {path}: folder {folder} is read-only (no write permission)")


def _newer_error(path: Path, version: int) -> SaecatError:
    return SaecatError(
        f"catalog {path} has schema v{version}, newer than this saecat (v{SCHEMA_VERSION}); upgrade saecat"
    )


def _migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    current = _schema_version(con, path)
    if current > SCHEMA_VERSION:
        raise _newer_error(path, current)
    pending = [(v, stmts) for v, stmts in MIGRATIONS if v > current]
    if not pending:
        return
    con.execute("BEGIN")
    try:
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION_TABLE} "
            "(version INTEGER PRIMARY KEY, applied_at TIMESTAMP DEFAULT current_timestamp)"
        )
        for version, stmts in pending:
            for stmt in stmts:
                con.execute(stmt)
            con.execute(f"INSERT INTO {SCHEMA_VERSION_TABLE} (version) VALUES (?)", [version])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


class Catalog:
    """A saecat catalog. Open it with `Catalog.open(path)`; use it as a context manager.

    Read-only catalogs (the default) run with DuckDB's external access off and its
    configuration locked, so even a query that slips past the SQL check cannot read files.

    >>> with Catalog.open("saecat.duckdb") as cat:          # doctest: +SKIP
    ...     cat.sql("SELECT release, sae_id, d_sae FROM saes").df()
    """

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection, read_only: bool):
        self.path = path
        self.con = con
        self.read_only = read_only

    @classmethod
    def open(
        cls, path: str | os.PathLike | None = None, *, read_only: bool = True, wait_s: float = LOCK_WAIT_S,
        older: bool = False,
    ) -> "Catalog":
        """`older`: open a read-only catalog of an older schema too (what a write command reads
        before it upgrades the catalog), not only one of this saecat's schema."""
        path = Path(path) if path is not None else default_path()
        if read_only:
            if not path.exists():
                raise SaecatError(f"no catalog at {path}: ingest an SAE first (saecat ingest ...)")
            if path.is_dir():
                raise SaecatError(f"catalog {path} is a directory, not a DuckDB file: pass --db a file path")
            con = _connect(path, True, wait_s)
            try:
                version = _schema_version(con, path)
            except BaseException:
                con.close()
                raise
            if version > SCHEMA_VERSION or (version < SCHEMA_VERSION and not older):
                con.close()
                if version > SCHEMA_VERSION:
                    raise _newer_error(path, version)
                raise SaecatError(
                    f"catalog {path} has schema v{version}, this saecat expects v{SCHEMA_VERSION}; "
                    "any write command (e.g. saecat ingest) upgrades it"
                )
            try:
                con.execute("SET lock_configuration = true")
            except duckdb.InvalidInputException as err:
                # Connections to one file in one process share one database: when another is
                # open (a server's concurrent requests), its configuration is locked already.
                if "locked" not in str(err):
                    raise
        else:
            check_writable(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise SaecatError(f"cannot create catalog {path}: {one_line(err)}") from err
            con = _connect(path, False, wait_s)
            try:
                _migrate(con, path)
            except BaseException:
                con.close()
                raise
        return cls(path, con, read_only)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sidecar(self) -> Path:
        return sidecar_dir(self.path)

    # ------------------------------------------------------------------ reads

    def sql(self, query: str, *, dialect: str | None = None, max_rows: int | None = None,
            timeout_s: float | None = None, memory_limit: str | int | None = None) -> "QueryResult":
        """Run one read-only SELECT over the catalog, after the sandbox check: at most `max_rows`
        rows (`.truncated` says whether more matched), interrupted after `timeout_s` seconds.
        The result offers .rows, .columns, .df(), .arrow(), .to_json(), .to_csv(), .to_ipc().

        With `memory_limit` (bytes, or "512MB", "2GiB"; `catalog.limits.memory_limit()` gives
        $SAECAT_QUERY_MEMORY or the default) the query runs in a worker process of its own that
        cannot grow past it and is killed at `timeout_s` (catalog/limits.py), as `saecat sql` and
        the server run it; without, it runs on this connection and the time limit interrupts it
        between DuckDB's vectors, which one huge expression can outlast."""
        if memory_limit is not None:
            from catalog.limits import run_limited

            if not self.read_only:
                raise SaecatError("a query with a memory limit needs the catalog opened read-only")
            return run_limited(self.path, query, dialect=dialect, max_rows=max_rows, timeout_s=timeout_s,
                               memory=memory_limit)
        from catalog.query import run_query  # sqlglot loads only when a query is run

        return run_query(self.con, query, dialect=dialect, max_rows=max_rows, timeout_s=timeout_s)

    def find_sae(self, release: str, sae_id: str, *, ready: bool = True) -> SaeRecord:
        """The SAE named (release, sae_id), or a clear error naming what is there."""
        row = first_row(self.con, f"SELECT {_RECORD_COLUMNS} FROM saes WHERE release = ? AND sae_id = ?",
                        [release, sae_id])
        if row is None:
            known = self.con.execute(
                "SELECT sae_id FROM saes WHERE release = ? AND status = 'ready' ORDER BY sae_id LIMIT 5",
                [release],
            ).fetchall()
            hint = f"; ingested in {release}: {', '.join(r[0] for r in known)}" if known else ""
            raise NotFound(f"no SAE ({release!r}, {sae_id!r}) in catalog {self.path}{hint}")
        record = SaeRecord(*row)
        if ready and record.status != "ready":
            raise SaecatError(f"SAE ({release!r}, {sae_id!r}) is {record.status}, not ingested yet")
        return record

    def sae_by_key(self, sae: int) -> SaeRecord:
        row = first_row(self.con, f"SELECT {_RECORD_COLUMNS} FROM saes WHERE sae = ?", [sae])
        if row is None:
            raise NotFound(f"no SAE with key {sae} in catalog {self.path}")
        return SaeRecord(*row)

    def saes_by_key(self, saes: Sequence[int]) -> list[SaeRecord]:
        """The SAEs with these keys, in the order given, read in one query."""
        rows = self.con.execute(f"SELECT {_RECORD_COLUMNS} FROM saes WHERE sae IN (SELECT unnest($keys::BIGINT[]))",
                                {"keys": [int(s) for s in saes]}).fetchall()
        found = {row[0]: SaeRecord(*row) for row in rows}
        missing = [s for s in saes if s not in found]
        if missing:
            raise NotFound(f"no SAE with key {missing[0]} in catalog {self.path}")
        return [found[s] for s in saes]

    def decoders(self, sae: int) -> np.ndarray:
        """The SAE's decoder matrix [d_sae, d_in], float32, rows in feature order."""
        col = (
            self.con.sql(f"SELECT decoder FROM features WHERE sae = {int(sae)} ORDER BY feature")
            .to_arrow_table()
            .column(0)
            .combine_chunks()
        )
        if len(col) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32, copy=False)

    def index(self, sae: int, kind: str = "exact"):
        """The FAISS index over this SAE's decoder directions, exact or "hnsw": kept in memory
        once used, read from its file, or rebuilt if that is missing or stale."""
        from catalog.index import INDEXES, VectorIndex, cache_key

        if kind not in ("exact", "hnsw"):
            raise SaecatError(f"unknown index kind {kind!r}: use 'exact' or 'hnsw'")
        record = self.sae_by_key(sae)
        return INDEXES.get(cache_key(self, record, kind), lambda: VectorIndex.load_or_build(self, record, kind))

    def neighbors(self, sae: int, feature: int, k: int = 10) -> list[tuple[int, int, float]]:
        """The k features of the same SAE whose decoder directions are nearest by cosine."""
        _check_feature(self.sae_by_key(sae), feature)
        index = self.index(sae)
        query = index.vector(feature)[None, :]
        sae_keys, features, cosines = index.search(query, k + 1)
        hits = [(int(s), int(f), float(c)) for s, f, c in zip(sae_keys[0], features[0], cosines[0]) if f != feature]
        return hits[:k]

    def saes(self) -> pa.Table:
        """Every SAE in the catalog, in key order: all columns of `saes`, then its sparsity and
        fidelity figures from `sae_quality` (NULL until measured; its L0 distribution stays there)."""
        return self.con.sql("SELECT s.*, q.* EXCLUDE (sae, n_tokens, l0_values, l0_counts) "
                            "FROM saes s LEFT JOIN sae_quality q USING (sae) ORDER BY sae").to_arrow_table()

    def releases(self) -> pa.Table:
        """Every release in the catalog, all columns of `releases`, by name."""
        return self.con.sql("SELECT * FROM releases ORDER BY release").to_arrow_table()

    def feature(self, sae: int, feature: int, *, decoder: bool = False) -> dict[str, Any]:
        """One feature's row of `features` (the decoder only when asked: it is the bulk of the row)
        and its density, fire_count / the SAE's n_tokens."""
        _check_feature(self.sae_by_key(sae), feature)
        columns = "f.*" if decoder else "f.* EXCLUDE (decoder)"
        rows = self.con.sql(
            f"SELECT {columns}, f.fire_count / nullif(s.n_tokens, 0) AS density "
            "FROM features f JOIN saes s USING (sae) WHERE f.sae = ? AND f.feature = ?",
            params=[sae, feature],
        ).to_arrow_table().to_pylist()
        if not rows:
            raise NotFound(f"SAE {sae} has no features yet")
        return rows[0]

    def feature_labels(self, sae: int, feature: int) -> dict[str, pa.Table]:
        """What each label table holds about one feature (without its sae and feature columns), by
        table name."""
        # ORDER BY ALL: a label table's first column after (sae, feature) orders it (rank, bin, ...).
        return {
            table: self.con.sql(
                f"SELECT * EXCLUDE (sae, feature) FROM {table} WHERE sae = ? AND feature = ? ORDER BY ALL",
                params=[sae, feature],
            ).to_arrow_table()
            for table in LABEL_TABLES
        }

    # ----------------------------------------------------------------- writes

    def _require_writer(self) -> None:
        if self.read_only:
            raise SaecatError("this catalog was opened read-only")

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self._require_writer()
        self.con.execute("BEGIN")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def start_run(self, release: str, sae_id: str, params: dict[str, Any], params_hash: str) -> int:
        """Record a new ingestion run; earlier unfinished runs of the same work become 'interrupted'."""
        with self.transaction() as con:
            con.execute(
                "UPDATE ingest_runs SET status = 'interrupted', updated_at = current_timestamp "
                "WHERE params_hash = ? AND status = 'running'",
                [params_hash],
            )
            return first_row(
                con,
                "INSERT INTO ingest_runs (release, sae_id, params, params_hash, status, pid) "
                "VALUES (?, ?, ?, ?, 'running', ?) RETURNING run",
                [release, sae_id, json.dumps(params, sort_keys=True), params_hash, os.getpid()],
            )[0]

    def update_run(self, run: int, *, status: str | None = None, n_documents: int | None = None,
                   n_tokens: int | None = None, error: str | None = None) -> None:
        self._require_writer()
        finished = status in ("done", "failed", "interrupted")
        self.con.execute(
            "UPDATE ingest_runs SET status = coalesce(?, status), n_documents = coalesce(?, n_documents), "
            "n_tokens = coalesce(?, n_tokens), error = coalesce(?, error), updated_at = current_timestamp, "
            "finished_at = CASE WHEN ? THEN current_timestamp ELSE finished_at END WHERE run = ?",
            [status, n_documents, n_tokens, error, finished, run],
        )

    def commit_sae(self, sae_row: dict[str, Any], features: pa.Table | pa.RecordBatchReader,
                   pairs: pa.Table | pa.RecordBatchReader, release_row: dict[str, Any] | None = None,
                   run: int | None = None, extra: dict[str, pa.Table | pa.RecordBatchReader] | None = None) -> int:
        """Write one SAE with its features, co-occurrence pairs and its other per-SAE tables
        (`extra`, by name: labels, blocks, activation_spectrum) in one transaction. Each table is
        an Arrow table or a stream of batches, read as it is inserted: a stream that fails part way
        rolls the whole SAE back.

        An SAE already in the catalog under the same (release, sae_id) keeps its key and has its
        rows replaced, so a re-ingestion never duplicates anything. `pairs` are every pair with
        n11 > 0 unless `sae_row` records the pair policy that chose them (`pair_min_blocks`,
        `pair_top_partners`, `pair_rank_by`, `pairs_complete`).
        """
        tables = {"features": features, "cooccurrence": pairs, **(extra or {})}
        unknown = set(tables) - set(SAE_TABLES)
        if unknown:
            raise ValueError(f"not per-SAE tables: {sorted(unknown)}")
        columns = list(sae_row)
        with self.transaction() as con:
            if first_row(con, "SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database() "
                              "AND table_name = 'saes' AND column_name = 'pairs_complete'")[0]:  # from v6 on
                sae_row = {**COMPLETE_PAIRS, **sae_row}
                columns = list(sae_row)
            if release_row is not None:
                names = list(release_row)
                con.execute(
                    f"INSERT INTO releases ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                    "ON CONFLICT (release) DO NOTHING",
                    list(release_row.values()),
                )
            existing = first_row(con, "SELECT sae FROM saes WHERE release = ? AND sae_id = ?",
                                 [sae_row["release"], sae_row["sae_id"]])
            if existing:
                key = existing[0]
                assignments = ", ".join(f"{c} = ?" for c in columns)
                con.execute(f"UPDATE saes SET {assignments} WHERE sae = ?", [*sae_row.values(), key])
                for table in SAE_TABLES:
                    con.execute(f"DELETE FROM {table} WHERE sae = ?", [key])
            else:
                key = first_row(
                    con,
                    f"INSERT INTO saes ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) RETURNING sae",
                    list(sae_row.values()),
                )[0]
            for table, data in tables.items():
                insert_keyed(con, table, "sae", key, data)
            if run is not None:
                self.update_run(run, status="done", n_documents=sae_row.get("n_documents"),
                                n_tokens=sae_row.get("n_tokens"))
        return key


def _check_feature(record: SaeRecord, feature: int) -> None:
    if not 0 <= feature < (record.d_sae or 0):
        raise NotFound(f"feature {feature} out of range: SAE {record.sae} has {record.d_sae} features")


@contextmanager
def writer(path: str | os.PathLike | None = None, wait_s: float = LOCK_WAIT_S) -> Iterator[Catalog]:
    """A short-lived write connection; close it as soon as the write is done."""
    cat = Catalog.open(path, read_only=False, wait_s=wait_s)
    try:
        yield cat
    finally:
        cat.close()
