"""Nearest neighbours: saecat's FAISS path against DuckDB's own brute-force scan, same vectors.

Synthetic catalogs (bench/synthetic.py: committed with saecat's writer, exact FAISS indexes built
through saecat) of three sizes:
  16k   one 16,384 x 2,304 SAE (Gemma-2-2B's width), searched within the SAE (scope 'sae');
  65k   one 65,536 x 2,304 SAE, scope 'sae';
  1m    43 SAEs x 24,576 = 1,056,768 features of one model at d_in 768 (GPT-2 small), all searched
        together (scope 'model'). 1M at d_in 2,304 would hold 9.4 GB of float32 in DuckDB and as
        much in FAISS, too much for the shared 24 GB machine.
The queries are decoder rows of features drawn with a fixed seed from the searched SAEs; every
method answers the same queries, top 10 by cosine, the query itself included (it is its own
nearest, cosine 1). Each method runs in its own process:
  duckdb     the SQL a user would write, on a read-only Catalog connection:
             `SELECT feature, list_cosine_similarity(decoder, ?) AS c FROM features WHERE sae = ?
             ORDER BY c DESC LIMIT 10` (for 1m over the model's SAEs), per query; and a batch as
             one query: the query vectors as a table, cross-joined with the features, top 10 per
             query by DuckDB's max_by(..., c, 10) aggregate (7x faster than a window + QUALIFY);
  exact      `search_raw(approximate=False)`, per query and for a batch of 1,000, as saecat does
             it ("as is": before a9fb833 Catalog.index read each index file back on every call,
             since then an LRU in catalog/index.py keeps them within SAECAT_INDEX_CACHE_GB) and
             with the indexes held (Catalog.index memoised on the catalog object);
  approx     the same with `approximate=True` (each SAE's approximate index: HNSW, M 32,
             efConstruction 200, efSearch 128, below 16,384 features; IVF from there, which
             ingestion and bench/synthetic.py write), plus its build time (or, if its files are
             already there, the read), the read a new process pays, and saecat's own recall
             estimate (measured_recall);
  neighbors  the whole `neighbors()` call a user makes (self excluded, labels and densities
             joined in SQL), exact and approximate, per query, as is and with indexes held.
Then the parent checks that DuckDB's and FAISS's exact top 10 agree (equal up to ties) and
reports recall@10 of the approximate index against exact over the batch, and the speed-ups.

    python bench/neighbors.py --sizes 16k 65k --repeats 3
    python bench/neighbors.py --sizes 1m --dir /tmp/saecat-bench   # reuses a catalog built there
    python bench/neighbors.py --smoke

`--wide` measures instead the index builds for wide SAEs (catalog/index.py), on one synthetic
SAE per size held in memory as ingestion holds W_dec (bench/synthetic.py's decoders, no catalog):
  oneshot    the build before chunking: a unit-normalised copy of the whole decoder, added at once;
  chunked    VectorIndex.build: storage allocated once, filled chunk by chunk;
  ivf        VectorIndex.build_ivf at its defaults (train + add), its recall@10 against the exact
             index over 1,000 decoder-row queries, and both searched per query and in batch.
Each in its own process, so peak memory (ru_maxrss) is the build's; `extra_gb` is the peak above
the resident size once the decoder is made.

    python bench/neighbors.py --wide --sizes 262k-64 262k-768 65k-2304

Exact FAISS searches run where saecat runs them: on a GPU if faiss-gpu is installed and sees one
(each line records `index_device`); SAECAT_INDEX_DEVICE=cpu gives the CPU figures on the same
machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import SIZES, SMOKE, Spec, release_name  # noqa: E402

K = 10
METHODS = ("duckdb", "exact", "approx", "neighbors")


@dataclass(frozen=True)
class Counts:
    """Queries per measurement: DuckDB's scans are slow at 1M, so fewer there."""

    duckdb_single: int
    duckdb_batch: int
    single: int  # FAISS per-query latency
    full: int  # neighbors() calls
    batch: int = 1000  # FAISS batch


COUNTS = {"16k": Counts(10, 100, 100, 10), "65k": Counts(5, 40, 50, 5), "1m": Counts(3, 8, 20, 3)}
SMOKE_COUNTS = Counts(3, 6, 5, 2, batch=40)

# --wide: one SAE per size, `width` x `d_in`, with the planted structure of synthetic.py.
WIDE_SIZES = {name: Spec("wide", 1, w, d) for name, w, d in
              [("262k-64", 262_144, 64), ("262k-768", 262_144, 768), ("65k-2304", 65_536, 2_304),
               ("131k-2304", 131_072, 2_304), ("1m-64", 1_048_576, 64)]}
WIDE_SMOKE = {name: Spec("wide", 1, 3000, 16, clusters=20) for name in WIDE_SIZES}
WIDE_METHODS = ("oneshot", "chunked", "ivf")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gb() -> float:
    """Resident size now (ru_maxrss is the peak)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def per_call(fn: Callable[[int], object], n: int) -> float:
    """Median seconds of fn(i) over i < n."""
    times = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextmanager
def indexes_held(cat) -> Iterator[None]:
    """Catalog.index memoised on this catalog object: each index is read once and kept."""
    cat.index = functools.cache(cat.index)
    try:
        yield
    finally:
        del cat.index  # back to the class's method; the held indexes are freed


# --------------------------------------------------------------------------- the queries


def setup(cat, spec: Spec, n: int, seed: int) -> tuple[str, list[int], np.ndarray, np.ndarray]:
    """(scope, searched SAE keys, query (sae, feature) pairs [n, 2], their decoder rows [n, d_in])."""
    from queries.neighbors import scope_saes

    keys = [r[0] for r in cat.con.execute("SELECT sae FROM saes WHERE release = ? ORDER BY sae",
                                          [release_name(spec)]).fetchall()]
    scope = "model" if len(keys) > 1 else "sae"
    saes = scope_saes(cat, cat.sae_by_key(keys[0]), scope)
    assert saes == keys, "the synthetic model's SAEs are the only ones of its model"
    rng = np.random.default_rng(seed)
    pairs = np.stack([rng.choice(keys, n), rng.integers(0, spec.width, n)], axis=1).astype(np.int64)
    cat.con.register("_bench_wanted", {"n": np.arange(n), "sae": pairs[:, 0], "feature": pairs[:, 1]})
    col = cat.con.sql("SELECT f.decoder FROM _bench_wanted w JOIN features f USING (sae, feature) ORDER BY w.n"
                      ).to_arrow_table().column(0).combine_chunks()
    cat.con.unregister("_bench_wanted")
    vectors = col.values.to_numpy().reshape(n, spec.d_in)
    return scope, saes, pairs, vectors


def save_top(path: Path, sae: np.ndarray, feature: np.ndarray, cosine: np.ndarray) -> None:
    np.savez(path, sae=sae.astype(np.int64), feature=feature.astype(np.int64), cosine=cosine.astype(np.float32))


# --------------------------------------------------------------------------- methods


def run_duckdb(cat, spec: Spec, args: argparse.Namespace, counts: Counts) -> dict:
    import pyarrow as pa

    scope, _, pairs, vectors = setup(cat, spec, counts.batch, args.seed)
    if scope == "sae":
        where, params = "sae = ?", lambda i: [int(pairs[i, 0])]
    else:
        where = "sae IN (SELECT sae FROM saes WHERE status = 'ready' AND model = ? AND d_in = ?)"
        params = lambda i: [spec.model, spec.d_in]  # noqa: E731
    single = (f"SELECT sae, feature, list_cosine_similarity(decoder, ?::FLOAT[]) AS c FROM features "
              f"WHERE {where} ORDER BY c DESC LIMIT {K}")
    rows: dict[int, list] = {}

    def one(i: int) -> None:
        rows[i] = cat.con.execute(single, [vectors[i].tolist(), *params(i)]).fetchall()

    started = time.perf_counter()
    one(0)  # the first scan reads the decoders from disk into DuckDB's buffers
    cold = time.perf_counter() - started
    single_s = per_call(one, counts.duckdb_single)
    n = counts.duckdb_batch
    cat.con.register("_bench_queries", pa.table({
        "q": pa.array(np.arange(n, dtype=np.int32)), "v": pa.array(list(vectors[:n]), pa.list_(pa.float32())),
        "sae": pa.array(pairs[:n, 0].astype(np.int32))}))
    # In scope 'sae' each query scans its own SAE (the join key); in scope 'model' all of them.
    join = "f.sae = b.sae" if scope == "sae" else f"f.{where}"
    batch = ("SELECT q, max_by(struct_pack(sae := sae, feature := feature, c := c), c, "
             f"{K}) AS top FROM (SELECT b.q, f.sae, f.feature, list_cosine_similarity(f.decoder, b.v) AS c "
             f"FROM _bench_queries b JOIN features f ON {join}) GROUP BY q ORDER BY q")
    batch_params = [] if scope == "sae" else params(0)
    result: list = []
    batch_s = median_time(lambda: result.__setitem__(slice(None), cat.con.execute(batch, batch_params).fetchall()),
                          args.repeats)
    top = [sorted(r[1], key=lambda t: -t["c"]) for r in result]
    save_top(args.out / "duckdb.npz", *(np.array([[t[key] for t in q] for q in top]) for key in ("sae", "feature", "c")))
    single_top = np.array([[(s, f) for s, f, _ in rows[i]] for i in range(counts.duckdb_single)])
    np.save(args.out / "duckdb_single.npy", single_top)
    threads = cat.con.execute("SELECT current_setting('threads')").fetchall()[0][0]
    return {"cold_first_query_ms": ms(cold), "ms_per_query": ms(single_s), "queries_timed": counts.duckdb_single,
            "batch": n, "batch_s": round(batch_s, 4), "batch_queries_per_s": round(n / batch_s, 2),
            "duckdb_threads": threads}


def run_exact(cat, spec: Spec, args: argparse.Namespace, counts: Counts) -> dict:
    from queries.neighbors import search_raw

    _, saes, _, vectors = setup(cat, spec, counts.batch, args.seed)
    one = lambda i: search_raw(cat, saes, vectors[i], K)  # noqa: E731
    started = time.perf_counter()
    one(0)
    cold = time.perf_counter() - started
    out = {"cold_first_query_ms": ms(cold),
           "ms_per_query_as_is": ms(per_call(one, min(counts.single, 20 if spec.n_saes == 1 else 5))),
           "batch": counts.batch}
    batch_s = {"as_is": median_time(lambda: search_raw(cat, saes, vectors, K), args.repeats)}
    with indexes_held(cat):
        started = time.perf_counter()
        for s in saes:
            cat.index(s)
        out["load_indexes_s"] = round(time.perf_counter() - started, 3)
        out["ms_per_query_held"] = ms(per_call(one, counts.single))
        found: list = []
        batch_s["held"] = median_time(lambda: found.__setitem__(slice(None), search_raw(cat, saes, vectors, K)),
                                      args.repeats)
    save_top(args.out / "exact.npz", *found)
    for kind, seconds in batch_s.items():
        out[f"batch_s_{kind}"] = round(seconds, 4)
        out[f"batch_queries_per_s_{kind}"] = round(counts.batch / seconds, 1)
    return out


def run_approx(cat, spec: Spec, args: argparse.Namespace, counts: Counts) -> dict:
    from catalog.index import INDEXES, VectorIndex, approximate_index, approximate_kind
    from queries.neighbors import measured_recall, search_raw

    _, saes, _, vectors = setup(cat, spec, counts.batch, args.seed)
    records = cat.saes_by_key(saes)
    kinds = sorted({approximate_kind(r) for r in records})
    # The exact indexes are read first, held, so that the build time below is the approximate index's own.
    with indexes_held(cat):
        started = time.perf_counter()
        for s in saes:
            cat.index(s)
        read = time.perf_counter() - started
        built = not all(VectorIndex.paths(cat, r.sae, approximate_kind(r))[0].exists() for r in records)
        started = time.perf_counter()
        for r in records:
            approximate_index(cat, r)  # built and written on first use (or by ingestion), read after
        first_use = time.perf_counter() - started
    INDEXES.clear()  # as a new process: the approximate indexes come from their files
    started = time.perf_counter()
    for r in records:
        VectorIndex.load_or_build(cat, r, approximate_kind(r))
    approx_read = time.perf_counter() - started
    one = lambda i: search_raw(cat, saes, vectors[i], K, approximate=True)  # noqa: E731
    single_s = per_call(one, counts.single)
    found: list = []
    batch_s = median_time(lambda: found.__setitem__(slice(None), search_raw(cat, saes, vectors, K, approximate=True)),
                          args.repeats)
    save_top(args.out / "approx.npz", *found)
    started = time.perf_counter()
    estimate = measured_recall(cat, saes, K)
    return {"approx_kind": "+".join(kinds), "read_exact_indexes_s": round(read, 3), "approx_built": built,
            "approx_build_s" if built else "approx_first_read_s": round(first_use, 3),
            "approx_read_s": round(approx_read, 3),
            "ms_per_query": ms(single_s), "batch": counts.batch, "batch_s": round(batch_s, 4),
            "batch_queries_per_s": round(counts.batch / batch_s, 1),
            "saecat_measured_recall": round(estimate, 4),
            "measured_recall_s": round(time.perf_counter() - started, 3)}


def run_neighbors(cat, spec: Spec, args: argparse.Namespace, counts: Counts) -> dict:
    from queries.neighbors import neighbors

    scope, _, pairs, _ = setup(cat, spec, counts.batch, args.seed)
    out = {"scope": scope, "calls_timed": counts.full}

    def timed(name: str, approximate: bool) -> None:
        call = lambda i: neighbors(cat, int(pairs[i, 0]), [int(pairs[i, 1])], K, scope,  # noqa: E731
                                   approximate=approximate)
        started = time.perf_counter()
        table = call(0)  # approximate: reads (or builds) the approximate indexes, and their recall
        out[f"first_call_ms_{name}"] = ms(time.perf_counter() - started)
        out[f"ms_per_call_{name}"] = ms(per_call(lambda i: call(i + 1), counts.full))
        assert table.num_rows == K and set(table.column_names) >= {"density", "top_tokens", "top_example"}

    timed("exact_as_is", False)
    with indexes_held(cat):
        timed("exact_held", False)
    if "approx" in args.only:  # with its recall estimate (before a9fb833, re-measured on every call)
        timed("approx_as_is", True)
    return out


def child(args: argparse.Namespace) -> None:
    from catalog import Catalog
    from catalog.index import index_device

    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    spec = (SMOKE if args.smoke else SIZES)[args.size]
    counts = SMOKE_COUNTS if args.smoke else COUNTS[args.size]
    run = {"duckdb": run_duckdb, "exact": run_exact, "approx": run_approx, "neighbors": run_neighbors}[args.child]
    load = os.getloadavg()[0]
    with Catalog.open(args.db) as cat:
        result = run(cat, spec, args, counts)
    print(json.dumps({"size": args.size, "method": args.child, **result, "peak_gb": round(peak_gb(), 2),
                      "index_device": index_device(), "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}))


# --------------------------------------------------------------------------- wide builds


def run_wide(spec: Spec, method: str, args: argparse.Namespace) -> dict:
    """One build of `method` over a width x d_in synthetic decoder, timed, in this process."""
    import faiss

    from catalog.index import VectorIndex, encode_ids, unit_rows
    from synthetic import decoders

    dec = decoders(spec, 0)
    before = rss_gb()
    started = time.perf_counter()
    if method == "oneshot":  # catalog/index.py before chunking
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(spec.d_in))
        index.add_with_ids(unit_rows(dec), encode_ids(0, np.arange(spec.width)))
        exact = VectorIndex(0, index)
    else:
        exact = VectorIndex.build(0, dec, progress=False)
    out = {"build_s": round(time.perf_counter() - started, 3), "decoder_gb": round(dec.nbytes / 2**30, 3),
           "peak_gb": round(peak_gb(), 3), "extra_gb": round(peak_gb() - before, 3)}
    if method != "ivf":
        return out
    n = 40 if args.smoke else 1000
    queries = dec[np.random.default_rng(args.seed).choice(spec.width, n, replace=False)]
    started = time.perf_counter()
    approx = VectorIndex.build_ivf(0, dec, progress=False)
    inner = faiss.extract_index_ivf(approx.faiss)
    out.update(ivf_build_s=round(time.perf_counter() - started, 3), nlist=inner.nlist, nprobe=inner.nprobe,
               ivf_peak_gb=round(peak_gb(), 3))
    single = min(n, 20)
    for name, index in (("exact", exact), ("ivf", approx)):
        found: list = []
        out[f"{name}_batch_s"] = round(median_time(lambda i=index: found.append(i.search(queries, K)[1]), args.repeats), 4)
        out[f"{name}_ms_per_query"] = ms(per_call(lambda q, i=index: i.search(queries[q], K), single))
        out[f"{name}_top"] = found[-1]
    want, got = out.pop("exact_top"), out.pop("ivf_top")
    out["recall_at_10_ivf"] = round(float(np.mean([len(set(w) & set(g)) / K for w, g in zip(want.tolist(), got.tolist())])), 4)
    out["speedup_per_query_ivf"] = round(out["exact_ms_per_query"] / out["ivf_ms_per_query"], 1)
    return out


def wide_child(args: argparse.Namespace) -> None:
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    spec = (WIDE_SMOKE if args.smoke else WIDE_SIZES)[args.size]
    load = os.getloadavg()[0]
    result = run_wide(spec, args.child, args)
    print(json.dumps({"size": args.size, "features": spec.width, "d_in": spec.d_in, "method": args.child, **result,
                      "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}))


def wide_main(args: argparse.Namespace) -> None:
    """Each build of each size in its own process; then the chunked/one-shot ratios."""
    for size in args.sizes:
        results = {}
        for method in WIDE_METHODS:
            cmd = [sys.executable, __file__, "--wide", "--child", method, "--size", size, "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--seed", str(args.seed), *(["--smoke"] if args.smoke else [])]
            results[method] = json_line(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(json.dumps(results[method]), flush=True)
        old, new = results["oneshot"], results["chunked"]
        print(json.dumps({"size": size, "chunked_vs_oneshot_build_time": round(new["build_s"] / old["build_s"], 2),
                          "chunked_vs_oneshot_extra_memory": round(new["extra_gb"] / max(old["extra_gb"], 1e-9), 3),
                          "chunked_vs_oneshot_peak": round(new["peak_gb"] / old["peak_gb"], 3)}), flush=True)


# --------------------------------------------------------------------------- checks


def agreement(a: dict, b: dict, tol: float = 1e-4) -> tuple[float, float]:
    """(fraction of queries whose top-k agree up to ties, fraction whose id sets are equal)
    between two results with the same rows: cosines equal within tol, and any id in one set but
    not the other within tol of the k-th cosine (a tie at the boundary)."""
    ok = same = 0
    n = len(a["sae"])
    for q in range(n):
        ids_a = set(zip(a["sae"][q].tolist(), a["feature"][q].tolist()))
        ids_b = set(zip(b["sae"][q].tolist(), b["feature"][q].tolist()))
        same += ids_a == ids_b
        close = np.allclose(np.sort(a["cosine"][q]), np.sort(b["cosine"][q]), atol=tol)
        edge = min(a["cosine"][q].min(), b["cosine"][q].min())
        cos_a = dict(zip(zip(a["sae"][q].tolist(), a["feature"][q].tolist()), a["cosine"][q].tolist()))
        cos_b = dict(zip(zip(b["sae"][q].tolist(), b["feature"][q].tolist()), b["cosine"][q].tolist()))
        ties = all(abs(c - edge) <= tol for key, c in {**cos_a, **cos_b}.items() if key not in ids_a & ids_b)
        ok += close and ties
    return ok / n, same / n


def recall(exact: dict, approx: dict) -> float:
    hits = sum(len(set(zip(es.tolist(), ef.tolist())) & set(zip(as_.tolist(), af.tolist())))
               for es, ef, as_, af in zip(exact["sae"], exact["feature"], approx["sae"], approx["feature"]))
    return hits / exact["feature"].size


def summarise(size: str, spec: Spec, results: dict[str, dict], out: Path) -> dict:
    top = {m: dict(np.load(out / f"{m}.npz")) for m in ("duckdb", "exact", "approx") if (out / f"{m}.npz").exists()}
    summary: dict = {"size": size, "features": spec.features, "saes": spec.n_saes, "d_in": spec.d_in}
    if "duckdb" in top and "exact" in top:
        n = len(top["duckdb"]["sae"])
        head = {key: v[:n] for key, v in top["exact"].items()}
        summary["top10_agree_duckdb_exact"], summary["top10_identical_duckdb_exact"] = agreement(top["duckdb"], head)
        summary["recall_at_10_exact_vs_duckdb"] = recall(top["duckdb"], head)
        single = np.load(out / "duckdb_single.npy")
        summary["single_query_top10_identical_duckdb_exact"] = float(np.mean(
            [set(map(tuple, single[q].tolist())) == set(zip(head["sae"][q].tolist(), head["feature"][q].tolist()))
             for q in range(len(single))]))
    if "exact" in top and "approx" in top:
        summary["recall_at_10_approx"] = round(recall(top["exact"], top["approx"]), 4)
    d, e, a = (results.get(m) for m in ("duckdb", "exact", "approx"))
    if d and e:
        summary["speedup_per_query_exact_as_is"] = round(d["ms_per_query"] / e["ms_per_query_as_is"], 1)
        summary["speedup_per_query_exact_held"] = round(d["ms_per_query"] / e["ms_per_query_held"], 1)
        summary["speedup_batch_exact_as_is"] = round(e["batch_queries_per_s_as_is"] / d["batch_queries_per_s"], 1)
        summary["speedup_batch_exact_held"] = round(e["batch_queries_per_s_held"] / d["batch_queries_per_s"], 1)
    if d and a:
        summary["speedup_per_query_approx"] = round(d["ms_per_query"] / a["ms_per_query"], 1)
        summary["speedup_batch_approx"] = round(a["batch_queries_per_s"] / d["batch_queries_per_s"], 1)
    return summary


# --------------------------------------------------------------------------- driver


def json_line(stdout: str) -> dict:
    """The last JSON line a child printed (DuckDB may print a progress bar too)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted({*SIZES, *WIDE_SIZES}), default=None,
                        help="default 16k 65k 1m; with --wide, 262k-64 262k-768")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS),
                        help="without approx, neighbors() is timed exact only")
    parser.add_argument("--repeats", type=int, default=3, help="batch timings: median of this many runs")
    parser.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: its default, all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="where the catalogs are built, kept and reused (default: a "
                                                 "temporary folder, removed after)")
    parser.add_argument("--smoke", action="store_true", help="tiny catalogs, every method: seconds")
    parser.add_argument("--wide", action="store_true", help="index builds for wide SAEs (see above)")
    parser.add_argument("--size", choices=sorted({*SIZES, *WIDE_SIZES}), help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=METHODS + WIDE_METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return wide_child(args) if args.wide else child(args)
    if args.smoke:
        args.repeats = 1
    known = WIDE_SIZES if args.wide else SIZES
    args.sizes = args.sizes or (["262k-64", "262k-768"] if args.wide else ["16k", "65k", "1m"])
    if not set(args.sizes) <= set(known):
        parser.error(f"--sizes {' '.join(args.sizes)}: choose from {', '.join(known)}")
    if args.wide:
        return wide_main(args)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="saecat-bench-neighbors-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for size in args.sizes:
            spec = (SMOKE if args.smoke else SIZES)[size]
            db = folder / f"synthetic-{size}{'-smoke' if args.smoke else ''}.duckdb"
            # Built in its own process (its peak memory is not the children's), or reused.
            built = json_line(subprocess.run(
                [sys.executable, str(Path(__file__).parent / "synthetic.py"), "--size", size, "--db", str(db),
                 *(["--smoke"] if args.smoke else [])], check=True, capture_output=True, text=True).stdout)
            built.pop("writer_s_per_sae")
            print(json.dumps(built), flush=True)
            out = Path(tempfile.mkdtemp(prefix=f"top-{size}-", dir=folder))
            results = {}
            for method in args.only:
                cmd = [sys.executable, __file__, "--child", method, "--size", size, "--db", str(db), "--out", str(out),
                       "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed),
                       "--only", *args.only,
                       *(["--smoke"] if args.smoke else [])]
                results[method] = json_line(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                print(json.dumps(results[method]), flush=True)
            print(json.dumps(summarise(size, spec, results, out)), flush=True)
            shutil.rmtree(out)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
