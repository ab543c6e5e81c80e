"""Out-of-core co-occurrence: block firing sets on disk, counted band by band, equal brute force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.errors import SaecatError
from ingest.accumulate import PairCounter
from ingest.blockpairs import MANIFEST, BlockSets, count_pairs, plan
from ingest.pair_policy import PairPolicy, select

ROOT = Path(__file__).resolve().parents[1]
F, N_BLOCKS = 2000, 1500


@pytest.fixture(scope="module")
def firing():
    """Zipf-like popularity, varied block sizes; feature 7 fires in every block, the last 50 never."""
    rng = np.random.default_rng(0)
    w = 1.0 / np.arange(1, F - 50 + 1) ** 0.9
    w /= w.sum()
    x = np.zeros((N_BLOCKS, F), dtype=bool)
    for b in range(N_BLOCKS):
        x[b, rng.choice(F - 50, rng.integers(1, 250), replace=False, p=w)] = True
    x[:, 7] = True
    indptr = np.r_[0, np.cumsum(x.sum(1))].astype(np.int64)
    indices = np.nonzero(x)[1].astype(np.int32)
    gram = (x.T.astype(np.float64) @ x.astype(np.float64)).astype(np.int64)  # BLAS; exact far below 2^53
    i, j = np.triu_indices(F, 1)
    present = gram[i, j] > 0
    i, j = i[present], j[present]
    return {"x": x, "indptr": indptr, "indices": indices, "i": i, "j": j, "n11": gram[i, j],
            "block_count": gram.diagonal().copy()}


def _expected(firing, policy):
    keep = select(policy, firing["i"], firing["j"], firing["n11"], firing["block_count"], N_BLOCKS)
    return firing["i"][keep], firing["j"][keep], firing["n11"][keep]


def _same(pairs, expected):
    assert pairs.i.dtype == np.int32 and pairs.j.dtype == np.int32 and pairs.n11.dtype == np.int64
    for got, want in zip((pairs.i, pairs.j, pairs.n11), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_complete_policy_equals_brute_force_and_the_dense_tiles(firing, method):
    pairs, block_count = count_pairs((firing["indptr"], firing["indices"]), F, memory_budget_bytes=2**30,
                                     method=method)
    _same(pairs, (firing["i"], firing["j"], firing["n11"]))
    np.testing.assert_array_equal(block_count, firing["block_count"])
    assert block_count[7] == N_BLOCKS and not block_count[-50:].any()
    counter = PairCounter(F, tile=512)
    for a in range(0, N_BLOCKS, 200):
        counter.add(torch.from_numpy(firing["x"][a:a + 200]))
    today = counter.pairs()
    _same(pairs, (today.i, today.j, today.n11))


POLICIES = [PairPolicy(min_blocks=4), PairPolicy(top_partners=3), PairPolicy(top_partners=5, rank_by="phi"),
            PairPolicy(min_blocks=2, top_partners=2, rank_by="phi"), PairPolicy(min_blocks=3, top_partners=1)]


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_each_policy_keeps_exactly_what_select_keeps(firing, policy, method):
    pairs, _ = count_pairs((firing["indptr"], firing["indices"]), F, policy=policy, memory_budget_bytes=2**30,
                           method=method)
    expected = _expected(firing, policy)
    assert 0 < len(expected[0]) < len(firing["i"])
    _same(pairs, expected)


def test_dense_top_partners_stay_exact_where_float32_keys_would_not():
    """The dense rows' ranking key n11 * F + (F - 1 - j) leaves float32 past 2^24: float64 there."""
    rng = np.random.default_rng(1)
    n_blocks, f = 9000, 2000
    assert (n_blocks + 1) * f > 2**24
    x = rng.random((n_blocks, f)) < np.linspace(0.001, 0.05, f)
    x[:, 100:120] = True  # twenty features in every block: ties at n11 = 9,000, keys past 2^24
    gram = (x.T.astype(np.float64) @ x.astype(np.float64)).astype(np.int64)
    i, j = np.nonzero(np.triu(gram, 1))
    policy = PairPolicy(top_partners=4)
    keep = select(policy, i, j, gram[i, j], gram.diagonal().copy(), n_blocks)
    indptr = np.r_[0, np.cumsum(x.sum(1))]
    pairs, _ = count_pairs((indptr, np.nonzero(x)[1].astype(np.int32)), f, policy=policy,
                           memory_budget_bytes=2**30, method="dense")
    _same(pairs, (i[keep].astype(np.int32), j[keep].astype(np.int32), gram[i[keep], j[keep]]))


@pytest.mark.parametrize("policy", [PairPolicy(), PairPolicy(top_partners=4, rank_by="phi"),
                                    PairPolicy(min_blocks=2, top_partners=3)], ids=str)
@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_a_tiny_budget_cuts_many_bands_and_changes_nothing(firing, policy, method):
    csr = (firing["indptr"], firing["indices"])
    budget = 9 * 2**20 if method == "sparse" else 14 * 2**20
    assert plan(*csr, F, policy=policy, memory_budget_bytes=budget, method=method).n_bands >= 8
    small, _ = count_pairs(csr, F, policy=policy, memory_budget_bytes=budget, method=method)
    _same(small, _expected(firing, policy))


def test_a_budget_that_holds_no_band_is_refused_in_one_line(firing):
    with pytest.raises(SaecatError, match=r"^the pair pass needs at least [\d.]+ MiB .* more than the memory budget"):
        count_pairs((firing["indptr"], firing["indices"]), F, memory_budget_bytes=2**20)


def test_block_sets_appended_resumed_and_truncated_equal_one_write(firing, tmp_path):
    x = torch.from_numpy(firing["x"])
    with BlockSets(tmp_path / "once", F) as once:
        once.add(x)
        want = tuple(np.array(a) for a in once.arrays())
    np.testing.assert_array_equal(want[0], firing["indptr"])
    np.testing.assert_array_equal(want[1], firing["indices"])

    sets = BlockSets(tmp_path / "parts", F)
    sets.add(x[:300])
    sets.add(x[300:300])  # an empty batch
    sets.add_sets(firing["x"][300:700].sum(1), np.nonzero(firing["x"][300:700])[1])
    sets.sync()
    state = sets.state()
    sets.add(x[700:1000])  # appended after the checkpoint, then the process dies
    sets.close()
    sets = BlockSets(tmp_path / "parts", F, state=state)
    assert sets.state() == state == {"block_sets_n_blocks": 700, "block_sets_nnz": int(firing["x"][:700].sum())}
    sets.add(x[700:1200])
    sets.add(x[1200:])
    got = sets.arrays()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(sets.block_count(), firing["block_count"])
    pairs, _ = count_pairs(sets, F, memory_budget_bytes=2**30)
    _same(pairs, (firing["i"], firing["j"], firing["n11"]))
    sets.close()
    with pytest.raises(SaecatError, match="--restart"):
        BlockSets(tmp_path / "parts", F, state={"block_sets_n_blocks": N_BLOCKS + 1, "block_sets_nnz": 0})


_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    from ingest.blockpairs import count_pairs
    from ingest.pair_policy import PairPolicy
    data = np.load({data!r})
    slow = lambda done, total: time.sleep({sleep})
    pairs, _ = count_pairs((data["indptr"], data["indices"]), {f}, policy=PairPolicy(top_partners=3),
                           memory_budget_bytes={budget}, method="sparse", checkpoint_dir={folder!r}, progress=slow)
    np.savez({out!r}, i=pairs.i, j=pairs.j, n11=pairs.n11)
""")


def test_kill_9_in_the_pair_pass_then_rerun_gives_the_same_pairs(firing, tmp_path):
    data = tmp_path / "blocks.npz"
    np.savez(data, indptr=firing["indptr"], indices=firing["indices"])
    folder, budget = tmp_path / "pairs", 9 * 2**20

    def script(sleep: float, out: str) -> list[str]:
        code = _CHILD.format(root=str(ROOT), data=str(data), f=F, budget=budget, folder=str(folder), sleep=sleep,
                             out=str(tmp_path / out))
        return [sys.executable, "-c", code]

    child = subprocess.Popen(script(0.3, "first.npz"))
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for finished bands, then kill it mid-pass
        manifest = folder / MANIFEST
        if manifest.exists() and len(json.loads(manifest.read_text())["done"]) >= 2:
            break
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    n_bands = len(json.loads((folder / MANIFEST).read_text())["key"]["starts"]) - 1
    done = json.loads((folder / MANIFEST).read_text())["done"]
    assert 2 <= len(done) < n_bands and not (tmp_path / "first.npz").exists()
    subprocess.run(script(0, "second.npz"), check=True)
    got = np.load(tmp_path / "second.npz")
    _same(type("P", (), {"i": got["i"], "j": got["j"], "n11": got["n11"]}), _expected(firing, PairPolicy(top_partners=3)))
    reported = []  # a third run finds every band done and counts none
    count_pairs((firing["indptr"], firing["indices"]), F, policy=PairPolicy(top_partners=3), memory_budget_bytes=budget,
                method="sparse", checkpoint_dir=folder, progress=lambda d, t: reported.append((d, t)))
    assert reported == [(n_bands, n_bands)]


_WIDE = textwrap.dedent("""
    import resource, sys, time, json
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
    import numpy as np
    sys.path.insert(0, {root!r})
    from ingest.blockpairs import BlockSets, count_pairs, plan
    from ingest.pair_policy import PairPolicy
    f, n_blocks = 131072, 200
    rng = np.random.default_rng(1)
    cdf = np.cumsum(1.0 / np.arange(1, f + 1) ** 1.2); cdf /= cdf[-1]
    sets = BlockSets({folder!r}, f)
    for _ in range(n_blocks):  # 256 tokens x L0 16: ~1,000-2,000 distinct latents per block
        ids = np.unique(np.minimum(np.searchsorted(cdf, rng.random(256 * 16)), f - 1))
        sets.add_sets(np.array([len(ids)]), ids)
    policy = PairPolicy(min_blocks=2, top_partners=8)
    budget = 2 * 2**30
    the_plan = plan(*sets.arrays(), f, policy=policy, memory_budget_bytes=budget)
    start = time.time()
    pairs, block_count = count_pairs(sets, f, policy=policy, memory_budget_bytes=budget)
    np.savez({out!r}, i=pairs.i, j=pairs.j, n11=pairs.n11, block_count=block_count)
    print(json.dumps({{"method": the_plan.method, "bands": the_plan.n_bands, "seconds": time.time() - start,
                      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
""")


def test_131072_features_under_an_8_gb_address_space(tmp_path):
    out = tmp_path / "wide.npz"
    run = subprocess.run([sys.executable, "-c", _WIDE.format(root=str(ROOT), folder=str(tmp_path / "sets"), out=str(out))],
                         check=True, capture_output=True, text=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["method"] == "sparse"
    got = np.load(out)
    with BlockSets(tmp_path / "sets", 131072, state={"block_sets_n_blocks": 200,
                                                     "block_sets_nnz": int(got["block_count"].sum())}) as sets:
        indptr, indices = (np.array(a) for a in sets.arrays())
    block_of = np.repeat(np.arange(200), np.diff(indptr))
    np.testing.assert_array_equal(got["block_count"], np.bincount(indices, minlength=131072))
    # full rows of 20 features, brute force from the CSR, and the policy applied to them
    rng = np.random.default_rng(2)
    fired = np.flatnonzero(got["block_count"])
    sample = np.r_[fired[:5], rng.choice(fired, 15, replace=False)]
    n = got["block_count"]
    for f in sample:
        row = np.bincount(indices[np.isin(block_of, block_of[indices == f])], minlength=131072)
        row[f] = 0
        partners = np.flatnonzero(row >= 2)
        order = np.lexsort((partners, -row[partners]))
        best = set(partners[order][:8].tolist())
        stored = {int(b if a == f else a): int(c) for a, b, c in zip(got["i"], got["j"], got["n11"]) if f in (a, b)}
        assert best <= set(stored)  # its own 8 best partners are all kept ...
        assert all(row[p] == c for p, c in stored.items())  # ... with exact n11 ...
        assert all(p in best or c >= 2 for p, c in stored.items())  # ... and the rest are others' nominations
    assert len(got["i"]) and n[7] > 0
