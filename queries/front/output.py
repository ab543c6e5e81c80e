"""How the CLI prints rows: a table for a person at a terminal, one line per row for a pipe.

Rich wraps a table's cells to the terminal's width, and a pipe has none (rich assumes 80
columns), so `saecat releases --new | grep NAME` would miss a name folded over three lines. Off a
terminal the default is therefore TSV, as `gh` does: a header line, then one tab-separated line
per row, never wrapped. `--format table|tsv|csv|json` chooses explicitly.

A command that prints several tables (status, tour, an analysis) prints them as sections: in
TSV and CSV each starts with a `# title` line and ends with a blank line; notes between tables are
`# ` lines too, so `grep -v '^#'` leaves only rows. In JSON the sections are one object, keyed by
each table's name.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal, Sequence, Union

from rich.console import Console
from rich.table import Table

from catalog.query import delimited, json_value

Format = Literal["table", "tsv", "csv", "json"]


@dataclass(frozen=True)
class Rows:
    """One table: its columns and rows; `name` keys it in JSON, `title` heads it elsewhere."""

    columns: list[str]
    rows: list[tuple]
    title: str | None = None
    name: str | None = None

    def objects(self) -> list[dict]:
        return [{c: json_value(v) for c, v in zip(self.columns, row)} for row in self.rows]


Section = Union[Rows, str]  # a table, or a line of prose between tables


def choose(fmt: str | None, as_json: bool = False) -> str:
    """The format asked for (--json is --format json); unasked, a table at a terminal, else TSV."""
    if as_json:
        return "json"
    return fmt or ("table" if sys.stdout.isatty() else "tsv")


def _cell(value: object) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _rich_table(rows: Rows) -> Table:
    table = Table(title=rows.title)
    for column in rows.columns:
        table.add_column(column, overflow="fold")
    for row in rows.rows:
        table.add_row(*map(_cell, row))
    return table


def emit(rows: Rows, fmt: str) -> None:
    """Print one table in `fmt`: a JSON list of objects, or a table without a title line."""
    if fmt == "json":
        print(json.dumps(rows.objects()))
    elif fmt == "table":
        Console().print(_rich_table(rows))
    else:
        sys.stdout.write(delimited(rows.columns, rows.rows, fmt))


def emit_sections(sections: Sequence[Section], fmt: str) -> None:
    """Print several tables and notes in `fmt` (see the module's docstring for the layout)."""
    if fmt == "json":
        tables = [s for s in sections if isinstance(s, Rows)]
        body: dict = {s.name or s.title or f"table{n}": s.objects() for n, s in enumerate(tables)}
        notes = [s for s in sections if isinstance(s, str)]
        print(json.dumps({**body, **({"notes": notes} if notes else {})}))
        return
    console = Console(highlight=False)
    for section in sections:
        if fmt == "table":
            console.print(section if isinstance(section, str) else _rich_table(section), markup=False)
        elif isinstance(section, str):
            print(f"# {section}")
        else:
            print(f"# {section.title or section.name or ''}")
            sys.stdout.write(delimited(section.columns, section.rows, fmt))
            print()
