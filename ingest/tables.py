"""What one ingestion writes to the catalog, as Arrow: the features (decoder rows and counts), the
co-occurring pairs the policy keeps, and the other per-SAE tables (labels, blocks, spectrum)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ingest.accumulate import FeatureAccumulator, Pairs
from ingest.labels import label_tables
from ingest.pair_policy import PairPolicy, select
from ingest.sources import LoadedSae


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
            policy: PairPolicy = PairPolicy(), kept: Pairs | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """features, cooccurrence (the pairs the policy keeps), and the SAE's other tables by name
    (labels, blocks, spectrum). `kept`: the out-of-core pair pass's pairs, already the policy's
    (select is not idempotent with a top: it is not applied again); else the accumulator's tiles."""
    decoders = loaded.sae.W_dec.detach().to(torch.float32)
    stats = acc.results()
    dec = decoders.cpu().numpy()
    features = pa.table({
        "feature": pa.array(np.arange(len(dec), dtype=np.int32)),
        "decoder": pa.FixedSizeListArray.from_arrays(pa.array(dec.ravel()), dec.shape[1]).cast(pa.list_(pa.float32())),
        "decoder_norm": pa.array(np.linalg.norm(dec, axis=1).astype(np.float32)),
        "fire_count": pa.array(stats["fire_count"]),
        "block_count": pa.array(stats["block_count"]),
        "max_activation": pa.array(stats["max_activation"], from_pandas=True),
        "mean_activation": pa.array(stats["mean_activation"], from_pandas=True),
    })
    pairs = kept if kept is not None else acc.pairs.pairs()
    i, j, n11 = pairs.i, pairs.j, pairs.n11
    if kept is None and not policy.complete:
        keep = select(policy, i, j, n11, stats["block_count"], acc.n_blocks)  # block_count: the Gram's diagonal
        i, j, n11 = i[keep], j[keep], n11[keep]
    pair_table = pa.table({"i": i, "j": j, "n11": n11})
    unembed = getattr(model, "W_U", None)
    extra = label_tables(acc, decoders, None if unembed is None else unembed.detach(), model.tokenizer, logit_k)
    extra["blocks"] = acc.sample.table()
    extra["activation_spectrum"] = _spectrum_table(acc)
    return features, pair_table, extra
