"""The HTTP API (`queries/front/server.py`, `saecat serve`): exact values through every endpoint, the SQL
gate through HTTP, the body limit and the token, a schema-driven fuzz, a catalog held by a writer,
and a real server answering while another process commits SAEs to the same file.

Catalogs are filled as in test_catalog: `commit` writes synthetic decoders through
`catalog.store.writer` / `Catalog.commit_sae`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from catalog import writer
from queries.front.server import create_app
from test_catalog import (BASE_TIME, D_IN, D_SAE, ROOT, _main, assert_hits_equal, commit, exact_topk,
                          features_table, random_decoders, sae_row)
from test_sql import ENDLESS, REFUSED_STATEMENTS

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_TOKENS = sae_row("local", "a", np.zeros((1, 1)))["n_tokens"]


def _env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that imports this checkout's code (and the test helpers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SAECAT_DB", "SAECAT_TOKEN")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return {**env, **extra}


@pytest.fixture
def decs() -> dict[str, np.ndarray]:
    return {"a": random_decoders(1), "b": random_decoders(2, n=200)}


@pytest.fixture
def keys(db, decs) -> dict[str, int]:
    """Two SAEs; the second is named like a hub repo's, with slashes in its release and its sae_id."""
    return {"a": commit(db, decs["a"], "local", "a", seed=1),
            "b": commit(db, decs["b"], "owner/repo", "layer/2", seed=2, ingested_at=BASE_TIME + timedelta(hours=1))}


@pytest.fixture
def client(db, keys) -> TestClient:
    return TestClient(create_app(db))


def sql(client: TestClient, query: str, **extra) -> httpx.Response:
    return client.post("/sql", json={"query": query, **extra})


# ------------------------------------------------------------------------------------ /sql


def test_sql_returns_exact_values(client, keys, decs):
    got = sql(client, "SELECT sae, release, sae_id, d_sae, threshold, ingested_at FROM saes ORDER BY sae")
    assert got.status_code == 200, got.text
    assert got.json() == {
        "columns": ["sae", "release", "sae_id", "d_sae", "threshold", "ingested_at"],
        "rows": [[keys["a"], "local", "a", 500, 0.0, BASE_TIME.isoformat()],
                 [keys["b"], "owner/repo", "layer/2", 200, 0.0, (BASE_TIME + timedelta(hours=1)).isoformat()]],
        "truncated": False,
    }
    got = sql(client, f"SELECT decoder, decoder_norm FROM features WHERE sae = {keys['a']} AND feature = 3").json()
    decoder, norm = got["rows"][0]
    np.testing.assert_array_equal(np.array(decoder, dtype=np.float32), decs["a"][3])
    assert np.float32(norm) == features_table(decs["a"]).column("decoder_norm")[3].as_py()
    assert sql(client, "SELECT 5 # 3 AS x", dialect="postgres").json()["rows"] == [[6]]
    # As `saecat sql --json` writes them: JSON has no NaN or infinity, decimals are numbers, dates text.
    assert sql(client, "SELECT 'nan'::DOUBLE, '-inf'::FLOAT, 1.25::DECIMAL(5, 2), DATE '2024-05-17'").json()["rows"] == [
        [None, None, 1.25, "2024-05-17"]]


def test_sql_max_rows_truncates_and_is_capped_by_the_server(db, client, keys):
    query = f"SELECT feature FROM features WHERE sae = {keys['a']} ORDER BY feature"
    assert sql(client, query, max_rows=4).json() == {"columns": ["feature"], "rows": [[0], [1], [2], [3]],
                                                      "truncated": True}
    exact = sql(client, query, max_rows=D_SAE).json()
    assert exact["rows"] == [[f] for f in range(D_SAE)] and exact["truncated"] is False
    assert sql(client, query, max_rows=0).json()["rows"] == []
    capped = TestClient(create_app(db, max_rows=7))
    for asked in ({}, {"max_rows": 1000}):
        got = sql(capped, query, **asked).json()
        assert got["rows"] == [[f] for f in range(7)] and got["truncated"] is True


@pytest.mark.parametrize("query,message", REFUSED_STATEMENTS, ids=[q for q, _ in REFUSED_STATEMENTS])
def test_sql_refuses_every_forbidden_statement_class_by_name(client, tmp_path, query, message):
    paths = {"canary": tmp_path / "canary.csv", "out": tmp_path / "out.duckdb"}
    paths["canary"].write_text("secret\n1\n")
    got = sql(client, query.format(**paths))
    assert got.status_code == 400, got.text
    assert got.json()["error"].lower() == message.format(**paths).lower()
    assert not paths["out"].exists()
    assert sql(client, "SELECT count(*) FROM saes").json()["rows"] == [[2]]


@pytest.mark.parametrize("query,named", [
    ("SELECT nosuch FROM saes", "nosuch"),
    ("SELECT CAST('abc' AS INTEGER)", "abc"),
    ("SELECT [1, 2][5 // 0]", "division by zero"),
    ("SELEC sae FROM saes", "malformed sql"),
    ("SELECT 'unclosed", "malformed sql"),
])
def test_sql_failing_query_is_400_naming_the_fault(client, query, named):
    got = sql(client, query)
    assert got.status_code == 400, got.text
    assert named in got.json()["error"].lower()


def test_sql_past_the_time_limit_is_400_and_lets_go_of_the_catalog(db, keys):
    client = TestClient(create_app(db, timeout_s=0.3))
    start = time.monotonic()
    got = sql(client, ENDLESS)
    assert got.status_code == 400 and "time limit" in got.json()["error"], got.text
    assert time.monotonic() - start < 10
    with writer(db, wait_s=1) as cat:  # the request's connection is closed: a writer gets in at once
        assert cat.con.execute("SELECT count(*) FROM saes").fetchall() == [(2,)]


@pytest.mark.parametrize("body", [
    {"query": 1}, {"query": "SELECT 1", "dialect": "klingon"}, {"query": "SELECT 1", "max_rows": -1},
    {"query": "SELECT 1", "limit": 5}, {},
])
def test_sql_request_outside_the_schema_is_422(client, body):
    assert client.post("/sql", json=body).status_code == 422


# --------------------------------------------------------------------------- SAEs, releases


def test_saes_and_releases(db, client, keys, decs):
    with writer(db) as cat:
        cat.con.execute("UPDATE releases SET links = ? WHERE release = 'local'", ['{"hub": ["x", 1]}'])
    rows = {"a": sae_row("local", "a", decs["a"]),
            "b": sae_row("owner/repo", "layer/2", decs["b"], BASE_TIME + timedelta(hours=1))}
    want = {name: {**row, "sae": keys[name], "ingested_at": row["ingested_at"].isoformat()} for name, row in rows.items()}

    listed = client.get("/saes").json()
    assert [{c: r[c] for c in want["a"]} for r in listed] == [want["a"], want["b"]]
    for path, expected in zip(("/saes/local/a", "/saes/owner/repo/layer/2"), listed, strict=True):
        got = client.get(path)
        assert got.status_code == 200, got.text
        assert got.json() == expected
    for path in ("/saes/local/b", "/saes/owner/repo", "/saes/owner/repo/layer"):
        got = client.get(path)
        assert got.status_code == 404 and path.removeprefix("/saes/") in got.json()["error"]

    releases = client.get("/releases").json()
    assert [{c: r[c] for c in ("release", "repo_id", "model", "conversion_func", "links")} for r in releases] == [
        {"release": "local", "repo_id": None, "model": "gpt2", "conversion_func": None, "links": {"hub": ["x", 1]}},
        {"release": "owner/repo", "repo_id": None, "model": "gpt2", "conversion_func": None, "links": None}]


# --------------------------------------------------------------------------------- features


def test_feature_returns_the_stored_statistics(client, keys, decs):
    stats = features_table(decs["a"], seed=1).to_pydict()  # what `commit(..., seed=1)` wrote
    for f in (0, 3, D_SAE - 1):
        got = client.get(f"/features/{keys['a']}/{f}")
        assert got.status_code == 200, got.text
        row = got.json()
        assert (row["sae"], row["feature"], row["fire_count"], row["block_count"]) == (
            keys["a"], f, stats["fire_count"][f], stats["block_count"][f])
        for column in ("decoder_norm", "max_activation", "mean_activation"):  # float32 in the catalog
            assert np.float32(row[column]) == np.float32(stats[column][f]), column
        assert row["density"] == pytest.approx(stats["fire_count"][f] / N_TOKENS, rel=1e-12)
        assert row["decoder"] is None
        with_decoder = client.get(f"/features/{keys['a']}/{f}", params={"decoder": True}).json()
        np.testing.assert_array_equal(np.array(with_decoder["decoder"], dtype=np.float32), decs["a"][f])
        assert {k: v for k, v in with_decoder.items() if k != "decoder"} == {k: v for k, v in row.items() if k != "decoder"}


@pytest.mark.parametrize("path,status,named", [
    ("/features/{a}/500", 404, "out of range"),
    ("/features/{b}/200", 404, "out of range"),
    ("/features/999/0", 404, "no sae with key 999"),
    ("/features/{a}/-1", 422, None),
    ("/features/{a}/x", 422, None),
])
def test_feature_unknown_is_404(client, keys, path, status, named):
    got = client.get(path.format(**keys))
    assert got.status_code == status, got.text
    if named:
        assert named in got.json()["error"].lower()


def test_feature_labels_come_from_the_label_tables(db, client, keys):
    a = keys["a"]
    with writer(db) as cat:
        cat.con.executemany("INSERT INTO feature_examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            (a, 3, 1, 2.5, 7, 40, " b", [" a", " b", " c"], 1, [0.0, 2.5, 0.5]),
            (a, 3, 0, 4.0, 2, 11, " x", [" x", " y"], 0, [4.0, 0.0]),
            (a, 4, 0, 9.0, 1, 1, " z", [" z"], 0, [9.0]),  # another feature's
        ])
        cat.con.executemany("INSERT INTO feature_tokens VALUES (?, ?, ?, ?, ?, ?, ?)", [
            (a, 3, "top", 0, 17, " the", 1.5), (a, 3, "bottom", 0, 99, " of", -2.0)])
    labels = client.get(f"/features/{a}/3").json()["labels"]
    assert labels["feature_examples"] == [
        {"rank": 0, "activation": 4.0, "document": 2, "position": 11, "token": " x", "context": [" x", " y"], "center": 0,
         "context_values": [4.0, 0.0]},
        {"rank": 1, "activation": 2.5, "document": 7, "position": 40, "token": " b", "context": [" a", " b", " c"],
         "center": 1, "context_values": [0.0, 2.5, 0.5]}]
    assert labels["feature_tokens"] == [
        {"direction": "bottom", "rank": 0, "token_id": 99, "token": " of", "logit": -2.0},
        {"direction": "top", "rank": 0, "token_id": 17, "token": " the", "logit": 1.5}]
    assert client.get(f"/features/{a}/5").json()["labels"]["feature_examples"] == []


# -------------------------------------------------------------------------------- neighbours


def test_neighbors_equal_exact_numpy(client, keys, decs):
    for name, feature, k in (("a", 3, 10), ("a", 250, 5), ("b", 0, 7), ("b", 199, 1)):
        got = client.get("/neighbors", params={"sae": keys[name], "feature": feature, "k": k})
        assert got.status_code == 200, got.text
        hits = [(h["sae"], h["feature"], h["cosine"]) for h in got.json()]
        assert len(hits) == k
        assert_hits_equal(hits, keys[name], decs[name], feature, k)


@pytest.mark.parametrize("params,status", [
    ({"sae": 999, "feature": 0}, 404), ({"sae": "{a}", "feature": 500}, 404), ({"sae": "{b}", "feature": 200}, 404),
    ({"sae": "{a}", "feature": 0, "k": 0}, 422), ({"sae": "{a}", "feature": 0, "k": 1001}, 422),
    ({"sae": "{a}"}, 422), ({"sae": "{a}", "feature": 2**40}, 422),
])
def test_neighbors_refusals(client, keys, params, status):
    got = client.get("/neighbors", params={k: str(v).format(**keys) for k, v in params.items()})
    assert got.status_code == status, got.text


NEIGHBOR_FIELDS = ["query", "rank", "sae", "release", "sae_id", "feature", "cosine", "density", "top_tokens",
                   "top_example", "recall"]


def test_neighbors_batch_and_model_scope_equal_exact_numpy(client, keys, decs):
    """a and b are both gpt2 with d_in D_IN: scope=model searches both, self-match excluded."""
    features = [3, 250, 499]
    got = client.get("/neighbors", params={"sae": keys["a"], "feature": features, "k": 6})
    assert got.status_code == 200, got.text
    rows = got.json()
    assert list(rows[0]) == NEIGHBOR_FIELDS
    assert [r["query"] for r in rows] == [f for f in features for _ in range(6)]
    for f in features:
        mine = [r for r in rows if r["query"] == f]
        assert [r["rank"] for r in mine] == list(range(6))
        assert {(r["release"], r["sae_id"], r["recall"]) for r in mine} == {("local", "a", None)}
        assert_hits_equal([(r["sae"], r["feature"], r["cosine"]) for r in mine], keys["a"], decs["a"], f, 6)

    stacked = np.vstack([decs["a"], decs["b"]])
    labels = [(keys["a"], f) for f in range(len(decs["a"]))] + [(keys["b"], f) for f in range(len(decs["b"]))]
    rows = client.get("/neighbors", params={"sae": keys["b"], "feature": [0, 7], "k": 9, "scope": "model"}).json()
    for f in (0, 7):
        want, want_cos = exact_topk(stacked, decs["b"][f], 9, exclude=len(decs["a"]) + f)
        mine = [r for r in rows if r["query"] == f]
        assert [(r["sae"], r["feature"]) for r in mine] == [labels[i] for i in want]
        np.testing.assert_allclose([r["cosine"] for r in mine], want_cos, atol=1e-5, rtol=0)
        assert {r["sae_id"] for r in mine} <= {"a", "layer/2"}

    approx = client.get("/neighbors", params={"sae": keys["a"], "feature": [3], "k": 5, "approximate": True}).json()
    assert len(approx) == 5 and all(0.0 <= r["recall"] <= 1.0 for r in approx)
    assert client.get("/neighbors", params={"sae": keys["a"], "feature": 3, "scope": "all"}).status_code == 422


def test_neighbors_by_vector_equal_exact_numpy(client, keys, decs):
    rng = np.random.default_rng(9)
    queries = (rng.standard_normal((6, D_IN)) * rng.uniform(0.1, 10, (6, 1))).astype(np.float32)
    for saes, names in (([keys["b"]], ["b"]), (None, ["a", "b"])):
        body = {"vectors": queries.tolist(), "k": 7, **({"saes": saes} if saes else {})}
        got = client.post("/neighbors/vectors", json=body)
        assert got.status_code == 200, got.text
        rows = got.json()
        stacked = np.vstack([decs[n] for n in names])
        labels = [(keys[n], f) for n in names for f in range(len(decs[n]))]
        for n, q in enumerate(queries):
            want, want_cos = exact_topk(stacked, q, 7)
            mine = [r for r in rows if r["query"] == n]
            assert [r["rank"] for r in mine] == list(range(7))
            assert [(r["sae"], r["feature"]) for r in mine] == [labels[i] for i in want]
            np.testing.assert_allclose([r["cosine"] for r in mine], want_cos, atol=1e-5, rtol=0)
            assert all(r["recall"] is None for r in mine)


@pytest.mark.parametrize("body,status", [
    ({"vectors": []}, 422), ({"vectors": [[]]}, 422), ({"vectors": [[1.0, 2.0], [1.0]]}, 422),
    ({"vectors": [[1.0] * 3] * 1001}, 422), ({"vectors": [[1.0] * D_IN], "k": 0}, 422),
    ({"vectors": [[1.0] * D_IN], "saes": []}, 422), ({"vectors": [["x"] * D_IN]}, 422),
    ({"vectors": [[1.0] * D_IN], "extra": 1}, 422),
    ({"vectors": [[1e300] * D_IN]}, 422),  # finite in JSON, not in float32
    ({"vectors": [[1.0] * 5]}, 404),  # no SAE of that width
    ({"vectors": [[1.0] * 5], "saes": ["{a}"]}, 400),  # the wrong width for the SAE named
    ({"vectors": [[1.0] * D_IN], "saes": [999]}, 404),
])
def test_neighbors_by_vector_refusals(client, keys, body, status):
    if "saes" in body:
        body = {**body, "saes": [int(str(s).format(**keys)) for s in body["saes"]]}
    got = client.post("/neighbors/vectors", json=body)
    assert got.status_code == status, got.text


def test_neighbors_by_vector_non_finite_is_422(client):
    for word in ("NaN", "Infinity", "-Infinity"):
        body = '{"vectors": [[1.0, %s]]}' % word
        got = client.post("/neighbors/vectors", content=body, headers={"Content-Type": "application/json"})
        assert got.status_code == 422, got.text


# ------------------------------------------------------------------------- limits and token


def test_body_over_the_limit_is_413(db, keys):
    client = TestClient(create_app(db, max_body_bytes=1000))

    def body(size: int) -> bytes:
        head = json.dumps({"query": "SELECT 1 AS x"})
        return (head[:-2] + " " * (size - len(head)) + head[-2:]).encode()

    assert len(body(1000)) == 1000
    ok = client.post("/sql", content=body(1000), headers={"Content-Type": "application/json"})
    assert ok.status_code == 200 and ok.json()["rows"] == [[1]]
    assert client.post("/sql", content=body(1001), headers={"Content-Type": "application/json"}).status_code == 413
    # A body sent in chunks, with no Content-Length to check up front, is counted as it arrives.
    chunked = client.post("/sql", content=iter([body(1001)[:600], body(1001)[600:]]),
                          headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN,
                                           b"Bearer s3cret-tok\xe9n"])
def test_token_missing_or_wrong_is_401(db, keys, authorization):
    client = TestClient(create_app(db, token=TOKEN))
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("get", "/saes"), ("get", f"/features/{keys['a']}/0"), ("post", "/sql")):
        got = client.request(method, path, headers=headers, json={"query": "SELECT 1"} if method == "post" else None)
        assert got.status_code == 401, (path, got.text)
        assert got.headers["WWW-Authenticate"] == "Bearer"
        assert "token" in got.json()["error"]


def test_token_right_is_200_and_health_and_docs_stay_open(db, keys):
    client = TestClient(create_app(db, token=TOKEN))
    assert client.get("/saes", headers=AUTH).json()[0]["sae_id"] == "a"
    assert client.post("/sql", headers=AUTH, json={"query": "SELECT 2 AS y"}).json()["rows"] == [[2]]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    secured = {path for path, ops in schema["paths"].items() for op in ops.values() if op.get("security")}
    assert secured == set(schema["paths"]) - {"/health"}
    # Without a token nothing asks for one, and the description says so.
    open_app = TestClient(create_app(db))
    assert open_app.get("/saes").status_code == 200
    assert "securitySchemes" not in open_app.get("/openapi.json").json().get("components", {})


# ------------------------------------------------------------------------------- analyses


def test_analysis_runs_stores_and_is_served_again(db, client, keys, decs):
    """POST computes and stores; the same request again, GET by key and the list all give it back."""
    body = {"sae": keys["b"], "params": {"rank_min": 2, "rank_max": 20, "entropy_rows": 150, "entropy_dims": 8}}
    first = client.post("/analyses/spectra", json=body)
    assert first.status_code == 200, first.text
    got = first.json()
    want = np.sort(np.linalg.eigvalsh(np.cov(decs["b"].T.astype(np.float64))))[::-1]
    assert not got["cached"] and (got["kind"], got["sae"], got["sae_id"]) == ("spectra", keys["b"], "layer/2")
    assert [r["rank"] for r in got["tables"]["spectra"]] == list(range(1, D_IN + 1))
    np.testing.assert_allclose([r["eigenvalue"] for r in got["tables"]["spectra"]], want, rtol=1e-6)
    again = client.post("/analyses/spectra", json=body).json()
    assert again["cached"] and again["analysis"] == got["analysis"] and again["summary"] == got["summary"]
    stored = client.get(f"/analyses/{got['analysis']}").json()
    assert stored["tables"] == got["tables"] and stored["params"] == got["params"]
    listed = client.get("/analyses", params={"kind": "spectra"}).json()
    assert [(a["analysis"], a["sae"], a["summary"]["alpha"]) for a in listed] == [
        (got["analysis"], keys["b"], got["summary"]["alpha"])]
    assert client.get("/analyses", params={"kind": "lobes"}).json() == []
    png = client.get(f"/analyses/{got['analysis']}/figure.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    svg = client.get(f"/analyses/{got['analysis']}/figure.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and b"<svg" in svg.content


def test_spectra_of_every_layer_in_one_request(db, client, keys):
    got = client.post("/analyses/spectra/layers", json={"release": "owner/repo", "params": {"rank_min": 2, "rank_max": 20,
                                                        "entropy_rows": 150, "entropy_dims": 8}})
    assert got.status_code == 200, got.text
    assert [(a["sae"], a["kind"]) for a in got.json()] == [(keys["b"], "spectra")]


@pytest.mark.parametrize("path,body,status,named", [
    ("/analyses/spectra", {"sae": 999, "params": {}}, 404, "999"),
    ("/analyses/spectra", {"sae": 1, "params": {"nonsense": 1}}, 400, "nonsense"),
    ("/analyses/spectra", {"sae": 1, "params": {"rank_min": "many"}}, 400, "rank_min"),
    ("/analyses/lobes", {"sae": 1, "params": {"affinities": ["cosine?"]}}, 400, "cosine?"),
    ("/analyses/telepathy", {"sae": 1}, 422, "kind"),
])
def test_analysis_refusals_name_the_fault(client, keys, path, body, status, named):
    got = client.post(path, json=body)
    assert got.status_code == status, got.text
    assert named in got.text


def test_unknown_analysis_is_404(client, keys):
    assert client.get("/analyses/12345").status_code == 404
    assert client.get("/analyses/12345/figure.png").status_code == 404


# ---------------------------------------------------------------------------- schema fuzz


WITHOUT_INPUTS = ["GET /health", "GET /saes", "GET /releases"]  # nothing in them can be wrong
WITH_INPUTS = ["POST /sql", "GET /saes/{release}/{sae_id}", "GET /features/{sae}/{feature}", "GET /neighbors",
               "POST /neighbors/vectors", "POST /analyses/{kind}", "POST /analyses/spectra/layers", "GET /analyses",
               "GET /analyses/{analysis}", "GET /analyses/{analysis}/figure.{fmt}", "GET /compare", "GET /search"]
OPERATIONS = WITHOUT_INPUTS + WITH_INPUTS


@pytest.mark.parametrize("label,mode", [(op, GenerationMode.POSITIVE) for op in OPERATIONS]
                         + [(op, GenerationMode.NEGATIVE) for op in WITH_INPUTS])
def test_fuzz_every_endpoint_by_its_schema(db, keys, label, mode):
    """Requests generated from the OpenAPI description, fitting it (positive) or not (negative):
    no 5xx, and every response is one the description declares, in the shape it declares."""
    # A generous body limit here: the 413 path has its own tests, and schemathesis does not count
    # a 413 as rejecting schema-violating data (a 1001-vector body is over the default limit).
    app = create_app(db, token=TOKEN, max_rows=50, max_body_bytes=16 << 20)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    assert sorted(op.ok().label for op in schema.get_all_operations()) == sorted(OPERATIONS)  # none unfuzzed

    # Any string fits the schema's `query`, but only SQL the gate passes gets a 200: a 400 is right.
    # The schema cannot say that the vectors must be of one length (422), and an SAE's width (404).
    # An analysis's parameters are an open object in the schema; only its own names pass (400).
    excluded = [positive_data_acceptance] if label in (
        "POST /sql", "POST /neighbors/vectors", "POST /analyses/{kind}", "POST /analyses/spectra/layers") else []

    @given(case=schema.find_operation_by_label(label).as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=AUTH, excluded_checks=excluded)

    fuzz()


SQL_WORDS = ["SELECT", "FROM", "WHERE", "WITH", "AS", "JOIN", "USING", "UNION", "LIMIT", "COPY", "saes", "features",
             "feature", "(sae)", "read_csv", "*", ",", "(", ")", "'", '"', "$", ";", "--", "/*", "::", "=", "1", "'x'"]


@given(words=st.lists(st.sampled_from(SQL_WORDS), max_size=12))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
def test_sql_shaped_garbage_is_never_a_server_error(client, words):
    """Random strings rarely get past the SQL tokenizer; strings of SQL's own words probe the gate."""
    got = sql(client, " ".join(words))
    assert got.status_code in (200, 400), got.text


# ------------------------------------------------------------------------------ concurrency


def test_overlapping_requests_all_answer(client, keys):
    """Requests run in threads; their read-only connections to the one file share one DuckDB
    database in this process, and each must open and close on its own all the same."""
    requests = [("/neighbors", {"sae": keys["a"], "feature": 3, "k": 5}), ("/features/{a}/7".format(**keys), {}),
                ("/saes", {}), ("/neighbors", {"sae": keys["b"], "feature": 0, "k": 5})]
    one_by_one = [client.get(path, params=params).json() for path, params in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda request: client.get(request[0], params=request[1]), requests * 8))
    assert [r.status_code for r in together] == [200] * 32
    assert [r.json() for r in together] == one_by_one * 8


HOLD_WRITER = """
import sys
from catalog import writer
with writer(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""

COMMIT_SAES = """
import json, sys, time
from test_catalog import commit, random_decoders
db, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    start = time.monotonic()
    commit(db, random_decoders(10 + i, n=100), "local", f"w{i}")
    print(json.dumps(time.monotonic() - start), flush=True)
    time.sleep(0.1)
"""


def test_catalog_held_by_a_writer_is_503_with_retry_after(db, keys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITER, str(db)], env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        client = TestClient(create_app(db, lock_wait_s=0.5))
        start = time.monotonic()
        got = client.get("/saes")
        assert time.monotonic() - start >= 0.5  # it waited for the writer first
        assert got.status_code == 503, got.text
        assert got.headers["Retry-After"] == "1"
        assert "held by another process" in got.json()["error"]
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    assert [r["sae_id"] for r in client.get("/saes").json()] == ["a", "layer/2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_while_another_process_commits(db, keys):
    """`saecat serve` (default host, token from $SAECAT_TOKEN) in one process, commits of new SAEs in
    another: every request succeeds, each commit gets in promptly, and each is seen whole."""
    n_commits, deadline = 5, time.monotonic() + 30
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", "from queries.front.cli import main; main()", "serve",
                               "--db", str(db), "--port", str(port)], env=_env(SAECAT_TOKEN=TOKEN),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committer = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=20) as http:
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.1)
            assert http.get("/saes", headers={"Authorization": ""}).status_code == 401

            committer = subprocess.Popen([sys.executable, "-c", COMMIT_SAES, str(db), str(n_commits)], env=_env(),
                                         stdout=subprocess.PIPE, text=True)
            counts = {"query": "SELECT (SELECT count(*) FROM saes), (SELECT count(*) FROM features)"}
            n_requests, seen = 0, []
            while committer.poll() is None:
                assert time.monotonic() < deadline, "the commits did not finish in time"
                responses = [http.post("/sql", json=counts),
                             http.get("/neighbors", params={"sae": keys["a"], "feature": 3, "k": 5}),
                             http.get(f"/features/{keys['a']}/7"),
                             http.get("/saes")]
                for response in responses:
                    assert response.status_code == 200, response.text
                n_requests += len(responses)
                seen.append(tuple(responses[0].json()["rows"][0]))
            waits = [json.loads(line) for line in committer.stdout]
            seen.append(tuple(http.post("/sql", json=counts).json()["rows"][0]))
    finally:
        for proc in (committer, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    assert committer.returncode == 0
    assert len(waits) == n_commits and max(waits) < 10, waits
    assert n_requests >= 20  # requests really ran beside the commits
    # Each commit is atomic: 2 SAEs of 500 + 200 features, then one of 100 per commit, never half of one.
    assert all(features == 700 + 100 * (saes - 2) for saes, features in seen), seen
    assert [s for s, _ in seen] == sorted(s for s, _ in seen) and seen[-1][0] == 2 + n_commits


def test_serve_binds_loopback_by_default_and_takes_the_token_from_the_environment(db, keys, capsys, monkeypatch):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: served.append((app, host, port)))
    monkeypatch.setenv("SAECAT_TOKEN", TOKEN)
    code, _, stderr = _main(["serve", "--db", str(db)], capsys, monkeypatch)
    assert (code, stderr) == (0, "")
    app, host, port = served.pop()
    assert (host, port) == ("127.0.0.1", 8000)
    assert TestClient(app).get("/saes").status_code == 401
    assert TestClient(app).get("/saes", headers=AUTH).status_code == 200

    monkeypatch.delenv("SAECAT_TOKEN")
    code, _, stderr = _main(["serve", "--db", str(db), "--host", "0.0.0.0", "--port", "9000"], capsys, monkeypatch)
    assert code == 0 and "without --token" in stderr
    app, host, port = served.pop()
    assert (host, port) == ("0.0.0.0", 9000)  # never bound: uvicorn.run is the stub above
    assert TestClient(app).get("/saes").status_code == 200

    code, _, stderr = _main(["serve", "--db", str(db.with_name("missing.duckdb"))], capsys, monkeypatch)
    assert code == 1 and stderr.startswith("error: no catalog at") and served == []
