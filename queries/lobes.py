"""Lobes, the intermediate scale: spectral clusters of features by co-occurrence, against clusters
of their decoder directions, and the documents each lobe wins.

For each co-occurrence affinity (SMC, Jaccard, Dice, overlap, phi, PMI, all from the catalog's
counts T, n_i, n11) and for the decoder geometry (1 - angle/π), features are spectrally clustered
into n lobes for each asked n. Then, per co-occurrence affinity and n:

- AMI between its lobes and the geometric clusters, against permutations of the lobe labels;
- balanced accuracy of a logistic regression from the decoder vector to the lobe (split by
  feature index as the paper did, and a shuffled stratified split), against the same regression
  on i.i.d. Gaussian unit vectors;
- and, for every labelling, the sampled blocks (the catalog's `blocks`) each lobe wins: per block
  score_L = |features firing in it ∩ L| / |L|, the block goes to the argmax.

Features that never fired in a full block ('dead') or fired in every one ('saturated') have
undefined phi (phi + 1 would give a dead feature affinity 1 to everything): they are excluded
from everything and listed with lobe NULL and the reason. See docs/geometry-methods.md §2.

An SAE whose catalog keeps only the pairs a policy asks for (`saes.pairs_complete` false: ingested
with --min-pair-blocks above 1 or --top-partners) has no n11 for the pairs below the policy.
Dense affinities would read each of them as n11 = 0, so dense mode refuses such an SAE. kNN mode
clusters it from its stored pairs only (see `StoredPairs`); the summary's `pair_policy` says what
the SAE stored, for every run.

>>> from queries import lobes                                      # doctest: +SKIP
>>> result = lobes.run("saecat.duckdb", "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical",
...                    params=lobes.LobesParams(affinities=("phi", "overlap"), n_lobes=(2, 3, 8)))
>>> result.tables["lobe_agreement"].to_pandas()                  # doctest: +SKIP
>>> lobes.plot(result, "lobes.png")                               # doctest: +SKIP
"""

from __future__ import annotations

import os
import pathlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import sparse
from scipy.sparse import csgraph

from catalog.errors import SaecatError
from catalog.store import Catalog, SaeRecord, first_row
from ingest.pair_policy import top_partner_mask
from queries import analyses
from queries.analyses import Analysis

KIND = "lobes"
# Co-occurrence affinities that can be clustered, each made non-negative (see `affinity_rows`).
AFFINITIES = ("smc", "jaccard", "dice", "overlap", "phi", "pmi")
GEOMETRY = "geometry"
TRANSFORMS = {
    "smc": "(n11 + n00) / T",
    "jaccard": "n11 / (n_i + n_j - n11)",
    "dice": "2 n11 / (n_i + n_j)",
    "overlap": "n11 / min(n_i, n_j)",
    "phi": "phi + 1, undefined phi set to 0 first (as the authors did; cannot happen once dead and saturated "
           "features are excluded)",
    "pmi": "max(pmi, 0) (positive PMI); pairs that never co-fire (pmi = -inf) get 0",
    GEOMETRY: "1 - arccos(clip(cos, -1, 1)) / pi of unit-normalised decoder rows",
}
# Elements of one row chunk of an affinity (a handful of float64/int64 temporaries of 64 MB
# each): 512 rows of a 16k-wide SAE, 128 of a 65k one.
CHUNK_ELEMENTS = 1 << 23
BATCH_ROWS = 1 << 20  # co-occurrence pairs read from DuckDB at once
SMALL = 2048  # up to this many included features, everything runs on one thread (see _threads)


@dataclass(frozen=True)
class LobesParams:
    """What to cluster and how; every field is recorded with the stored result."""

    affinities: tuple[str, ...] = ("phi",)  # co-occurrence affinities, of AFFINITIES
    n_lobes: tuple[int, ...] = (2, 3, 4, 8)  # numbers of clusters; one spectral embedding serves them all
    permutations: int = 100  # AMI null: permutations of the lobe labels
    null_repeats: int = 5  # logistic-regression null: draws of random unit vectors
    test_fraction: float = 0.2  # held-out share, for the index split (last features) and the shuffled one
    seed: int = 42  # spectral embedding, k-means, permutations, null vectors, shuffled split
    # None: dense F' x F' float32 affinities, the authors' method (1.07 GB at 16k, 17 GB at 65k,
    # and arpack's dense factorisation needs about three times that). k: keep each row's k
    # strongest affinities, symmetrised by max, in scipy.sparse CSR: at most 2 k F' entries of
    # 8 bytes (17 MB at 16k, 67 MB at 65k for k = 64), what makes a 65k-wide SAE fit in memory
    # (the packed n11 counts, 4.3-8.6 GB at 65k, are then the largest thing held).
    knn: int | None = None
    # sklearn's spectral_embedding solver: 'arpack' (SpectralClustering's default, the authors';
    # shift-invert, so it factorises the Laplacian: at 16k dense ~75 s, with a peak of 3.2x the
    # matrix), 'lobpcg' (matrix products only: ~8 s on a 16k kNN graph, and what a 65k one needs)
    # or 'amg' (needs pyamg). None: arpack for dense affinities, lobpcg for kNN ones.
    eigen_solver: str | None = None
    max_iter: int = 1000  # lbfgs iterations of each logistic regression
    top_groups: int = 3  # group values listed per lobe in the summary

    def __post_init__(self) -> None:
        # Called from the CLI and HTTP with lists: store tuples, sorted and unique where order is no meaning.
        object.__setattr__(self, "affinities", tuple(dict.fromkeys(self.affinities)))
        object.__setattr__(self, "n_lobes", tuple(sorted(set(int(n) for n in self.n_lobes))))
        unknown = [a for a in self.affinities if a not in AFFINITIES]
        if unknown or not self.affinities:
            raise SaecatError(f"affinities must be some of {', '.join(AFFINITIES)}; got {list(self.affinities)}")
        if not self.n_lobes or self.n_lobes[0] < 2:
            raise SaecatError(f"n_lobes must be integers >= 2; got {list(self.n_lobes)}")
        if self.permutations < 0 or self.null_repeats < 0:
            raise SaecatError("permutations and null_repeats must be >= 0")
        if not 0 < self.test_fraction < 1:
            raise SaecatError(f"test_fraction must be in (0, 1); got {self.test_fraction}")
        if self.knn is not None and self.knn < 1:
            raise SaecatError(f"knn must be a positive number of neighbours or None (dense); got {self.knn}")
        if self.eigen_solver not in (None, "arpack", "lobpcg", "amg"):
            raise SaecatError(f"eigen_solver must be arpack, lobpcg or amg; got {self.eigen_solver!r}")


@dataclass
class LobesInputs:
    """What `load` reads from the catalog. Matrices are over the included features only, in
    feature order (`included[k]` is the catalog index of row k)."""

    n_blocks: int  # T, full blocks counted
    block_count: np.ndarray  # n_i of every feature, int64 [F]
    decoders: np.ndarray  # every feature's decoder row, float32 [F, d]
    included: np.ndarray  # features neither dead nor saturated, ascending [F']
    n11: "PairCounts | StoredPairs"  # every pair of included features, or (incomplete pairs) the stored ones
    blocks: sparse.csr_matrix | None  # sampled block x included feature, 1 where it fired; None: no blocks
    block_groups: list[str | None] = field(default_factory=list)  # each sampled block's group_value
    pair_policy: dict[str, Any] = field(default_factory=lambda: dict(COMPLETE_POLICY))  # what the SAE stored

    @property
    def excluded(self) -> dict[str, np.ndarray]:
        return excluded_features(self.block_count, self.n_blocks)


def excluded_features(block_count: np.ndarray, n_blocks: int) -> dict[str, np.ndarray]:
    """Features phi cannot score: 'dead' (no full block) and 'saturated' (every full block)."""
    return {"dead": np.flatnonzero(block_count <= 0), "saturated": np.flatnonzero(block_count >= n_blocks)}


# --------------------------------------------------------------------------- load


def load(cat: Catalog, record: SaeRecord, params: LobesParams) -> LobesInputs:
    """Counts, decoders and sampled blocks of one SAE, read under the read-only catalog."""
    sae = record.sae
    policy = pair_policy(cat, record)
    if not policy["complete"] and params.knn is None:
        raise SaecatError(
            f"SAE ({record.release!r}, {record.sae_id!r}) stores only the co-occurring pairs its policy keeps "
            f"({describe_policy(policy)}), and dense affinities would read every pair below it as n11 = 0: "
            "run lobes with --knn K, which clusters each feature's stored partners, or re-ingest the SAE with "
            "the complete policy (--min-pair-blocks 1, no --top-partners, --force)")
    n_blocks = int(first_row(cat.con, "SELECT coalesce(n_blocks, 0) FROM saes WHERE sae = ?", [sae])[0])
    block_count = cat.con.sql("SELECT block_count FROM features WHERE sae = ? ORDER BY feature",
                              params=[sae]).fetchnumpy()["block_count"].astype(np.int64)
    n_features = len(block_count)
    included = np.flatnonzero((block_count > 0) & (block_count < n_blocks))
    pos = np.full(n_features, -1, dtype=np.int64)
    pos[included] = np.arange(len(included))
    if policy["complete"]:
        n11 = _load_pairs(cat, sae, pos, block_count[included], n_blocks)
    else:
        n11 = StoredPairs.load(cat, sae, pos, len(included))
    decoders = cat.decoders(sae)
    blocks, groups = _load_blocks(cat, sae, pos, len(included))
    return LobesInputs(n_blocks=n_blocks, block_count=block_count, decoders=decoders, included=included,
                       n11=n11, blocks=blocks, block_groups=groups, pair_policy=policy)


# What an SAE that stores every pair with n11 > 0 records (every SAE ingested before pair policies).
COMPLETE_POLICY = {"min_blocks": 1, "top_partners": None, "rank_by": None, "complete": True}


def pair_policy(cat: Catalog, record: SaeRecord) -> dict[str, Any]:
    """The SAE's pair policy as `saes` records it (ingest.pair_policy): which pairs it stored."""
    row = first_row(cat.con, "SELECT pair_min_blocks, pair_top_partners, pair_rank_by, pairs_complete "
                             "FROM saes WHERE sae = ?", [record.sae])
    if row is None or row[3] is None:  # only an SAE not ingested yet records no policy
        return dict(COMPLETE_POLICY)
    return {"min_blocks": row[0], "top_partners": row[1], "rank_by": row[2], "complete": bool(row[3])}


def describe_policy(policy: dict[str, Any]) -> str:
    """The ingestion flags that give this policy."""
    flags = [f"--min-pair-blocks {policy['min_blocks']}"]
    if policy["top_partners"] is not None:
        flags.append(f"--top-partners {policy['top_partners']} --rank-partners-by {policy['rank_by']}")
    return " ".join(flags)


class PairCounts:
    """n11 of every pair of F' features, kept as the packed upper triangle (i < j, row-major) in
    the narrowest unsigned type that holds T: F'(F'-1)/2 x 2 or 4 bytes, 0.27/0.54 GB at 16k and
    4.3/8.6 GB at 65k, half a dense matrix and less than any sparse format at the pair densities
    of real catalogs (most pairs co-fire at least once). Rows of the full symmetric matrix, with
    n_i on the diagonal, are gathered on demand."""

    def __init__(self, diagonal: np.ndarray, n_blocks: int):
        self.size = size = len(diagonal)
        self.diagonal = np.asarray(diagonal, dtype=np.int64)
        self.dtype = np.uint16 if n_blocks < 2**16 else np.uint32
        self.packed = np.zeros(size * (size - 1) // 2, dtype=self.dtype)
        rows = np.arange(size, dtype=np.int64)
        self.offsets = rows * size - rows * (rows + 1) // 2 - rows - 1  # packed index of (i, j) = offsets[i] + j

    def put(self, i: np.ndarray, j: np.ndarray, n11: np.ndarray) -> None:
        """Store pairs with i < j."""
        self.packed[self.offsets[i] + j] = n11

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the symmetric matrix, float64."""
        r = np.arange(start, stop, dtype=np.int64)[:, None]
        c = np.arange(self.size, dtype=np.int64)[None, :]
        low, high = np.minimum(r, c), np.maximum(r, c)
        index = self.offsets[low] + high
        index[high == low] = 0
        out = self.packed[index].astype(np.float64) if len(self.packed) else np.zeros(index.shape)
        out[np.arange(stop - start), np.arange(start, stop)] = self.diagonal[start:stop]
        return out

    def dense(self) -> np.ndarray:
        return self.rows(0, self.size)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def _load_pairs(cat: Catalog, sae: int, pos: np.ndarray, diagonal: np.ndarray, n_blocks: int) -> PairCounts:
    """n11 of the included features, streamed from DuckDB in batches straight into the packed
    triangle: a 16k-wide SAE's ~1e8 stored pairs never sit in memory as rows all at once."""
    counts = PairCounts(diagonal, n_blocks)
    reader = cat.con.sql("SELECT i, j, n11 FROM cooccurrence WHERE sae = ?", params=[sae]).to_arrow_reader(BATCH_ROWS)
    for batch in reader:
        i = pos[batch.column(0).to_numpy()]
        j = pos[batch.column(1).to_numpy()]
        keep = (i >= 0) & (j >= 0)
        i, j, n = i[keep], j[keep], batch.column(2).to_numpy()[keep]
        counts.put(np.minimum(i, j), np.maximum(i, j), n)
    return counts


class StoredPairs:
    """The stored pairs of an SAE whose pairs are incomplete (a pair policy kept some): both
    orientations (i, j) and (j, i) of each stored pair of included features, grouped by row,
    with their exact n11. A pair that is not here is below the policy: nothing is assumed of it.
    Memory is ~16 bytes per stored pair, whatever the width: what a wide SAE's catalog holds."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, n11: np.ndarray, size: int):
        order = np.lexsort((cols, rows))
        self.row, self.col, self.n11, self.size = rows[order], cols[order], n11[order], size

    @classmethod
    def load(cls, cat: Catalog, sae: int, pos: np.ndarray, size: int) -> "StoredPairs":
        parts_i, parts_j, parts_n = [], [], []
        reader = cat.con.sql("SELECT i, j, n11 FROM cooccurrence WHERE sae = ?",
                             params=[sae]).to_arrow_reader(BATCH_ROWS)
        for batch in reader:
            i = pos[batch.column(0).to_numpy()]
            j = pos[batch.column(1).to_numpy()]
            keep = (i >= 0) & (j >= 0)
            parts_i.append(i[keep].astype(np.int32))
            parts_j.append(j[keep].astype(np.int32))
            parts_n.append(batch.column(2).to_numpy()[keep].astype(np.int64))
        i, j, n = (np.concatenate(p) if p else np.zeros(0, dtype=t)
                   for p, t in ((parts_i, np.int32), (parts_j, np.int32), (parts_n, np.int64)))
        return cls(np.r_[i, j], np.r_[j, i], np.r_[n, n], size)

    def partners(self) -> np.ndarray:
        """Stored partners of each included feature [F']."""
        return np.bincount(self.row, minlength=self.size)

    @property
    def nbytes(self) -> int:
        return self.row.nbytes + self.col.nbytes + self.n11.nbytes


def _load_blocks(cat: Catalog, sae: int, pos: np.ndarray, size: int) -> tuple[sparse.csr_matrix | None, list]:
    table = cat.con.sql("SELECT group_value, features FROM blocks WHERE sae = ? ORDER BY block",
                        params=[sae]).to_arrow_table()
    if table.num_rows == 0:
        return None, []
    lists = table.column("features").combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(len(lists)), np.diff(offsets))
    valid = (values >= 0) & (values < len(pos))
    cols = np.full(len(values), -1, dtype=np.int64)
    cols[valid] = pos[values[valid]]
    keep = cols >= 0  # excluded features belong to no lobe
    matrix = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])),
                               shape=(len(lists), size))
    matrix.data[:] = 1.0  # a feature listed twice in a block still counts once
    return matrix, table.column("group_value").to_pylist()


# --------------------------------------------------------------------------- affinities


def affinity_rows(name: str, n11: np.ndarray, n_rows: np.ndarray, n_cols: np.ndarray, n_blocks: int) -> np.ndarray:
    """One block of a co-occurrence affinity, float64 [len(n_rows), len(n_cols)], with exactly the
    formulas of the `feature_affinities` view, then made a non-negative clustering affinity:
    undefined values (a zero denominator) become 0, phi gets + 1 and PMI becomes max(pmi, 0).
    Written so that (i, j) and (j, i) round identically: the matrices come out exactly symmetric."""
    return affinity_values(name, n11, n_rows.astype(np.float64)[:, None], n_cols.astype(np.float64)[None, :],
                           n_blocks)


def affinity_values(name: str, n11: np.ndarray, ni: np.ndarray, nj: np.ndarray, n_blocks: int) -> np.ndarray:
    """`affinity_rows`, element by element over arrays that broadcast together (the same
    formulas and the same non-negative transform)."""
    t = float(n_blocks)
    a = n11.astype(np.float64, copy=False)
    ni = np.asarray(ni, dtype=np.float64)
    nj = np.asarray(nj, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if name == "smc":
            out = (t - (ni + nj) + 2 * a) / t
        elif name == "jaccard":
            out = a / ((ni + nj) - a)
        elif name == "dice":
            out = 2 * a / (ni + nj)
        elif name == "overlap":
            out = a / np.minimum(ni, nj)
        elif name == "phi":
            spread_i, spread_j = ni * (t - ni), nj * (t - nj)
            out = (a * (t - (ni + nj) + a) - (ni - a) * (nj - a)) / np.sqrt(spread_i * spread_j)
        elif name == "pmi":
            out = np.log(a * t / (ni * nj))
        else:
            raise SaecatError(f"unknown affinity {name!r}")
    out[~np.isfinite(out)] = 0.0
    if name == "phi":
        out += 1.0
    elif name == "pmi":
        np.maximum(out, 0.0, out=out)
    return out


def geometry_rows(unit: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of 1 - arccos(cos θ)/π over unit decoder rows, float32."""
    cos = unit[start:stop] @ unit.T
    np.clip(cos, -1.0, 1.0, out=cos)
    return (1.0 - np.arccos(cos) / np.pi).astype(np.float32, copy=False)


def unit_rows(decoders: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(decoders, axis=1, keepdims=True)
    return np.divide(decoders, norms, out=np.zeros_like(decoders, dtype=np.float32), where=norms > 0).astype(
        np.float32, copy=False)


def _row_chunks(size: int):
    step = max(1, CHUNK_ELEMENTS // max(size, 1))
    for start in range(0, size, step):
        yield start, min(size, start + step)


def affinity_matrix(name: str, inputs: LobesInputs, knn: int | None = None):
    """The clustering affinity over the included features: dense float32 [F', F'] (exactly
    symmetric) or, with `knn`, each row's knn strongest off-diagonal entries symmetrised by max,
    as scipy.sparse CSR float32. Built one row chunk at a time: one matrix in memory, never more."""
    size = len(inputs.included)
    if name != GEOMETRY and isinstance(inputs.n11, StoredPairs):
        if knn is None:
            raise SaecatError("dense affinities need every pair's n11; this SAE's pairs are incomplete: use knn")
        return stored_knn(name, inputs, knn)
    if name == GEOMETRY:
        unit = unit_rows(inputs.decoders[inputs.included])
        rows = lambda s, e: geometry_rows(unit, s, e)  # noqa: E731
    else:
        counts = inputs.block_count[inputs.included]
        rows = lambda s, e: affinity_rows(name, inputs.n11.rows(s, e), counts[s:e], counts,  # noqa: E731
                                          inputs.n_blocks)
    if knn is None:
        matrix = np.empty((size, size), dtype=np.float32)
        for start, stop in _row_chunks(size):
            matrix[start:stop] = rows(start, stop)
        _mirror_upper(matrix)
        return matrix
    k = min(knn, size - 1)
    cols, vals = [], []
    for start, stop in _row_chunks(size):
        block = rows(start, stop).astype(np.float32, copy=False)
        block[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # no self-loops
        top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((stop - start, 0), int)
        cols.append(top.astype(np.int32))
        vals.append(np.take_along_axis(block, top, axis=1))
    col = np.concatenate(cols).ravel()
    val = np.concatenate(vals).ravel()
    row = np.repeat(np.arange(size, dtype=np.int32), k)
    keep = val > 0
    graph = sparse.csr_matrix((val[keep], (row[keep], col[keep])), shape=(size, size), dtype=np.float32)
    return graph.maximum(graph.T).tocsr()


def stored_knn(name: str, inputs: LobesInputs, knn: int) -> sparse.csr_matrix:
    """The kNN graph of an SAE with incomplete pairs: each row's knn strongest affinities among its
    STORED partners only (ties: the lower partner), symmetrised by max, as CSR float32. Unlike
    the complete-pairs kNN graph, a pair below the policy is never a candidate, even where its
    affinity with n11 = 0 would be positive (phi + 1, SMC): nothing is known of it. A row with
    fewer than knn stored partners keeps all of those with a positive affinity; `compute` says
    how many rows fell short."""
    pairs: StoredPairs = inputs.n11
    counts = inputs.block_count[inputs.included]
    size = len(inputs.included)
    values = np.empty(len(pairs.row), dtype=np.float64)
    for start in range(0, len(values), CHUNK_ELEMENTS):
        stop = min(len(values), start + CHUNK_ELEMENTS)
        r, c = pairs.row[start:stop], pairs.col[start:stop]
        values[start:stop] = affinity_values(name, pairs.n11[start:stop], counts[r], counts[c], inputs.n_blocks)
    keep = top_partner_mask(pairs.row, pairs.col, values, knn) & (values > 0)
    graph = sparse.csr_matrix((values[keep].astype(np.float32), (pairs.row[keep], pairs.col[keep])),
                              shape=(size, size), dtype=np.float32)
    return graph.maximum(graph.T).tocsr()


def _mirror_upper(matrix: np.ndarray) -> None:
    """Copy the upper triangle onto the lower, in place and in tiles: BLAS may round (i, j) and
    (j, i) differently, and sklearn would otherwise warn and allocate a symmetrised copy."""
    size = len(matrix)
    step = max(1, CHUNK_ELEMENTS // max(size, 1) // 4)
    for start in range(0, size, step):
        stop = min(size, start + step)
        matrix[stop:, start:stop] = matrix[start:stop, stop:].T
        tile = matrix[start:stop, start:stop]
        lower = np.tril_indices(stop - start, -1)
        tile[lower] = tile.T[lower]


# --------------------------------------------------------------------------- clustering


def eigen_solver(knn: int | None, asked: str | None) -> str:
    """The solver a run uses: the one asked, else arpack dense and lobpcg for kNN graphs."""
    return asked or ("arpack" if knn is None else "lobpcg")


def embed(affinity, n_components: int, params: LobesParams) -> tuple[np.ndarray, list[str]]:
    """sklearn's spectral embedding (normalised Laplacian, first eigenvector kept), computed ONCE
    per affinity with max(n_lobes) components: SpectralClustering(affinity='precomputed',
    assign_labels='kmeans') computes exactly this with n_clusters components and runs k-means on
    it, so taking the first n columns for each n gives its labels while the eigen-decomposition,
    the expensive part, is shared (tests/test_lobes.py checks the labels agree)."""
    from sklearn.manifold import spectral_embedding

    solver = eigen_solver(params.knn, params.eigen_solver)
    if solver != "arpack":
        # lobpcg's default tolerance is sqrt(eps) x F': with float32 that is > 1 at a few thousand
        # features and it stops at once on a random start. In float64 it is 1.5e-8 x F'.
        affinity = affinity.astype(np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedding = spectral_embedding(affinity, n_components=n_components, eigen_solver=solver,
                                       random_state=params.seed, drop_first=False)
    return embedding, sorted({str(w.message) for w in caught})


def cluster(embedding: np.ndarray, n: int, seed: int) -> np.ndarray:
    """k-means on the first n embedding columns; lobes renumbered by size, largest first (ties by
    their smallest member), so lobe 0 is the same lobe whatever labels k-means happened to draw."""
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=n, random_state=seed, n_init=10).fit_predict(embedding[:, :n])
    return canonical_labels(labels)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    found = np.unique(labels)
    sizes = np.array([(labels == lab).sum() for lab in found])
    first = np.array([np.flatnonzero(labels == lab)[0] for lab in found])
    order = np.lexsort((first, -sizes))
    new = np.empty(found.max() + 1, dtype=np.int32)
    new[found[order]] = np.arange(len(found), dtype=np.int32)
    return new[labels]


# --------------------------------------------------------------------------- agreement


def ami_with_null(lobes: np.ndarray, geometry: np.ndarray, permutations: int, seed: int) -> dict[str, float | None]:
    """AMI of two labellings, and its null over permutations of the first. (The expected mutual
    information inside AMI depends only on the two marginals, which a permutation keeps; sklearn
    recomputes it each time: 0.2 s per AMI at 16k points and 256 lobes, 0.7 s at 1024.)"""
    from sklearn.metrics import adjusted_mutual_info_score

    ami = float(adjusted_mutual_info_score(lobes, geometry))
    rng = np.random.default_rng(seed)
    null = np.array([adjusted_mutual_info_score(rng.permutation(lobes), geometry) for _ in range(permutations)])
    return {"ami": ami, **_null_stats("ami", ami, null)}


def _null_stats(prefix: str, value: float | None, null: np.ndarray) -> dict[str, float | None]:
    null = null[np.isfinite(null)]
    mean = float(null.mean()) if len(null) else None
    std = float(null.std(ddof=1)) if len(null) > 1 else None
    z = (value - mean) / std if value is not None and mean is not None and std else None
    return {f"{prefix}_null_mean": mean, f"{prefix}_null_std": std, f"{prefix}_z": z}


def _fit_score(x_train, y_train, x_test, y_test, max_iter: int) -> tuple[float | None, int]:
    """Balanced accuracy of an lbfgs logistic regression; None when the training set holds one
    class. Also the number of convergence warnings."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    if len(np.unique(y_train)) < 2 or len(y_test) == 0:
        return None, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        model = LogisticRegression(max_iter=max_iter).fit(x_train, y_train)
        score = float(balanced_accuracy_score(y_test, model.predict(x_test)))
    return score, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def regression_agreement(vectors: np.ndarray, lobes: np.ndarray,
                         params: LobesParams) -> tuple[dict[str, Any], list[str]]:
    """Decoder vector -> lobe: balanced accuracy on the index split (first 1 - test_fraction of
    the features train, the rest test, unshuffled, as the paper did), on a shuffled stratified
    split, and the index split's null over i.i.d. Gaussian unit vectors of the same shape."""
    from sklearn.model_selection import train_test_split

    notes = []
    size = len(lobes)
    cut = size - int(round(params.test_fraction * size))
    index, warned = _fit_score(vectors[:cut], lobes[:cut], vectors[cut:], lobes[cut:], params.max_iter)
    stratify = lobes if np.bincount(lobes).min() >= 2 else None
    if stratify is None:
        notes.append("a lobe has one feature: the shuffled split is not stratified")
    idx_train, idx_test = train_test_split(np.arange(size), test_size=params.test_fraction,
                                           random_state=params.seed, stratify=stratify)
    shuffled, w = _fit_score(vectors[idx_train], lobes[idx_train], vectors[idx_test], lobes[idx_test],
                             params.max_iter)
    warned += w
    null = []
    for repeat in range(params.null_repeats):
        rng = np.random.default_rng([params.seed, repeat])  # the same null vectors for every affinity and n
        noise = rng.standard_normal(vectors.shape, dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        score, w = _fit_score(noise[:cut], lobes[:cut], noise[cut:], lobes[cut:], params.max_iter)
        warned += w
        null.append(np.nan if score is None else score)
    if index is None:
        notes.append("the index split's training features all fall in one lobe: no accuracy")
    if warned:
        notes.append(f"{warned} logistic regressions stopped at max_iter={params.max_iter} before converging")
    return {"accuracy_index": index, "accuracy_shuffled": shuffled,
            **_null_stats("accuracy", index, np.array(null, dtype=np.float64))}, notes


# --------------------------------------------------------------------------- documents


def block_winners(blocks: sparse.csr_matrix, lobes: np.ndarray, n: int) -> np.ndarray:
    """Each sampled block's lobe, argmax over lobes L of |firing ∩ L| / |L| (ties: the lower
    lobe number, i.e. the larger lobe); -1 for a block where no included feature fired."""
    size = len(lobes)
    onehot = sparse.csr_matrix((np.ones(size, dtype=np.float32), (np.arange(size), lobes)), shape=(size, n))
    sizes = np.bincount(lobes, minlength=n).astype(np.float64)
    inverse = np.divide(1.0, sizes, out=np.zeros(n), where=sizes > 0)
    hits = (blocks @ onehot).tocsr()  # block x lobe: firing features of the lobe, sparse
    winners = np.full(blocks.shape[0], -1, dtype=np.int64)
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, blocks.shape[0], step):
        stop = min(blocks.shape[0], start + step)
        score = hits[start:stop].toarray() * inverse
        best = score.argmax(axis=1)
        winners[start:stop] = np.where(score.max(axis=1) > 0, best, -1)
    return winners


def _group_wins(winners: np.ndarray, groups: list) -> list[tuple[int, str | None, int]]:
    counts: dict[tuple[int, str | None], int] = {}
    for lobe, group in zip(winners.tolist(), groups):
        if lobe >= 0:
            counts[(lobe, group)] = counts.get((lobe, group), 0) + 1
    return sorted(((lobe, group, c) for (lobe, group), c in counts.items()),
                  key=lambda r: (r[0], r[1] is None, r[1] or ""))


# --------------------------------------------------------------------------- compute


def compute(inputs: LobesInputs, params: LobesParams) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """Cluster every affinity, compare each co-occurrence labelling with the geometric one, count
    the blocks each lobe wins. Returns (summary, {lobes, lobe_agreement, lobe_documents})."""
    with _threads(len(inputs.included) > SMALL):
        return _compute(inputs, params)


def _threads(many: bool):
    """BLAS and OpenMP threads: as configured for the big dense work (affinities, factorisation),
    one for the rest. k-means, lbfgs steps and small matrices gain little from threads and lose
    a lot when the cores are shared: measured on 2 busy cores, 4k x 512 logistic regressions ran
    50x slower with 2 OpenBLAS threads than with one, k-means 40x."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(None if many else 1)


def _compute(inputs: LobesInputs, params: LobesParams) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    size = len(inputs.included)
    excluded = inputs.excluded
    if inputs.n_blocks <= 0:
        raise SaecatError("this SAE counted no full blocks: there are no co-occurrences to cluster")
    if params.n_lobes[-1] >= size:
        raise SaecatError(f"n_lobes up to {params.n_lobes[-1]} asked, but only {size} features are neither "
                          f"dead ({len(excluded['dead'])}) nor saturated ({len(excluded['saturated'])})")
    notes: list[str] = []
    if len(excluded["dead"]) or len(excluded["saturated"]):
        notes.append(f"excluded from clustering, AMI, regression and documents: {len(excluded['dead'])} dead "
                     f"features (no full block) and {len(excluded['saturated'])} saturated ones (every block)")
    if inputs.blocks is None:
        notes.append("no sampled blocks in the catalog (ingest with a block sample): no lobe_documents")
    stored = _stored_partners(inputs, params, notes)
    labels: dict[str, dict[int, np.ndarray]] = {}
    graphs: dict[str, Any] = {}
    for name in (GEOMETRY, *params.affinities):
        matrix = affinity_matrix(name, inputs, params.knn)
        if params.knn is not None:
            components = csgraph.connected_components(matrix, directed=False)[0]
            graphs[name] = {"components": int(components), "stored": int(matrix.nnz)}
        embedding, warned = embed(matrix, params.n_lobes[-1], params)
        del matrix
        notes += [f"{name}: {w}" for w in warned]
        with _threads(False):
            labels[name] = {n: cluster(embedding, n, params.seed) for n in params.n_lobes}
    vectors = inputs.decoders[inputs.included]
    agreement = []
    with _threads(False):
        for name in params.affinities:
            for n in params.n_lobes:
                row = {"affinity": name, "n_lobes": n,
                       **ami_with_null(labels[name][n], labels[GEOMETRY][n], params.permutations, params.seed)}
                scores, more = regression_agreement(vectors, labels[name][n], params)
                notes += [f"{name}, {n} lobes: {m}" for m in more]
                agreement.append({**row, **scores})
    documents = []
    without_lobe = {}
    for name in (GEOMETRY, *params.affinities):
        for n in params.n_lobes:
            if inputs.blocks is None:
                continue
            winners = block_winners(inputs.blocks, labels[name][n], n)
            without_lobe[f"{name}/{n}"] = int((winners < 0).sum())
            documents += [{"affinity": name, "n_lobes": n, "lobe": lobe, "group_value": group, "blocks": count}
                          for lobe, group, count in _group_wins(winners, inputs.block_groups)]
    tables = {
        "lobes": _lobe_table(inputs, labels, params),
        "lobe_agreement": _table(agreement, LOBE_AGREEMENT),
        "lobe_documents": _table(sorted(documents, key=lambda r: (r["affinity"], r["n_lobes"], r["lobe"],
                                                                   r["group_value"] is None, r["group_value"] or "")),
                                 LOBE_DOCUMENTS),
    }
    tables["lobe_agreement"] = tables["lobe_agreement"].sort_by([("affinity", "ascending"), ("n_lobes", "ascending")])
    if not documents:
        del tables["lobe_documents"]
    summary = {
        "n_features": int(len(inputs.block_count)), "n_included": int(size), "n_blocks": int(inputs.n_blocks),
        "excluded": {reason: int(len(ids)) for reason, ids in excluded.items()},
        "sampled_blocks": 0 if inputs.blocks is None else int(inputs.blocks.shape[0]),
        "blocks_without_lobe": without_lobe or None,
        "mode": "dense" if params.knn is None else f"knn (k = {params.knn}, symmetrised by max)"
                + ("" if stored is None else ", co-occurrence over the stored pairs only"),
        "pair_policy": inputs.pair_policy,
        "stored_partners": stored,
        "eigen_solver": eigen_solver(params.knn, params.eigen_solver),
        "graphs": graphs or None,
        "transforms": {name: TRANSFORMS[name] for name in (GEOMETRY, *params.affinities)},
        "agreement": agreement,
        "lobes": _lobe_summary(labels, documents, params),
        "notes": notes,
    }
    return summary, tables


def _stored_partners(inputs: LobesInputs, params: LobesParams, notes: list[str]) -> dict[str, int] | None:
    """For an SAE with incomplete pairs: how many stored partners its included features have, and
    notes on what that means for the kNN graph. A K above what the policy stored is a note, not a
    refusal: each row still holds its strongest stored partners, the graph is only sparser than
    asked (fewer neighbours in the rows that fell short), which the summary states."""
    if not isinstance(inputs.n11, StoredPairs):
        return None
    policy, k = inputs.pair_policy, params.knn
    partners = inputs.n11.partners()
    short = int((partners < k).sum())
    notes.append(f"this SAE stores only the pairs its policy keeps ({describe_policy(policy)}): each co-occurrence "
                 f"row holds its {k} strongest affinities among the feature's stored partners; pairs below the "
                 "policy are not candidates")
    top = policy["top_partners"]
    if top is not None and k > top:
        notes.append(f"--knn {k} exceeds the {top} top partners the policy stored per feature: {short} of "
                     f"{len(partners)} clustered features have fewer than {k} stored partners, so their rows hold "
                     "fewer neighbours than asked")
    elif short:
        notes.append(f"{short} of {len(partners)} clustered features have fewer than {k} stored partners")
    if top is not None:
        notes.append(f"the stored partners are each feature's best by {policy['rank_by']}; the rows keep the strongest "
                     "by each affinity among those, not necessarily the strongest by it over every pair")
    return {"min": int(partners.min()) if len(partners) else 0,
            "median": int(np.median(partners)) if len(partners) else 0,
            "max": int(partners.max()) if len(partners) else 0, "fewer_than_k": short}


LOBES = pa.schema([("affinity", pa.string()), ("n_lobes", pa.int32()), ("feature", pa.int32()),
                   ("lobe", pa.int32()), ("excluded", pa.string())])
LOBE_AGREEMENT = pa.schema([("affinity", pa.string()), ("n_lobes", pa.int32())] + [
    (name, pa.float64()) for name in ("ami", "ami_null_mean", "ami_null_std", "ami_z", "accuracy_index",
                                      "accuracy_shuffled", "accuracy_null_mean", "accuracy_null_std", "accuracy_z")])
LOBE_DOCUMENTS = pa.schema([("affinity", pa.string()), ("n_lobes", pa.int32()), ("lobe", pa.int32()),
                            ("group_value", pa.string()), ("blocks", pa.int64())])


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: row[k] for k in schema.names} for row in rows], schema=schema)


def _lobe_table(inputs: LobesInputs, labels: dict[str, dict[int, np.ndarray]], params: LobesParams) -> pa.Table:
    n_features = len(inputs.block_count)
    reason = np.full(n_features, None, dtype=object)
    for why, ids in inputs.excluded.items():
        reason[ids] = why
    mask = np.ones(n_features, dtype=bool)
    mask[inputs.included] = False
    parts = []
    for name in sorted(labels):
        for n in params.n_lobes:
            lobe = np.zeros(n_features, dtype=np.int32)
            lobe[inputs.included] = labels[name][n]
            parts.append(pa.table({
                "affinity": pa.array([name] * n_features, pa.string()),
                "n_lobes": pa.array(np.full(n_features, n, dtype=np.int32)),
                "feature": pa.array(np.arange(n_features, dtype=np.int32)),
                "lobe": pa.array(lobe, mask=mask),
                "excluded": pa.array(reason, pa.string()),
            }, schema=LOBES))
    return pa.concat_tables(parts) if parts else LOBES.empty_table()


def _lobe_summary(labels, documents: list[dict], params: LobesParams) -> list[dict[str, Any]]:
    wins: dict[tuple[str, int, int], list[tuple[str | None, int]]] = {}
    for row in documents:
        wins.setdefault((row["affinity"], row["n_lobes"], row["lobe"]), []).append((row["group_value"], row["blocks"]))
    out = []
    for name in (GEOMETRY, *params.affinities):
        for n in params.n_lobes:
            sizes = np.bincount(labels[name][n], minlength=n)
            lobes = []
            for lobe in range(n):
                groups = sorted(wins.get((name, n, lobe), []), key=lambda g: -g[1])[: params.top_groups]
                lobes.append({"lobe": lobe, "size": int(sizes[lobe]),
                              "blocks_won": int(sum(c for _, c in wins.get((name, n, lobe), []))),
                              "top_groups": [{"group": g, "blocks": c} for g, c in groups]})
            out.append({"affinity": name, "n_lobes": n, "lobes": lobes})
    return out


# --------------------------------------------------------------------------- entry points


def run(db: str | os.PathLike | None = None, release: str | None = None, sae_id: str | None = None, *,
        sae: int | None = None, params: LobesParams = LobesParams(), force: bool = False) -> Analysis:
    """Lobes of one SAE, stored in the catalog; the stored result when the same parameters were
    run over the same ingestion (unless `force`)."""
    return analyses.run(KIND, params, load, compute, db=db, release=release, sae_id=sae_id, sae=sae, force=force)


def plot(analysis: Analysis, path: str | os.PathLike) -> pathlib.Path:
    """AMI and balanced accuracy against the number of lobes (with their nulls, mean ± 2 std),
    and the blocks each lobe wins at the smallest n, by group. PNG or SVG by the path's suffix."""
    import matplotlib

    from queries.figures import figure

    path = pathlib.Path(path)
    params = analysis.params
    agreement = analysis.tables.get("lobe_agreement", LOBE_AGREEMENT.empty_table()).to_pylist()
    documents = analysis.tables.get("lobe_documents", LOBE_DOCUMENTS.empty_table()).to_pylist()
    n_min = min(params["n_lobes"])
    shown = [GEOMETRY, *params["affinities"]]
    fig = figure(4 * max(3, len(shown)), 8, layout="constrained")
    rows = fig.add_gridspec(2, 1)
    top = rows[0].subgridspec(1, 2)
    bar_grid = rows[1].subgridspec(1, len(shown))
    ax_ami = fig.add_subplot(top[0])
    ax_acc = fig.add_subplot(top[1])
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    nan = float("nan")
    val = lambda row, key: nan if row[key] is None else row[key]  # noqa: E731
    for k, name in enumerate(params["affinities"]):
        rows = sorted((r for r in agreement if r["affinity"] == name), key=lambda r: r["n_lobes"])
        if not rows:
            continue
        color = colors[k % len(colors)]
        x = np.array([r["n_lobes"] for r in rows])
        for ax, key, null in ((ax_ami, "ami", "ami_null"), (ax_acc, "accuracy_index", "accuracy_null")):
            y = np.array([val(r, key) for r in rows])
            mean = np.array([val(r, f"{null}_mean") for r in rows])
            std = np.nan_to_num(np.array([val(r, f"{null}_std") for r in rows]))
            ax.plot(x, y, "o-", color=color, label=name)
            ax.fill_between(x, mean - 2 * std, mean + 2 * std, color=color, alpha=0.15)
            ax.plot(x, mean, ":", color=color)
        ax_acc.plot(x, [val(r, "accuracy_shuffled") for r in rows], "s--", color=color, alpha=0.6,
                    label=f"{name} (shuffled split)")
    for ax, title in ((ax_ami, f"AMI with the geometric clusters\n(band: null of {params['permutations']} "
                               "permutations, mean ± 2σ)"),
                      (ax_acc, "balanced accuracy, decoder vector → lobe "
                               f"(index split, test {params['test_fraction']})"
                               f"\n(band: {params['null_repeats']} random unit-vector nulls, mean ± 2σ)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(params["n_lobes"], [str(n) for n in params["n_lobes"]])
        ax.set_xlabel("lobes")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax_ami.set_ylabel("AMI")
    ax_acc.set_ylabel("balanced accuracy")
    groups = sorted({r["group_value"] for r in documents}, key=lambda g: (g is None, g or ""))
    for k, name in enumerate(shown):
        ax = fig.add_subplot(bar_grid[k])
        rows = [r for r in documents if r["affinity"] == name and r["n_lobes"] == n_min]
        bottom = np.zeros(n_min)
        for g, group in enumerate(groups):
            heights = np.zeros(n_min)
            for r in rows:
                if r["group_value"] == group:
                    heights[r["lobe"]] = r["blocks"]
            ax.bar(np.arange(n_min), heights, bottom=bottom, color=colors[g % len(colors)],
                   label="(none)" if group is None else group)
            bottom += heights
        ax.set_xticks(np.arange(n_min))
        ax.set_xlabel(f"lobe ({n_min} lobes)")
        ax.set_title(f"{name}: blocks won", fontsize=10)
        if not documents:
            ax.text(0.5, 0.5, "no sampled blocks", ha="center", va="center", transform=ax.transAxes)
        elif k == 0:
            ax.set_ylabel("sampled blocks")
            ax.legend(fontsize=7)
    summary = analysis.summary
    excluded = summary.get("excluded") or {}
    fig.suptitle(f"Lobes of {analysis.release} / {analysis.sae_id}: {summary.get('n_included')} of "
                 f"{summary.get('n_features')} features clustered ({excluded.get('dead', 0)} dead and "
                 f"{excluded.get('saturated', 0)} saturated excluded), T = {summary.get('n_blocks')} blocks\n"
                 f"{summary.get('mode')} affinities, {eigen_solver(params.get('knn'), params.get('eigen_solver'))} "
                 f"embedding, k-means n_init 10, "
                 f"seed {params['seed']}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    return path
