"""Indexes for wide SAEs against numpy ground truth: the chunked exact build (from an array, a
tensor, or decoder rows streamed from DuckDB in small, out-of-order batches) finds the same
neighbours and cosines as brute force and stores the same rows as the old one-shot build; the IVF
index reaches a stated recall@10 on planted clusters; a wide SAE (IVF_FROM lowered) gets IVF
through the normal approximate query path, written at ingestion by write_indexes, rebuilt when stale.

Catalogs are filled synthetically through commit_sae, as in test_catalog.
"""

from __future__ import annotations

import json
from datetime import timedelta

import faiss
import numpy as np
import pytest
import torch
from test_catalog import BASE_TIME, features_table, pairs_table, sae_row
from test_neighbors import assert_true_cosines, clustered, commit

import catalog.index as ci
from catalog import Catalog, SaecatError, writer
from catalog.index import INDEXES, DecoderRows, VectorIndex, encode_ids, unit_rows, write_indexes
import queries.neighbors as nn
from queries.neighbors import neighbors, recall_at_k

K = 10


def brute_force(dec: np.ndarray, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by cosine in float64, for all queries at once: (indices, cosines) [n, k]."""
    dec64 = dec.astype(np.float64)
    norms = np.linalg.norm(dec64, axis=1, keepdims=True)
    unit = np.divide(dec64, norms, out=np.zeros_like(dec64), where=norms > 0)
    q = queries.astype(np.float64) / np.linalg.norm(queries, axis=1, keepdims=True)
    cos = q @ unit.T
    top = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(cos, top, axis=1)


def one_shot(sae: int, dec: np.ndarray) -> faiss.Index:
    """The build before chunking: the whole unit copy added at once."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dec.shape[1]))
    index.add_with_ids(unit_rows(dec), encode_ids(sae, np.arange(len(dec))))
    return index


def recall(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(w) & set(g)) / len(w) for w, g in zip(want.tolist(), got.tolist())]))


def assert_exact(index: VectorIndex, dec: np.ndarray, queries: np.ndarray) -> None:
    want, want_cos = brute_force(dec, queries)
    sae, got, got_cos = index.search(queries, K)
    assert (sae == index.sae).all()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_cos, want_cos, atol=1e-5)


@pytest.fixture
def dec() -> np.ndarray:
    return clustered(n=3000, d=32, seed=11)


def test_chunked_exact_build_equals_brute_force_and_the_one_shot_build(dec):
    dec[17] = 0.0  # a dead feature: stays a zero row, as in the one-shot build
    queries = dec[np.arange(1, len(dec), 37)]
    old = one_shot(4, dec)
    for source in (dec, DecoderRows.of(dec, chunk=257), torch.from_numpy(dec).to(torch.float16)):
        built = VectorIndex.build(4, source)
        rows = dec if not isinstance(source, torch.Tensor) else source.float().numpy()
        assert_exact(built, rows, queries)
        if rows is dec:  # the same stored rows and ids as before, so the same answers
            everything = np.arange(len(dec))
            np.testing.assert_array_equal(built.vector(everything), VectorIndex(4, old).vector(everything))
            np.testing.assert_array_equal(built.ids, faiss.vector_to_array(old.id_map))
            assert np.array_equal(built.search(queries, K)[1], VectorIndex(4, old).search(queries, K)[1])
    assert not built.vector(17).any()
    # Written and read back, the id map and its reverse map still work.
    index = VectorIndex(4, faiss.deserialize_index(faiss.serialize_index(built.faiss)))
    assert_exact(index, torch.from_numpy(dec).to(torch.float16).float().numpy(), queries)
    np.testing.assert_array_equal(index.faiss.reconstruct(int(encode_ids(4, np.array([5]))[0])), index.vector(5))


def test_exact_index_streamed_from_duckdb_in_small_out_of_order_batches(db, dec, monkeypatch):
    key = commit(db, dec, "streamed")
    with Catalog.open(db) as cat:
        record = cat.sae_by_key(key)
        rows = DecoderRows.from_catalog(cat, record, chunk=100)
        batches = list(rows.batches())
        assert len(batches) >= 30 and max(len(f) for f, _ in batches) <= 100
        assert sorted(np.concatenate([f for f, _ in batches]).tolist()) == list(range(len(dec)))
        backwards = DecoderRows(rows.shape, lambda: iter(batches[::-1]))  # rows are placed by feature
        built = VectorIndex.build(key, backwards)
        np.testing.assert_array_equal(built.vector(np.arange(len(dec))), unit_rows(dec))
        assert_exact(built, dec, dec[::53])
        with pytest.raises(SaecatError, match="1 of its 3000 decoder rows are missing"):
            VectorIndex.build(key, DecoderRows(rows.shape, lambda: ((f[f != 5], r[f != 5]) for f, r in batches)))

        # The catalog's own rebuild streams too: the whole decoder is never read at once.
        monkeypatch.setattr(Catalog, "decoders", lambda *a: pytest.fail("load_or_build read the decoder whole"))
        monkeypatch.setattr(ci, "CHUNK_BYTES", 64 * 32 * 4)  # 64 rows a batch
        index = cat.index(key)
        assert_exact(index, dec, dec[::53])
        assert VectorIndex.paths(cat, key)[0].is_file()


def test_ivf_recall_on_planted_clusters():
    """20,000 rows in 200 planted clusters: IVF at its default nlist (500 here) and nprobe
    (nlist / 32) keeps >= 0.95 of the brute-force top 10; probing one list loses many."""
    dec = clustered(n=20_000, d=32, clusters=200, seed=8)
    queries = dec[np.random.default_rng(0).choice(len(dec), 500, replace=False)]
    want, _ = brute_force(dec, queries)
    ivf = VectorIndex.build_ivf(9, torch.from_numpy(dec))  # a tensor, as ingestion passes W_dec
    inner = faiss.extract_index_ivf(ivf.faiss)
    assert (inner.nlist, inner.nprobe) == (ci.ivf_lists(len(dec)), ci.ivf_probes(ci.ivf_lists(len(dec))))
    sae, got, cos = ivf.search(queries, K)
    assert (sae == 9).all() and recall(want, got) >= 0.95
    # What IVF returns are true cosines of the rows it names.
    unit = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, np.einsum("qd,qkd->qk", unit_rows(queries), unit[got]), atol=1e-5)
    np.testing.assert_allclose(ivf.vector(got[0]), unit[got[0]], atol=1e-6)
    crude = VectorIndex.build_ivf(9, dec, nprobe=1)
    assert recall(want, crude.search(queries, K)[1]) < recall(want, got) - 0.05


@pytest.fixture
def wide(monkeypatch) -> None:
    monkeypatch.setattr(ci, "IVF_FROM", 1000)


def test_wide_sae_gets_ivf_written_at_ingestion_and_through_the_query_path(db, dec, wide, monkeypatch):
    narrow = clustered(n=600, d=32, seed=12)
    key = commit(db, dec, "wide")
    small = commit(db, narrow, "narrow")
    with writer(db) as cat:  # as ingestion does after commit_sae, with W_dec as a tensor
        write_indexes(cat, cat.sae_by_key(key), torch.from_numpy(dec), progress=True)
        write_indexes(cat, cat.sae_by_key(small), torch.from_numpy(narrow))
        ivf_path, ivf_meta = VectorIndex.paths(cat, key, "ivf")
    assert ivf_path.is_file() and VectorIndex.paths(cat, key)[0].is_file()
    assert not VectorIndex.paths(cat, small, "ivf")[0].exists()  # narrow: exact only, HNSW on first use
    stamp = ivf_path.stat().st_mtime_ns, ivf_path.stat().st_ino
    INDEXES.clear()
    with monkeypatch.context() as patch:
        patch.setattr(VectorIndex, "build_ivf", lambda *a, **k: pytest.fail("the written IVF index is used"))
        patch.setattr(nn, "recall_at_k", lambda *a: pytest.fail("the recall measured at ingestion is used"))
        with Catalog.open(db) as cat:
            table = neighbors(cat, key, [0, 5, 2999], K, approximate=True)
            ivf = ci.approximate_index(cat, cat.sae_by_key(key))
    with Catalog.open(db) as cat:
        narrow_table = neighbors(cat, small, [1], K, approximate=True)
    assert (ivf_path.stat().st_mtime_ns, ivf_path.stat().st_ino) == stamp
    assert VectorIndex.paths(cat, small, "hnsw")[0].is_file() and not VectorIndex.paths(cat, key, "hnsw")[0].exists()
    assert_true_cosines(table, dec)
    assert_true_cosines(narrow_table, narrow)
    stored = json.loads(ivf_meta.read_text())
    nlist = ci.ivf_lists(len(dec))
    assert stored["fingerprint"].endswith(f";ivf=nlist{nlist},nprobe{ci.ivf_probes(nlist)},train40x10")
    assert stored["recall"] == {"k=10,sample=200,seed=0": float(table.schema.metadata[b"recall"])}
    assert float(table.schema.metadata[b"recall"]) >= 0.9
    # What ingestion stored is the IVF's recall on 200 of the SAE's own rows, against brute force.
    sample = unit_rows(dec)[ci.recall_rows(len(dec))]
    assert stored["recall"]["k=10,sample=200,seed=0"] == pytest.approx(
        recall(brute_force(dec, sample)[0], ivf.search(sample, K)[1]))
    # The approximate hits against brute force, for the queries asked (self excluded).
    want, _ = brute_force(dec, dec[[0, 5, 2999]], K + 1)
    got = np.array([[r["feature"] for r in table.to_pylist() if r["query"] == q] for q in (0, 5, 2999)])
    assert recall(want[:, 1:], got) >= 0.8


def test_stale_or_damaged_ivf_index_is_rebuilt(db, dec, wide):
    key = commit(db, dec, "wide")
    with Catalog.open(db) as cat:
        first = neighbors(cat, key, [3], K, approximate=True)  # built on first use when missing
        path, meta = VectorIndex.paths(cat, key, "ivf")
    assert path.is_file() and first.num_rows == K

    new = clustered(n=2500, d=32, seed=13)
    with writer(db) as cat:  # a re-ingestion: a later ingested_at, other decoders
        cat.commit_sae(sae_row("local", "wide", new, BASE_TIME + timedelta(hours=1)), features_table(new, 0),
                       pairs_table([0], [1], [1]))
    with Catalog.open(db) as cat:
        table = neighbors(cat, key, [0, 2499], K, approximate=True)
        record = cat.sae_by_key(key)
        index = ci.approximate_index(cat, record)
        assert index.faiss.ntotal == 2500 and faiss.extract_index_ivf(index.faiss).nlist == ci.ivf_lists(2500)
        exact = cat.index(key)
        queries = exact.vector(np.arange(0, 2500, 25))
        assert recall_at_k(exact, index, queries, K) == pytest.approx(
            recall(brute_force(new, queries)[0], index.search(queries, K)[1]))
    assert_true_cosines(table, new)
    stored = json.loads(meta.read_text())
    assert str(BASE_TIME + timedelta(hours=1)) in stored["fingerprint"]
    assert float(table.schema.metadata[b"recall"]) == stored["recall"]["k=10,sample=200,seed=0"]  # measured anew

    path.write_bytes(path.read_bytes()[:1000])  # a truncated file
    INDEXES.clear()
    with Catalog.open(db) as cat:
        assert_true_cosines(neighbors(cat, key, [7], K, approximate=True), new)
        assert ci.approximate_index(cat, cat.sae_by_key(key)).faiss.ntotal == 2500
    assert path.stat().st_size > 1000
