"""Out-of-core co-occurrence (ingest.blockpairs) against the in-memory PairCounter, and alone at widths
the dense Gram cannot hold.

Synthetic blocks with realistic firing: each of a block's 256 tokens fires `--l0` latents drawn
from a Zipf-like popularity (p ~ 1/rank^1.2); a block's firing set is their union (~2,400
distinct latents at 16k, ~2,900 at 65k, ~3,100 at 131k, ~3,600 at 1M with L0 64).

- incore: PairCounter fed the blocks as bool rows in batches of 64, then pairs() (the table);
- outofcore: BlockSets written batch by batch to a temp folder, then count_pairs with the
  policy and the budget (method "auto" unless --method).

Both count on `--device` (cpu, cuda): the tiles and the blocks' rows live there, and on a GPU
"auto" takes the dense method. Each runs in its own subprocess; peak memory is that process's
ru_maxrss (and torch's peak on a CUDA device). Each prints one JSON line with its device, seconds
(stream + pair pass), peak and the sha256 of its table; at the widths where both run the parent
checks the tables agree and prints outofcore / incore.

    python bench/blockpairs.py --features 16384 65536 --blocks 512
    python bench/blockpairs.py --features 131072 262144 1048576 --blocks 256 --only outofcore \\
        --top-partners 64 --budget-gb 4
    python bench/blockpairs.py --features 16384 --blocks 256 --device cuda
    python bench/blockpairs.py --smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS_PER_BLOCK = 256


def firing_sets(n_features: int, n_blocks: int, l0: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices): each block's distinct latents over 256 tokens of `l0` Zipf draws each."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, n_features + 1) ** 1.2)
    cdf /= cdf[-1]
    sets = [np.unique(np.minimum(np.searchsorted(cdf, rng.random(TOKENS_PER_BLOCK * l0)), n_features - 1))
            for _ in range(n_blocks)]
    return np.r_[0, np.cumsum([len(s) for s in sets])].astype(np.int64), np.concatenate(sets).astype(np.int32)


def digest(i: np.ndarray, j: np.ndarray, n11: np.ndarray) -> str:
    h = hashlib.sha256()
    for column in (i, j, n11):
        h.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
    return h.hexdigest()


def batches(indptr: np.ndarray, size: int = 64):
    for first in range(0, len(indptr) - 1, size):
        yield first, min(first + size, len(indptr) - 1)


def run_incore(indptr, indices, args) -> dict:
    import torch

    from ingest.accumulate import PairCounter

    start = time.perf_counter()
    counter = PairCounter(args.features, args.device)
    for a, b in batches(indptr):  # the rows are built on the device, as ingestion builds them
        rows = torch.zeros(b - a, args.features, dtype=torch.bool, device=counter.device)
        lengths = np.diff(indptr[a:b + 1])
        rows[torch.from_numpy(np.repeat(np.arange(b - a), lengths)).to(counter.device), torch.from_numpy(
            indices[indptr[a]:indptr[b]].astype(np.int64)).to(counter.device)] = True
        counter.add(rows)
    counter.flush()
    if counter.device.type == "cuda":
        torch.cuda.synchronize()  # the tiles' matmuls are asynchronous: count them in the stream, not in pairs()
    stream = time.perf_counter() - start
    pairs = counter.pairs()
    return {"stream_s": stream, "pass_s": time.perf_counter() - start - stream, "pairs": pairs}


def run_outofcore(indptr, indices, args) -> dict:
    from ingest.blockpairs import BlockSets, count_pairs, plan
    from ingest.pair_policy import PairPolicy

    policy = PairPolicy(min_blocks=args.min_blocks, top_partners=args.top_partners or None)
    budget = int(args.budget_gb * 2**30)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        sets = BlockSets(Path(folder) / "blocks", args.features)
        for a, b in batches(indptr):
            sets.add_sets(np.diff(indptr[a:b + 1]), indices[indptr[a]:indptr[b]])
        sets.sync()
        stream = time.perf_counter() - start
        the_plan = plan(*sets.arrays(), args.features, policy=policy, memory_budget_bytes=budget,
                        device=args.device, method=args.method)
        pairs, _ = count_pairs(sets, args.features, policy=policy, memory_budget_bytes=budget, device=args.device,
                               method=args.method, checkpoint_dir=Path(folder) / "pairs")
        total = time.perf_counter() - start
        sets.close()
    return {"stream_s": stream, "pass_s": total - stream, "pairs": pairs, "method_used": the_plan.method,
            "bands": the_plan.n_bands, "budget_gb": args.budget_gb, "policy": policy.to_json(),
            "estimated_s": the_plan.estimated_s}


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    indptr, indices = firing_sets(args.features, args.blocks, args.l0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = (run_incore if args.child == "incore" else run_outofcore)(indptr, indices, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pairs = result.pop("pairs")
    if args.device.startswith("cuda"):  # the tiles and the dense bands live in GPU memory, not in ru_maxrss
        result["device_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return {"method": args.child, "device": args.device, "features": args.features, "blocks": args.blocks,
            "l0": args.l0, "distinct_per_block": round(len(indices) / args.blocks, 1),
            "threads": torch.get_num_threads(),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
            "seconds": round(result["stream_s"] + result["pass_s"], 3), "pairs": len(pairs.i),
            "peak_gb": round(peak / 2**30, 3), "rss_before_gb": round(before / 2**30, 3),
            "sha256": digest(pairs.i, pairs.j, pairs.n11)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--l0", type=int, default=64)
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--min-blocks", type=int, default=1)
    parser.add_argument("--top-partners", type=int, default=0)
    parser.add_argument("--method", choices=("auto", "dense", "sparse"), default="auto")
    parser.add_argument("--only", choices=("incore", "outofcore"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device of both paths (cpu, cuda)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: both methods, tables checked")
    parser.add_argument("--child", choices=("incore", "outofcore"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.features, args.blocks, args.l0, args.budget_gb = [512], 40, 2, 0.01
    if args.child:
        args.features = args.features[0]
        print(json.dumps(child(args)))
        return
    methods = [args.only] if args.only else ["incore", "outofcore"]
    for width in args.features:
        results = {}
        for method in methods:
            command = [sys.executable, __file__, "--child", method, "--features", str(width)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in {"blocks", "l0", "budget_gb", "min_blocks", "top_partners", "method", "threads", "device"}]
            # the child's stderr passes through: a failure's traceback reaches the caller's log
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(results[method]), flush=True)
        if len(results) == 2:
            incore, outofcore = results["incore"], results["outofcore"]
            print(json.dumps({"features": width, "device": args.device,
                              "tables_agree": incore["sha256"] == outofcore["sha256"],
                              "outofcore_over_incore_time": round(outofcore["seconds"] / incore["seconds"], 2),
                              "outofcore_over_incore_peak": round(outofcore["peak_gb"] / incore["peak_gb"], 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
