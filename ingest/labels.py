"""Feature labels as catalog tables: logit-lens tokens, top examples, activation histograms.

Everything here runs once per SAE after counting, vectorised over features; token ids become
strings through one decode per distinct id.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ingest.accumulate import FeatureAccumulator

# Logit rows computed at once: [chunk, d_vocab] float32 stays near 256 MB even for 262k-token vocabularies.
LOGIT_BUDGET = 2**28


@torch.inference_mode()
def logit_lens(decoders: torch.Tensor, unembed: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Top and bottom k tokens of decoders @ unembed per feature: (top_ids, top_logits, bottom_ids,
    bottom_logits), each [d_sae, k]."""
    d_vocab = unembed.shape[1]
    k = min(k, d_vocab)
    chunk = max(1, LOGIT_BUDGET // (4 * d_vocab))
    parts = []
    for start in range(0, len(decoders), chunk):
        logits = decoders[start: start + chunk].to(unembed.dtype) @ unembed
        top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return tuple(torch.cat([p[n] for p in parts]).cpu() for n in range(4))


class TokenStrings:
    """Token id -> display string, decoding each distinct id once."""

    def __init__(self, tokenizer, ids: np.ndarray):
        self.ids = np.unique(ids[ids >= 0])
        self.strings = np.array([tokenizer.decode([int(i)]) for i in self.ids], dtype=object)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.strings[np.searchsorted(self.ids, ids)]


def _feature_tokens(lens: tuple[torch.Tensor, ...], strings: TokenStrings) -> pa.Table:
    top_ids, top_logits, bottom_ids, bottom_logits = (t.numpy() for t in lens)
    d_sae, k = top_ids.shape
    ids = np.concatenate([top_ids.ravel(), bottom_ids.ravel()])
    return pa.table({
        "feature": np.tile(np.repeat(np.arange(d_sae, dtype=np.int32), k), 2),
        "direction": np.repeat(np.array(["top", "bottom"], dtype=object), d_sae * k),
        "rank": np.tile(np.arange(k, dtype=np.int32), 2 * d_sae),
        "token_id": ids.astype(np.int32),
        "token": strings(ids),
        "logit": np.concatenate([top_logits.ravel(), bottom_logits.ravel()]).astype(np.float32),
    })


def _feature_examples(acc: FeatureAccumulator, strings: TokenStrings) -> pa.Table:
    ex = acc.examples
    values = ex.values.cpu().numpy()
    feature, rank = np.nonzero(values > acc.threshold)  # only examples where the feature fired
    window = ex.window.cpu().numpy()[feature, rank]  # [n, 2 * context + 1]
    inside = window >= 0
    offsets = np.concatenate([[0], np.cumsum(inside.sum(1))]).astype(np.int32)
    context = pa.ListArray.from_arrays(pa.array(offsets), pa.array(strings(window[inside]), pa.string()))
    return pa.table({
        "feature": feature.astype(np.int32),
        "rank": rank.astype(np.int32),
        "activation": values[feature, rank],
        "document": ex.document.cpu().numpy()[feature, rank],
        "position": ex.position.cpu().numpy()[feature, rank].astype(np.int32),
        "token": strings(window[:, ex.context]),
        "context": context,
        "center": inside[:, : ex.context].sum(1).astype(np.int32),
    })


def _feature_histograms(acc: FeatureAccumulator) -> pa.Table:
    counts = acc.histogram.counts.cpu().numpy()
    feature, bin_ = np.nonzero(counts)
    lower, upper = (np.asarray(b) for b in acc.histogram.bounds())
    lower = np.where(np.isfinite(lower), lower, acc.threshold)  # the first bin starts at the threshold
    return pa.table({
        "feature": feature.astype(np.int32), "bin": bin_.astype(np.int32),
        "lower": lower[bin_], "upper": upper[bin_], "count": counts[feature, bin_],
    })


def label_tables(acc: FeatureAccumulator, decoders: torch.Tensor, unembed: torch.Tensor | None, tokenizer,
                 logit_k: int) -> dict[str, pa.Table]:
    """The three label tables of one SAE. Without an unembedding of the decoders' width (e.g.
    an SAE on attention heads' z), there are no logit-lens rows."""
    lens = None
    if unembed is not None and unembed.shape[0] == decoders.shape[1] and logit_k > 0:
        lens = logit_lens(decoders.to(unembed.device), unembed, logit_k)
    window_ids = acc.examples.window.cpu().numpy()
    lens_ids = np.concatenate([lens[0].numpy().ravel(), lens[2].numpy().ravel()]) if lens else np.zeros(0, int)
    strings = TokenStrings(tokenizer, np.concatenate([window_ids.ravel(), lens_ids]))
    tables = {"feature_examples": _feature_examples(acc, strings), "feature_histograms": _feature_histograms(acc)}
    if lens is not None:
        tables["feature_tokens"] = _feature_tokens(lens, strings)
    return tables
