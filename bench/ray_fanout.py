"""Ingestion fanned out on Ray: wall time of one whole `ingest()` with 1, 2, ... Ray workers
against the same ingestion on one machine, in the same run.

Every run ingests the same stream into a fresh temporary catalog with the same options (the
demo SAE and model by default). The baseline runs in this process with torch on one thread,
which is what each Ray task gets (one CPU); each Ray configuration starts a local cluster of
that many CPUs (`ray.init(num_cpus=N)`) and counts with `--ray`. The runs alternate over the
repeats, so drift in the machine's load touches all of them; speed-up = median baseline time /
median Ray time. Times include loading (the driver's model, and each worker's SAE and model the
first time it runs a task), tokenising, the merge and the commit: what a user waits for.

    python bench/ray_fanout.py --tokens 16384 --workers 1 2 --repeats 2
    python bench/ray_fanout.py --device cuda --workers 1 2 4 8 ...   # on a GPU machine: one GPU per worker

`--smoke` (with --model/--sae/--dataset of the test fixtures) runs a few hundred tokens once and
checks that every configuration wrote the same features and pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog import Catalog  # noqa: E402
from ingest import IngestOptions, ingest, resolve_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace, folder: Path, name: str, ray: str | None) -> dict:
    db = folder / f"{name}.duckdb"
    opts = IngestOptions(dataset=args.dataset, model=args.model, max_tokens=args.tokens,
                         max_doc_tokens=args.max_doc_tokens, block_size=args.block_size, device=args.device,
                         batch_tokens=args.batch_tokens, shard_batches=args.shard_batches,
                         ray_task_shards=args.task_shards, group_column=args.group_column, progress=False, ray=ray)
    started = time.perf_counter()
    result = ingest(resolve_source(None, None, args.sae), opts, db=db, force=True)
    seconds = time.perf_counter() - started
    with Catalog.open(db) as cat:
        digest = cat.con.execute("SELECT sum(fire_count), sum(block_count), count(*) FROM features").fetchone()
        pairs = cat.con.execute("SELECT count(*), sum(n11) FROM cooccurrence").fetchone()
    db.unlink()
    return {"seconds": seconds, "tokens": result.n_tokens, "features": list(digest), "pairs": list(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", default=str(ROOT / "demo" / "sae"), help="a local sae-lens folder")
    parser.add_argument("--model", help="model path or name (default: the demo's Gemma 3 270M GGUF)")
    parser.add_argument("--dataset", default=str(ROOT / "demo" / "build" / "stdlib.jsonl"))
    parser.add_argument("--group-column", default="kind")
    parser.add_argument("--tokens", type=int, default=16384, help="counted tokens per ingestion")
    parser.add_argument("--max-doc-tokens", type=int, default=257)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=2048, help="small, so a short stream has many batches")
    parser.add_argument("--shard-batches", type=int, default=1)
    parser.add_argument("--task-shards", type=int, default=2, help="shards per Ray task")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="one repeat, results compared")
    args = parser.parse_args()
    if args.model is None:
        from demo.gemma import gguf_path

        args.model = str(gguf_path())
    if args.smoke:
        args.repeats = 1
    import ray

    torch.set_num_threads(1)  # the baseline does what one Ray task does: one CPU
    times: dict[str, list[float]] = {}
    digests: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="saecat-bench-ray-") as tmp:
        for repeat in range(args.repeats):
            for workers in [0, *args.workers]:
                name = "one machine" if workers == 0 else f"ray x{workers}"
                if workers:
                    ray.init(num_cpus=workers, num_gpus=workers if args.device.startswith("cuda") else 0,
                             include_dashboard=False, log_to_driver=False, configure_logging=False)
                try:
                    out = run(args, Path(tmp), name.replace(" ", "_"), "auto" if workers else None)
                finally:
                    if workers:
                        ray.shutdown()
                times.setdefault(name, []).append(out["seconds"])
                digests[name] = (out["tokens"], out["features"], out["pairs"])
                print(json.dumps({"step": "run", "repeat": repeat, "config": name, **out,
                                  "load_average": round(os.getloadavg()[0], 2)}), flush=True)
    base = statistics.median(times["one machine"])
    summary = {name: {"median_s": round(statistics.median(t), 2), "speedup": round(base / statistics.median(t), 3)}
               for name, t in times.items()}
    print(json.dumps({"step": "summary", "tokens": args.tokens, "repeats": args.repeats, "configs": summary,
                      "same_results": len(set(map(json.dumps, digests.values()))) == 1,
                      "driver_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
