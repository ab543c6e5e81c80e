"""Nearest neighbours over decoder directions: by feature, by vector, in batch, across SAEs.

Every search is a batch: all queries go to each target SAE's FAISS index in one search, and the
per-SAE results (ids encode sae << 32 | feature) are merged into one top-k by cosine with numpy.
Result rows carry the feature's density and labels, fetched for all rows in one SQL query.

>>> from catalog import Catalog                                 # doctest: +SKIP
>>> with Catalog.open("saecat.duckdb") as cat:
...     table = neighbors(cat, 1, [1234, 99], k=10, scope="model")
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Collection, Literal, Sequence, Union

import numpy as np
import pyarrow as pa

from catalog.errors import NotFound, SaecatError
from catalog.index import (RECALL_SAMPLE, RECALL_SEED, VectorIndex, approximate_index, approximate_kind, cached_index,
                           is_written, recall_at_k, recall_name, recall_rows, store_recall, stored_recall)

if TYPE_CHECKING:
    from catalog.store import Catalog, SaeRecord

Scope = Literal["sae", "model", "others"]
Approximate = Union[bool, Literal["auto"]]
# 'auto' searches exactly while the targets' decoder rows come to at most this many bytes (about
# 70 ms of scan per query on 2 cores); past it, each target with its approximate index written.
EXACT_SCAN_BYTES = int(float(os.environ.get("SAECAT_EXACT_SCAN_MB", "512")) * 2**20)
COLUMNS = ["query", "rank", "sae", "release", "sae_id", "feature", "cosine", "density", "top_tokens",
           "top_example"]


def scope_saes(cat: "Catalog", record: "SaeRecord", scope: Scope) -> list[int]:
    """The SAEs a query from `record` searches: itself ('sae'), every ready SAE of the same model
    and d_in ('model'), or those but itself ('others')."""
    if scope == "sae":
        return [record.sae]
    if scope not in ("model", "others"):
        raise SaecatError(f"unknown scope {scope!r}: use 'sae', 'model' or 'others'")
    rows = cat.con.execute(
        "SELECT sae FROM saes WHERE status = 'ready' AND d_in = ? AND model IS NOT DISTINCT FROM ? ORDER BY sae",
        [record.d_in, record.model],
    ).fetchall()
    return [r[0] for r in rows if scope == "model" or r[0] != record.sae]


def approximate_saes(cat: "Catalog", records: Sequence["SaeRecord"], approximate: Approximate) -> list[int]:
    """Those of the SAEs that a search reads through their approximate index: all (True), none
    (False), or, with 'auto', once an exact search would scan more than EXACT_SCAN_BYTES of
    decoder rows, those whose approximate index is written (ingestion writes IVF from
    IVF_FROM features): an 'auto' search never waits for an index build."""
    if approximate != "auto":
        return [r.sae for r in records] if approximate else []
    if sum((r.d_sae or 0) * (r.d_in or 0) * 4 for r in records) <= EXACT_SCAN_BYTES:
        return []
    return [r.sae for r in records if is_written(cat, r, approximate_kind(r))]


def _index(cat: "Catalog", record: "SaeRecord", approximate: bool) -> VectorIndex:
    """The exact index, or the approximate one of the SAE's width (HNSW, or IVF when wide)."""
    return approximate_index(cat, record) if approximate else cached_index(cat, record, "exact")


def search_raw(cat: "Catalog", saes: Sequence[int], queries: np.ndarray, k: int, *, approximate: Approximate = False,
               exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k over the union of several SAEs: (sae keys, features, cosines), each [n_queries, <= k],
    best first. One FAISS search per SAE for all queries, through the indexes `approximate_saes`
    picks; `exclude` = (sae, feature) per query drops that one hit (a by-feature query's self-match)."""
    records = cat.saes_by_key(saes)
    return _search(cat, records, queries, k, approximate_saes(cat, records, approximate), exclude)


def _search(cat: "Catalog", records: Sequence["SaeRecord"], queries: np.ndarray, k: int, approximate: Collection[int],
            exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """search_raw, with the SAEs searched approximately named."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    extra = 1 if exclude is not None else 0
    parts = [_index(cat, r, r.sae in approximate).search(queries, k + extra) for r in records]
    if not parts:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.int64), empty.astype(np.int64), empty.astype(np.float32)
    sae = np.concatenate([p[0] for p in parts], axis=1)
    feature = np.concatenate([p[1] for p in parts], axis=1)
    cosine = np.concatenate([p[2] for p in parts], axis=1).astype(np.float32)
    drop = feature < 0  # FAISS pads with -1 when an index holds fewer than k
    if exclude is not None:
        drop |= (sae == exclude[0][:, None]) & (feature == exclude[1][:, None])
    score = np.where(drop, -np.inf, cosine)
    # Stable sort on -cosine: ties keep index order (SAE key order, then FAISS's own order).
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    kept = np.isfinite(take(score)).sum(axis=1).min() if len(order) else 0
    return take(sae)[:, :kept], take(feature)[:, :kept], take(cosine)[:, :kept]


def _labelled(cat: "Catalog", sae: np.ndarray, feature: np.ndarray, cosine: np.ndarray,
              query_ids: Sequence[int] | None = None) -> pa.Table:
    """Result rows with release, sae_id, density and labels, all fetched in one SQL query."""
    n, k = feature.shape
    queries = np.asarray(query_ids if query_ids is not None else np.arange(n), dtype=np.int64)
    hits = {"query": np.repeat(queries, k).tolist(), "rank": np.tile(np.arange(k), n).tolist(),
            "sae": sae.ravel().astype(np.int64).tolist(), "feature": feature.ravel().astype(np.int64).tolist(),
            "cosine": cosine.ravel().astype(np.float32).tolist(), "row": list(range(n * k))}
    # The hits' SAE keys as constants: rows are stored SAE by SAE, so the label tables' zone maps
    # skip every other SAE's rows. The hits go in as list parameters, not a registered Arrow table:
    # registering races with other threads' connections to the same file (the server's requests).
    keys = ", ".join(str(int(key)) for key in np.unique(sae)) or "NULL"
    return cat.con.sql(
        "WITH hits AS (SELECT unnest($query::BIGINT[]) AS query, unnest($rank::INTEGER[]) AS rank, "
        "  unnest($sae::BIGINT[]) AS sae, unnest($feature::BIGINT[]) AS feature, unnest($cosine::FLOAT[]) AS cosine, "
        "  unnest($row::BIGINT[]) AS _row), "
        "wanted AS (SELECT DISTINCT sae, feature FROM hits), "
        "tokens AS (SELECT t.sae, t.feature, list(t.token ORDER BY t.rank) AS top_tokens "
        "  FROM feature_tokens t SEMI JOIN wanted w ON t.sae = w.sae AND t.feature = w.feature "
        f"  WHERE t.sae IN ({keys}) AND t.direction = 'top' AND t.rank < 3 GROUP BY t.sae, t.feature) "
        "SELECT h.query, h.rank, h.sae, s.release, s.sae_id, h.feature::INTEGER AS feature, h.cosine, "
        "  f.fire_count / nullif(s.n_tokens, 0) AS density, coalesce(t.top_tokens, []) AS top_tokens, "
        "  e.token AS top_example "
        "FROM hits h JOIN saes s ON s.sae = h.sae "
        f"JOIN (SELECT sae, feature, fire_count FROM features WHERE sae IN ({keys})) f "
        "  ON f.sae = h.sae AND f.feature = h.feature "
        "LEFT JOIN tokens t ON t.sae = h.sae AND t.feature = h.feature "
        f"LEFT JOIN (SELECT * FROM feature_examples WHERE sae IN ({keys}) AND rank = 0) e "
        "  ON e.sae = h.sae AND e.feature = h.feature "
        "ORDER BY h._row", params=hits).to_arrow_table()


def _check_features(record: "SaeRecord", features: Sequence[int]) -> np.ndarray:
    ids = np.asarray(features, dtype=np.int64).ravel()
    if ids.size == 0:
        raise SaecatError("no features given")
    bad = ids[(ids < 0) | (ids >= (record.d_sae or 0))]
    if bad.size:
        raise NotFound(f"feature {int(bad[0])} out of range: SAE {record.sae} has {record.d_sae} features")
    return ids


def neighbors(cat: "Catalog", sae: int, features: Sequence[int], k: int = 10, scope: Scope = "sae", *,
              approximate: Approximate = False) -> pa.Table:
    """The k features nearest each of `features` (of SAE `sae`) by decoder cosine, self excluded:
    within the SAE (scope='sae'), across every ready SAE of the same model and d_in ('model'), or
    those but itself ('others'). One row per hit, columns COLUMNS; `query` is the query feature.
    Where approximate indexes were searched (`approximate_saes`), the schema's metadata holds
    their recall@k ('recall') and how many of the SAEs searched used them ('approximate_saes')."""
    record = cat.sae_by_key(sae)
    ids = _check_features(record, features)
    targets = scope_saes(cat, record, scope)
    if not targets:  # 'others' of an SAE alone in its model
        return _no_hits(cat)
    records = cat.saes_by_key(targets)
    approx = approximate_saes(cat, records, approximate)
    vectors = _index(cat, record, sae in approx).vector(ids)  # an index searched next: no second one read
    found = _search(cat, records, vectors, k, approx, exclude=(np.full(len(ids), sae, dtype=np.int64), ids))
    return _with_recall(cat, _labelled(cat, *found, query_ids=ids), approx, k)


def search_vectors(cat: "Catalog", vectors: np.ndarray, k: int = 10, saes: Sequence[int] | None = None, *,
                   approximate: Approximate = False) -> pa.Table:
    """The k features nearest each row of `vectors` [n, d] by cosine, over `saes` (default: every
    ready SAE with d_in = d). `query` is the row number."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if saes is None:
        saes = [r[0] for r in cat.con.execute(
            "SELECT sae FROM saes WHERE status = 'ready' AND d_in = ? ORDER BY sae", [vectors.shape[1]]).fetchall()]
        if not saes:
            raise NotFound(f"no ready SAE with d_in = {vectors.shape[1]} in catalog {cat.path}")
    records = cat.saes_by_key(saes)
    approx = approximate_saes(cat, records, approximate)
    return _with_recall(cat, _labelled(cat, *_search(cat, records, vectors, k, approx)), approx, k)


# ------------------------------------------------------------------------ approximate search


def measured_recall(cat: "Catalog", saes: Sequence[int], k: int, sample: int = RECALL_SAMPLE,
                    seed: int = RECALL_SEED) -> float:
    """recall@k of the approximate indexes (HNSW or IVF) against the exact ones, on a sample of
    each SAE's own decoder rows; measured once per index and stored beside it (18 s for 43 SAEs
    of 24,576 features)."""
    name = recall_name(k, sample, seed)
    scores, weights = [], []
    for record in cat.saes_by_key(saes):
        n = min(sample, record.d_sae)
        kind = approximate_kind(record)
        recall = stored_recall(cat, record, kind, name)
        if recall is None:
            exact = cat.index(record.sae)
            rows = recall_rows(record.d_sae, sample, seed)
            recall = recall_at_k(exact, approximate_index(cat, record), exact.vector(rows), k)
            store_recall(cat, record, kind, name, recall)
        scores.append(recall)
        weights.append(n)
    return float(np.average(scores, weights=weights)) if scores else 1.0


def _with_recall(cat: "Catalog", table: pa.Table, approximate: Sequence[int], k: int) -> pa.Table:
    """The table, with the recall of the approximate indexes it came from (if any) in its metadata."""
    if not approximate:
        return table
    recall = measured_recall(cat, approximate, k)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"recall": str(recall).encode(),
                                          b"approximate_saes": str(len(approximate)).encode()})


# ------------------------------------------------------------------------------- by concept


def loaded_sae(cat: "Catalog", record: "SaeRecord"):
    """The SAE itself, from the source its ingestion recorded (a local folder, or the hub)."""
    from ingest.sources import SaeSource, load_sae

    source = first_value(cat, "SELECT source FROM saes WHERE sae = ?", record.sae)
    return load_sae(SaeSource.recorded(record.release, record.sae_id, source))


def first_value(cat: "Catalog", query: str, *params):
    rows = cat.con.execute(query, list(params)).fetchall()
    return rows[0][0] if rows else None


def activation_model(cat: "Catalog", record: "SaeRecord", loaded, model=None):
    """A loaded model as is; else the named one, or the one the SAE was ingested with."""
    from ingest.model import model_for_sae

    if model is not None and not isinstance(model, str):
        return model
    return model_for_sae(loaded, model or first_value(cat, "SELECT activation_model FROM saes WHERE sae = ?", record.sae))


def encode_text(cat: "Catalog", sae: int, text: str, *, model=None, loaded=None) -> tuple[list[str], np.ndarray, float]:
    """Run `text` through the model and the SAE (either passed in already loaded): (its tokens as
    strings, the SAE's activations [tokens, d_sae], the threshold above which a feature fires)."""
    import torch

    from ingest.model import hook_activations

    record = cat.sae_by_key(sae)
    loaded = loaded or loaded_sae(cat, record)
    lm = activation_model(cat, record, loaded, model)
    ids = lm.to_tokens(text, prepend_bos=loaded.prepend_bos)
    with torch.inference_mode():
        acts = loaded.sae.encode(hook_activations(lm, ids, loaded.hook_name, loaded.layer)[0]).float().cpu().numpy()
    tokens = [lm.tokenizer.decode([int(i)]) for i in ids[0]]
    return tokens, acts, first_value(cat, "SELECT threshold FROM saes WHERE sae = ?", sae) or 0.0


def concept(cat: "Catalog", sae: int, text: str, k: int = 10, *, model=None, top: int = 10,
            all_tokens: bool = False) -> tuple[pa.Table, pa.Table]:
    """Run `text` through the model and the SAE: (the features that fire above the SAE's
    threshold on the last token, or on every token with all_tokens, strongest first, at most
    `top` per token: columns position, token, feature, activation; and those features'
    neighbours in the SAE, as `neighbors` returns them)."""
    tokens, acts, threshold = encode_text(cat, sae, text, model=model)
    positions = range(len(acts)) if all_tokens else [len(acts) - 1]
    rows = []
    for p in positions:
        fired = np.nonzero(acts[p] > threshold)[0]
        for f in fired[np.argsort(-acts[p][fired], kind="stable")][:top]:
            rows.append((p, tokens[p], int(f), float(acts[p][f])))
    fired_table = pa.table(dict(zip(["position", "token", "feature", "activation"],
                                    map(list, zip(*rows)) if rows else [[], [], [], []])))
    features = sorted({r[2] for r in rows})
    return fired_table, neighbors(cat, sae, features, k) if features else _no_hits(cat)


def _no_hits(cat: "Catalog") -> pa.Table:
    return _labelled(cat, *(np.zeros((0, 0), np.int64),) * 2, np.zeros((0, 0), np.float32))


def token_direction(cat: "Catalog", sae: int, token: str | int, k: int = 10, *, model=None) -> pa.Table:
    """The features whose decoder directions are nearest a token's unembedding direction W_U[:, id]
    (a string must be exactly one token of the model's tokenizer)."""
    record = cat.sae_by_key(sae)
    loaded = loaded_sae(cat, record)
    lm = activation_model(cat, record, loaded, model)
    if isinstance(token, str):
        ids = lm.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SaecatError(f"{token!r} is {len(ids)} tokens for this model, not one")
        token = ids[0]
    direction = lm.W_U[:, int(token)].detach().float().cpu().numpy()
    return search_vectors(cat, direction[None, :], k, saes=[sae])
