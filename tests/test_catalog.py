"""The catalog without the model: schema and migrations, commit_sae, the FAISS index against exact
numpy search, index persistence and staleness, the SQL sandbox (both walls) and the query CLI.

Rows are written straight through `catalog.store.writer` / `Catalog.commit_sae`, with arrow tables
built the way `ingest.pipeline._tables` builds them, from synthetic numpy decoders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

import catalog.store as store_mod
from catalog import Catalog, SaecatError, writer
from catalog.index import INDEXES, IndexCache, VectorIndex, decode_ids, encode_ids
from catalog.sandbox import check_query
from catalog.schema import MIGRATIONS, QUERYABLE_TABLES, SCHEMA_VERSION

# The repository the code under test comes from (subprocesses must import the same code).
ROOT = Path(store_mod.__file__).resolve().parents[1]

D_IN = 32
D_SAE = 500
BASE_TIME = datetime(2024, 5, 17, 12, 30, 45, 123456)

# The table contract: column names, in order, of every table catalog.schema creates.
CONTRACT = {
    "releases": ["release", "repo_id", "model", "conversion_func", "links", "registered_at"],
    "saes": ["sae", "release", "sae_id", "source", "model", "hook_name", "layer", "d_in", "d_sae",
             "architecture", "neuronpedia_id", "status", "decoder_folded", "activation_model", "dataset",
             "text_column", "n_documents", "n_tokens", "n_blocks", "block_size", "threshold",
             "max_doc_tokens", "ingested_at", "top_k", "context_tokens", "group_column", "sample_blocks",
             "repo_path", "registry_l0", "registry_variance_explained", "registered_at", "unlisted_at",
             "pair_min_blocks", "pair_top_partners", "pair_rank_by", "pairs_complete"],
    "features": ["sae", "feature", "decoder", "decoder_norm", "fire_count", "block_count",
                 "max_activation", "mean_activation"],
    "cooccurrence": ["sae", "i", "j", "n11"],
    "feature_tokens": ["sae", "feature", "direction", "rank", "token_id", "token", "logit"],
    "feature_examples": ["sae", "feature", "rank", "activation", "document", "position", "token", "context",
                         "center", "context_values"],
    "feature_histograms": ["sae", "feature", "bin", "lower", "upper", "count"],
    "labelled_features": ["sae", "release", "sae_id", "feature", "feature_ref", "fire_count", "density",
                          "block_count", "block_density", "max_activation", "mean_activation", "decoder_norm",
                          "top_tokens", "bottom_tokens", "top_example_token", "top_example"],
    "ingest_runs": ["run", "release", "sae_id", "params", "params_hash", "status", "pid", "n_documents",
                    "n_tokens", "started_at", "updated_at", "finished_at", "error"],
    "blocks": ["sae", "block", "document", "start", "group_value", "features", "tokens"],
    "activation_spectrum": ["sae", "rank", "eigenvalue"],
    "sae_quality": ["sae", "n_tokens", "l0", "l0_values", "l0_counts", "l1", "mse", "explained_variance", "fvu",
                    "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias",
                    "dead_latents", "dense_1pct", "dense_10pct", "eval_tokens", "ce_loss_clean", "ce_loss_sae",
                    "ce_loss_ablated", "ce_loss_score", "delta_lm_loss", "kl_div_sae", "kl_div_ablated",
                    "kl_div_score"],
    "analyses": ["analysis", "kind", "sae", "params", "params_hash", "inputs", "summary", "seconds", "created_at"],
    "crystals": ["analysis", "rank", "shape", "a", "b", "c", "d", "error", "cosine", "error_before",
                 "cosine_before"],
    "crystal_sweep": ["analysis", "space", "method", "n_components", "silhouette", "silhouette_held_out"],
    "crystal_tasks": ["analysis", "space", "method", "task", "n_pairs", "mean_cosine", "mean_error"],
    "lobes": ["analysis", "affinity", "n_lobes", "feature", "lobe", "excluded"],
    "lobe_agreement": ["analysis", "affinity", "n_lobes", "ami", "ami_null_mean", "ami_null_std", "ami_z",
                       "accuracy_index", "accuracy_shuffled", "accuracy_null_mean", "accuracy_null_std",
                       "accuracy_z"],
    "lobe_documents": ["analysis", "affinity", "n_lobes", "lobe", "group_value", "blocks"],
    "spectra": ["analysis", "rank", "eigenvalue", "null_eigenvalue", "activation_eigenvalue"],
    "feature_affinities": ["sae", "i", "j", "n11", "n_i", "n_j", "n_blocks", "smc", "jaccard", "dice", "overlap",
                           "phi", "lift", "pmi", "pairs_complete"],
    "spectrum_layers": ["analysis", "sae", "release", "sae_id", "model", "hook_name", "layer", "d_sae", "d_in",
                        "alpha", "alpha_low", "alpha_high", "null_alpha", "activation_alpha", "negentropy",
                        "null_negentropy", "created_at"],
    "registry_snapshots": ["snapshot", "source", "version", "sha256", "n_releases", "n_saes", "problems",
                           "synced_at"],
    "registry_changes": ["snapshot", "kind", "action", "release", "sae_id", "fields"],
    "watches": ["watch", "release_pattern", "model", "hook_pattern", "min_width", "max_width", "min_l0", "max_l0",
                "options", "created_at"],
    "neuronpedia_sources": ["sae", "model_id", "source_id", "set_name", "dataset", "num_prompts",
                            "num_tokens_in_prompt", "model", "source", "sourceset", "release", "location",
                            "n_features", "n_activations", "n_explanations", "imported_at"],
    "neuronpedia_features": ["sae", "feature", "max_act_approx", "frac_nonzero", "freq_hist_heights",
                             "freq_hist_values", "logits_hist_heights", "logits_hist_values", "pos_str", "pos_values",
                             "neg_str", "neg_values", "top_cos_sim_indices", "top_cos_sim_values",
                             "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                             "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                             "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
                             "decoder_weights_dist"],
    "neuronpedia_activations": ["sae", "feature", "id", "tokens", "values", "max_value", "min_value",
                                "max_value_token_index", "bin_min", "bin_max", "bin_contains",
                                "qualifying_token_index", "dfa_values", "dfa_max_value", "dfa_target_index"],
    "neuronpedia_explanations": ["sae", "feature", "id", "description", "type_name", "explanation_model_name",
                                 "author_id", "embedding", "folder"],
    "feature_explanations": ["sae", "feature", "explainer", "method", "explanation", "prompt_examples", "score",
                             "score_method", "scorer", "score_details", "created_at", "ingested_at"],
    "explanations": ["sae", "feature", "explanation", "source", "explainer", "method", "score", "score_method"],
    "schema_migrations": ["version", "applied_at"],
}


# --------------------------------------------------------------------------- helpers


def random_decoders(seed: int, n: int = D_SAE, d: int = D_IN) -> np.ndarray:
    """Gaussian decoder rows with planted structure: 7 is a rescaled near-copy of 3, 42 a noisier
    copy of 3, 11 is exactly -3 (the farthest from 3)."""
    rng = np.random.default_rng(seed)
    dec = rng.standard_normal((n, d)).astype(np.float32)
    dec *= rng.uniform(0.2, 3.0, size=(n, 1)).astype(np.float32)  # norms vary: cosine must normalise
    if n > 42:
        dec[7] = 2.5 * dec[3] + 0.02 * rng.standard_normal(d).astype(np.float32) * np.linalg.norm(dec[3])
        dec[42] = dec[3] + 0.3 * rng.standard_normal(d).astype(np.float32) * np.linalg.norm(dec[3]) / np.sqrt(d)
        dec[11] = -dec[3]
    return dec


def features_table(dec: np.ndarray, seed: int = 0) -> pa.Table:
    """What ingest.pipeline._tables builds, from a decoder matrix and made-up statistics."""
    n = len(dec)
    rng = np.random.default_rng(seed + 1000)
    fire = rng.integers(0, 10_000, n).astype(np.int64)
    mean = rng.uniform(0.1, 5.0, n)
    mean[fire == 0] = np.nan
    return pa.table({
        "feature": pa.array(np.arange(n, dtype=np.int32)),
        "decoder": pa.FixedSizeListArray.from_arrays(pa.array(dec.ravel()), dec.shape[1]).cast(
            pa.list_(pa.float32())),
        "decoder_norm": pa.array(np.linalg.norm(dec, axis=1).astype(np.float32)),
        "fire_count": pa.array(fire),
        "block_count": pa.array(fire // 7),
        "max_activation": pa.array(rng.uniform(5.0, 10.0, n).astype(np.float32)),
        "mean_activation": pa.array(mean.astype(np.float32), from_pandas=True),
    })


def pairs_table(i, j, n11) -> pa.Table:
    return pa.table({"i": pa.array(np.asarray(i, dtype=np.int32)), "j": pa.array(np.asarray(j, dtype=np.int32)),
                     "n11": pa.array(np.asarray(n11, dtype=np.int64))})


def sae_row(release: str, sae_id: str, dec: np.ndarray, ingested_at: datetime = BASE_TIME, **extra) -> dict:
    row = {
        "release": release, "sae_id": sae_id, "source": "local:/nowhere", "model": "gpt2",
        "hook_name": "blocks.1.hook_resid_pre", "layer": 1, "d_in": dec.shape[1], "d_sae": dec.shape[0],
        "architecture": "standard", "neuronpedia_id": None, "status": "ready", "decoder_folded": False,
        "activation_model": "gpt2", "dataset": "docs.jsonl", "text_column": "text", "n_documents": 17,
        "n_tokens": 12345, "n_blocks": 48, "block_size": 256, "threshold": 0.0, "max_doc_tokens": 1024,
        "ingested_at": ingested_at,
    }
    row.update(extra)
    return row


def commit(db: Path, dec: np.ndarray, release: str = "local", sae_id: str = "a", *, pairs: pa.Table | None = None,
           ingested_at: datetime = BASE_TIME, seed: int = 0) -> int:
    if pairs is None:
        pairs = pairs_table([0, 0, 3], [1, 7, 7], [5, 2, 9])
    with writer(db) as cat:
        return cat.commit_sae(sae_row(release, sae_id, dec, ingested_at), features_table(dec, seed), pairs,
                              {"release": release, "repo_id": None, "model": "gpt2", "conversion_func": None,
                               "links": None})


def dump(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table, sorted: 'exactly as before' compares these."""
    out = {}
    with Catalog.open(db) as cat:
        for table in (*QUERYABLE_TABLES, "schema_migrations"):
            out[table] = sorted(cat.con.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
    return out


def exact_topk(dec: np.ndarray, query: np.ndarray, k: int, exclude: int | None = None):
    """Exact top-k by cosine in float64: (indices, cosines)."""
    unit = dec.astype(np.float64) / np.linalg.norm(dec.astype(np.float64), axis=1, keepdims=True)
    q = np.asarray(query, dtype=np.float64)
    cos = unit @ (q / np.linalg.norm(q))
    order = np.argsort(-cos, kind="stable")
    if exclude is not None:
        order = order[order != exclude]
    top = order[:k]
    # The comparison is only well defined without near-ties: make sure the data has none.
    gaps = -np.diff(cos[order[: k + 1]])
    assert gaps.size == 0 or gaps.min() > 1e-5, "test data has near-ties; pick another seed"
    return top, cos[top]


def assert_hits_equal(hits, sae: int, dec: np.ndarray, feature: int, k: int) -> None:
    want, want_cos = exact_topk(dec, dec[feature], k, exclude=feature)
    assert [h[0] for h in hits] == [sae] * len(want)
    assert [h[1] for h in hits] == want.tolist()
    np.testing.assert_allclose([h[2] for h in hits], want_cos, atol=1e-5, rtol=0)


def columns(cat: Catalog) -> dict[str, list[str]]:
    rows = cat.con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = current_database() "
        "ORDER BY table_name, column_index"
    ).fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    return out


@pytest.fixture
def dec_a() -> np.ndarray:
    return random_decoders(1)


@pytest.fixture
def dec_b() -> np.ndarray:
    return random_decoders(2, n=200)


@pytest.fixture
def two_saes(db, dec_a, dec_b) -> tuple[int, int]:
    key_a = commit(db, dec_a, "local", "a", seed=1)
    key_b = commit(db, dec_b, "other/repo", "layer_2", seed=2,
                   pairs=pairs_table([1, 2], [2, 3], [11, 12]), ingested_at=BASE_TIME + timedelta(hours=1))
    return key_a, key_b


# --------------------------------------------------------------------------- 1. schema


def test_new_catalog_has_every_contract_table(db):
    assert not db.exists()
    with writer(db) as cat:
        found = columns(cat)
        versions = cat.con.execute("SELECT version FROM schema_migrations").fetchall()
    assert db.exists()
    assert found == CONTRACT
    assert set(QUERYABLE_TABLES) | {"schema_migrations"} == set(CONTRACT)
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert SCHEMA_VERSION == MIGRATIONS[-1][0] == len(MIGRATIONS)


def test_reopening_does_not_reapply_migrations(db, dec_a):
    with writer(db) as cat:
        first = cat.con.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
    key = commit(db, dec_a)
    for _ in range(2):
        with writer(db) as cat:
            again = cat.con.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
            assert cat.con.execute("SELECT count(*) FROM features WHERE sae = ?", [key]).fetchall() == [(D_SAE,)]
        assert again == first
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT version, applied_at FROM schema_migrations").fetchall() == first
        assert cat.sql("SELECT sae_id FROM saes").rows == [("a",)]


def _mark_newer(db: Path) -> None:
    with writer(db) as cat:
        cat.con.execute("INSERT INTO schema_migrations (version) VALUES (?)", [SCHEMA_VERSION + 1])


def test_newer_schema_is_refused_by_writer(db, dec_a):
    commit(db, dec_a)
    _mark_newer(db)
    before = dump_raw(db)
    with pytest.raises(SaecatError) as info:
        Catalog.open(db, read_only=False)
    msg = str(info.value).replace(str(db), "<db>")  # the tmp path itself contains the test's name
    assert f"v{SCHEMA_VERSION + 1}" in msg and f"v{SCHEMA_VERSION}" in msg and "newer" in msg
    assert dump_raw(db) == before  # nothing touched, and the file is not left held
    with pytest.raises(SaecatError, match="newer than this saecat"):
        with writer(db):
            pass


def test_newer_schema_is_refused_by_reader_without_wrong_advice(db, dec_a):
    commit(db, dec_a)
    _mark_newer(db)
    with pytest.raises(SaecatError) as info:
        Catalog.open(db)
    msg = str(info.value).replace(str(db), "<db>")  # the tmp path itself contains the test's name
    assert f"v{SCHEMA_VERSION + 1}" in msg
    # A write command cannot upgrade a catalog that is newer than the code: it refuses it (above).
    # The reader must say the catalog is newer / saecat needs upgrading, not send the user there.
    assert "newer" in msg or "upgrade saecat" in msg, msg


def dump_raw(db: Path) -> dict[str, list[tuple]]:
    """Like dump, but with a plain DuckDB connection (works whatever the schema version)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
        return {n: sorted(con.execute(f"SELECT * FROM {n}").fetchall(), key=repr) for n in names}
    finally:
        con.close()


def test_read_only_open_of_missing_file_is_clear_and_creates_nothing(tmp_path):
    path = tmp_path / "sub" / "missing.duckdb"
    with pytest.raises(SaecatError, match="no catalog at"):
        Catalog.open(path)
    assert not path.exists()
    assert not path.parent.exists()
    assert not store_mod.sidecar_dir(path).exists()


def test_v1_catalog_upgrades_to_current_keeping_its_rows(db, dec_a, monkeypatch):
    """A catalog written by the first release of the schema opens under the current one."""
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS[:1])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 1)
    with writer(db) as cat:
        key = cat.commit_sae(sae_row("local", "a", dec_a), features_table(dec_a), pairs_table([0], [1], [2]))
    before = dump_raw(db)
    monkeypatch.undo()
    with writer(db) as cat:
        assert columns(cat) == CONTRACT
    after = dump_raw(db)
    for table in ("features", "cooccurrence", "releases", "ingest_runs"):
        assert after[table] == before[table], table
    added = len(CONTRACT["saes"]) - len(before["saes"][0])
    assert [row[:-added] for row in after["saes"]] == before["saes"]  # new columns appended, NULL
    # but the pair policy (v6): what an SAE ingested before it holds, every pair with n11 > 0
    assert {row[-added:] for row in after["saes"]} == {(None,) * (added - 4) + (1, None, None, True)}
    with Catalog.open(db) as cat:
        assert np.array_equal(cat.decoders(key), dec_a)


def test_migration_adds_column_and_keeps_data(db, dec_a, monkeypatch):
    key = commit(db, dec_a)
    before = dump(db)
    v2 = SCHEMA_VERSION + 1
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, (v2, ["ALTER TABLE saes ADD COLUMN notes VARCHAR"])])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", v2)

    # The old-version catalog is refused read-only until a writer upgrades it.
    with pytest.raises(SaecatError, match=rf"schema v{SCHEMA_VERSION}\b.*expects v{v2}"):
        Catalog.open(db)
    with writer(db) as cat:
        assert columns(cat)["saes"] == [*CONTRACT["saes"], "notes"]
        versions = [v for (v,) in cat.con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()]
        assert versions == [*range(1, SCHEMA_VERSION + 1), v2]
        cat.con.execute("UPDATE saes SET notes = 'kept' WHERE sae = ?", [key])
    with writer(db) as cat:  # applied once only
        assert cat.con.execute("SELECT count(*) FROM schema_migrations").fetchall() == [(SCHEMA_VERSION + 1,)]
    with Catalog.open(db) as cat:
        saes = cat.con.execute("SELECT * EXCLUDE (notes) FROM saes").fetchall()
        assert cat.con.execute("SELECT notes FROM saes").fetchall() == [("kept",)]
        assert np.array_equal(cat.decoders(key), dec_a)
    after = dump(db)
    assert saes == before["saes"]
    for table in ("features", "cooccurrence", "releases", "ingest_runs"):
        assert after[table] == before[table], table


def test_failed_migration_rolls_back_whole(db, dec_a, monkeypatch):
    commit(db, dec_a)
    before = dump_raw(db)
    v2 = SCHEMA_VERSION + 1
    monkeypatch.setattr(store_mod, "MIGRATIONS", [
        *MIGRATIONS, (v2, ["ALTER TABLE saes ADD COLUMN notes VARCHAR", "ALTER TABLE nowhere ADD COLUMN x INT"])])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", v2)
    with pytest.raises(duckdb.Error) as info:
        Catalog.open(db, read_only=False)
    assert "nowhere" in str(info.value)
    assert dump_raw(db) == before  # rolled back, and the file is not left held
    monkeypatch.undo()
    with Catalog.open(db) as cat:
        assert "notes" not in columns(cat)["saes"]


# --------------------------------------------------------------------------- 2. commit_sae


def test_commit_writes_saes_features_pairs_release_and_run(db, dec_a):
    features = features_table(dec_a, seed=5)
    pairs = pairs_table([0, 0, 3, 10], [1, 7, 7, 499], [5, 2, 9, 1])
    row = sae_row("local", "a", dec_a)
    with writer(db) as cat:
        run = cat.start_run("local", "a", {"block_size": 256}, "hash-1")
        key = cat.commit_sae(row, features, pairs, {"release": "local", "model": "gpt2"}, run)
    with Catalog.open(db) as cat:
        got = cat.con.execute(f"SELECT {', '.join(row)} FROM saes WHERE sae = ?", [key]).fetchall()
        assert got == [tuple(row.values())]
        assert np.array_equal(cat.decoders(key), dec_a)
        stats = cat.con.execute(
            "SELECT feature, decoder_norm, fire_count, block_count, max_activation, mean_activation "
            "FROM features WHERE sae = ? ORDER BY feature", [key]).fetchall()
        pair_rows = cat.con.execute("SELECT sae, i, j, n11 FROM cooccurrence ORDER BY i, j").fetchall()
        releases = cat.con.execute("SELECT release, model FROM releases").fetchall()
        runs = cat.con.execute(
            "SELECT run, status, n_documents, n_tokens, finished_at IS NOT NULL FROM ingest_runs").fetchall()
    assert [r[0] for r in stats] == list(range(D_SAE))
    np.testing.assert_array_equal(np.array([r[1] for r in stats], dtype=np.float32),
                                  features.column("decoder_norm").to_numpy())
    assert [r[2] for r in stats] == features.column("fire_count").to_pylist()
    assert [r[3] for r in stats] == features.column("block_count").to_pylist()
    np.testing.assert_array_equal(np.array([r[4] for r in stats], dtype=np.float32),
                                  features.column("max_activation").to_numpy())
    assert pair_rows == [(key, 0, 1, 5), (key, 0, 7, 2), (key, 3, 7, 9), (key, 10, 499, 1)]
    assert releases == [("local", "gpt2")]
    assert runs == [(run, "done", 17, 12345, True)]


def test_recommit_keeps_key_and_replaces_rows(db, dec_a, dec_b):
    key_a = commit(db, dec_a, "local", "a")
    key_b = commit(db, dec_b, "local", "b", pairs=pairs_table([1], [2], [3]))
    before_b = dump(db)
    new_dec = random_decoders(9, n=300)
    again = commit(db, new_dec, "local", "a", pairs=pairs_table([4], [5], [6]),
                   ingested_at=BASE_TIME + timedelta(days=1))
    assert again == key_a != key_b
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT sae, sae_id, d_sae, ingested_at FROM saes ORDER BY sae").fetchall() == [
            (key_a, "a", 300, BASE_TIME + timedelta(days=1)), (key_b, "b", 200, BASE_TIME)]
        assert cat.con.execute("SELECT sae, count(*), count(DISTINCT feature), max(feature) FROM features "
                               "GROUP BY sae ORDER BY sae").fetchall() == [(key_a, 300, 300, 299), (key_b, 200, 200, 199)]
        assert np.array_equal(cat.decoders(key_a), new_dec)
        assert np.array_equal(cat.decoders(key_b), dec_b)
        assert cat.con.execute("SELECT sae, i, j, n11 FROM cooccurrence ORDER BY sae").fetchall() == [
            (key_a, 4, 5, 6), (key_b, 1, 2, 3)]
        assert cat.con.execute("SELECT release FROM releases").fetchall() == [("local",)]
    # A new SAE still gets a fresh key, never the re-committed one.
    key_c = commit(db, dec_b, "local", "c")
    assert key_c not in (key_a, key_b)
    assert dump(db)["features"] != before_b["features"]


def test_failed_commit_on_empty_catalog_leaves_nothing(db, dec_a):
    bad_pairs = pa.table({"i": pa.array([0], pa.int32()), "jj": pa.array([1], pa.int32()),
                          "n11": pa.array([1], pa.int64())})
    with writer(db) as cat:
        empty = {t: cat.con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in QUERYABLE_TABLES}
        assert set(empty.values()) == {0}
        with pytest.raises(Exception):
            cat.commit_sae(sae_row("local", "a", dec_a), features_table(dec_a), bad_pairs,
                           {"release": "local"})
        # The writer is usable again: no transaction was left open.
        assert cat.con.execute("SELECT count(*) FROM saes").fetchall() == [(0,)]
    after = dump(db)
    for table in QUERYABLE_TABLES:
        assert after[table] == [], table
    # And a correct commit afterwards works.
    key = commit(db, dec_a)
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT count(*) FROM features WHERE sae = ?", [key]).fetchall() == [(D_SAE,)]


def test_failed_recommit_leaves_catalog_exactly_as_before(db, dec_a):
    key = commit(db, dec_a)
    with writer(db) as cat:
        run = cat.start_run("local", "a", {"x": 1}, "hash-2")
    before = dump(db)
    bad_pairs = pa.table({"i": pa.array([0], pa.int32()), "jj": pa.array([1], pa.int32()),
                          "n11": pa.array([1], pa.int64())})
    new_dec = random_decoders(3, n=100)
    with writer(db) as cat:
        with pytest.raises(Exception):
            cat.commit_sae(sae_row("local", "a", new_dec, BASE_TIME + timedelta(days=2)), features_table(new_dec),
                           bad_pairs, {"release": "local-new"}, run)
    assert dump(db) == before
    with Catalog.open(db) as cat:
        assert np.array_equal(cat.decoders(key), dec_a)
        assert cat.con.execute("SELECT status FROM ingest_runs WHERE run = ?", [run]).fetchall() == [("running",)]


# --------------------------------------------------------------------------- 3. FAISS vs numpy


def test_neighbors_equal_exact_numpy(db, dec_a):
    key = commit(db, dec_a)
    with Catalog.open(db) as cat:
        for feature in (0, 3, 7, 250, 499):
            hits = cat.neighbors(key, feature, 10)
            assert len(hits) == 10
            assert feature not in [h[1] for h in hits]
            assert_hits_equal(hits, key, dec_a, feature, 10)
        planted = cat.neighbors(key, 3, 2)
        everything = cat.neighbors(key, 3, D_SAE - 1)
        with pytest.raises(SaecatError, match="out of range"):
            cat.neighbors(key, D_SAE, 3)
    # The planted structure: 7 (a rescaled near-copy) first, then 42; -dec[3] is the very last.
    assert [h[1] for h in planted] == [7, 42]
    assert planted[0][2] > 0.99
    assert len(everything) == D_SAE - 1 and sorted(h[1] for h in everything) == [f for f in range(D_SAE) if f != 3]
    assert everything[-1][1] == 11 and everything[-1][2] == pytest.approx(-1.0, abs=1e-5)
    # All 499 have near-ties somewhere, so compare cosines, not the order inside a tie.
    unit = dec_a.astype(np.float64) / np.linalg.norm(dec_a.astype(np.float64), axis=1, keepdims=True)
    exact = unit @ unit[3]
    got_cos = np.array([h[2] for h in everything])
    np.testing.assert_allclose(got_cos, exact[[h[1] for h in everything]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_cos, np.sort(np.delete(exact, 3))[::-1], atol=1e-5, rtol=0)


def test_batch_search_equals_per_query_numpy(db, dec_a):
    key = commit(db, dec_a)
    rng = np.random.default_rng(77)
    queries = (rng.standard_normal((64, D_IN)) * rng.uniform(0.1, 10, (64, 1))).astype(np.float32)
    with Catalog.open(db) as cat:
        index = cat.index(key)
        sae, feats, cos = index.search(queries, 8)
        one_sae, one_feat, one_cos = index.search(queries[5], 8)  # a single 1-D query
        with pytest.raises(SaecatError, match="dimension"):
            index.search(np.ones((2, D_IN + 1), np.float32), 3)
    assert sae.shape == feats.shape == cos.shape == (64, 8)
    assert (sae == key).all()
    for n, q in enumerate(queries):
        want, want_cos = exact_topk(dec_a, q, 8)
        assert feats[n].tolist() == want.tolist(), n
        np.testing.assert_allclose(cos[n], want_cos, atol=1e-5, rtol=0)
    assert one_feat[0].tolist() == feats[5].tolist()
    np.testing.assert_allclose(one_cos[0], cos[5], atol=1e-6)


def test_ids_decode_to_the_right_sae_with_two_saes(db, dec_a, dec_b, two_saes):
    key_a, key_b = two_saes
    assert key_a != key_b
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((10, D_IN)).astype(np.float32)
    with Catalog.open(db) as cat:
        res_a = cat.index(key_a).search(queries, 6)
        res_b = cat.index(key_b).search(queries, 6)
        hits_b = cat.neighbors(key_b, 3, 5)
        hits_a = cat.neighbors(key_a, 3, 5)
    assert (res_a[0] == key_a).all() and (res_b[0] == key_b).all()
    assert_hits_equal(hits_b, key_b, dec_b, 3, 5)
    assert_hits_equal(hits_a, key_a, dec_a, 3, 5)
    # Merging the two result lists by cosine equals exact search over both SAEs' labelled rows.
    both = np.vstack([dec_a, dec_b])
    labels = [(key_a, f) for f in range(len(dec_a))] + [(key_b, f) for f in range(len(dec_b))]
    for n, q in enumerate(queries):
        merged = sorted(
            [(float(c), int(s), int(f)) for r in (res_a, res_b) for s, f, c in zip(r[0][n], r[1][n], r[2][n])],
            reverse=True)[:6]
        want, want_cos = exact_topk(both, q, 6)
        assert [(s, f) for _, s, f in merged] == [labels[i] for i in want]
        np.testing.assert_allclose([c for c, _, _ in merged], want_cos, atol=1e-5, rtol=0)


def test_id_encoding_round_trips():
    features = np.array([0, 1, 499, 2**31, 2**32 - 1], dtype=np.int64)
    for sae in (1, 2, 7, 100_000):
        ids = encode_ids(sae, features)
        assert len(set(ids.tolist())) == len(features)
        s, f = decode_ids(ids)
        assert s.tolist() == [sae] * len(features)
        assert f.tolist() == features.tolist()
    s, f = decode_ids(np.array([-1, encode_ids(3, np.array([9]))[0]]))
    assert s.tolist() == [-1, 3] and f.tolist() == [-1, 9]


# --------------------------------------------------------------------------- 4. index persistence


def _index_files(db: Path, key: int) -> tuple[Path, Path]:
    folder = Path(str(db) + ".d") / "indexes"
    return folder / f"sae-{key}.faiss", folder / f"sae-{key}.json"


def test_index_files_live_beside_the_catalog_and_are_reused(db, dec_a):
    key = commit(db, dec_a)
    index_path, meta_path = _index_files(db, key)
    assert not index_path.exists()
    with Catalog.open(db) as cat:
        assert VectorIndex.paths(cat, key) == (index_path, meta_path)
        cat.neighbors(key, 0, 3)
    assert index_path.is_file() and meta_path.is_file()
    meta = json.loads(meta_path.read_text())
    assert str(BASE_TIME) in meta["fingerprint"] and f"sae={key}" in meta["fingerprint"]
    stamp = index_path.stat().st_mtime_ns, index_path.stat().st_ino
    INDEXES.clear()  # as in a new process
    with Catalog.open(db) as cat:  # loaded from the file, not rebuilt
        hits = cat.neighbors(key, 250, 10)
    assert (index_path.stat().st_mtime_ns, index_path.stat().st_ino) == stamp
    assert_hits_equal(hits, key, dec_a, 250, 10)


def test_deleted_index_is_rebuilt(db, dec_a):
    key = commit(db, dec_a)
    index_path, meta_path = _index_files(db, key)
    with Catalog.open(db) as cat:
        cat.index(key)
    index_path.unlink()
    INDEXES.clear()  # as in a new process
    with Catalog.open(db) as cat:
        hits = cat.neighbors(key, 3, 10)
    assert index_path.is_file()
    assert_hits_equal(hits, key, dec_a, 3, 10)
    meta_path.unlink()
    index_path.unlink()
    INDEXES.clear()
    with Catalog.open(db) as cat:
        hits = cat.neighbors(key, 4, 10)
    assert index_path.is_file() and meta_path.is_file()
    assert_hits_equal(hits, key, dec_a, 4, 10)


def test_recommit_makes_the_index_stale(db, dec_a):
    key = commit(db, dec_a)
    index_path, meta_path = _index_files(db, key)
    with Catalog.open(db) as cat:
        old_hits = cat.neighbors(key, 0, 10)
    old_meta = meta_path.read_text()
    new_dec = random_decoders(11)
    assert commit(db, new_dec, ingested_at=BASE_TIME + timedelta(minutes=5)) == key
    assert meta_path.read_text() == old_meta  # the old files are still there ...
    with Catalog.open(db) as cat:
        new_hits = cat.neighbors(key, 0, 10)
        batch = cat.index(key).search(new_dec[:20], 5)
    # ... but the search reflects the new decoders
    assert_hits_equal(new_hits, key, new_dec, 0, 10)
    assert [h[1] for h in new_hits] != [h[1] for h in old_hits]
    assert batch[1][:, 0].tolist() == list(range(20))
    assert meta_path.read_text() != old_meta
    assert str(BASE_TIME + timedelta(minutes=5)) in json.loads(meta_path.read_text())["fingerprint"]
    # A re-commit that shrinks the SAE: the index follows, and out-of-range features are refused.
    small = random_decoders(12, n=60)
    commit(db, small, ingested_at=BASE_TIME + timedelta(minutes=10))
    with Catalog.open(db) as cat:
        assert cat.index(key).faiss.ntotal == 60
        assert_hits_equal(cat.neighbors(key, 59, 5), key, small, 59, 5)
        with pytest.raises(SaecatError, match="out of range"):
            cat.neighbors(key, 60, 5)


def test_a_used_index_stays_in_memory_until_the_sae_changes(db, dec_a):
    key = commit(db, dec_a)
    index_path, _ = _index_files(db, key)
    with Catalog.open(db) as cat:
        first = cat.index(key)
    index_path.unlink()  # not read again while the process keeps it
    with Catalog.open(db) as cat:
        assert cat.index(key) is first
        assert_hits_equal(cat.neighbors(key, 7, 10), key, dec_a, 7, 10)
    assert not index_path.exists()
    new_dec = dec_a[::-1].copy()
    commit(db, new_dec, ingested_at=BASE_TIME + timedelta(hours=1))  # a re-ingestion: a new fingerprint
    with Catalog.open(db) as cat:
        assert cat.index(key) is not first
        assert_hits_equal(cat.neighbors(key, 7, 10), key, new_dec, 7, 10)


def test_index_cache_drops_the_least_recently_used_past_its_budget(dec_a):
    made = {name: VectorIndex.build(n, dec_a) for n, name in enumerate("abc")}
    cache = IndexCache(max_bytes=2 * made["a"].nbytes)
    for name in "ab":
        assert cache.get(name, lambda: made[name]) is made[name]
    cache.get("a", lambda: pytest.fail("a is cached"))  # a is now the most recently used
    cache.get("c", lambda: made["c"])  # over budget: b goes
    assert cache.get("a", lambda: pytest.fail("a stays")) is made["a"]
    rebuilt = VectorIndex.build(9, dec_a)
    assert cache.get("b", lambda: rebuilt) is rebuilt


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "bad-json"])
def test_corrupted_index_is_rebuilt(db, dec_a, damage):
    key = commit(db, dec_a)
    index_path, meta_path = _index_files(db, key)
    with Catalog.open(db) as cat:
        cat.index(key)
    data = index_path.read_bytes()
    if damage == "garbage":
        index_path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "truncated":
        index_path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        index_path.write_bytes(b"")
    else:
        meta_path.write_text("{not json")
    INDEXES.clear()  # as in a new process
    with Catalog.open(db) as cat:
        hits = cat.neighbors(key, 3, 10)
    assert_hits_equal(hits, key, dec_a, 3, 10)
    assert index_path.read_bytes() == data  # rebuilt from the catalog, byte for byte what was there
    assert json.loads(meta_path.read_text())["fingerprint"].startswith(f"sae={key};")


# --------------------------------------------------------------------------- 5. sandbox SQL


@pytest.fixture
def ro(db, two_saes):
    with Catalog.open(db) as cat:
        yield cat


def test_sandbox_allows_selects_ctes_joins_unions(ro, two_saes, dec_a):
    key_a, key_b = two_saes
    assert ro.sql("SELECT sae_id, d_sae, d_in FROM saes ORDER BY sae").rows == [("a", 500, 32), ("layer_2", 200, 32)]
    assert ro.sql(
        "WITH big AS (SELECT sae FROM saes WHERE d_sae > 300) "
        "SELECT count(*) FROM features JOIN big USING (sae)").rows == [(500,)]
    assert ro.sql(
        "SELECT s.sae_id, count(*) AS n, sum(c.n11) FROM saes s JOIN cooccurrence c ON c.sae = s.sae "
        "GROUP BY s.sae_id ORDER BY s.sae_id").rows == [("a", 3, 16), ("layer_2", 2, 23)]
    assert ro.sql("SELECT release FROM saes UNION SELECT release FROM releases ORDER BY 1").rows == [
        ("local",), ("other/repo",)]
    assert ro.sql("SELECT sae FROM saes UNION ALL SELECT sae FROM saes ORDER BY 1").rows == [
        (key_a,), (key_a,), (key_b,), (key_b,)]
    norm = ro.sql(f"SELECT decoder_norm FROM features WHERE sae = {key_a} AND feature = 3").rows[0][0]
    assert norm == pytest.approx(float(np.linalg.norm(dec_a[3])), rel=1e-6)
    assert ro.sql("SELECT (SELECT max(feature) FROM features f WHERE f.sae = s.sae) FROM saes s "
                  "ORDER BY sae").rows == [(499,), (199,)]


def test_sandbox_postgres_dialect_is_transpiled(ro):
    # '#' is PostgreSQL's bitwise XOR; DuckDB's own dialect does not even parse it.
    assert ro.sql("SELECT 5 # 3 AS x", dialect="postgres").rows == [(6,)]
    with pytest.raises(SaecatError, match="malformed"):
        ro.sql("SELECT 5 # 3 AS x")
    # set-returning generate_series, TO_CHAR with a postgres pattern, ::text casts, ILIKE, LIMIT ALL
    assert ro.sql("SELECT generate_series(1, 3) AS g", dialect="postgres").rows == [(1,), (2,), (3,)]
    assert ro.sql("SELECT TO_CHAR(DATE '2020-03-01', 'YYYY')", dialect="postgres").rows == [("2020",)]
    assert ro.sql("SELECT d_sae::text || '/' || d_in::text FROM saes WHERE sae_id ILIKE 'LAYER%' LIMIT ALL",
                  dialect="postgres").rows == [("200/32",)]
    assert check_query("SELECT 5 # 3", dialect="postgres") == "SELECT XOR(5, 3)"


def test_sandbox_max_rows_truncates(ro, two_saes):
    key_a, _ = two_saes
    q = f"SELECT feature FROM features WHERE sae = {key_a} ORDER BY feature DESC"
    assert ro.sql(q, max_rows=7).rows == [(f,) for f in range(499, 492, -1)]
    assert len(ro.sql(q, max_rows=10_000).rows) == 500
    assert ro.sql(q, max_rows=0).rows == []
    assert len(ro.sql(q).rows) == 500


REFUSED = [
    ("SELECT 1; SELECT 2", "one sql statement"),
    ("SELECT * FROM saes; DROP TABLE saes", "one sql statement"),
    ("INSERT INTO releases (release) VALUES ('x')", "insert"),
    ("UPDATE saes SET status = 'x'", "update"),
    ("DELETE FROM features", "delete"),
    ("CREATE TABLE t AS SELECT 1", "create"),
    ("DROP TABLE saes", "drop"),
    ("ATTACH '/tmp/other.duckdb' AS other", "attach"),
    ("COPY saes TO '/tmp/saes.csv'", "copy"),
    ("INSTALL httpfs", "install"),
    ("LOAD httpfs", "load"),
    ("PRAGMA database_list", "pragma"),
    ("SET threads = 1", "set"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
    ("select * from READ_CSV_AUTO('/etc/passwd')", "read_csv_auto"),
    ("SELECT * FROM '/etc/passwd'", "/etc/passwd"),
    ("SELECT * FROM read_parquet('/tmp/x.parquet')", "read_parquet"),
    ("SELECT * FROM glob('/etc/*')", "glob"),
    ("SELECT getenv('HOME')", "getenv"),
    ("SELECT sae FROM saes WHERE release = GETENV('USER')", "getenv"),
    ("WITH x AS (SELECT * FROM read_csv('/etc/passwd')) SELECT * FROM x", "read_csv"),
    ("SELECT * FROM saes WHERE sae IN (SELECT 1 FROM read_parquet('/tmp/x.parquet'))", "read_parquet"),
    ("SELECT * FROM saes s JOIN '/etc/passwd' p ON true", "/etc/passwd"),
    ("SELECT * FROM no_such_table", "no_such_table"),
    ("SELECT * FROM saes JOIN secrets USING (sae)", "secrets"),
    ("SELEC sae FROM saes", "malformed"),
    ("SELECT FROM WHERE", "malformed"),
    ("SELECT (1", "malformed"),
]


@pytest.mark.parametrize("query,named", REFUSED, ids=[q for q, _ in REFUSED])
def test_sandbox_refuses(ro, query, named):
    with pytest.raises(SaecatError) as direct:
        check_query(query)
    assert named in str(direct.value).lower(), str(direct.value)
    with pytest.raises(SaecatError) as via_catalog:
        ro.sql(query)
    assert str(via_catalog.value) == str(direct.value)
    # Nothing happened: the catalog still answers as before.
    assert ro.sql("SELECT count(*) FROM saes").rows == [(2,)]


def test_read_only_connection_is_itself_sandboxed(db, two_saes, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    # Control: the same read works on an ordinary (writer) connection, so the refusal below is the sandbox.
    with writer(db) as cat:
        assert cat.con.execute(f"SELECT * FROM read_csv('{secret}')").fetchall() == [(1, 2)]
    with Catalog.open(db) as cat:
        for path in (secret, "/etc/hostname"):
            with pytest.raises(duckdb.Error):
                cat.con.execute(f"SELECT * FROM read_csv('{path}')").fetchall()
        with pytest.raises(duckdb.Error):
            cat.con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error):
            cat.con.execute("RESET lock_configuration")
        with pytest.raises(duckdb.Error):
            cat.con.execute(f"SELECT * FROM read_csv('{secret}')").fetchall()
        assert cat.con.execute("SELECT current_setting('enable_external_access')").fetchall() == [(False,)]


# --------------------------------------------------------------------------- 6. CLI


def _runner():
    from typer.testing import CliRunner

    return CliRunner()


def _invoke(args: list[str], env: dict | None = None):
    from queries.front.cli import app

    result = _runner().invoke(app, args, env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _subprocess(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SAECAT_DB"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", "from queries.front.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_cli_sql_json_returns_exact_values(db, two_saes, dec_a):
    key_a, key_b = two_saes
    result = _invoke(["sql", "SELECT sae, sae_id, d_sae, threshold, ingested_at FROM saes ORDER BY sae",
                      "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"sae": key_a, "sae_id": "a", "d_sae": 500, "threshold": 0.0, "ingested_at": BASE_TIME.isoformat()},
        {"sae": key_b, "sae_id": "layer_2", "d_sae": 200, "threshold": 0.0,
         "ingested_at": (BASE_TIME + timedelta(hours=1)).isoformat()},
    ]
    result = _invoke(["sql", f"SELECT feature, decoder_norm, decoder FROM features WHERE sae = {key_a} "
                      "AND feature IN (3, 7) ORDER BY feature", "--db", str(db), "--json"])
    rows = json.loads(result.stdout)
    assert [r["feature"] for r in rows] == [3, 7]
    for r in rows:
        assert r["decoder_norm"] == pytest.approx(float(np.linalg.norm(dec_a[r["feature"]])), rel=1e-6)
        np.testing.assert_array_equal(np.array(r["decoder"], dtype=np.float32), dec_a[r["feature"]])
    result = _invoke(["sql", "SELECT 5 # 3 AS x", "--dialect", "postgres", "--db", str(db), "--json"])
    assert json.loads(result.stdout) == [{"x": 6}]
    result = _invoke(["sql", f"SELECT feature FROM features WHERE sae = {key_a} ORDER BY feature",
                      "--max-rows", "4", "--db", str(db), "--json"])
    assert json.loads(result.stdout) == [{"feature": f} for f in range(4)]


def test_cli_saes_json(db, two_saes):
    key_a, key_b = two_saes
    result = _invoke(["saes", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert [(r["sae"], r["release"], r["sae_id"], r["d_in"], r["d_sae"], r["status"], r["n_tokens"],
             r["hook_name"], r["ingested_at"]) for r in got] == [
        (key_a, "local", "a", 32, 500, "ready", 12345, "blocks.1.hook_resid_pre", BASE_TIME.isoformat()),
        (key_b, "other/repo", "layer_2", 32, 200, "ready", 12345, "blocks.1.hook_resid_pre",
         (BASE_TIME + timedelta(hours=1)).isoformat()),
    ]


def test_cli_neighbors_json_equals_numpy(db, two_saes, dec_b):
    _, key_b = two_saes
    result = _invoke(["neighbors", "3", "--release", "other/repo", "--sae-id", "layer_2", "-k", "3",
                      "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    want, want_cos = exact_topk(dec_b, dec_b[3], 3, exclude=3)
    assert [(r["sae"], r["feature"]) for r in got] == [(key_b, int(f)) for f in want]
    np.testing.assert_allclose([r["cosine"] for r in got], want_cos, atol=1e-5, rtol=0)


def _main(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run the real entry point (`saecat` = queries.front.cli:main) in-process: (exit code, stdout, stderr)."""
    from queries.front.cli import main

    monkeypatch.setattr(sys, "argv", ["saecat", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args,named", [
    (["sql", "DELETE FROM saes"], "delete"),
    (["sql", "SELECT * FROM read_csv('/etc/passwd')"], "read_csv"),
    (["sql", "SELECT 1; SELECT 2"], "one sql statement"),
    (["sql", "SELEC 1"], "malformed"),
    (["neighbors", "3", "--release", "local", "--sae-id", "nope"], "nope"),
    (["neighbors", "900", "--release", "local", "--sae-id", "a"], "out of range"),
])
def test_cli_refusal_is_one_line_and_exit_1(db, two_saes, capsys, monkeypatch, args, named):
    code, stdout, stderr = _main([*args, "--db", str(db)], capsys, monkeypatch)
    assert code == 1, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0].replace(str(db), "<db>")  # the tmp path itself contains the test's name
    assert line.startswith("error: ") and named in line.lower(), line
    assert stdout == ""
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT count(*) FROM saes").fetchall() == [(2,)]


def test_cli_refusal_in_a_real_process(db, two_saes, tmp_path):
    proc = _subprocess(["sql", "INSERT INTO releases (release) VALUES ('x')", "--db", str(db)], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: only SELECT queries are allowed, not INSERT"]
    assert proc.stdout == ""
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT count(*) FROM releases").fetchall() == [(2,)]


def test_cli_missing_catalog_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --db, no $SAECAT_DB, no ./saecat.duckdb
    code, stdout, stderr = _main(["saes", "--json"], capsys, monkeypatch)
    assert code == 1
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith("error: no catalog at saecat.duckdb")
    assert stdout == ""
    assert not (tmp_path / "saecat.duckdb").exists()


def test_cli_db_option_and_env_var_select_the_catalog(tmp_path, dec_b):
    cat_a, cat_b, cat_default = tmp_path / "a.duckdb", tmp_path / "b.duckdb", tmp_path / "saecat.duckdb"
    commit(cat_a, dec_b, "local", "from-a")
    commit(cat_b, dec_b, "local", "from-b")
    commit(cat_default, dec_b, "local", "from-default")
    query = ["sql", "SELECT sae_id FROM saes", "--json"]

    def ids(result) -> list[str]:
        assert result.exit_code == 0, result.output
        return [r["sae_id"] for r in json.loads(result.stdout)]

    assert ids(_invoke([*query, "--db", str(cat_a)])) == ["from-a"]
    assert ids(_invoke([*query, "--db", str(cat_b)])) == ["from-b"]
    assert ids(_invoke(query, env={"SAECAT_DB": str(cat_a)})) == ["from-a"]
    assert ids(_invoke(query, env={"SAECAT_DB": str(cat_b)})) == ["from-b"]
    assert ids(_invoke([*query, "--db", str(cat_b)], env={"SAECAT_DB": str(cat_a)})) == ["from-b"]  # flag wins
    assert ids(_invoke(["saes", "--json"], env={"SAECAT_DB": str(cat_b)})) == ["from-b"]
    # In a real process: the env var, and ./saecat.duckdb when neither it nor --db is given.
    proc = _subprocess(query, cwd=tmp_path, env_extra={"SAECAT_DB": str(cat_a)})
    assert proc.returncode == 0, proc.stderr
    assert [r["sae_id"] for r in json.loads(proc.stdout)] == ["from-a"]
    proc = _subprocess(query, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["sae_id"] for r in json.loads(proc.stdout)] == ["from-default"]
