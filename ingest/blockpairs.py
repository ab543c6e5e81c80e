"""Exact co-occurrence counts for SAEs too wide for dense Gram tiles: out of core, within a budget.

PairCounter (ingest.accumulate) keeps the F x F Gram's upper triangle in memory: 0.6 GB at 16k
features, 8.9 GB at 65k, 137 GB at 262k, 2.2 TB at 1M. Here the stream only records each full
block's firing set (its sorted feature ids) on disk, and after the stream `count_pairs` counts
n11 = X^T X one band of features at a time, keeping what the pair policy asks for:

- `BlockSets`: the block x feature indicator X as CSR in a folder (the run's checkpoint folder):
  `block_indptr.i64` (n_blocks + 1 int64 offsets) and `block_indices.i32` (the feature ids, int32),
  appended batch by batch. `state()` is what a checkpoint stores; opening with that state
  truncates the files back to it, so blocks appended after the last checkpoint by a killed process
  are not counted twice.
- `count_pairs`: every pair the policy keeps, with its exact n11, sorted by (i, j), and
  block_count (the Gram diagonal, a bincount of the feature ids). Bands of consecutive features
  are counted one at a time; with the top-partners policy a band's rows are complete (partners
  below and above), since a feature's K best partners need its whole row; otherwise only the
  upper triangle (j > i) is counted. Two exact methods:
  * "sparse" (CPU): scipy's sparse product X[:, band]^T @ X (or @ X[:, band start:]), work
    proportional to sum over blocks of (band features in the block) x (features in the block);
  * "dense": float32 matmuls of n_blocks x TILE indicator slabs in torch on `device` (the GPU
    path; it runs on the CPU too), work proportional to n_blocks x F^2 / 2 (F^2 for full rows).
    float32 holds every count below 2^24 blocks exactly, as PairCounter's tiles do.
  "auto" takes dense on a GPU, and on the CPU whichever the cost model below predicts faster
  (measured on this machine: bench/README.md, "Out-of-core co-occurrence"): dense while the
  blocks are dense enough (16k-wide SAEs), sparse for wide ones.
- With `checkpoint_dir`, each finished band's kept pairs go there (`band_NNNNN.npy`, then
  `manifest.json` lists it, both written atomically): a rerun after kill -9 skips finished bands
  and returns the same pairs.

Selection is `pair_policy.select` applied to the complete table, by construction: the min_blocks
filter is per pair, and with top_partners each band ranks its features' complete rows with
`pair_policy.top_partner_mask`, nominating each feature's K best partners; a pair is kept when
either end nominates it, which is what `select` does with both orientations.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from catalog.errors import SaecatError
from catalog.limits import format_size
from ingest.accumulate import EXACT_LIMIT, Pairs
from ingest.pair_policy import PairPolicy, partner_score, top_count_mask, top_partner_mask

INDPTR_FILE = "block_indptr.i64"
INDICES_FILE = "block_indices.i32"
MANIFEST = "manifest.json"
BAND_DTYPE = np.dtype([("i", "<i4"), ("j", "<i4"), ("n11", "<i8")])

# Memory model (bytes). See count_pairs' docstring for the formula they enter.
# per counted pair of a band: the product's index and value, i/j/n11, the ranking's temporaries
# (with 64 the sparse path held 1.7x its budget at 65k and 1M latents; 144 held 0.87-1.02x)
PAIR_BYTES = 160
NNZ_BYTES = 24  # per stored firing: block-major and feature-major copies of X (ids + ones), one slice in flight
FEATURE_BYTES = 48  # per feature: block_count, the partner bound, feature-major offsets, band bookkeeping
TILE = 2048  # the dense method's column tile: matmuls of n_blocks x TILE slabs
DENSE_TILE_BYTES = 40  # per dense tile entry: float32 tile, its nonzero positions (2 x int64), mask
CHUNK_BLOCKS = 8192  # blocks per read of the block sets (bincount, partner bound)

# Cost model of "auto" on the CPU: seconds = work / rate, rates measured by bench/blockpairs.py on
# the 2-core Xeon of bench/README.md ("Out-of-core co-occurrence").
DENSE_FLOPS_PER_S = 6.0e10  # torch float32 matmul, 2 threads
SPARSE_OPS_PER_S = 2.5e8  # scipy's sparse product, multiply-adds per second (single-threaded)
# Ranking partners by n11: the dense rows' topk, per band cell; the sparse path's selection, per
# product entry (a dozen numpy passes over every pair entry of the band's rows).
DENSE_TOP_S_PER_CELL = 2.0e-9
SPARSE_TOP_OPS_PER_S = 1.0e7

Method = Literal["auto", "dense", "sparse"]
Progress = Callable[[int, int], None]  # (bands done, bands in all)


class BlockSets:
    """Each full block's firing set (ascending feature ids) as CSR on disk, appended batch by batch.

    >>> import tempfile, numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> sets = BlockSets(folder, d_sae=8)
    >>> sets.add_sets(np.array([2, 3]), np.array([1, 5, 0, 1, 7]))
    >>> state = sets.state(); sets.add_sets(np.array([1]), np.array([4]))  # not checkpointed
    >>> sets.close(); sets = BlockSets(folder, d_sae=8, state=state)  # resumed: the extra block is gone
    >>> indptr, indices = sets.arrays(); indptr.tolist(), indices.tolist()
    ([0, 2, 5], [1, 5, 0, 1, 7])
    """

    def __init__(self, folder: str | Path, d_sae: int, *, state: dict | None = None):
        self.folder = Path(folder)
        self.d_sae = d_sae
        self.folder.mkdir(parents=True, exist_ok=True)
        self._indptr_path = self.folder / INDPTR_FILE
        self._indices_path = self.folder / INDICES_FILE
        n_blocks, nnz = (state["block_sets_n_blocks"], state["block_sets_nnz"]) if state else (0, 0)
        if state:
            have_blocks = self._indptr_path.stat().st_size // 8 - 1 if self._indptr_path.exists() else -1
            have_nnz = self._indices_path.stat().st_size // 4 if self._indices_path.exists() else -1
            if have_blocks < n_blocks or have_nnz < nnz:
                raise SaecatError(f"the block sets in {self.folder} are shorter than the checkpoint says "
                                  f"({max(have_blocks, 0):,} blocks, {max(have_nnz, 0):,} ids): run the same "
                                  "command with --restart")
            with open(self._indptr_path, "rb") as f:
                f.seek(8 * n_blocks)
                end = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            if end != nnz:
                raise SaecatError(f"the block sets in {self.folder} do not match the checkpoint: run the same "
                                  "command with --restart")
        self._indptr = open(self._indptr_path, "r+b" if state else "w+b")
        self._indices = open(self._indices_path, "r+b" if state else "w+b")
        self._indptr.truncate(8 * (n_blocks + 1))  # drop what a killed process appended after the checkpoint
        self._indices.truncate(4 * nnz)
        if not state:
            self._indptr.write(np.zeros(1, dtype="<i8").tobytes())
        self._indptr.seek(0, os.SEEK_END)
        self._indices.seek(0, os.SEEK_END)
        self.n_blocks, self.nnz = n_blocks, nnz

    def add_sets(self, lengths: np.ndarray, indices: np.ndarray) -> None:
        """Append blocks given as their firing sets' lengths and the concatenated, per block
        ascending feature ids."""
        lengths = np.asarray(lengths, dtype=np.int64)
        indices = np.asarray(indices)
        if int(lengths.sum()) != len(indices):
            raise SaecatError(f"block sets: lengths add up to {int(lengths.sum())}, not {len(indices)} ids")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.d_sae):
            raise SaecatError(f"block sets: a feature id outside 0..{self.d_sae - 1}")
        if self.n_blocks + len(lengths) >= EXACT_LIMIT:
            raise SaecatError(f"more than {EXACT_LIMIT:,} blocks in one SAE: counts would lose exactness")
        ends = self.nnz + np.cumsum(lengths)
        self._indices.write(indices.astype("<i4", copy=False).tobytes())
        self._indptr.write(ends.astype("<i8").tobytes())
        self.n_blocks += len(lengths)
        self.nnz += len(indices)

    def add(self, rows) -> None:
        """Append block indicator rows [n_blocks, d_sae] (bool; torch or numpy), as PairCounter.add
        takes them: one nonzero() per batch, so memory is bounded by the batch."""
        if rows.shape[-1] != self.d_sae:
            raise SaecatError(f"block rows are {rows.shape[-1]} wide, expected {self.d_sae}")
        if not len(rows):
            return
        if hasattr(rows, "cpu"):  # torch: row-major nonzero, so ids come out ascending within each block
            block, feature = (t.cpu().numpy() for t in rows.nonzero().unbind(1))
        else:
            block, feature = np.nonzero(rows)
        self.add_sets(np.bincount(block, minlength=len(rows)), feature)

    def sync(self) -> None:
        """Flush and fsync: call before saving a checkpoint that holds `state()`."""
        for f in (self._indices, self._indptr):
            f.flush()
            os.fsync(f.fileno())

    def state(self) -> dict[str, int]:
        """What a checkpoint stores (after `sync()`): resuming with it truncates the files back."""
        return {"block_sets_n_blocks": self.n_blocks, "block_sets_nnz": self.nnz}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr int64 [n_blocks + 1], indices int32 [nnz]), memory-mapped read-only."""
        self._indices.flush()
        self._indptr.flush()
        indptr = np.memmap(self._indptr_path, dtype="<i8", mode="r", shape=(self.n_blocks + 1,))
        indices = (np.memmap(self._indices_path, dtype="<i4", mode="r", shape=(self.nnz,)) if self.nnz
                   else np.zeros(0, dtype="<i4"))
        return indptr, indices

    def block_count(self) -> np.ndarray:
        """The number of blocks each feature fired in (the Gram diagonal): a bincount, in chunks."""
        _, indices = self.arrays()
        return _bincount(indices, self.d_sae)

    def close(self) -> None:
        self._indices.close()
        self._indptr.close()

    def __enter__(self) -> "BlockSets":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bincount(indices: np.ndarray, d_sae: int, weights: np.ndarray | None = None) -> np.ndarray:
    chunk = CHUNK_BLOCKS * 4096
    total = np.zeros(d_sae, dtype=np.float64 if weights is not None else np.int64)
    for start in range(0, len(indices), chunk):
        w = None if weights is None else weights[start:start + chunk]
        total += np.bincount(np.asarray(indices[start:start + chunk]), weights=w, minlength=d_sae)
    return total


@dataclass(frozen=True)
class Plan:
    """How the pair pass runs: bands [starts[k], starts[k + 1]) of features, counted by `method`."""

    method: str
    full_rows: bool  # a band's rows are complete (top partners), not only j > i
    starts: tuple[int, ...]
    tile: int  # the dense method's tile width (and its bands' widest)
    budget_bytes: int
    fixed_bytes: int  # the block sets in memory (both orientations) and the per-feature arrays
    tile_bytes: int  # the dense method's slabs and tile (0 for sparse)
    estimated_s: dict[str, float]

    @property
    def n_bands(self) -> int:
        return len(self.starts) - 1


def plan(indptr: np.ndarray, indices: np.ndarray, d_sae: int, *, policy: PairPolicy, memory_budget_bytes: int,
         device: str = "cpu", method: Method = "auto") -> Plan:
    """Choose the method and cut the features into bands that fit the budget.

    Memory of the pair pass, in bytes (nnz: stored firings, F: features, n: blocks):

        fixed  = NNZ_BYTES * nnz + FEATURE_BYTES * F          (X in both orientations, per-feature arrays)
        tile   = dense only: 2 * 4 * n * T + DENSE_TILE_BYTES * T^2   (two float32 slabs, one tile)
        band   = PAIR_BYTES * sum over the band's features f of (bound_f + 1)
                 + dense only: 4 * (band width) * F'   (the band's rows as one float32 matrix)

    where bound_f, the most partners f can have, is min(F - 1, sum over the blocks f fired in of
    (that block's size - 1)), and with only the upper triangle counted also at most F - 1 - f.
    The dense tile width T is TILE (2048), halved while tile > (budget - fixed) / 2 (down to 64).
    F' is F with full rows, F minus the band's first feature otherwise. Bands are the longest
    runs of consecutive features with fixed + tile + band <= budget (a dense
    band is also at most T features wide). If even a one-feature band does not fit, it refuses.
    The kept pairs (16 bytes each) are the result, returned to the caller, and not in the budget.
    "auto" takes dense on a GPU; on the CPU the method the cost model predicts faster, or the other
    where only that one fits.
    """
    n_blocks = len(indptr) - 1
    full_rows = policy.top_partners is not None
    lengths = np.diff(np.asarray(indptr))
    sq = float(np.dot(lengths.astype(np.float64), lengths))
    cells = d_sae * (d_sae if full_rows else d_sae / 2)
    ranked = full_rows and policy.rank_by == "n11"  # the dense path ranks on the rows themselves
    estimated = {"dense": 2.0 * n_blocks * cells / DENSE_FLOPS_PER_S + (cells * DENSE_TOP_S_PER_CELL if ranked else 0),
                 "sparse": sq * (1.0 if full_rows else 0.5) / (SPARSE_TOP_OPS_PER_S if ranked else SPARSE_OPS_PER_S)}
    on_cpu = str(device).startswith("cpu")
    if method == "auto":  # on the CPU the cheaper method that fits, else the other
        methods = sorted(estimated, key=estimated.get) if on_cpu else ["dense"]  # type: ignore[arg-type]
    elif method in ("dense", "sparse"):
        methods = [method]
    else:
        raise SaecatError(f"pair counting method must be auto, dense or sparse, not {method!r}")
    if methods == ["sparse"] and not on_cpu:
        raise SaecatError("the sparse pair counting method runs on the CPU only")
    # the partner bound of every feature: one weighted bincount over the firings
    per_firing = np.repeat((lengths - 1).astype(np.float64), lengths)
    bound = np.minimum(_bincount(indices, d_sae, per_firing), d_sae - 1)
    if not full_rows:
        bound = np.minimum(bound, np.arange(d_sae - 1, -1, -1))

    def plan_for(chosen: str) -> Plan:
        starts, tile, fixed, tile_bytes = _bands(chosen, bound, n_blocks, len(indices), d_sae, full_rows,
                                                 memory_budget_bytes)
        return Plan(chosen, full_rows, starts, tile, memory_budget_bytes, fixed, tile_bytes,
                    {k: round(v, 3) for k, v in estimated.items()})

    for chosen in methods[:-1]:
        try:
            return plan_for(chosen)
        except SaecatError:
            continue  # over the budget: the other method
    return plan_for(methods[-1])


def _bands(method: str, bound: np.ndarray, n_blocks: int, nnz: int, d_sae: int, full_rows: bool,
           budget: int) -> tuple[tuple[int, ...], int, int, int]:
    """plan's bands for one method: (starts, tile, fixed bytes, tile bytes), or a SaecatError."""
    fixed = NNZ_BYTES * nnz + FEATURE_BYTES * d_sae
    tile = min(TILE, d_sae)
    while method == "dense" and tile > 64 and _tile_bytes(n_blocks, tile) > (budget - fixed) / 2:
        tile //= 2  # a small budget: narrower tiles (the same flops, more matmul calls)
    tile_bytes = _tile_bytes(n_blocks, tile) if method == "dense" else 0
    room = budget - fixed - tile_bytes
    pair_need = PAIR_BYTES * (bound + 1)
    need = pair_need + 4.0 * (d_sae if full_rows else np.arange(d_sae, 0, -1)) if method == "dense" else pair_need
    if room < need.max(initial=0):  # a one-feature band (with its dense row) does not fit
        worst = fixed + tile_bytes + int(need.max(initial=0))
        raise SaecatError(f"the pair pass needs at least {format_size(worst)} ({method}, {d_sae:,} features, "
                          f"{nnz:,} firings), more than the memory budget of {format_size(budget)}")
    starts = [0]
    pairs, width = 0.0, 0
    for f in range(d_sae):  # greedy: as many consecutive features as fit
        row = 4.0 * (d_sae if full_rows else d_sae - starts[-1]) if method == "dense" else 0.0
        if width and (pairs + pair_need[f] + row * (width + 1) > room or (method == "dense" and width == tile)):
            starts.append(f)
            pairs, width = 0.0, 0
        pairs += pair_need[f]
        width += 1
    starts.append(d_sae)
    return tuple(starts), tile, fixed, tile_bytes


def _tile_bytes(n_blocks: int, tile: int) -> int:
    return 2 * 4 * n_blocks * tile + DENSE_TILE_BYTES * tile * tile


class _Counter:
    """Counts a band's rows: (i, j, n11) sorted by (i, j), for j > i or (full rows) every j != i."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, d_sae: int, method: str, device: str, tile: int,
                 top_n11: tuple[int, int] | None = None):
        import scipy.sparse as sp

        self.d_sae, self.method, self.device, self.tile = d_sae, method, device, tile
        self.top_n11 = top_n11  # (k, min_blocks): the dense method returns only each row's k best by n11
        self.n_blocks = len(indptr) - 1
        ptr = np.asarray(indptr)
        ptr = ptr.astype(np.int32) if len(indices) < 2**31 else ptr
        ones = np.ones(len(indices), dtype=np.int32)
        self.x = sp.csr_matrix((ones, np.asarray(indices), ptr), shape=(self.n_blocks, d_sae))
        csc = self.x.tocsc()  # feature-major: for each feature, the blocks it fired in, ascending
        self.xt = sp.csr_matrix((csc.data, csc.indices, csc.indptr), shape=(d_sae, self.n_blocks))
        if method == "dense":
            self.x = None  # the dense method reads the feature-major copy only

    def band(self, a: int, b: int, full_rows: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._sparse(a, b, full_rows) if self.method == "sparse" else self._dense(a, b, full_rows)

    def _sparse(self, a: int, b: int, full_rows: bool):
        other = self.x if full_rows else self.xt[a:].T.tocsr()
        y = (self.xt[a:b] @ other).tocsr()
        y.sort_indices()
        i = np.repeat(np.arange(a, b, dtype=np.int32), np.diff(y.indptr))
        j = y.indices.astype(np.int32) + (0 if full_rows else a)
        keep = j != i if full_rows else j > i
        return i[keep], j[keep], y.data[keep].astype(np.int64)

    def _slab(self, c: int, d: int):
        import torch

        ptr = self.xt.indptr
        blocks = torch.from_numpy(self.xt.indices[ptr[c]:ptr[d]].astype(np.int64))
        cols = torch.from_numpy(np.repeat(np.arange(d - c), np.diff(ptr[c:d + 1])))
        slab = torch.zeros(self.n_blocks, d - c, dtype=torch.float32, device=self.device)
        slab[blocks.to(self.device), cols.to(self.device)] = 1.0
        return slab

    def _dense(self, a: int, b: int, full_rows: bool):
        import torch

        first = 0 if full_rows else a
        rows = self._slab(a, b)
        band = torch.empty(b - a, self.d_sae - first, dtype=torch.float32, device=self.device)
        for c in range(first, self.d_sae, self.tile):  # the band's rows, one column tile at a time
            d = min(c + self.tile, self.d_sae)
            torch.mm(rows.T, self._slab(c, d), out=band[:, c - first:d - first])
        del rows
        if full_rows:
            band.diagonal(a).zero_()  # (f, f): the diagonal is block_count, not a pair
        else:
            band.triu_(1)  # local column > local row <=> j > i, as the band's columns start at a
        if self.top_n11 is not None:
            return self._top_of_rows(band, a, *self.top_n11)
        nz = band.nonzero()  # row-major: sorted by (i, j) as it comes
        n11 = band[nz[:, 0], nz[:, 1]]
        del band
        return ((nz[:, 0] + a).cpu().numpy().astype(np.int32), (nz[:, 1] + first).cpu().numpy().astype(np.int32),
                n11.cpu().numpy().astype(np.int64))

    def _top_of_rows(self, band, a: int, k: int, min_blocks: int):
        """Each row's k best partners by (n11, then lower j), read off the dense rows with topk: no
        pass over every nonzero pair, which is most of the band. The key n11 * F + (F - 1 - j) is
        exact in float32 while (n_blocks + 1) * F <= 2^24 (12 blocks of a 1M-wide SAE), in float64
        beyond (n11 < 2^24, F < 2^29). Rows go a few at a time so the keys fit in a tile."""
        import torch

        width = band.shape[1]
        exact32 = (self.n_blocks + 1) * width <= 2**24
        tiebreak = torch.arange(width - 1, -1, -1, dtype=torch.float32 if exact32 else torch.float64,
                                device=band.device)
        step = max(1, DENSE_TILE_BYTES * self.tile * self.tile // (10 * width))
        if min_blocks > 1:
            band.masked_fill_(band < min_blocks, 0)
        found = []
        for r in range(0, band.shape[0], step):
            rows = band[r:r + step]
            key = torch.add(tiebreak, rows if exact32 else rows.double(), alpha=width)
            top = key.topk(min(k, width), dim=1).indices
            n11 = rows.gather(1, top)
            real = n11 >= min_blocks  # rows with fewer than k partners
            i = torch.arange(r, r + len(rows), device=band.device).unsqueeze(1).expand_as(top)
            found.append((i[real], top[real], n11[real]))
        i, j, n11 = (torch.cat(part) for part in zip(*found))
        order = torch.argsort(i * width + j)  # by (i, j), as the other paths return them
        return ((i[order] + a).cpu().numpy().astype(np.int32), j[order].cpu().numpy().astype(np.int32),
                n11[order].cpu().numpy().astype(np.int64))


def _best_candidates(owner: np.ndarray, score: np.ndarray, k: int, width: int, base: int) -> np.ndarray:
    """A mask that keeps every row the top-k ranking can pick and drops most others: per owner, the
    highest of a few score levels that at least k of its rows reach; rows below it cannot be among
    the owner's k best (k rows beat them), rows at or above it all stay, ties included. Sorting
    then only ranks the candidates: O(rows) passes instead of a sort of every row of the band."""
    if len(score) <= 4 * k * width:
        return np.ones(len(score), dtype=bool)
    finite = score[np.isfinite(score)]
    if not len(finite):
        return np.ones(len(score), dtype=bool)
    sample = finite[:: max(1, len(finite) // 100_000)]
    levels = np.unique(np.quantile(sample, [0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]))[::-1]
    threshold = np.full(width, -np.inf)
    for level in levels:  # descending: the first level an owner reaches k times is its highest
        counts = np.bincount(owner[score >= level] - base, minlength=width)
        threshold = np.where((threshold == -np.inf) & (counts >= k), level, threshold)
    return score >= threshold[owner - base]


def _keep(policy: PairPolicy, i, j, n11, block_count: np.ndarray, n_blocks: int) -> np.ndarray:
    """The band's kept pairs as BAND_DTYPE rows: filtered upper-triangle pairs, or (top partners)
    the nominations (lower id, higher id, n11) of each band feature's K best partners."""
    passing = n11 >= policy.min_blocks
    i, j, n11 = i[passing], j[passing], n11[passing]
    if policy.top_partners is not None and policy.rank_by == "n11":  # rows come sorted by (i, j)
        best = top_count_mask(i, n11, policy.top_partners)
        i, j, n11 = np.minimum(i[best], j[best]), np.maximum(i[best], j[best]), n11[best]
    elif policy.top_partners is not None:
        score = partner_score(policy, i, j, n11, block_count, n_blocks)
        if len(i):
            base = int(i[0])
            candidates = _best_candidates(i, score, policy.top_partners, int(i[-1]) - base + 1, base)
            i, j, n11, score = i[candidates], j[candidates], n11[candidates], score[candidates]
        best = top_partner_mask(i, j, score, policy.top_partners)
        i, j, n11 = np.minimum(i[best], j[best]), np.maximum(i[best], j[best]), n11[best]
    out = np.empty(len(i), dtype=BAND_DTYPE)
    out["i"], out["j"], out["n11"] = i, j, n11
    return out


class _Store:
    """The finished bands: in memory, or in checkpoint_dir (band file, then manifest, atomically)."""

    def __init__(self, folder: Path | None, key: dict):
        self.folder, self.key = folder, key
        self.bands: dict[int, np.ndarray] = {}
        self.done: set[int] = set()
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / MANIFEST
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved.get("key") == key:
                self.done = set(saved["done"])
                return
        for old in folder.glob("band_*.npy"):  # another pass's bands (other blocks, policy or plan)
            old.unlink()
        self._write_manifest()

    def _path(self, band: int) -> Path:
        return self.folder / f"band_{band:05d}.npy"  # type: ignore[operator]

    def _write_manifest(self) -> None:
        tmp = self.folder / f"{MANIFEST}.tmp"  # type: ignore[operator]
        tmp.write_text(json.dumps({"key": self.key, "done": sorted(self.done)}))
        os.replace(tmp, self.folder / MANIFEST)  # type: ignore[operator]

    def put(self, band: int, rows: np.ndarray) -> None:
        if self.folder is None:
            self.bands[band] = rows
        else:
            tmp = self.folder / f"band_{band:05d}.tmp.npy"
            np.save(tmp, rows)
            os.replace(tmp, self._path(band))
            self.done.add(band)
            self._write_manifest()
        self.done.add(band)

    def get(self, band: int) -> np.ndarray:
        return self.bands[band] if self.folder is None else np.load(self._path(band), mmap_mode="r")


def _progress_callback(progress: bool | Progress | None, total: int) -> tuple[Progress, Callable[[], None]]:
    if progress is None or progress is False:
        return (lambda done, all_: None), (lambda: None)
    if callable(progress):
        return progress, (lambda: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

    bar = RichProgress(TextColumn("counting pairs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.start()
    task = bar.add_task("pairs", total=total)
    return (lambda done, all_: bar.update(task, completed=done)), bar.stop


def count_pairs(block_sets: BlockSets | tuple[np.ndarray, np.ndarray], d_sae: int, *,
                policy: PairPolicy = PairPolicy(), memory_budget_bytes: int, device: str = "cpu",
                method: Method = "auto", progress: bool | Progress | None = None,
                checkpoint_dir: str | Path | None = None) -> tuple[Pairs, np.ndarray]:
    """The pairs `policy` keeps (i < j, exact n11, sorted by (i, j)) and each feature's block_count.

    block_sets: a BlockSets, or (indptr, indices) of the block x feature CSR. The pass holds at most
    `memory_budget_bytes` (the formula is `plan`'s docstring) and refuses with a SaecatError when
    one band cannot fit. progress: True for a rich progress bar, or a callable(done, total) called
    with the finished bands. With checkpoint_dir, finished bands are kept there and a rerun of the
    same pass (same blocks, policy and plan) skips them.

    >>> indptr, indices = np.array([0, 3, 5, 6]), np.array([0, 1, 3, 1, 3, 2])
    >>> pairs, block_count = count_pairs((indptr, indices), 4, memory_budget_bytes=2**26)
    >>> pairs.i.tolist(), pairs.j.tolist(), pairs.n11.tolist(), block_count.tolist()
    ([0, 0, 1], [1, 3, 3], [1, 1, 2], [1, 2, 1, 2])
    """
    if isinstance(block_sets, BlockSets):
        indptr, indices = block_sets.arrays()
    else:
        indptr, indices = (np.asarray(a) for a in block_sets)
    n_blocks = len(indptr) - 1
    if n_blocks >= EXACT_LIMIT:
        raise SaecatError(f"more than {EXACT_LIMIT:,} blocks in one SAE: counts would lose exactness")
    block_count = _bincount(indices, d_sae)
    the_plan = plan(indptr, indices, d_sae, policy=policy, memory_budget_bytes=memory_budget_bytes, device=device,
                    method=method)
    key = {"d_sae": d_sae, "n_blocks": n_blocks, "nnz": len(indices), "policy": policy.to_json(),
           "starts": list(the_plan.starts), "block_count_sum": int(block_count.sum()),
           "block_count_hash": int(np.dot(block_count, np.arange(1, d_sae + 1) % 65521) % (2**61 - 1))}
    store = _Store(Path(checkpoint_dir) if checkpoint_dir is not None else None, key)
    report, stop = _progress_callback(progress, the_plan.n_bands)
    try:
        report(len(store.done), the_plan.n_bands)
        todo = [k for k in range(the_plan.n_bands) if k not in store.done]
        top_n11 = (policy.top_partners, policy.min_blocks) \
            if policy.top_partners is not None and policy.rank_by == "n11" else None
        counter = _Counter(indptr, indices, d_sae, the_plan.method, device, the_plan.tile, top_n11) if todo else None
        for k in todo:
            a, b = the_plan.starts[k], the_plan.starts[k + 1]
            i, j, n11 = counter.band(a, b, the_plan.full_rows)  # type: ignore[union-attr]
            store.put(k, _keep(policy, i, j, n11, block_count, n_blocks))
            del i, j, n11
            report(len(store.done), the_plan.n_bands)
        del counter
    finally:
        stop()
    rows = np.concatenate([np.asarray(store.get(k)) for k in range(the_plan.n_bands)]) if the_plan.n_bands \
        else np.empty(0, dtype=BAND_DTYPE)
    if the_plan.full_rows:  # nominations from both ends: one row per pair, in (i, j) order
        key_ij = rows["i"].astype(np.int64) * d_sae + rows["j"]
        _, first = np.unique(key_ij, return_index=True)
        rows = rows[first]
    return Pairs(i=np.ascontiguousarray(rows["i"]), j=np.ascontiguousarray(rows["j"]),
                 n11=np.ascontiguousarray(rows["n11"])), block_count


def discard(checkpoint_dir: str | Path) -> None:
    """Remove a pair pass's finished bands (once its pairs are committed)."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
