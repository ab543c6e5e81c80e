"""Co-occurrence accumulation: saecat's tiled Gram counter against two straightforward baselines.

Every method counts n11 for every feature pair over the same synthetic block indicators
(features drawn with a Zipf-like popularity, `--active` distinct features per block, which is
what a 256-token block of a 16k SAE with L0 ~ 50 looks like):

- saecat: ingest.accumulate.PairCounter (float32 upper-triangle tiles of the Gram matrix, one
  addmm_ per tile per flush of `--flush` buffered blocks), fed bool block rows;
- numpy: one dense F x F int32 matrix, each block adding its outer product with np.ix_ (on the
  first `--numpy-blocks` blocks if given: its cost per block is constant, ~40 ms at 16k);
- python: each block's active features as a sorted list, every pair i < j counted in a
  collections.Counter (itertools.combinations). Its dict grows to every pair seen, so it runs on
  the first `--python-blocks` blocks only, and is reported per block.

Each method runs in its own subprocess so its peak memory (ru_maxrss, or CUDA's max allocated,
read right after counting) is its own. Each checks its diagonal (blocks per feature) against the
firings, then counts the first `--check-blocks` blocks again, untimed, and hashes its whole
table (every i < j with n11 > 0, with n11): the parent checks that all methods' tables agree.
Prints one JSON line per method, then the speed-ups.

    python bench/cooccurrence.py --features 16384 --blocks 2048 --active 1500 --repeats 3
    python bench/cooccurrence.py --features 65536 --blocks 1024 --active 3000 --methods saecat python
    python bench/cooccurrence.py --smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("numpy", "saecat", "python")
Table = tuple[np.ndarray, np.ndarray, np.ndarray]  # i, j, n11 for every i < j with n11 > 0, sorted by (i, j)


@dataclass
class Count:
    seconds: float
    diagonal: np.ndarray  # blocks each feature fired in
    table: Callable[[], Table]  # extracted only when checked, after peak memory is read


def blocks(n_features: int, n_blocks: int, active: int, seed: int = 0) -> np.ndarray:
    """[n_blocks, active] sorted feature ids per block, Zipf-like popularity; any prefix of the
    blocks is the same for every n_blocks."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_features + 1) ** 0.8
    weights /= weights.sum()
    return np.stack([np.sort(rng.choice(n_features, active, replace=False, p=weights)) for _ in range(n_blocks)])


def run_saecat(ids: np.ndarray, args: argparse.Namespace) -> Count:
    import torch  # here only: importing ingest pulls in sae-lens and transformer-lens, seconds of startup

    from ingest.accumulate import PairCounter

    rows = torch.zeros(len(ids), args.features, dtype=torch.bool)
    rows[torch.arange(len(ids))[:, None], torch.from_numpy(ids)] = True
    rows = rows.to(args.device)
    counter = PairCounter(args.features, args.device, tile=args.tile, flush_blocks=args.flush)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    sync()
    start = time.perf_counter()
    for first in range(0, len(rows), args.batch):  # batches as an ingestion hands them over
        counter.add(rows[first:first + args.batch])
    counter.flush()
    sync()
    seconds = time.perf_counter() - start

    def table() -> Table:
        pairs = counter.pairs()
        return pairs.i, pairs.j, pairs.n11

    return Count(seconds, counter.diagonal().cpu().numpy(), table)


def run_numpy(ids: np.ndarray, args: argparse.Namespace) -> Count:
    counts = np.zeros((args.features, args.features), dtype=np.int32)
    start = time.perf_counter()
    for block in ids:
        counts[np.ix_(block, block)] += 1
    seconds = time.perf_counter() - start

    def table() -> Table:
        parts = []
        for top in range(0, args.features, 1024):  # row bands: no second F x F matrix
            i, j = np.nonzero(np.triu(counts[top:top + 1024], k=top + 1))
            parts.append((i + top, j, counts[i + top, j]))
        return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]

    return Count(seconds, counts.diagonal().copy(), table)


def run_python(ids: np.ndarray, args: argparse.Namespace) -> Count:
    lists = [block.tolist() for block in ids]  # its natural input: each block's features, sorted
    pairs: Counter[tuple[int, int]] = Counter()
    singles: Counter[int] = Counter()
    start = time.perf_counter()
    for block in lists:
        singles.update(block)
        pairs.update(combinations(block, 2))
    seconds = time.perf_counter() - start
    diagonal = np.zeros(args.features, dtype=np.int64)
    diagonal[list(singles)] = list(singles.values())

    def table() -> Table:
        ij = np.fromiter(pairs, dtype=np.dtype((np.int64, 2)), count=len(pairs))
        n11 = np.fromiter(pairs.values(), dtype=np.int64, count=len(pairs))
        order = np.lexsort((ij[:, 1], ij[:, 0]))
        return ij[order, 0], ij[order, 1], n11[order]

    return Count(seconds, diagonal, table)


RUNNERS: dict[str, Callable[[np.ndarray, argparse.Namespace], Count]] = {
    "saecat": run_saecat, "numpy": run_numpy, "python": run_python}


def digest(table: Table) -> tuple[str, int]:
    """sha256 of the table as int64 (i, j, n11) columns, and its number of pairs."""
    h = hashlib.sha256()
    for column in table:
        h.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
    return h.hexdigest(), len(table[0])


def saecat_settings(args: argparse.Namespace) -> dict:
    """Pins torch's threads and fills in PairCounter's defaults where not given."""
    import torch

    from ingest.accumulate import FLUSH_BLOCKS, TILE

    if args.threads:
        torch.set_num_threads(args.threads)
    args.tile, args.flush = args.tile or TILE, args.flush or FLUSH_BLOCKS
    return {"threads": torch.get_num_threads(), "tile": min(args.tile, args.features), "flush": args.flush}


def child(args: argparse.Namespace) -> dict:
    settings = saecat_settings(args) if args.child == "saecat" else {}  # the baselines are single-threaded
    n_blocks = {"python": args.python_blocks, "numpy": args.numpy_blocks or args.blocks}.get(args.child, args.blocks)
    ids = blocks(args.features, max(n_blocks, args.check_blocks), args.active)
    run = RUNNERS[args.child]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # interpreter, imports, the blocks
    times = []
    for _ in range(args.repeats):
        count = run(ids[:n_blocks], args)
        times.append(count.seconds)
        expected = np.bincount(ids[:n_blocks].ravel(), minlength=args.features)
        assert np.array_equal(count.diagonal, expected), "diagonal must equal each feature's firings"
        del count  # the next repeat starts from nothing
    if args.child == "saecat" and args.device.startswith("cuda"):
        import torch

        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load = os.getloadavg()[0]  # other work on the machine while this ran
    check, n_pairs = digest(run(ids[:args.check_blocks], args).table())
    median = statistics.median(times)
    return {
        "method": args.child, "device": args.device if args.child == "saecat" else "cpu", **settings,
        "features": args.features, "blocks": n_blocks, "active": args.active,
        "repeats": args.repeats, "seconds": [round(t, 4) for t in times], "median_s": round(median, 4),
        "ms_per_block": round(1e3 * median / n_blocks, 4), "peak_gb": round(peak / 2**30, 3),
        "rss_before_gb": round(before / 2**30, 3),
        "load_average": round(load, 2), "check_blocks": args.check_blocks, "check_pairs": n_pairs,
        "check_sha256": check,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--blocks", type=int, default=2048, help="blocks counted by saecat and numpy")
    parser.add_argument("--python-blocks", type=int, default=16, help="blocks counted by the Counter baseline")
    parser.add_argument("--numpy-blocks", type=int, default=0,
                        help="blocks counted by the numpy baseline (0: --blocks); it is reported per block too")
    parser.add_argument("--check-blocks", type=int, default=16, help="blocks whose whole table every method checks")
    parser.add_argument("--active", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=0, help="saecat's tile width (0: ingest.accumulate.TILE)")
    parser.add_argument("--flush", type=int, default=0,
                        help="saecat's blocks per flush (0: ingest.accumulate.FLUSH_BLOCKS)")
    parser.add_argument("--batch", type=int, default=64, help="blocks per PairCounter.add call")
    parser.add_argument("--threads", type=int, default=0, help="saecat's torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, every table checked")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.features, args.active, args.repeats, args.threads = 300, 40, 1, args.threads or 1
        args.blocks = args.python_blocks = args.check_blocks = 24
        args.tile, args.flush, args.batch = 128, 10, 4  # several flushes; tiles of 128, 128 and 44
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for method in args.methods:
        command = [sys.executable, __file__, "--child", method] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in {"features", "blocks", "python_blocks", "numpy_blocks", "check_blocks", "active", "repeats",
                     "tile", "flush", "batch", "threads", "device"}]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[method]), flush=True)
    summary: dict[str, object] = {"tables_agree": len({r["check_sha256"] for r in results.values()}) == 1}
    if "saecat" in results:
        for method in set(results) - {"saecat"}:
            summary[f"speedup_saecat_over_{method}"] = round(
                results[method]["ms_per_block"] / results["saecat"]["ms_per_block"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
