"""An ingestion's memory budget, and which way it counts co-occurrence within it.

`--memory-budget` (default: half of the machine's memory on the CPU, half of the GPU's memory on
CUDA) bounds what the run holds. The pair counts come one of two ways, both exact, so the budget
never changes a result, only how it is computed:

- "dense": PairCounter's float32 tiles of the F x F Gram's upper triangle, in memory for the whole
  stream (ingest.accumulate), when they fit within the budget less what else the run holds;
- "blocks": otherwise each full block's firing set goes to disk (ingest.blockpairs.BlockSets, in
  the run's checkpoint folder, about 4 bytes per firing per block), and after the stream the
  out-of-core pair pass (ingest.blockpairs.count_pairs) counts n11 band by band within the budget.

What else the run holds during the stream (the margin), in bytes:

    4 x the batch's dense activations (tokens x F x 4: the activations, the firing mask and
    the block rows) + 3 x the SAE's weights (d_in x F x 4: encoder, decoder, a copy) + the
    per-feature state (top examples, twice while merging, and the activation histogram).

The path is part of the checkpoint, not of the run's identity: a resumed run keeps its
checkpoint's path (a dense checkpoint under a budget its tiles no longer fit is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catalog.errors import SaecatError
from catalog.limits import format_size, parse_size, physical_memory
from ingest.accumulate import TILE
from ingest.blockpairs import FEATURE_BYTES, PAIR_BYTES
from ingest.examples import HIST_EDGES

BUDGET_SHARE = 2  # the default budget: 1/2 of the device's memory
DENSE, BLOCKS = "dense", "blocks"


def default_budget(device: str) -> int:
    """Half of the machine's memory on the CPU; half of the GPU's memory on CUDA."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory // BUDGET_SHARE
    return physical_memory() // BUDGET_SHARE


def budget_bytes(value: str | int | None, device: str) -> int:
    """--memory-budget in bytes: `value` (512MB, 8GiB, ...) or the device's default."""
    if value is None:
        return default_budget(device)
    size = parse_size(value)
    if size <= 0:
        raise SaecatError(f"--memory-budget must be a positive size, not {value!r}")
    return size


def dense_tile_bytes(d_sae: int, tile: int = TILE) -> int:
    """What PairCounter allocates: float32 tiles over the upper triangle, diagonal tiles whole."""
    tile = min(tile, d_sae)
    widths = [min(tile, d_sae - s) for s in range(0, d_sae, tile)]
    return 4 * sum(widths[p] * widths[q] for p in range(len(widths)) for q in range(p, len(widths)))


def run_margin(d_sae: int, d_in: int, batch_tokens: int, top_k: int, context: int) -> int:
    """What the run holds besides the pair counts (the module docstring's formula)."""
    per_feature = 2 * max(top_k, 1) * (4 + 8 + 8 + 8 * (2 * context + 1)) + 8 * (len(HIST_EDGES) + 1)
    return 4 * batch_tokens * d_sae * 4 + 3 * d_in * d_sae * 4 + per_feature * d_sae


@dataclass(frozen=True)
class PairPlan:
    """How a run counts co-occurrence: its path, what the dense tiles would take, the budget."""

    path: str  # DENSE or BLOCKS
    budget: int
    tile_bytes: int
    margin: int

    def describe(self) -> str:
        """One line for the start of the run and for `saecat status`."""
        if self.path == DENSE:
            return (f"pairs in memory: {format_size(self.tile_bytes)} of tiles + {format_size(self.margin)} "
                    f"for the rest, within a budget of {format_size(self.budget)}")
        return (f"pairs out of core: the tiles ({format_size(self.tile_bytes)}) + the rest "
                f"({format_size(self.margin)}) exceed the budget of {format_size(self.budget)}, so block sets "
                "go to disk (~4 bytes per firing per block) and pairs are counted after the stream")

    def to_json(self) -> dict:
        return {"pair_path": self.path, "memory_budget": self.budget, "tile_bytes": self.tile_bytes,
                "margin_bytes": self.margin}


def plan_pairs(d_sae: int, d_in: int, *, budget: int, batch_tokens: int, top_k: int, context: int,
               resumed_path: str | None = None) -> PairPlan:
    """Dense tiles when they fit the budget less the margin, else block sets; a resumed run keeps
    its checkpoint's path. Refuses a budget too small for even the out-of-core pass's per-feature
    arrays and a one-feature band, before the stream rather than after it."""
    tiles, margin = dense_tile_bytes(d_sae), run_margin(d_sae, d_in, batch_tokens, top_k, context)
    fits = tiles + margin <= budget
    if resumed_path == DENSE and not fits:
        raise SaecatError(f"this run's checkpoint counts pairs in memory ({format_size(tiles)} of tiles), more "
                          f"than --memory-budget {format_size(budget)} leaves room for: raise --memory-budget to "
                          "resume it, or start over out of core with --restart")
    path = resumed_path or (DENSE if fits else BLOCKS)
    if path == BLOCKS:
        least = (FEATURE_BYTES + PAIR_BYTES) * d_sae
        if budget < least:
            raise SaecatError(f"--memory-budget {format_size(budget)} is too small to count the pairs of "
                              f"{d_sae:,} features even out of core (at least {format_size(least)})")
    return PairPlan(path, budget, tiles, margin)
