"""Which co-occurring pairs an SAE's catalog keeps: all of them, or those a policy asks for.

A 16k-wide SAE's complete table is ~1e8 pairs; a 1M-wide one's would be ~1e12, more than any
disk holds. So wide SAEs keep what the analyses read: every pair seen in at least
`min_blocks` blocks, and, with `top_partners` K, only those among the K best partners of either
feature (ranked among the pairs that pass min_blocks, by n11 or by phi; ties: the lower partner
index first). The default, min 1 and
no K, is the complete table. Every stored n11 is exact; a pair that is not stored is "below the
policy", not zero, unless the policy is complete.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from catalog.errors import SaecatError

RankBy = Literal["n11", "phi"]


@dataclass(frozen=True)
class PairPolicy:
    min_blocks: int = 1
    top_partners: int | None = None
    rank_by: RankBy = "n11"

    def __post_init__(self) -> None:
        if self.min_blocks < 1:
            raise SaecatError(f"--min-pair-blocks must be at least 1, not {self.min_blocks}")
        if self.top_partners is not None and self.top_partners < 1:
            raise SaecatError(f"--top-partners must be at least 1, not {self.top_partners}")
        if self.rank_by not in ("n11", "phi"):
            raise SaecatError(f"--rank-partners-by must be n11 or phi, not {self.rank_by!r}")

    @property
    def complete(self) -> bool:
        """Every pair with n11 > 0 is kept: a missing pair means n11 = 0."""
        return self.min_blocks == 1 and self.top_partners is None

    def to_json(self) -> dict:
        return asdict(self)


def phi(n11: np.ndarray, n_i: np.ndarray, n_j: np.ndarray, n_blocks: int) -> np.ndarray:
    """The phi coefficient of two features' block indicators, as the view feature_affinities
    computes it (NaN where either feature fired in no block or in every block)."""
    n11, n_i, n_j, t = (np.asarray(a, dtype=np.float64) for a in (n11, n_i, n_j, n_blocks))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (n11 * t - n_i * n_j) / np.sqrt(n_i * (t - n_i) * n_j * (t - n_j))


def partner_score(policy: PairPolicy, i: np.ndarray, j: np.ndarray, n11: np.ndarray, block_count: np.ndarray,
                  n_blocks: int) -> np.ndarray:
    """What the policy ranks partners by: n11, or phi (a pair phi cannot score ranks last)."""
    if policy.rank_by == "n11":
        return n11.astype(np.float64)
    return np.nan_to_num(phi(n11, block_count[i], block_count[j], n_blocks), nan=-np.inf)


def top_partner_mask(owner: np.ndarray, partner: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """For rows (owner, partner, score), True where the partner is among the owner's k best:
    highest score first, then the lower partner index."""
    order = np.lexsort((partner, -score, owner))
    sorted_owner = owner[order]
    starts = np.flatnonzero(np.r_[True, sorted_owner[1:] != sorted_owner[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.zeros(len(order), dtype=bool)
    keep[order] = rank < k
    return keep


def top_count_mask(owner: np.ndarray, count: np.ndarray, k: int, max_cells: int = 1 << 22) -> np.ndarray:
    """top_partner_mask for rows sorted by (owner, partner) whose scores are counts, without a sort.

    Per owner, a histogram of its counts gives its k-th largest count t: rows above t are kept,
    and of the rows at t, the first ones in partner order, up to k in all. One bincount per run of
    owners whose histograms fit in `max_cells`: O(rows), where the lexsort is O(rows log rows).
    """
    keep = np.zeros(len(owner), dtype=bool)
    if not len(owner):
        return keep
    low = int(count.min())
    levels = int(count.max()) - low + 1
    level = (count - low).astype(np.int64)
    first, last = int(owner[0]), int(owner[-1])
    step = max(1, max_cells // levels)
    for a in range(first, last + 1, step):  # runs of owners, not owners: few iterations
        r0, r1 = np.searchsorted(owner, [a, a + step])
        local = owner[r0:r1].astype(np.int64) - a
        lv = level[r0:r1]
        hist = np.bincount(local * levels + lv, minlength=step * levels).reshape(step, levels)
        at_least = np.zeros((step, levels + 1), dtype=np.int64)  # at_least[o, v]: rows of o at level >= v
        at_least[:, :levels] = hist[:, ::-1].cumsum(axis=1)[:, ::-1]
        reached = at_least[:, :levels] >= k
        t = np.where(reached.any(axis=1), levels - 1 - np.argmax(reached[:, ::-1], axis=1), -1)
        above = at_least[np.arange(step), t + 1]  # rows strictly above the threshold (fewer than k)
        row_t = t[local]
        kept = lv > row_t
        tie = np.flatnonzero(lv == row_t)
        if len(tie):  # rank of each tie within its owner, in partner order
            tie_owner = local[tie]
            starts = np.flatnonzero(np.r_[True, tie_owner[1:] != tie_owner[:-1]])
            rank = np.arange(len(tie)) - np.repeat(starts, np.diff(np.r_[starts, len(tie)]))
            kept[tie] = rank < k - above[tie_owner]
        keep[r0:r1] = kept
    return keep


def select(policy: PairPolicy, i: np.ndarray, j: np.ndarray, n11: np.ndarray, block_count: np.ndarray,
           n_blocks: int) -> np.ndarray:
    """The mask of the pairs (i < j, every pair with n11 > 0 present) that the policy keeps."""
    keep = n11 >= policy.min_blocks
    if policy.top_partners is None:
        return keep
    at = np.flatnonzero(keep)  # partners are ranked among the pairs that pass min_blocks
    i, j = i[at], j[at]
    score = partner_score(policy, i, j, n11[at], block_count, n_blocks)
    both = top_partner_mask(np.r_[i, j], np.r_[j, i], np.r_[score, score], policy.top_partners)
    keep[at] = both[: len(at)] | both[len(at):]
    return keep
