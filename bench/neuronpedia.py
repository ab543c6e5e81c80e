"""Importing a Neuronpedia source: throughput (activation rows a second) and peak memory.

A synthetic source laid out as SAEDashboard's converter writes one (producer B: one features and
one activations file per 128 features, gzip level 5; ../shared/docs/neuronpedia-format.md):
--features features, each with --windows activation windows of --tokens tokens (values rounded to
5 decimals as SAEDashboard rounds them, most of them 0, token strings from a 5,000-piece
vocabulary) and one explanation. It is written once into --cache and reused.

Two measurements, each in a fresh process (peak = its ru_maxrss):
- baseline: reading every line of every file with Python's gzip and json.loads, storing nothing
  (the least any importer written in Python does);
- saecat: `import_neuronpedia` into an empty catalog, then the same again (a re-import: every
  file staged anew, every row replaced).

    python bench/neuronpedia.py                        # 16,384 features x 45 windows x 128 tokens
    python bench/neuronpedia.py --smoke                # tiny, for tests/test_bench_neuronpedia.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PER_FILE = 128


def write_source(folder: Path, features: int, windows: int, tokens: int, seed: int = 0) -> None:
    """The synthetic source (see the module's docstring), written batch by batch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = [f" tok{i}" for i in range(5000)]
    ids = {"modelId": "bench-model", "layer": "6-res-bench"}
    (folder / "features").mkdir(parents=True)
    (folder / "activations").mkdir()
    (folder / "explanations").mkdir()
    (folder / "source.jsonl").write_text(json.dumps({"id": "6-res-bench", "modelId": "bench-model",
                                                     "setName": "res-bench"}) + "\n")
    for batch, start in enumerate(range(0, features, PER_FILE)):
        stop = min(start + PER_FILE, features)
        acts, feats, expl = [], [], []
        for f in range(start, stop):
            values = np.round(np.where(rng.random((windows, tokens)) < 0.1, rng.random((windows, tokens)) * 10, 0), 5)
            words = rng.integers(0, len(vocab), (windows, tokens))
            for w in range(windows):
                row = values[w].tolist()
                top = int(np.argmax(values[w]))
                acts.append(json.dumps({"id": f"c{f:08d}{w:04d}bench00000", **ids, "index": f,
                                        "tokens": [vocab[t] for t in words[w]], "values": row,
                                        "maxValue": row[top], "minValue": min(row), "maxValueTokenIndex": top,
                                        "binMin": -1, "binMax": float(values.max()), "binContains": -1},
                                       separators=(",", ":")))
            feats.append(json.dumps({**ids, "index": f, "maxActApprox": float(values.max()),
                                     "frac_nonzero": float(rng.random() * 0.01), "pos_str": [" a", " b"],
                                     "pos_values": [1.5, 1.25], "neg_str": [" c"], "neg_values": [-2.0]}))
            expl.append(json.dumps({"id": f"e{f:08d}bench000000000", **ids, "index": str(f),
                                    "description": f"feature {f}", "typeName": "oai_token-act-pair",
                                    "explanationModelName": "gpt-4o-mini"}))
        for kind, lines in (("features", feats), ("activations", acts), ("explanations", expl)):
            with gzip.open(folder / kind / f"batch-{batch}.jsonl.gz", "wt", compresslevel=5) as out:
                out.write("\n".join(lines) + "\n")


def baseline(folder: Path) -> dict:
    rows = 0
    for path in sorted(folder.glob("*/*.jsonl.gz")):
        with gzip.open(path, "rt") as lines:
            for line in lines:
                json.loads(line)
                rows += 1
    return {"rows": rows}


def saecat(folder: Path, db: Path) -> dict:
    from ingest.neuronpedia import import_neuronpedia

    times = []
    for _ in range(2):
        start = time.perf_counter()
        [done] = import_neuronpedia(folder, db)
        times.append(time.perf_counter() - start)
    return {"import_s": round(times[0], 2), "reimport_s": round(times[1], 2), "activations": done.n_activations,
            "features": done.n_features, "explanations": done.n_explanations,
            "catalog_mb": round(db.stat().st_size / 2**20, 1)}


def child(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    result = baseline(args.folder) if args.child == "baseline" else saecat(args.folder, args.db)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--windows", type=int, default=45)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "saecat-bench-neuronpedia")
    parser.add_argument("--smoke", action="store_true", help="300 features x 4 windows x 16 tokens")
    parser.add_argument("--child", choices=["baseline", "saecat"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.smoke:
        args.features, args.windows, args.tokens = 300, 4, 16
    folder = args.cache / f"{args.features}x{args.windows}x{args.tokens}" / "bench-model" / "6-res-bench"
    if not (folder / "source.jsonl").exists():
        start = time.perf_counter()
        write_source(folder, args.features, args.windows, args.tokens)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    size = sum(p.stat().st_size for p in folder.rglob("*.gz"))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("baseline", "saecat"):
            out = subprocess.run([sys.executable, __file__, "--child", name, "--folder", str(folder),
                                  "--db", str(Path(tmp) / "catalog.duckdb")], check=True, capture_output=True,
                                 text=True).stdout
            runs[name] = json.loads(out.strip().splitlines()[-1])
    rows = runs["saecat"]["activations"]
    print(json.dumps({"features": args.features, "windows": args.windows, "tokens": args.tokens,
                      "gzipped_mb": round(size / 2**20, 1), **{f"{k}_{n}": v for n, r in runs.items()
                                                               for k, v in r.items()},
                      "activation_rows_per_s": round(rows / runs["saecat"]["import_s"]),
                      "vs_baseline": round(runs["saecat"]["import_s"] / runs["baseline"]["seconds"], 2)}))


if __name__ == "__main__":
    main()
