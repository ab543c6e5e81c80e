from catalog import Catalog
from ingest import IngestOptions, ingest, resolve_source


def test_registry_path_default_model(registry_sae, model_dir, corpus, db):
    release, sae_id = registry_sae
    result = ingest(resolve_source(release, sae_id, None),
                    IngestOptions(dataset=str(corpus), block_size=32, progress=False), db=db)
    assert result.status == "ingested"
    with Catalog.open(db) as cat:
        row = cat.sql("SELECT neuronpedia_id, model, activation_model, n_tokens FROM saes").fetchall()[0]
    assert row[0] == "gpt2-small/1-res-jb"
    assert row[3] == result.n_tokens > 0
