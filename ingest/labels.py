"""Feature labels as Arrow record batches by feature range: logit-lens tokens, top examples,
activation histograms.

ingest.tables streams them into the catalog, so no label table exists whole, whatever d_sae is.
Each builder here makes the rows of a range of features, vectorised over them, in the order one
whole-table build would write; token ids become strings through one decode per distinct id,
however many batches ask for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from ingest.accumulate import FeatureAccumulator

if TYPE_CHECKING:
    from rich.progress import Progress

# Logit rows computed at once: [chunk, d_vocab] float32 stays near 256 MB even for 262k-token vocabularies.
LOGIT_BUDGET = 2**28
# The lens shows a progress bar from this many multiply-adds (d_sae x d_in x d_vocab) on: seconds on a CPU.
LENS_PROGRESS_WORK = 10**12

TOKENS_SCHEMA = pa.schema([("feature", pa.int32()), ("direction", pa.string()), ("rank", pa.int32()),
                           ("token_id", pa.int32()), ("token", pa.string()), ("logit", pa.float32())])
EXAMPLES_SCHEMA = pa.schema([("feature", pa.int32()), ("rank", pa.int32()), ("activation", pa.float32()),
                             ("document", pa.int64()), ("position", pa.int32()), ("token", pa.string()),
                             ("context", pa.list_(pa.string())), ("center", pa.int32()),
                             ("context_values", pa.list_(pa.float32()))])
HISTOGRAMS_SCHEMA = pa.schema([("feature", pa.int32()), ("bin", pa.int32()), ("lower", pa.float64()),
                               ("upper", pa.float64()), ("count", pa.int64())])

# One chunk of the lens: its first feature, then (ids int32, logits float32), each [n, k], top and bottom.
LensChunk = tuple[int, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _lens_bar(show: bool) -> Progress:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]logit lens"), BarColumn(), MofNCompleteColumn(), TextColumn("features"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not show)


# Rows in one matmul of the lens. BLAS rounds a row's logits by how many rows it multiplies at once
# (MKL with AVX-512: 1-3, 5 or 10 rows give other last bits than 4, 8 or 16), so every row goes
# through a block of exactly this many, zero-padded: the lens is the same whatever the chunking.
LENS_ROWS = 16


@torch.inference_mode()
def _lens_chunk(rows: torch.Tensor, unembed: torch.Tensor, k: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(ids int32, logits float32), each [n, k], of the top and the bottom k tokens of rows @ unembed.
    A function of its own, so the chunk's logits are freed before the next chunk's are made."""
    # float32 first, as the decoders are stored, then the unembedding's dtype
    rows = rows.to(torch.float32).to(unembed.device, unembed.dtype)
    n, pad = len(rows), -len(rows) % LENS_ROWS
    rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    logits = (rows.view(-1, LENS_ROWS, rows.shape[1]) @ unembed).view(-1, unembed.shape[1])[:n]
    return tuple((t.indices.to(torch.int32).cpu().numpy(), t.values.float().cpu().numpy())
                 for t in (logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)))


def logit_lens(decoders: torch.Tensor, unembed: torch.Tensor, k: int, progress: bool = False) -> Iterator[LensChunk]:
    """Top and bottom k tokens of decoders @ unembed, chunk by chunk of features (LOGIT_BUDGET
    bytes of logits each): only a chunk's decoder rows and logits are on the unembedding's device at
    once. With `progress`, a bar of features done, where the lens is enough work to wait for."""
    d_sae, d_vocab = len(decoders), unembed.shape[1]
    k = min(k, d_vocab)
    chunk = max(1, LOGIT_BUDGET // (4 * d_vocab))
    with _lens_bar(progress and d_sae * decoders.shape[1] * d_vocab >= LENS_PROGRESS_WORK) as bar:
        task = bar.add_task("logit lens", total=d_sae)
        for start in range(0, d_sae, chunk):
            top, bottom = _lens_chunk(decoders[start: start + chunk], unembed, k)
            bar.update(task, completed=min(start + chunk, d_sae))
            yield start, top, bottom


class TokenStrings:
    """Token id -> display string, decoding each distinct id once: the first time any batch asks."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.strings = np.empty(0, dtype=object)
        self.decoded = np.zeros(0, dtype=bool)  # by id: a boolean over the vocabulary, not every id seen

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and ids.max() >= len(self.decoded):
            grow = max(int(ids.max()) + 1, 2 * len(self.decoded)) - len(self.decoded)
            self.strings = np.concatenate([self.strings, np.empty(grow, dtype=object)])
            self.decoded = np.concatenate([self.decoded, np.zeros(grow, dtype=bool)])
        new = np.unique(ids[~self.decoded[ids]])
        self.strings[new] = [self.tokenizer.decode([int(i)]) for i in new]
        self.decoded[new] = True
        return self.strings[ids]


def _tokens_batch(direction: str, start: int, ids: np.ndarray, logits: np.ndarray,
                  strings: TokenStrings) -> pa.RecordBatch:
    n, k = ids.shape
    return pa.RecordBatch.from_pydict({
        "feature": np.repeat(np.arange(start, start + n, dtype=np.int32), k),
        "direction": pa.repeat(direction, n * k),
        "rank": np.tile(np.arange(k, dtype=np.int32), n),
        "token_id": ids.ravel(),
        "token": strings(ids.ravel()),
        "logit": logits.ravel(),
    }, schema=TOKENS_SCHEMA)


def token_batches(lens: Iterable[LensChunk], strings: TokenStrings) -> Iterator[pa.RecordBatch]:
    """feature_tokens' rows as ever: direction-major (every feature's top tokens, then every
    feature's bottom ones), then feature and rank. The bottom halves wait for the tops as int32 ids
    and float32 logits, 8k bytes a feature, so the lens is computed once."""
    bottoms = []
    for start, (top_ids, top_logits), bottom in lens:
        yield _tokens_batch("top", start, top_ids, top_logits, strings)
        bottoms.append((start, bottom))
    for start, (ids, logits) in bottoms:
        yield _tokens_batch("bottom", start, ids, logits, strings)


def example_bytes(acc: FeatureAccumulator) -> int:
    """About what one feature's example rows take in a batch: a string ref and its bytes a token."""
    return acc.examples.k * (acc.examples.window.shape[2] * 36 + 64)


def examples_batch(acc: FeatureAccumulator, strings: TokenStrings, start: int, stop: int) -> pa.RecordBatch:
    """feature_examples' rows of features [start, stop): each example where the feature fired, by rank."""
    ex = acc.examples
    values = ex.values[start:stop].cpu().numpy()
    feature, rank = np.nonzero(values > acc.threshold)
    window = ex.window[start:stop].cpu().numpy()[feature, rank]  # [n, 2 * context + 1]
    inside = window >= 0
    offsets = np.concatenate([[0], np.cumsum(inside.sum(1))]).astype(np.int32)
    context = pa.ListArray.from_arrays(pa.array(offsets), pa.array(strings(window[inside]), pa.string()))
    window_values = ex.window_values[start:stop].cpu().numpy()[feature, rank][inside]
    context_values = pa.ListArray.from_arrays(pa.array(offsets), pa.array(window_values, pa.float32()))
    return pa.RecordBatch.from_pydict({
        "feature": (feature + start).astype(np.int32),
        "rank": rank.astype(np.int32),
        "activation": values[feature, rank],
        "document": ex.document[start:stop].cpu().numpy()[feature, rank],
        "position": ex.position[start:stop].cpu().numpy()[feature, rank].astype(np.int32),
        "token": strings(window[:, ex.context]),
        "context": context,
        "center": inside[:, : ex.context].sum(1).astype(np.int32),
        "context_values": context_values,
    }, schema=EXAMPLES_SCHEMA)


def histogram_bytes(acc: FeatureAccumulator) -> int:
    """About what one feature's histogram takes in a batch: its counts and a row a bin at most."""
    return acc.histogram.n_bins * 40


def histograms_batch(acc: FeatureAccumulator, start: int, stop: int) -> pa.RecordBatch:
    """feature_histograms' rows of features [start, stop): the non-empty bins, by bin."""
    counts = acc.histogram.counts[start:stop].cpu().numpy()
    feature, bin_ = np.nonzero(counts)
    lower, upper = (np.asarray(b) for b in acc.histogram.bounds())
    lower = np.where(np.isfinite(lower), lower, acc.threshold)  # the first bin starts at the threshold
    return pa.RecordBatch.from_pydict({
        "feature": (feature + start).astype(np.int32), "bin": bin_.astype(np.int32),
        "lower": lower[bin_], "upper": upper[bin_], "count": counts[feature, bin_],
    }, schema=HISTOGRAMS_SCHEMA)
