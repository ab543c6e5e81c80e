"""A uniform sample of full co-occurrence blocks, with the features that fired in each.

Each full block gets a pseudo-random 64-bit priority from where it is (its document's index in
the stream, its index within the document) and the sample is the `k` blocks of smallest
priority: a bottom-k sketch. That set depends on the corpus alone, never on batching, resumption
or how the stream was split between workers, and two partial samples merge exactly by keeping
the k smallest of their union.

Everything stays on the model's device; a kept block's features are an index list (COO rows of
(slot, feature)), so the sample costs k blocks' firing features, never a dense [k, F]. Only the
kept rows move to the CPU, at checkpoints and at commit.

A kept block keeps its token ids too: its text, with the exact set of features that fired in it,
is where the explanations' scorer (ingest.explain) finds text on which a feature never fired.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from catalog.errors import SaecatError

# The key (document << INDEX_BITS | index) is one-to-one for any index below 2^24 (no model's
# context is that long) and documents below 2^39, and splitmix64's finalizer is a bijection of
# 64-bit integers: distinct blocks never tie, so "the k smallest" is always one definite set.
INDEX_BITS = 24
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's constants as signed int64 (torch has no uint64 math)
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of int64 (torch's >> keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def block_priority(document: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """splitmix64(document << 24 | index) as signed int64; int64 arithmetic wraps like uint64's."""
    z = ((document << INDEX_BITS) | index) + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


class BlockSample:
    """The k full blocks of smallest priority, each with its place, group and fired features.

    Per kept block (a slot): priority, block (index among all full blocks, stream order),
    document, start (position of its first token), group (a code into `group_values`, -1 for
    none) and tokens (its `block_size` token ids, -1 where unknown). Its features are the COO pairs
    (member_slot, member_feature).
    """

    def __init__(self, d_sae: int, k: int, device: torch.device | str = "cpu", block_size: int = 256):
        self.d_sae, self.k, self.device = d_sae, k, torch.device(device)
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.priority, self.block, self.document, self.start, self.group = (empty.clone() for _ in range(5))
        self.tokens = torch.zeros(0, block_size, dtype=torch.int32, device=self.device)
        # int32 halves the bulk of the sample: k < 2^31 slots, d_sae < 2^31 features
        self.member_slot = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.member_feature = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.group_values: list[str] = []
        self._codes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.priority)

    def codes(self, groups: Sequence[str | None]) -> torch.Tensor:
        """Group values (one per document) as codes on the device; None -> -1."""
        if len(self.group_values) > 2 * self.k + 1024:
            self._compact()  # unique values per document (urls, ids) must not grow the table forever
        return torch.tensor([self._code(g) for g in groups], dtype=torch.int64).to(self.device)

    def _code(self, group: str | None) -> int:
        if group is None:
            return -1
        code = self._codes.get(group)
        if code is None:
            code = self._codes[group] = len(self.group_values)
            self.group_values.append(group)
        return code

    def _compact(self) -> None:
        used = torch.unique(self.group[self.group >= 0]).cpu()
        remap = torch.full((len(self.group_values),), -1, dtype=torch.int64)
        remap[used] = torch.arange(len(used))
        self.group = torch.where(self.group >= 0, remap.to(self.device)[self.group.clamp(min=0)], -1)
        self.group_values = [self.group_values[c] for c in used.tolist()]
        self._codes = {v: c for c, v in enumerate(self.group_values)}

    def add(self, members: tuple[torch.Tensor, torch.Tensor], *, block: torch.Tensor, document: torch.Tensor,
            index: torch.Tensor, start: torch.Tensor, group: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Offer full blocks, each with its global block index, document, index within the
        document, start, group code and token ids ([blocks, block_size]; None: unknown); members,
        (row, feature), says which features fired in which offered block (row: its place among
        the offered blocks)."""
        if not self.k or not len(block):
            return
        row, feature = members
        priority = block_priority(document, index)
        if tokens is None:
            tokens = torch.full((len(block), self.tokens.shape[1]), -1, dtype=torch.int32, device=self.device)
        if len(self) == self.k:
            # only blocks beating the current k-th smallest can enter: few, once the sample is full
            enter = priority < self.priority.max()
            renumber = torch.cumsum(enter, 0) - 1
            keep = enter[row]
            row, feature = renumber[row[keep]], feature[keep]
            priority, block, document, start, group, tokens = (
                t[enter] for t in (priority, block, document, start, group, tokens))
        self._merge(priority, block, document, start, group, tokens.to(torch.int32), row.to(torch.int32),
                    feature.to(torch.int32))

    def merge(self, other: "BlockSample") -> None:
        """Add another sample of a disjoint part of the stream (the union's k smallest stay)."""
        codes = self.codes(other.group_values)
        group = torch.where(other.group >= 0, codes[other.group.clamp(min=0)], -1) if len(codes) else other.group
        self._merge(other.priority, other.block, other.document, other.start, group, other.tokens,
                    other.member_slot, other.member_feature)

    def _merge(self, priority, block, document, start, group, tokens, slot, feature) -> None:
        n_old = len(self)
        columns = [torch.cat([old, new]) for old, new in zip(
            (self.priority, self.block, self.document, self.start, self.group, self.tokens),
            (priority, block, document, start, group, tokens))]
        member_slot = torch.cat([self.member_slot, slot + n_old])
        member_feature = torch.cat([self.member_feature, feature])
        if len(columns[0]) > self.k:
            keep = columns[0].argsort()[: self.k]
            new_slot = torch.full((len(columns[0]),), -1, dtype=torch.int32, device=self.device)
            new_slot[keep] = torch.arange(self.k, dtype=torch.int32, device=self.device)
            member_slot = new_slot[member_slot]
            stays = member_slot >= 0
            member_slot, member_feature = member_slot[stays], member_feature[stays]
            columns = [c[keep] for c in columns]
        self.priority, self.block, self.document, self.start, self.group, self.tokens = columns
        self.member_slot, self.member_feature = member_slot, member_feature

    def table(self, strings: Callable[[np.ndarray], np.ndarray] | None = None) -> pa.Table:
        """One row per kept block, by block: block, document, start, group_value, features (ascending)
        and tokens (their display strings, by `strings`; NULL where the ids are unknown)."""
        order = self.block.argsort()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=self.device)
        member_rank = rank[self.member_slot]  # int64, so the sort key below cannot overflow
        by = (member_rank * self.d_sae + self.member_feature).argsort()
        counts = torch.bincount(member_rank, minlength=len(order)).cpu().numpy()
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        values = np.array([*self.group_values, None], dtype=object)  # code -1 picks the trailing None
        return pa.table({
            "block": pa.array(self.block[order].cpu().numpy()),
            "document": pa.array(self.document[order].cpu().numpy()),
            "start": pa.array(self.start[order].to(torch.int32).cpu().numpy()),
            "group_value": pa.array(values[self.group[order].cpu().numpy()], pa.string()),
            "features": pa.ListArray.from_arrays(pa.array(offsets),
                                                 pa.array(self.member_feature[by].cpu().numpy(), pa.int32())),
            "tokens": self._token_strings(order, strings),
        })

    def _token_strings(self, order: torch.Tensor, strings: Callable[[np.ndarray], np.ndarray] | None) -> pa.Array:
        ids = self.tokens[order].cpu().numpy()
        known = (ids >= 0).all(axis=1)
        if strings is None or not known.any():
            return pa.nulls(len(ids), pa.list_(pa.string()))
        width = ids.shape[1]
        offsets = np.arange(len(ids) + 1, dtype=np.int32) * width
        values = pa.array(strings(np.where(ids >= 0, ids, 0).ravel()), pa.string())
        return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~known))

    # ---- checkpointing: plain tensors and a list of strings, which torch.load(weights_only) accepts

    _TENSORS = ("priority", "block", "document", "start", "group", "tokens", "member_slot", "member_feature")

    def state_dict(self) -> dict[str, torch.Tensor | list[str]]:
        return {**{f"sample_{n}": getattr(self, n).cpu() for n in self._TENSORS},
                "sample_group_values": list(self.group_values)}

    def load_state_dict(self, state: dict) -> None:
        if "sample_tokens" not in state:
            raise SaecatError("this run's checkpoint comes from an older saecat, whose block sample has no text: "
                              "start over with --restart")
        for name in self._TENSORS:
            setattr(self, name, state[f"sample_{name}"].to(self.device))
        self.group_values = list(state["sample_group_values"])
        self._codes = {v: c for c, v in enumerate(self.group_values)}
