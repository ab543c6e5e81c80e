"""The pair policy keeps exactly what a brute-force reading of its definition keeps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from catalog.errors import SaecatError
from ingest.pair_policy import PairPolicy, phi, select, top_count_mask, top_partner_mask


def _brute(policy: PairPolicy, counts: np.ndarray, block_count: np.ndarray, n_blocks: int) -> set[tuple[int, int]]:
    """Pair by pair, feature by feature, from the definition."""
    f = len(counts)
    passing = {(a, b) for a, b in itertools.combinations(range(f), 2) if counts[a, b] >= max(policy.min_blocks, 1)}
    if policy.top_partners is None:
        return passing

    def score(a: int, b: int) -> float:
        if policy.rank_by == "n11":
            return float(counts[a, b])
        value = phi(counts[a, b], block_count[a], block_count[b], n_blocks)
        return -np.inf if np.isnan(value) else float(value)

    best = {}
    for a in range(f):
        partners = [b for b in range(f) if b != a and (min(a, b), max(a, b)) in passing]
        partners.sort(key=lambda b: (-score(a, b), b))
        best[a] = set(partners[: policy.top_partners])
    return {(a, b) for a, b in passing if b in best[a] or a in best[b]}


@pytest.mark.parametrize("policy", [PairPolicy(), PairPolicy(min_blocks=3), PairPolicy(top_partners=2),
                                    PairPolicy(min_blocks=2, top_partners=3, rank_by="phi"),
                                    PairPolicy(top_partners=1, rank_by="phi")])
def test_select_is_the_definition(policy):
    rng = np.random.default_rng(0)
    n_blocks, f = 60, 25
    x = rng.random((n_blocks, f)) < rng.uniform(0.02, 0.6, f)  # features of every density
    x[:, 3] = True  # one fires in every block: phi is undefined for it
    counts = x.T.astype(np.int64) @ x
    block_count = counts.diagonal().copy()
    i, j = np.triu_indices(f, 1)
    present = counts[i, j] > 0
    i, j = i[present], j[present]
    kept = select(policy, i, j, counts[i, j], block_count, n_blocks)
    assert set(zip(i[kept].tolist(), j[kept].tolist())) == _brute(policy, counts, block_count, n_blocks)
    if policy.complete:
        assert kept.all()


@pytest.mark.parametrize("kwargs,flag", [({"min_blocks": 0}, "--min-pair-blocks"), ({"top_partners": 0}, "--top-partners"),
                                         ({"rank_by": "pmi"}, "--rank-partners-by")])
def test_a_bad_policy_names_its_flag(kwargs, flag):
    with pytest.raises(SaecatError, match=flag):
        PairPolicy(**kwargs)


@pytest.mark.parametrize("k", [1, 3, 50])
@pytest.mark.parametrize("max_cells", [1, 7, 1 << 22])
def test_top_count_mask_is_the_sorting_mask_on_sorted_rows(k, max_cells):
    """Heavy ties, owners with fewer than k rows, gaps in the owner ids, owner runs cut anywhere."""
    rng = np.random.default_rng(k * 31 + max_cells)
    dense = (rng.random((40, 300)) < 0.3) * rng.integers(1, 6, (40, 300))
    dense[rng.random(40) < 0.2] = 0  # owners with no rows at all
    owner, partner = np.nonzero(dense)  # row-major: sorted by (owner, partner)
    count = dense[owner, partner] + 1000  # counts need not start at 1
    expected = top_partner_mask(owner + 7, partner, count.astype(np.float64), k)
    assert np.array_equal(top_count_mask(owner + 7, count, k, max_cells=max_cells), expected)
