"""Lobes (queries/lobes.py): the SQL affinities and the dense/kNN matrices against numpy, spectral
clustering with a shared embedding against sklearn's SpectralClustering, planted lobes that must
be found (and must not be found once the geometry is shuffled), dead and saturated features,
the documents each lobe wins, and the stored, cached run with its figure.

Every SAE here is synthetic: blocks are drawn so that G groups of features co-fire, decoder rows
scatter around G random centres, and the counts (T, n_i, n11) and the sampled `blocks` rows are
computed from those blocks and committed straight into a temporary catalog.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score
from test_catalog import features_table, pairs_table, sae_row

from catalog import Catalog, writer
from catalog.errors import SaecatError
from queries import lobes
from queries.lobes import GEOMETRY, LobesParams

SQL_COLUMNS = ("smc", "jaccard", "dice", "overlap", "phi", "lift", "pmi")
FAST = dict(permutations=40, null_repeats=3)


# --------------------------------------------------------------------------- synthetic SAEs


@dataclass
class Planted:
    fired: np.ndarray  # [T, F] bool, every counted block
    group: np.ndarray  # [F] planted group; -1 dead, -2 saturated
    decoders: np.ndarray  # [F, d]
    topic: np.ndarray  # [T] the group each block is about
    sources: tuple[str, ...]

    @property
    def n_i(self) -> np.ndarray:
        return self.fired.sum(0).astype(np.int64)


def planted(seed: int, *, groups: int = 3, per_group: int = 100, n_blocks: int = 400, d: int = 32,
            p_in: float = 0.35, p_out: float = 0.03, dead: int = 0, saturated: int = 0,
            shuffle_geometry: bool = False, sources: tuple[str, ...] | None = None) -> Planted:
    """Blocks each about one group: its features fire with p_in, the others with p_out. Decoder
    rows are the group's centre plus noise (or, shuffled, another feature's row)."""
    rng = np.random.default_rng(seed)
    n = groups * per_group + dead + saturated
    group = rng.permutation(np.concatenate([np.repeat(np.arange(groups), per_group), np.full(dead, -1),
                                           np.full(saturated, -2)]))
    topic = rng.integers(0, groups, n_blocks)
    prob = np.where(group[None, :] == topic[:, None], p_in, p_out)
    fired = rng.random((n_blocks, n)) < prob
    fired[:, group == -1] = False
    fired[:, group == -2] = True
    centres = rng.standard_normal((groups, d)) * 2
    decoders = rng.standard_normal((n, d)) * 0.5
    decoders[group >= 0] += centres[group[group >= 0]]
    if shuffle_geometry:
        decoders = decoders[rng.permutation(n)]
    return Planted(fired=fired, group=group, decoders=decoders.astype(np.float32), topic=topic,
                   sources=sources or tuple(f"source{g}" for g in range(groups)))


def pair_counts(fired: np.ndarray) -> pa.Table:
    x = fired.astype(np.int64)
    n11 = x.T @ x
    i, j = np.triu_indices(len(n11), 1)
    keep = n11[i, j] > 0
    return pairs_table(i[keep], j[keep], n11[i, j][keep])


def blocks_table(p: Planted, rows: np.ndarray | None = None) -> pa.Table:
    rows = np.arange(len(p.fired)) if rows is None else rows
    return pa.table({
        "block": pa.array(rows.astype(np.int64)),
        "document": pa.array((rows // 4).astype(np.int64)),
        "start": pa.array(((rows % 4) * 256 + 1).astype(np.int32)),
        "group_value": pa.array([p.sources[p.topic[b]] for b in rows], pa.string()),
        "features": pa.array([np.flatnonzero(p.fired[b]).astype(np.int32) for b in rows], pa.list_(pa.int32())),
    })


def commit_counts(db, decoders: np.ndarray, n_blocks: int, block_count: np.ndarray, pairs: pa.Table,
                  sae_id: str = "planted", blocks: pa.Table | None = None) -> int:
    features = features_table(decoders)
    features = features.set_column(features.schema.get_field_index("block_count"), "block_count",
                                   pa.array(np.asarray(block_count, dtype=np.int64)))
    row = sae_row("local", sae_id, decoders, n_blocks=n_blocks, group_column="source",
                  sample_blocks=None if blocks is None else blocks.num_rows)
    extra = {} if blocks is None else {"extra": {"blocks": blocks}}
    with writer(db) as cat:
        return cat.commit_sae(row, features, pairs, {"release": "local", "repo_id": None, "model": "gpt2",
                                                     "conversion_func": None, "links": None}, **extra)


def commit_planted(db, p: Planted, sae_id: str = "planted", blocks: pa.Table | None = None) -> int:
    return commit_counts(db, p.decoders, len(p.fired), p.n_i, pair_counts(p.fired), sae_id, blocks)


def load(db, sae: int, params: LobesParams = LobesParams()) -> lobes.LobesInputs:
    with Catalog.open(db) as cat:
        return lobes.load(cat, cat.sae_by_key(sae), params)


def agreement(result, affinity: str, n: int) -> dict:
    rows = [r for r in result.tables["lobe_agreement"].to_pylist() if r["affinity"] == affinity and r["n_lobes"] == n]
    assert len(rows) == 1
    return rows[0]


def labels_of(result, affinity: str, n: int) -> dict[int, int | None]:
    return {r["feature"]: r["lobe"] for r in result.tables["lobes"].to_pylist()
            if r["affinity"] == affinity and r["n_lobes"] == n}


# --------------------------------------------------------------------------- numpy references


def formulas(n11, n_i, n_j, t) -> dict[str, np.ndarray]:
    """The seven affinities of the view, in float64, NaN where a denominator is 0 (SQL NULL)."""
    n11, n_i, n_j = (np.asarray(a, dtype=np.float64) for a in (n11, n_i, n_j))
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), n11.shape)

    def div(a, b):
        b = np.asarray(b, dtype=np.float64)
        return np.divide(a, b, out=np.full(np.broadcast(a, b).shape, np.nan), where=b != 0)

    n10, n01, n00 = n_i - n11, n_j - n11, t - n_i - n_j + n11
    lift = div(n11 * t, n_i * n_j)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(lift)
    return {
        "smc": div(n11 + n00, t),
        "jaccard": div(n11, n_i + n_j - n11),
        "dice": div(2 * n11, n_i + n_j),
        "overlap": div(n11, np.minimum(n_i, n_j)),
        "phi": div(n11 * n00 - n10 * n01, np.sqrt(n_i * (t - n_i) * n_j * (t - n_j))),
        "lift": lift,
        "pmi": pmi,
    }


def clustering_transform(name: str, values: np.ndarray) -> np.ndarray:
    """What the lobes make of a view value: undefined -> 0; phi + 1; PMI -> max(pmi, 0)."""
    out = np.where(np.isfinite(values), values, 0.0)
    if name == "phi":
        return out + 1
    if name == "pmi":
        return np.maximum(out, 0.0)
    return out


def view_rows(db, sae: int) -> dict[str, np.ndarray]:
    with Catalog.open(db) as cat:
        table = cat.con.sql("SELECT * FROM feature_affinities WHERE sae = ? ORDER BY i, j",
                            params=[sae]).to_arrow_table()
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# --------------------------------------------------------------------------- 1-2. affinities


def test_sql_affinities_equal_numpy_formulas_including_null(db):
    """Every column of feature_affinities is its formula on the same counts, NULL exactly where a
    denominator is 0: arbitrary counts, with features that never fired (n_i = 0: overlap, phi,
    lift, pmi undefined) or fired in every block (phi undefined), and an SAE with T = 0 (smc)."""
    rng = np.random.default_rng(0)
    t, n = 50, 40
    block_count = rng.integers(1, t, n)
    block_count[[0, 1, 2]] = 0
    block_count[[3, 4]] = t
    i, j = np.triu_indices(n, 1)
    pick = rng.random(len(i)) < 0.4
    pick[(i == 0) & (j == 1)] = True  # n_i = n_j = 0: dice undefined
    pick[(i == 3) & (j == 4)] = True
    i, j = i[pick], j[pick]
    n11 = rng.integers(1, t + 1, len(i))
    dec = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    key = commit_counts(db, dec, t, block_count, pairs_table(i, j, n11), "arbitrary")
    key0 = commit_counts(db, dec[:4], 0, np.zeros(4), pairs_table([0, 1], [2, 3], [3, 7]), "no-blocks")
    for sae, total, counts in ((key, t, block_count), (key0, 0, np.zeros(4))):
        got = view_rows(db, sae)
        want = formulas(got["n11"], counts[got["i"]], counts[got["j"]], total)
        assert np.array_equal(got["n_i"], counts[got["i"]])
        assert np.array_equal(got["n_blocks"], np.full(len(got["i"]), total))
        for name in SQL_COLUMNS:
            value = np.array([np.nan if v is None else v for v in got[name]], dtype=np.float64)
            assert np.array_equal(np.isnan(value), np.isnan(want[name])), name
            np.testing.assert_allclose(value, want[name], rtol=1e-12, atol=1e-12, err_msg=name)
    nulls = {name: int(np.isnan(formulas(got["n11"], 0, 0, 0)[name]).sum()) for name in SQL_COLUMNS}
    assert nulls["smc"] and nulls["dice"]  # the T = 0 SAE exercised these
    first = view_rows(db, key)
    first_nan = {name: np.isnan(np.array([np.nan if v is None else v for v in first[name]], dtype=float)).any()
                 for name in SQL_COLUMNS}
    assert first_nan["phi"] and first_nan["overlap"] and first_nan["lift"] and first_nan["pmi"] and first_nan["jaccard"]


@pytest.fixture
def planted_sae(db) -> tuple[int, Planted]:
    p = planted(3, groups=3, per_group=60, n_blocks=300, saturated=2, dead=3)
    return commit_planted(db, p), p


@pytest.mark.parametrize("name", lobes.AFFINITIES)
def test_dense_matrices_equal_view_on_stored_pairs_and_formula_elsewhere(db, planted_sae, name):
    sae, p = planted_sae
    inputs = load(db, sae)
    included = inputs.included
    assert set(np.flatnonzero(p.group < 0)) == set(range(len(p.group))) - set(included.tolist())
    pos = {f: k for k, f in enumerate(included.tolist())}
    matrix = lobes.affinity_matrix(name, inputs)
    assert matrix.dtype == np.float32 and matrix.shape == (len(included),) * 2
    assert np.array_equal(matrix, matrix.T)
    view = view_rows(db, sae)
    both = np.array([i in pos and j in pos for i, j in zip(view["i"], view["j"])])
    rows = np.array([pos[i] for i in view["i"][both]])
    cols = np.array([pos[j] for j in view["j"][both]])
    stored = np.array([np.nan if v is None else v for v in view[name][both]], dtype=np.float64)
    np.testing.assert_allclose(matrix[rows, cols], clustering_transform(name, stored), rtol=2e-7, atol=1e-6)
    # Pairs that never co-fire: the formula with n11 = 0 (SMC is (T - n_i - n_j) / T, not 0).
    unstored = np.ones(matrix.shape, dtype=bool)
    unstored[rows, cols] = unstored[cols, rows] = False
    np.fill_diagonal(unstored, False)
    assert unstored.sum() > 0
    n_i = p.n_i[included]
    ui, uj = np.nonzero(unstored)
    want = clustering_transform(name, formulas(np.zeros(len(ui)), n_i[ui], n_i[uj], len(p.fired))[name])
    np.testing.assert_allclose(matrix[ui, uj], want, rtol=2e-7, atol=1e-6)
    if name == "smc":
        assert (want > 0.3).all()
    # The diagonal is the formula with n11 = n_i.
    diag = clustering_transform(name, formulas(n_i, n_i, n_i, len(p.fired))[name])
    np.testing.assert_allclose(np.diag(matrix), diag, rtol=2e-7, atol=1e-6)


def test_geometry_and_knn_matrices(db, planted_sae):
    sae, p = planted_sae
    inputs = load(db, sae, LobesParams(knn=10))
    # The packed counts give back XᵀX of the included features, rows in any chunking.
    x = p.fired[:, inputs.included].astype(np.int64)
    assert np.array_equal(inputs.n11.dense(), x.T @ x)
    assert np.array_equal(np.vstack([inputs.n11.rows(s, min(s + 7, x.shape[1])) for s in range(0, x.shape[1], 7)]),
                          x.T @ x)
    unit = p.decoders[inputs.included].astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    want = 1 - np.arccos(np.clip(unit @ unit.T, -1, 1)) / np.pi
    geometry = lobes.affinity_matrix(GEOMETRY, inputs)
    # Off the diagonal to float32 precision; on it arccos(1 - 1e-7) ~ 5e-4 amplifies the rounding of cos.
    off = ~np.eye(len(want), dtype=bool)
    np.testing.assert_allclose(geometry[off], want[off], atol=1e-5)
    np.testing.assert_allclose(np.diag(geometry), 1.0, atol=2e-3)
    assert np.array_equal(geometry, geometry.T)
    for name in ("phi", GEOMETRY, "jaccard"):
        dense = lobes.affinity_matrix(name, inputs)
        graph = lobes.affinity_matrix(name, inputs, knn=10)
        assert (graph != graph.T).nnz == 0 and graph.diagonal().sum() == 0
        coo = graph.tocoo()
        assert np.array_equal(coo.data, dense[coo.row, coo.col])  # every kept entry is the true affinity
        off_dense = np.where(np.eye(len(dense), dtype=bool), -np.inf, dense)
        for row in range(0, len(dense), 7):
            kept = np.sort(graph.getrow(row).data)[::-1][:10]
            assert np.array_equal(kept, np.sort(off_dense[row])[::-1][:10])  # each row keeps its top 10


def test_knn_over_stored_pairs_is_each_rows_top_k_among_them(db):
    """An SAE committed with only the pairs a policy keeps (as ingestion stores them): dense mode
    refuses it; the kNN graph is, row by row, the k strongest affinities among the row's stored
    partners (ties: the lower partner), symmetrised by max, from the same numbers as the dense
    matrix of the complete SAE; a pair below the policy is never an edge."""
    from ingest.pair_policy import PairPolicy, select
    from ingest.pipeline import policy_columns

    p = planted(5, groups=2, per_group=40, n_blocks=200)
    complete = pair_counts(p.fired)
    i, j, n11 = (complete.column(c).to_numpy() for c in ("i", "j", "n11"))
    policy = PairPolicy(min_blocks=2, top_partners=4, rank_by="phi")
    keep = select(policy, i, j, n11, p.n_i, len(p.fired))
    assert 0 < keep.sum() < len(keep)
    features = features_table(p.decoders)
    features = features.set_column(features.schema.get_field_index("block_count"), "block_count", pa.array(p.n_i))
    with writer(db) as cat:
        sae = cat.commit_sae(sae_row("local", "policy", p.decoders, n_blocks=len(p.fired), **policy_columns(policy)),
                             features, complete.filter(pa.array(keep)),
                             {"release": "local", "repo_id": None, "model": "gpt2", "conversion_func": None,
                              "links": None})
    whole = commit_planted(db, p, "complete")
    with pytest.raises(SaecatError, match=r"--min-pair-blocks 2 --top-partners 4 --rank-partners-by phi"):
        load(db, sae)
    k = 6
    inputs, full = load(db, sae, LobesParams(knn=k)), load(db, whole, LobesParams(knn=k))
    assert np.array_equal(inputs.included, full.included) and inputs.pair_policy["complete"] is False
    stored = {(a, b) for a, b in zip(i[keep].tolist(), j[keep].tolist())}
    pos = {f: n for n, f in enumerate(inputs.included.tolist())}
    for name in ("phi", "jaccard", "smc"):
        dense = lobes.affinity_matrix(name, full)
        want = np.zeros_like(dense)
        for row in range(len(dense)):
            f = int(inputs.included[row])
            cands = sorted((-float(dense[row, pos[g]]), pos[g]) for g in pos
                           if (min(f, g), max(f, g)) in stored and dense[row, pos[g]] > 0)
            for _, col in cands[:k]:
                want[row, col] = dense[row, col]
        want = np.maximum(want, want.T)
        graph = lobes.affinity_matrix(name, inputs, knn=k)
        np.testing.assert_allclose(graph.toarray(), want, rtol=1e-6)
        edges = graph.tocoo()
        assert all((int(inputs.included[min(a, b)]), int(inputs.included[max(a, b)])) in stored
                   for a, b in zip(edges.row, edges.col))


# --------------------------------------------------------------------------- clustering


def projector_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||P_a - P_b||₂ of the orthogonal projectors on span(a) and span(b): the sine of their
    largest principal angle (0: the same subspace, 1: a direction of one orthogonal to the other)."""
    qa, qb = np.linalg.qr(a.astype(np.float64))[0], np.linalg.qr(b.astype(np.float64))[0]
    return float(np.linalg.norm(qa @ qa.T - qb @ qb.T, 2))


def test_shared_embedding_gives_spectral_clustering_labels(db):
    """k-means on the first n columns of one max(n)-component embedding = SpectralClustering per n:
    the first n columns span the subspace sklearn finds when asked for n, and the labels are its."""
    from scipy.sparse.csgraph import laplacian
    from sklearn.manifold import spectral_embedding

    p = planted(5, groups=4, per_group=40, n_blocks=300)
    inputs = load(db, commit_planted(db, p))
    params = LobesParams(n_lobes=(2, 3, 4, 6))
    for name in ("phi", GEOMETRY):
        matrix = lobes.affinity_matrix(name, inputs)
        embedding, warned = lobes.embed(matrix, max(params.n_lobes), params)
        assert warned == []
        # What ARPACK solved: the normalised Laplacian, with u = D^-1/2 x returned for its
        # eigenvectors x (so u * sqrt(degree) has orthonormal columns), eigenvalues in float64 here.
        lap, sqrt_degree = laplacian(matrix.astype(np.float64), normed=True, return_diag=True)
        eigenvalues = np.linalg.eigvalsh(lap)
        for n in params.n_lobes:
            alone = spectral_embedding(matrix, n_components=n, random_state=params.seed, drop_first=False)
            # Eigenvectors are defined only up to sign and, where eigenvalues nearly coincide (the
            # three group eigenvalues of phi above 0 lie within 8e-3), up to a rotation among them; the
            # solver stops at a different rotation for a different k, BLAS kernel or thread count,
            # so single vectors are compared nowhere. What does not move is the span of the first n.
            # Davis-Kahan: sin(angle to the exact span) <= ||residual|| / gap for each of the two
            # solves; ARPACK (tol=0) runs in the matrix's float32, whose LU solves promise a residual
            # of about sqrt(F) eps ||L|| = 25 eps with ||L|| <= 2 (measured: 2-6 eps with OpenBLAS's
            # Haswell, SkylakeX, Sandybridge and Prescott kernels; the worst angle, phi at n = 3,
            # was 2.2e-4 against a bound of 2.8e-3).
            gap = eigenvalues[n] - eigenvalues[n - 1]
            residual = np.sqrt(len(matrix)) * np.finfo(matrix.dtype).eps * 2
            bound = 2 * residual / gap
            assert bound < 0.05, (name, n, gap)  # a real check: a wrong span is off by O(1)
            distance = projector_distance(embedding[:, :n] * sqrt_degree[:, None], alone * sqrt_degree[:, None])
            assert distance <= bound, (name, n, distance, bound)
            ours = lobes.cluster(embedding, n, params.seed)
            theirs = SpectralClustering(n_clusters=n, affinity="precomputed", assign_labels="kmeans",
                                        random_state=params.seed, n_init=10).fit_predict(matrix)
            assert adjusted_rand_score(ours, theirs) == pytest.approx(1.0), (name, n)
            assert sorted(np.bincount(ours).tolist(), reverse=True) == np.bincount(ours).tolist()  # lobe 0 largest


def test_planted_lobes_match_geometry(db):
    p = planted(11, groups=3, per_group=100)
    sae = commit_planted(db, p)
    result = lobes.run(db, sae=sae, params=LobesParams(affinities=("phi", "jaccard", "pmi"), n_lobes=(2, 3), **FAST))
    group = p.group
    for name in ("phi", "jaccard", "pmi", GEOMETRY):
        found = labels_of(result, name, 3)
        assert adjusted_mutual_info_score(group, [found[f] for f in range(len(group))]) > 0.95, name
    for name in ("phi", "jaccard", "pmi"):
        row = agreement(result, name, 3)
        assert row["ami"] > 0.9 and abs(row["ami_null_mean"]) < 0.02 and row["ami_z"] > 50, row
        assert row["accuracy_index"] > 0.95 and row["accuracy_shuffled"] > 0.95, row
        assert abs(row["accuracy_null_mean"] - 1 / 3) < 0.12 and row["accuracy_z"] > 5, row
    summary = result.summary
    assert summary["n_included"] == 300 and summary["excluded"] == {"dead": 0, "saturated": 0}
    assert summary["n_blocks"] == 400 and summary["sampled_blocks"] == 0
    assert "lobe_documents" not in result.tables and any("no sampled blocks" in n for n in summary["notes"])
    assert [(a["affinity"], a["n_lobes"]) for a in summary["agreement"]] == [
        (a, n) for a in ("phi", "jaccard", "pmi") for n in (2, 3)]
    sizes = {(e["affinity"], e["n_lobes"]): [lobe["size"] for lobe in e["lobes"]] for e in summary["lobes"]}
    assert sorted(sizes[("phi", 3)]) == sorted(np.bincount(group).tolist())


@pytest.mark.parametrize("solver", ["arpack", "lobpcg"])
def test_knn_mode_finds_the_same_planted_lobes(db, solver):
    """The kNN-sparsified affinities (12 neighbours of 300) keep the lobes, with either solver
    (lobpcg is what large sparse graphs need; it must not stop early on a float32 tolerance)."""
    p = planted(11, groups=3, per_group=100)
    inputs = load(db, commit_planted(db, p))
    params = LobesParams(affinities=("phi", "dice"), n_lobes=(3,), knn=12, eigen_solver=solver, **FAST)
    summary, tables = lobes.compute(inputs, params)
    lobe_rows = tables["lobes"].to_pylist()
    for name in ("phi", "dice", GEOMETRY):
        found = {r["feature"]: r["lobe"] for r in lobe_rows if r["affinity"] == name}
        assert adjusted_mutual_info_score(p.group, [found[f] for f in range(len(p.group))]) > 0.95, name
        graph = summary["graphs"][name]
        assert 12 * 300 <= graph["stored"] <= 2 * 12 * 300
        # Planted groups this clean may leave one component per group: then sklearn's warning is kept.
        assert graph["components"] in (1, 2, 3)
        assert (graph["components"] > 1) == any(n.startswith(f"{name}: Graph is not fully connected")
                                                for n in summary["notes"])
    assert summary["mode"].startswith("knn (k = 12")
    assert all(row["ami"] > 0.9 for row in summary["agreement"])


def test_pair_counts_hold_counts_past_uint16():
    counts = lobes.PairCounts(np.array([70_000, 5, 69_000, 1]), n_blocks=80_000)
    assert counts.dtype == np.uint32 and counts.nbytes == 6 * 4
    counts.put(np.array([0, 0, 1, 2]), np.array([2, 3, 3, 3]), np.array([68_000, 1, 1, 1]))
    assert counts.dense().tolist() == [[70_000, 0, 68_000, 1], [0, 5, 0, 1], [68_000, 0, 69_000, 1], [1, 1, 1, 1]]
    assert lobes.PairCounts(np.ones(3), n_blocks=65_535).dtype == np.uint16


def test_shuffled_geometry_is_at_chance(db):
    p = planted(11, groups=3, per_group=100, shuffle_geometry=True)
    params = LobesParams(n_lobes=(3,), permutations=100, null_repeats=3)
    result = lobes.run(db, sae=commit_planted(db, p), params=params)
    row = agreement(result, "phi", 3)
    assert abs(row["ami"] - row["ami_null_mean"]) < 4 * row["ami_null_std"] and abs(row["ami"]) < 0.03, row
    assert abs(row["accuracy_index"] - 1 / 3) < 0.15 and abs(row["accuracy_shuffled"] - 1 / 3) < 0.15, row
    assert abs(row["accuracy_z"]) < 4, row
    # The co-occurrence lobes are still the planted groups: only their geometry was scrambled.
    found = labels_of(result, "phi", 3)
    assert adjusted_mutual_info_score(p.group, [found[f] for f in range(len(p.group))]) > 0.95


def test_dead_and_saturated_features_are_excluded_not_lumped(db):
    p = planted(21, groups=3, per_group=80, dead=25, saturated=6)
    params = LobesParams(affinities=("phi", "smc"), n_lobes=(3, 4), **FAST)
    result = lobes.run(db, sae=commit_planted(db, p), params=params)
    rows = result.tables["lobes"].to_pylist()
    assert len(rows) == 3 * 2 * len(p.group)  # geometry, phi, smc x 2 n x every feature
    for r in rows:
        kind = p.group[r["feature"]]
        if kind == -1:
            assert r["lobe"] is None and r["excluded"] == "dead"
        elif kind == -2:
            assert r["lobe"] is None and r["excluded"] == "saturated"
        else:
            assert r["lobe"] is not None and r["excluded"] is None
    assert result.summary["excluded"] == {"dead": 25, "saturated": 6}
    assert result.summary["n_included"] == 240 and result.summary["n_features"] == 271
    assert any("25 dead" in n and "6 saturated" in n for n in result.summary["notes"])
    live = np.flatnonzero(p.group >= 0)
    for name in ("phi", "smc", GEOMETRY):
        found = labels_of(result, name, 3)
        assert adjusted_mutual_info_score(p.group[live], [found[f] for f in live]) > 0.9, name
        sizes = np.bincount([found[f] for f in live])
        assert sizes.max() <= 90, (name, sizes)  # no giant lobe of everything
    assert agreement(result, "phi", 3)["ami"] > 0.9
    # What the explicit exclusion avoids: with phi + 1 a dead feature has affinity 1 to every
    # feature, the mean of phi + 1 over an unrelated pair, so it sits between every lobe.
    n = p.n_i.astype(np.float64)
    dead_phi = lobes.affinity_rows("phi", np.zeros((1, len(n))), n[:1] * 0, n, len(p.fired))
    assert np.array_equal(dead_phi, np.ones_like(dead_phi))


# --------------------------------------------------------------------------- documents


def direct_wins(blocks: pa.Table, found: dict[int, int | None], n: int) -> dict[tuple[int, str], int]:
    """Per block, |fired ∩ L| / |L| for each lobe with plain Python sets; the argmax (ties: lower lobe)."""
    members = {lobe: {f for f, l in found.items() if l == lobe} for lobe in range(n)}
    out: dict[tuple[int, str], int] = {}
    for row in blocks.to_pylist():
        fired = set(row["features"])
        scores = [len(fired & members[lobe]) / len(members[lobe]) for lobe in range(n)]
        if max(scores) == 0:
            continue
        key = (scores.index(max(scores)), row["group_value"])
        out[key] = out.get(key, 0) + 1
    return out


def test_lobes_win_the_blocks_of_their_own_source(db):
    p = planted(31, groups=2, per_group=120, n_blocks=500, saturated=3, sources=("code", "prose"))
    sample = np.sort(np.random.default_rng(0).choice(500, 300, replace=False))
    blocks = blocks_table(p, sample)
    # One more sampled block where only the saturated features fired: no lobe wins it.
    empty = pa.table({"block": pa.array([10_000], pa.int64()), "document": pa.array([9_999], pa.int64()),
                      "start": pa.array([1], pa.int32()), "group_value": pa.array([None], pa.string()),
                      "features": pa.array([np.flatnonzero(p.group == -2).astype(np.int32)], pa.list_(pa.int32()))})
    blocks = pa.concat_tables([blocks, empty])
    result = lobes.run(db, sae=commit_planted(db, p, blocks=blocks),
                       params=LobesParams(affinities=("phi", "dice"), n_lobes=(2, 3), **FAST))
    documents = result.tables["lobe_documents"].to_pylist()
    for name in ("phi", "dice", GEOMETRY):
        for n in (2, 3):
            found = {f: l for f, l in labels_of(result, name, n).items() if l is not None}
            got = {(r["lobe"], r["group_value"]): r["blocks"] for r in documents
                   if r["affinity"] == name and r["n_lobes"] == n}
            assert got == direct_wins(blocks, found, n), (name, n)
            assert sum(got.values()) == 300
            assert result.summary["blocks_without_lobe"][f"{name}/{n}"] == 1
    # With two lobes, each wins its own source's blocks.
    for name in ("phi", "dice"):
        got = {(r["lobe"], r["group_value"]): r["blocks"] for r in documents
               if r["affinity"] == name and r["n_lobes"] == 2}
        winner = {source: max((lobe for lobe in (0, 1)), key=lambda lobe: got.get((lobe, source), 0))
                  for source in ("code", "prose")}
        assert winner["code"] != winner["prose"]
        for source in ("code", "prose"):
            total = int((p.topic[sample] == p.sources.index(source)).sum())
            assert got.get((winner[source], source), 0) >= 0.97 * total, (name, source, got)
    phi2 = next(e for e in result.summary["lobes"] if e["affinity"] == "phi" and e["n_lobes"] == 2)
    assert {lobe["top_groups"][0]["group"] for lobe in phi2["lobes"]} == {"code", "prose"}
    assert sum(lobe["blocks_won"] for lobe in phi2["lobes"]) == 300


# --------------------------------------------------------------------------- stored, cached, drawn


def test_run_is_stored_once_and_cached_and_plotted(db, tmp_path):
    p = planted(41, groups=2, per_group=60, n_blocks=200, dead=2, sources=("code", "prose"))
    commit_planted(db, p, blocks=blocks_table(p))
    params = LobesParams(affinities=("phi", "overlap"), n_lobes=(2, 4), permutations=20, null_repeats=2)
    first = lobes.run(db, "local", "planted", params=params)
    second = lobes.run(db, "local", "planted", params=params)
    assert not first.cached and second.cached and first.analysis == second.analysis is not None
    with Catalog.open(db) as cat:
        counts = {t: cat.con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                  for t in ("analyses", "lobes", "lobe_agreement", "lobe_documents")}
    assert counts == {"analyses": 1, **{t: first.tables[t].num_rows for t in counts if t != "analyses"}}
    assert set(second.tables) == set(first.tables) == {"lobes", "lobe_agreement", "lobe_documents"}
    for name, table in first.tables.items():
        assert second.tables[name].to_pylist() == table.to_pylist(), name  # same rows, same order
    assert second.summary == first.summary
    assert second.params == first.params and second.params["n_lobes"] == [2, 4]
    forced = lobes.run(db, "local", "planted", params=params, force=True)
    assert not forced.cached and forced.analysis != first.analysis
    for suffix, magic in (("png", b"\x89PNG"), ("svg", b"<?xml")):
        out = lobes.plot(second, tmp_path / f"lobes.{suffix}")
        data = out.read_bytes()
        assert data.startswith(magic) and len(data) > 5_000
    no_blocks = planted(42, groups=2, per_group=40, n_blocks=100)
    commit_planted(db, no_blocks, sae_id="bare")
    bare = lobes.run(db, "local", "bare", params=LobesParams(n_lobes=(2,), permutations=5, null_repeats=1))
    assert lobes.plot(bare, tmp_path / "bare.png").stat().st_size > 5_000


def test_params_are_checked_at_the_door():
    assert LobesParams(n_lobes=[8, 2, 2], affinities=["pmi", "phi"]).n_lobes == (2, 8)
    for bad in (dict(affinities=("lift",)), dict(n_lobes=(1, 2)), dict(test_fraction=1.0), dict(knn=0),
                dict(eigen_solver="dense")):
        with pytest.raises(lobes.SaecatError):
            LobesParams(**bad)
