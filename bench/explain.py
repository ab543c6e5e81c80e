"""What `saecat explain` adds to the endpoint's own time (issue 19).

The demo's Gemma 3 270M behind `transformers serve` (demo.gemma.chat_folder), a catalog with an
ingested SAE (the main job's, by default). Three passes over the same features, each at the same
concurrency:
  record  saecat explain (with --force), its requests logged on the way out;
  raw     the logged requests sent again straight to the endpoint with openai's client, as fast as
          the concurrency allows: the endpoint's own throughput on exactly saecat's work;
  saecat  saecat explain again (greedy decoding: the same requests, the same answers).
overhead = saecat / raw - 1: selection, prompts, parsing, scoring's bookkeeping and the commits.

    python bench/explain.py --db saecat.duckdb --release saecat-demo --sae-id gemma-3-270m/layer_5/topk_3k
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Logged:
    """An explainer that logs what it is asked."""

    def __init__(self, inner):
        self.inner, self.name, self.log = inner, inner.name, []

    async def complete(self, messages, max_tokens, prefix=""):
        self.log.append((messages, max_tokens))
        return await self.inner.complete(messages, max_tokens, prefix)

    async def close(self):
        await self.inner.close()


async def replay(endpoint, requests: list, concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one(messages, max_tokens):
        async with slots:
            await endpoint.complete(messages, max_tokens)

    await asyncio.gather(*(one(m, t) for m, t in requests))


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--host",
                             "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, f"{url}/v1"
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("transformers serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=ROOT / "saecat.duckdb")
    parser.add_argument("--release", default="saecat-demo")
    parser.add_argument("--sae-id", default="gemma-3-270m/layer_5/topk_3k")
    parser.add_argument("--where", default="density BETWEEN 0.002 AND 0.05")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    from demo.gemma import chat_folder
    from ingest.explain import ExplainOptions, explain
    from ingest.explainers import ChatEndpoint

    with tempfile.TemporaryDirectory(prefix="saecat-explain-") as tmp:
        db = Path(tmp) / "catalog.duckdb"  # a copy: the bench's explanations stay out of the user's catalog
        shutil.copy(args.db, db)
        proc, url = serve(chat_folder(Path(tmp) / "gemma-chat"))
        try:
            folder = str(Path(tmp) / "gemma-chat")
            opts = ExplainOptions(where=args.where, limit=args.features, force=True, progress=False,
                                  concurrency=args.concurrency)
            endpoint = lambda: ChatEndpoint(url, folder, timeout=600.0, retries=2)  # noqa: E731
            logged = Logged(endpoint())
            started = time.perf_counter()
            summary = explain(db, args.release, args.sae_id, logged, opts=opts)
            record = time.perf_counter() - started
            started = time.perf_counter()
            asyncio.run(replay(endpoint(), logged.log, args.concurrency))
            raw = time.perf_counter() - started
            started = time.perf_counter()
            explain(db, args.release, args.sae_id, endpoint(), opts=opts)
            timed = time.perf_counter() - started
        finally:
            proc.terminate()
    print(json.dumps({"features": summary.selected, "explained": summary.explained, "requests": len(logged.log),
                      "concurrency": args.concurrency, "record_s": round(record, 1), "raw_s": round(raw, 1),
                      "saecat_s": round(timed, 1), "overhead": round(timed / raw - 1, 3),
                      "requests_per_s_raw": round(len(logged.log) / raw, 2)}))


if __name__ == "__main__":
    main()
