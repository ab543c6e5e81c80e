"""The Neuronpedia import benchmark, tiny: it writes its synthetic source, then reports both runs'
rows, time and peak memory. Not timed."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "neuronpedia.py"


def test_neuronpedia_bench_smoke_imports_every_row_it_wrote(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--smoke", "--cache", str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout
    [row] = [json.loads(line) for line in out.strip().splitlines()]
    assert (row["features_saecat"], row["activations_saecat"], row["explanations_saecat"]) == (300, 1200, 300)
    assert row["rows_baseline"] == 300 + 1200 + 300  # the baseline read every line of every file
    assert row["activation_rows_per_s"] > 0 and row["peak_gb_saecat"] > 0 and row["vs_baseline"] > 0
