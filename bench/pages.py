"""Server time of the browser pages (issue 21): the feature page at 16k features and with 1M
features in the catalog, against the JSON API's feature endpoint in the same run (the page makes
that call and more: labels, neighbours in the SAE and across the model's SAEs, explanations,
co-occurrence partners, lobes, then the template).

The catalogs are bench/synthetic.py's (built once, reused): 16k = one SAE of 16,384 features at
d_in 2,304 with 1M co-occurrence pairs; 1m = 43 SAEs of 24,576 features at d_in 768. Requests go
through the app in this process (Starlette's TestClient), one at a time, to random features of
the first SAE, after one warm-up request (which reads the FAISS indexes); server time is the
request's wall time here, with no network in it.

    python bench/pages.py --sizes 16k 1m [--requests 200]
    python bench/pages.py --smoke          # tests/test_bench.py
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic import SIZES, SMOKE, ensure  # noqa: E402


def timed(client, urls: list[str]) -> np.ndarray:
    times = []
    for url in urls:
        started = time.perf_counter()
        reply = client.get(url)
        times.append(time.perf_counter() - started)
        assert reply.status_code == 200, (url, reply.status_code, reply.text[:300])
    return np.array(times) * 1000


def measure(db: Path, requests: int) -> dict:
    from fastapi.testclient import TestClient

    from catalog import Catalog
    from queries.front.server import create_app

    with Catalog.open(db) as cat:
        sae, release, sae_id, d_sae = cat.con.execute(
            "SELECT sae, release, sae_id, d_sae FROM saes ORDER BY sae LIMIT 1").fetchone()
        n_features = cat.con.execute("SELECT count(*) FROM features").fetchone()[0]
    features = np.random.default_rng(0).integers(0, d_sae, requests).tolist()
    client = TestClient(create_app(db))
    page = [f"/ui/feature?{urlencode({'release': release, 'sae_id': sae_id, 'feature': f})}" for f in features]
    api = [f"/features/{sae}/{f}" for f in features]
    warm = timed(client, page[:1])[0]
    figures = {}
    for name, urls in (("api", api), ("page", page)):
        ms = timed(client, urls)
        figures[name] = {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1)}
    sae_page = timed(client, [f"/ui/sae?{urlencode({'release': release, 'sae_id': sae_id})}"] * 20)
    home = timed(client, ["/ui/"] * 20)
    return {"features_in_catalog": n_features, "sae_width": d_sae, "requests": requests,
            "first_page_ms": round(float(warm), 1), **{f"{k}_{m}": v for k, d in figures.items() for m, v in d.items()},
            "page_over_api_p50": round(figures["page"]["p50_ms"] / figures["api"]["p50_ms"], 1),
            "sae_page_p50_ms": round(float(np.percentile(sae_page, 50)), 1),
            "home_p50_ms": round(float(np.percentile(home, 50)), 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["16k", "1m"], choices=sorted(SIZES))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/saecat-bench"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="saecat-pages-") as tmp:
        folder = Path(tmp) if args.smoke else args.folder  # the real catalogs are kept for the next run
        folder.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            db = folder / f"synthetic-{size}.duckdb"
            ensure(db, (SMOKE if args.smoke else SIZES)[size], lambda line: print(line, file=sys.stderr, flush=True))
            print(json.dumps({"size": size, **measure(db, 20 if args.smoke else args.requests)}), flush=True)


if __name__ == "__main__":
    main()
