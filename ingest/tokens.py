"""From texts to padded token batches, with the counting semantics pinned down.

Each document is tokenized on its own, gets the BOS token when the SAE was trained with one,
and is truncated to `max_doc_tokens` (BOS included). Documents are packed into batches of at
most `batch_tokens` padded positions, right-padded: with causal attention, padding after a
document cannot change its activations, and it is never counted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from ingest.text import Document


@dataclass
class Batch:
    tokens: torch.Tensor  # [n_docs, max_len] int64, right-padded
    lengths: torch.Tensor  # [n_docs] real length of each document, BOS included
    n_documents: int  # documents consumed from the stream, empty ones included
    offsets: torch.Tensor  # [n_docs] each row's place among those n_documents (empty ones are skipped)
    groups: list[str | None]  # each row's group value (None without a group column)


def tokenize(texts: list[str], tokenizer, bos_id: int | None, max_doc_tokens: int) -> list[np.ndarray]:
    """Token ids per text: BOS (if any) + the text's tokens, cut to max_doc_tokens."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    prefix = [] if bos_id is None else [bos_id]
    return [np.asarray((prefix + list(doc))[:max_doc_tokens], dtype=np.int64) for doc in ids]


def batches(texts: Iterable[str | Document], tokenizer, *, bos_id: int | None, max_doc_tokens: int,
            batch_tokens: int, max_tokens: int | None = None, pad_id: int = 0, chunk: int = 64) -> Iterator[Batch]:
    """Pack documents (texts, or Documents with a group value), in stream order, into padded batches.

    `max_tokens` caps the counted tokens (BOS excluded): the document that reaches the cap is cut
    so the total is exact, and the stream stops there.
    """
    bos_offset = 0 if bos_id is None else 1
    budget = max_tokens
    pending: list[np.ndarray] = []
    offsets: list[int] = []
    groups: list[str | None] = []
    consumed = 0  # documents taken from the stream since the last yielded batch
    width = 0

    def emit() -> Batch:
        nonlocal pending, offsets, groups, consumed, width
        lengths = torch.tensor([len(d) for d in pending], dtype=torch.int64)
        tokens = torch.full((len(pending), int(lengths.max())), pad_id, dtype=torch.int64)
        for row, doc in enumerate(pending):
            tokens[row, : len(doc)] = torch.from_numpy(doc)
        batch = Batch(tokens, lengths, consumed, torch.tensor(offsets, dtype=torch.int64), groups)
        pending, offsets, groups, consumed, width = [], [], [], 0, 0
        return batch

    stream = (Document(t) if isinstance(t, str) else t for t in texts)
    while docs_chunk := list(itertools.islice(stream, chunk)):
        ids = tokenize([d.text for d in docs_chunk], tokenizer, bos_id, max_doc_tokens)
        for doc, group in zip(ids, (d.group for d in docs_chunk)):
            counted = len(doc) - bos_offset
            if budget is not None and counted > budget:
                doc, counted = doc[: bos_offset + budget], budget
            if counted > 0 and pending and max(width, len(doc)) * (len(pending) + 1) > batch_tokens:
                yield emit()
            consumed += 1
            if counted <= 0:
                continue  # empty document: consumed, nothing to count
            pending.append(doc)
            offsets.append(consumed - 1)
            groups.append(group)
            width = max(width, len(doc))
            if budget is not None:
                budget -= counted
                if budget == 0:
                    yield emit()
                    return
    if pending:
        yield emit()
