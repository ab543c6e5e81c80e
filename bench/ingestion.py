"""Ingestion overhead: tokens/s of saecat's counting loop against the bare forward pass + encode.

The SAE and its model are loaded once with saecat's loaders (`load_sae`, `model_for_sae`), and a
fixed token stream is cut into batches once by the batcher `ingest()` uses (`pipeline._batches`).
Then, alternating over repeats on those same batches in the same process:

- plain: per batch, the forward pass up to the hook, then `sae.encode` in chunks, keeping the
  firings: the least any ingestion does;
- bare: per batch, `_Session.encode`: the same, and the SAE's sparse decode of each chunk with
  each token's reconstruction terms (ingest.quality: what `sae_quality` is computed from);
- full: the same plus `FeatureAccumulator.update` with the arguments `_count` passes (hook
  inputs, groups, tokens, offsets) on a fresh accumulator, and `results()` at the end (the last
  pair-counter flush), so one-off costs are amortised over the repeat's tokens as in a short run.

overhead = median full time / median bare time - 1; quality_overhead = median bare / median
plain - 1 (what the sparsity and fidelity figures add). One more full pass on a fresh accumulator,
with each counter's entry point wrapped in a clock, says where the bookkeeping time goes
(histogram, top examples, pair counter, block sample, moments, and what `update` does inline:
the firing list, activation sums, block rows). `--end-to-end` adds one
whole `ingest()` into a temporary catalog (loading, tokenising, commit, FAISS, logit lens) as
context; it is not part of the ratio. `--evaluate` loads the whole model too and times
`--evaluate`'s three passes (ingest.evaluate) over the same batches, against the plain side.

`--width N` replaces the SAE by a random JumpReLU SAE of N latents (fixed seed) on the same
hook and model, built with sae-lens and saved to a temporary folder, its thresholds set on the
first batch so that per-feature firing rates are log-uniform over 3.5 decades with mean L0
`--l0` (a trained SAE's spread of densities, not a uniform one).

    python bench/ingestion.py --tokens 32768 --repeats 3 --threads 2            # the demo SAE (3,072)
    python bench/ingestion.py --width 16384 --l0 64 --tokens 32768 --repeats 3  # Gemma Scope 2's width
    python bench/ingestion.py --device cuda ...                                 # on a GPU

`--smoke` (with --model/--sae/--dataset of the test fixtures) runs a few hundred tokens and
checks the full run's counters against a recount of the bare run's encodings.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.accumulate import Firings  # noqa: E402
from ingest.budget import module_bytes, process_memory  # noqa: E402
from ingest.model import hook_activations, model_for_sae  # noqa: E402
from ingest.pipeline import Encoded, IngestOptions, _batches, _Session, evaluation, ingest, resolve_device  # noqa: E402
from ingest.sources import LoadedSae, load_sae, resolve_source  # noqa: E402
from ingest.tokens import Batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_BYTES = 2**28  # pre-activations held at once while calibrating a random SAE


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load() -> float:
    return round(os.getloadavg()[0], 2)


def random_sae(template: LoadedSae, model, batch: Batch, width: int, l0: float, folder: Path, device: str) -> Path:
    """A JumpReLU SAE of `width` latents on the template's hook and model, saved by sae-lens.

    Random unit encoder directions (seed 0); b_dec is the activations' mean, as training
    leaves it; feature i's threshold is its (1 - p_i) quantile over the batch's counted tokens,
    p log-uniform over [1e-5, 10^-1.5] (fixed seed), scaled so that sum p = l0."""
    from sae_lens import SAE, JumpReLUSAEConfig

    d_in = template.sae.cfg.d_in
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=width)
    for key in ("hook_name", "model_name", "prepend_bos", "model_from_pretrained_kwargs", "context_size"):
        setattr(cfg.metadata, key, getattr(template.sae.cfg.metadata, key))
    sae = SAE.from_dict(cfg.to_dict())
    acts = hook_activations(model, batch.tokens.to(device), template.hook_name, template.layer).cpu()
    bos = 1 if template.prepend_bos else 0
    pos = torch.arange(acts.shape[1])
    x = acts[(pos[None, :] >= bos) & (pos[None, :] < batch.lengths[:, None])]  # counted tokens [n, d_in]
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(d_in, width, generator=gen)
    w /= w.norm(dim=0, keepdim=True)
    density = 10 ** (-5 + 3.5 * torch.rand(width, generator=gen, dtype=torch.float64))
    density = (density * l0 / density.sum()).clamp(max=0.5)
    with torch.no_grad():
        sae.W_enc.copy_(w)
        sae.W_dec.copy_(w.T)
        sae.b_dec.copy_(x.mean(0))
        sae.b_enc.zero_()
        # the cut is the ascending (1 - p)-quantile: the (n - 1 - rank)-th largest, found per chunk
        # of features by a top-k no deeper than the chunk's deepest cut, so any width fits in memory
        above = (len(x) - 1 - ((1 - density) * (len(x) - 1)).round().long()).clamp(0, len(x) - 1)
        step = max(1, CALIBRATION_BYTES // (4 * len(x)))
        cut = torch.empty(width)
        for start in range(0, width, step):
            part = slice(start, start + step)
            pre = (x - x.mean(0)) @ w[:, part]  # [n, chunk]
            best = pre.topk(int(above[part].max()) + 1, dim=0).values  # descending
            cut[part] = best.gather(0, above[part][None, :])[0]
        sae.threshold.copy_(cut.clamp(min=1e-6))  # above 0, so the ReLU never decides alone
    sae.save_model(str(folder))
    return folder


class Clock:
    """Wraps methods of live objects so each call's wall time adds to a label (CUDA synced)."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj: Any, name: str, label: str) -> None:
        method = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            out = method(*args, **kwargs)
            sync(self.device)
            self.seconds[label] += time.perf_counter() - start
            return out

        setattr(obj, name, timed)  # an instance attribute: saecat's own self.x() calls find it too


class Bench:
    """One loaded SAE and model, its batches, and fresh ingestion sessions to count them with."""

    def __init__(self, loaded: LoadedSae, model, opts: IngestOptions, device: str, model_name: str, db: Path):
        self.loaded, self.model, self.opts, self.device, self.model_name, self.db = (
            loaded, model, opts, device, model_name, db)
        self.batches = list(_batches(self.session(), model))
        self.results: dict[str, np.ndarray] = {}  # the last full run's acc.results()
        self.encode_tokens = self.session().plan.memory.encode_tokens  # the chunk `_Session.encode` uses
        self.n_tokens = sum(int((b.lengths - (1 if loaded.prepend_bos else 0)).clamp(min=0).sum())
                            for b in self.batches)

    def session(self) -> _Session:
        """A fresh session with its accumulator, planned as `ingest()` plans a run that starts anew."""
        session = _Session(self.db, self.loaded, self.opts, self.device, self.model_name,
                           process_memory(self.device), module_bytes(self.model))
        session.prepare(None, self.model)
        return session

    def encode(self, session: _Session, batch: Batch) -> Encoded:
        return session.encode(batch, self.model)

    def plain(self, batch: Batch) -> Firings:
        """The forward pass and the encoder's firings, without the reconstruction (see the docstring)."""
        acts = hook_activations(self.model, batch.tokens.to(self.device), self.loaded.hook_name, self.loaded.layer)
        real = torch.arange(acts.shape[1], device=acts.device)[None, :] < batch.lengths.to(acts.device)[:, None]
        place = real.flatten().nonzero().squeeze(1)
        step, parts = self.encode_tokens, []
        with torch.inference_mode():
            for start in range(0, len(place), step):
                rows = place[start: start + step]
                encoded = self.loaded.sae.encode(acts.flatten(0, 1)[rows])
                token, feature = (encoded > self.opts.threshold).nonzero().unbind(1)
                parts.append((rows[token], feature, encoded[token, feature]))
        flat, feature, value = (torch.cat(column) for column in zip(*parts))
        return Firings(flat // acts.shape[1], flat % acts.shape[1], feature, value, tuple(acts.shape[:2]))

    def count(self, session: _Session, batch: Batch, encoded: Encoded) -> None:
        inputs, acts, _ = encoded  # the arguments `_count` passes
        session.acc.update(acts, batch.lengths, batch.n_documents, batch.tokens, batch.offsets, inputs=inputs,
                           groups=batch.groups)

    def repeat(self, parity: int, keep: list[Firings] | None = None) -> dict[str, float]:
        """One pass, each batch run bare and then full or the other way round (alternating), so
        drift in the machine's load falls on both sides alike. The full side counts into a fresh
        accumulator (built before the clock) and ends with its results(). Returns the seconds
        of each side, and of the full side's counting alone (update + results)."""
        session = self.session()
        seconds = {"plain": 0.0, "bare": 0.0, "full": 0.0, "counting": 0.0}
        for i, batch in enumerate(self.batches):
            for side in ("plain", "bare", "full") if (i + parity) % 2 == 0 else ("full", "bare", "plain"):
                sync(self.device)
                start = time.perf_counter()
                if side == "plain":
                    self.plain(batch)
                    sync(self.device)
                    seconds[side] += time.perf_counter() - start
                    continue
                encoded = self.encode(session, batch)
                if side == "full":
                    sync(self.device)
                    tick = time.perf_counter()
                    self.count(session, batch, encoded)
                    sync(self.device)
                    seconds["counting"] += time.perf_counter() - tick
                elif keep is not None:
                    keep.append(encoded[1])
                del encoded
                sync(self.device)
                seconds[side] += time.perf_counter() - start
        start = time.perf_counter()
        self.results = session.acc.results()
        sync(self.device)
        for side in ("full", "counting"):
            seconds[side] += time.perf_counter() - start
        return seconds

    def full(self, session: _Session, on_batch: Callable[[float], None] | None = None,
             batches: list[Batch] | None = None) -> float:
        """What `_count` does per batch, then `results()`; `session` is built before the clock."""
        acc = session.acc
        sync(self.device)
        start = time.perf_counter()
        for batch in self.batches if batches is None else batches:
            encoded = self.encode(session, batch)
            tick = time.perf_counter()
            self.count(session, batch, encoded)
            if on_batch is not None:
                sync(self.device)
                on_batch(time.perf_counter() - tick)
        self.results = acc.results()
        sync(self.device)
        return time.perf_counter() - start


def breakdown(bench: Bench) -> dict[str, Any]:
    """A full pass with each counter's entry point timed: seconds per piece, per 1k tokens."""
    session = bench.session()
    acc = session.acc
    clock = Clock(bench.device)
    clock.wrap(acc, "update", "update")
    clock.wrap(acc, "results", "results (last flush)")
    for obj, name, label in ((acc.histogram, "update", "histogram"), (acc.examples, "update", "examples"),
                             (acc.pairs, "add", "pair counter"), (acc.sample, "add", "block sample"),
                             (acc.sample, "codes", "block sample"), (acc.open.moments, "update", "moments")):
        if obj is not None:
            clock.wrap(obj, name, label)
    per_batch: list[float] = []
    total = bench.full(session, per_batch.append)
    pieces = dict(clock.seconds)
    update = pieces.pop("update")
    inline = update - sum(v for k, v in pieces.items() if k != "results (last flush)")
    pieces["inline in update (firing list, sums, block rows)"] = inline
    scale = 1e3 / bench.n_tokens
    members = len(acc.sample.member_feature) / max(len(acc.sample), 1)
    return {"step": "breakdown", "full_s": round(total, 3), "update_s": round(update, 3),
            "ms_per_1k_tokens": {k: round(v * scale * 1e3, 2) for k, v in sorted(pieces.items())},
            "update_ms_per_batch": [round(t * 1e3, 1) for t in per_batch],
            "features_per_sampled_block": round(members, 1), "load_average": load()}


def recount(bench: Bench, encodings: list[Firings]) -> dict[str, Any]:
    """Fire and block counts from the bare run's firings, document by document, in numpy."""
    bos, size = (1 if bench.loaded.prepend_bos else 0), bench.opts.block_size
    fire = np.zeros(bench.loaded.sae.cfg.d_sae, dtype=np.int64)
    block = np.zeros_like(fire)
    for batch, firings in zip(bench.batches, encodings):
        fired = np.zeros((*firings.shape, len(fire)), dtype=bool)
        fired[firings.doc.cpu().numpy(), firings.at.cpu().numpy(), firings.feature.cpu().numpy()] = True
        for row, length in enumerate(batch.lengths.tolist()):
            doc = fired[row, bos:length]
            fire += doc.sum(0)
            for start in range(0, len(doc) - size + 1, size):
                block += doc[start:start + size].any(0)
    got = bench.results
    plain = [bench.plain(batch) for batch in bench.batches]  # the plain side finds the same firings
    same = all(torch.equal(torch.stack([p.doc, p.at, p.feature]), torch.stack([f.doc, f.at, f.feature]))
               and torch.equal(p.value, f.value) for p, f in zip(plain, encodings))
    return {"step": "check", "tokens": bench.n_tokens, "firings": int(fire.sum()), "blocks_fired": int(block.sum()),
            "plain_firings_equal": same,
            "fire_count_equal": bool(np.array_equal(got["fire_count"], fire)),
            "block_count_equal": bool(np.array_equal(got["block_count"], block))}


def evaluate_cost(bench: Bench, model_name: str | None, plain: float) -> dict[str, Any]:
    """`--evaluate`'s three passes of the whole model over the bench's batches, in seconds, against
    the plain side's median (forward to the hook and encode)."""
    whole = model_for_sae(bench.loaded, model_name, bench.device, whole=True)
    session = bench.session()
    session.opts = dataclasses.replace(bench.opts, evaluate_tokens=10**12)  # every batch
    encoded = [bench.encode(session, batch) for batch in bench.batches]
    sync(bench.device)
    start = time.perf_counter()
    for batch, enc in zip(bench.batches, encoded):
        evaluation(session, whole, batch, enc)
    sync(bench.device)
    seconds = time.perf_counter() - start
    return {"step": "evaluate", "seconds": round(seconds, 3), "plain_seconds": round(plain, 3),
            "evaluate_over_plain": round(seconds / plain, 2), "layers": whole.cfg.n_layers,
            "hook_layer": bench.loaded.layer, "load_average": load()}


def end_to_end(source, opts: IngestOptions, folder: Path) -> dict[str, Any]:
    result = ingest(source, opts, db=folder / "e2e.duckdb")
    return {"step": "end_to_end", "seconds": round(result.seconds, 2), "tokens": result.n_tokens,
            "tokens_per_s": round(result.n_tokens / result.seconds, 1), "blocks": result.n_blocks,
            "pairs": result.n_pairs, "load_average": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", default=str(ROOT / "demo" / "sae"), help="a local sae-lens folder")
    parser.add_argument("--width", type=int, help="use a random JumpReLU SAE this wide on --sae's hook and model")
    parser.add_argument("--l0", type=float, default=64.0, help="mean firings per token of the --width SAE")
    parser.add_argument("--model", help="model path or name (default: the demo's Gemma 3 270M GGUF)")
    parser.add_argument("--dataset", default=str(ROOT / "demo" / "build" / "stdlib.jsonl"))
    parser.add_argument("--group-column", default="kind")
    parser.add_argument("--max-doc-tokens", type=int, default=257, help="as `make main`: BOS + one block")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32768, help="counted tokens per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: the library's default)")
    parser.add_argument("--end-to-end", action="store_true", help="also time one whole ingest() as context")
    parser.add_argument("--smoke", action="store_true", help="a few hundred tokens, one repeat, counts checked")
    parser.add_argument("--evaluate", action="store_true", help="also time --evaluate's passes of the whole model")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.repeats = min(args.tokens, 600), 1
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    if args.model is None:
        from demo.gemma import gguf_path

        args.model = str(gguf_path())
    with tempfile.TemporaryDirectory(prefix="saecat-bench-ingest-") as tmp:  # the random SAE, the catalogs
        run(args, Path(tmp))


def run(args: argparse.Namespace, folder: Path) -> None:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    opts = IngestOptions(dataset=args.dataset, model=args.model, max_tokens=args.tokens,
                         max_doc_tokens=args.max_doc_tokens, block_size=args.block_size,
                         group_column=args.group_column, device=device, progress=False)

    start = time.perf_counter()
    source = resolve_source(None, None, args.sae)
    loaded = load_sae(source, device)
    model = model_for_sae(loaded, args.model, device)
    if args.width:
        first = Bench(loaded, model, opts, device, args.model, folder / "bench.duckdb").batches[0]
        source = resolve_source(None, None, str(random_sae(loaded, model, first, args.width, args.l0,
                                                           folder / "sae", device)))
        loaded = load_sae(source, device)
    bench = Bench(loaded, model, opts, device, args.model, folder / "bench.duckdb")
    cfg = loaded.sae.cfg
    print(json.dumps({"step": "setup", "sae": source.location, "architecture": loaded.architecture, "d_in": cfg.d_in,
                      "d_sae": cfg.d_sae, "hook": loaded.hook_name, "model": args.model, "device": device,
                      "threads": torch.get_num_threads(), "tokens": bench.n_tokens, "batches": len(bench.batches),
                      "batch_shapes": sorted({tuple(b.tokens.shape) for b in bench.batches}),
                      "seconds": round(time.perf_counter() - start, 1), "load_average": load()}), flush=True)

    bench.full(bench.session(), batches=bench.batches[:1])  # first-call costs (allocator, kernels) stay off the clock
    runs = []
    encodings: list[Firings] | None = [] if args.smoke else None
    for repeat in range(args.repeats):
        runs.append(bench.repeat(repeat % 2, encodings if repeat == 0 else None))
        gc.collect()
        print(json.dumps({"step": "repeat", "repeat": repeat, **{k: round(v, 3) for k, v in runs[-1].items()},
                          "ratio": round(runs[-1]["full"] / runs[-1]["bare"], 4), "load_average": load()}), flush=True)
    fire = bench.results["fire_count"]
    plain, bare, full = (statistics.median(r[side] for r in runs) for side in ("plain", "bare", "full"))
    print(json.dumps({"step": "overhead", "d_sae": cfg.d_sae, "tokens": bench.n_tokens, "repeats": args.repeats,
                      "bare_tokens_per_s": round(bench.n_tokens / bare, 1),
                      "full_tokens_per_s": round(bench.n_tokens / full, 1),
                      "overhead": round(full / bare - 1, 4),
                      "quality_overhead": round(bare / plain - 1, 4),
                      "quality_overhead_paired_median": round(statistics.median(
                          r["bare"] / r["plain"] - 1 for r in runs), 4),
                      "overhead_paired_median": round(statistics.median(r["full"] / r["bare"] - 1 for r in runs), 4),
                      # counting's share of the full side, against that side's own encodes: no drift between them
                      "counting_over_encode": round(statistics.median(
                          r["counting"] / (r["full"] - r["counting"]) for r in runs), 4),
                      "l0": round(float(fire.sum()) / bench.n_tokens, 1),
                      "dead_features": int((fire == 0).sum()), "load_average": load()}), flush=True)
    print(json.dumps(breakdown(bench)), flush=True)
    if encodings is not None:
        print(json.dumps(recount(bench, encodings)), flush=True)
    if args.evaluate:
        print(json.dumps(evaluate_cost(bench, args.model, plain)), flush=True)
    if args.end_to_end:
        del bench, model
        gc.collect()
        print(json.dumps(end_to_end(source, opts, folder)), flush=True)


if __name__ == "__main__":
    main()
