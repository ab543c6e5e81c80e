"""Per-feature activation labels gathered during ingestion: top examples and histograms.

Both are updated batch by batch on the model's device, vectorised over features, and merge
exactly by top-k and by sum, like every other counter of an ingestion.
"""

from __future__ import annotations

import torch

from catalog.errors import SaecatError

# Histogram bins: log-spaced over 1e-3 .. 1e3, plus one bin below (threshold .. 1e-3] and one above.
HIST_EDGES = torch.logspace(-3, 3, 49, dtype=torch.float64)
MERGE_FEATURES = 4096  # features whose top examples are merged at once (see TopExamples.update)


class TopExamples:
    """The k highest firing activations of each feature, with where they were.

    Per feature and rank: activation, document (index in the stream), position (in the
    document, BOS at 0), the token ids of a window of `context` tokens on each side (-1
    outside the document or on BOS) and the feature's activation at each of them (0 where it
    did not fire: at or below the threshold). Ranks are by activation, ties going to the earlier token in
    stream order: a total order, so the top k depend neither on batching nor on the order parts
    of the stream are counted in, and partial top-k lists merge exactly. Only firings (activations above the threshold) are ranked, so a feature that
    fired fewer than k times keeps -inf fillers, and one that never fired has no best activation.
    """

    def __init__(self, d_sae: int, k: int = 20, context: int = 8, device: torch.device | str = "cpu"):
        self.k, self.context, self.device = k, context, torch.device(device)
        self.values = torch.full((d_sae, k), -torch.inf, dtype=torch.float32, device=self.device)
        self.document = torch.full((d_sae, k), -1, dtype=torch.int64, device=self.device)
        self.position = torch.full((d_sae, k), -1, dtype=torch.int64, device=self.device)
        # token ids fit int32 (vocabularies < 2^31): the windows are most of the state, 1.4 GB at 1M latents
        self.window = torch.full((d_sae, k, 2 * context + 1), -1, dtype=torch.int32, device=self.device)
        self.window_values = torch.zeros((d_sae, k, 2 * context + 1), dtype=torch.float32, device=self.device)

    def update(self, firings: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tokens: torch.Tensor,
               lengths: torch.Tensor, documents: torch.Tensor, bos_offset: int) -> None:
        """firings: (row, position, feature, activation) of every counted firing of the batch, in
        row-major order; tokens [rows, positions]; documents [rows], each row's index in the stream."""
        row, pos, feature, value = firings
        every = (row, pos, feature, value)  # the windows' values are looked up among all of them
        # A firing enters if it is not below the k-th best (ties are settled by stream place).
        beats = value >= self.values[feature, -1]
        row, pos, feature, value = row[beats], pos[beats], feature[beats], value[beats]
        if not len(value):
            return
        # Feature, then activation descending; stable sorts keep stream order among equal values.
        order = value.argsort(descending=True, stable=True)
        order = order[feature[order].argsort(stable=True)]
        row, pos, feature, value = row[order], pos[order], feature[order], value[order]
        rows, counts = torch.unique_consecutive(feature, return_counts=True)
        slot = torch.repeat_interleave(torch.arange(len(rows), device=self.device), counts)
        rank = torch.arange(len(value), device=self.device) - (torch.cumsum(counts, 0) - counts)[slot]
        keep = rank < self.k
        row, pos, value, slot, rank = row[keep], pos[keep], value[keep], slot[keep], rank[keep]
        tokens, lengths, documents = tokens.to(self.device), lengths.to(self.device), documents.to(self.device)
        # A few thousand features at a time: the windows and the merge take ~2 x (2k) x window x 8
        # bytes a feature, which over every feature a batch touches at 1M latents would be gigabytes.
        cuts = torch.searchsorted(slot, torch.arange(0, len(rows) + MERGE_FEATURES, MERGE_FEATURES,
                                                     device=self.device)).tolist()
        for first, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
            part = slice(lo, hi)
            r, p, s = row[part], pos[part], slot[part] - first * MERGE_FEATURES
            grid = p[:, None] + torch.arange(-self.context, self.context + 1, device=self.device)
            inside = (grid >= bos_offset) & (grid < lengths[r][:, None])
            window = tokens[r[:, None], grid.clamp(0, tokens.shape[1] - 1)].masked_fill(~inside, -1)
            chunk = rows[first * MERGE_FEATURES:(first + 1) * MERGE_FEATURES]
            window_values = _values_at(every, r, grid, chunk[s], tokens.shape[1]).masked_fill(~inside, 0)
            new = self._empty(len(chunk))
            for held, values in zip(new, (value[part], documents[r], p, window.to(torch.int32), window_values)):
                held[s, rank[part]] = values
            self._merge(chunk, *new)

    def merge(self, other: "TopExamples") -> None:
        """Fold in the top examples of another part of the same stream: the same top k as one pass."""
        better = (other.values[:, 0] >= self.values[:, -1]).nonzero().squeeze(1)
        for rows in better.split(MERGE_FEATURES):
            self._merge(rows, other.values[rows], other.document[rows], other.position[rows], other.window[rows],
                        other.window_values[rows])

    def _empty(self, n: int) -> tuple[torch.Tensor, ...]:
        return (torch.full((n, self.k), -torch.inf, dtype=torch.float32, device=self.device),
                torch.full((n, self.k), -1, dtype=torch.int64, device=self.device),
                torch.full((n, self.k), -1, dtype=torch.int64, device=self.device),
                torch.full((n, self.k, 2 * self.context + 1), -1, dtype=torch.int32, device=self.device),
                torch.zeros((n, self.k, 2 * self.context + 1), dtype=torch.float32, device=self.device))

    def _merge(self, rows: torch.Tensor, values: torch.Tensor, document: torch.Tensor, position: torch.Tensor,
               window: torch.Tensor, window_values: torch.Tensor) -> None:
        """Keep the best k of rows' held examples and the candidates [C, k], in the total order:
        by stream place, then stably by activation, whichever part of the stream came first."""
        merged = torch.cat([self.values[rows], values], dim=1)  # [C, 2k]
        place = torch.cat([self.document[rows], document], dim=1) * (1 << 32) + torch.cat(
            [self.position[rows], position], dim=1)
        order = place.argsort(dim=1, stable=True)
        keep = order.gather(1, merged.gather(1, order).argsort(dim=1, descending=True, stable=True))[:, : self.k]
        for held, new in zip((self.values, self.document, self.position, self.window, self.window_values),
                             (values, document, position, window, window_values)):
            both = torch.cat([held[rows], new], dim=1)
            index = keep.reshape(*keep.shape, *([1] * (both.dim() - 2))).expand(-1, -1, *both.shape[2:])
            held[rows] = both.gather(1, index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"top_values": self.values.cpu(), "top_document": self.document.cpu(),
                "top_position": self.position.cpu(), "top_window": self.window.cpu(),
                "top_window_values": self.window_values.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if "top_window_values" not in state:
            raise SaecatError("this run's checkpoint comes from an older saecat, without the examples' per-token "
                              "values: start over with --restart")
        self.values.copy_(state["top_values"])
        self.document.copy_(state["top_document"])
        self.position.copy_(state["top_position"])
        self.window.copy_(state["top_window"])
        self.window_values.copy_(state["top_window_values"])


def _values_at(firings: tuple[torch.Tensor, ...], row: torch.Tensor, grid: torch.Tensor, feature: torch.Tensor,
               width: int) -> torch.Tensor:
    """The activation of feature[i] at (row[i], grid[i, j]) among the batch's firings, 0 where it did
    not fire: one sorted key per firing and a binary search per window cell."""
    f_row, f_pos, f_feature, f_value = firings
    d = int(torch.maximum(f_feature.max(), feature.max())) + 1  # both non-empty: update returned otherwise
    keys, order = ((f_row * width + f_pos) * d + f_feature).sort()
    wanted = (row[:, None] * width + grid.clamp(0, width - 1)) * d + feature[:, None]
    at = torch.searchsorted(keys, wanted).clamp(max=len(keys) - 1)
    return torch.where(keys[at] == wanted, f_value[order][at], 0.0).to(torch.float32)


class ActivationHistogram:
    """Counts of each feature's firing activations in fixed log-spaced bins (see HIST_EDGES)."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.edges = HIST_EDGES.to(self.device, torch.float32)
        self.n_bins = len(self.edges) + 1
        self.counts = torch.zeros(d_sae, self.n_bins, dtype=torch.int64, device=self.device)

    def update(self, feature: torch.Tensor, values: torch.Tensor) -> None:
        """One count per firing: its feature and activation."""
        flat = feature * self.n_bins + torch.bucketize(values, self.edges)
        # a scatter of the batch's firings, not a bincount over every (feature, bin): that would
        # cost d_sae x bins per batch (400 MB at 1M latents) whatever the batch's size
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def bounds(self) -> tuple[list[float], list[float]]:
        """Lower and upper bound of each bin (the first starts at the threshold, the last is open)."""
        edges = HIST_EDGES.tolist()
        return [float("-inf"), *edges], [*edges, float("inf")]
