"""Wide SAEs end to end: the time and peak memory of each phase of one ingestion, against its budget.

For each width in --widths, a random JumpReLU SAE of that many latents on the demo SAE's hook and
model (bench/ingestion.py's `random_sae`: random unit directions, per-feature firing rates
log-uniform over 3.5 decades with mean L0 --l0, thresholds calibrated on the corpus' first
batch, 8,192 tokens), saved by sae-lens. Then one whole `ingest()` of --tokens counted tokens into a fresh
catalog, in a fresh process, so each peak is that run's own, under --memory-budget (default:
ingest's own, half of the machine's memory). A thread samples the process's resident memory
every 10 ms; a phase's peak is the largest sample within it (load, stream, pairs, write, index:
IngestResult.phases). The printed plan is the run's own (what `saecat status` shows).

    python bench/wide.py --widths 131072 262144 1048576 --tokens 16384
    python bench/wide.py --smoke --model M --sae S --dataset D   # tiny, for tests/test_bench_wide.py

Each width prints one JSON line: the measured L0 and distinct latents per block, the plan, and
per phase its seconds and peak resident GB, against the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


class RssSampler(threading.Thread):
    """This process's resident memory every `every` seconds, as (time.monotonic(), anonymous
    bytes, all bytes): what the run allocated, and that with the file pages it has mapped (the
    catalog's and the checkpoint's memory-mapped files: page cache the kernel can drop)."""

    def __init__(self, every: float = 0.01):
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()

    @staticmethod
    def rss() -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        kib = {name: int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "VmRSS")}
        return kib["RssAnon"], kib["VmRSS"]

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.samples.append((time.monotonic(), *self.rss()))

    def peak(self, start: float = -math.inf, end: float = math.inf, column: int = 1) -> int:
        """The largest sample in [start, end]: anonymous (column 1) or all resident memory (2)."""
        return max((sample[column] for sample in self.samples if start <= sample[0] <= end), default=0)


def child(args: argparse.Namespace) -> None:
    """One ingestion of the SAE in args.sae, measured; prints its JSON line."""
    from catalog import Catalog
    from catalog.limits import format_size
    from ingest import IngestOptions, ingest, resolve_source

    sampler = RssSampler()
    sampler.start()
    opts = IngestOptions(dataset=args.dataset, model=args.model, max_tokens=args.tokens,
                         max_doc_tokens=args.max_doc_tokens, block_size=args.block_size, progress=False,
                         memory_budget=args.memory_budget, top_partners=args.top_partners, logit_k=args.logit_k)
    result = ingest(resolve_source(None, None, args.sae), opts, db=Path(args.db))
    sampler.done.set()
    sampler.join()
    with Catalog.open(args.db) as cat:
        plan = json.loads(cat.con.execute("SELECT params FROM ingest_runs").fetchone()[0])["plan"]
        fired, blocked, dead = cat.con.execute(
            "SELECT sum(fire_count), sum(block_count), count(*) FILTER (fire_count = 0) FROM features").fetchone()
    gb = 2**30
    print(json.dumps({
        "d_sae": args.width, "tokens": result.n_tokens, "blocks": result.n_blocks,
        "l0": round(fired / result.n_tokens, 1), "latents_per_block": round(blocked / max(result.n_blocks, 1), 1),
        "dead": dead, "pairs": result.n_pairs, "budget": format_size(plan["memory_budget"]),
        "pair_path": plan["pair_path"], "plan": plan["summary"],
        # peak_gb: anonymous memory, what the budget bounds; rss_gb: with the mapped file pages
        "phases": {name: {"seconds": round(end - start, 1), "peak_gb": round(sampler.peak(start, end) / gb, 2),
                          "rss_gb": round(sampler.peak(start, end, 2) / gb, 2)}
                   for name, start, end in result.phases},
        "seconds": round(result.seconds, 1), "peak_gb": round(sampler.peak() / gb, 2),
        "rss_gb": round(sampler.peak(column=2) / gb, 2),
        "within_budget": sampler.peak() <= plan["memory_budget"]}), flush=True)


class SaeMaker:
    """Random SAEs on the template's hook, calibrated on the corpus' first tokens (loaded once)."""

    def __init__(self, args: argparse.Namespace, folder: Path):
        from ingest.model import model_for_sae
        from ingest.pipeline import IngestOptions, _batches, _Session
        from ingest.sources import load_sae, resolve_source

        self.template = load_sae(resolve_source(None, None, args.template), "cpu")
        self.model = model_for_sae(self.template, args.model, "cpu")
        opts = IngestOptions(dataset=args.dataset, model=args.model, max_doc_tokens=args.max_doc_tokens,
                             block_size=args.block_size, progress=False)
        session = _Session(folder / "unused.duckdb", self.template, opts, "cpu", args.model, 0, 0)  # batches only
        session.prepare(None, self.model)
        self.first = next(_batches(session, self.model))
        self.l0 = args.l0

    def __call__(self, width: int, folder: Path) -> Path:
        from bench.ingestion import random_sae

        return random_sae(self.template, self.model, self.first, width, self.l0, folder / f"sae-{width}", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[131072, 262144, 1048576])
    parser.add_argument("--tokens", type=int, default=16384, help="counted tokens per ingestion")
    parser.add_argument("--l0", type=float, default=64.0, help="mean firings per token of the random SAEs")
    parser.add_argument("--template", default=str(ROOT / "demo" / "sae"), help="the sae-lens folder whose hook is used")
    parser.add_argument("--model", help="model path or name (default: the demo's Gemma 3 270M GGUF)")
    parser.add_argument("--dataset", default=str(ROOT / "demo" / "build" / "stdlib.jsonl"))
    parser.add_argument("--max-doc-tokens", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--memory-budget", help="as ingest's --memory-budget (default: half of the machine's memory)")
    parser.add_argument("--top-partners", type=int, help="as ingest's --top-partners (default: every pair)")
    parser.add_argument("--logit-k", type=int, default=10, help="as ingest's --logit-k (0: no logit lens)")
    parser.add_argument("--smoke", action="store_true", help="one narrow width and a few hundred tokens")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sae", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.smoke:
        args.widths, args.tokens = args.widths if args.widths != parser.get_default("widths") else [2048], 600
    if args.model is None:
        from demo.gemma import gguf_path

        args.model = str(gguf_path())
    passed = [a for a in sys.argv[1:] if a != "--smoke"]
    with tempfile.TemporaryDirectory(prefix="saecat-bench-wide-") as tmp:
        make_sae = SaeMaker(args, Path(tmp))
        for width in args.widths:
            folder = Path(tmp) / str(width)
            folder.mkdir()
            sae = make_sae(width, folder)
            command = [sys.executable, __file__, *passed, "--child", "--sae", str(sae), "--width", str(width),
                       "--db", str(folder / "catalog.duckdb"), "--tokens", str(args.tokens), "--model", args.model]
            subprocess.run(command, check=True)
            shutil.rmtree(folder)  # a 1M SAE is gigabytes on disk


if __name__ == "__main__":
    main()
