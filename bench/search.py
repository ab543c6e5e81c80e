"""Searching explanations by meaning (issue 19): embedding throughput and search latency.

  embed   saecat's embedder (all-MiniLM-L6-v2, catalog.explanation_index.Embedder) over distinct
          explanation-like phrases, batch as saecat batches: texts per second.
  search  a catalog of N explanations, written as `saecat explain` writes them (one SAE, one row a
          feature, texts drawn from a pool of distinct phrases: the index embeds each distinct
          text once, so the pool, not N, sets the embedding time), then, in one process as the
          server runs: the first search (which builds the index: its time and the peak memory),
          a search in a fresh process (which reads the index back), and N_QUERIES searches through
          `queries.search.search` with the catalog opened per query as the server opens it: p50 and
          p95 latency.

    python bench/search.py --sizes 16384 1048576
    python bench/search.py --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WHAT = ["the word", "closing", "opening", "numbers in", "names of", "punctuation in", "the keyword", "quotes around",
        "indentation in", "comments in", "digits of", "the end of", "the start of", "arguments of", "errors in",
        "dates in", "units after", "operators in", "brackets in", "paths in"]
THING = ["function calls", "class definitions", "import lines", "docstrings", "email headers", "JSON keys",
         "URLs", "version strings", "test names", "loops", "conditions", "return values", "sentences", "lists",
         "dictionaries", "file names", "exceptions", "decorators", "type hints", "format strings", "regular expressions",
         "SQL queries", "HTML tags", "log messages", "command-line flags"]
WHERE = ["in Python code", "in prose", "in the standard library", "after a colon", "before a newline",
         "inside parentheses", "at the start of a line", "in English text", "in configuration files", "in comments"]
QUERIES = ["python code", "punctuation", "numbers", "closing brackets", "email", "error handling", "dates",
           "variable names", "the end of a sentence", "imports"]


def phrases(n: int) -> list[str]:
    """n distinct explanation-like phrases (up to 5,000), in a fixed order."""
    pool = [f"{a} {b} {c}" for a, b, c in itertools.product(WHAT, THING, WHERE)]
    return [pool[i] for i in np.random.default_rng(0).permutation(len(pool))[:n]]


def embed(n: int) -> dict:
    from catalog.explanation_index import Embedder

    texts = phrases(n)
    model = Embedder.get()
    model.encode(texts[:64])  # warm
    started = time.perf_counter()
    vectors = model.encode(texts)
    seconds = time.perf_counter() - started
    return {"texts": n, "seconds": round(seconds, 2), "texts_per_s": round(n / seconds, 1), "dim": vectors.shape[1]}


def make_catalog(db: Path, n: int, distinct: int) -> None:
    from catalog.store import writer

    texts = phrases(distinct)
    rows = pa.table({"sae": pa.array(np.ones(n, np.int32)), "feature": pa.array(np.arange(n, dtype=np.int32)),
                     "explainer": pa.array(["bench"] * n), "method": pa.array(["token-act-pair/1"] * n),
                     "explanation": pa.array([texts[i % distinct] for i in range(n)]),
                     "score": pa.array(np.random.default_rng(1).random(n))})
    with writer(db) as cat, cat.transaction() as con:
        con.execute("INSERT INTO saes (release, sae_id, status, n_tokens) VALUES ('bench', 'explanations', "
                    "'registered', 1000000)")
        con.register("bench_rows", rows)
        con.execute("INSERT INTO feature_explanations (sae, feature, explainer, method, explanation, score) "
                    "SELECT sae, feature, explainer, method, explanation, score FROM bench_rows")


def search_child(db: str, queries: int) -> dict:
    """In a process of its own: first search (builds or reads the index), then timed ones."""
    from catalog import Catalog
    from queries.search import search

    def one(query: str) -> float:
        started = time.perf_counter()
        with Catalog.open(db) as cat:
            hits = search(cat, query, k=10)
        assert len(hits) == 10
        return time.perf_counter() - started

    first = one(QUERIES[0])
    times = [one(QUERIES[i % len(QUERIES)]) for i in range(queries)]
    return {"first_s": round(first, 2), "p50_ms": round(1000 * statistics.median(times), 1),
            "p95_ms": round(1000 * float(np.percentile(times, 95)), 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def in_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 1048576])
    parser.add_argument("--distinct", type=int, default=5000, help="distinct texts among the explanations")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--embed", type=int, default=5000, help="texts for the embedding throughput")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: that it runs")
    parser.add_argument("--child", nargs=2, metavar=("DB", "QUERIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(search_child(args.child[0], int(args.child[1]))))
        return
    if args.smoke:
        args.sizes, args.distinct, args.queries, args.embed = [300], 100, 5, 100
    print(json.dumps({"embed": embed(args.embed)}), flush=True)
    with tempfile.TemporaryDirectory(prefix="saecat-search-") as tmp:
        for n in args.sizes:
            db = Path(tmp) / f"search-{n}.duckdb"
            make_catalog(db, n, min(args.distinct, n))
            built = in_child(str(db), str(args.queries))  # builds the index, then searches
            reread = in_child(str(db), str(args.queries))  # reads it back, then searches
            print(json.dumps({"explanations": n, "distinct_texts": min(args.distinct, n), "build": built,
                              "fresh_process": reread}), flush=True)


if __name__ == "__main__":
    main()
