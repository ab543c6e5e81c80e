"""The SQL gate: one read-only query over catalog tables, or a clear refusal.

This is the first of two walls. The second is the connection itself (`Catalog.open` in read-only
mode turns DuckDB's external access off and locks its configuration), so a query that got past
this check still could not touch a file.
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

from catalog.errors import SaecatError
from catalog.schema import QUERYABLE_TABLES

# Functions that reach outside the catalog or its session; refused by name whatever their case.
_FORBIDDEN_FUNCTION_PREFIXES = ("read_", "parquet_", "glob", "getenv", "current_setting", "query",
                                "sniff_csv", "duckdb_", "pragma_", "iceberg_", "delta_")


def check_query(sql: str, *, dialect: str | None = None, max_rows: int | None = None) -> str:
    """Validate `sql` and return it as DuckDB SQL, wrapped in a row limit when one is given."""
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect or "duckdb") if s is not None]
    except ParseError as err:
        first = err.errors[0] if err.errors else {}
        where = f" at line {first.get('line')}, column {first.get('col')}" if first else ""
        raise SaecatError(f"malformed SQL{where}: {first.get('description', err)}") from err
    if len(statements) != 1:
        raise SaecatError(f"exactly one SQL statement is allowed, got {len(statements)}")
    tree = statements[0]
    if not isinstance(tree, exp.Query):
        # statements sqlglot does not model (LOAD, EXPLAIN, ...) parse as a Command named by `this`
        keyword = tree.this if isinstance(tree, exp.Command) else tree.key
        raise SaecatError(f"only SELECT queries are allowed, not {str(keyword).upper()}")

    cte_names = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            raise SaecatError(f"table functions are not allowed: {table.this.sql(dialect='duckdb')}")
        if table.args.get("db") or table.args.get("catalog"):
            raise SaecatError(f"only catalog tables can be read, not {table.sql(dialect='duckdb')}")
        name = table.name.lower()
        if name not in QUERYABLE_TABLES and name not in cte_names:
            raise SaecatError(f"unknown table {table.name!r}; the catalog has {', '.join(QUERYABLE_TABLES)}")
    for func in tree.find_all(exp.Func):
        name = (func.name if isinstance(func, exp.Anonymous) else func.sql_name()).lower()
        if name.startswith(_FORBIDDEN_FUNCTION_PREFIXES):
            raise SaecatError(f"function {name}() is not allowed in catalog queries")

    out = tree.sql(dialect="duckdb")
    if max_rows is not None:
        out = f"SELECT * FROM ({out}) AS _q LIMIT {int(max_rows)}"
    return out
