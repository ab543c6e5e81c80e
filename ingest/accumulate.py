"""The per-feature statistics of an ingestion, accumulated vectorised on the model's device.

Per batch of SAE activations [docs, positions, features], given as its Firings (the activations
above the threshold, listed; what the encoder hands over, chunk by chunk) or dense, with a mask of
counted positions (no BOS, no padding):

- token statistics: a histogram of firing activations (its total is the fire count), activation
  sums where firing (for the mean), and the top-k examples (the first is the maximum);
- block indicators: each document's counted tokens are cut into consecutive blocks of
  `block_size`; a full block's row says which features fired anywhere in it;
- pair counts n11 = X^T X over those block rows, accumulated as float32 tiles of the upper
  triangle of the F x F Gram matrix: F^2/2 * 4 bytes, plus F * TILE/2 * 4 for the diagonal tiles'
  lower halves (0.6 GB in all at 16k features, 8.9 GB at 65k), each tile updated in place by one
  fused matmul (addmm) per flush of buffered blocks.
  float32 holds every integer below 2^24 exactly, so counts stay exact up to 16.7M blocks
  (4.3G tokens at 256 per block); past that the counter refuses rather than round.
  block_count is the Gram diagonal, so it is not kept twice;
- a sample of those block rows (ingest.blocks.BlockSample: bottom-k by a hash of each block's
  place, so independent of batching) as index lists, for analyses that need whole blocks;
- the first two moments of the model's own activations at the hook (the SAE's input) over
  counted tokens, in float64: their covariance spectrum;
- the SAE's sparsity and fidelity over counted tokens (ingest.quality): sums of each token's
  reconstruction terms, in float64, and the number of tokens at each L0.

Every piece merges by sum, max or bottom-k, so partial states from interrupted runs or from
separate workers combine exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from catalog.errors import SaecatError
from ingest.blocks import BlockSample
from ingest.examples import ActivationHistogram, TopExamples
from ingest.evaluate import EVAL_SUMS, evaluation_row
from ingest.quality import QUALITY_SUMS, quality_row

TILE = 2048  # diagonal tiles compute a full square: narrower ones waste less; fastest on CPU (bench/README.md)
FLUSH_BLOCKS = 1024
EXACT_LIMIT = 2**24
SAMPLE_BLOCKS = 4096
SHARD_BATCHES = 64  # float sums restart every this many batches: the unit a distributed run hands out


@dataclass
class Firings:
    """Every activation above the threshold in a batch of shape [docs, positions, features], as a
    list in row-major order (doc, position, feature): what counting reads, at L0 entries per token
    where the dense batch holds d_sae. Encoders produce it chunk by chunk (ingest.pipeline.encode),
    so a batch's dense activations never exist whole."""

    doc: torch.Tensor
    at: torch.Tensor
    feature: torch.Tensor
    value: torch.Tensor
    shape: tuple[int, int]  # (docs, positions) of the batch
    # each token's reconstruction terms (ingest.quality.QUALITY_SUMS) [docs, positions, terms],
    # where the encoder computed them
    quality: torch.Tensor | None = None

    @classmethod
    def of(cls, acts: torch.Tensor, threshold: float) -> "Firings":
        """The firings of dense activations [docs, positions, features]."""
        doc, at, feature = (acts > threshold).nonzero().unbind(1)
        return cls(doc, at, feature, acts[doc, at, feature], (acts.shape[0], acts.shape[1]))


@dataclass
class Pairs:
    """Upper-triangle co-occurrence counts: i < j, n11 > 0, sorted by (i, j)."""

    i: np.ndarray
    j: np.ndarray
    n11: np.ndarray


class PairCounter:
    """n11 for every feature pair, as float32 tiles of the Gram matrix's upper triangle."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu", tile: int = TILE, flush_blocks: int = FLUSH_BLOCKS):
        self.d_sae = d_sae
        self.device = torch.device(device)
        self.tile = min(tile, d_sae)
        self.flush_blocks = flush_blocks
        self.starts = list(range(0, d_sae, self.tile))
        self.tiles: dict[tuple[int, int], torch.Tensor] = {
            (p, q): torch.zeros(self._width(p), self._width(q), dtype=torch.float32, device=self.device)
            for p in range(len(self.starts)) for q in range(p, len(self.starts))
        }
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self.n_blocks = 0

    def _width(self, p: int) -> int:
        return min(self.tile, self.d_sae - self.starts[p])

    def _cols(self, p: int) -> slice:
        return slice(self.starts[p], self.starts[p] + self._width(p))

    def add(self, blocks: torch.Tensor) -> None:
        """Add block indicator rows [n_blocks, d_sae] (bool)."""
        if len(blocks):
            if self.n_blocks + len(blocks) >= EXACT_LIMIT:
                raise SaecatError(f"more than {EXACT_LIMIT:,} blocks in one SAE: counts would lose exactness")
            self.n_blocks += len(blocks)
            self._buffer.append(blocks)
            self._buffered += len(blocks)
            if self._buffered >= self.flush_blocks:
                self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        x = torch.cat(self._buffer).to(torch.float32)
        self._buffer, self._buffered = [], 0
        for (p, q), tile in self.tiles.items():
            tile.addmm_(x[:, self._cols(p)].T, x[:, self._cols(q)])

    def merge(self, other: "PairCounter") -> None:
        """Add the counts of other blocks (integers below 2^24 in float32: exact in any order)."""
        if self.n_blocks + other.n_blocks >= EXACT_LIMIT:
            raise SaecatError(f"more than {EXACT_LIMIT:,} blocks in one SAE: counts would lose exactness")
        self.flush()
        other.flush()
        for key, tile in self.tiles.items():
            tile += other.tiles[key].to(self.device)
        self.n_blocks += other.n_blocks

    def diagonal(self) -> torch.Tensor:
        """n_ii: the number of blocks each feature fired in."""
        self.flush()
        return torch.cat([self.tiles[(p, p)].diagonal() for p in range(len(self.starts))]).to(torch.int64)

    def pairs(self) -> Pairs:
        """Every pair i < j with n11 > 0, in (i, j) order."""
        self.flush()
        chunks = []
        for p in range(len(self.starts)):
            # one row band at a time, so rows come out sorted by i, then j
            band = [(q, self.tiles[(p, q)]) for q in range(p, len(self.starts))]
            rows_i, rows_j, counts = [], [], []
            for q, tile in band:
                t = tile.triu(1) if q == p else tile
                nz = t.nonzero()
                rows_i.append(nz[:, 0] + self.starts[p])
                rows_j.append(nz[:, 1] + self.starts[q])
                counts.append(t[nz[:, 0], nz[:, 1]])
            i = torch.cat(rows_i)
            j = torch.cat(rows_j)
            n = torch.cat(counts)
            order = torch.argsort(i * self.d_sae + j)
            chunks.append((i[order], j[order], n[order]))
        return Pairs(
            i=torch.cat([c[0] for c in chunks]).to(torch.int32).cpu().numpy(),
            j=torch.cat([c[1] for c in chunks]).to(torch.int32).cpu().numpy(),
            n11=torch.cat([c[2] for c in chunks]).to(torch.int64).cpu().numpy(),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.flush()
        return {"pair_blocks": self.n_blocks, **{f"tile_{p}_{q}": t.cpu() for (p, q), t in self.tiles.items()}}

    def load_state_dict(self, state: dict) -> None:
        mine = {f"tile_{p}_{q}": tuple(t.shape) for (p, q), t in self.tiles.items()}
        theirs = {k: tuple(v.shape) for k, v in state.items() if k.startswith("tile_")}
        if mine != theirs:  # e.g. a checkpoint from a saecat with another TILE
            raise SaecatError("the checkpoint's pair counts are tiled differently from this saecat's, so the run "
                              "cannot resume from it: run the same command with --restart")
        self.n_blocks = state["pair_blocks"]
        for (p, q), tile in self.tiles.items():
            tile.copy_(state[f"tile_{p}_{q}"])


class ActivationMoments:
    """Sum of x and of x x^T over counted tokens' activations, float64 on the device: one matmul
    per batch, merged by sum, enough for the covariance at the end."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.d, self.device = d, torch.device(device)
        self.n = 0
        self.sum = torch.zeros(d, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=self.device)

    def update(self, x: torch.Tensor) -> None:
        """x: [tokens, d] activations of counted tokens."""
        if x.shape[-1] != self.d:
            raise SaecatError(f"activations at the hook are {x.shape[-1]} wide, expected {self.d}")
        x = x.to(torch.float64)
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer.addmm_(x.T, x)

    def merge(self, other: "ActivationMoments") -> None:
        self.n += other.n
        self.sum += other.sum.to(self.device)
        self.outer += other.outer.to(self.device)

    def spectrum(self) -> np.ndarray:
        """Eigenvalues of the covariance (centred, / (n - 1)), largest first; none below 2 tokens."""
        if self.n < 2:
            return np.zeros(0)
        s, outer = self.sum.cpu().numpy(), self.outer.cpu().numpy()
        cov = (outer - np.outer(s, s) / self.n) / (self.n - 1)
        return np.linalg.eigvalsh((cov + cov.T) / 2)[::-1].copy()

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"moments_n": self.n, "moments_sum": self.sum.cpu(), "moments_outer": self.outer.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["moments_n"]
        self.sum.copy_(state["moments_sum"])
        self.outer.copy_(state["moments_outer"])


@dataclass(frozen=True)
class StreamPlace:
    """Where the next batch starts: the batches, documents and full blocks of the stream before it."""

    batch: int = 0
    document: int = 0
    block: int = 0


class FloatSums:
    """The sums whose bits depend on the order of additions: activations where firing (for the
    mean), the hook activations' moments and the reconstruction terms.

    Each shard of `shard_batches` consecutive batches sums from zero, and shards are folded into
    the total in stream order, so the stream counted in one pass, resumed, or split into shards
    counted on separate workers in any order gives the same bits.
    """

    def __init__(self, d_sae: int, d_in: int | None, device: torch.device):
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.quality = torch.zeros(len(QUALITY_SUMS), dtype=torch.float64, device=device)
        self.evaluation = torch.zeros(len(EVAL_SUMS), dtype=torch.float64, device=device)
        self.moments = ActivationMoments(d_in, device) if d_in else None

    def add(self, other: "FloatSums") -> None:
        self.act_sum += other.act_sum.to(self.act_sum.device)
        self.quality += other.quality.to(self.quality.device)
        self.evaluation += other.evaluation.to(self.evaluation.device)
        if self.moments is not None:
            self.moments.merge(other.moments)

    def zero_(self) -> None:
        self.act_sum.zero_()
        self.quality.zero_()
        self.evaluation.zero_()
        if self.moments is not None:
            self.moments.n = 0
            self.moments.sum.zero_()
            self.moments.outer.zero_()

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor | int]:
        moments = self.moments.state_dict() if self.moments is not None else {}
        return {f"{prefix}act_sum": self.act_sum.cpu(), f"{prefix}quality": self.quality.cpu(),
                f"{prefix}evaluation": self.evaluation.cpu(),
                **{prefix + k: v for k, v in moments.items()}}

    def load_state_dict(self, state: dict, prefix: str = "") -> None:
        if f"{prefix}quality" not in state:
            raise SaecatError("this run's checkpoint comes from an older saecat, without the SAE's reconstruction "
                              "figures: start over with --restart")
        self.act_sum.copy_(state[f"{prefix}act_sum"])
        self.quality.copy_(state[f"{prefix}quality"])
        self.evaluation.copy_(state[f"{prefix}evaluation"])
        if self.moments is not None:
            self.moments.load_state_dict({k: state[prefix + k] for k in self.moments.state_dict()})


class FeatureAccumulator:
    """Everything counted per feature during one ingestion, or one worker's part of it.

    fire_count is the histogram's total and max_activation the best top example, so neither is
    kept twice. With d_in, the hook activations' moments are kept too. The stream is counted in
    shards of `shard_batches` batches: one accumulator counts them in order, or workers count
    shards anywhere (each from `begin(place)`) and `merge` gives the same state, bit for bit.
    """

    def __init__(self, d_sae: int, *, threshold: float = 0.0, block_size: int = 256, bos_offset: int = 1,
                 top_k: int = 20, context: int = 8, device: torch.device | str = "cpu", tile: int = TILE,
                 flush_blocks: int = FLUSH_BLOCKS, sample_blocks: int = SAMPLE_BLOCKS, d_in: int | None = None,
                 shard_batches: int = SHARD_BATCHES, pair_tiles: bool = True):
        self.d_sae, self.d_in = d_sae, d_in
        self.threshold = threshold
        self.block_size = block_size
        self.bos_offset = bos_offset
        self.shard_batches = shard_batches
        self.device = torch.device(device)
        self.histogram = ActivationHistogram(d_sae, self.device)
        self.examples = TopExamples(d_sae, max(top_k, 1), context, self.device)
        # without pair_tiles (an SAE too wide for them) no PairCounter: the full blocks' sets go to
        # block_sink only, and n_blocks and block_count come from it
        self.pairs = PairCounter(d_sae, self.device, tile, flush_blocks) if pair_tiles else None
        self.sample = BlockSample(d_sae, sample_blocks, self.device, block_size)
        # where each batch's full blocks' firing sets go (`add_sets(lengths, ids)`) besides the pair
        # counter: an ingest.blockpairs.BlockSets, when the out-of-core pair pass counts them after the stream
        self.block_sink = None
        self.open = FloatSums(d_sae, d_in, self.device)  # the shard in hand
        self.total = FloatSums(d_sae, d_in, self.device)  # shards [0, folded), folded in order
        self.pending: dict[int, FloatSums] = {}  # closed shards waiting for an earlier one
        self.open_shard: int | None = None
        self.folded = 0
        self.place = StreamPlace()
        self.n_tokens = 0
        self.n_documents = 0
        self.l0_counts = torch.zeros(0, dtype=torch.int64, device=self.device)  # counted tokens by their L0
        self.n_eval_tokens = 0  # counted tokens of the batches evaluated (ingest.evaluate)

    @property
    def n_blocks(self) -> int:
        if self.pairs is None:
            if self.block_sink is None:
                raise SaecatError("an accumulator without pair tiles needs a block_sink to count its blocks")
            return self.block_sink.n_blocks
        return self.pairs.n_blocks

    def block_count(self) -> np.ndarray:
        """The number of full blocks each feature fired in: the Gram diagonal, or the block sets' bincount."""
        if self.pairs is None:
            if self.block_sink is None:
                raise SaecatError("an accumulator without pair tiles needs a block_sink to count its blocks")
            return self.block_sink.block_count()
        return self.pairs.diagonal().cpu().numpy()

    def begin(self, place: StreamPlace) -> None:
        """Count from `place` on: the first batch of a shard anywhere in the stream."""
        if place.batch % self.shard_batches:
            raise SaecatError(f"a part of the stream must start on a shard: batch {place.batch} is not a multiple "
                              f"of {self.shard_batches}")
        self.end_shard()
        self.place = place

    def end_shard(self) -> None:
        """Close the shard in hand (done by update at each shard's last batch; call it where a
        worker's part or the stream ends) and fold what can be folded in stream order."""
        if self.open_shard is None:
            return
        if self.open_shard == self.folded:
            self.total.add(self.open)
            self.folded += 1
        else:
            closed = FloatSums(self.d_sae, self.d_in, self.device)
            closed.add(self.open)
            self.pending[self.open_shard] = closed
        self.open.zero_()
        self.open_shard = None
        self._fold_ready()

    def _fold_ready(self) -> None:
        """Fold the pending shards that now follow the folded ones."""
        while self.folded in self.pending:
            self.total.add(self.pending.pop(self.folded))
            self.folded += 1

    def merge(self, other: "FeatureAccumulator") -> None:
        """Add another accumulator's counts of other shards of the same stream. Without pair tiles,
        its blocks' firing sets are the caller's to append to this one's block_sink."""
        self.end_shard()
        other.end_shard()
        mine = set(self.pending) | set(range(self.folded))
        theirs = set(other.pending) | set(range(other.folded))
        if mine & theirs:
            raise SaecatError(f"shards {sorted(mine & theirs)[:5]} were counted twice")
        if (self.pairs is None) != (other.pairs is None):
            raise SaecatError("an accumulator with pair tiles and one without (out-of-core pair counting) do not merge")
        self.histogram.counts += other.histogram.counts.to(self.device)
        self.examples.merge(other.examples)
        if self.pairs is not None:
            self.pairs.merge(other.pairs)
        self.sample.merge(other.sample)
        self.n_tokens += other.n_tokens
        self.n_documents += other.n_documents
        self._count_l0(other.l0_counts.to(self.device))
        self.n_eval_tokens += other.n_eval_tokens
        self.place = max(self.place, other.place, key=lambda p: p.batch)
        if other.folded:  # it holds shard 0 on: nothing here is folded yet, and 0 + x is x
            self.total.add(other.total)
            self.folded = other.folded
        self.pending.update(other.pending)
        self._fold_ready()

    def update(self, acts: torch.Tensor | Firings, lengths: torch.Tensor, n_documents: int = 0,
               tokens: torch.Tensor | None = None, offsets: torch.Tensor | None = None, *,
               inputs: torch.Tensor | None = None, groups: Sequence[str | None] | None = None,
               evaluation: torch.Tensor | None = None) -> None:
        """Count one batch: acts, dense [docs, positions, d_sae] or its Firings above this
        accumulator's threshold; lengths = real lengths with BOS; tokens and offsets (each row's
        place among the batch's documents) locate top examples and sampled blocks; inputs
        [docs, positions, ...] are the hook activations the SAE encoded; groups, each row's group value;
        evaluation, the batch's loss terms with the SAE spliced in (ingest.evaluate), where evaluated."""
        # every firing once, as a list: the histogram, the sums and the block rows read the list (L0 per
        # token), not the dense [docs, positions, F] batch, which costs ~10 memory-bound passes at 16k
        firings = acts if isinstance(acts, Firings) else Firings.of(acts, self.threshold)
        n_docs, width = firings.shape
        lengths = lengths.to(self.device)
        pos = torch.arange(width, device=self.device)
        counted = (pos[None, :] >= self.bos_offset) & (pos[None, :] < lengths[:, None])  # [docs, positions]
        keep = counted[firings.doc, firings.at]
        doc, at, feature, values = firings.doc[keep], firings.at[keep], firings.feature[keep], firings.value[keep]

        self.histogram.update(feature, values)
        if self.open_shard is None:
            self.open_shard = self.place.batch // self.shard_batches
        self.open.act_sum.index_add_(0, feature, values.to(torch.float64))
        if tokens is None:
            tokens = torch.full((n_docs, width), -1, dtype=torch.int64)
        documents = self.place.document + (offsets if offsets is not None else torch.arange(n_docs))
        self.examples.update((doc, at, feature, values), tokens, lengths, documents, self.bos_offset)
        self.n_tokens += int(counted.sum())
        self.n_documents += n_documents
        if self.open.moments is not None and inputs is not None:
            self.open.moments.update(inputs.flatten(2)[counted])  # trailing dims flattened, as hook_z SAEs read them
        if firings.quality is not None:
            terms = firings.quality.to(self.device)[counted]
            self.open.quality += terms.sum(0)
            self._count_l0(torch.bincount(terms[:, 0].long()))
        if evaluation is not None:  # zero outside the counted positions already
            self.open.evaluation += evaluation.to(self.device).sum((0, 1))
            self.n_eval_tokens += int(counted.sum())

        n_counted = (lengths - self.bos_offset).clamp(min=0)
        per_doc = n_counted // self.block_size  # full blocks in each document
        most = int(per_doc.max()) if n_docs else 0
        if most:
            index = (at - self.bos_offset) // self.block_size
            inside = index < per_doc[doc]  # firings in a full block
            first = torch.cumsum(per_doc, 0) - per_doc  # row order: document, then block (as full.nonzero())
            n_rows = int(per_doc.sum())
            # each full block's firing set, as (row, feature) sorted by row then feature: the
            # batch's firings once per set member, never a dense [blocks, d_sae]
            member = torch.unique((first[doc[inside]] + index[inside]) * self.d_sae + feature[inside])
            row, member = member // self.d_sae, member % self.d_sae
            full = torch.arange(most, device=self.device)[None, :] < per_doc[:, None]
            if self.sample.k:
                block_doc, block_index = full.nonzero().unbind(1)  # the same row order
                group = self.sample.codes(groups if groups is not None else [None] * n_docs)
                start = self.bos_offset + block_index * self.block_size
                at_block = start[:, None] + torch.arange(self.block_size, device=self.device)
                self.sample.add((row, member), block=self.place.block + torch.arange(n_rows, device=self.device),
                                document=documents.to(self.device)[block_doc], index=block_index, start=start,
                                group=group[block_doc], tokens=tokens.to(self.device)[block_doc[:, None], at_block])
            if self.pairs is not None:
                rows = torch.zeros(n_rows, self.d_sae, dtype=torch.bool, device=self.device)
                rows[row, member] = True
                self.pairs.add(rows)
            if self.block_sink is not None:
                self.block_sink.add_sets(torch.bincount(row, minlength=n_rows).cpu().numpy(), member.cpu().numpy())
        self.place = StreamPlace(self.place.batch + 1, self.place.document + n_documents,
                                 self.place.block + (n_rows if most else 0))
        if self.place.batch % self.shard_batches == 0:
            self.end_shard()

    def _count_l0(self, counts: torch.Tensor) -> None:
        """Add tokens-by-L0 counts, widening the held ones to the larger L0."""
        if len(counts) > len(self.l0_counts):
            self.l0_counts = torch.cat([self.l0_counts, self.l0_counts.new_zeros(len(counts) - len(self.l0_counts))])
        self.l0_counts[: len(counts)] += counts

    def quality(self) -> dict | None:
        """The SAE's sparsity and fidelity over the counted tokens (ingest.quality.quality_row);
        None unless every counted token's reconstruction was measured (each batch's Firings.quality)."""
        if self.n_tokens == 0 or int(self.l0_counts.sum()) != self.n_tokens:
            return None
        folded = self._folded()
        moments = folded.moments
        x = (moments.sum.cpu().numpy(), float(moments.outer.diagonal().sum())) if moments is not None else None
        row = quality_row(folded.quality.cpu().numpy(), self.l0_counts.cpu().numpy(), self.n_tokens, x,
                          self.fire_count.cpu().numpy())
        if self.n_eval_tokens:
            row.update(evaluation_row(folded.evaluation.cpu().numpy()))
        return row

    @property
    def fire_count(self) -> torch.Tensor:
        return self.histogram.counts.sum(1)

    def _folded(self) -> FloatSums:
        """The float sums of the whole stream: every shard counted and folded."""
        self.end_shard()
        if self.pending:
            raise SaecatError(f"shards {sorted(set(range(max(self.pending))) - set(self.pending))[:5]} of the stream "
                              "were never counted")
        return self.total

    def spectrum(self) -> np.ndarray:
        """The hook activations' covariance eigenvalues, largest first (none without d_in)."""
        moments = self._folded().moments
        return moments.spectrum() if moments is not None else np.zeros(0)

    def results(self) -> dict[str, np.ndarray]:
        """Per-feature columns: fire_count, block_count, max_activation, mean_activation."""
        fire = self.fire_count.cpu().numpy()
        mean = np.full(self.d_sae, np.nan, dtype=np.float64)
        np.divide(self._folded().act_sum.cpu().numpy(), fire, out=mean, where=fire > 0)
        max_act = self.examples.values[:, 0].cpu().numpy()
        return {
            "fire_count": fire,
            "block_count": self.block_count(),
            "max_activation": np.where(np.isfinite(max_act), max_act, np.nan).astype(np.float32),
            "mean_activation": mean.astype(np.float32),
        }

    # ---- checkpointing: plain tensors, so torch.save/load round-trips them exactly

    def state_dict(self) -> dict[str, torch.Tensor | int | list]:
        pending = {k: v for shard, sums in self.pending.items() for k, v in sums.state_dict(f"shard_{shard}_").items()}
        return {
            "histogram": self.histogram.counts.cpu(), "n_tokens": self.n_tokens, "n_documents": self.n_documents,
            "l0_counts": self.l0_counts.cpu(), "n_eval_tokens": self.n_eval_tokens,
            "place": [self.place.batch, self.place.document, self.place.block],
            "open_shard": -1 if self.open_shard is None else self.open_shard, "folded": self.folded,
            "pending": sorted(self.pending), **pending, **self.open.state_dict("open_"),
            **self.total.state_dict("total_"),
            **self.examples.state_dict(), **(self.pairs.state_dict() if self.pairs is not None else {}),
            **self.sample.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.histogram.counts.copy_(state["histogram"])
        self.n_tokens, self.n_documents = state["n_tokens"], state["n_documents"]
        self.place = StreamPlace(*state["place"])
        self.open_shard = None if state["open_shard"] < 0 else state["open_shard"]
        self.folded = state["folded"]
        self.open.load_state_dict(state, "open_")
        self.total.load_state_dict(state, "total_")
        self.l0_counts = state["l0_counts"].to(self.device)  # there since the quality sums, checked just above
        self.n_eval_tokens = state["n_eval_tokens"]
        self.pending = {}
        for shard in state["pending"]:
            self.pending[shard] = FloatSums(self.d_sae, self.d_in, self.device)
            self.pending[shard].load_state_dict(state, f"shard_{shard}_")
        self.examples.load_state_dict(state)
        if self.pairs is not None:
            self.pairs.load_state_dict(state)
        self.sample.load_state_dict(state)
