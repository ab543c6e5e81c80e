"""Query limits (catalog/limits.py) through the real `saecat sql` and `saecat serve` processes:
a query that would take the machine's memory (a huge list, a huge string, lists built row by row)
is refused with one clear message, its peak resident memory stays within the limit plus the
process's baseline, and the refusal comes within the time limit plus 2 s; a big aggregate spills
to the folder beside the catalog and answers; an expression DuckDB cannot interrupt is killed at the time limit; the server's
/health answers meanwhile and the server itself does not grow.

Peak memory is measured exactly rather than sampled: each command runs under a small wrapper
(PEAK) whose RUSAGE_CHILDREN ru_maxrss, once the command has exited, is the largest peak resident
set of any process in its tree (the CLI or server, and each worker it reaped). The baseline is the
same measure for a trivial query.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from catalog import Catalog, SaecatError, writer
from catalog.limits import default_memory_limit, format_size, memory_limit, parse_size
from catalog.store import sidecar_dir
from test_catalog import ROOT, commit, random_decoders
from test_sql import ENDLESS

LIMIT = "512MiB"
LIMIT_MB = 512
REFUSED = ("query needs more than the 512 MiB memory limit (--memory-limit or $SAECAT_QUERY_MEMORY); "
           "ask for fewer or smaller values")
TIMEOUT_S = 5.0  # the CLI's --timeout in these tests
HUGE = {
    "list": "SELECT list_sum(range(1000000000))",  # the query: one 8 GB list
    "string": "SELECT length(repeat('x', 1000000000))",  # one 1 GB string
    "lists_by_row": "SELECT sum(len(l)) FROM (SELECT range(a, a + 100000) AS l FROM (SELECT unnest(range(20000)) a))",
    "string_agg": "SELECT length(string_agg(repeat('x', 100), '')) FROM (SELECT unnest(range(30000000)))",
}
# 4M distinct strings of about 50 bytes: more than DuckDB's half of the limit holds as a hash
# table, so it spills to the folder beside the catalog.
SPILL = ("SELECT count(DISTINCT (a * 100000 + b)::VARCHAR || repeat('x', 40)) AS n "
         "FROM (SELECT unnest(range(2000)) a), (SELECT unnest(range(2000)) b)")
# One scalar call that runs for about 10 s in 300 MB and never looks at DuckDB's interrupt flag.
UNINTERRUPTIBLE = "SELECT len(list_distinct(range(2000000)))"

PEAK = """
import json, resource, signal, subprocess, sys, time
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
started = time.monotonic()
out, err = child.communicate()
print(json.dumps({"rc": child.returncode, "out": out, "err": err, "seconds": time.monotonic() - started,
                  "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""
CLI = [sys.executable, "-c", "from queries.front.cli import main; main()"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SAECAT_DB", "SAECAT_TOKEN", "SAECAT_QUERY_MEMORY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def measured(*args: str) -> dict:
    """`saecat ARGS` under PEAK: exit code, stdout, stderr, wall seconds, the tree's peak RSS (MB)."""
    done = subprocess.run([sys.executable, "-c", PEAK, *CLI, *args], env=_env(), capture_output=True, text=True,
                          timeout=120)
    return json.loads(done.stdout)


def sql(db: Path, query: str, *extra: str) -> dict:
    return measured("sql", query, "--db", str(db), "--memory-limit", LIMIT, "--timeout", str(TIMEOUT_S),
                    "--format", "json", *extra)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("limits") / "catalog.duckdb"
    commit(path, random_decoders(1), "local", "a", seed=1)
    return path


@pytest.fixture(scope="module")
def baseline(db) -> dict:
    """A trivial query's run: the tree's peak RSS and the wall time of a whole `saecat sql`."""
    run = sql(db, "SELECT count(*) AS n FROM features")
    assert run["rc"] == 0 and json.loads(run["out"]) == [{"n": 500}], run
    return run


def test_sizes_and_the_default():
    assert [parse_size(s) for s in ("512MB", "512MiB", "2GiB", "1.5G", "300", " 4 kb ")] == [
        512 * 10**6, 512 * 2**20, 2 * 2**30, int(1.5 * 2**30), 300, 4000]
    for bad in ("lots", "12 parsecs", "-1GB", ""):
        with pytest.raises(SaecatError, match="cannot read .* as a memory size"):
            parse_size(bad)
    with pytest.raises(SaecatError, match="at least 64 MiB"):
        memory_limit("1MB")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 64 * 2**20 <= default_memory_limit() <= min(ram // 8, 4 * 2**30)
    assert (format_size(512 * 2**20), format_size(3 * 2**30)) == ("512 MiB", "3.0 GiB")


def test_env_setting_and_a_bad_one_through_the_cli(db, monkeypatch):
    monkeypatch.setenv("SAECAT_QUERY_MEMORY", "300MiB")
    assert memory_limit() == 300 * 2**20 and memory_limit("1GiB") == 2**30
    env = {**_env(), "SAECAT_QUERY_MEMORY": "a lot"}
    done = subprocess.run([*CLI, "sql", "SELECT 1", "--db", str(db)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: cannot read 'a lot' as a memory size: write e.g. 512MB, 2GB or 2GiB"


def test_a_memory_limit_needs_a_read_only_catalog(db):
    with writer(db) as cat:
        with pytest.raises(SaecatError, match="needs the catalog opened read-only"):
            cat.sql("SELECT 1", memory_limit=LIMIT)
    with Catalog.open(db) as cat:
        result = cat.sql("SELECT feature FROM features ORDER BY feature", memory_limit=LIMIT, max_rows=3)
        assert (result.rows, result.truncated) == ([(0,), (1,), (2,)], True)


@pytest.mark.parametrize("kind", sorted(HUGE))
def test_a_query_past_the_memory_limit_is_refused_within_it(db, baseline, kind):
    run = sql(db, HUGE[kind])
    assert run["rc"] == 1 and run["err"] == f"error: {REFUSED}\n" and run["out"] == "", run
    assert run["peak_mb"] <= baseline["peak_mb"] + LIMIT_MB, (run["peak_mb"], baseline["peak_mb"])
    assert run["seconds"] <= baseline["seconds"] + TIMEOUT_S + 2, (run["seconds"], baseline["seconds"])


def test_a_big_aggregate_spills_and_answers_within_the_limit(db, baseline):
    spill = sidecar_dir(db) / "tmp"
    largest, done = [0], threading.Event()

    def watch() -> None:  # the spill folder's size, every 10 ms
        while not done.is_set():
            sizes = []
            for file in spill.rglob("*"):
                try:
                    sizes.append(file.stat().st_size if file.is_file() else 0)
                except OSError:
                    pass
            largest[0] = max(largest[0], sum(sizes))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run = sql(db, SPILL)
    finally:
        done.set()
        watcher.join()
    assert run["rc"] == 0 and json.loads(run["out"]) == [{"n": 4_000_000}], run
    assert largest[0] > 16 * 2**20, largest  # it spilled
    assert run["peak_mb"] <= baseline["peak_mb"] + LIMIT_MB, (run["peak_mb"], baseline["peak_mb"])
    assert not any(spill.iterdir())  # and the worker's folder is gone


def test_an_expression_duckdb_cannot_interrupt_is_stopped_at_the_time_limit(db, baseline):
    run = sql(db, UNINTERRUPTIBLE, "--timeout", "2")
    assert run["rc"] == 1 and run["err"] == "error: query interrupted: it ran past the time limit of 2 s\n", run
    assert run["seconds"] <= baseline["seconds"] + 2 + 2, (run["seconds"], baseline["seconds"])
    assert run["peak_mb"] <= baseline["peak_mb"] + LIMIT_MB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def test_the_server_refuses_heavy_queries_and_answers_health_meanwhile(db, baseline):
    """Two of the issue's queries at once, then one past the server's 10 s limit: each is a 400
    within its limit + 2 s, /health answers throughout, and nothing in the server's process tree
    passes the baseline plus the limit; the server process itself does not grow."""
    port = _free_port()
    wrapper = subprocess.Popen([sys.executable, "-c", PEAK, *CLI, "serve", "--db", str(db), "--port", str(port),
                                "--memory-limit", LIMIT], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert wrapper.poll() is None and time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.1)
            server = int(Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()[0])
            assert http.post("/sql", json={"query": "SELECT count(*) FROM saes"}).json()["rows"] == [[1]]
            before_kb = _status_kb(server, "VmHWM")

            answers: dict[str, tuple[int, str, float]] = {}

            def ask(name: str, query: str) -> None:
                started = time.monotonic()
                got = http.post("/sql", json={"query": query})
                answers[name] = (got.status_code, got.json().get("error"), time.monotonic() - started)

            health: list[float] = []

            def run_with_health(*queries: tuple[str, str]) -> None:
                threads = [threading.Thread(target=ask, args=q) for q in queries]
                for t in threads:
                    t.start()
                while any(t.is_alive() for t in threads):
                    started = time.monotonic()
                    assert http.get("/health").json() == {"status": "ok"}
                    health.append(time.monotonic() - started)
                    time.sleep(0.05)
                for t in threads:
                    t.join()

            run_with_health(("list", HUGE["list"]), ("string", HUGE["string"]))
            run_with_health(("endless", ENDLESS))
            after_kb = _status_kb(server, "VmHWM")
    finally:
        wrapper.terminate()
        out, _ = wrapper.communicate(timeout=30)
    for name in ("list", "string"):
        assert answers[name][:2] == (400, REFUSED) and answers[name][2] <= 10 + 2, answers
    assert answers["endless"][:2] == (400, "query interrupted: it ran past the time limit of 10 s"), answers
    assert answers["endless"][2] <= 10 + 2, answers
    assert len(health) >= 20 and max(health) < 1.0, health
    assert (after_kb - before_kb) / 1024 < 64, (before_kb, after_kb)
    peak_mb = json.loads(out)["peak_mb"]
    assert peak_mb <= max(after_kb / 1024, baseline["peak_mb"]) + LIMIT_MB, (peak_mb, after_kb, baseline["peak_mb"])
