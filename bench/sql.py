"""SQL over large co-occurrence tables: saecat's layout against a naive dump of the same counts.

Three catalogs with the same SAEs, features and pair counts, differing only in `cooccurrence`:

  saecat    what saecat writes: lobes' synthetic generator (bench/lobes.py) committed through
            `commit_sae`, one transaction per SAE, i < j, INTEGER ids, rows sorted by (sae, i, j);
  naive     what a notebook dump gives without thinking about layout: the same rows (i < j, same
            columns, so every query runs unchanged), numpy's default int64 for every column
            (BIGINT), in a random order across and within SAEs (pairs gathered from shards or a
            dict and appended as they came);
  mirrored  an extra saecat variant, not what saecat does: each pair stored in both directions,
            each direction a run sorted by (sae, first id, second id), so a feature's partners
            are one contiguous range. Its queries drop the direction union (the histogram keeps i < j).

Queries (the same text on every layout, through `Catalog.open(path)` read-only and `Catalog.sql`,
as `saecat sql` runs them; phi from n11, both block_counts and n_blocks, as `feature_affinities`):
  top_partners    top-10 phi partners of every feature of one SAE (both directions, max_by with k);
  partners        top-10 phi partners of one feature (the interactive lookup), for --lookups features;
  histogram       one SAE's n11 histogram (log2 bins): pairs, blocks and mean phi per bin.

Each (layout, query) runs in --processes fresh subprocesses, interleaved across layouts: the first
run in a process is cold (DuckDB's buffer pool empty; the file stays in the OS page cache), then
--repeats warm runs. Results are compared across layouts (and, with --smoke, against a numpy
brute force over every block's features). Prints one JSON line per (layout, query), then ratios.

    python bench/sql.py --dir /tmp/saecat-sql          # builds there once (~8 min, 2.6 GB), then queries
    python bench/sql.py --smoke                        # seconds, checks values only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = ("saecat", "naive", "mirrored")
QUERIES = ("top_partners", "partners", "histogram")
K = 10
SMOKE = dict(features=300, blocks=200, active=30, other_blocks=200, other_active=15, others=2, lookups=3,
             processes=1, repeats=1)

# phi of a pair from its n11, the two features' block counts (a.n, b.n) and the SAE's n_blocks (s.t),
# as the feature_affinities view writes it.
PHI = ("(p.n11 * (s.t - a.n - b.n + p.n11) - (a.n - p.n11) * (b.n - p.n11)) "
       "/ nullif(sqrt(a.n * (s.t - a.n) * b.n * (s.t - b.n)), 0)")
# The SAE's n_blocks and its features' block counts, as doubles.
INPUTS = ("s AS (SELECT n_blocks::DOUBLE AS t FROM saes WHERE sae = {sae}), "
          "f AS (SELECT feature, block_count::DOUBLE AS n FROM features WHERE sae = {sae})")


def sql(query: str, sae: int, mirrored: bool, feature: int = 0) -> str:
    """The query's text. Stored pairs only (n11 > 0, as the catalog keeps them); NULL phi (a feature
    firing in every block) is left out; ties broken by the lower partner id."""
    inputs = INPUTS.format(sae=sae)
    if query == "top_partners":
        # Both directions of each pair from one scan (no self-join, no materialised CTE).
        both = ("SELECT i AS feature, j AS partner, phi FROM phis" if mirrored else
                "SELECT unnest([{'feature': i, 'partner': j}, {'feature': j, 'partner': i}], recursive := true), "
                "phi FROM phis")
        return (f"WITH {inputs}, "
                f"phis AS (SELECT p.i, p.j, {PHI} AS phi FROM cooccurrence p "
                f"JOIN f a ON a.feature = p.i JOIN f b ON b.feature = p.j CROSS JOIN s WHERE p.sae = {sae}), "
                f"both_ AS ({both}) "
                f"SELECT feature, unnest(max_by({{'partner': partner, 'phi': phi}}, (phi, -partner), {K}), "
                "recursive := true) FROM both_ WHERE phi IS NOT NULL GROUP BY feature")
    if query == "partners":
        # Two branches rather than `i = f OR j = f`: the i = f branch is a range the zone maps find.
        hits = f"SELECT j AS partner, n11 FROM cooccurrence WHERE sae = {sae} AND i = {feature}"
        if not mirrored:
            hits += f" UNION ALL SELECT i, n11 FROM cooccurrence WHERE sae = {sae} AND j = {feature}"
        return (f"WITH {inputs}, hits AS ({hits}), "
                f"phis AS (SELECT p.partner, p.n11, {PHI} AS phi FROM hits p "
                f"JOIN f a ON a.feature = {feature} JOIN f b ON b.feature = p.partner CROSS JOIN s) "
                f"SELECT partner, n11, phi FROM phis WHERE phi IS NOT NULL ORDER BY phi DESC, partner LIMIT {K}")
    if query == "histogram":
        where = f"p.sae = {sae}" + (" AND p.i < p.j" if mirrored else "")
        return (f"WITH {inputs}, "
                f"phis AS (SELECT p.n11, {PHI} AS phi FROM cooccurrence p "
                f"JOIN f a ON a.feature = p.i JOIN f b ON b.feature = p.j CROSS JOIN s WHERE {where}) "
                "SELECT floor(log2(n11))::INTEGER AS bin, count(*) AS pairs, sum(n11)::BIGINT AS n11, avg(phi) AS mean_phi "
                "FROM phis GROUP BY bin ORDER BY bin")
    raise ValueError(query)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def table_mb(path: Path) -> float:
    """Blocks that the cooccurrence table's columns occupy in the file."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        size = con.execute("SELECT block_size FROM pragma_database_size()").fetchall()[0][0]
        blocks = con.execute("SELECT count(DISTINCT block_id) FROM pragma_storage_info('cooccurrence') "
                             "WHERE persistent AND block_id >= 0").fetchall()[0][0]
    finally:
        con.close()
    return round(blocks * size / 2**20, 1)


# --------------------------------------------------------------------------- the catalogs


def sae_specs(args: argparse.Namespace) -> list[dict]:
    """The SAEs of the catalog: the large one first (key 1), then --others smaller ones."""
    big = dict(seed=args.seed, blocks=args.blocks, active=args.active)
    return [big, *(dict(seed=args.seed + k, blocks=args.other_blocks, active=args.other_active)
                   for k in range(1, args.others + 1))]


def build(args: argparse.Namespace) -> dict:
    """saecat's catalog by its own write path, then the naive and mirrored copies."""
    from bench.lobes import generate
    from catalog import writer

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {layout: folder / f"{layout}.duckdb" for layout in LAYOUTS}
    started = time.perf_counter()
    saes = []
    for key, spec in enumerate(sae_specs(args), start=1):
        made = generate(argparse.Namespace(
            db=str(paths["saecat"]), features=args.features, d=args.d, topics=8, boost=4.0, signal=0.05,
            # --smoke keeps every block, so the brute force can recount n11 from them
            sample_blocks=spec["blocks"] if args.smoke else 256, **spec))
        # lobes names its SAE by width only: give each its own name before the next one is committed
        with writer(paths["saecat"]) as cat:
            cat.con.execute("UPDATE saes SET sae_id = ? WHERE sae = ?", [f"synthetic-{args.features}-{key}", key])
        saes.append({k: made[k] for k in ("blocks", "active_per_block", "pairs", "count_s", "commit_s")})
    saecat_s = time.perf_counter() - started
    source = str(paths["saecat"]).replace("'", "''")
    copies = {
        # the same rows, int64 everywhere, in an arbitrary (hashed, so reproducible) order
        "naive": ["CREATE TABLE cooccurrence AS SELECT sae::BIGINT AS sae, i::BIGINT AS i, j::BIGINT AS j, n11 "
                  "FROM src.cooccurrence ORDER BY hash(sae, i, j, {seed})".format(seed=args.seed)],
        # per SAE: the stored run as is, then the mirrored run sorted by its own first id
        "mirrored": [stmt for key in range(1, len(saes) + 1) for stmt in (
            f"INSERT INTO cooccurrence SELECT * FROM src.cooccurrence WHERE sae = {key}",
            f"INSERT INTO cooccurrence SELECT sae, j, i, n11 FROM src.cooccurrence WHERE sae = {key} ORDER BY j, i",
        )],
    }
    seconds = {"saecat": round(saecat_s, 1)}
    for layout, statements in copies.items():
        started = time.perf_counter()
        with writer(paths[layout]) as cat:
            con = cat.con
            con.execute(f"SET memory_limit = '{args.build_memory}'")
            con.execute(f"SET temp_directory = '{folder / 'spill'}'")
            con.execute(f"ATTACH '{source}' AS src (READ_ONLY)")
            for table in ("releases", "saes", "features"):
                con.execute(f"INSERT INTO {table} SELECT * FROM src.{table}")
            if layout == "naive":
                con.execute("DROP TABLE cooccurrence")
            for statement in statements:
                con.execute(statement)
            con.execute("DETACH src")
            con.execute("CHECKPOINT")
        seconds[layout] = round(time.perf_counter() - started, 1)
    return {"step": "build", "features": args.features, "saes": saes, "total_pairs": sum(s["pairs"] for s in saes),
            "build_s": seconds, "file_gb": {k: round(p.stat().st_size / 2**30, 2) for k, p in paths.items()},
            "cooccurrence_mb": {k: table_mb(p) for k, p in paths.items()}, "peak_gb": round(peak_gb(), 2)}


# --------------------------------------------------------------------------- one query, timed


def lookup_features(args: argparse.Namespace) -> list[int]:
    return [int(f) for f in np.random.default_rng(args.seed).choice(args.features, args.lookups, replace=False)]


def run_query(args: argparse.Namespace) -> dict:
    """Cold then warm runs of one query on one layout, in this fresh process."""
    from catalog import Catalog

    mirrored = args.layout == "mirrored"
    features = lookup_features(args) if args.query == "partners" else [0]
    texts = [sql(args.query, 1, mirrored, f) for f in features]
    with Catalog.open(Path(args.dir) / f"{args.layout}.duckdb") as cat:
        settings = cat.con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchall()[0]
        cat.sql("SELECT 1")  # loads the sandbox's parser; touches no table
        cold, warm, results = None, [], []
        for rep in range(1 + args.repeats):
            for feature, text in zip(features, texts):
                started = time.perf_counter()
                result = cat.sql(text).arrow()
                seconds = time.perf_counter() - started
                if cold is None:
                    cold = seconds
                elif rep:
                    warm.append(seconds)
                if rep == args.repeats:
                    results.append(result if args.query != "partners" else
                                   result.append_column("lookup", pa.array([feature] * result.num_rows, pa.int32())))
    folder = Path(args.dir) / "results"
    folder.mkdir(exist_ok=True)
    handle, out = tempfile.mkstemp(dir=folder, prefix=f"{args.layout}-{args.query}-", suffix=".arrow")
    os.close(handle)
    with pa.ipc.new_file(out, results[0].schema) as sink:
        sink.write_table(pa.concat_tables(results))
    return {"layout": args.layout, "query": args.query, "cold_s": cold, "warm_s": warm, "rows": results[-1].num_rows,
            "memory_limit": settings[0], "threads": int(settings[1]), "peak_gb": round(peak_gb(), 3),
            "result": out}


# --------------------------------------------------------------------------- checks


def read(path: str) -> pa.Table:
    with pa.ipc.open_file(path) as source:
        return source.read_all()


def canonical(table: pa.Table) -> dict[str, np.ndarray]:
    """A result as columns sorted by its ids, as float64 (compared with a tolerance)."""
    keys = [c for c in ("lookup", "feature", "bin", "partner") if c in table.column_names]
    table = table.sort_by([(k, "ascending") for k in keys])
    return {name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            for name in table.column_names}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and np.allclose(a[k], b[k], rtol=1e-12, atol=1e-12,
                                                                                   equal_nan=True) for k in a)


def brute_force(args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
    """The three queries in numpy, from every block's features (--smoke keeps them all)."""
    from catalog import Catalog

    with Catalog.open(Path(args.dir) / "saecat.duckdb") as cat:
        rows = cat.con.execute("SELECT features FROM blocks WHERE sae = 1 ORDER BY block").fetchall()
    x = np.zeros((len(rows), args.features), dtype=np.float64)
    for b, (fired,) in enumerate(rows):
        x[b, fired] = 1.0
    n11 = x.T @ x
    n = np.diag(n11).copy()
    t = float(len(rows))
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = (n11 * (t - n[:, None] - n[None, :] + n11) - (n[:, None] - n11) * (n[None, :] - n11)) \
            / np.sqrt(n[:, None] * (t - n[:, None]) * n[None, :] * (t - n[None, :]))
    stored = (n11 > 0) & ~np.eye(args.features, dtype=bool) & np.isfinite(phi)
    top = {"feature": [], "partner": [], "phi": []}
    for f in range(args.features):
        partners = np.flatnonzero(stored[f])
        best = partners[np.lexsort((partners, -phi[f, partners]))][:K]
        top["feature"] += [f] * len(best)
        top["partner"] += best.tolist()
        top["phi"] += phi[f, best].tolist()
    lookups = {"partner": [], "n11": [], "phi": [], "lookup": []}
    for f in lookup_features(args):
        best = top["partner"][top["feature"].index(f):][:sum(1 for g in top["feature"] if g == f)]
        lookups["partner"] += best
        lookups["n11"] += n11[f, best].tolist()
        lookups["phi"] += phi[f, best].tolist()
        lookups["lookup"] += [f] * len(best)
    i, j = np.nonzero(np.triu(n11 > 0, 1))
    bins = np.floor(np.log2(n11[i, j])).astype(int)
    hist = {"bin": [], "pairs": [], "n11": [], "mean_phi": []}
    for b in np.unique(bins):
        sel = bins == b
        values = phi[i[sel], j[sel]]
        hist["bin"].append(b)
        hist["pairs"].append(sel.sum())
        hist["n11"].append(n11[i[sel], j[sel]].sum())
        hist["mean_phi"].append(values[np.isfinite(values)].mean() if np.isfinite(values).any() else np.nan)
    return {name: canonical(pa.table({k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}))
            for name, columns in (("top_partners", top), ("partners", lookups), ("histogram", hist))}


# --------------------------------------------------------------------------- driver


def step(args: argparse.Namespace, child: str, **options: str) -> dict:
    """One step in its own process (its peak memory its own); in-process for --smoke, which checks
    values, not time or memory, and must take seconds."""
    if args.smoke:
        return {"build": build, "query": run_query}[child](argparse.Namespace(**{**vars(args), **options}))
    flags = sum(([f"--{k}", v] for k, v in options.items()), [])
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--dir", args.dir, "--child", child, *flags],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=16384, help="width of every SAE")
    parser.add_argument("--blocks", type=int, default=4096, help="full blocks of the large SAE")
    parser.add_argument("--active", type=int, default=1500, help="mean features firing per block, large SAE")
    parser.add_argument("--others", type=int, default=3, help="further SAEs in the catalog")
    parser.add_argument("--other-blocks", type=int, default=1024)
    parser.add_argument("--other-active", type=int, default=500)
    parser.add_argument("--d", type=int, default=16, help="decoder width (no query here reads decoders)")
    parser.add_argument("--lookups", type=int, default=5, help="features looked up by the partners query")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per (layout, query): cold runs")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per process")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--queries", nargs="+", choices=QUERIES, default=list(QUERIES))
    parser.add_argument("--build-memory", default="6GB", help="DuckDB memory limit while copying the layouts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="folder of the three catalogs, built if missing (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every step, values checked: seconds")
    parser.add_argument("--child", choices=["build", "query"], help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--query", choices=QUERIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.child:
        print(json.dumps(build(args) if args.child == "build" else run_query(args)))
        return
    temporary = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="saecat-bench-sql-")
    try:
        if not (Path(args.dir) / "mirrored.duckdb").exists():
            print(json.dumps(step(args, "build")), flush=True)
        runs: dict[tuple[str, str], list[dict]] = {}
        for query in args.queries:
            for _ in range(args.processes):
                for layout in args.layouts:  # interleaved, so drifting load hits every layout alike
                    run = step(args, "query", layout=layout, query=query)
                    print(json.dumps(run), file=sys.stderr, flush=True)  # progress; the summary is on stdout
                    runs.setdefault((layout, query), []).append(run)
        results, summary = {}, {}
        for (layout, query), group in runs.items():
            results[layout, query] = canonical(read(group[0]["result"]))
            line = {"layout": layout, "query": query, "rows": group[0]["rows"],
                    "cold_s": round(statistics.median(g["cold_s"] for g in group), 4),
                    "warm_s": round(statistics.median(s for g in group for s in g["warm_s"]), 4),
                    "memory_limit": group[0]["memory_limit"], "threads": group[0]["threads"],
                    "peak_gb": max(g["peak_gb"] for g in group), "processes": len(group),
                    "warm_runs": sum(len(g["warm_s"]) for g in group),
                    "same_result_in_every_process": all(same(results[layout, query], canonical(read(g["result"])))
                                                        for g in group[1:]),
                    "loadavg": [round(x, 2) for x in os.getloadavg()]}
            summary[layout, query] = line
            print(json.dumps(line), flush=True)
        check: dict = {"step": "check"}
        for query in args.queries:
            base = results.get(("saecat", query))
            check[f"{query}_same_across_layouts"] = base is not None and all(
                same(base, results[layout, query]) for layout in args.layouts if (layout, query) in results)
        if args.smoke:
            expected = brute_force(args)
            for query in args.queries:
                check[f"{query}_equals_brute_force"] = same(expected[query], results["saecat", query])
                check[f"{query}_rows"] = int(len(expected[query]["phi" if "phi" in expected[query] else "bin"]))
        print(json.dumps(check), flush=True)
        ratios = {}
        for (layout, query), line in summary.items():
            if layout != "saecat" and ("saecat", query) in summary:
                for kind in ("cold_s", "warm_s"):
                    ratios[f"{query}_{kind[:-2]}_{layout}_over_saecat"] = round(
                        line[kind] / summary["saecat", query][kind], 2)
        print(json.dumps(ratios))
    finally:
        if temporary:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
