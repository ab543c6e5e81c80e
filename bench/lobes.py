"""Lobes: time and peak memory of the whole analysis (queries/lobes.py) on a synthetic SAE.

A synthetic SAE is generated and committed into a temporary catalog the way an ingestion would
leave it: `--blocks` full blocks, each about one of `--topics` topics, `--active` distinct
features firing per block on average, drawn with Zipf-like popularity and a boost for features
whose home topic is the block's (so lobes exist to be found); a few dead and saturated features;
n11 = XᵀX counted exactly and every pair with n11 > 0 stored (at 16k nearly all 1.3e8 pairs, as in
a real catalog); decoder rows near their topic's centre, unit norm; `--sample-blocks` blocks kept
with their topic as group_value.

Then, each in its own subprocess so its peak memory (ru_maxrss) is its own:
  dense     the whole pipeline, lobes.run (load, affinities, embeddings, k-means, AMI with its
            null, logistic regressions with theirs, documents, storage), with per-stage times;
  knn       the same with the kNN-sparsified affinities (--knn neighbours per row);
  baseline  (--baseline) one affinity's labels for every n: sklearn SpectralClustering(affinity=
            'precomputed') per n, against lobes' one shared embedding + k-means per n;
  ami       (--ami) seconds per sklearn AMI at F points for 8 ... 1024 clusters.
Prints one JSON line per step, then the ratios.

    python bench/lobes.py --features 16384 --d 2304                 # about 8 minutes on 2 cores
    python bench/lobes.py --features 8192 --only baseline --baseline
    python bench/lobes.py --smoke                                   # seconds: keeps the script working
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOKE = dict(features=400, blocks=300, active=40, d=32, topics=4, sample_blocks=100, n_lobes=[2, 4], knn=20,
             permutations=10, null_repeats=2)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------- synthetic SAE


def generate(args: argparse.Namespace) -> dict:
    """Block indicators -> counts -> a catalog at args.db. Returns what it made."""
    from catalog import writer

    rng = np.random.default_rng(args.seed)
    f, t = args.features, args.blocks
    home = rng.integers(0, args.topics, f)
    weight = 1.0 / rng.permutation(np.arange(1, f + 1)) ** 0.8  # Zipf-like popularity, in random feature order
    boost = args.boost
    dead = rng.choice(f, max(1, f // 100), replace=False)  # ~1% never fire
    weight[dead] = 0.0
    saturated = rng.choice(np.setdiff1d(np.arange(f), dead), max(1, f // 2000), replace=False)
    topic = rng.integers(0, args.topics, t)
    # Scale so a block has ~args.active features on average: E = sum_f p_f, p = min(1, c w (boost or 1)).
    expected = weight * (boost + args.topics - 1) / args.topics
    scale = args.active / expected.sum()
    for _ in range(20):  # the min(1, .) cap: refine the scale a few times
        scale *= args.active / np.minimum(1.0, scale * expected).sum()
    fired = np.zeros((t, f), dtype=np.float32)
    for start in range(0, t, 512):
        stop = min(t, start + 512)
        prob = np.minimum(1.0, scale * weight[None, :] * np.where(home[None, :] == topic[start:stop, None], boost, 1.0))
        fired[start:stop] = rng.random((stop - start, f), dtype=np.float32) < prob
    fired[:, saturated] = 1.0
    started = time.perf_counter()
    n11 = fired.T @ fired  # exact: counts < 2^24
    count_s = time.perf_counter() - started
    n_i = np.rint(np.diag(n11)).astype(np.int64)
    parts_i, parts_j, parts_n = [], [], []
    for start in range(0, f, 1024):
        stop = min(f, start + 1024)
        tile = n11[start:stop]
        rows, cols = np.nonzero(np.triu(tile, start + 1))  # row-major: sorted by (i, j) as ingestion writes
        parts_i.append((rows + start).astype(np.int32))
        parts_j.append(cols.astype(np.int32))
        parts_n.append(np.rint(tile[rows, cols]).astype(np.int64))
    del n11
    pairs = pa.table({"i": pa.array(np.concatenate(parts_i)), "j": pa.array(np.concatenate(parts_j)),
                      "n11": pa.array(np.concatenate(parts_n))})
    del parts_i, parts_j, parts_n
    centres = rng.standard_normal((args.topics, args.d)).astype(np.float32)
    dec = rng.standard_normal((f, args.d)).astype(np.float32) + args.signal * centres[home]
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)  # Gemma Scope's rows are unit norm
    features = pa.table({
        "feature": pa.array(np.arange(f, dtype=np.int32)),
        "decoder": pa.FixedSizeListArray.from_arrays(pa.array(dec.ravel()), args.d).cast(pa.list_(pa.float32())),
        "decoder_norm": pa.array(np.ones(f, dtype=np.float32)),
        "fire_count": pa.array(n_i * 3),
        "block_count": pa.array(n_i),
        "max_activation": pa.array(np.full(f, 5.0, dtype=np.float32)),
        "mean_activation": pa.array(np.full(f, 2.0, dtype=np.float32)),
    })
    sample = np.sort(rng.choice(t, min(t, args.sample_blocks), replace=False))
    names = [f"topic{k}" for k in range(args.topics)]
    blocks = pa.table({
        "block": pa.array(sample.astype(np.int64)), "document": pa.array((sample // 4).astype(np.int64)),
        "start": pa.array(((sample % 4) * 256 + 1).astype(np.int32)),
        "group_value": pa.array([names[topic[b]] for b in sample], pa.string()),
        "features": pa.array([np.flatnonzero(fired[b]).astype(np.int32) for b in sample], pa.list_(pa.int32())),
    })
    active = float(fired.sum(1).mean())
    del fired
    row = {"release": "bench", "sae_id": f"synthetic-{f}", "source": "synthetic", "model": "none",
           "hook_name": "none", "layer": 0, "d_in": args.d, "d_sae": f, "architecture": "standard",
           "status": "ready", "n_documents": t // 4, "n_tokens": t * 256, "n_blocks": t, "block_size": 256,
           "threshold": 1.0, "ingested_at": datetime(2026, 11, 23), "group_column": "topic",
           "sample_blocks": len(sample)}
    started = time.perf_counter()
    with writer(args.db) as cat:
        cat.commit_sae(row, features, pairs, {"release": "bench", "repo_id": None, "model": None,
                                               "conversion_func": None, "links": None}, extra={"blocks": blocks})
    return {"step": "generate", "features": f, "blocks": t, "d": args.d, "active_per_block": round(active, 1),
            "pairs": pairs.num_rows, "pair_density": round(pairs.num_rows / (f * (f - 1) / 2), 3),
            "dead": int((n_i == 0).sum()), "saturated": int((n_i == t).sum()), "count_s": round(count_s, 1),
            "commit_s": round(time.perf_counter() - started, 1),
            "db_gb": round(Path(args.db).stat().st_size / 2**30, 2), "peak_gb": round(peak_gb(), 2)}


# --------------------------------------------------------------------------- steps


def params_from(args: argparse.Namespace, knn: int | None):
    from queries.lobes import LobesParams

    return LobesParams(affinities=tuple(args.affinities), n_lobes=tuple(args.n_lobes), permutations=args.permutations,
                       null_repeats=args.null_repeats, knn=knn, eigen_solver=args.eigen_solver)


def run_pipeline(args: argparse.Namespace, knn: int | None) -> dict:
    """lobes.run with its module functions wrapped to time each stage (and note the peak so far)."""
    from queries import analyses, lobes

    stages: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - started
                peaks[name] = round(peak_gb(), 2)
        return wrapper

    for name, stage in (("affinity_matrix", "affinities"), ("embed", "embedding"), ("cluster", "kmeans"),
                        ("ami_with_null", "ami_null"), ("regression_agreement", "regression"),
                        ("block_winners", "documents")):
        setattr(lobes, name, timed(stage, getattr(lobes, name)))
    analyses._store = timed("store", analyses._store)
    load = timed("load", lobes.load)
    params = params_from(args, knn)
    started = time.perf_counter()
    result = analyses.run(lobes.KIND, params, load, lobes.compute, db=args.db, release="bench",
                          sae_id=f"synthetic-{args.features}", force=True)
    total = time.perf_counter() - started
    head = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
             if k in ("affinity", "n_lobes", "ami", "ami_z", "accuracy_index", "accuracy_null_mean")}
            for row in result.summary["agreement"]]
    return {"step": "knn" if knn else "dense", "features": args.features, "included": result.summary["n_included"],
            "knn": knn, "eigen_solver": result.summary["eigen_solver"], "affinities": args.affinities,
            "n_lobes": args.n_lobes,
            "total_s": round(total, 3), "stages_s": {k: round(v, 1) for k, v in stages.items()},
            "peak_gb_after_stage": peaks, "peak_gb": round(peak_gb(), 2), "graphs": result.summary["graphs"],
            "agreement": head, "notes": result.summary["notes"][:6]}


def run_baseline(args: argparse.Namespace) -> dict:
    """SpectralClustering per n (its own embedding each time) vs one shared embedding + k-means."""
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    from catalog import Catalog
    from queries import lobes

    params = params_from(args, None)
    with Catalog.open(args.db) as cat:
        inputs = lobes.load(cat, cat.find_sae("bench", f"synthetic-{args.features}"), params)
    name = args.affinities[0]
    matrix = lobes.affinity_matrix(name, inputs)
    del inputs
    started = time.perf_counter()
    embedding, _ = lobes.embed(matrix, max(params.n_lobes), params)
    ours = {n: lobes.cluster(embedding, n, params.seed) for n in params.n_lobes}
    shared_s = time.perf_counter() - started
    per_n, agree = {}, {}
    for n in params.n_lobes:
        started = time.perf_counter()
        labels = SpectralClustering(n_clusters=n, affinity="precomputed", assign_labels="kmeans",
                                    random_state=params.seed, n_init=10).fit_predict(matrix)
        per_n[n] = time.perf_counter() - started
        agree[n] = round(float(adjusted_rand_score(labels, ours[n])), 4)
    return {"step": "baseline", "features": args.features, "affinity": name, "n_lobes": params.n_lobes,
            "shared_embedding_s": round(shared_s, 1),
            "spectral_clustering_s_per_n": {n: round(s, 1) for n, s in per_n.items()},
            "spectral_clustering_s": round(sum(per_n.values()), 1), "adjusted_rand_vs_shared": agree,
            # from the unrounded times: a smoke run's are all below 0.05 s
            "speedup_shared_over_per_n": round(sum(per_n.values()) / shared_s, 2), "peak_gb": round(peak_gb(), 2)}


def run_ami(args: argparse.Namespace) -> dict:
    from sklearn.metrics import adjusted_mutual_info_score

    rng = np.random.default_rng(0)
    out = {}
    for k in (8, 64, 256, 1024):
        if k >= args.features:
            continue
        a = rng.integers(0, k, args.features)
        b = np.where(rng.random(args.features) < 0.5, a, rng.integers(0, k, args.features))
        started = time.perf_counter()
        for _ in range(3):
            adjusted_mutual_info_score(rng.permutation(a), b)
        out[k] = round((time.perf_counter() - started) / 3, 3)
    return {"step": "ami", "points": args.features, "seconds_per_ami_by_clusters": out,
            "seconds_per_100_permutations_by_clusters": {k: round(100 * v, 1) for k, v in out.items()}}


# --------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    step = {"generate": generate, "dense": lambda a: run_pipeline(a, None), "knn": lambda a: run_pipeline(a, a.knn),
            "baseline": run_baseline, "ami": run_ami}[args.child]
    print(json.dumps(step(args)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--blocks", type=int, default=4096, help="full blocks counted (T)")
    parser.add_argument("--active", type=int, default=1500, help="mean distinct features firing per block")
    parser.add_argument("--d", type=int, default=2304, help="decoder width (Gemma-2-2B: 2304)")
    parser.add_argument("--topics", type=int, default=8, help="planted topics (group values of the blocks)")
    parser.add_argument("--sample-blocks", type=int, default=2048)
    parser.add_argument("--boost", type=float, default=4.0, help="firing odds of a feature in its home topic's blocks")
    parser.add_argument("--signal", type=float, default=0.05, help="weight of the topic centre in a decoder row")
    parser.add_argument("--affinities", nargs="+", default=["phi"])
    parser.add_argument("--n-lobes", nargs="+", type=int, default=[2, 3, 4, 8])
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--null-repeats", type=int, default=5)
    parser.add_argument("--knn", type=int, default=64, help="neighbours per row in the kNN step (0: skip it)")
    parser.add_argument("--eigen-solver", choices=["arpack", "lobpcg", "amg"],
                        help="default: arpack dense (the authors'), lobpcg for kNN")
    parser.add_argument("--baseline", action="store_true", help="also time SpectralClustering per n")
    parser.add_argument("--ami", action="store_true", help="also time sklearn AMI at 8..1024 clusters")
    parser.add_argument("--only", nargs="+", choices=["dense", "knn", "baseline", "ami"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", help="catalog to create (default: a temporary one, removed after)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every step: seconds")
    parser.add_argument("--child", choices=["generate", "dense", "knn", "baseline", "ami"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and not args.child:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.baseline = args.ami = True
    if args.child:
        return child(args)
    steps = args.only or ["dense", *(["knn"] if args.knn else []), *(["baseline"] if args.baseline else []),
                          *(["ami"] if args.ami else [])]
    folder = None if args.db else Path(tempfile.mkdtemp(prefix="saecat-bench-lobes-"))
    db = args.db or str(folder / "bench.duckdb")
    forwarded = [a for a in sys.argv[1:] if a != "--smoke"]
    if args.smoke:  # the children parse the smoke sizes as plain options (the last occurrence wins)
        forwarded += sum(([f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, list) else [v])]
                          for k, v in SMOKE.items()), [])
    results = {}
    try:
        for step in ["generate", *steps]:
            if step == "generate" and args.db and Path(args.db).exists():
                continue
            out = subprocess.run([sys.executable, __file__, *forwarded, "--db", db, "--child", step],
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            print(out, flush=True)
            results[step] = json.loads(out)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    ratios = {}
    if "dense" in results and "knn" in results:
        ratios["dense_over_knn_time"] = round(results["dense"]["total_s"] / results["knn"]["total_s"], 2)
        ratios["dense_over_knn_peak_memory"] = round(results["dense"]["peak_gb"] / results["knn"]["peak_gb"], 2)
    if "baseline" in results:
        ratios["speedup_shared_embedding_over_spectral_clustering_per_n"] = \
            results["baseline"]["speedup_shared_over_per_n"]
    if ratios:
        print(json.dumps(ratios))


if __name__ == "__main__":
    main()
