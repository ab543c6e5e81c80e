"""Spectra analysis: wall time and peak memory of `queries.spectra.compute` as the SAE widens,
with its isotropic null drawn three ways.

The synthetic decoder is an F x d Gaussian cloud with a power-law covariance (alpha = 0.3, the
flat end of real SAEs), float32 as the catalog returns it. `compute` runs whole (covariance,
eigenvalues, fit, null, Marchenko-Pastur, negentropy with its null, default parameters), once
per null method:

- bidiagonal: what saecat uses, the Dumitriu-Edelman bidiagonal model of Wishart(d, F - 1),
- wishart: a dense d x d Wishart matrix from scipy.stats.wishart (Bartlett), then eigenvalues,
- cloud: the naive baseline, an F x d Gaussian cloud per draw and its covariance.

Each (F, method) runs in its own subprocess so its peak memory (ru_maxrss) is its own; the
input matrix is generated before the clock starts and reported separately. Prints one JSON line
per run, then the per-method growth exponent of time in F and the time ratios to bidiagonal.
Because the data are Gaussian, each line also carries the negentropy estimator's bias at these
sizes (negentropy and null_negentropy should agree, and are not 0).

    python bench/spectra.py --features 4096 16384 65536 --dim 2304 --repeats 3
    python bench/spectra.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("bidiagonal", "wishart", "cloud")


def decoders(n: int, d: int, alpha: float = 0.3, seed: int = 0) -> np.ndarray:
    """[n, d] float32 Gaussian rows with covariance diag(r^-alpha), drawn in chunks (no float64 copy)."""
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, d + 1, dtype=np.float64) ** (-alpha / 2)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 8192):
        rows = min(8192, n - start)
        out[start:start + rows] = rng.standard_normal((rows, d), dtype=np.float32) * scale
    return out


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def child(args: argparse.Namespace, n: int, method: str) -> dict:
    from threadpoolctl import threadpool_limits

    from queries import spectra

    limits = threadpool_limits(args.threads) if args.threads else None
    x = decoders(n, args.dim)
    params = spectra.SpectraParams(**(dict(entropy_rows=300, entropy_dims=10) if args.smoke else {}))
    inputs = spectra.SpectraInputs(decoders=x, activation=np.zeros(0))
    tiny = spectra.SpectraInputs(decoders=decoders(60, 16), activation=np.zeros(0))
    spectra.compute(tiny, spectra.SpectraParams(rank_min=2, rank_max=10, entropy_rows=50, entropy_dims=4),
                    null_method=method)  # imports and first-call costs stay off the clock
    before = rss_gb()
    times, null_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        summary, tables = spectra.compute(inputs, params, null_method=method)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        spectra.null_spectra(len(x), x.shape[1], params.null_draws, np.random.default_rng(0), method)
        null_times.append(time.perf_counter() - start)
    assert tables["spectra"].num_rows == min(x.shape)
    if limits is not None:
        limits.restore_original_limits()
    return {
        "method": method, "features": len(x), "dim": x.shape[1], "repeats": args.repeats,
        "blas_threads": args.threads or "default", "median_s": round(statistics.median(times), 3),
        "null_median_s": round(statistics.median(null_times), 3), "input_gb": round(x.nbytes / 2**30, 3),
        "rss_before_gb": round(before, 3), "peak_rss_gb": round(rss_gb(), 3),
        "alpha": round(summary["alpha"], 4), "null_alpha": round(summary["null_alpha"], 4),
        "marchenko_pastur_alpha": summary["marchenko_pastur_alpha"] and round(summary["marchenko_pastur_alpha"], 4),
        "negentropy": round(summary["negentropy"], 3), "null_negentropy": round(summary["null_negentropy"], 3),
        "null_negentropy_std": summary["null_negentropy_std"] and round(summary["null_negentropy_std"], 3),
        "load_average": round(os.getloadavg()[0], 2),  # other work on the machine while this ran
    }


def growth(rows: list[dict]) -> float | None:
    """Exponent b of time ~ F^b, least squares in log-log over the sizes run."""
    if len(rows) < 2:
        return None
    f = np.log([r["features"] for r in rows])
    t = np.log([r["median_s"] for r in rows])
    return round(float(np.polyfit(f, t, 1)[0]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=2304, help="d_in (Gemma-2-2B's residual width by default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, default=0, help="BLAS threads (0: the library's default)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and not args.child:
        args.features, args.dim, args.repeats, args.threads = [600, 1200], 64, 1, args.threads or 1
    if args.child:
        print(json.dumps(child(args, args.features[0], args.child)))
        return
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for n in args.features:
        for method in args.methods:
            if args.smoke:  # in-process: peak memory is not measured apart, startup is not paid six times
                row = child(args, n, method)
            else:
                command = [sys.executable, __file__, "--features", str(n), "--dim", str(args.dim), "--repeats",
                           str(args.repeats), "--threads", str(args.threads), "--child", method]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            results[method].append(row)
    print(json.dumps({"growth_exponent_in_F": {m: growth(rows) for m, rows in results.items()}}))
    if "bidiagonal" in results:
        base = {r["features"]: r for r in results["bidiagonal"]}
        for method in args.methods:
            if method != "bidiagonal":
                print(json.dumps({f"{method}_over_bidiagonal": {
                    n: {"compute": round(r["median_s"] / base[n]["median_s"], 2),
                        "null": round(r["null_median_s"] / max(base[n]["null_median_s"], 1e-9), 1)}
                    for n, r in ((r["features"], r) for r in results[method])}}))


if __name__ == "__main__":
    main()
