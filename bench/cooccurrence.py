"""Co-occurrence accumulation: saecat's tiled Gram counter against a per-block numpy baseline.

Both count n11 for every feature pair over the same synthetic block indicators (features drawn
with a Zipf-like popularity, `--active` distinct features per block, which is what a 256-token
block of a 16k SAE with L0 ~ 50 looks like). Each method runs in its own subprocess so its peak
memory (ru_maxrss, or CUDA's max allocated) is its own. Prints one JSON line per method.

    python bench/cooccurrence.py --features 16384 --blocks 512 --repeats 3
    python bench/cooccurrence.py --features 65536 --blocks 64 --only saecat   # memory at 65k
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def blocks(n_features: int, n_blocks: int, active: int, seed: int = 0) -> np.ndarray:
    """[n_blocks, active] sorted feature ids per block, Zipf-like popularity."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_features + 1) ** 0.8
    weights /= weights.sum()
    return np.stack([np.sort(rng.choice(n_features, active, replace=False, p=weights)) for _ in range(n_blocks)])


def run_saecat(ids: np.ndarray, n_features: int, device: str) -> tuple[float, int]:
    from ingest.accumulate import PairCounter

    rows = torch.zeros(len(ids), n_features, dtype=torch.bool)
    rows[torch.arange(len(ids))[:, None], torch.from_numpy(ids)] = True
    rows = rows.to(device)
    counter = PairCounter(n_features, device, flush_blocks=len(ids))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    counter.add(rows)
    counter.flush()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, int(counter.diagonal().sum())


def run_numpy(ids: np.ndarray, n_features: int, device: str) -> tuple[float, int]:
    """Baseline: one dense F x F int32 matrix, each block adding its outer product (np.ix_)."""
    counts = np.zeros((n_features, n_features), dtype=np.int32)
    start = time.perf_counter()
    for block in ids:
        counts[np.ix_(block, block)] += 1
    elapsed = time.perf_counter() - start
    return elapsed, int(np.trace(counts))


def child(args: argparse.Namespace) -> None:
    ids = blocks(args.features, args.blocks, args.active)
    method = {"saecat": run_saecat, "numpy": run_numpy}[args.child]
    times = []
    for _ in range(args.repeats):
        elapsed, check = method(ids, args.features, args.device)
        times.append(elapsed)
    assert check == ids.size, "diagonal must equal the number of (block, feature) firings"
    on_gpu = args.child == "saecat" and args.device.startswith("cuda")
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": args.child, "device": args.device if args.child == "saecat" else "cpu", "features": args.features,
                      "blocks": args.blocks, "active": args.active, "median_s": statistics.median(times),
                      "ms_per_block": 1e3 * statistics.median(times) / args.blocks, "peak_gb": peak / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--active", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["saecat", "numpy"])
    parser.add_argument("--child", choices=["saecat", "numpy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = {}
    for method in [args.only] if args.only else ["numpy", "saecat"]:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", method],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(out)
        results[method] = json.loads(out)
    if len(results) == 2:
        ratio = results["numpy"]["median_s"] / results["saecat"]["median_s"]
        print(json.dumps({"speedup_saecat_over_numpy": round(ratio, 2)}))


if __name__ == "__main__":
    main()
