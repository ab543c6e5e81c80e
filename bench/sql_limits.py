"""Query limits (issue 16, finding 6): peak memory, wall time and outcome of queries that would take
the machine's memory or outlast the time limit, before and after catalog/limits.py.

  before  `Catalog.sql(q, timeout_s=10)` on the process's own connection: DuckDB's default memory
          limit (80% of RAM) and the timer's `con.interrupt()` (the Python API without
          memory_limit; what `saecat sql` and `POST /sql` did until issue 16);
  after   `Catalog.sql(q, timeout_s=10, memory_limit=--limit)`: a worker process with its data
          segment capped, DuckDB given half the limit, killed at the time limit (what `saecat sql`
          and `POST /sql` do now).

The queries (the `scale` column says how much of each "before" ran):
  trivial       `SELECT 1`: the baseline peak;
  list          the issue's `SELECT list_sum(range(1000000000))`: one 8 GB list;
  string        `length(repeat('x', 1000000000))`: one 1 GB string;
  lists_by_row  100,000-element lists built for 20,000 rows;
  string_agg    30 M strings of 100 bytes aggregated into one;
  spill         count(DISTINCT ...) over 4 M strings of 50 bytes: a hash table that spills;
  slow          `len(list_distinct(range(...)))`: one scalar call that never looks at DuckDB's
                interrupt flag.
"Before" on the full list query would take 20 GB of a shared machine (the issue's figure), so by
default it runs at --before-scale (range(N / 20)); every "before" runs under a safety cap on its
data segment (--before-cap, 6 GB) that stops it if it grows past that; `--before-scale 1
--before-cap 0` runs them whole and unguarded.

Each (mode, query) runs in a fresh process, which reports its peak: the larger ru_maxrss of itself
and of its reaped children (the worker), the largest resident set of either. Prints one JSON line
per run.

    python bench/sql_limits.py                     # about 2 minutes
    python bench/sql_limits.py --smoke             # seconds: the small queries, after only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BILLION = 1_000_000_000
QUERIES = {
    "trivial": ("SELECT {n}", 1),  # the baseline: a process that ran a query
    "list": ("SELECT list_sum(range({n}))", BILLION),
    "string": ("SELECT length(repeat('x', {n}))", BILLION),
    "lists_by_row": ("SELECT sum(len(l)) FROM (SELECT range(a, a + 100000) AS l FROM (SELECT unnest(range({n})) a))",
                     20_000),
    "string_agg": ("SELECT length(string_agg(repeat('x', 100), '')) FROM (SELECT unnest(range({n})))", 30_000_000),
    "spill": ("SELECT count(DISTINCT (a * 100000 + b)::VARCHAR || repeat('x', 40)) FROM (SELECT unnest(range({n})) a), "
              "(SELECT unnest(range(2000)) b)", 2000),
    "slow": ("SELECT len(list_distinct(range({n})))", 5_000_000),
}
SCALED = ("list",)  # the one "before" runs scaled down by default
SMOKE = ("trivial", "lists_by_row", "spill")


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child(args: argparse.Namespace) -> None:
    """One query in this process, as the mode runs it; prints its outcome."""
    from catalog import Catalog, SaecatError

    if args.mode == "before" and args.cap_gb:
        wall = int(args.cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (wall, resource.RLIM_INFINITY))
    options = {"memory_limit": args.limit} if args.mode == "after" else {}
    with Catalog.open(args.db) as cat:
        started = time.perf_counter()
        try:
            rows = cat.sql(args.sql, timeout_s=args.timeout, **options).rows
            outcome = f"answered {rows[0][0]}"
        except SaecatError as err:
            outcome = str(err)
        except MemoryError:
            outcome = "MemoryError"
        seconds = time.perf_counter() - started
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"outcome": outcome, "seconds": round(seconds, 2), "peak_mb": round(peak / 1024)}))


def run(args: argparse.Namespace, mode: str, name: str, scale: float) -> dict:
    template, n = QUERIES[name]
    query = template.format(n=int(n * scale))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", "--mode", mode, "--db", str(args.db), "--sql", query,
                           "--limit", args.limit, "--timeout", str(args.timeout), "--cap-gb", str(args.before_cap)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    line = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
        "outcome": f"process ended with {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", "seconds": None,
        "peak_mb": None}
    return {"mode": mode, "query": name, "scale": scale, "sql": query, **line, "process_s": round(wall, 2),
            "limit": args.limit if mode == "after" else None, "timeout_s": args.timeout,
            "loadavg": round(os.getloadavg()[0], 2), "cpu": cpu(), "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", default="2GiB", help="the memory limit of 'after'")
    parser.add_argument("--timeout", type=float, default=10.0, help="the time limit of both (the server's)")
    parser.add_argument("--before-scale", type=float, default=1 / 20, help="share of the list and string queries 'before' runs")
    parser.add_argument("--before-cap", type=float, default=6.0, help="GB of data segment 'before' may take (0: none)")
    parser.add_argument("--queries", nargs="+", choices=list(QUERIES), default=list(QUERIES))
    parser.add_argument("--modes", nargs="+", choices=["before", "after"], default=["before", "after"])
    parser.add_argument("--smoke", action="store_true", help="three small queries, 'after' only, 512MiB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--sql", help=argparse.SUPPRESS)
    parser.add_argument("--cap-gb", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.smoke:
        args.queries, args.modes, args.limit = list(SMOKE), ["after"], "512MiB"
    from catalog import writer

    with tempfile.TemporaryDirectory(prefix="saecat-bench-limits-") as folder:
        args.db = Path(folder) / "catalog.duckdb"
        with writer(args.db):
            pass  # an empty catalog: every query here computes from nothing
        for name in args.queries:
            for mode in args.modes:
                scale = args.before_scale if mode == "before" and name in SCALED else 1.0
                print(json.dumps(run(args, mode, name, scale)), flush=True)


if __name__ == "__main__":
    main()
