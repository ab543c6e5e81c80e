"""Analyses: wall time and peak memory of crystals, lobes and spectra as the SAE widens, and the
growth exponent b of time ~ a F^b and of peak memory ~ a F^b.

Drives the analyses' own benchmarks, saecat's path only, at a ladder of feature counts F:
  crystals  bench/crystals.py --only saecat (CrystalSearch on F random directions, 20 planted);
  lobes     bench/lobes.py --only dense knn (lobes.run, dense arpack and kNN lobpcg affinities) on a
            synthetic catalog generated once per F: T = 4,096 blocks with active = 1,500 F / 16,384
            features each, so the share of co-firing pairs (~98%) stays that of the 16k section;
  spectra   bench/spectra.py --methods bidiagonal (spectra.compute with saecat's null).
Each script runs every measurement in its own process (peak RSS is that process's ru_maxrss).
crystals and lobes time one run per call, so they are called --repeats times (lobes reusing the
catalog); spectra repeats inside (--repeats). Figures are medians over the repeats. BLAS and
OpenMP are pinned to --threads in every child (env, and spectra's own --threads), and the load
average is recorded around each (analysis, F).

Prints one JSON line per (analysis, F), one fit line per analysis (exponents over the whole
ladder, local ones between neighbouring sizes, and per stage for lobes), and a summary line.

    python bench/analyses.py --analyses spectra --repeats 3 > spectra.jsonl   # one locked run each
    python bench/analyses.py --from spectra.jsonl lobes.jsonl crystals.jsonl  # fit them together
    python bench/analyses.py --smoke                                           # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ANALYSES = ("crystals", "lobes", "spectra")
LADDER = [2048, 4096, 8192, 16384]
SMOKE_LADDER = [600, 1200]  # spectra.py --smoke's own sizes, so its rows line up with the others'


def fit_exponent(features: list[float], values: list[float]) -> tuple[float, float]:
    """(b, a) of values ~ a F^b: least squares in log-log space."""
    b, log_a = np.polyfit(np.log(features), np.log(values), 1)
    return float(b), float(np.exp(log_a))


def local_exponents(features: list[int], values: list[float]) -> dict[str, float]:
    """Log-log slope between neighbouring sizes: where a curve steepens or flattens."""
    return {f"{f0}-{f1}": round(float(np.log(v1 / v0) / np.log(f1 / f0)), 2)
            for f0, f1, v0, v1 in zip(features, features[1:], values, values[1:])}


def script(name: str, args: list[str], env: dict[str, str]) -> list[dict]:
    out = subprocess.run([sys.executable, str(BENCH / name), *map(str, args)], check=True, capture_output=True,
                         text=True, env=env).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def row(analysis: str, f: int, args: argparse.Namespace, runs: list[dict], seconds: str, peak: str, load: str,
        load_before: tuple[float, ...], **extra) -> dict:
    """One (analysis, F): medians over the runs, every run's time and load kept (extra overrides)."""
    return {"analysis": analysis, "features": f, "dim": args.dim, "repeats": len(runs), "threads": args.threads,
            "seconds": round(statistics.median(r[seconds] for r in runs), 3),
            "seconds_runs": [round(r[seconds], 3) for r in runs],
            "peak_gb": round(statistics.median(r[peak] for r in runs), 3),
            "load_before": [round(x, 2) for x in load_before], "load_runs": [round(r[load], 2) for r in runs],
            **extra}


def run_crystals(args: argparse.Namespace, env: dict[str, str]) -> Iterator[dict]:
    for f in args.features:
        before = os.getloadavg()
        runs = []
        for _ in range(args.repeats):
            lines = script("crystals.py", ["--features", f, "--dim", args.dim, "--only", "saecat",
                                           *(["--planted", 4] if args.smoke else [])], env)
            runs.append(next(line for line in lines if line.get("method") == "saecat"))
        last = runs[-1]
        yield row("crystals", f, args, runs, "seconds", "peak_gb", "load", before,
                  planted_found=[r["planted_found"] for r in runs], n_pairs=last["n_pairs"],
                  n_candidates=last["n_candidates"], index=last["index"])


def lobes_sizes(f: int, args: argparse.Namespace) -> list:
    if args.smoke:  # lobes.py's own smoke sizes, at each F of the ladder
        return ["--features", f, "--blocks", 300, "--active", f // 10, "--d", args.dim, "--topics", 4,
                "--sample-blocks", 100, "--n-lobes", 2, 4, "--knn", 20, "--permutations", 10, "--null-repeats", 2]
    return ["--features", f, "--blocks", 4096, "--active", round(1500 * f / 16384), "--d", args.dim]


def run_lobes(args: argparse.Namespace, env: dict[str, str]) -> Iterator[dict]:
    for f in args.features:
        before = os.getloadavg()
        runs: dict[str, list[dict]] = {mode: [] for mode in args.lobes}
        with tempfile.TemporaryDirectory(prefix="saecat-bench-analyses-") as tmp:
            db = str(Path(tmp) / "lobes.duckdb")
            for _ in range(args.repeats):  # the first call generates the catalog, the others reuse it
                for line in script("lobes.py", [*lobes_sizes(f, args), "--only", *args.lobes, "--db", db], env):
                    if line.get("step") == "generate":
                        generated = {k: line[k] for k in ("active_per_block", "pairs", "pair_density", "dead",
                                                           "saturated", "db_gb")}
                    elif line.get("step") in runs:
                        runs[line["step"]].append({**line, "load": os.getloadavg()[0]})
        for mode, mode_runs in runs.items():
            stages = {stage: round(statistics.median(r["stages_s"][stage] for r in mode_runs), 1)
                      for stage in mode_runs[0]["stages_s"]}
            yield row(f"lobes_{mode}", f, args, mode_runs, "total_s", "peak_gb", "load", before,
                      included=mode_runs[0]["included"], stages_s=stages, catalog=generated)


def run_spectra(args: argparse.Namespace, env: dict[str, str]) -> Iterator[dict]:
    before = os.getloadavg()
    sizes = ["--smoke"] if args.smoke else ["--features", *args.features, "--dim", args.dim]
    lines = [line for line in script("spectra.py", [*sizes, "--repeats", args.repeats, "--threads", args.threads,
                                                    "--methods", "bidiagonal"], env) if line.get("method")]
    if [line["features"] for line in lines] != list(args.features):
        raise RuntimeError(f"spectra.py ran {[line['features'] for line in lines]}, not the ladder {args.features}")
    for line in lines:  # spectra.py takes the median of its repeats itself
        yield row("spectra", line["features"], args, [line], "median_s", "peak_rss_gb", "load_average", before,
                  dim=line["dim"], repeats=line["repeats"], seconds_runs=None, null_seconds=line["null_median_s"],
                  input_gb=line["input_gb"], alpha=line["alpha"], null_alpha=line["null_alpha"])


def fit(analysis: str, rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["features"])
    f = [r["features"] for r in rows]
    t, m = [r["seconds"] for r in rows], [r["peak_gb"] for r in rows]
    out = {"fit": analysis, "features": f, "time_exponent": None, "memory_exponent": None}
    if len(rows) >= 2:
        out.update(time_exponent=round(fit_exponent(f, t)[0], 3), memory_exponent=round(fit_exponent(f, m)[0], 3),
                   local_time_exponents=local_exponents(f, t), local_memory_exponents=local_exponents(f, m))
        if "stages_s" in rows[0]:  # lobes: which stage drives the growth (stages under 0.1 s are left out)
            stages = [s for s in rows[0]["stages_s"] if all(r["stages_s"][s] > 0 for r in rows)]
            out["stage_time_exponents"] = {s: round(fit_exponent(f, [r["stages_s"][s] for r in rows])[0], 3)
                                           for s in stages}
    return out


def summarize(rows: list[dict]) -> list[dict]:
    by: dict[str, dict[int, dict]] = {}
    for r in rows:  # a later line for the same (analysis, F) replaces an earlier one
        by.setdefault(r["analysis"], {})[r["features"]] = r
    fits = {a: fit(a, list(per_f.values())) for a, per_f in sorted(by.items())}
    largest = {a: max(per_f.values(), key=lambda r: r["features"]) for a, per_f in sorted(by.items())}
    loads = [x for r in rows for x in [r["load_before"][0], *r["load_runs"]]]
    summary = {"summary": True, "time_exponent": {a: x["time_exponent"] for a, x in fits.items()},
               "memory_exponent": {a: x["memory_exponent"] for a, x in fits.items()},
               "at_largest_F": {a: {"features": r["features"], "seconds": r["seconds"], "peak_gb": r["peak_gb"]}
                                for a, r in largest.items()},
               "load_average_range": [min(loads), max(loads)]}
    return [*fits.values(), summary]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analyses", nargs="+", choices=ANALYSES, default=list(ANALYSES))
    parser.add_argument("--features", type=int, nargs="+", default=LADDER)
    parser.add_argument("--dim", type=int, default=2304, help="d_in (Gemma-2-2B's residual width)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lobes", nargs="+", choices=["dense", "knn"], default=["dense", "knn"],
                        help="lobes affinities to time (dense: the default, arpack; knn: k = 64, lobpcg)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads in every child (0: defaults)")
    parser.add_argument("--from", dest="files", nargs="+", help="fit the per-(analysis, F) lines of earlier runs")
    parser.add_argument("--smoke", action="store_true",
                        help="600 and 1,200 features, tiny dims, one repeat, lobes dense only")
    args = parser.parse_args()
    if args.files:
        lines = [json.loads(line) for name in args.files for line in Path(name).read_text().splitlines()
                 if line.startswith("{")]
        for line in summarize([line for line in lines if "analysis" in line]):
            print(json.dumps(line))
        return
    if args.smoke:
        args.features, args.dim, args.repeats = SMOKE_LADDER, 32, 1
        args.lobes = args.lobes[:1]  # the other mode is the same driver code and ~5 s of process start-ups
    env = dict(os.environ)
    if args.threads:  # inherited by the scripts' own children
        env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    runners = {"crystals": run_crystals, "lobes": run_lobes, "spectra": run_spectra}
    if args.smoke:  # a smoke times nothing, so its analyses run side by side; measured ones never do
        with ThreadPoolExecutor(len(args.analyses)) as pool:
            results: Iterable[Iterable[dict]] = list(pool.map(lambda a: list(runners[a](args, env)), args.analyses))
    else:
        results = (runners[a](args, env) for a in args.analyses)
    rows = []
    for result in results:
        for r in result:  # printed as each (analysis, F) ends: a killed run keeps what it measured
            print(json.dumps(r), flush=True)
            rows.append(r)
    for line in summarize(rows):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
