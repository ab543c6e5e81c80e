"""bench/analyses.py: the exponent fit on known curves, and its smoke run (values, never timings)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Loaded by path, not through sys.path: bench/ on the path would shadow saecat's own packages in
# every subprocess that copies it (tests/test_sync.py's do).
_spec = importlib.util.spec_from_file_location("bench_analyses", BENCH / "analyses.py")
_analyses = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_analyses)
SMOKE_LADDER, fit_exponent, local_exponents = _analyses.SMOKE_LADDER, _analyses.fit_exponent, _analyses.local_exponents


@pytest.mark.parametrize("b", [0.0, 0.14, 1.0, 2.0, 3.0])
def test_fit_recovers_a_known_power_law(b):
    f = [2048, 4096, 8192, 16384]
    got_b, got_a = fit_exponent(f, [0.7 * x**b for x in f])
    assert got_b == pytest.approx(b, abs=1e-9)
    assert got_a == pytest.approx(0.7, rel=1e-9)


def test_fit_is_least_squares_in_log_log():
    f = np.array([1000, 2000, 4000, 8000, 16000])
    noise = np.array([1.1, 0.9, 1.05, 0.95, 1.0])  # multiplicative: a tilt-free wobble around F^1.5
    got_b, _ = fit_exponent(list(f), list(3 * f**1.5 * noise))
    want = np.polyfit(np.log(f), np.log(3 * f**1.5 * noise), 1)[0]
    assert got_b == pytest.approx(want) and abs(got_b - 1.5) < 0.05


def test_local_exponents_show_where_a_sum_of_powers_steepens():
    f = [1000, 2000, 4000, 8000, 16000]
    t = [100 + (x / 1000) ** 3 for x in f]  # a fixed cost, then F^3 takes over
    local = list(local_exponents(f, t).values())
    assert local == sorted(local) and local[0] < 0.2 and local[-1] > 2


def test_smoke_driver_has_a_line_per_size_and_fits_them():
    # spectra only: the crystals and lobes smokes already run in test_crystals.py and test_bench.py
    out = subprocess.run([sys.executable, str(BENCH / "analyses.py"), "--smoke", "--analyses", "spectra"],
                         check=True, capture_output=True, text=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rows = [line for line in lines if "analysis" in line]
    assert sorted((r["analysis"], r["features"]) for r in rows) == [("spectra", f) for f in SMOKE_LADDER]
    assert all(r["repeats"] == 1 and r["seconds"] > 0 and r["peak_gb"] > 0 for r in rows)
    fits = {line["fit"]: line for line in lines if "fit" in line}
    assert set(fits) == {"spectra"} and fits["spectra"]["features"] == SMOKE_LADDER
    # the fit line is the fit of the rows above it
    want, _ = fit_exponent([r["features"] for r in rows], [r["seconds"] for r in rows])
    assert fits["spectra"]["time_exponent"] == pytest.approx(want, abs=1e-3)
    summary = lines[-1]
    assert summary["summary"] and summary["time_exponent"] == {"spectra": fits["spectra"]["time_exponent"]}
    assert summary["at_largest_F"]["spectra"]["features"] == SMOKE_LADDER[-1]
