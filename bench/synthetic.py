"""Synthetic catalogs for the neighbours and catalog benchmarks, written by saecat's own write path.

Each SAE is committed with `writer(db).commit_sae(...)` in one transaction, as an ingestion
commits it, with what an ingestion writes for every feature: the decoder row (FLOAT[] of d_in),
its norm and firing counts, `logit_k` top and `logit_k` bottom logit-lens tokens, `examples` top
examples with 8 tokens of context on each side (an ingestion keeps 20 by default), and `pairs`
random co-occurrence pairs sorted by (i, j). No histograms, blocks or activation spectrum: no
benchmark here reads them. Then every SAE's FAISS indexes are written as ingestion writes them
(`catalog.index.write_indexes`: the exact one, and from 16,384 features the IVF one with its
recall), from decoders read back from DuckDB; a catalog built before is given what it lacks.

Decoder directions are not isotropic: every SAE of a model draws its features from the same
`clusters` planted unit directions (features of one model share directions across layers), with
a per-feature strength, plus Gaussian noise; 10% of the features are pure noise. So a feature's
nearest neighbours are mostly its cluster-mates at cosines ~0.1-0.6, the pure-noise features'
are near-ties at ~0.1, and an HNSW graph has real work to do. Norms are log-normal around 1.

    python bench/synthetic.py --size 1m --db /tmp/saecat-bench/synthetic-1m.duckdb   # build once, reuse
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 50_257  # GPT-2's; the token strings are made up
CONTEXT = 8  # tokens each side of an example, the ingestion default
N_TOKENS = 2_000_000
BLOCK_SIZE = 256


@dataclass(frozen=True)
class Spec:
    """A synthetic catalog: `n_saes` SAEs of `width` features on one model of width `d_in`."""

    model: str
    n_saes: int
    width: int
    d_in: int
    pairs: int = 500_000
    clusters: int = 400
    logit_k: int = 10
    examples: int = 5
    seed: int = 0

    @property
    def features(self) -> int:
        return self.n_saes * self.width


# The sizes. 1M features at Gemma's d_in 2,304 would be 9.4 GB of float32 in DuckDB and
# as much again in FAISS: too much for a shared 24 GB machine, so 1M is GPT-2 small's width.
SIZES = {
    "16k": Spec("gemma-2-2b", 1, 16_384, 2_304, pairs=1_000_000),
    "65k": Spec("gemma-2-2b", 1, 65_536, 2_304, pairs=1_000_000),
    "1m": Spec("gpt2-small", 43, 24_576, 768),  # 1,056,768 features: 43 x the width of gpt2-small-res-jb
}
SMOKE = {
    "16k": Spec("smoke-one", 1, 600, 48, pairs=2_000, clusters=20, logit_k=3, examples=2),
    "65k": Spec("smoke-one", 1, 900, 48, pairs=2_000, clusters=20, logit_k=3, examples=2),
    "1m": Spec("smoke-model", 3, 400, 32, pairs=2_000, clusters=20, logit_k=3, examples=2),
}


def release_name(spec: Spec) -> str:
    return f"synthetic-{spec.model}-{spec.width}"


def sae_id(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _vocab() -> pa.Array:
    return pa.array([f" w{i}" for i in range(VOCAB)])


def decoders(spec: Spec, layer: int) -> np.ndarray:
    """[width, d_in] float32: planted directions shared by the model's SAEs, plus noise."""
    centres = np.random.default_rng([spec.seed, 0]).standard_normal((spec.clusters, spec.d_in), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng([spec.seed, 1, layer])
    cluster = rng.integers(0, spec.clusters, spec.width)
    strength = rng.uniform(0.2, 1.5, spec.width).astype(np.float32)
    strength[rng.random(spec.width) < 0.1] = 0.0  # pure-noise features
    out = np.empty((spec.width, spec.d_in), dtype=np.float32)
    for start in range(0, spec.width, 8192):  # chunks: no float64 or second full-size temporary
        stop = min(spec.width, start + 8192)
        noise = rng.standard_normal((stop - start, spec.d_in), dtype=np.float32) / np.float32(np.sqrt(spec.d_in))
        rows = strength[start:stop, None] * centres[cluster[start:stop]] + noise
        rows *= (rng.lognormal(0.0, 0.2, stop - start) / np.linalg.norm(rows, axis=1)).astype(np.float32)[:, None]
        out[start:stop] = rows
    return out


def sae_tables(spec: Spec, layer: int, vocab: pa.Array) -> tuple[dict, pa.Table, pa.Table, dict[str, pa.Table]]:
    """(saes row, features, co-occurrence pairs, label tables) of one synthetic SAE."""
    rng = np.random.default_rng([spec.seed, 2, layer])
    w, d = spec.width, spec.d_in
    dec = decoders(spec, layer)
    density = np.minimum(1.0, rng.lognormal(np.log(3e-4), 1.5, w))
    fire = rng.binomial(N_TOKENS, density).astype(np.int64)
    fire[rng.random(w) < 0.01] = 0  # dead features
    n_blocks = N_TOKENS // BLOCK_SIZE
    blocks = np.minimum(fire, n_blocks)
    mean_act = np.where(fire > 0, rng.uniform(1.0, 4.0, w), np.nan).astype(np.float32)
    features = pa.table({
        "feature": pa.array(np.arange(w, dtype=np.int32)),
        "decoder": pa.ListArray.from_arrays(pa.array(np.arange(0, (w + 1) * d, d, dtype=np.int32)),
                                            pa.array(dec.ravel())),
        "decoder_norm": pa.array(np.linalg.norm(dec, axis=1)),
        "fire_count": pa.array(fire),
        "block_count": pa.array(blocks),
        "max_activation": pa.array(np.where(fire > 0, mean_act * 3, 0.0).astype(np.float32)),
        "mean_activation": pa.array(mean_act, from_pandas=True),
    })
    del dec
    # Random pairs i < j, unique, sorted by (i, j) as an ingestion writes them.
    i, j = rng.integers(0, w, (2, spec.pairs))
    codes = np.unique(np.minimum(i, j).astype(np.int64) * w + np.maximum(i, j))
    codes = codes[codes // w != codes % w]
    pairs = pa.table({"i": pa.array((codes // w).astype(np.int32)), "j": pa.array((codes % w).astype(np.int32)),
                      "n11": pa.array(rng.geometric(0.3, len(codes)).astype(np.int64))})
    k = spec.logit_k
    token_ids = rng.integers(0, VOCAB, 2 * w * k)
    tokens = pa.table({  # direction-major, then feature, then rank: as ingest/labels.py lays them out
        "feature": pa.array(np.tile(np.repeat(np.arange(w, dtype=np.int32), k), 2)),
        "direction": pa.array(np.repeat(np.array(["top", "bottom"], dtype=object), w * k)),
        "rank": pa.array(np.tile(np.arange(k, dtype=np.int32), 2 * w)),
        "token_id": pa.array(token_ids.astype(np.int32)),
        "token": pc.take(vocab, pa.array(token_ids)),
        "logit": pa.array(rng.normal(0, 3, 2 * w * k).astype(np.float32)),
    })
    n_ex, width_ctx = w * spec.examples, 2 * CONTEXT + 1
    context_ids = rng.integers(0, VOCAB, n_ex * width_ctx)
    examples = pa.table({
        "feature": pa.array(np.repeat(np.arange(w, dtype=np.int32), spec.examples)),
        "rank": pa.array(np.tile(np.arange(spec.examples, dtype=np.int32), w)),
        "activation": pa.array(rng.uniform(1, 10, n_ex).astype(np.float32)),
        "document": pa.array(rng.integers(0, 10_000, n_ex)),
        "position": pa.array(rng.integers(1, 1024, n_ex).astype(np.int32)),
        "token": pc.take(vocab, pa.array(context_ids[CONTEXT::width_ctx])),
        "context": pa.ListArray.from_arrays(pa.array(np.arange(0, (n_ex + 1) * width_ctx, width_ctx, dtype=np.int32)),
                                            pc.take(vocab, pa.array(context_ids))),
        "center": pa.array(np.full(n_ex, CONTEXT, dtype=np.int32)),
    })
    row = {"release": release_name(spec), "sae_id": sae_id(layer), "source": "synthetic", "model": spec.model,
           "hook_name": sae_id(layer), "layer": layer, "d_in": d, "d_sae": w, "architecture": "standard",
           "neuronpedia_id": f"{spec.model}/{layer}-synthetic", "status": "ready", "decoder_folded": False,
           "activation_model": spec.model, "dataset": "synthetic", "n_documents": N_TOKENS // 1000,
           "n_tokens": N_TOKENS, "n_blocks": n_blocks, "block_size": BLOCK_SIZE, "threshold": 0.0,
           "top_k": spec.examples, "context_tokens": CONTEXT, "ingested_at": datetime(2026, 11, 23)}
    return row, features, pairs, {"feature_tokens": tokens, "feature_examples": examples}


def build(db: Path, spec: Spec, report=lambda line: None) -> dict:
    """Write the catalog (one writer and one commit_sae per SAE), then build every exact FAISS
    index through saecat. Returns the timings, also saved beside the catalog as <db>.build.json."""
    from catalog import Catalog, writer
    from catalog.index import VectorIndex

    vocab = _vocab()
    load_before = os.getloadavg()[0]
    generate_s, commit_s, writer_s, pair_rows, keys = [], [], [], 0, []
    for layer in range(spec.n_saes):
        started = time.perf_counter()
        row, features, pairs, extra = sae_tables(spec, layer, vocab)
        generate_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        with writer(db) as cat:
            committing = time.perf_counter()
            keys.append(cat.commit_sae(row, features, pairs, {"release": row["release"], "model": spec.model},
                                       extra=extra))
            commit_s.append(time.perf_counter() - committing)
        writer_s.append(time.perf_counter() - started)  # open + commit + close (DuckDB checkpoints on close)
        pair_rows += pairs.num_rows
        report(f"SAE {layer + 1}/{spec.n_saes}: generated {generate_s[-1]:.1f} s, written {writer_s[-1]:.1f} s")
        del features, pairs, extra
    db_bytes = db.stat().st_size
    index_s = write_indexes(db)
    with Catalog.open(db) as cat:
        index_bytes = sum(VectorIndex.paths(cat, k)[0].stat().st_size for k in keys)
    stats = {"spec": asdict(spec), "features": spec.features, "pair_rows": pair_rows,
             "db_gb": round(db_bytes / 2**30, 3), "index_gb": round(index_bytes / 2**30, 3),
             "generate_s_total": round(sum(generate_s), 2), "write_s_total": round(sum(writer_s), 2),
             "commit_s_median": round(float(np.median(commit_s)), 3),
             "writer_s_median": round(float(np.median(writer_s)), 3),
             "writer_s_per_sae": [round(s, 3) for s in writer_s],
             "index_build_s_total": round(sum(index_s), 2), "index_build_s_median": round(float(np.median(index_s)), 3),
             "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    build_record(db).write_text(json.dumps(stats))
    return stats


def write_indexes(db: Path) -> list[float]:
    """Each SAE's FAISS indexes as ingestion writes them (exact, and IVF with its recall from
    IVF_FROM features; decoders streamed back from DuckDB), where not written already: the seconds
    each SAE's took."""
    from catalog import Catalog
    from catalog.index import DecoderRows, approximate_kind, is_written
    from catalog.index import write_indexes as write

    seconds = []
    with Catalog.open(db) as cat:
        for (key,) in cat.con.execute("SELECT sae FROM saes ORDER BY sae").fetchall():
            record = cat.sae_by_key(key)
            wanted = ["exact"] + (["ivf"] if approximate_kind(record) == "ivf" else [])
            if not all(is_written(cat, record, kind) for kind in wanted):
                started = time.perf_counter()
                write(cat, record, DecoderRows.from_catalog(cat, record))
                seconds.append(time.perf_counter() - started)
    return seconds


def build_record(db: Path) -> Path:
    return db.with_name(db.name + ".build.json")


def ensure(db: Path, spec: Spec, report=lambda line: None) -> dict:
    """The catalog at `db`, built unless a finished build of the same spec is there already."""
    record = build_record(db)
    if db.exists() and record.exists():
        stats = json.loads(record.read_text())
        if stats["spec"] == asdict(spec):  # indexes added since the build are written now
            return {**stats, "reused": True, "indexes_written_s": round(sum(write_indexes(db)), 2)}
    if db.exists():
        raise SystemExit(f"{db} exists but is not a finished build of {spec}: remove it or name another")
    return {**build(db, spec, report), "reused": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    spec = (SMOKE if args.smoke else SIZES)[args.size]
    print(json.dumps({"step": "build", "size": args.size,
                      **ensure(args.db, spec, lambda line: print(line, file=sys.stderr, flush=True))}))


if __name__ == "__main__":
    main()
