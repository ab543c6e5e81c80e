"""`saecat search` and GET /search: features by the meaning of their explanations, against a brute-force
numpy reference (every explanation embedded by sentence-transformers directly, cosine, argsort),
over saecat's and Neuronpedia's explanations together, with the index refreshed when they change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from catalog import Catalog
from catalog.errors import NotFound
from catalog.store import writer
from ingest import IngestOptions, ingest, resolve_source
from test_counts import BLOCK, MAX_DOC
from test_robustness import run_cli

EXPLANATIONS = ["the keyword def starting a function", "closing parentheses at the end of a call",
                "numbers and digits", "commas separating arguments", "the word json in module names",
                "indentation at the start of a line", "string quotes around text", "import statements",
                "punctuation at the end of sentences", "names of email headers", "decimal numbers in prose",
                "python code comments"]
IMPORTED = ["digits inside version numbers", "the colon after a function signature"]
QUERIES = ["python code", "punctuation", "numbers"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, sae_dirs, corpus) -> Path:
    """Two SAEs of the fixture model; explanations on the first, written as `saecat explain` writes
    them, and rows of an imported Neuronpedia source on the second."""
    db = tmp_path_factory.mktemp("search") / "catalog.duckdb"
    for name in ("standard", "topk"):
        ingest(resolve_source(None, None, str(sae_dirs[name])),
               IngestOptions(dataset=str(corpus), block_size=BLOCK, max_doc_tokens=MAX_DOC, progress=False), db=db)
    with writer(db) as cat, cat.transaction() as con:
        con.executemany("INSERT INTO feature_explanations (sae, feature, explainer, method, explanation, score) "
                        "VALUES (1, ?, 'm', 'token-act-pair/1', ?, ?)",
                        [[f, text, f / 20] for f, text in enumerate(EXPLANATIONS)])
        con.executemany("INSERT INTO neuronpedia_explanations (sae, feature, id, description, type_name, "
                        "explanation_model_name, folder) VALUES (2, ?, ?, ?, 'oai_token-act-pair', 'gpt-4o-mini', "
                        "'explanations')", [[f, f"np{f}", text] for f, text in enumerate(IMPORTED)])
    return db


def reference(query: str, k: int, rows: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    from sentence_transformers import SentenceTransformer

    from catalog.explanation_index import embedder_name

    model = SentenceTransformer(embedder_name(), device="cpu")
    vectors = model.encode([t for _, _, t in rows] + [query])
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = vectors[:-1] @ vectors[-1]
    return [(rows[i][0], rows[i][1]) for i in np.argsort(-cosine, kind="stable")[:k]]


def all_rows() -> list[tuple[int, int, str]]:
    return [(1, f, t) for f, t in enumerate(EXPLANATIONS)] + [(2, f, t) for f, t in enumerate(IMPORTED)]


@pytest.mark.parametrize("query", QUERIES)
def test_search_equals_brute_force_cosine(catalog, query):
    from queries.search import search

    with Catalog.open(catalog) as cat:
        hits = search(cat, query, k=5)
    assert [(h["sae"], h["feature"]) for h in hits] == reference(query, 5, all_rows())
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1.0001 for s in sims)
    for h in hits:
        texts = EXPLANATIONS if h["sae"] == 1 else IMPORTED
        assert h["explanation"] == texts[h["feature"]]
        assert h["source"] == ("saecat" if h["sae"] == 1 else "neuronpedia")
        assert h["score"] == (pytest.approx(h["feature"] / 20) if h["sae"] == 1 else None)
        assert h["release"] == "local" and h["density"] is not None


def test_filters_and_refresh(catalog):
    from queries.search import search

    with Catalog.open(catalog) as cat:
        sae_id = cat.sae_by_key(2).sae_id
        with pytest.raises(NotFound, match="no SAE in the catalog is of release 'local' and model 'no-such-model'"):
            search(cat, "numbers", k=5, release="local", model="no-such-model")
        imported = [h for h in search(cat, "numbers", k=50) if h["sae"] == 2]
        assert [(h["sae"], h["feature"]) for h in imported] == [
            p for p in reference("numbers", 50, all_rows()) if p[0] == 2]
    assert sae_id
    # a new explanation is found by the next search, in the same process
    with writer(catalog) as cat, cat.transaction() as con:
        con.execute("INSERT INTO feature_explanations (sae, feature, explainer, method, explanation) "
                    "VALUES (1, 40, 'm', 'token-act-pair/1', 'prime numbers and arithmetic')")
    with Catalog.open(catalog) as cat:
        assert (search(cat, "arithmetic with numbers", k=1)[0]["feature"]) == 40
    with writer(catalog) as cat, cat.transaction() as con:
        con.execute("DELETE FROM feature_explanations WHERE feature = 40")


def test_cli_and_http(catalog, tmp_path):
    from fastapi.testclient import TestClient

    from queries.server import create_app

    done = run_cli("search", "numbers", "-k", "3", "--json", "--db", str(catalog), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cli = [(h["sae"], h["feature"]) for h in json.loads(done.stdout)]
    assert cli == reference("numbers", 3, all_rows())
    client = TestClient(create_app(catalog))
    reply = client.get("/search", params={"q": "numbers", "k": 3})
    assert reply.status_code == 200 and [(h["sae"], h["feature"]) for h in reply.json()] == cli
    assert client.get("/search", params={"q": ""}).status_code == 422
    assert client.get("/search", params={"q": "x", "nope": 1}).status_code == 422
