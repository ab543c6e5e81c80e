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
