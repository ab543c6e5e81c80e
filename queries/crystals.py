"""Analogy crystals among one SAE's decoder directions: parallelograms (b - a = d - c) and
trapezoids (b - a parallel to d - c), found through vector indexes, never an F² search.

The search, in the order it runs:

1. Directions: the SAE's decoder rows, unit-normalised (`normalize=False` keeps their norms).
   Named distractor directions are projected out first ("pc:N", "cloud:N", "mean", "feature:I",
   "file:PATH.npy"; see `DISTRACTORS`), then the rows are normalised again, so a distractor that
   was added to every feature with its own weight is gone without a trace.
2. Candidate pairs: each feature a with its `pairs_per_feature` nearest directions b by cosine
   (the catalog's own exact FAISS index when nothing is projected out; otherwise an index over
   the projected directions, HNSW above `exact_limit` features), as unordered, deduplicated
   pairs: N ≤ F x pairs_per_feature of them.
3. Differences δ = x_b - x_a of the candidate pairs go into one FAISS index, as directions
   (inner product over unit δ, for both shapes: see `_differences`), reduced to their top
   `index_dims` principal directions when d is larger; exact up to `exact_limit` vectors, HNSW
   above it. The recall of an approximate index against exact full-dimension search is
   measured on a sample and reported. Differences are made a chunk at a time: the only
   difference vectors that ever exist are the candidate pairs', never all F² of them.
4. Matching: each pair's δ and -δ are looked up in that index (so both orientations, (a,b) with
   (c,d) and with (d,c), are found); hits that share a feature with the query pair are dropped.
   Each hit is a quadrilateral (a, b, c, d) with b - a ≈ d - c, rescored in full dimension:
   error = |(b-a)-(d-c)| / (|b-a|+|d-c|) and cosine = cos(b-a, d-c).
5. Quads found several times (a parallelogram has 8 equivalent labellings, a trapezoid 4) are
   kept once; the best `top` by error (parallelograms) or by cosine (trapezoids) are rescored
   in float64, on the projected directions and on the directions as stored (the `_before`
   columns), and stored with the parameters that produced them.

Cost: the exact kNN step is F² d multiply-adds, done by FAISS in blocks (no F x F array); the
difference index holds N x min(d, index_dims) floats; matching is 2N lookups. At F = 16k,
d = 2304: ~80k candidate pairs, an 80 MB index, against 134M differences (1.2 TB) for a dense
search. bench/crystals.py measures it.

>>> from queries import crystals                                            # doctest: +SKIP
>>> result = crystals.run("saecat.duckdb", "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical",
...                       params=crystals.CrystalParams(distractors=("pc:1",)))
>>> result.tables["crystals"].to_pandas().head()
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import scipy.linalg

from catalog import Catalog
from catalog.errors import SaecatError
from catalog.index import VectorIndex, unit_rows
from catalog.store import SaeRecord
from queries import analyses
from queries.analyses import Analysis

KIND = "crystals"
SHAPES = ("parallelogram", "trapezoid")
# Distractor specs: "pc:N" the N-th principal direction (1 = largest) of the candidate pair
# differences (uncentred second moment: a pair's difference has no preferred sign); "cloud:N" the
# N-th principal component of the centred decoder directions, which is also that of all F² pair
# differences (sum over i, j of (x_i - x_j)(x_i - x_j)^T = 2F times the centred scatter matrix),
# had in O(F d²); "mean" the mean decoder direction; "feature:I" feature I's decoder direction;
# "file:PATH.npy" the rows of a [k, d] (or [d]) array saved with numpy.
DISTRACTORS = ("pc:N", "cloud:N", "mean", "feature:I", "file:PATH.npy")
LABEL_TOKENS = 5  # top logit-lens tokens kept per feature in the summary
PLANES = 8  # best crystals whose 2-D plane coordinates go in the summary (for plot)
HISTOGRAM_SAMPLE = 20_000  # candidate quads scored before and after removal for the histogram
HISTOGRAM_BINS = 40
PC_SAMPLE = 10_000  # candidate pairs sampled to estimate "pc:N" distractors
REDUCER_SAMPLE = 4096  # candidate pairs sampled for the difference index's basis
RECALL_SAMPLE = 200  # pair queries checked against exact search when the difference index is approximate
CHUNK = 4096  # most rows (pairs, quads) handled at once
CHUNK_VALUES = 2**21  # and at most this many vector components per array: 8 MB of float32


@dataclass(frozen=True)
class CrystalParams:
    """What a crystal search looks for, and how hard it looks."""

    shape: str = "parallelogram"  # or "trapezoid"
    pairs_per_feature: int = 8  # candidate pairs (a, b): b among a's nearest decoder directions
    matches_per_pair: int = 10  # nearest other pair differences kept per pair and orientation (10
    # finds 96% of the exhaustive search's best 100 parallelograms on the benchmark, 5 finds 81%)
    top: int = 100  # crystals kept
    distractors: tuple[str, ...] = ()  # projected out first; see DISTRACTORS
    normalize: bool = True  # unit decoder directions (True) or the rows with their norms
    exact_limit: int = 20_000  # an index (kNN or differences) over more vectors is HNSW (approximate)
    index_dims: int = 256  # the difference index holds the differences' top principal directions
    # (0: full dimension); hits are always rescored exactly in full dimension
    hnsw_m: int = 16  # HNSW graph degree (efConstruction 40)
    ef_search: int = 64
    seed: int = 0  # samples for the histogram, the pc estimate and the recall check
    digests: tuple[str, ...] = ()  # set by run(): sha256 of each "file:" distractor, so an edited
    # file is never answered from the cache


@dataclass
class CrystalInputs:
    """What a crystal search reads from the catalog."""

    decoders: np.ndarray  # [F, d] as stored
    index: VectorIndex | None = None  # the catalog's exact index over the unit rows, when usable
    labels: dict[int, list[str]] = field(default_factory=dict)  # top logit-lens tokens by feature
    files: dict[str, np.ndarray] = field(default_factory=dict)  # "file:..." spec -> [k, d] vectors


# ----------------------------------------------------------------------------- public API


def run(db: str | os.PathLike | None = None, release: str | None = None, sae_id: str | None = None, *,
        sae: int | None = None, params: CrystalParams = CrystalParams(), force: bool = False) -> Analysis:
    """Search one SAE for crystals and store them (or return the stored result for the same
    parameters over the same catalog state). `tables["crystals"]` has one row per crystal, best
    first; `summary` has the scores before and after distractor removal, the labels of the
    features involved (`labels`: feature -> top logit-lens tokens) and what the search did."""
    params = _with_digests(check_params(params))
    return analyses.run(KIND, params, load, compute, db=db, release=release, sae_id=sae_id, sae=sae, force=force)


def check_params(params: CrystalParams) -> CrystalParams:
    """Refuse what cannot work, with a message that says why."""
    if params.shape not in SHAPES:
        raise SaecatError(f"unknown crystal shape {params.shape!r}: use one of {', '.join(SHAPES)}")
    for name in ("pairs_per_feature", "matches_per_pair", "top", "hnsw_m", "ef_search"):
        if int(getattr(params, name)) < 1:
            raise SaecatError(f"{name} must be at least 1, not {getattr(params, name)}")
    if params.exact_limit < 0 or params.index_dims < 0:
        raise SaecatError("exact_limit and index_dims must be >= 0")
    for spec in params.distractors:
        _parse_distractor(spec)
    return dataclasses.replace(params, distractors=tuple(params.distractors))


def load(cat: Catalog, record: SaeRecord, params: CrystalParams) -> CrystalInputs:
    """The decoder rows, the catalog's index (when the kNN step can use it), the features' top
    tokens and any distractor files."""
    decoders = cat.decoders(record.sae)
    if len(decoders) < 4:
        raise SaecatError(f"SAE {record.sae} has {len(decoders)} features: a crystal needs 4")
    # the catalog's exact index serves a kNN step over the directions as stored: the candidate
    # pairs when nothing is projected out, the "pc:N" estimate otherwise
    use_index = len(decoders) <= params.exact_limit and (
        not params.distractors or any(spec.startswith("pc:") for spec in params.distractors))
    rows = cat.con.execute(
        f"SELECT feature, top_tokens[1:{LABEL_TOKENS}] FROM labelled_features "
        "WHERE sae = ? AND top_tokens IS NOT NULL", [record.sae]).fetchall()
    files = {spec: _read_file(spec, decoders.shape[1]) for spec in params.distractors if spec.startswith("file:")}
    return CrystalInputs(decoders=decoders, index=cat.index(record.sae) if use_index else None,
                         labels={int(f): list(t) for f, t in rows}, files=files)


def compute(inputs: CrystalInputs, params: CrystalParams) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """The search itself, on arrays only (no catalog): (summary, {"crystals": rows})."""
    search = CrystalSearch(params)
    table = search.fit(inputs.decoders, index=inputs.index, files=inputs.files)
    summary = search.summary_
    used = sorted({int(v) for col in "abcd" for v in table.column(col).to_pylist()})
    summary["labels"] = {str(f): inputs.labels[f] for f in used if f in inputs.labels}
    return summary, {"crystals": table}


def with_labels(analysis: Analysis) -> list[dict[str, Any]]:
    """The crystals as row dicts, each with the four features' top tokens (`a_tokens` ...)."""
    labels = analysis.summary.get("labels", {})
    rows = analysis.tables["crystals"].to_pylist() if "crystals" in analysis.tables else []
    for row in rows:
        for col in "abcd":
            row[f"{col}_tokens"] = labels.get(str(row[col]), [])
    return rows


# ----------------------------------------------------------------------------- the search


class CrystalSearch:
    """The search on a decoder matrix, scikit-learn style: parameters in, `fit`, results in
    attributes ending in `_` (pairs_, basis_, summary_, table_). `index`, when given, must be an
    exact index over the unit decoder rows (the catalog's)."""

    def __init__(self, params: CrystalParams = CrystalParams()):
        self.params = check_params(params)

    def fit(self, decoders: np.ndarray, *, index: VectorIndex | None = None,
            files: dict[str, np.ndarray] | None = None) -> pa.Table:
        p = self.params
        decoders = np.ascontiguousarray(decoders, dtype=np.float32)
        n, d = decoders.shape
        if n < 4:
            raise SaecatError(f"{n} features: a crystal needs 4")
        stored = self._directions(decoders)
        self.index_ = {}
        if p.distractors:
            basis, info = self._distractor_basis(decoders, stored, files or {}, index)
            x = self._directions(decoders, basis)
        else:
            basis, info, x = np.zeros((d, 0), np.float32), [], stored
        self.basis_ = basis
        self.pairs_ = self._candidate_pairs(x if p.normalize else unit_rows(x), index if not p.distractors else None)
        found = self._match(x, self.pairs_)
        quads, _ = self._dedupe(*found)
        self.n_candidates_ = len(quads)
        # rescore a margin beyond `top` exactly, then keep `top`
        margin = quads[: max(2 * p.top, p.top + 1000)]
        error, cosine = quad_scores(x, margin)
        order = _rank(error, cosine, margin, p.shape)[: p.top]
        kept, error, cosine = margin[order], error[order], cosine[order]
        error_before, cosine_before = quad_scores(stored, kept)
        self.table_ = pa.table({
            "rank": pa.array(np.arange(len(kept), dtype=np.int32)),
            "shape": pa.array([p.shape] * len(kept), pa.string()),
            **{col: pa.array(kept[:, i].astype(np.int32)) for i, col in enumerate("abcd")},
            "error": pa.array(error.astype(np.float32)),
            "cosine": pa.array(cosine.astype(np.float32)),
            "error_before": pa.array(error_before.astype(np.float32)),
            "cosine_before": pa.array(cosine_before.astype(np.float32)),
        })
        self.summary_ = {
            "shape": p.shape, "n_features": n, "d_in": d, "n_pairs": len(self.pairs_),
            "n_candidates": int(self.n_candidates_), "kept": len(kept), "index": self.index_,
            "distractors": info, "projected_dims": int(basis.shape[1]),
            "error": _stats(error), "error_before": _stats(error_before),
            "cosine": _stats(cosine), "cosine_before": _stats(cosine_before),
            "improvement": {"error": _stats(error_before - error), "cosine": _stats(cosine - cosine_before)},
            "histogram": self._histogram(x, stored, quads),
            "planes": [{"rank": r, "features": [int(f) for f in q], "points": plane(x[q]).round(5).tolist()}
                       for r, q in enumerate(kept[:PLANES])],
        }
        return self.table_

    # -- step 1: directions and distractors

    def _directions(self, decoders: np.ndarray, basis: np.ndarray | None = None) -> np.ndarray:
        x = unit_rows(decoders) if self.params.normalize else np.array(decoders, dtype=np.float32)
        if basis is not None and basis.shape[1]:
            x = x - (x @ basis) @ basis.T
            if self.params.normalize:
                x = unit_rows(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _distractor_basis(self, decoders: np.ndarray, stored: np.ndarray, files: dict[str, np.ndarray],
                          index: VectorIndex | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """An orthonormal basis [d, k] of the distractor directions, and what each one was."""
        p = self.params
        d = stored.shape[1]
        vectors, info, pcs = [], [], []
        for spec in p.distractors:
            kind, arg = _parse_distractor(spec)
            if kind == "pc":
                pcs.append((spec, arg))
                continue
            if kind == "cloud":
                mean = stored.mean(axis=0, dtype=np.float64)
                _check_component(spec, arg, d)
                blocks = (stored[c] - mean for c in _chunks(len(stored), d))
                values, vecs, total = _principal(blocks, d, arg)
                vectors.append(vecs[:, arg - 1][None, :])
                info.append({"spec": spec, "vectors": 1, "explained": float(values[arg - 1] / total)})
                continue
            if kind == "mean":
                v = stored.mean(axis=0, keepdims=True)
            elif kind == "feature":
                if not 0 <= arg < len(decoders):
                    raise SaecatError(f"distractor {spec}: the SAE has {len(decoders)} features")
                v = decoders[arg][None, :]
            else:
                if spec not in files:
                    raise SaecatError(f"distractor {spec}: file not loaded")
                v = np.atleast_2d(files[spec])
            if v.shape[1] != decoders.shape[1]:
                raise SaecatError(f"distractor {spec} has dimension {v.shape[1]}, the SAE {decoders.shape[1]}")
            vectors.append(v.astype(np.float64))
            info.append({"spec": spec, "vectors": len(v)})
        if pcs:
            for spec, k in pcs:
                _check_component(spec, k, d)
            pairs = self._candidate_pairs(unit_rows(stored), index, record=False)
            rng = np.random.default_rng(p.seed)
            if len(pairs) > PC_SAMPLE:
                pairs = pairs[np.sort(rng.choice(len(pairs), PC_SAMPLE, replace=False))]
            blocks = (stored[pairs[c, 1]] - stored[pairs[c, 0]] for c in _chunks(len(pairs), d))
            values, vecs, total = _principal(blocks, d, max(k for _, k in pcs))
            for spec, k in pcs:
                vectors.append(vecs[:, k - 1][None, :])
                info.append({"spec": spec, "vectors": 1, "explained": float(values[k - 1] / total),
                             "pairs": len(pairs)})
        stacked = np.concatenate(vectors).T  # [d, k]
        q, r = np.linalg.qr(stacked)
        keep = np.abs(np.diag(r)) > 1e-8 * max(1.0, np.abs(r).max())
        return np.ascontiguousarray(q[:, keep], dtype=np.float32), info

    # -- step 2: candidate pairs

    def _candidate_pairs(self, unit: np.ndarray, index: VectorIndex | None, record: bool = True) -> np.ndarray:
        """Each feature with its nearest directions by cosine: unique (i < j) pairs [N, 2]."""
        p = self.params
        n = len(unit)
        k = min(p.pairs_per_feature + 1, n)
        if index is not None and index.faiss.ntotal == n:
            _, neighbours, _ = index.search(unit, k)
            kind = "catalog exact"
        else:
            search = self._index(unit.shape[1], n, faiss.METRIC_INNER_PRODUCT)
            search.add(unit)
            _, neighbours = search.search(unit, k)
            kind = "hnsw" if n > p.exact_limit else "exact"
        if record:
            self.index_["knn"] = kind
        rows = np.repeat(np.arange(n), k)
        cols = neighbours.ravel()
        ok = (cols >= 0) & (cols != rows)
        pairs = np.sort(np.stack([rows[ok], cols[ok]], axis=1), axis=1)
        return np.unique(pairs, axis=0).astype(np.int64)

    def _index(self, d: int, n: int, metric: int) -> faiss.Index:
        p = self.params
        if n <= p.exact_limit:
            return faiss.IndexFlat(d, metric)
        index = faiss.IndexHNSWFlat(d, p.hnsw_m, metric)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = p.ef_search
        return index

    # -- steps 3 and 4: the difference index and the matching

    def _differences(self, x: np.ndarray, pairs: np.ndarray, chunk: slice) -> np.ndarray:
        """Unit δ = (x_j - x_i) / |x_j - x_i| for a chunk of pairs: the index compares directions.
        (For parallelograms too: which pairs' differences point the same way is what needs an
        index; that their lengths agree is checked when hits are rescored. On the benchmark this
        finds more of the exhaustive search's best parallelograms than L2 over raw δ does.)"""
        return unit_rows(x[pairs[chunk, 1]] - x[pairs[chunk, 0]])

    def _keys(self, x: np.ndarray, pairs: np.ndarray, chunk: slice, reduce: np.ndarray | None) -> np.ndarray:
        """What the difference index holds for a chunk of pairs: δ, or δ in the reduced basis."""
        delta = self._differences(x, pairs, chunk)
        if reduce is None:
            return delta
        keys = delta @ reduce
        return unit_rows(keys)

    def _reducer(self, x: np.ndarray, pairs: np.ndarray) -> np.ndarray | None:
        """The top `index_dims` principal directions [d, r] (uncentred) of the differences, from a
        sample of pairs; None when the index keeps the full dimension."""
        p = self.params
        if not p.index_dims or p.index_dims >= x.shape[1]:
            return None
        rng = np.random.default_rng(p.seed)
        sample = pairs
        if len(pairs) > REDUCER_SAMPLE:
            sample = pairs[np.sort(rng.choice(len(pairs), REDUCER_SAMPLE, replace=False))]
        d = x.shape[1]
        blocks = (self._differences(x, sample, c) for c in _chunks(len(sample), d))
        values, vecs, total = _principal(blocks, d, p.index_dims, exact=False, seed=p.seed)
        self.index_["index_dims"] = int(p.index_dims)
        self.index_["index_variance"] = float(values.sum() / max(total, 1e-300))
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _match(self, x: np.ndarray, pairs: np.ndarray):
        """(live pairs, their |δ|, query pair, hit pair, orientation, exact cosine) for every hit."""
        p = self.params
        norms = np.linalg.norm(x[pairs[:, 1]] - x[pairs[:, 0]], axis=1)
        live = np.nonzero(norms > 1e-6 * max(1.0, float(norms.max(initial=0))))[0]
        pairs, norms = pairs[live], norms[live].astype(np.float64)
        if len(pairs) < 2:
            raise SaecatError("fewer than two candidate pairs with distinct directions: no crystal to find")
        reduce = self._reducer(x, pairs)
        metric = faiss.METRIC_INNER_PRODUCT
        index = self._index(x.shape[1] if reduce is None else reduce.shape[1], len(pairs), metric)
        for chunk in _chunks(len(pairs), x.shape[1]):
            index.add(self._keys(x, pairs, chunk, reduce))
        self.index_["differences"] = "hnsw" if len(pairs) > p.exact_limit else "exact"
        self.index_["difference_vectors"] = int(index.ntotal)
        k = min(len(pairs), p.matches_per_pair + 2 * p.pairs_per_feature + 1)
        found = []
        for chunk in _chunks(len(pairs), x.shape[1]):
            keys = self._keys(x, pairs, chunk, reduce)
            rows = np.arange(len(pairs))[chunk]
            for sign in (1, -1):
                _, hits = index.search(np.ascontiguousarray(sign * keys), k)
                found.append(self._valid(pairs, rows, hits, sign))
        if reduce is not None or len(pairs) > p.exact_limit:
            self.index_["recall"] = self._recall(index, x, pairs, k, reduce)
        query, hit, sign = (np.concatenate(parts) for parts in zip(*found))
        cosine = np.empty(len(query))
        for chunk in _chunks(len(query), x.shape[1]):  # exact, in the full dimension
            q, h = pairs[query[chunk]], pairs[hit[chunk]]
            dot = ((x[q[:, 1]] - x[q[:, 0]]) * (x[h[:, 1]] - x[h[:, 0]])).sum(axis=1, dtype=np.float64)
            cosine[chunk] = sign[chunk] * dot / (norms[query[chunk]] * norms[hit[chunk]])
        return pairs, norms, query, hit, sign, cosine

    def _valid(self, pairs, rows, hits, sign):
        """Drop padding, self and hits that share a feature; keep `matches_per_pair` per query."""
        q = pairs[rows]
        safe = np.where(hits < 0, 0, hits)
        h0, h1 = pairs[safe, 0], pairs[safe, 1]
        ok = hits >= 0
        for col in (0, 1):
            ok &= (h0 != q[:, col, None]) & (h1 != q[:, col, None])
        ok &= np.cumsum(ok, axis=1) <= self.params.matches_per_pair
        r, c = np.nonzero(ok)
        return rows[r], hits[r, c], np.full(len(r), sign, np.int8)

    def _recall(self, index: faiss.Index, x: np.ndarray, pairs: np.ndarray, k: int,
                reduce: np.ndarray | None) -> float:
        """recall@k of the difference index (HNSW, reduced dimension, or both) against exact
        search over the full-dimension differences, on a sample of queries."""
        rng = np.random.default_rng(self.params.seed)
        sample = np.sort(rng.choice(len(pairs), min(RECALL_SAMPLE, len(pairs)), replace=False))
        _, got = index.search(self._keys(x, pairs[sample], slice(None), reduce), k)
        queries = self._differences(x, pairs[sample], slice(None))
        best = np.full((len(sample), 0), 0.0), np.full((len(sample), 0), 0, np.int64)
        for chunk in _chunks(len(pairs), x.shape[1]):
            score = queries @ self._differences(x, pairs, chunk).T
            ids = np.broadcast_to(np.arange(len(pairs))[chunk], score.shape)
            merged_s, merged_i = np.concatenate([best[0], score], 1), np.concatenate([best[1], ids], 1)
            top = np.argsort(-merged_s, axis=1, kind="stable")[:, :k]
            best = np.take_along_axis(merged_s, top, 1), np.take_along_axis(merged_i, top, 1)
        hits = sum(len(set(w) & set(g)) for w, g in zip(best[1].tolist(), got.tolist()))
        return hits / best[1].size

    # -- step 5: one row per quad

    def _dedupe(self, pairs, norms, query, hit, sign, cosine):
        """Quads (a, b, c, d) with b - a ≈ d - c, each once, best first (scores from float32 rows)."""
        a, b = pairs[query, 0], pairs[query, 1]
        c = np.where(sign > 0, pairs[hit, 0], pairs[hit, 1])
        d = np.where(sign > 0, pairs[hit, 1], pairs[hit, 0])
        quads = np.stack([a, b, c, d], axis=1)
        nq, nh = norms[query], norms[hit]
        error = np.sqrt(np.maximum(nq**2 + nh**2 - 2 * nq * nh * cosine, 0)) / (nq + nh)
        order = _rank(error, cosine, quads, self.params.shape)
        quads, error, cosine = quads[order], error[order], cosine[order]
        _, first = np.unique(canonical(quads, self.params.shape), axis=0, return_index=True)
        first = np.sort(first)  # keeps the best-first order
        return quads[first], (error[first], cosine[first])

    def _histogram(self, x: np.ndarray, stored: np.ndarray, quads: np.ndarray) -> dict[str, Any]:
        """Scores of (a sample of) all candidate quads, after and before distractor removal."""
        rng = np.random.default_rng(self.params.seed)
        if len(quads) > HISTOGRAM_SAMPLE:
            quads = quads[np.sort(rng.choice(len(quads), HISTOGRAM_SAMPLE, replace=False))]
        metric = "cosine" if self.params.shape == "trapezoid" else "error"
        pick = 1 if metric == "cosine" else 0  # quad_scores gives (error, cosine)
        after, before = quad_scores(x, quads)[pick], quad_scores(stored, quads)[pick]
        lo, hi = (-1.0, 1.0) if metric == "cosine" else (0.0, 1.0)
        edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
        return {"metric": metric, "sample": len(quads), "edges": edges.round(6).tolist(),
                "after": np.histogram(np.clip(after, lo, hi), edges)[0].tolist(),
                "before": np.histogram(np.clip(before, lo, hi), edges)[0].tolist()}


# ----------------------------------------------------------------------------- helpers


def quad_scores(x: np.ndarray, quads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(error, cosine) of quads [n, 4] = (a, b, c, d) over the rows of x, in float64, by chunks:
    error = |(b-a)-(d-c)| / (|b-a|+|d-c|), cosine = cos(b-a, d-c)."""
    error, cosine = np.zeros(len(quads)), np.zeros(len(quads))
    for chunk in _chunks(len(quads), x.shape[1]):
        q = quads[chunk]
        u = x[q[:, 1]].astype(np.float64) - x[q[:, 0]]
        v = x[q[:, 3]].astype(np.float64) - x[q[:, 2]]
        nu, nv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
        error[chunk] = np.linalg.norm(u - v, axis=1) / np.maximum(nu + nv, 1e-300)
        cosine[chunk] = (u * v).sum(1) / np.maximum(nu * nv, 1e-300)
    return error, cosine


def canonical(quads: np.ndarray, shape: str) -> np.ndarray:
    """One labelling per quad. A trapezoid (a,b,c,d), b-a ∥ d-c, is also (c,d,a,b), (b,a,d,c) and
    (d,c,b,a); a parallelogram also (a,c,b,d) and its three turns, since b-a = d-c means
    c-a = d-b. The canonical one is the lexicographically smallest."""
    a, b, c, d = quads.T
    labellings = [(c, d, a, b), (b, a, d, c), (d, c, b, a)]
    if shape == "parallelogram":
        labellings += [(a, c, b, d), (b, d, a, c), (c, a, d, b), (d, b, c, a)]
    best = np.array(quads, dtype=np.int64)
    for rep in labellings:  # one labelling at a time: memory stays O(n)
        cand = np.stack(rep, axis=1)
        diff = cand != best
        rows = np.arange(len(cand))
        first = np.argmax(diff, axis=1)
        smaller = diff.any(axis=1) & (cand[rows, first] < best[rows, first])
        best[smaller] = cand[smaller]
    return best


def plane(points: np.ndarray) -> np.ndarray:
    """The 4 points of a crystal on their own best 2-D plane (PCA of the 4 points), [4, 2]."""
    centred = points.astype(np.float64) - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def _rank(error: np.ndarray, cosine: np.ndarray, quads: np.ndarray, shape: str) -> np.ndarray:
    """Best first: lowest error (parallelograms) or highest cosine (trapezoids), ties by quad."""
    primary = error if shape == "parallelogram" else -cosine
    return np.lexsort((*quads.T[::-1], primary))


def _principal(blocks, d: int, k: int, exact: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """The top k eigenvalues (descending) and eigenvectors [d, k] of the (uncentred) scatter
    matrix of the rows of the given blocks, summed block by block, and its trace. Exact: LAPACK's
    subset solver (bisection and inverse iteration, fast for few vectors); else a randomized
    range finder, enough for the difference index's basis and several times faster for many."""
    scatter = np.zeros((d, d))
    for block in blocks:  # float32 products, float64 sums
        block = np.ascontiguousarray(block, dtype=np.float32)
        scatter += block.T @ block
    if exact:
        values, vecs = scipy.linalg.eigh(scatter, subset_by_index=[d - k, d - 1], driver="evx")
        values, vecs = values[::-1], vecs[:, ::-1]
    else:
        from sklearn.utils.extmath import randomized_svd

        vecs, values, _ = randomized_svd(scatter, k, n_iter=4, random_state=seed)
    return np.maximum(values, 0), vecs, float(np.trace(scatter))


def _check_component(spec: str, k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise SaecatError(f"distractor {spec}: components are numbered 1..{n}")


def _stats(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"mean": None, "median": None}
    return {"mean": float(np.mean(values)), "median": float(np.median(values))}


def chunk_rows(dim: int) -> int:
    """Rows per chunk for vectors of this dimension."""
    return max(64, min(CHUNK, CHUNK_VALUES // max(dim, 1)))


def _chunks(n: int, dim: int):
    size = chunk_rows(dim)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _parse_distractor(spec: str) -> tuple[str, Any]:
    kind, _, arg = str(spec).partition(":")
    if kind == "mean" and not arg:
        return "mean", None
    if kind in ("pc", "cloud", "feature"):
        try:
            return kind, int(arg)
        except ValueError:
            pass
    if kind == "file" and arg:
        return "file", arg
    raise SaecatError(f"unknown distractor {spec!r}: use one of {', '.join(DISTRACTORS)}")


def _read_file(spec: str, d: int) -> np.ndarray:
    path = pathlib.Path(spec.split(":", 1)[1]).expanduser()
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SaecatError(f"distractor {spec}: cannot read {path} as a .npy array ({err})") from err
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    if vectors.ndim != 2 or vectors.shape[1] != d or not np.isfinite(vectors).all():
        raise SaecatError(f"distractor {spec}: need finite vectors of dimension {d}, got shape {vectors.shape}")
    return vectors


def _with_digests(params: CrystalParams) -> CrystalParams:
    digests = []
    for spec in params.distractors:
        if spec.startswith("file:"):
            path = pathlib.Path(spec.split(":", 1)[1]).expanduser()
            try:
                digests.append(hashlib.sha256(path.read_bytes()).hexdigest()[:16])
            except OSError as err:
                raise SaecatError(f"distractor {spec}: cannot read {path}: {err.strerror}") from err
    return dataclasses.replace(params, digests=tuple(digests))


# ----------------------------------------------------------------------------- plot


def plot(analysis: Analysis, path: str | os.PathLike) -> pathlib.Path:
    """The best crystals on their own planes, labelled with the features' top tokens, and the
    score histogram of the candidate quads before and after distractor removal."""
    from queries.figures import figure, legible

    summary = analysis.summary
    planes = summary.get("planes", [])
    labels = summary.get("labels", {})
    rows = analysis.tables["crystals"].to_pylist() if "crystals" in analysis.tables else []
    cols = 4
    grid = 1 + (len(planes) + cols - 1) // cols
    fig = figure(4 * cols, 3.6 * grid)
    for i, item in enumerate(planes):
        ax = fig.add_subplot(grid, cols, i + 1)
        pts = np.asarray(item["points"])
        for (s, e), color in (((0, 1), "C0"), ((2, 3), "C0"), ((0, 2), "0.7"), ((1, 3), "0.7")):
            ax.annotate("", pts[e], pts[s], arrowprops={"arrowstyle": "->", "color": color, "lw": 1.5})
        for j, (feature, (px, py)) in enumerate(zip(item["features"], pts)):
            tokens = labels.get(str(feature), [])[:2]
            text = f"{'abcd'[j]}={feature}" + (f"\n{' '.join(legible(repr(t)) for t in tokens)}" if tokens else "")
            ax.scatter([px], [py], color="C1", s=18)
            ax.annotate(text, (px, py), fontsize=7, textcoords="offset points", xytext=(3, 3))
        row = rows[item["rank"]] if item["rank"] < len(rows) else {}
        ax.set_title(f"#{item['rank']}  err {row.get('error', np.nan):.3f}  cos {row.get('cosine', np.nan):.3f}",
                     fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
    hist = summary.get("histogram")
    if hist:
        ax = fig.add_subplot(grid, 1, grid)
        edges = np.asarray(hist["edges"])
        for key, color in (("before", "0.6"), ("after", "C0")):
            ax.stairs(hist[key], edges, label=f"{key} distractor removal", color=color, fill=key == "before",
                      alpha=0.6 if key == "before" else 1.0)
        ax.set_xlabel(f"{hist['metric']} of candidate quads (sample of {hist['sample']})")
        ax.set_ylabel("quads")
        ax.legend()
    fig.suptitle(f"{summary.get('shape', '')} crystals, SAE {analysis.release}/{analysis.sae_id}, "
                 f"distractors: {', '.join(analysis.params.get('distractors') or ['none'])}")
    fig.tight_layout()
    out = pathlib.Path(path)
    fig.savefig(out)
    return out
