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


def _smoke(script: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], check=True, capture_output=True,
                         text=True).stdout
    return [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]


def test_lobes_bench_smoke_runs_every_step():
    lines = _smoke("lobes.py")
    steps = {line.get("step") for line in lines}
    assert {"generate", "dense", "knn", "baseline", "ami"} <= steps
    assert lines[-1]["speedup_shared_embedding_over_spectral_clustering_per_n"] > 0


def test_spectra_bench_smoke_runs_every_null():
    lines = _smoke("spectra.py")
    assert any("growth_exponent_in_F" in line for line in lines)
    assert any("wishart_over_bidiagonal" in line for line in lines)
