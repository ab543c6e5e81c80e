"""queries.neighbors against exact numpy search: by feature (single and batch), by vector, across
the SAEs of one model; the label and density columns against the stored rows; HNSW recall; the CLI.

Catalogs are filled synthetically through commit_sae, as in test_catalog.
"""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

from catalog import Catalog, SaecatError, writer
from catalog.index import INDEXES, VectorIndex
from queries.neighbors import COLUMNS, measured_recall, neighbors, recall_at_k, search_vectors
from test_catalog import (BASE_TIME, D_IN, _invoke, _main, exact_topk, features_table, pairs_table, random_decoders,
                          sae_row)

N_TOKENS = 12345


def commit(db, dec, sae_id, *, model="gpt2", seed=0, labels=None) -> int:
    with writer(db) as cat:
        return cat.commit_sae(sae_row("local", sae_id, dec, model=model), features_table(dec, seed),
                              pairs_table([0], [1], [1]), extra=labels)


def label_tables(n: int) -> dict[str, pa.Table]:
    """Logit-lens tokens (top ranks 0..4 and a bottom rank 0) for features 0..n-2, an example
    (ranks 0 and 1) for even features: the last feature has no labels at all."""
    feats = np.arange(n - 1)
    tokens = pa.table({
        "feature": pa.array(np.concatenate([np.repeat(feats, 5), feats]).astype(np.int32)),
        "direction": ["top"] * (5 * len(feats)) + ["bottom"] * len(feats),
        "rank": pa.array(np.concatenate([np.tile(np.arange(5), len(feats)), np.zeros(len(feats))]).astype(np.int32)),
        "token_id": pa.array(np.arange(6 * len(feats), dtype=np.int32)),
        "token": [f"t{f}r{r}" for f in feats for r in range(5)] + [f"bottom{f}" for f in feats],
        "logit": pa.array(np.ones(6 * len(feats), dtype=np.float32)),
    })
    even = feats[feats % 2 == 0]
    examples = pa.table({
        "feature": pa.array(np.repeat(even, 2).astype(np.int32)),
        "rank": pa.array(np.tile([1, 0], len(even)).astype(np.int32)),  # stored out of order on purpose
        "activation": pa.array(np.tile([1.0, 2.0], len(even)).astype(np.float32)),
        "document": pa.array(np.zeros(2 * len(even), dtype=np.int64)),
        "position": pa.array(np.zeros(2 * len(even), dtype=np.int32)),
        "token": [f"ex{f}r{r}" for f in even for r in (1, 0)],
        "context": [[f"ex{f}r{r}"] for f in even for r in (1, 0)],
        "center": pa.array(np.zeros(2 * len(even), dtype=np.int32)),
    })
    return {"feature_tokens": tokens, "feature_examples": examples}


@pytest.fixture
def decs() -> dict[str, np.ndarray]:
    return {"a": random_decoders(1), "b": random_decoders(2, n=200), "wide": random_decoders(3, n=100, d=48),
            "other": random_decoders(4, n=150)}


@pytest.fixture
def keys(db, decs) -> dict[str, int]:
    """a and b: gpt2, d_in 32; wide: gpt2, d_in 48; other: another model, d_in 32."""
    return {"a": commit(db, decs["a"], "a", seed=1, labels=label_tables(len(decs["a"]))),
            "b": commit(db, decs["b"], "b", seed=2, labels=label_tables(len(decs["b"]))),
            "wide": commit(db, decs["wide"], "wide", seed=3),
            "other": commit(db, decs["other"], "other", model="pythia", seed=4)}


def rows_by_query(table: pa.Table) -> dict[int, list[dict]]:
    assert table.column_names == COLUMNS
    out: dict[int, list[dict]] = {}
    for row in table.to_pylist():
        out.setdefault(row["query"], []).append(row)
    return out


def assert_matches(rows, labels, want, want_cos) -> None:
    """Rows in rank order equal numpy's exact top-k: the same (sae, feature)s, order and cosines."""
    assert [r["rank"] for r in rows] == list(range(len(want)))
    assert [(r["sae"], r["feature"]) for r in rows] == [labels[i] for i in want]
    np.testing.assert_allclose([r["cosine"] for r in rows], want_cos, atol=1e-5, rtol=0)


def test_single_and_batch_by_feature_equal_numpy(db, decs, keys):
    dec, key = decs["a"], keys["a"]
    labels = [(key, f) for f in range(len(dec))]
    with Catalog.open(db) as cat:
        single = rows_by_query(neighbors(cat, key, [3], 10))
        batch = rows_by_query(neighbors(cat, key, [0, 3, 7, 250, 499], 10))
        with pytest.raises(SaecatError, match="out of range"):
            neighbors(cat, key, [2, len(dec)], 3)
    assert list(single) == [3] and list(batch) == [0, 3, 7, 250, 499]
    for feature, rows in [(3, single[3]), *batch.items()]:
        assert_matches(rows, labels, *exact_topk(dec, dec[feature], 10, exclude=feature))
    assert [r["feature"] for r in single[3][:2]] == [7, 42]  # the planted near-copies of 3


def test_by_vector_one_sae_and_all_of_its_width_equal_numpy(db, decs, keys):
    rng = np.random.default_rng(9)  # a seed without near-ties at the k-th place
    queries = (rng.standard_normal((20, D_IN)) * rng.uniform(0.1, 10, (20, 1))).astype(np.float32)
    with Catalog.open(db) as cat:
        only_b = rows_by_query(search_vectors(cat, queries, 8, saes=[keys["b"]]))
        every = rows_by_query(search_vectors(cat, queries, 8))  # every SAE with d_in 32, any model
        with pytest.raises(SaecatError, match="d_in = 5"):
            search_vectors(cat, np.ones((1, 5)), 3)
    b_labels = [(keys["b"], f) for f in range(len(decs["b"]))]
    names = ("a", "b", "other")
    stacked = np.vstack([decs[n] for n in names])
    all_labels = [(keys[n], f) for n in names for f in range(len(decs[n]))]
    for n, q in enumerate(queries):
        assert_matches(only_b[n], b_labels, *exact_topk(decs["b"], q, 8))
        assert_matches(every[n], all_labels, *exact_topk(stacked, q, 8))


def test_model_scope_merges_same_model_and_width_only(db, decs, keys):
    stacked = np.vstack([decs["a"], decs["b"]])
    labels = [(keys["a"], f) for f in range(len(decs["a"]))] + [(keys["b"], f) for f in range(len(decs["b"]))]
    with Catalog.open(db) as cat:
        got = rows_by_query(neighbors(cat, keys["a"], [3, 100, 499], 12, scope="model"))
        from_b = rows_by_query(neighbors(cat, keys["b"], [5], 12, scope="model"))
    for feature, rows in got.items():
        assert_matches(rows, labels, *exact_topk(stacked, decs["a"][feature], 12, exclude=feature))
    # From b the self-match to exclude is b's own feature 5, not a's feature 5.
    assert_matches(from_b[5], labels, *exact_topk(stacked, decs["b"][5], 12, exclude=len(decs["a"]) + 5))
    assert {r["sae"] for rows in got.values() for r in rows} == {keys["a"], keys["b"]}


def test_others_scope_is_the_models_other_saes_only(db, decs, keys):
    with Catalog.open(db) as cat:
        got = rows_by_query(neighbors(cat, keys["a"], [3, 100], 7, scope="others"))
        alone = neighbors(cat, keys["other"], [1], 5, scope="others")  # no other SAE of its model
    labels = [(keys["b"], f) for f in range(len(decs["b"]))]
    for feature, rows in got.items():
        assert_matches(rows, labels, *exact_topk(decs["b"], decs["a"][feature], 7))
    assert alone.num_rows == 0 and alone.column_names == COLUMNS


def test_auto_goes_approximate_past_the_scan_bound_where_an_index_is_written(db, decs, keys, monkeypatch):
    """approximate='auto' (the feature page's cross-SAE search) is exact while the SAEs' decoder
    rows fit EXACT_SCAN_BYTES; past it, the SAEs whose approximate index is on disk are read
    through it, with its recall reported, the others stay exact, and no index is built."""
    import queries.neighbors as nn

    stacked = np.vstack([decs["a"], decs["b"]])
    labels = [(keys["a"], f) for f in range(len(decs["a"]))] + [(keys["b"], f) for f in range(len(decs["b"]))]
    with Catalog.open(db) as cat:
        within = neighbors(cat, keys["a"], [3, 100], 12, "model", approximate="auto")
        graph = cat.index(keys["b"], "hnsw")  # b's graph, as an approximate search leaves it on disk
        recall = measured_recall(cat, [keys["b"]], 12)
    assert within.schema.metadata is None or b"recall" not in within.schema.metadata
    for feature, rows in rows_by_query(within).items():
        assert_matches(rows, labels, *exact_topk(stacked, decs["a"][feature], 12, exclude=feature))

    INDEXES.clear()
    searched = []
    approximate_index = nn.approximate_index
    monkeypatch.setattr(nn, "EXACT_SCAN_BYTES", 0)
    monkeypatch.setattr(nn, "approximate_index", lambda cat, record: searched.append(record.sae) or
                        approximate_index(cat, record))
    monkeypatch.setattr(VectorIndex, "build_hnsw", lambda *a, **k: pytest.fail("'auto' built an index"))
    with Catalog.open(db) as cat:
        past = neighbors(cat, keys["a"], [3, 100], 12, "model", approximate="auto")
    assert set(searched) == {keys["b"]}  # a has no approximate index written: exact
    assert past.schema.metadata[b"approximate_saes"] == b"1"
    assert float(past.schema.metadata[b"recall"]) == recall
    unit = stacked / np.linalg.norm(stacked, axis=1, keepdims=True)
    for feature, rows in rows_by_query(past).items():
        # a's exact cosines (self excluded) and b's graph's hits, merged by cosine
        cos = unit[:len(decs["a"])] @ unit[feature]
        cos[feature] = -np.inf
        _, in_b, b_cos = graph.search(unit[feature][None], 12)
        merged = sorted([(c, (keys["a"], f)) for f, c in enumerate(cos)] +
                        [(c, (keys["b"], f)) for f, c in zip(in_b[0], b_cos[0])], key=lambda x: -x[0])[:12]
        assert [(r["sae"], r["feature"]) for r in rows] == [hit for _, hit in merged]


def test_labels_and_density_are_the_stored_values(db, decs, keys):
    with Catalog.open(db) as cat:
        table = neighbors(cat, keys["a"], [3, 10, 498], len(decs["a"]) - 1)
        stored = dict(cat.con.execute("SELECT feature, fire_count FROM features WHERE sae = ?",
                                      [keys["a"]]).fetchall())
        last = len(decs["a"]) - 1
        assert cat.con.execute("SELECT count(*) FROM feature_tokens WHERE sae = ? AND feature = ?",
                               [keys["a"], last]).fetchall() == [(0,)]
    rows = table.to_pylist()
    assert len(rows) == 3 * (len(decs["a"]) - 1)
    for r in rows:
        f = r["feature"]
        assert (r["release"], r["sae_id"]) == ("local", "a")
        assert r["density"] == pytest.approx(stored[f] / N_TOKENS, rel=1e-12)
        if f == last:
            assert r["top_tokens"] == [] and r["top_example"] is None
        else:
            assert r["top_tokens"] == [f"t{f}r0", f"t{f}r1", f"t{f}r2"]
            assert r["top_example"] == (f"ex{f}r0" if f % 2 == 0 else None)


def clustered(n: int = 3000, d: int = 32, clusters: int = 60, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    points = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d))
    return (points * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)


def test_hnsw_recall_bound_and_reporting(db):
    dec = clustered()
    key = commit(db, dec, "clustered")
    with Catalog.open(db) as cat:
        exact = cat.index(key)
        queries = exact.vector(np.arange(0, len(dec), 7))
        good = recall_at_k(exact, cat.index(key, "hnsw"), queries, 10)
        crude = VectorIndex.build_hnsw(exact, m=2, ef_construction=2, ef_search=1)
        poor = recall_at_k(exact, crude, queries, 10)
        reported = measured_recall(cat, [key], 10)
        table = neighbors(cat, key, [0, 1], 10, approximate=True)
        flat = neighbors(cat, key, [0, 1], 10)
    assert recall_at_k(exact, exact, queries, 10) == 1.0
    assert good >= 0.95, good  # the stated bound for the defaults (M=32, efSearch=128)
    assert poor < good  # the measure can tell a bad index
    assert 0.95 <= reported <= 1.0
    assert float(table.schema.metadata[b"recall"]) == reported
    assert b"recall" not in (flat.schema.metadata or {})
    assert_true_cosines(table, dec)  # the approximate hits are true cosines of the features they name


def assert_true_cosines(table: pa.Table, dec: np.ndarray) -> None:
    unit = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    for r in table.to_pylist():
        assert r["cosine"] == pytest.approx(float(unit[r["query"]] @ unit[r["feature"]]), abs=1e-5)


def test_hnsw_index_is_kept_on_disk_and_follows_the_catalog(db, monkeypatch):
    """A new process reads the HNSW graph and its recall estimate instead of measuring them again
    (minutes at 65k features); a re-ingestion or a damaged file makes them stale, and the graph is
    rebuilt from the new decoders."""
    import queries.neighbors as nn

    dec = clustered(n=1500, seed=3)
    key = commit(db, dec, "clustered")
    with Catalog.open(db) as cat:
        first = neighbors(cat, key, [0, 5, 1499], 10, approximate=True)
        path, meta = VectorIndex.paths(cat, key, "hnsw")
    assert path.name == f"sae-{key}.hnsw.faiss" and path.is_file()
    assert VectorIndex.paths(cat, key)[0].is_file()  # the exact index beside it
    stored = json.loads(meta.read_text())
    assert stored["fingerprint"].endswith(";hnsw=M32,efConstruction200")
    assert stored["recall"] == {"k=10,sample=200,seed=0": float(first.schema.metadata[b"recall"])}
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    INDEXES.clear()  # as in a new process
    with monkeypatch.context() as patch:
        patch.setattr(nn, "recall_at_k", lambda *a: pytest.fail("the stored estimate is used"))
        with Catalog.open(db) as cat:
            again = neighbors(cat, key, [0, 5, 1499], 10, approximate=True)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp  # read, not rebuilt
    assert again.to_pylist() == first.to_pylist()
    assert again.schema.metadata[b"recall"] == first.schema.metadata[b"recall"]
    exact_path = VectorIndex.paths(cat, key)[0]
    exact_path.unlink()
    INDEXES.clear()
    with Catalog.open(db) as cat:  # graph and estimate kept: the exact index is not even read
        assert neighbors(cat, key, [0, 5, 1499], 10, approximate=True).to_pylist() == first.to_pylist()
    assert not exact_path.exists()

    new = clustered(n=1200, seed=4)
    with writer(db) as cat:  # a re-ingestion: a later ingested_at, other decoders
        cat.commit_sae(sae_row("local", "clustered", new, BASE_TIME + timedelta(hours=1)), features_table(new, 0),
                       pairs_table([0], [1], [1]))
    with Catalog.open(db) as cat:
        table = neighbors(cat, key, [0, 1199], 10, approximate=True)
        assert cat.index(key, "hnsw").faiss.ntotal == 1200
    assert_true_cosines(table, new)
    stored = json.loads(meta.read_text())
    assert str(BASE_TIME + timedelta(hours=1)) in stored["fingerprint"]
    assert float(table.schema.metadata[b"recall"]) == stored["recall"]["k=10,sample=200,seed=0"]  # measured anew

    meta.write_text(json.dumps({**json.loads(meta.read_text()), "recall": ["damaged"]}))
    INDEXES.clear()
    with Catalog.open(db) as cat:  # a damaged estimate is measured again, not a traceback
        table = neighbors(cat, key, [3], 10, approximate=True)
    assert float(table.schema.metadata[b"recall"]) == json.loads(meta.read_text())["recall"]["k=10,sample=200,seed=0"]

    path.write_bytes(path.read_bytes()[:1000])  # a truncated file
    INDEXES.clear()
    with Catalog.open(db) as cat:
        table = neighbors(cat, key, [7], 10, approximate=True)
        assert cat.index(key, "hnsw").faiss.ntotal == 1200
        with pytest.raises(SaecatError, match="unknown index kind"):
            cat.index(key, "ivf")
    assert_true_cosines(table, new)
    assert path.stat().st_size > 1000


def test_index_device_is_the_cpu_without_a_gpu_and_says_how_to_get_one(db, monkeypatch, capsys):
    import faiss

    from catalog.index import index_device

    monkeypatch.delenv("SAECAT_INDEX_DEVICE", raising=False)
    if faiss.get_num_gpus():
        pytest.skip("FAISS sees a GPU here")
    assert index_device() == index_device("auto") == index_device("CPU") == "cpu"
    with pytest.raises(SaecatError, match=r"no GPU: install faiss-gpu \(pip install 'saecat\[gpu\]'\)"):
        index_device("cuda")
    with pytest.raises(SaecatError, match="unknown index device 'tpu'"):
        index_device("tpu")
    dec = clustered(n=300, seed=2)
    key = commit(db, dec, "small")
    monkeypatch.setenv("SAECAT_INDEX_DEVICE", "cuda")  # asked for, not there: a clear error, not a crash
    code, out, stderr = _main(["neighbors", "3", "--release", "local", "--sae-id", "small", "--db", str(db)],
                              capsys, monkeypatch)
    assert code == 1 and out == "" and "FAISS sees no GPU" in stderr
    monkeypatch.setenv("SAECAT_INDEX_DEVICE", "cpu")
    with Catalog.open(db) as cat:
        got = rows_by_query(neighbors(cat, key, [3], 10))
    assert_matches(got[3], [(key, f) for f in range(len(dec))], *exact_topk(dec, dec[3], 10, exclude=3))


def test_exact_index_is_numpy_top_k_on_clustered_data(db):
    dec = clustered(n=800, seed=9)
    key = commit(db, dec, "clustered")
    with Catalog.open(db) as cat:
        got = rows_by_query(neighbors(cat, key, [0, 17, 799], 10))
    labels = [(key, f) for f in range(len(dec))]
    for feature, rows in got.items():
        assert_matches(rows, labels, *exact_topk(dec, dec[feature], 10, exclude=feature))


def test_cli_json_equals_numpy(db, decs, keys):
    result = _invoke(["neighbors", "3", "250", "--release", "local", "--sae-id", "a", "-k", "5",
                      "--scope", "model", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert list(got[0]) == COLUMNS
    stacked = np.vstack([decs["a"], decs["b"]])
    labels = [(keys["a"], f) for f in range(len(decs["a"]))] + [(keys["b"], f) for f in range(len(decs["b"]))]
    for feature in (3, 250):
        rows = [r for r in got if r["query"] == feature]
        assert_matches(rows, labels, *exact_topk(stacked, decs["a"][feature], 5, exclude=feature))
    bad = _invoke(["neighbors", "3", "--release", "local", "--sae-id", "a", "--scope", "all", "--db", str(db)])
    assert bad.exit_code != 0


def test_concept_and_token_direction_against_a_reference(db, model_dir, sae_dirs, tokenizer):
    import torch
    from sae_lens import SAE
    from transformers import GPT2LMHeadModel

    from queries.neighbors import concept, token_direction

    folder = sae_dirs["standard"]
    ref_sae = SAE.load_from_disk(str(folder), device="cpu").eval()
    dec = ref_sae.W_dec.detach().float().numpy()
    with writer(db) as cat:
        key = cat.commit_sae(sae_row("local", "standard", dec, source=str(folder)), features_table(dec),
                             pairs_table([0], [1], [1]))
    text = "def decode(self, s):\n    return json"
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    hf = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        acts = ref_sae.encode(hf.transformer(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0])
    last = acts[-1].numpy()
    fired = np.nonzero(last > 0)[0]
    want = fired[np.argsort(-last[fired], kind="stable")][:5]
    assert len(want) >= 2
    with Catalog.open(db) as cat:
        got, near = concept(cat, key, text, 4, model=str(model_dir), top=5)
        every, _ = concept(cat, key, text, 4, model=str(model_dir), top=3, all_tokens=True)
        by_token = token_direction(cat, key, int(ids[3]), 6, model=str(model_dir))
    assert got.column("feature").to_pylist() == want.tolist()
    np.testing.assert_allclose(got.column("activation").to_pylist(), last[want], rtol=1e-4, atol=1e-4)
    assert set(every.column("position").to_pylist()) <= set(range(len(ids)))
    assert [r["feature"] for r in every.to_pylist() if r["position"] == len(ids) - 1] == want[:3].tolist()
    labels = [(key, f) for f in range(len(dec))]
    near_rows = rows_by_query(near)
    assert sorted(near_rows) == sorted(want.tolist())
    for f, rows in near_rows.items():
        assert_matches(rows, labels, *exact_topk(dec, dec[f], 4, exclude=f))
    w_u = hf.lm_head.weight.detach().numpy()[ids[3]]  # tied embeddings: W_U[:, id]
    assert_matches(by_token.to_pylist(), labels, *exact_topk(dec, w_u, 6))


def test_cli_concept_and_token_json_equal_the_python_api(db, model_dir, sae_dirs, tokenizer, capsys, monkeypatch):
    from sae_lens import SAE

    from catalog.query import json_value
    from queries.neighbors import concept, token_direction

    folder = sae_dirs["standard"]
    dec = SAE.load_from_disk(str(folder), device="cpu").W_dec.detach().float().numpy()
    with writer(db) as cat:
        key = cat.commit_sae(sae_row("local", "standard", dec, source=str(folder)), features_table(dec),
                             pairs_table([0], [1], [1]))
    text = "def decode(self, s):\n    return json"
    word = tokenizer.decode(tokenizer(" return", add_special_tokens=False)["input_ids"])
    with Catalog.open(db) as cat:
        fired, near = concept(cat, key, text, 4, model=str(model_dir))
        by_token = token_direction(cat, key, word, 6, model=str(model_dir))

    def plain(table: pa.Table) -> list[dict]:
        return [{c: json_value(v) for c, v in row.items()} for row in table.to_pylist()]

    common = ["--release", "local", "--sae-id", "standard", "--model", str(model_dir), "--db", str(db), "--json"]
    result = _invoke(["concept", text, "-k", "4", *common])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert list(got) == ["fired", "neighbors"] and len(got["fired"]) >= 2
    assert got == {"fired": plain(fired), "neighbors": plain(near)}
    result = _invoke(["token", word, "-k", "6", *common])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == plain(by_token)
    assert len(plain(by_token)) == 6
    code, _, stderr = _main(["token", "def decode", *common], capsys, monkeypatch)
    assert code == 1 and "2 tokens" in stderr
    tables = _invoke(["concept", text, *common[:-1]])  # two tables, no --json
    assert tables.exit_code == 0 and "features fired" in tables.stdout and "neighbours" in tables.stdout
