"""Every way of naming an SAE and a dataset leads to the same catalog rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest
from conftest import HOOK, hub_cache_put

from catalog import Catalog
from ingest import IngestOptions, ingest, resolve_source
from ingest.sources import load_sae

OPTS = dict(block_size=32, max_doc_tokens=200, progress=False)


def feature_table(db) -> np.ndarray:
    with Catalog.open(db) as cat:
        return np.array(cat.con.execute(
            "SELECT feature, fire_count, block_count, max_activation FROM features ORDER BY feature").fetchall())


def saes_row(db) -> dict:
    with Catalog.open(db) as cat:
        rel = cat.con.sql("SELECT * FROM saes")
        return dict(zip(rel.columns, rel.fetchall()[0]))


@pytest.fixture(scope="module")
def local_reference(sae_dirs, corpus, tmp_path_factory):
    db = tmp_path_factory.mktemp("ref") / "ref.duckdb"
    ingest(resolve_source(None, None, str(sae_dirs["standard"])), IngestOptions(dataset=str(corpus), **OPTS), db=db)
    return db


def test_local_folder_names_and_model(local_reference, sae_dirs):
    row = saes_row(local_reference)
    assert (row["release"], row["sae_id"]) == ("local", "standard")
    assert row["source"] == str(sae_dirs["standard"])
    assert row["model"] == row["activation_model"] == "gpt2"  # the SAE's own model, from the hub cache
    assert row["architecture"] == "standard" and row["hook_name"] == HOOK and row["layer"] == 1
    assert row["decoder_folded"] is False and row["neuronpedia_id"] is None


def test_registry_release_via_hub_cache(registry_sae, corpus, local_reference, db):
    release, sae_id = registry_sae
    loaded = load_sae(resolve_source(release, sae_id, None))
    # the registry asks for this model processing; it must reach the model loader
    assert loaded.model_kwargs == {"center_writing_weights": True}
    ingest(resolve_source(release, sae_id, None), IngestOptions(dataset=str(corpus), **OPTS), db=db)
    row = saes_row(db)
    assert (row["release"], row["sae_id"], row["neuronpedia_id"]) == (release, sae_id, "gpt2-small/1-res-jb")
    with Catalog.open(db) as cat:  # Neuronpedia's modelId/sourceId/index
        assert cat.sql("SELECT feature_ref FROM labelled_features WHERE feature = 5").rows == [
            ("gpt2-small/1-res-jb/5",)]
    registry, local = feature_table(db), feature_table(local_reference)
    np.testing.assert_array_equal(registry[:, 0], local[:, 0])
    assert not np.array_equal(registry[:, 1], local[:, 1]), "centred writing weights change the activations"
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT release, repo_id, model FROM releases").fetchall() == [
            (release, "jbloom/GPT2-Small-SAEs-Reformatted", "gpt2-small")]


def test_hub_repo_and_path(sae_dirs, corpus, local_reference, db):
    hub_cache_put("someone/my-saes", {f"layer1/{p.name}": p for p in sae_dirs["standard"].iterdir()})
    ingest(resolve_source("someone/my-saes", "layer1", None), IngestOptions(dataset=str(corpus), **OPTS), db=db)
    row = saes_row(db)
    assert (row["release"], row["sae_id"]) == ("someone/my-saes", "layer1")
    np.testing.assert_array_equal(feature_table(db), feature_table(local_reference))


def test_explicit_local_model_folder_matches_hub_model(sae_dirs, model_dir, corpus, local_reference, db):
    ingest(resolve_source(None, None, str(sae_dirs["standard"])),
           IngestOptions(dataset=str(corpus), model=str(model_dir), **OPTS), db=db)
    assert saes_row(db)["activation_model"] == str(model_dir)
    np.testing.assert_allclose(feature_table(db), feature_table(local_reference), rtol=1e-5)


def test_fold_decoder_norm_is_recorded_and_applied(sae_dirs, corpus, db):
    ingest(resolve_source(None, None, str(sae_dirs["standard"])),
           IngestOptions(dataset=str(corpus), fold_decoder_norm=True, **OPTS), db=db)
    assert saes_row(db)["decoder_folded"] is True
    with Catalog.open(db) as cat:
        norms = np.array(cat.con.execute("SELECT decoder_norm FROM features").fetchall()).ravel()
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "txt"])
def test_dataset_formats_give_the_same_counts(fmt, sae_dirs, corpus, local_reference, tmp_path, db):
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    if fmt == "parquet":
        pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet")
        spec, column = str(tmp_path / "docs.parquet"), "body"
    elif fmt == "csv":
        pa.csv.write_csv(pa.table({"text": texts}), tmp_path / "docs.csv")
        spec, column = str(tmp_path / "docs.csv"), "text"
    else:  # one document per file, in sorted file order
        folder = tmp_path / "docs"
        folder.mkdir()
        for n, text in enumerate(texts):
            (folder / f"{n:04d}.txt").write_text(text)
        spec, column = str(folder), "text"
    ingest(resolve_source(None, None, str(sae_dirs["standard"])),
           IngestOptions(dataset=spec, text_column=column, **OPTS), db=db)
    np.testing.assert_array_equal(feature_table(db), feature_table(local_reference))
    assert saes_row(db)["n_documents"] == len(texts)
