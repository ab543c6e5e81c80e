"""What one ingestion writes to the catalog, as Arrow: the features (decoder rows and counts), the
co-occurring pairs the policy keeps, and the other per-SAE tables (labels, blocks, spectrum, quality).

The tables that grow with d_sae (features, feature_examples, feature_histograms, feature_tokens)
are streams of record batches by feature range, each about BATCH_BYTES, which DuckDB pulls one at a
time as it inserts them: nothing whole is built, and the logit lens runs while its rows are
written. The others (pairs, chosen by the policy, blocks, spectrum) are small tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ingest.accumulate import FeatureAccumulator, Pairs
from ingest.labels import (EXAMPLES_SCHEMA, HISTOGRAMS_SCHEMA, TOKENS_SCHEMA, TokenStrings, example_bytes,
                           examples_batch, histogram_bytes, histograms_batch, logit_lens, token_batches)
from ingest.pair_policy import PairPolicy, select
from ingest.sources import LoadedSae

# Bytes of one streamed batch, about. DuckDB's ordered insert holds up to about two batches a thread
# (29 measured with 16 threads), so 8 MB keeps a stream in flight near 250 MB.
BATCH_BYTES = 2**23

FEATURES_SCHEMA = pa.schema([("feature", pa.int32()), ("decoder", pa.list_(pa.float32())),
                             ("decoder_norm", pa.float32()), ("fire_count", pa.int64()),
                             ("block_count", pa.int64()), ("max_activation", pa.float32()),
                             ("mean_activation", pa.float32())])


def stream(schema: pa.Schema, n: int, feature_bytes: int,
           batch: Callable[[int, int], pa.RecordBatch]) -> pa.RecordBatchReader:
    """The rows of features [0, n) as a reader of batch(start, stop), a range of about BATCH_BYTES
    each, built only when the reader's consumer asks for it."""
    step = max(1, BATCH_BYTES // max(1, feature_bytes))
    return pa.RecordBatchReader.from_batches(schema, (batch(s, min(s + step, n)) for s in range(0, n, step)))


def _features_batch(decoders: torch.Tensor, stats: dict[str, np.ndarray], start: int, stop: int) -> pa.RecordBatch:
    dec = decoders[start:stop].to(torch.float32).cpu().numpy()  # a view where W_dec is float32 on the CPU
    n, d = dec.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))  # int32: a batch is far below 2^31 floats
    return pa.RecordBatch.from_pydict({
        "feature": np.arange(start, stop, dtype=np.int32),
        "decoder": pa.ListArray.from_arrays(offsets, pa.array(dec.ravel())),
        "decoder_norm": np.linalg.norm(dec, axis=1).astype(np.float32),
        "fire_count": stats["fire_count"][start:stop],
        "block_count": stats["block_count"][start:stop],
        "max_activation": pa.array(stats["max_activation"][start:stop], from_pandas=True),  # NaN: never fired
        "mean_activation": pa.array(stats["mean_activation"][start:stop], from_pandas=True),
    }, schema=FEATURES_SCHEMA)


def _spectrum_table(acc: FeatureAccumulator) -> pa.Table:
    eigenvalues = acc.spectrum()
    return pa.table({"rank": pa.array(np.arange(1, len(eigenvalues) + 1, dtype=np.int32)),
                     "eigenvalue": pa.array(eigenvalues, pa.float64())})


def policy_columns(policy: PairPolicy) -> dict[str, Any]:
    """The policy as `saes` records it: the ranking only where there is a top to rank for."""
    return {"pair_min_blocks": policy.min_blocks, "pair_top_partners": policy.top_partners,
            "pair_rank_by": None if policy.top_partners is None else policy.rank_by,
            "pairs_complete": policy.complete}


def sae_tables(loaded: LoadedSae, acc: FeatureAccumulator, model, logit_k: int,
               policy: PairPolicy = PairPolicy(), kept: Pairs | None = None, progress: bool = False,
               ) -> tuple[pa.RecordBatchReader, pa.Table, dict[str, pa.Table | pa.RecordBatchReader]]:
    """features (a stream), cooccurrence (the pairs the policy keeps), and the SAE's other tables by
    name: the label streams, blocks, spectrum and quality. Each stream can be read once, by commit_sae.
    `kept`: the out-of-core pair pass's pairs, already the policy's (select is not idempotent with a
    top: it is not applied again); else the accumulator's tiles. `progress`: the lens's progress bar.
    Without an unembedding of the decoders' width (e.g. an SAE on attention heads' z), there are no
    logit-lens rows."""
    decoders = loaded.sae.W_dec.detach()
    d_sae, d_in = decoders.shape
    stats = acc.results()  # four numbers a feature: small beside the streams
    features = stream(FEATURES_SCHEMA, d_sae, 4 * d_in + 64, lambda s, e: _features_batch(decoders, stats, s, e))
    pairs = kept if kept is not None else acc.pairs.pairs()
    i, j, n11 = pairs.i, pairs.j, pairs.n11
    if kept is None and not policy.complete:
        keep = select(policy, i, j, n11, stats["block_count"], acc.n_blocks)  # block_count: the Gram's diagonal
        i, j, n11 = i[keep], j[keep], n11[keep]
    pair_table = pa.table({"i": i, "j": j, "n11": n11})

    strings = TokenStrings(model.tokenizer)  # shared: an id in both examples and lens is decoded once
    extra: dict[str, pa.Table | pa.RecordBatchReader] = {
        "feature_examples": stream(EXAMPLES_SCHEMA, d_sae, example_bytes(acc),
                                   lambda s, e: examples_batch(acc, strings, s, e)),
        "feature_histograms": stream(HISTOGRAMS_SCHEMA, d_sae, histogram_bytes(acc),
                                     lambda s, e: histograms_batch(acc, s, e)),
    }
    unembed = getattr(model, "W_U", None)
    if unembed is not None and unembed.shape[0] == d_in and logit_k > 0:
        lens = logit_lens(decoders, unembed.detach(), logit_k, progress)  # runs as DuckDB reads the rows
        extra["feature_tokens"] = pa.RecordBatchReader.from_batches(TOKENS_SCHEMA, token_batches(lens, strings))
    extra["blocks"] = acc.sample.table(strings)
    extra["activation_spectrum"] = _spectrum_table(acc)
    quality = acc.quality()
    if quality is not None:
        extra["sae_quality"] = pa.Table.from_pylist([quality])
    return features, pair_table, extra
