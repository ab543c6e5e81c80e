"""The query-limits benchmark's smoke run: each outcome as expected, never timings or memory."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sql_limits.py"


def test_sql_limits_bench_smoke_refuses_past_the_limit_and_spills_below_it():
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], check=True, capture_output=True, text=True).stdout
    runs = {line["query"]: line for line in map(json.loads, out.strip().splitlines())}
    assert set(runs) == {"trivial", "lists_by_row", "spill"} and {r["mode"] for r in runs.values()} == {"after"}
    assert runs["trivial"]["outcome"] == "answered 1"
    assert runs["lists_by_row"]["outcome"].startswith("query needs more than the 512 MiB memory limit")
    assert runs["spill"]["outcome"] == "answered 4000000"
    assert all(isinstance(r["peak_mb"], int) and r["peak_mb"] > 0 for r in runs.values())
