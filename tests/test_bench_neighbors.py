"""The neighbours benchmark at smoke size: DuckDB's brute force and FAISS agree; never timed."""

import json
import subprocess
import sys
from pathlib import Path

from catalog.index import index_device

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_neighbors_bench_smoke_duckdb_and_faiss_agree():
    # Size '1m' at smoke scale: 3 SAEs of one model searched together (scope 'model'), so the
    # merge across SAEs is what is checked against DuckDB's scan over all of them.
    out = subprocess.run([sys.executable, str(BENCH / "neighbors.py"), "--smoke", "--sizes", "1m", "--threads", "1"],
                         check=True, capture_output=True, text=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by_method = {line.get("method", line.get("step")): line for line in lines}
    assert {"build", "duckdb", "exact", "approx", "neighbors"} <= set(by_method)
    summary = lines[-1]
    assert summary["features"] == 1200 and summary["saes"] == 3
    assert summary["top10_agree_duckdb_exact"] == 1.0  # every query, batch: equal up to ties
    assert summary["single_query_top10_identical_duckdb_exact"] == 1.0
    assert summary["recall_at_10_exact_vs_duckdb"] == 1.0
    assert 0.0 < summary["recall_at_10_approx"] <= 1.0
    assert 0.0 < by_method["approx"]["saecat_measured_recall"] <= 1.0
    assert by_method["neighbors"]["scope"] == "model"
    assert {line["index_device"] for line in lines if "method" in line} == {index_device()}
