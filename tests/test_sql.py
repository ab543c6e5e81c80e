"""The SQL surface (`Catalog.sql`, `saecat sql`): the function allow-list, every statement class the
gate refuses, the time and row limits, each output format with exact values, dialects, the cosine
macros against numpy, and a fuzz over generated statements, run on a connection without the second
wall, that no file is read and nothing changes.

Catalogs are filled as in test_catalog: `commit` writes synthetic decoders through `Catalog.commit_sae`.
"""

from __future__ import annotations

import io
import json
import math
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import Result
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from catalog import Catalog, SaecatError
from catalog.query import _Deadline
from catalog.sandbox import ALLOWED_FUNCTIONS, check_query
from catalog.schema import QUERYABLE_TABLES
from queries.front.cli import app
from test_catalog import BASE_TIME, commit, dump, exact_topk, features_table, pairs_table, random_decoders

DEC_A = random_decoders(1)
DEC_B = random_decoders(2, n=200)
FIRE_A = features_table(DEC_A, seed=1).column("fire_count").to_numpy()
TABLES = ", ".join(QUERYABLE_TABLES)
MISSING = 10_000  # a feature index no SAE here has


@pytest.fixture(scope="module")
def catalog_keys(tmp_path_factory) -> tuple[Path, int, int]:
    db = tmp_path_factory.mktemp("sql") / "catalog.duckdb"
    key_a = commit(db, DEC_A, "local", "a", seed=1)
    key_b = commit(db, DEC_B, "other/repo", "layer_2", seed=2, pairs=pairs_table([1, 2], [2, 3], [11, 12]),
                   ingested_at=BASE_TIME + timedelta(hours=1))
    return db, key_a, key_b


@pytest.fixture
def ro(catalog_keys) -> Iterator[Catalog]:
    # Per test: DuckDB refuses a second read-only open of a file while one is open (lock_configuration).
    with Catalog.open(catalog_keys[0]) as cat:
        yield cat


def cli(*args: str) -> Result:
    """`saecat ARGS` in-process: exit code, stdout (bytes too), stderr, and the exception it ended with."""
    return CliRunner().invoke(app, list(args))


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- the function allow-list


def test_allow_list_names_duckdb_functions():
    """Every entry is a function DuckDB has, bar syntax sqlglot models as a function and saecat's macros."""
    known = {name for (name,) in duckdb.connect().execute("SELECT function_name FROM duckdb_functions()").fetchall()}
    assert sorted(ALLOWED_FUNCTIONS - known) == ["cast", "coalesce", "columns", "exists", "extract",
                                                 "feature_cosine", "ifnull", "try_cast"]


def test_allowed_functions_run_with_exact_values(ro, catalog_keys):
    _, key_a, _ = catalog_keys
    # aggregates and window functions
    assert (FIRE_A == FIRE_A.max()).sum() == 1  # arg_max is well defined
    assert ro.sql(f"SELECT count(*), sum(fire_count), max(fire_count), arg_max(feature, fire_count), "
                  f"quantile_disc(fire_count, 0.5) FROM features WHERE sae = {key_a}").rows == [
        (500, int(FIRE_A.sum()), FIRE_A.max(), int(np.argmax(FIRE_A)), int(np.sort(FIRE_A)[249]))]
    top3 = sorted(range(500), key=lambda f: (-FIRE_A[f], f))[:3]
    assert ro.sql(f"SELECT feature, row_number() OVER (ORDER BY fire_count DESC, feature) AS r FROM features "
                  f"WHERE sae = {key_a} QUALIFY r <= 3 ORDER BY r").rows == [(f, r) for r, f in enumerate(top3, 1)]
    # lists and fixed-size arrays: vector similarities against numpy
    (row,) = ro.sql(
        "SELECT list_cosine_similarity(a.decoder, b.decoder), list_inner_product(a.decoder, b.decoder), "
        "list_distance(a.decoder, b.decoder), array_cosine_similarity(a.decoder::FLOAT[32], b.decoder::FLOAT[32]), "
        "array_inner_product(a.decoder::FLOAT[32], b.decoder::FLOAT[32]), len(a.decoder), list_sum(a.decoder) "
        f"FROM features a JOIN features b USING (sae) WHERE sae = {key_a} AND a.feature = 3 AND b.feature = 42").rows
    a, b = DEC_A[3].astype(np.float64), DEC_A[42].astype(np.float64)
    cos = float(unit(a) @ unit(b))
    np.testing.assert_allclose(row, [cos, a @ b, np.linalg.norm(a - b), cos, a @ b, 32, a.sum()], rtol=1e-5)
    # math, strings, regular expressions, dates, JSON extraction
    assert ro.sql(
        "SELECT abs(-2), round(pi(), 3), sqrt(16.0), greatest(3, 9, 4), upper(sae_id), concat_ws('-', 'x', 'y'), "
        r"left(release, 3), regexp_extract('blocks.8.hook', '\d+'), regexp_replace('a.b.c', '\.', '/', 'g'), "
        "strftime(ingested_at, '%Y/%m/%d'), date_diff('day', DATE '2024-05-01', ingested_at::DATE), year(ingested_at), "
        """json_extract_string('{"a": {"b": "x"}}', '$.a.b'), '{"n": 3}'::JSON ->> 'n' """
        f"FROM saes WHERE sae = {key_a}").rows == [
        (2, 3.142, 4.0, 9, "A", "x-y", "loc", "8", "a/b/c", "2024/05/17", 16, 2024, "x", "3")]


FORBIDDEN_FUNCTIONS = [
    ("SELECT getenv('HOME')", "getenv"),
    ("SELECT current_setting('threads')", "current_setting"),
    ("SELECT getvariable('v')", "getvariable"),
    ("SELECT nextval('sae_key')", "nextval"),
    ("SELECT currval('sae_key')", "currval"),
    ("SELECT setseed(0.5)", "setseed"),
    ("SELECT sleep_ms(10)", "sleep_ms"),
    ("SELECT write_log('x')", "write_log"),
    ("SELECT json_execute_serialized_sql('x')", "json_execute_serialized_sql"),
    ("SELECT json_array(1, 2)", "json_array"),  # a typed sqlglot function (JSONArray), named as DuckDB runs it
    ("SELECT version()", "version"),  # typed too (CurrentVersion)
    ('SELECT "GETENV"(\'HOME\')', "getenv"),
    ("SELECT system.main.getenv('HOME')", "getenv"),
    ("SELECT list_transform([1], x -> getenv('HOME'))", "getenv"),
    ("SELECT feature FROM features WHERE feature = (SELECT length(getenv('HOME')))", "getenv"),
    ("WITH c AS (SELECT current_setting('threads') AS t) SELECT t FROM c", "current_setting"),
    ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
]


def assert_refused(cat: Catalog, query: str, message: str) -> None:
    """The gate refuses `query` with `message` (compared case-blind: sqlglot writes names upper case),
    and so does the catalog, before DuckDB sees it (its own errors read "query failed: ...")."""
    with pytest.raises(SaecatError) as direct:
        check_query(query)
    assert str(direct.value).lower() == message.lower()
    with pytest.raises(SaecatError) as via_catalog:
        cat.sql(query)
    assert str(via_catalog.value) == str(direct.value)


@pytest.mark.parametrize("query,name", FORBIDDEN_FUNCTIONS, ids=[q for q, _ in FORBIDDEN_FUNCTIONS])
def test_forbidden_functions_are_refused_by_name(ro, query, name):
    assert_refused(ro, query, f"function {name}() is not allowed in catalog queries")


# --------------------------------------------------------------------------- refused statements

ONLY = "only SELECT queries are allowed, not "
TABLE_FUNCTION = "table functions are not allowed: "
REFUSED_STATEMENTS = [
    ("COPY features TO '{out}'", ONLY + "COPY"),
    ("COPY features FROM '{canary}'", ONLY + "COPY"),
    ("ATTACH '{out}' AS other", ONLY + "ATTACH"),
    ("DETACH other", ONLY + "DETACH"),
    ("INSTALL httpfs", ONLY + "INSTALL"),
    ("LOAD httpfs", ONLY + "LOAD"),
    ("PRAGMA database_list", ONLY + "PRAGMA"),
    ("SET threads = 1", ONLY + "SET"),
    ("SET VARIABLE v = 1", ONLY + "SET"),
    ("RESET threads", ONLY + "RESET"),
    ("SELECT 1; SELECT 2", "exactly one SQL statement is allowed, got 2"),
    ("SELECT * FROM features; DROP TABLE features", "exactly one SQL statement is allowed, got 2"),
    ("-- nothing", "exactly one SQL statement is allowed, got 0"),
    ("CREATE TEMP TABLE t AS SELECT 1", ONLY + "CREATE"),
    ("CREATE MACRO m() AS 1", ONLY + "CREATE"),
    ("INSERT INTO releases (release) VALUES ('x')", ONLY + "INSERT"),
    ("UPDATE saes SET layer = 0", ONLY + "UPDATE"),
    ("DELETE FROM cooccurrence", ONLY + "DELETE"),
    ("DROP TABLE features", ONLY + "DROP"),
    ("ALTER TABLE saes ADD COLUMN z INT", ONLY + "ALTER"),
    ("TRUNCATE cooccurrence", ONLY + "TRUNCATE"),
    ("CHECKPOINT", ONLY + "CHECKPOINT"),
    ("CALL pragma_version()", ONLY + "CALL"),
    ("EXPLAIN SELECT 1", ONLY + "EXPLAIN"),
    ("DESCRIBE saes", ONLY + "DESCRIBE"),
    ("USE system", ONLY + "USE"),
    ("BEGIN", ONLY + "BEGIN"),
    ("SELECT * INTO t FROM saes", ONLY + "INTO inside one"),
    ("WITH d AS (DELETE FROM saes RETURNING *) SELECT * FROM d", ONLY + "DELETE inside one"),
    # file reads
    ("SELECT * FROM read_csv('{canary}')", TABLE_FUNCTION + "read_csv('{canary}')"),
    ("SELECT * FROM read_text('{canary}')", TABLE_FUNCTION + "read_text('{canary}')"),
    ("SELECT * FROM read_blob('{canary}')", TABLE_FUNCTION + "read_blob('{canary}')"),
    ("SELECT * FROM sniff_csv('{canary}')", TABLE_FUNCTION + "sniff_csv('{canary}')"),
    ("SELECT * FROM glob('/etc/*')", TABLE_FUNCTION + "glob('/etc/*')"),
    ("SELECT * FROM '{canary}'", "unknown table '{canary}'; the catalog has " + TABLES),
    ("SELECT * FROM features WHERE EXISTS (SELECT * FROM read_text('{canary}'))",
     TABLE_FUNCTION + "read_text('{canary}')"),
    # table functions, tables outside the catalog, CTEs out of their scope
    ("SELECT * FROM range(3)", TABLE_FUNCTION + "range(0, 3)"),
    ("SELECT * FROM query('SELECT 1')", TABLE_FUNCTION + "query('SELECT 1')"),
    ("SELECT * FROM duckdb_settings()", TABLE_FUNCTION + "duckdb_settings()"),
    ("SELECT * FROM pragma_table_info('saes')", TABLE_FUNCTION + "pragma_table_info('saes')"),
    ("SELECT * FROM system.main.duckdb_tables", "only catalog tables can be read, not system.main.duckdb_tables"),
    ("SELECT * FROM information_schema.tables", "only catalog tables can be read, not information_schema.tables"),
    ("SELECT * FROM duckdb_tables", "unknown table 'duckdb_tables'; the catalog has " + TABLES),
    ("SELECT * FROM (WITH a AS (SELECT 1) SELECT * FROM a) AS t, a", "unknown table 'a'; the catalog has " + TABLES),
]


@pytest.mark.parametrize("query,message", REFUSED_STATEMENTS, ids=[q for q, _ in REFUSED_STATEMENTS])
def test_statement_classes_are_refused_by_name(ro, tmp_path, query, message):
    paths = {"canary": tmp_path / "canary.csv", "out": tmp_path / "out.duckdb"}
    paths["canary"].write_text("secret\n1\n")
    assert_refused(ro, query.format(**paths), message.format(**paths))
    assert not paths["out"].exists()
    assert ro.sql("SELECT count(*) FROM saes").rows == [(2,)]


def test_statement_classes_are_refused_through_the_cli(catalog_keys, tmp_path):
    """The same refusals through `saecat sql`: exit 1, the message, nothing run."""
    paths = {"canary": tmp_path / "canary.csv", "out": tmp_path / "out.duckdb"}
    paths["canary"].write_text("secret\n1\n")
    for query, message in REFUSED_STATEMENTS:
        result = cli("sql", "--db", str(catalog_keys[0]), "--", query.format(**paths))  # "--": queries may start with --
        assert result.exit_code != 0, query
        assert isinstance(result.exception, SaecatError), query
        assert str(result.exception).lower() == message.format(**paths).lower(), query
        assert "secret" not in result.output
    assert not paths["out"].exists()


def test_duckdb_errors_in_an_allowed_query_are_one_clear_error(ro):
    with pytest.raises(SaecatError) as info:
        ro.sql("SELECT no_such_column FROM saes")
    assert str(info.value).startswith('query failed: Binder Error: Referenced column "no_such_column" not found')
    assert "\n" not in str(info.value)
    with pytest.raises(SaecatError, match="^unknown SQL dialect 'nosuch'$"):
        ro.sql("SELECT 1", dialect="nosuch")


# --------------------------------------------------------------------------- limits

# 700 features to the fourth power: hours of work, so only the time limit can end it.
ENDLESS = ("SELECT count(*) FROM features a, features b, features c, features d "
           "WHERE a.feature + b.feature + c.feature + d.feature = 7")


def test_time_limit_interrupts_a_slow_query_and_the_catalog_answers_after(ro):
    start = time.monotonic()
    with pytest.raises(SaecatError) as info:
        ro.sql(ENDLESS, timeout_s=0.5)
    elapsed = time.monotonic() - start
    assert str(info.value) == "query interrupted: it ran past the time limit of 0.5 s"
    assert 0.5 <= elapsed < 3.0
    assert ro.sql("SELECT count(*) FROM saes", timeout_s=5).rows == [(2,)]


class _Interruptible:
    def __init__(self) -> None:
        self.interrupts = 0

    def interrupt(self) -> None:
        self.interrupts += 1


def test_deadline_fires_only_while_its_query_runs():
    con = _Interruptible()
    with _Deadline(con, 0.05) as deadline:  # type: ignore[arg-type]
        time.sleep(0.3)
    assert (con.interrupts, deadline.fired) == (1, True)
    con = _Interruptible()
    with _Deadline(con, 0.05) as deadline:  # type: ignore[arg-type]
        pass
    time.sleep(0.3)  # the connection's next query would be running now
    assert (con.interrupts, deadline.fired) == (0, False)
    with _Deadline(con, None) as deadline:  # type: ignore[arg-type]
        time.sleep(0.1)
    assert (con.interrupts, deadline.fired) == (0, False)


def test_row_limit_and_truncated_flag(ro, catalog_keys):
    _, key_a, _ = catalog_keys
    q = f"SELECT feature FROM features WHERE sae = {key_a} ORDER BY feature DESC"
    cases = {7: ([(f,) for f in range(499, 492, -1)], True), 499: ([(f,) for f in range(499, 0, -1)], True),
             500: ([(f,) for f in range(499, -1, -1)], False), 501: ([(f,) for f in range(499, -1, -1)], False),
             0: ([], True), None: ([(f,) for f in range(499, -1, -1)], False)}
    for max_rows, (rows, truncated) in cases.items():
        result = ro.sql(q, max_rows=max_rows)
        assert (result.rows, result.truncated, result.arrow().num_rows) == (rows, truncated, len(rows)), max_rows
    with pytest.raises(SaecatError, match=r"^max_rows must be 0 or more, not -1$"):
        ro.sql(q, max_rows=-1)
    with pytest.raises(SaecatError, match=r"^the time limit must be positive, not 0 s$"):
        ro.sql(q, timeout_s=0)


# --------------------------------------------------------------------------- output formats

FORMATS_QUERY = (
    "SELECT sae_id, d_sae, threshold, ingested_at, decoder_folded, 'x,\"y\"' AS quoted, 'nan'::DOUBLE AS nan, "
    "NULL AS nothing, [0.5, 2.5]::DOUBLE[] AS pair, 1.25::DECIMAL(5, 2) AS price, "
    "(SELECT sum(n11) FROM cooccurrence c WHERE c.sae = s.sae) AS n11_total FROM saes s ORDER BY sae"
)
FORMATS_COLUMNS = ["sae_id", "d_sae", "threshold", "ingested_at", "decoder_folded", "quoted", "nan", "nothing",
                   "pair", "price", "n11_total"]
LATER = BASE_TIME + timedelta(hours=1)
FORMATS_JSON = [
    {"sae_id": "a", "d_sae": 500, "threshold": 0.0, "ingested_at": BASE_TIME.isoformat(), "decoder_folded": False,
     "quoted": 'x,"y"', "nan": None, "nothing": None, "pair": [0.5, 2.5], "price": 1.25, "n11_total": 16},
    {"sae_id": "layer_2", "d_sae": 200, "threshold": 0.0, "ingested_at": LATER.isoformat(), "decoder_folded": False,
     "quoted": 'x,"y"', "nan": None, "nothing": None, "pair": [0.5, 2.5], "price": 1.25, "n11_total": 23},
]
FORMATS_CSV = (
    "sae_id,d_sae,threshold,ingested_at,decoder_folded,quoted,nan,nothing,pair,price,n11_total\n"
    'a,500,0.0,2024-05-17T12:30:45.123456,false,"x,""y""",,,"[0.5, 2.5]",1.25,16\n'
    'layer_2,200,0.0,2024-05-17T13:30:45.123456,false,"x,""y""",,,"[0.5, 2.5]",1.25,23\n'
)

# TSV escapes what would cut a row: the quoted column holds "x<TAB>y<LF>" here
FORMATS_TSV = (
    "sae_id\td_sae\tthreshold\tingested_at\tdecoder_folded\tquoted\tnan\tnothing\tpair\tprice\tn11_total\n"
    "a\t500\t0.0\t2024-05-17T12:30:45.123456\tfalse\tx\\ty\\n\t\t\t[0.5, 2.5]\t1.25\t16\n"
    "layer_2\t200\t0.0\t2024-05-17T13:30:45.123456\tfalse\tx\\ty\\n\t\t\t[0.5, 2.5]\t1.25\t23\n"
)


def same_table(a: pa.Table, b: pa.Table) -> bool:
    """Table equality, but for the NaN column (NaN equals nothing, itself included)."""
    return a.schema == b.schema and a.drop_columns(["nan"]).equals(b.drop_columns(["nan"]))


def strict_json(text: str):
    """json.loads that rejects NaN and Infinity, which are not JSON."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} in JSON output"))


def test_every_output_format_has_the_exact_values(ro):
    result = ro.sql(FORMATS_QUERY)
    assert result.columns == FORMATS_COLUMNS and not result.truncated
    rows = result.rows
    assert [row[:6] + row[7:] for row in rows] == [
        ("a", 500, 0.0, BASE_TIME, False, 'x,"y"', None, [0.5, 2.5], Decimal("1.25"), 16),
        ("layer_2", 200, 0.0, LATER, False, 'x,"y"', None, [0.5, 2.5], Decimal("1.25"), 23)]
    assert all(math.isnan(row[6]) for row in rows)
    assert strict_json(result.to_json()) == FORMATS_JSON
    assert result.to_csv() == FORMATS_CSV
    assert pd.read_csv(io.StringIO(result.to_csv()))["n11_total"].tolist() == [16, 23]
    table = pa.ipc.open_stream(result.to_ipc()).read_all()
    assert same_table(table, result.arrow())
    assert table.column("d_sae").to_pylist() == [500, 200]
    assert table.column("ingested_at").to_pylist() == [BASE_TIME, LATER]
    df = result.df()
    assert df.columns.tolist() == FORMATS_COLUMNS
    assert df["sae_id"].tolist() == ["a", "layer_2"]
    assert df["d_sae"].tolist() == [500, 200]
    assert df["ingested_at"].tolist() == [pd.Timestamp(BASE_TIME), pd.Timestamp(LATER)]
    assert df["nan"].isna().all() and df["nothing"].isna().all()
    assert [list(p) for p in df["pair"]] == [[0.5, 2.5], [0.5, 2.5]]


def test_cli_formats(catalog_keys, tmp_path):
    db = str(catalog_keys[0])
    as_json = cli("sql", FORMATS_QUERY, "--db", db, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    assert strict_json(as_json.stdout) == FORMATS_JSON
    assert strict_json(cli("sql", FORMATS_QUERY, "--db", db, "--json").stdout) == FORMATS_JSON
    assert cli("sql", FORMATS_QUERY, "--db", db, "--format", "csv").stdout == FORMATS_CSV
    piped = cli("sql", FORMATS_QUERY, "--db", db, "--format", "arrow")
    assert (piped.exit_code, piped.stderr) == (0, "")
    streamed = pa.ipc.open_stream(piped.stdout_bytes).read_all()
    assert streamed.column("sae_id").to_pylist() == ["a", "layer_2"]
    out = tmp_path / "result.arrow"
    to_file = cli("sql", FORMATS_QUERY, "--db", db, "--format", "arrow", "--output", str(out))
    assert (to_file.exit_code, to_file.stdout_bytes) == (0, b"")
    assert same_table(pa.ipc.open_stream(out.read_bytes()).read_all(), streamed)
    tsv = cli("sql", FORMATS_QUERY.replace("'x,\"y\"'", "'x' || chr(9) || 'y' || chr(10)"), "--db", db)  # a pipe
    assert tsv.stdout == FORMATS_TSV
    table = cli("sql", "SELECT sae_id, d_sae FROM saes ORDER BY sae", "--db", db, "--format", "table")
    cells = [line.replace("┃", "│").split("│")[1:-1] for line in table.stdout.splitlines()]
    assert [[c.strip() for c in line] for line in cells if line] == [
        ["sae_id", "d_sae"], ["a", "500"], ["layer_2", "200"]]


def test_cli_row_limit_note_timeout_and_dialect(catalog_keys):
    db = str(catalog_keys[0])
    cut = cli("sql", "SELECT feature FROM features ORDER BY sae, feature", "--db", db, "--json", "--max-rows", "3")
    assert strict_json(cut.stdout) == [{"feature": 0}, {"feature": 1}, {"feature": 2}]
    assert cut.stderr == "note: more than 3 rows matched; only the first 3 are returned (--max-rows)\n"
    whole = cli("sql", "SELECT sae FROM saes", "--db", db, "--json", "--max-rows", "2")
    assert (len(strict_json(whole.stdout)), whole.stderr) == (2, "")
    slow = cli("sql", ENDLESS, "--db", db, "--timeout", "0.3")
    assert slow.exit_code == 1
    assert str(slow.exception) == "query interrupted: it ran past the time limit of 0.3 s"
    pg = cli("sql", "SELECT string_agg(sae_id, ',' ORDER BY sae_id) AS ids FROM saes WHERE release ILIKE 'LOCAL'",
             "--db", db, "--dialect", "postgres", "--json")
    assert strict_json(pg.stdout) == [{"ids": "a"}]
    table_to_file = cli("sql", "SELECT 1", "--db", db, "--output", "x.txt")
    assert str(table_to_file.exception) == "--output needs --format tsv, csv, json or arrow"


# --------------------------------------------------------------------------- dialects


def test_dialects_are_transpiled(ro, catalog_keys):
    _, key_a, _ = catalog_keys
    postgres = [
        ("SELECT 5 # 3 AS x", [(6,)]),  # '#' is XOR in PostgreSQL; DuckDB's own parser rejects it
        ("SELECT string_agg(sae_id, ', ' ORDER BY sae_id) FROM saes", [("a, layer_2",)]),
        (f"SELECT feature::text || ':' || fire_count::text FROM features WHERE sae = {key_a} AND feature < 2 "
         "ORDER BY feature LIMIT ALL", [(f"{f}:{FIRE_A[f]}",) for f in (0, 1)]),
        ("SELECT TO_CHAR(ingested_at, 'YYYY-MM') FROM saes WHERE sae_id ILIKE 'A'", [("2024-05",)]),
    ]
    for query, rows in postgres:
        assert ro.sql(query, dialect="postgres").rows == rows, query
    assert ro.sql("SELECT `sae_id`, IFNULL(neuronpedia_id, 'none') FROM saes ORDER BY sae LIMIT 1",
                  dialect="mysql").rows == [("a", "none")]
    with pytest.raises(SaecatError, match=r"^malformed SQL"):
        ro.sql("SELECT 5 # 3 AS x")
    with pytest.raises(SaecatError, match=r"^function pg_read_file\(\) is not allowed"):
        ro.sql("SELECT pg_read_file('/etc/passwd')", dialect="postgres")


# --------------------------------------------------------------------------- cosine macros


def test_feature_cosine_equals_numpy(ro, catalog_keys):
    _, key_a, key_b = catalog_keys
    assert ro.con.execute("SELECT current_setting('lock_configuration')").fetchall() == [(True,)]
    within = ro.sql(f"SELECT feature_cosine({key_a}, 3, feature) FROM features WHERE sae = {key_a} ORDER BY feature")
    np.testing.assert_allclose([c for (c,) in within.rows], unit(DEC_A) @ unit(DEC_A[3]), atol=1e-6, rtol=0)
    across = ro.sql(f"SELECT feature_cosine({key_a}, 5, {key_b}, feature) FROM features WHERE sae = {key_b} "
                    "ORDER BY feature")
    np.testing.assert_allclose([c for (c,) in across.rows], unit(DEC_B) @ unit(DEC_A[5]), atol=1e-6, rtol=0)
    # A missing feature or SAE is NULL; a user's CTE named `features` does not stand in for the table.
    assert ro.sql(f"SELECT feature_cosine({key_a}, 3, {MISSING}), feature_cosine(99, 0, {key_a}, 0)").rows == [
        (None, None)]
    (shadowed,) = ro.sql(f"WITH features AS (SELECT 1 AS x) SELECT feature_cosine({key_a}, 3, 11) FROM features").rows
    assert shadowed[0] == pytest.approx(-1.0, abs=1e-6)
    # Nearest neighbours in SQL, as a researcher would write them.
    top = ro.sql(f"SELECT feature, feature_cosine({key_a}, 3, feature) AS cos FROM features "
                 f"WHERE sae = {key_a} AND feature <> 3 ORDER BY cos DESC LIMIT 5").rows
    want, want_cos = exact_topk(DEC_A, DEC_A[3], 5, exclude=3)
    assert [f for f, _ in top] == want.tolist()
    np.testing.assert_allclose([c for _, c in top], want_cos, atol=1e-6, rtol=0)



# --------------------------------------------------------------------------- fuzz

CANARY_TOKEN = "canary-5e1f07"
# Pieces statements are built from; {canary}, {out} and {dir} stand for paths.
SAFE_EXPRESSIONS = [
    "feature", "fire_count + 1", "round(decoder_norm, 2)", "len(decoder)", "list_cosine_similarity(decoder, decoder)",
    "feature_cosine(sae, feature, 3)", "upper(CAST(feature AS VARCHAR))", "coalesce(mean_activation, 0)",
    "decoder[1]", "CASE WHEN feature > 3 THEN 'hi' ELSE 'lo' END", "regexp_matches(CAST(feature AS VARCHAR), '1')",
]
DANGEROUS_EXPRESSIONS = [
    "getenv('HOME')", '"getenv"(\'HOME\')', "system.main.getenv('HOME')", "current_setting('threads')",
    "nextval('sae_key')", "setseed(0.5)", "getvariable('v')", "write_log('x')", "read_text('{canary}')",
    "length((SELECT content FROM read_text('{canary}')))", "list_transform([1], x -> current_setting('threads'))",
]
SAFE_SOURCES = ["features", "features AS f", "(SELECT * FROM features WHERE feature < 20) AS sub"]
DANGEROUS_SOURCES = [
    "read_csv('{canary}')", "read_text('{canary}')", "read_blob('{canary}')", "'{canary}'", "sniff_csv('{canary}')",
    "glob('{dir}/*')", "range(3)", "duckdb_settings()", "query('SELECT * FROM features')",
    "system.main.duckdb_tables", "information_schema.tables",
]
SHAPES = [  # {q}: a SELECT built from the pieces above
    "{q}", "WITH c AS ({q}) SELECT * FROM c", "SELECT * FROM ({q}) AS s", "({q}) UNION ALL ({q})",
    "SELECT count(*) FROM features WHERE feature IN (SELECT 1 FROM ({q}) AS s)",
]
STATEMENTS = [
    "COPY features TO '{out}'", "COPY features FROM '{canary}'", "ATTACH '{out}' AS other", "INSTALL httpfs",
    "LOAD httpfs", "PRAGMA database_list", "SET threads = 1", "RESET threads", "CREATE TEMP TABLE t AS SELECT 1",
    "INSERT INTO releases (release) VALUES ('x')", "DELETE FROM cooccurrence", "DROP TABLE features",
    "SELECT * INTO t FROM features", "WITH d AS (DELETE FROM saes RETURNING *) SELECT * FROM d", "CHECKPOINT",
    "UPDATE saes SET layer = 0", "CALL pragma_version()",
]
MUTATIONS = [  # spellings that must not change the verdict
    lambda s: s, str.upper, str.swapcase, lambda s: s.replace(" ", "\n"), lambda s: s.replace(" ", " /* c */ "),
    lambda s: s.replace("(", " ("),
]
# Where the one dangerous piece goes, if any: each kind of danger is tried on its own, among safe pieces.
DANGER = [None, "select", "where", "from", "statement", "second statement"]


@st.composite
def statements(draw) -> tuple[str, bool, Callable[[str], str]]:
    """A statement, whether it holds a dangerous piece, and how to respell it once its paths are in."""
    danger = draw(st.sampled_from(DANGER))
    if danger == "statement":
        return draw(st.sampled_from(STATEMENTS)), True, draw(st.sampled_from(MUTATIONS))
    exprs = draw(st.lists(st.sampled_from(SAFE_EXPRESSIONS), min_size=1, max_size=3))
    where, source = draw(st.sampled_from(SAFE_EXPRESSIONS)), draw(st.sampled_from(SAFE_SOURCES))
    if danger == "select":
        exprs.insert(draw(st.integers(0, len(exprs))), draw(st.sampled_from(DANGEROUS_EXPRESSIONS)))
    elif danger == "where":
        where = draw(st.sampled_from(DANGEROUS_EXPRESSIONS))
    elif danger == "from":
        source = draw(st.sampled_from(DANGEROUS_SOURCES))
    query = f"SELECT {', '.join(exprs)} FROM {source} WHERE {where} IS NOT NULL LIMIT 5"
    text = draw(st.sampled_from(SHAPES)).format(q=query)
    if danger == "second statement":
        text += "; " + draw(st.sampled_from([*STATEMENTS, "SELECT 1"]))
    return text, danger is not None, draw(st.sampled_from(MUTATIONS))


def _state(con: duckdb.DuckDBPyConnection) -> tuple:
    """What a statement could change: rows, tables (temporary ones too), databases, settings, sequences."""
    return (
        [con.execute(f"SELECT count(*) FROM {t}").fetchall() for t in QUERYABLE_TABLES],
        con.execute("SELECT database_name, schema_name, table_name FROM duckdb_tables() ORDER BY ALL").fetchall(),
        con.execute("SELECT database_name FROM duckdb_databases() ORDER BY ALL").fetchall(),
        con.execute("SELECT name, value FROM duckdb_settings() ORDER BY name").fetchall(),
        con.execute("SELECT sequence_name, last_value FROM duckdb_sequences() ORDER BY ALL").fetchall(),
    )


@pytest.fixture(scope="module")
def privileged(tmp_path_factory) -> Iterator[tuple[Catalog, dict[str, Path], dict]]:
    """A writer connection: external access on, configuration unlocked. Only the SQL gate stands
    between a statement and the canary file."""
    root = tmp_path_factory.mktemp("fuzz")
    paths = {"canary": root / "canary.csv", "out": root / "out.duckdb", "dir": root}
    paths["canary"].write_text(f"token\n{CANARY_TOKEN}\n")
    db = root / "catalog.duckdb"
    commit(db, random_decoders(3, n=50))
    before = dump(db)
    with Catalog.open(db, read_only=False) as cat:
        # Control: this connection would read the canary if a statement asked it to.
        assert cat.con.execute(f"SELECT * FROM read_csv('{paths['canary']}')").fetchall() == [(CANARY_TOKEN,)]
        yield cat, paths, _state(cat.con)
    assert dump(db) == before
    assert not paths["out"].exists()


@settings(max_examples=500, deadline=None, database=None)
@given(statement=statements())
def test_fuzz_sandbox_never_lets_a_file_read_or_a_change_through(privileged, statement):
    cat, paths, baseline = privileged
    template, dangerous, respell = statement
    text = respell(template.format(**{k: str(v) for k, v in paths.items()}))
    try:
        output = cat.sql(text, timeout_s=10).to_csv()
        refused = False
    except SaecatError as err:
        output = str(err)
        refused = not output.startswith("query failed: ")  # DuckDB's errors come after the gate let it through
    assert refused == dangerous, (text, output)
    assert CANARY_TOKEN not in output
    assert _state(cat.con) == baseline
