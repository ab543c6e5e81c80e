"""bench/blockpairs.py --smoke: both paths run and their tables agree (not timed here)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_blockpairs_bench_smoke_runs_both_paths_and_their_tables_agree():
    out = subprocess.run([sys.executable, str(BENCH / "blockpairs.py"), "--smoke"], check=True, capture_output=True,
                         text=True).stdout
    incore, outofcore, summary = [json.loads(line) for line in out.strip().splitlines()]
    assert (incore["method"], outofcore["method"]) == ("incore", "outofcore")
    assert incore["device"] == outofcore["device"] == summary["device"] == "cpu"  # the default, recorded
    assert "device_peak_gb" not in outofcore  # torch's GPU peak only where the device is CUDA
    assert summary["tables_agree"] and incore["sha256"] == outofcore["sha256"]
    assert incore["pairs"] == outofcore["pairs"] > 10_000
    assert outofcore["bands"] >= 2  # the smoke budget cuts the pass into bands
