"""Crystal search: saecat's index-driven search against exhaustive matching of candidate pairs.

Synthetic SAE: F random unit directions in d dimensions with `--planted` exact parallelograms
(rectangles on the unit sphere) hidden by a distractor u added to every row with weight
s_i ~ N(0, 1). Both methods remove the distractor the same way ("cloud:1") and take the same
candidate pairs (each feature with its 8 nearest directions); they differ in the matching:

- saecat: `queries.crystals.CrystalSearch` (differences in a FAISS index, top principal
  directions only, HNSW above 20k vectors; each pair looks up its nearest differences);
- naive: every pair of candidate pairs compared (blocked GEMM over all N² of them, both
  orientations), the exhaustive answer the index search approximates. Run on a subsample of
  `--subsample` features; its time at full F is extrapolated by (N_full / N_sub)².

A dense search over all pair differences is not run at all: its array alone would be
F(F-1)/2 x d float32 (printed as dense_gb). Each method runs in its own subprocess so its peak
memory (ru_maxrss) is its own. Prints one JSON line per run and a summary line, with the load
average of the machine (other work on it slows every figure).

    python bench/crystals.py --features 16384 --dim 2304 --subsample 2048
    python bench/crystals.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic(n: int, d: int, planted: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Random unit rows plus planted rectangles, all orthogonal to u; then s_i u added to each."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    rows = rng.standard_normal((n, d)).astype(np.float32)
    rows -= np.outer(rows @ u, u).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    alpha, beta = 0.3, 0.25
    quads = []
    for q in range(planted):
        m = rng.standard_normal((d, 3))
        m -= np.outer(u, u @ m)
        c, e1, e2 = np.linalg.qr(m)[0].T
        c *= np.sqrt(1 - alpha**2 - beta**2)
        rows[4 * q:4 * q + 4] = [c - alpha * e1 - beta * e2, c + alpha * e1 - beta * e2,
                                 c - alpha * e1 + beta * e2, c + alpha * e1 + beta * e2]
        quads.append((4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3))
    rows += rng.normal(0, 1.0, n)[:, None].astype(np.float32) * u.astype(np.float32)
    return rows, quads


def naive_match(search, x: np.ndarray, pairs: np.ndarray, top: int) -> np.ndarray:
    """All pairs of candidate pairs, both orientations, shared features excluded: the best
    `top` quads by parallelogram error, each once."""
    from queries.crystals import _rank, canonical

    delta = (x[pairs[:, 1]] - x[pairs[:, 0]]).astype(np.float32)
    norms = np.linalg.norm(delta, axis=1).astype(np.float64)
    keep = top * 16
    best_q, best_e = np.zeros((0, 4), np.int64), np.zeros(0)
    block = 1024
    for start in range(0, len(pairs), block):
        rows = np.arange(start, min(start + block, len(pairs)))
        gram = delta[rows] @ delta.T
        ni, nj = norms[rows][:, None], norms[None, :]
        later = np.arange(len(pairs))[None, :] > rows[:, None]
        shared = np.zeros_like(later)
        for a in (0, 1):
            for b in (0, 1):
                shared |= pairs[rows, a][:, None] == pairs[None, :, b]
        for sign in (1, -1):
            err = np.sqrt(np.maximum(ni**2 + nj**2 - 2 * sign * gram, 0)) / (ni + nj)
            err[~later | shared] = np.inf
            flat = np.argpartition(err.ravel(), min(keep, err.size - 1))[:keep]
            i, j = np.unravel_index(flat, err.shape)
            ok = np.isfinite(err[i, j])
            i, j = i[ok], j[ok]
            p, q = pairs[rows[i]], pairs[j]
            c = q[:, 0] if sign > 0 else q[:, 1]
            d = q[:, 1] if sign > 0 else q[:, 0]
            quads = np.stack([p[:, 0], p[:, 1], c, d], axis=1)
            best_q = np.concatenate([best_q, quads])
            best_e = np.concatenate([best_e, err[i, j]])
        order = np.argsort(best_e, kind="stable")[:keep]
        best_q, best_e = best_q[order], best_e[order]
    order = _rank(best_e, np.zeros(len(best_e)), best_q, "parallelogram")
    best_q = best_q[order]
    _, first = np.unique(canonical(best_q, "parallelogram"), axis=0, return_index=True)
    return best_q[np.sort(first)][:top]


def child(args: argparse.Namespace) -> None:
    from queries.crystals import CrystalParams, CrystalSearch, canonical

    n = args.features if args.child == "saecat" else args.subsample
    dec, planted = synthetic(n, args.dim, args.planted, args.seed)
    params = CrystalParams(top=args.top, distractors=("cloud:1",), pairs_per_feature=args.pairs_per_feature,
                           index_dims=args.index_dims)
    search = CrystalSearch(params)
    start = time.perf_counter()
    if args.child in ("saecat", "saecat_sub"):
        table = search.fit(dec)
        quads = np.stack([table.column(c).to_numpy() for c in "abcd"], axis=1)
        extra = {"n_pairs": search.summary_["n_pairs"], "n_candidates": search.summary_["n_candidates"],
                 "index": search.summary_["index"]}
    else:  # the same directions and candidate pairs, then exhaustive matching
        search.index_ = {}
        stored = search._directions(dec)
        basis, _ = search._distractor_basis(dec, stored, {})
        x = search._directions(dec, basis)
        pairs = search._candidate_pairs(x, None)
        quads = naive_match(search, x, pairs, args.top)
        extra = {"n_pairs": len(pairs), "pair_comparisons": len(pairs) * (len(pairs) - 1)}
    elapsed = time.perf_counter() - start
    got = {tuple(q) for q in canonical(quads, "parallelogram").tolist()}
    want = [tuple(q) for q in canonical(np.array(planted), "parallelogram").tolist()]
    out = {"method": args.child, "features": n, "dim": args.dim, "seconds": elapsed, "load": os.getloadavg()[0],
           "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
           "planted_found": sum(w in got for w in want) / max(len(want), 1),
           "dense_gb": n * (n - 1) / 2 * args.dim * 4 / 2**30, **extra}
    if args.quads_out:
        np.save(args.quads_out, canonical(quads, "parallelogram"))
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--subsample", type=int, default=2048, help="features for the naive baseline")
    parser.add_argument("--pairs-per-feature", type=int, default=8)
    parser.add_argument("--index-dims", type=int, default=256)
    parser.add_argument("--planted", type=int, default=20)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["saecat", "naive"], help="run one side only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quads-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.features, args.dim, args.subsample, args.planted = 600, 32, 300, 4
    if args.child:
        child(args)
        return
    import tempfile

    common = [sys.executable, __file__, "--features", str(args.features), "--dim", str(args.dim),
              "--subsample", str(args.subsample), "--pairs-per-feature", str(args.pairs_per_feature),
              "--index-dims", str(args.index_dims), "--planted", str(args.planted), "--top", str(args.top),
              "--seed", str(args.seed)]
    methods = {"saecat": ["saecat"], "naive": ["naive", "saecat_sub"]}.get(args.only, ["naive", "saecat_sub", "saecat"])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            quads = str(Path(tmp) / f"{method}.npy")
            out = subprocess.run([*common, "--child", method, "--quads-out", quads], check=True, capture_output=True,
                                 text=True).stdout
            print(out.strip(), flush=True)
            results[method] = json.loads(out.strip().splitlines()[-1])
            results[method]["quads"] = {tuple(q) for q in np.load(quads).tolist()}
    if "naive" in results and "saecat_sub" in results:
        naive, sub = results["naive"], results["saecat_sub"]
        summary = {"summary": True, "subsample": args.subsample,
                   "speedup_at_subsample": naive["seconds"] / sub["seconds"],
                   "recall_of_naive_top": len(naive["quads"] & sub["quads"]) / max(len(naive["quads"]), 1)}
        if "saecat" in results:
            full = results["saecat"]
            scale = (full["n_pairs"] / naive["n_pairs"]) ** 2
            summary.update(naive_seconds_extrapolated=naive["seconds"] * scale,
                           speedup_at_full=naive["seconds"] * scale / full["seconds"],
                           dense_gb_at_full=full["dense_gb"])
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
