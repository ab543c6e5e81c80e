"""An ingestion's memory budget: what each part of the run holds, and how the pair counts fit.

`--memory-budget` (default: half of the machine's memory on the CPU, half of the GPU's memory on
CUDA) bounds everything the run holds, part by part (RunMemory):

- resident, for the whole run: what the process held before the run began (on the CPU: the
  interpreter, its libraries and whatever the caller keeps, measured; 0 on a GPU, whose budget is
  the device's memory), the model up to the hook (its parameters, or on the CPU what loading it
  added when that is more: its tokenizer, the loader's leftovers), the SAE's parameters, and the
  per-feature counting state (top examples, activation histogram, float sums; a checkpoint is
  read back memory-mapped, so it is counted once);
- while streaming: the chunk of tokens being encoded (their dense [tokens, d_sae] activations,
  ENCODE_COPIES times over for the encoder's temporaries at their peak; at most ACTIVATION_BUDGET
  per copy, fewer tokens when the budget is tight); what a batch's firings take besides is
  proportional to L0, not to d_sae;
  on Ray, the driver's merging of a task's counters too (the state it returns and the counters
  it is loaded into: twice the per-feature state, and twice the tiles on the dense path);
- the pair counts, exact either way, so the budget never changes a result, only how it is computed:
  "dense", PairCounter's float32 tiles of the F x F Gram's upper triangle (ingest.accumulate) and
  its buffer of block rows, in memory for the whole stream, when they fit beside the rest at its
  full encoding chunk; else
  "blocks": each full block's firing set goes to disk (ingest.blockpairs.BlockSets, in the run's
  checkpoint folder, about 4 bytes per firing per block) and after the stream the out-of-core pair
  pass (ingest.blockpairs.count_pairs) counts n11 band by band within what the resident part leaves.
- while the SAE is written: the kept pairs, and DuckDB's buffers, limited to what the resident
  part, the tiles and the kept pairs leave (at least DUCKDB_FLOOR), as the tables stream in batch
  by batch (ingest.tables).

On Ray (ingest.distributed) the plan is each process's: every worker holds the resident part and
its encoding chunk too (and its part's block sets out of core, in place of tiles), but does not merge.

The path is part of the checkpoint, not of the run's identity: a resumed run keeps its
checkpoint's path (a dense checkpoint under a budget its tiles no longer fit is refused).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from catalog.errors import SaecatError
from catalog.limits import format_size, parse_size, physical_memory
from ingest.accumulate import FLUSH_BLOCKS, TILE
from ingest.blockpairs import FEATURE_BYTES, PAIR_BYTES
from ingest.examples import HIST_EDGES

BUDGET_SHARE = 2  # the default budget: 1/2 of the device's memory
DUCKDB_FLOOR = 2**29  # DuckDB's least memory limit for writing an SAE (~2 x 8 MB batches per thread in flight)
DENSE, BLOCKS = "dense", "blocks"


def default_budget(device: str) -> int:
    """Half of the machine's memory on the CPU; half of the GPU's memory on CUDA."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory // BUDGET_SHARE
    return physical_memory() // BUDGET_SHARE


def process_memory(device: str) -> int:
    """What this process holds, as the budget counts it: its anonymous resident memory on the CPU
    (file-backed pages, such as a memory-mapped SAE's, are the kernel's to drop); 0 on a GPU, whose
    budget is the device's memory, or where /proc is missing."""
    if str(device).startswith("cuda"):
        return 0
    try:
        return int(re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    except (OSError, TypeError):  # no /proc, or no RssAnon line in it
        return 0


def budget_bytes(value: str | int | None, device: str) -> int:
    """--memory-budget in bytes: `value` (512MB, 8GiB, ...) or the device's default."""
    if value is None:
        return default_budget(device)
    size = parse_size(value)
    if size <= 0:
        raise SaecatError(f"--memory-budget must be a positive size, not {value!r}")
    return size


def dense_tile_bytes(d_sae: int, tile: int = TILE) -> int:
    """What PairCounter allocates: float32 tiles over the upper triangle, diagonal tiles whole,
    and its buffer of block rows (bool, then float32 at a flush)."""
    tile = min(tile, d_sae)
    widths = [min(tile, d_sae - s) for s in range(0, d_sae, tile)]
    tiles = 4 * sum(widths[p] * widths[q] for p in range(len(widths)) for q in range(p, len(widths)))
    return tiles + 5 * FLUSH_BLOCKS * d_sae


# At most this many bytes of dense SAE activations ([tokens, d_sae] float32) exist at once: 8,192
# tokens at 16k latents, 128 at 1M; the encoder runs over a batch's tokens in chunks of that size.
ACTIVATION_BUDGET = 2**29
# Such tensors one chunk's encoding holds at its peak: sae-lens' JumpReLU and gated encoders make
# the pre-activation, its ReLU, a mask as floats and their product (4-5, measured by the peak RSS
# at 262k and 1M latents; standard and top-k make 2), then the firing mask.
ENCODE_COPIES = 5


def encode_tokens(d_sae: int) -> int:
    """Tokens whose dense activations fit ACTIVATION_BUDGET: the encoding chunk when the budget allows."""
    return max(1, ACTIVATION_BUDGET // (4 * d_sae))


def feature_state_bytes(d_sae: int, top_k: int, context: int) -> int:
    """The per-feature counting state: top examples (value, document, position, an int32 token
    window and its float32 values), the histogram, three float64 sums."""
    example = 4 + 8 + 8 + 8 * (2 * context + 1)
    return d_sae * (max(top_k, 1) * example + 8 * (len(HIST_EDGES) + 1) + 3 * 8)


def module_bytes(module: torch.nn.Module) -> int:
    """What a module's parameters and buffers take."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class RunMemory:
    """What a run holds besides the pair counts, by part, in bytes."""

    baseline: int  # the process before the run: interpreter, libraries, the caller's own
    model: int
    sae: int
    features: int
    encode_tokens: int  # tokens encoded at once
    encoding: int  # their dense activations, ENCODE_COPIES times over
    merging: int = 0  # on Ray, the driver's: a task's counters while it merges them

    @property
    def resident(self) -> int:
        """Held for the whole run, through the pair pass too."""
        return self.baseline + self.model + self.sae + self.features

    @property
    def total(self) -> int:
        return self.resident + self.encoding + self.merging

    def describe(self) -> str:
        merging = f", merging a task's counters {format_size(self.merging)}" if self.merging else ""
        return (f"this process {format_size(self.baseline)}, model {format_size(self.model)}, SAE "
                f"{format_size(self.sae)}, per-feature state {format_size(self.features)}, encoding "
                f"{format_size(self.encoding)} ({self.encode_tokens:,} tokens at a time){merging}")


def run_memory(*, baseline: int, model: int, sae: int, d_sae: int, batch_tokens: int, top_k: int, context: int,
               merging: int = 0, budget: int | None = None) -> RunMemory:
    """The run's parts; the encoding chunk is ACTIVATION_BUDGET's (at most the batch), or smaller
    so that everything fits in `budget` bytes. Refuses a budget too small for one token."""
    features = feature_state_bytes(d_sae, top_k, context)
    per_token = ENCODE_COPIES * 4 * d_sae
    tokens = min(batch_tokens, encode_tokens(d_sae))
    if budget is not None:
        held = baseline + model + sae + features + merging
        if budget - held < per_token:
            merges = f", merging a task's counters ({format_size(merging)})" if merging else ""
            raise SaecatError(f"--memory-budget {format_size(budget)} is too small for this SAE: the model "
                              f"({format_size(model)}), the SAE ({format_size(sae)}), its per-feature state "
                              f"({format_size(features)}), this process's own memory ({format_size(baseline)})"
                              f"{merges} and one token's encoding need at least {format_size(held + per_token)}")
        tokens = min(tokens, (budget - held) // per_token)
    return RunMemory(baseline, model, sae, features, tokens, tokens * per_token, merging)


@dataclass(frozen=True)
class PairPlan:
    """How a run uses its budget: the co-occurrence path, the tiles' size, the other parts."""

    path: str  # DENSE or BLOCKS
    budget: int
    tile_bytes: int
    memory: RunMemory

    @property
    def room(self) -> int:
        """What the resident part leaves of the budget once the stream is done: for the
        out-of-core pair pass, then for the kept pairs and DuckDB's buffers while the SAE is written."""
        return self.budget - self.memory.resident

    def duckdb_limit(self, pairs: int) -> int:
        """DuckDB's memory limit while the SAE is written: what the resident part, the tiles (on the
        dense path) and the `pairs` bytes of kept pairs being written leave, but not below
        DUCKDB_FLOOR, the least its ordered inserts of streamed batches need."""
        return max(self.room - (self.tile_bytes if self.path == DENSE else 0) - pairs, DUCKDB_FLOOR)

    def describe(self) -> str:
        """One line for the start of the run and for `saecat status`."""
        parts = f"{self.memory.describe()}, within a budget of {format_size(self.budget)}"
        if self.path == DENSE:
            return f"pairs in memory ({format_size(self.tile_bytes)} of tiles); {parts}"
        return (f"pairs out of core (the tiles, {format_size(self.tile_bytes)}, do not fit): block sets go to disk "
                f"(~4 bytes per firing per block), then the pair pass counts them in "
                f"{format_size(self.room)}; {parts}")

    def to_json(self) -> dict:
        return {"pair_path": self.path, "memory_budget": self.budget, "tile_bytes": self.tile_bytes,
                "room": self.room,
                "memory": {**asdict(self.memory), "resident": self.memory.resident}}


def plan_pairs(d_sae: int, *, budget: int, baseline: int, model: int, sae: int, batch_tokens: int, top_k: int,
               context: int, merges: bool = False, resumed_path: str | None = None) -> PairPlan:
    """Dense tiles when they fit the budget beside the rest at its full encoding chunk, else block
    sets, the encoding chunk cut to what the budget leaves; a resumed run keeps its checkpoint's
    path. `merges`: the run is a Ray driver's, which merges its tasks' counters. Refuses, before
    the stream, a budget too small for the resident part and one token's encoding, or for the pair
    pass's per-feature arrays and a one-feature band."""
    parts = dict(baseline=baseline, model=model, sae=sae, d_sae=d_sae, batch_tokens=batch_tokens, top_k=top_k,
                 context=context)
    tiles, features = dense_tile_bytes(d_sae), feature_state_bytes(d_sae, top_k, context)
    full = run_memory(**parts, merging=2 * (features + tiles) if merges else 0)
    fits = tiles + full.total <= budget
    if resumed_path == DENSE and not fits:
        raise SaecatError(f"this run's checkpoint counts pairs in memory ({format_size(tiles)} of tiles), more "
                          f"than --memory-budget {format_size(budget)} leaves room for: raise --memory-budget to "
                          "resume it, or start over out of core with --restart")
    path = resumed_path or (DENSE if fits else BLOCKS)
    if path == DENSE:
        return PairPlan(path, budget, tiles, full)
    plan = PairPlan(path, budget, tiles, run_memory(**parts, merging=2 * features if merges else 0, budget=budget))
    least = (FEATURE_BYTES + PAIR_BYTES) * d_sae
    if plan.room < least:
        raise SaecatError(f"--memory-budget {format_size(budget)} is too small to count the pairs of {d_sae:,} "
                          f"features even out of core: {format_size(plan.memory.resident)} stay resident (this "
                          f"process, model, SAE, per-feature state) and the pair pass needs at least "
                          f"{format_size(least)} more")
    return plan
