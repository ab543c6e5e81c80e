"""The SQL benchmark's smoke run: every query on every layout, values checked, never timings."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sql.py"


def test_sql_bench_smoke_layouts_agree_with_each_other_and_brute_force():
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], check=True, capture_output=True, text=True).stdout
    lines = [json.loads(line) for line in out.strip().splitlines()]
    build = next(line for line in lines if line.get("step") == "build")
    assert len(build["saes"]) == 3 and build["total_pairs"] == sum(s["pairs"] for s in build["saes"]) > 0
    runs = [line for line in lines if "layout" in line]
    assert {(r["layout"], r["query"]) for r in runs} == {(layout, query) for layout in ("saecat", "naive", "mirrored")
                                                         for query in ("top_partners", "partners", "histogram")}
    assert all(r["same_result_in_every_process"] for r in runs)
    top = {r["layout"]: r["rows"] for r in runs if r["query"] == "top_partners"}
    assert len(set(top.values())) == 1 and top["saecat"] > 0
    check = next(line for line in lines if line.get("step") == "check")
    for query in ("top_partners", "partners", "histogram"):
        assert check[f"{query}_same_across_layouts"] is True
        assert check[f"{query}_equals_brute_force"] is True
        assert check[f"{query}_rows"] > 0
