"""How the CLI prints rows: one unwrapped line per row in a pipe, a table at a terminal, and the
same rows in every --format.

The catalog is the sae-lens registry as `saecat sync` stores it (no weights read): long release
names are what a table wraps and a pipe must not.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from catalog import Catalog
from catalog.query import delimited
from queries.front.cli import app
from queries.front.output import Rows, emit_sections

CLI = f"{shlex.quote(sys.executable)} -c 'from queries.front.cli import main; main()'"
LONG = "gpt2-small-res_sll-ajt"  # the example: folded over three lines in an 80-column table


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("registry") / "catalog.duckdb"
    subprocess.run(f"{CLI} sync --db {db}", shell=True, check=True, capture_output=True, timeout=300)
    return db


def test_a_pipe_gets_one_line_per_row(registry_db):
    """`saecat releases --new | grep NAME` finds the release and each of its SAEs, whole."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    got = subprocess.run(f"{CLI} releases --new --db {registry_db} | grep -- {LONG}", shell=True,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    want = sorted(get_pretrained_saes_directory()[LONG].saes_map)
    assert got[0].split("\t")[:2] == ["release", LONG]
    assert sorted(line.split("\t")[2] for line in got[1:]) == want
    assert all(line.split("\t")[:2] == ["sae", LONG] for line in got[1:])


def test_a_terminal_gets_a_table(registry_db):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(f"{CLI} releases --db {registry_db}", shell=True, stdout=follower,
                            stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
    os.close(follower)
    chunks = []
    while True:  # read as it prints: a full terminal buffer would block the command
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the terminal's other end is closed: all is read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    shown = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())  # without its colours
    assert "┃ release" in shown and f"│ {LONG} " in shown and "\t" not in shown


def _parse(fmt: str, text: str) -> list[dict]:
    """Rows as {column: text}, whatever the format (JSON values as the text CSV would hold)."""
    if fmt == "json":
        return [{k: "" if v is None else v if isinstance(v, str) else json.dumps(v) for k, v in row.items()}
                for row in json.loads(text)]
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    header, *lines = text.splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]


@pytest.mark.parametrize("args,table", [(["saes", "--registered"], "saes"), (["runs"], "ingest_runs"),
                                        (["releases"], "releases"), (["releases", "--new"], "registry_changes"),
                                        (["watch", "list"], "watches"), (["analyses"], "analyses")])
def test_every_listing_prints_the_same_rows_in_every_format(registry_db, args, table):
    outputs = {}
    for fmt in ("tsv", "csv", "json"):
        result = CliRunner().invoke(app, [*args, "--db", str(registry_db), "--format", fmt])
        assert result.exit_code == 0, result.output
        outputs[fmt] = _parse(fmt, result.stdout)
    piped = CliRunner().invoke(app, [*args, "--db", str(registry_db)])  # no terminal: tsv
    assert _parse("tsv", piped.stdout) == outputs["tsv"]
    assert outputs["tsv"] == outputs["csv"] == outputs["json"]
    with Catalog.open(registry_db) as cat:  # one sync: every change is the last sync's
        assert len(outputs["json"]) == cat.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_sections_in_each_format(capsys):
    sections = ["a note", Rows(["x", "token"], [(1, "\n"), (2, "a\tb")], "first", "one"),
                Rows(["y"], [(None,)], "second", "two")]
    emit_sections(sections, "tsv")
    assert capsys.readouterr().out == "# a note\n# first\nx\ttoken\n1\t\\n\n2\ta\\tb\n\n# second\ny\n\n\n"
    emit_sections(sections, "json")
    assert json.loads(capsys.readouterr().out) == {"one": [{"x": 1, "token": "\n"}, {"x": 2, "token": "a\tb"}],
                                                   "two": [{"y": None}], "notes": ["a note"]}
    emit_sections(sections, "csv")
    assert capsys.readouterr().out == '# a note\n# first\nx,token\n1,"\n"\n2,a\tb\n\n# second\ny\n""\n\n'


def test_status_in_a_pipe_is_lines(registry_db):
    shown = CliRunner().invoke(app, ["status", "--db", str(registry_db)]).stdout
    assert shown.splitlines()[:2] == ["# sync: not running", shown.splitlines()[1]]
    assert shown.splitlines()[1].startswith("# last sync: ") and "170 releases, 13" in shown
    assert "# running (alive = its process still runs)\nrun\trelease\tsae_id\tpid\talive\ttokens\tsince\tplan\n" in shown


def test_tsv_escapes_round_trip():
    cells = ["\\", "\t", "\n", "\r", "a\\tb", "plain"]
    line = delimited(["c"] * len(cells), [tuple(cells)], "tsv").splitlines()[1]
    unescaped = [c.encode().decode("unicode_escape") for c in line.split("\t")]
    assert unescaped == cells


def test_a_message_is_one_line_in_a_pipe(capsys):
    """Messages (ingest's summary, say) are not folded at rich's assumed 80 columns either."""
    from queries.front.cli import out

    message = "ingested (" + "r" * 60 + ", " + "s" * 60 + ") as sae 1: 300,000 tokens, 1,003 blocks in 215.1s"
    out.print(message)
    assert capsys.readouterr().out == message + "\n"
