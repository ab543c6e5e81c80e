"""`saecat explain` end to end, offline and real: the demo's Gemma 3 270M behind `transformers serve`
(a real OpenAI-compatible server, started here), explaining and scoring features of an ingested
catalog. Faults are the same server's answers spoiled by a proxy in front of it: 429s, timeouts,
empty and malformed answers, a refused key. What the explainer and scorer were shown is read off
the proxy and checked against the catalog and against the brute-force reference activations.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from catalog import Catalog
from ingest import IngestOptions, ingest, resolve_source
from ingest.autointerp import SCORE_SYSTEM, Detection, on_one_line, parse_explanation, parse_labels
from ingest.explain import ExplainOptions, explain, load_tasks, plan
from ingest.explainers import ChatEndpoint, FatalEndpointError
from test_blocks import reference_blocks
from test_counts import BLOCK, MAX_DOC
from test_robustness import assert_error, run_cli

TOP_K = 8  # 4 examples shown, 4 held out and 4 texts without the feature: 2 scoring prompts a feature
FEATURES = "fire_count >= 8"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, sae_dirs, corpus) -> Path:
    db = tmp_path_factory.mktemp("explain") / "catalog.duckdb"
    result = ingest(resolve_source(None, None, str(sae_dirs["standard"])),
                    IngestOptions(dataset=str(corpus), block_size=BLOCK, max_doc_tokens=MAX_DOC, top_k=TOP_K,
                                  sample_blocks=10**6, progress=False), db=db)
    assert result.status == "ingested"
    return db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> tuple[str, str]:
    """`transformers serve` over the demo model made chat-ready: (base URL, model name)."""
    from demo.gemma import chat_folder

    folder = chat_folder(tmp_path_factory.mktemp("gemma") / "gemma-chat")
    port = free_port()
    log = (folder.parent / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("transformers")), "serve", str(folder),
                             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (folder.parent / "serve.log").read_text()
        time.sleep(1)
    yield f"{url}/v1", str(folder)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Proxy:
    """In front of the server: passes requests on, unless told to spoil the next ones of a kind
    ('explain' or 'score'): "429", "401", "slow" (longer than the client waits), "empty" (an answer
    with no text) or "garbage" (an answer that says nothing usable). Records every request and the
    server's answer to it."""

    def __init__(self, upstream: str):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.upstream, self.faults, self.seen, self.answers = upstream, {"explain": [], "score": []}, [], []
        self.always: dict[str, str] = {}

        async def completions(request):
            body = await request.json()
            kind = "score" if body["messages"][0]["content"] == SCORE_SYSTEM else "explain"
            fault = self.faults[kind].pop(0) if self.faults[kind] else self.always.get(kind)
            at = len(self.seen)  # others arrive while this one waits for its answer
            self.seen.append((kind, fault, body))
            self.answers.append(None)
            if fault in ("429", "401"):
                return JSONResponse({"error": {"message": fault, "type": "test"}}, status_code=int(fault),
                                    headers={"retry-after": "0"})
            if fault == "slow":
                await asyncio.sleep(3)
            if fault in ("empty", "garbage"):
                text = "" if fault == "empty" else "I could not say what these have in common."
                return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": text}}]})
            async with httpx.AsyncClient(timeout=300) as client:
                reply = await client.post(f"{self.upstream}/chat/completions", json=body)
            self.answers[at] = reply.json()["choices"][0]["message"]["content"]
            return JSONResponse(reply.json(), status_code=reply.status_code)

        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])]),
            host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset(self) -> None:
        self.faults, self.seen, self.answers, self.always = {"explain": [], "score": []}, [], [], {}


@pytest.fixture(scope="module")
def proxy(server):
    p = Proxy(server[0])
    yield p
    p.server.should_exit = True


@pytest.fixture
def endpoint(proxy, server):
    """An endpoint through the proxy, which starts each test without faults. The server answers one
    request at a time, on a CPU: requests wait their turn within the timeout."""
    proxy.reset()
    return lambda **kw: ChatEndpoint(proxy.url, server[1], **{"timeout": 600.0, "retries": 3, **kw})


def rows(db: Path) -> dict[int, dict]:
    with Catalog.open(db) as cat:
        table = cat.con.sql("SELECT * FROM feature_explanations ORDER BY feature").to_arrow_table()
    return {r["feature"]: r for r in table.to_pylist()}


def examples(db: Path, feature: int) -> dict[int, str]:
    with Catalog.open(db) as cat:
        return {rank: on_one_line("".join(context)) for rank, context in cat.con.execute(
            "SELECT rank, context FROM feature_examples WHERE sae = 1 AND feature = ?", [feature]).fetchall()}


def unmarked(body: dict) -> str:
    return body["messages"][-1]["content"].replace("<<", "").replace(">>", "")


def test_explains_and_scores_through_a_real_server(catalog, endpoint, proxy):
    """The demo model is a small pretrained one: what it answers is its own affair. What is checked
    is what saecat does with it: the split of the examples, what is stored, and the counts, against
    the answers read off the wire."""
    opts = ExplainOptions(where=FEATURES, limit=3, progress=False, max_tokens=40, concurrency=2)
    summary = explain(catalog, "local", "standard", endpoint(), opts=opts)
    got = rows(catalog)
    assert summary.selected == 3 and summary.failed == 0 and summary.explained == len(got) >= 1
    assert summary.explained + summary.unparsed == 3
    exchanges = list(zip(proxy.seen, proxy.answers))
    assert sum(k == "explain" for (k, _, _), _ in exchanges) == 3
    for feature, row in got.items():
        ranks = examples(catalog, feature)
        # the explainer saw the even ranks, marked, and not the odd ones
        explained = [(b, a) for (k, _, b), a in exchanges
                     if k == "explain" and all(ranks[r] in unmarked(b) for r in (0, 2, 4, 6))]
        assert len(explained) == 1 and not any(ranks[r] in unmarked(explained[0][0]) for r in (1, 3, 5, 7))
        assert row["explanation"] == parse_explanation(explained[0][1])
        assert row["prompt_examples"] == [0, 2, 4, 6] and row["method"] == "token-act-pair/1"
        # the scorer: the odd ranks, unmarked, and as many texts on which the feature never fired;
        # its counts are those of the answers on the wire
        held_out = {ranks[r] for r in (1, 3, 5, 7)}
        expected, shown = Detection(), []
        for (k, _, body), answer in exchanges:  # the feature's scoring prompts
            question = body["messages"][-1]["content"]
            if k != "score" or not question.startswith(f"Description: {row['explanation']}\n"):
                continue
            texts = [line.split(". ", 1)[1] for line in question.split("Texts:\n", 1)[1].splitlines()]
            shown += texts
            expected = expected.add([int(t in held_out) for t in texts], parse_labels(answer, len(texts)))
        assert len(shown) == 8 and held_out <= set(shown)
        details = json.loads(row["score_details"])
        assert details == {**expected.__dict__, "activating": 4, "not_activating": 4}
        score = expected.balanced_accuracy
        assert row["score"] == (None if score is None else pytest.approx(score))
        assert row["scorer"] == row["explainer"] and row["score_method"] == "detection/1"

    # a rerun resumes: the explained features are done, the others are asked again
    proxy.reset()
    again = explain(catalog, "local", "standard", endpoint(), opts=opts)
    assert again.done_before == len(got) and again.explained + again.unparsed == 3 - len(got)
    assert sum(k == "explain" for k, _, _ in proxy.seen) == 3 - len(got)


def test_texts_without_the_feature_are_blocks_where_it_never_fired(catalog, sae_dirs, sae_acts, raw_ids, tokenizer):
    ref = reference_blocks(sae_acts(sae_dirs["standard"], True, MAX_DOC), 0.0)
    text = {r.block: [tokenizer.decode([i]) for i in raw_ids[r.document][r.start - 1: r.start - 1 + BLOCK]]
            for r in ref}
    with Catalog.open(catalog) as cat:
        record = cat.find_sae("local", "standard")
        features = [f for (f,) in cat.con.execute("SELECT feature FROM features WHERE sae = 1 AND fire_count >= 8 "
                                                  "ORDER BY feature LIMIT 12").fetchall()]
        tasks = list(load_tasks(cat.con, record, features, ExplainOptions()))
    assert len(tasks) == 12
    for task in tasks:
        assert len(task.negatives) == len(task.held_out) == TOP_K // 2
        for window in task.negatives:
            homes = [r for r in ref if _contains(text[r.block], list(window.tokens))]
            assert any(task.feature not in r.features for r in homes)


def _contains(tokens: list[str], window: list[str]) -> bool:
    return any(tokens[i:i + len(window)] == window for i in range(len(tokens) - len(window) + 1))


@pytest.fixture(scope="module")
def answered(catalog, server) -> str:
    """A --where selecting one feature whose explanation the server's model writes in a form that
    parses (greedy decoding gives the same answer to the same prompt), explained here if need be."""
    def first() -> int | None:
        with Catalog.open(catalog) as cat:
            found = cat.con.execute("SELECT min(feature) FROM feature_explanations").fetchall()[0][0]
        return found

    if first() is None:
        explain(catalog, "local", "standard", ChatEndpoint(server[0], server[1], timeout=600.0, retries=3),
                opts=ExplainOptions(where=FEATURES, limit=3, progress=False, max_tokens=40, concurrency=2))
    assert first() is not None, "the model's answers to none of three features parsed"
    return f"feature = {first()}"


def test_rate_limits_are_retried(catalog, endpoint, proxy, answered):
    proxy.faults["explain"] = ["429", "429"]
    opts = ExplainOptions(where=answered, force=True, score=False, progress=False, max_tokens=40)
    summary = explain(catalog, "local", "standard", endpoint(), opts=opts)
    assert summary.explained == 1 and [f for _, f, _ in proxy.seen] == ["429", "429", None]


def test_a_feature_whose_requests_fail_is_left_for_the_next_run(catalog, endpoint, proxy):
    opts = ExplainOptions(where=f"{FEATURES} AND feature NOT IN (SELECT feature FROM feature_explanations)", limit=1,
                          score=False, progress=False, max_tokens=40)
    before = rows(catalog)
    proxy.always["explain"] = "slow"
    summary = explain(catalog, "local", "standard", endpoint(timeout=1.0, retries=1), opts=opts)
    assert (summary.explained, summary.failed) == (0, 1) and "Timeout" in summary.errors[0]
    assert rows(catalog) == before and [f for _, f, _ in proxy.seen] == ["slow", "slow"]
    proxy.reset()
    again = explain(catalog, "local", "standard", endpoint(), opts=opts)
    assert (again.failed, again.explained + again.unparsed) == (0, 1)  # asked again, answered
    assert len(rows(catalog)) == len(before) + again.explained


def test_an_empty_answer_is_no_explanation_and_no_row(catalog, endpoint, proxy, answered):
    proxy.faults["explain"] = ["empty"]
    opts = ExplainOptions(where=answered, force=True, progress=False)
    before = rows(catalog)
    summary = explain(catalog, "local", "standard", endpoint(), opts=opts)
    assert (summary.explained, summary.unparsed, summary.failed) == (0, 1, 0)
    assert rows(catalog) == before


def test_unusable_scorer_answers_are_counted_not_scored(catalog, endpoint, proxy, answered):
    proxy.always["score"] = "garbage"
    opts = ExplainOptions(where=answered, force=True, progress=False, max_tokens=40)
    assert explain(catalog, "local", "standard", endpoint(), opts=opts).explained == 1
    row = rows(catalog)[int(answered.split("= ")[1])]
    details = json.loads(row["score_details"])
    assert row["score"] is None and details["failed"] == details["prompts"] == 2
    assert details["tp"] + details["fp"] + details["tn"] + details["fn"] == 0


def test_a_refused_key_stops_the_run(catalog, endpoint, proxy):
    proxy.always["explain"] = "401"
    opts = ExplainOptions(where=FEATURES, limit=1, force=True, progress=False)
    before = rows(catalog)
    with pytest.raises(FatalEndpointError, match="refused the key"):
        explain(catalog, "local", "standard", endpoint(), opts=opts)
    assert rows(catalog) == before


def test_cli_dry_run_and_an_unreachable_endpoint(catalog, tmp_path):
    dry = run_cli("explain", "--release", "local", "--sae-id", "standard", "--explainer", "http://127.0.0.1:9/v1",
                  "--explainer-model", "m", "--where", FEATURES, "--limit", "3", "--dry-run", "--db", str(catalog),
                  cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "[EXPLANATION]:" in dry.stdout and "Activations:" in dry.stdout
    with Catalog.open(catalog) as cat:
        done = cat.con.execute("SELECT count(*) FROM feature_explanations WHERE explainer = 'm'").fetchall()[0][0]
    assert done == 0 and "3 features to explain" in dry.stderr and "9 calls" in dry.stderr  # 1 + 2 each

    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    down = run_cli("explain", "--release", "local", "--sae-id", "standard", "--explainer", unreachable,
                   "--explainer-model", "m", "--limit", "1", "--retries", "0", "--db", str(catalog), cwd=tmp_path)
    assert_error(down.returncode, down.stderr, "cannot reach the explainer")
    bad = run_cli("explain", "--release", "local", "--sae-id", "standard", "--explainer", "http://127.0.0.1:9/v1",
                  "--where", "no_such_column > 1", "--explainer-model", "m", "--db", str(catalog), cwd=tmp_path)
    assert_error(bad.returncode, bad.stderr, "no_such_column")


def test_a_reingestion_keeps_explanations_and_says_they_are_stale(catalog, answered, sae_dirs, corpus, tmp_path):
    db = tmp_path / "copy.duckdb"
    db.write_bytes(catalog.read_bytes())
    feature = int(answered.split("= ")[1])
    explainer = rows(db)[feature]["explainer"]
    opts = ExplainOptions(where=answered, progress=False)
    _, tasks, summary = plan(db, "local", "standard", explainer, opts)
    assert (len(tasks), summary.done_before, summary.stale) == (0, 1, 0)
    with Catalog.open(db) as cat:
        assert rows(db)[feature]["ingested_at"] == cat.find_sae("local", "standard").ingested_at

    before = rows(db)
    ingest(resolve_source(None, None, str(sae_dirs["standard"])),
           IngestOptions(dataset=str(corpus), block_size=BLOCK, max_doc_tokens=MAX_DOC, top_k=TOP_K - 2,
                         sample_blocks=10**6, progress=False), db=db, force=True)
    assert rows(db) == before  # kept, word for word
    with Catalog.open(db) as cat:
        assert cat.find_sae("local", "standard").ingested_at > before[feature]["ingested_at"]
    _, tasks, summary = plan(db, "local", "standard", explainer, opts)
    assert (len(tasks), summary.done_before, summary.stale) == (0, 1, 1)
    _, tasks, summary = plan(db, "local", "standard", explainer, ExplainOptions(where=answered, force=True))
    assert [t.feature for t in tasks] == [feature] and len(tasks[0].shown) == (TOP_K - 2) // 2
