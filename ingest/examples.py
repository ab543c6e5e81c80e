"""Per-feature activation labels gathered during ingestion: top examples and histograms.

Both are updated batch by batch on the model's device, vectorised over features, and merge
exactly by top-k and by sum, like every other counter of an ingestion.
"""

from __future__ import annotations

import torch

# Histogram bins: log-spaced over 1e-3 .. 1e3, plus one bin below (threshold .. 1e-3] and one above.
HIST_EDGES = torch.logspace(-3, 3, 49, dtype=torch.float64)


class TopExamples:
    """The k highest activations of each feature over counted tokens, with where they were.

    Per feature and rank: activation, document (index in the stream), position (in the
    document, BOS at 0) and the token ids of a window of `context` tokens on each side (-1
    outside the document or on BOS). Only features whose batch maximum beats their current
    k-th best are re-ranked, so after the first batches a batch costs little more than a max.
    Ties are broken by whichever the top-k kernel returns first.
    """

    def __init__(self, d_sae: int, k: int = 20, context: int = 8, device: torch.device | str = "cpu"):
        self.k, self.context, self.device = k, context, torch.device(device)
        self.values = torch.full((d_sae, k), -torch.inf, dtype=torch.float32, device=self.device)
        self.document = torch.full((d_sae, k), -1, dtype=torch.int64, device=self.device)
        self.position = torch.full((d_sae, k), -1, dtype=torch.int64, device=self.device)
        self.window = torch.full((d_sae, k, 2 * context + 1), -1, dtype=torch.int64, device=self.device)

    def update(self, masked: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, documents: torch.Tensor,
               bos_offset: int) -> None:
        """masked: [docs, positions, F] activations with uncounted positions at -inf;
        tokens [docs, positions]; documents [docs], each row's index in the stream."""
        n_docs, width, d_sae = masked.shape
        flat = masked.reshape(n_docs * width, d_sae)
        better = (flat.amax(0) > self.values[:, -1]).nonzero().squeeze(1)
        if not len(better):
            return
        values, index = flat[:, better].topk(min(self.k, len(flat)), dim=0)  # [kk, C]
        row, pos = index // width, index % width
        offsets = torch.arange(-self.context, self.context + 1, device=self.device)
        grid = pos[..., None] + offsets  # [kk, C, window]
        inside = (grid >= bos_offset) & (grid < lengths.to(self.device)[row][..., None])
        window = tokens.to(self.device)[row[..., None], grid.clamp(0, width - 1)].masked_fill(~inside, -1)

        merged_values = torch.cat([self.values[better], values.T], dim=1)  # [C, k + kk]
        keep = merged_values.topk(self.k, dim=1).indices

        def pick(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            both = torch.cat([old[better], new], dim=1)
            gather_index = keep.reshape(*keep.shape, *([1] * (both.dim() - 2))).expand(-1, -1, *both.shape[2:])
            return both.gather(1, gather_index)

        self.values[better] = merged_values.gather(1, keep)
        self.document[better] = pick(self.document, documents.to(self.device)[row].T)
        self.position[better] = pick(self.position, pos.T)
        self.window[better] = pick(self.window, window.transpose(0, 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"top_values": self.values.cpu(), "top_document": self.document.cpu(),
                "top_position": self.position.cpu(), "top_window": self.window.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.values.copy_(state["top_values"])
        self.document.copy_(state["top_document"])
        self.position.copy_(state["top_position"])
        self.window.copy_(state["top_window"])


class ActivationHistogram:
    """Counts of each feature's firing activations in fixed log-spaced bins (see HIST_EDGES)."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.edges = HIST_EDGES.to(self.device, torch.float32)
        self.n_bins = len(self.edges) + 1
        self.counts = torch.zeros(d_sae, self.n_bins, dtype=torch.int64, device=self.device)

    def update(self, acts: torch.Tensor, fired: torch.Tensor) -> None:
        which = fired.nonzero()  # [n_firings, 3]: doc, position, feature
        bins = torch.bucketize(acts[fired], self.edges)
        flat = which[:, 2] * self.n_bins + bins
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts)

    def bounds(self) -> tuple[list[float], list[float]]:
        """Lower and upper bound of each bin (the first starts at the threshold, the last is open)."""
        edges = HIST_EDGES.tolist()
        return [float("-inf"), *edges], [*edges, float("inf")]
