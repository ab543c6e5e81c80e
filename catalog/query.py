"""Running a user's SQL: the sandbox check, saecat's macros, a row limit and a time limit.

The result is materialised once, as an Arrow table, inside the time limit; every output format
(rows, pandas, JSON, CSV, an Arrow IPC stream) is a view of that one table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from dataclasses import dataclass
from datetime import date, time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from catalog.errors import SaecatError, one_line
from catalog.macros import create_macros
from catalog.sandbox import check_query

if TYPE_CHECKING:
    import pandas as pd


def json_value(value: Any) -> Any:
    """A value as JSON carries it: non-finite floats become null, decimals numbers (ints when
    integral, e.g. DuckDB's HUGEINT sums), dates and times ISO 8601, anything else its text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return int(value) if value.as_tuple().exponent >= 0 else float(value)
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def text_cell(value: Any) -> str:
    """Text as is, NULL empty, anything else (numbers, booleans, lists, structs) as JSON."""
    plain = json_value(value)
    if plain is None:
        return ""
    return plain if isinstance(plain, str) else json.dumps(plain)


# TSV has no quoting: a tab or line break inside a cell (tokens are often "\n" or "\t") would cut
# the row, so they are written as backslash escapes, as PostgreSQL's COPY text format does.
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def delimited(columns: list[str], rows: list[tuple], fmt: str) -> str:
    """Rows as CSV (RFC 4180 quoting) or TSV (backslash escapes), under a header line."""
    out = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([text_cell(v) for v in row] for row in rows)
    else:
        for line in (columns, *([text_cell(v) for v in row] for row in rows)):
            out.write("\t".join(cell.translate(_TSV_ESCAPES) for cell in line) + "\n")
    return out.getvalue()


@dataclass(frozen=True)
class QueryResult:
    """The rows a query returned. `truncated`: more rows matched than max_rows allowed; `table`
    then holds the first max_rows of them."""

    table: pa.Table
    truncated: bool

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    @property
    def rows(self) -> list[tuple]:
        """The rows as Python tuples (converted from the Arrow table on each access)."""
        return list(zip(*(column.to_pylist() for column in self.table.columns)))

    def arrow(self) -> pa.Table:
        return self.table

    def df(self) -> "pd.DataFrame":
        return self.table.to_pandas()

    def to_json(self) -> str:
        """A JSON array with one object per row."""
        return json.dumps([dict(zip(self.columns, map(json_value, row))) for row in self.rows], allow_nan=False)

    def to_csv(self) -> str:
        """CSV with a header line."""
        return delimited(self.columns, self.rows, "csv")

    def to_tsv(self) -> str:
        """Tab-separated lines under a header line; tabs, line breaks and backslashes escaped."""
        return delimited(self.columns, self.rows, "tsv")

    def to_ipc(self) -> bytes:
        """The table as an Arrow IPC stream."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.table.schema) as writer:
            writer.write_table(self.table)
        return sink.getvalue().to_pybytes()


class _Deadline:
    """Interrupts the query running on `con` once `seconds` pass (never when None).

    Only while inside the `with`: a timer that fires as the query ends must not interrupt the
    connection's next query.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, seconds: float | None):
        self._con = con
        self._timer = threading.Timer(seconds, self._fire) if seconds is not None else None
        self._lock = threading.Lock()
        self._done = False
        self.fired = False

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self.fired = True
                self._con.interrupt()

    def __enter__(self) -> "_Deadline":
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True
        if self._timer is not None:
            self._timer.cancel()


def run_query(con: duckdb.DuckDBPyConnection, sql: str, *, dialect: str | None = None,
              max_rows: int | None = None, timeout_s: float | None = None) -> QueryResult:
    """Check `sql` with the sandbox and run it on `con`: at most `max_rows` rows, interrupted after
    `timeout_s` seconds (no limits when None). Refusals, timeouts and DuckDB's own errors (a
    misspelt column, a type mismatch) are all a SaecatError."""
    if max_rows is not None and max_rows < 0:
        raise SaecatError(f"max_rows must be 0 or more, not {max_rows}")
    if timeout_s is not None and timeout_s <= 0:
        raise SaecatError(f"the time limit must be positive, not {timeout_s:g} s")
    # One row past the limit tells whether the limit cut anything.
    checked = check_query(sql, dialect=dialect, max_rows=None if max_rows is None else max_rows + 1)
    create_macros(con)
    deadline = _Deadline(con, timeout_s)
    try:
        with deadline:
            table = con.sql(checked).to_arrow_table()
    except duckdb.InterruptException as err:
        if not deadline.fired:
            raise
        raise SaecatError(f"query interrupted: it ran past the time limit of {timeout_s:g} s") from err
    except duckdb.Error as err:
        raise SaecatError(f"query failed: {one_line(err)}") from err
    truncated = max_rows is not None and table.num_rows > max_rows
    return QueryResult(table.slice(0, max_rows) if truncated else table, truncated)
