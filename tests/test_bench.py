"""Benchmarks are not timed here; a tiny run of each only keeps them from rotting."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_cooccurrence_bench_runs_and_both_methods_agree():
    out = subprocess.run([sys.executable, str(BENCH / "cooccurrence.py"), "--smoke"], check=True,
                         capture_output=True, text=True).stdout
    *methods, summary = [json.loads(line) for line in out.strip().splitlines()]
    assert [m["method"] for m in methods] == ["numpy", "saecat", "python"]
    # every method's whole pair table (each i < j with n11 > 0, and n11) over the same 24 blocks: identical
    assert summary["tables_agree"]
    assert len({m["check_sha256"] for m in methods}) == 1
    assert all(m["check_blocks"] == m["blocks"] == 24 for m in methods)
    # not trivially so: with 40 of 300 features per block, most of the 44,850 pairs co-fire at least once
    assert len({m["check_pairs"] for m in methods}) == 1 and 10_000 < methods[0]["check_pairs"] < 300 * 299 // 2
    assert methods[1]["tile"] == 128 and methods[1]["flush"] == 10  # several tiles, several flushes


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


def test_search_bench_smoke_times_what_it_searched():
    embedded, sized = _smoke("search.py")
    assert embedded["embed"]["texts"] == 100 and embedded["embed"]["dim"] == 384
    assert sized["explanations"] == 300 and sized["distinct_texts"] == 100
    for run in (sized["build"], sized["fresh_process"]):
        assert 0 < run["p50_ms"] <= run["p95_ms"] and run["peak_rss_gb"] > 0


def test_pages_bench_smoke_times_the_feature_page_against_the_api():
    lines = _smoke("pages.py")
    assert [line["size"] for line in lines] == ["16k", "1m"]
    for line in lines:
        assert 0 < line["api_p50_ms"] <= line["api_p95_ms"] and 0 < line["page_p50_ms"] <= line["page_p95_ms"]
        assert line["requests"] == 20 and line["peak_rss_gb"] > 0
    assert lines[1]["features_in_catalog"] == 3 * 400
