"""`saecat search` and GET /search: features by the meaning of their explanations, against a brute-force
numpy reference (every explanation embedded by sentence-transformers directly, cosine, each
feature's best),
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
from ingest.neuronpedia import import_neuronpedia
from neuronpedia_fixture import expected_source, make_source, write_export
from test_counts import BLOCK, MAX_DOC
from test_robustness import run_cli

EXPLANATIONS = ["the keyword def starting a function", "closing parentheses at the end of a call",
                "numbers and digits", "commas separating arguments", "the word json in module names",
                "indentation at the start of a line", "string quotes around text", "import statements",
                "punctuation at the end of sentences", "names of email headers", "decimal numbers in prose",
                "python code comments"]
QUERIES = ["python code", "punctuation", "numbers"]
SOURCE = make_source(source_id="3-res-search", n_features=30, seed=5, explanations_per_feature=(1, 2))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, sae_dirs, corpus) -> Path:
    """An ingested SAE with explanations written as `saecat explain` writes them, and a Neuronpedia
    export imported as users import one (an SAE of its own, with Neuronpedia's explanations)."""
    root = tmp_path_factory.mktemp("search")
    db = root / "catalog.duckdb"
    ingest(resolve_source(None, None, str(sae_dirs["standard"])),
           IngestOptions(dataset=str(corpus), block_size=BLOCK, max_doc_tokens=MAX_DOC, progress=False), db=db)
    with writer(db) as cat, cat.transaction() as con:
        con.executemany("INSERT INTO feature_explanations (sae, feature, explainer, method, explanation, score) "
                        "VALUES (1, ?, 'm', 'token-act-pair/1', ?, ?)",
                        [[f, text, f / 20] for f, text in enumerate(EXPLANATIONS)])
    [done] = import_neuronpedia(write_export(root / "v1", SOURCE, "A"), db)
    assert done.sae == 2 and done.n_explanations == len(imported_rows())
    return db


def imported_rows() -> list[tuple[int, int, str]]:
    return [(2, f.index, e.description) for f in expected_source(SOURCE, "A").features for e in f.explanations]


def all_rows() -> list[tuple[int, int, str]]:
    return [(1, f, t) for f, t in enumerate(EXPLANATIONS)] + imported_rows()


def reference(query: str, rows: list[tuple[int, int, str]]) -> dict[tuple[int, int], float]:
    """Each feature's best cosine between the query and its explanations, by sentence-transformers and numpy."""
    from sentence_transformers import SentenceTransformer

    from catalog.explanation_index import embedder_name

    model = SentenceTransformer(embedder_name(), device="cpu")
    vectors = model.encode([t for _, _, t in rows] + [query])
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    best: dict[tuple[int, int], float] = {}
    for (sae, feature, _), cosine in zip(rows, (vectors[:-1] @ vectors[-1]).tolist()):
        best[(sae, feature)] = max(cosine, best.get((sae, feature), -2.0))
    return best


def assert_top(hits: list[dict], best: dict[tuple[int, int], float], k: int) -> None:
    """The hits are k features, each at its best cosine, and no feature left out is nearer (ties
    between features with the same text may come in either order)."""
    assert len(hits) == min(k, len(best)) and len({(h["sae"], h["feature"]) for h in hits}) == len(hits)
    for h in hits:
        assert h["similarity"] == pytest.approx(best[(h["sae"], h["feature"])], abs=1e-5)
    assert [h["similarity"] for h in hits] == pytest.approx(sorted(best.values(), reverse=True)[:k], abs=1e-5)


@pytest.mark.parametrize("query", QUERIES)
def test_search_equals_brute_force_cosine(catalog, query):
    from queries.search import search

    with Catalog.open(catalog) as cat:
        hits = search(cat, query, k=8)
    assert_top(hits, reference(query, all_rows()), 8)
    texts = {(sae, feature): [] for sae, feature, _ in all_rows()}
    for sae, feature, text in all_rows():
        texts[(sae, feature)].append(text)
    for h in hits:
        assert h["explanation"] in texts[(h["sae"], h["feature"])]
        assert h["source"] == ("saecat" if h["sae"] == 1 else "neuronpedia")
        assert h["score"] == (pytest.approx(h["feature"] / 20) if h["sae"] == 1 else None)
        assert h["release"] == ("local" if h["sae"] == 1 else "neuronpedia:gpt2-small")
        assert h["density"] is not None


def test_filters_and_refresh(catalog):
    from queries.search import search

    with Catalog.open(catalog) as cat:
        with pytest.raises(NotFound, match="no SAE in the catalog is of release 'local' and model 'no-such-model'"):
            search(cat, "numbers", k=5, release="local", model="no-such-model")
        for release, rows in (("local", all_rows()[:len(EXPLANATIONS)]), ("neuronpedia:gpt2-small", imported_rows())):
            hits = search(cat, "numbers", k=50, release=release)
            assert_top(hits, reference("numbers", rows), 50)
        assert_top(search(cat, "numbers", k=50, model="gpt2-small"), reference("numbers", imported_rows()), 50)
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

    from queries.front.server import create_app

    done = run_cli("search", "numbers", "-k", "3", "--json", "--db", str(catalog), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    assert_top(cli, reference("numbers", all_rows()), 3)
    client = TestClient(create_app(catalog))
    reply = client.get("/search", params={"q": "numbers", "k": 3})
    assert reply.status_code == 200 and reply.json() == cli
    assert client.get("/search", params={"q": ""}).status_code == 422
    assert client.get("/search", params={"q": "x", "nope": 1}).status_code == 422
