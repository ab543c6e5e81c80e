"""Catalog scale: the whole sae-lens registry registered, and a synthetic catalog of 1M features.

registry   `ingest.sync.sync()` of the registry sae-lens ships (170 releases, 13,857 SAEs in
           sae-lens 6.54.12) into a fresh catalog: wall time (median over --repeats fresh
           catalogs; reading the YAML timed on its own too), a second sync with nothing changed,
           file size; then what `saecat releases` and `saes --registered` print, by calling the
           CLI's own functions (queries.front.cli.releases / .saes with --json; each opens the catalog).
synthetic  the 1M-feature catalog of bench/synthetic.py (43 SAEs x 24,576 at d_in 768, each
           committed by saecat's writer().commit_sae(); exact FAISS indexes built through
           saecat): file size, write time per SAE and in all, index build time and size on disk
           (from the build, which `--db` reuses); then typical queries through Catalog.sql (the
           `saecat sql` path, sandbox check included):
             feature_row    one feature's row of labelled_features
             top_fire       the top 100 features by fire_count across the catalog
             density_range  one SAE's features with density in [1e-4, 1e-3], with their top tokens
             pair_count     count of one SAE's co-occurrence rows
Cold = a fresh process: opening the catalog plus the first run (saecat's imports timed apart),
median over --repeats processes (the OS page cache stays warm: dropping it would hurt everyone
else on the machine). Warm = the same open catalog, median of --runs runs after one unmeasured run.

    python bench/catalog_scale.py --db /tmp/saecat-bench/synthetic-1m.duckdb   # reuses or builds it there
    python bench/catalog_scale.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
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
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import SIZES, SMOKE, release_name  # noqa: E402

STEPS = ("registry", "synthetic")
# A few releases in the packaged registry's format, for --smoke (the real one takes ~10 s to read).
SMOKE_REGISTRY = """
gpt2-small-res-jb:
  model: gpt2-small
  repo_id: jbloom/GPT2-Small-SAEs-Reformatted
  conversion_func: null
  saes:
""" + "".join(f"""  - id: blocks.{n}.hook_resid_pre
    path: blocks.{n}.hook_resid_pre
    l0: {10 + n}
    variance_explained: 0.9
""" for n in range(12)) + """
pythia-70m-deduped-res-sm:
  model: pythia-70m-deduped
  repo_id: ctigges/pythia-70m-deduped__res-sm
  saes:
  - id: blocks.0.hook_resid_post
    path: 0-res-sm
"""


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def size_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**30, 4)


# --------------------------------------------------------------------------- the queries


def cli_call(command: Callable, **options) -> list:
    """A saecat CLI command's Python function with --json, its printed rows parsed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        command(as_json=True, **options)
    return json.loads(buffer.getvalue())


def registry_queries(db: Path) -> dict[str, Callable[[], int]]:
    """Each runs one CLI listing over the registry catalog and returns its row count."""
    from queries.front import cli

    return {"releases": lambda: len(cli_call(cli.releases, db=db)),
            "saes_registered": lambda: len(cli_call(cli.saes, registered=True, db=db))}


def synthetic_sql(cat, smoke: bool) -> dict[str, str]:
    spec = (SMOKE if smoke else SIZES)["1m"]
    sae = cat.con.execute("SELECT sae FROM saes WHERE release = ? AND layer = ?",
                          [release_name(spec), spec.n_saes // 2]).fetchall()[0][0]
    feature = spec.width // 3
    return {"feature_row": f"SELECT * FROM labelled_features WHERE sae = {sae} AND feature = {feature}",
            "top_fire": "SELECT sae, feature, fire_count FROM features ORDER BY fire_count DESC, sae, feature LIMIT 100",
            "density_range": "SELECT feature, density, top_tokens FROM labelled_features "
                             f"WHERE sae = {sae} AND density BETWEEN 1e-4 AND 1e-3 ORDER BY feature",
            "pair_count": f"SELECT count(*) AS n FROM cooccurrence WHERE sae = {sae}"}


def open_queries(step: str, db: Path, smoke: bool) -> tuple[dict[str, Callable[[], int]], Callable[[], None]]:
    """(query name -> a call returning its row count, close). The registry's CLI calls open the
    catalog themselves; the SQL queries share one read-only catalog, opened here."""
    if step == "registry":
        return registry_queries(db), lambda: None
    from catalog import Catalog

    cat = Catalog.open(db)
    return ({name: (lambda q=q: cat.sql(q).table.num_rows) for name, q in synthetic_sql(cat, smoke).items()},
            cat.close)


# --------------------------------------------------------------------------- children


def run_cold(args: argparse.Namespace) -> dict:
    """A fresh process: saecat imported, the catalog opened and the named query run once. (The
    registry's CLI calls open the catalog inside the call: their open_ms is 0.)"""
    started = time.perf_counter()
    for module in ("catalog", "queries.front.cli"):
        importlib.import_module(module)

    imported = time.perf_counter()
    queries, close = open_queries(args.step, args.db, args.smoke)
    opened = time.perf_counter()
    rows = queries[args.query]()
    done = time.perf_counter()
    close()
    return {"import_ms": ms(imported - started), "open_ms": ms(opened - imported), "first_run_ms": ms(done - opened),
            "cold_ms": ms(done - imported), "rows": rows}


def run_warm(args: argparse.Namespace) -> dict:
    queries, close = open_queries(args.step, args.db, args.smoke)
    out = {}
    for name, query in queries.items():
        rows = query()
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            query()
            times.append(time.perf_counter() - started)
        out[name] = {"warm_ms": ms(statistics.median(times)), "rows": rows}
    close()
    return out


def run_sync(args: argparse.Namespace) -> dict:
    """Fresh catalogs, one sync each (median time), then a second sync of the last one."""
    started = time.perf_counter()
    from ingest.registry import read_registry
    from ingest.sync import sync

    import_s = time.perf_counter() - started
    read_s, sync_s = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        found = read_registry(args.registry)
        read_s.append(time.perf_counter() - started)
        shutil.rmtree(args.db.parent / (args.db.name + ".d"), ignore_errors=True)
        args.db.unlink(missing_ok=True)
        started = time.perf_counter()
        report = sync(args.db, args.registry, progress=False)
        sync_s.append(time.perf_counter() - started)
    started = time.perf_counter()
    again = sync(args.db, args.registry, progress=False)
    resync_s = time.perf_counter() - started
    return {"source": found.source, "releases": len(found.releases), "saes": found.n_saes,
            "added": report.counts(), "changes_on_resync": again.counts(),
            "import_s": round(import_s, 2), "read_registry_s": round(statistics.median(read_s), 3),
            "sync_s": round(statistics.median(sync_s), 3), "sync_s_all": [round(s, 3) for s in sync_s],
            "resync_s": round(resync_s, 3), "db_gb": size_gb(args.db)}


def run_inventory(args: argparse.Namespace) -> dict:
    """What the synthetic catalog holds, for the report and the smoke test's checks."""
    from catalog import Catalog

    with Catalog.open(args.db) as cat:
        tables = {t: cat.con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                  for t in ("saes", "features", "cooccurrence", "feature_tokens", "feature_examples")}
        top = cat.con.execute("SELECT fire_count FROM features ORDER BY fire_count DESC LIMIT 100").fetchall()
        queries = synthetic_sql(cat, args.smoke)
        results = {name: cat.sql(q).table for name, q in queries.items()}
        # The same answers by another route, for the smoke test: pyarrow over the whole table.
        import pyarrow.compute as pc

        fires = cat.con.sql("SELECT fire_count FROM features").to_arrow_table().column(0)
        brute_top = sorted(fires.to_pylist(), reverse=True)[:100]
    return {"rows": tables, "top_fire_counts_equal_brute_force":
            [r[0] for r in top] == brute_top == results["top_fire"].column("fire_count").to_pylist(),
            "max_fire_count": int(pc.max(fires).as_py()), "pair_count": results["pair_count"].column(0)[0].as_py(),
            "feature_row_rows": results["feature_row"].num_rows, "density_range_rows": results["density_range"].num_rows}


# --------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    run = {"cold": run_cold, "warm": run_warm, "sync": run_sync, "inventory": run_inventory}[args.child]
    before = load()
    result = run(args)
    print(json.dumps({"step": args.step, "child": args.child, **({"query": args.query} if args.query else {}),
                      **result, "peak_gb": round(peak_gb(), 2), "load_avg_1min": [before, load()]}))


def json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def spawn(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--db", str(args.db), "--repeats", str(args.repeats), "--runs", str(args.runs),
           *(["--registry", args.registry] if args.registry else []), *(["--smoke"] if args.smoke else []), *extra]
    return json_line(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def measure_queries(args: argparse.Namespace, step: str, names: list[str]) -> dict:
    """Cold (median over fresh processes) and warm figures per query, printed and returned."""
    cold = {n: [spawn(args, "--child", "cold", "--step", step, "--query", n) for _ in range(args.repeats)]
            for n in names}
    warm = spawn(args, "--child", "warm", "--step", step)
    summary = {"step": step, "queries": {}, "load_avg_1min": warm["load_avg_1min"]}
    for n in names:
        summary["queries"][n] = {
            "cold_ms": statistics.median(c["cold_ms"] for c in cold[n]),
            "open_ms": statistics.median(c["open_ms"] for c in cold[n]),
            "import_ms": statistics.median(c["import_ms"] for c in cold[n]),
            "warm_ms": warm[n]["warm_ms"], "rows": warm[n]["rows"]}
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--db", type=Path, help="the 1M synthetic catalog: reused if built there, else built and "
                                                "kept (default: a temporary one, removed after)")
    parser.add_argument("--registry", help="registry YAML (default: the one sae-lens ships)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh catalogs per sync; fresh processes per cold query")
    parser.add_argument("--runs", type=int, default=10, help="warm runs per query")
    parser.add_argument("--smoke", action="store_true", help="a tiny registry and catalog: seconds")
    parser.add_argument("--child", choices=["cold", "warm", "sync", "inventory"], help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--query", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.smoke:
        args.repeats, args.runs = 1, 2
    folder = Path(tempfile.mkdtemp(prefix="saecat-bench-catalog-"))
    synthetic_db = args.db or folder / "synthetic-1m.duckdb"
    try:
        if "registry" in args.only:
            if args.smoke and not args.registry:
                args.registry = str(folder / "registry.yaml")
                Path(args.registry).write_text(SMOKE_REGISTRY)
            args.db = folder / "registry.duckdb"
            print(json.dumps(spawn(args, "--child", "sync", "--step", "registry")), flush=True)
            measure_queries(args, "registry", ["releases", "saes_registered"])
        if "synthetic" in args.only:
            args.db = synthetic_db
            built = json_line(subprocess.run(
                [sys.executable, str(Path(__file__).parent / "synthetic.py"), "--size", "1m", "--db", str(args.db),
                 *(["--smoke"] if args.smoke else [])], check=True, capture_output=True, text=True).stdout)
            per_sae = built.pop("writer_s_per_sae")
            del built["step"]
            built.update(writer_s_min=min(per_sae), writer_s_max=max(per_sae),
                         db_gb_now=size_gb(args.db), index_gb_now=size_gb(args.db.parent / (args.db.name + ".d")))
            print(json.dumps({"step": "synthetic", "child": "build", **built}), flush=True)
            print(json.dumps(spawn(args, "--child", "inventory", "--step", "synthetic")), flush=True)
            measure_queries(args, "synthetic", ["feature_row", "top_fire", "density_range", "pair_count"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
