"""Benchmarks are not timed here; a tiny run of each only keeps them from rotting."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_cooccurrence_bench_runs_and_both_methods_agree():
    out = subprocess.run([sys.executable, str(BENCH / "cooccurrence.py"), "--features", "300", "--blocks", "20",
                          "--active", "40", "--repeats", "1"], check=True, capture_output=True, text=True).stdout
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [line.get("method") for line in lines[:2]] == ["numpy", "saecat"]
    assert lines[2]["speedup_saecat_over_numpy"] > 0
