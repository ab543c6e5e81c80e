"""The wide-SAE benchmark, tiny: it runs a whole ingestion in a child process and reports each
phase's time and peak memory against the run's budget. Not timed."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "wide.py"


def test_wide_bench_smoke_reports_every_phase_within_the_budget(model_dir, corpus, sae_dirs):
    command = [sys.executable, str(BENCH), "--smoke", "--template", str(sae_dirs["jumprelu"]), "--model",
               str(model_dir), "--dataset", str(corpus), "--max-doc-tokens", "200", "--block-size", "32",
               "--memory-budget", "2GiB", "--top-partners", "4"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    [row] = [json.loads(line) for line in out.strip().splitlines()]
    assert row["d_sae"] == 2048 and row["tokens"] == 600 and row["blocks"] > 0 and row["l0"] > 0
    assert row["budget"] == "2.0 GiB" and row["pair_path"] == "dense" and "within a budget of 2.0 GiB" in row["plan"]
    assert list(row["phases"]) == ["load", "prepare", "stream", "write", "index"]
    assert all(p["seconds"] >= 0 and 0 < p["peak_gb"] <= min(row["peak_gb"], p["rss_gb"]) <= row["rss_gb"]
               for p in row["phases"].values())
    assert row["within_budget"] and 0 < row["pairs"] <= 4 * 2048
