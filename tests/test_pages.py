"""The browser pages of `saecat serve`, in a real browser: Playwright driving Debian's Chromium
against `saecat serve` started here. The tests click from the catalog to an SAE, a feature and a
neighbour, and check what is on screen against the catalog; hostile strings (script tags, event
handlers) reach the pages as a user's catalog carries them, as tokens of the model's vocabulary in
its examples and logit lens and as an explainer's answers, and must show as text, running nothing.
Screenshots go to the test's folder, or to $SAECAT_SCREENSHOTS."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest

from catalog import Catalog, writer
from ingest import IngestOptions, ingest, resolve_source
from queries.browse import shade, showcase
from queries.front.pages import SQL_HIGHLIGHT_CHARS, sql_pieces, visible
from queries.neighbors import neighbors
from test_counts import BLOCK, MAX_DOC

CHROMIUM = "/usr/bin/chromium"
# Tokens a real vocabulary can hold (Gemma's has markup pieces like these): each must show as text.
PROBES = ["<script>window.__pwned=1</script>", "<img src=x onerror=window.__pwned=2>",
          "\" onmouseover=\"window.__pwned=3", "'><svg onload=window.__pwned=4>", "{{7*7}}",
          "</title><script>alert(5)</script>", "javascript:alert(6)"]
RELEASE = "local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def probe_model(tmp_path_factory, model_dir) -> Path:
    """The fixture model with the probes added to its vocabulary, as a user adds tokens."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("probe-model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(PROBES)
    tokenizer.save_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, sae_dirs, corpus, probe_model) -> Path:
    """Two SAEs of the probe model over the corpus and documents full of probes, and explanations
    as an explainer could write them, probes included."""
    root = tmp_path_factory.mktemp("pages")
    docs = root / "docs.jsonl"
    hostile = [{"text": " ".join(PROBES) + f" and then {i} more words of {p} text " * 6, "kind": "html"}
               for i, p in enumerate(PROBES)]
    docs.write_text(corpus.read_text() + "".join(json.dumps(d) + "\n" for d in hostile))
    db = root / "catalog.duckdb"
    for name in ("standard", "topk"):
        result = ingest(resolve_source(None, None, str(sae_dirs[name])),
                        IngestOptions(dataset=str(docs), model=str(probe_model), block_size=BLOCK,
                                      max_doc_tokens=MAX_DOC, top_k=6, progress=False), db=db)
        assert result.status == "ingested"
    with writer(db) as cat, cat.transaction() as con:
        con.executemany("INSERT INTO feature_explanations (sae, feature, explainer, method, explanation, score) "
                        "VALUES (1, ?, ?, 'token-act-pair/1', ?, ?)",
                        [[f, PROBES[f % len(PROBES)], f"fires on {p}", 0.5 + f / 100] for f, p in enumerate(PROBES)])
    return db


def serve(db: Path, token: str | None = None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **({"SAECAT_TOKEN": token} if token else {}), **(env or {})}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("saecat")), "serve", "--db", str(db), "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(catalog):
    proc, url = serve(catalog)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"the browser tests drive Debian's Chromium ({CHROMIUM}): `make test` installs it"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh page that records every dialog, console error and failed request."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.dialogs, pg.errors = [], []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def screenshot(pg, tmp_path: Path, name: str) -> None:
    folder = Path(os.environ.get("SAECAT_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def rows(db: Path, query: str, params: list | None = None) -> list[tuple]:
    with Catalog.open(db) as cat:
        return cat.con.execute(query, params or []).fetchall()


def table(pg, selector: str) -> list[list[str]]:
    return pg.eval_on_selector_all(f"{selector} tbody tr",
                                   "trs => trs.map(tr => [...tr.querySelectorAll('td')].map(td => td.innerText))")


def number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


def test_catalog_to_sae_to_feature_to_neighbour(page, server, catalog, tmp_path):
    page.goto(f"{server}/ui/")
    saes = rows(catalog, "SELECT sae_id, d_sae FROM saes ORDER BY sae_id")
    shown = sorted((r[1], int(r[4].replace(",", ""))) for r in table(page, "#saes"))
    assert shown == [(s, d) for s, d in saes]
    with Catalog.open(catalog) as cat:  # the home page leads with each SAE's showcase, in its order
        for key in (1, 2):
            want = [f"feature {r['feature']}" for r in showcase(cat, key, 6)]
            assert want, "nothing to show"
            assert page.eval_on_selector_all(f"#showcase-{key} li > a", "as => as.map(a => a.textContent)") == want
    screenshot(page, tmp_path, "catalog")
    # the filter form, its other fields left empty: by measured quality
    quality = rows(catalog, "SELECT s.sae_id, q.explained_variance FROM saes s JOIN sae_quality q USING (sae) "
                            "ORDER BY q.explained_variance")
    assert len(quality) == 2 and quality[0][1] < quality[1][1]
    page.fill("#filters input[name=min_explained_variance]", str((quality[0][1] + quality[1][1]) / 2))
    page.click("#filters button")
    page.wait_for_selector("#summary:text-matches('^1 SAEs ·')")
    assert [r[1] for r in table(page, "#saes")] == [quality[1][0]]
    page.goto(f"{server}/ui/")

    sae_id = rows(catalog, "SELECT sae_id FROM saes WHERE sae = 1")[0][0]
    page.click(f"#saes a:text-is('{sae_id}')")
    page.wait_for_selector("#sae-title")
    assert page.inner_text("#sae-title") == sae_id
    d_sae, alive = rows(catalog, "SELECT d_sae, (SELECT count(*) FROM features WHERE sae = 1 AND fire_count > 0) "
                                 "FROM saes WHERE sae = 1")[0]
    assert number(page.inner_text("#stat-width")) == d_sae and number(page.inner_text("#stat-alive")) == alive
    first = [int(r[0]) for r in table(page, "#features")]
    assert first == list(range(min(50, d_sae)))
    # sorted by density, highest first, by clicking its header twice
    page.click("#features th a:has-text('density')")
    page.click("#features th a:has-text('density')")
    page.wait_for_selector("#features th a:has-text('density ▼')")
    want = [f for (f,) in rows(catalog, "SELECT feature FROM features WHERE sae = 1 "
                                        "ORDER BY fire_count DESC, feature LIMIT 50")]
    assert [int(r[0]) for r in table(page, "#features")] == want
    screenshot(page, tmp_path, "sae")
    # the features' filter form: a density range, the text left empty, sorted as before
    low, high = rows(catalog, "SELECT quantile_disc(density, 0.25), quantile_disc(density, 0.75) "
                              "FROM labelled_features WHERE sae = 1")[0]
    page.fill("#feature-filters input[name=min_density]", repr(low))
    page.fill("#feature-filters input[name=max_density]", repr(high))
    page.click("#feature-filters button")
    page.wait_for_selector("#features th a:has-text('density ▼')")
    banded = [f for (f,) in rows(catalog, "SELECT feature FROM labelled_features WHERE sae = 1 AND density "
                                          "BETWEEN ? AND ? ORDER BY fire_count DESC, feature", [low, high])]
    assert page.inner_text("#feature-count").startswith(f"{len(banded)} features")
    assert [int(r[0]) for r in table(page, "#features")] == banded[:50]
    page.go_back()
    page.wait_for_selector("#features th a:has-text('density ▼')")

    page.click("#features tbody tr:first-child a")
    page.wait_for_selector("#feature-title")
    feature = want[0]
    assert page.inner_text("#feature-title") == f"Feature {feature}"
    fire_count, max_act, mean_act = rows(catalog, "SELECT fire_count, max_activation, mean_activation FROM features "
                                                  "WHERE sae = 1 AND feature = ?", [feature])[0]
    assert number(page.inner_text("#stat-fires")) == fire_count
    assert number(page.inner_text("#stat-max")) == pytest.approx(max_act, rel=1e-3)
    assert number(page.inner_text("#stat-mean")) == pytest.approx(mean_act, rel=1e-3)
    examples = rows(catalog, "SELECT context, context_values FROM feature_examples WHERE sae = 1 AND feature = ? "
                             "ORDER BY rank", [feature])
    shown = page.eval_on_selector_all("#examples li .text", "ls => ls.map(l => [...l.querySelectorAll('.tok')]"
                                                            ".map(t => [t.textContent, t.className]))")
    assert len(shown) == len(examples) > 0
    for tokens, (context, values) in zip(shown, examples):
        assert [t for t, _ in tokens] == [c.replace("\n", "↵").replace("\t", "⇥") for c in context]
        assert [int(re.search(r"\bs(\d)\b", c).group(1)) for _, c in tokens] == [shade(v, max_act) for v in values]
    screenshot(page, tmp_path, "feature")

    # the nearest neighbour, by decoder cosine against numpy
    decoders = np.array([d for (d,) in rows(catalog, "SELECT decoder FROM features WHERE sae = 1 ORDER BY feature")])
    unit = decoders / np.linalg.norm(decoders, axis=1, keepdims=True)
    cosine = unit @ unit[feature]
    cosine[feature] = -2
    nearest = [(int(r[0]), float(r[1])) for r in table(page, "#neighbors")]
    assert [f for f, _ in nearest] == list(np.argsort(-cosine, kind="stable")[:len(nearest)])
    assert [c for _, c in nearest] == pytest.approx(np.sort(cosine)[::-1][:len(nearest)].tolist(), abs=1e-3)
    page.click("#neighbors tbody tr:first-child a")
    page.wait_for_selector(f"#feature-title:text-is('Feature {nearest[0][0]}')")
    # and on across the keyboard: the right arrow is the next feature
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(f"#feature-title:text-is('Feature {nearest[0][0] + 1}')")
    assert not page.dialogs and not page.errors


def test_hostile_tokens_and_explanations_show_as_text_and_run_nothing(page, server, catalog, tmp_path):
    sae_id = rows(catalog, "SELECT sae_id FROM saes WHERE sae = 1")[0][0]
    hits = rows(catalog, "SELECT DISTINCT feature FROM feature_examples WHERE sae = 1 AND "
                         "len(list_intersect(context, ?)) > 0 ORDER BY feature LIMIT 3", [PROBES])
    lens = rows(catalog, "SELECT DISTINCT feature FROM feature_tokens WHERE sae = 1 AND list_contains(?, token) "
                         "ORDER BY feature LIMIT 2", [PROBES])
    assert hits and lens, "the probes reached neither the examples nor the logit lens"
    features = sorted({f for (f,) in hits + lens} | set(range(len(PROBES))))
    for feature in features:
        page.goto(f"{server}/ui/feature?release={RELEASE}&sae_id={sae_id}&feature={feature}")
        page.wait_for_selector("#feature-title")
        text = page.inner_text("main")
        for probe in rows(catalog, "SELECT DISTINCT unnest(context) FROM feature_examples WHERE sae = 1 AND "
                                   "feature = ?", [feature]):
            if probe[0] in PROBES:
                assert probe[0] in text
        if feature < len(PROBES):
            assert f"fires on {PROBES[feature]}" in text and PROBES[feature % len(PROBES)] in text
        assert page.evaluate("window.__pwned") is None
    page.goto(f"{server}/ui/sae?release={RELEASE}&sae_id={sae_id}&text={PROBES[0]}")
    assert page.evaluate("window.__pwned") is None
    screenshot(page, tmp_path, "probes")
    assert not page.dialogs
    csp = httpx.get(f"{server}/ui/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_the_catalog_page_shows_the_last_sync_and_each_watchs_selection(page, tmp_path):
    """What `saecat status` and `saecat watch list` say, on the home page: the last registry sync,
    each watch with what it selects, and the watched SAEs queued for the next sync."""
    from ingest.sync import Watch, add_watch, queued, sync, watches
    from test_sync import REGISTRY, write_registry

    db = tmp_path / "catalog.duckdb"
    sync(db, write_registry(tmp_path / "registry.yaml", REGISTRY), progress=False)
    add_watch(db, Watch({"dataset": "d"}, model="gpt2-small", hook_pattern="blocks.*.hook_resid_pre", max_l0=20))
    add_watch(db, Watch({"dataset": "d", "max_tokens": 5000}, release_pattern="*-sm"))
    with Catalog.open(db) as cat:
        listed, waiting = watches(cat), queued(cat)
    synced_at, n_releases, n_saes = rows(db, "SELECT synced_at, n_releases, n_saes FROM registry_snapshots")[0]
    proc, url = serve(db)
    try:
        page.goto(f"{url}/ui/")
        summary = page.inner_text("#summary")
        assert f"the last at {str(synced_at)[:19]} from" in summary
        assert f"({n_releases} releases, {n_saes} SAEs)" in summary and "sync not running" in summary
        assert f"2 watches selecting {sum(w['selects'] for w in listed)} SAEs" in summary
        shown = [(int(r[0]), r[1], r[2], r[3], r[4], r[5], int(r[7]), int(r[8])) for r in table(page, "#watches")]
        assert shown == [(w["watch"], w["release_pattern"], w["model"] or "any", w["hook_pattern"] or "any", "any",
                          l0, w["selects"], w["ready"]) for w, l0 in zip(listed, ["≤ 20", "any"])]
        assert [w["selects"] for w in listed] == [2, 1]  # l0 10 and 18 of the three resid_pre SAEs; the -sm one
        assert page.inner_text("#queued").startswith(f"{len(waiting)} watched SAEs not ingested yet")
        assert sorted(r[1] for r in table(page, "#saes")) == sorted(r[0] for r in rows(db, "SELECT sae_id FROM saes"))
        # paged (the registry has ~13,900 SAEs): two a page here, the arrow keys paging on, filters kept
        order = [r[0] for r in rows(db, "SELECT sae_id FROM saes WHERE release ILIKE '%gpt2%' ORDER BY release, "
                                        "layer NULLS LAST, sae_id")]
        page.goto(f"{url}/ui/?release=gpt2&per_page=2")
        seen = []
        for first in range(0, len(order), 2):
            page.wait_for_selector(f"#summary:has-text('{len(order)} SAEs, {first + 1} to')")
            seen += [r[1] for r in table(page, "#saes")]
            page.keyboard.press("ArrowRight")
        assert seen == order and len(order) == 4
        screenshot(page, tmp_path, "catalog-sync")
        assert not page.errors
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_token_guards_pages_and_the_login_form_sets_it(browser, catalog, tmp_path):
    proc, url = serve(catalog, token="s3cret-token")
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{url}/ui/sae?release={RELEASE}&sae_id=standard")
        assert page.url.startswith(f"{url}/ui/login") and page.query_selector("#saes") is None
        page.fill("input[name=token]", "wrong")
        page.click("button[type=submit]")
        page.wait_for_selector("#error")
        page.fill("input[name=token]", "s3cret-token")
        page.click("button[type=submit]")
        page.wait_for_selector("#sae-title")
        assert page.url == f"{url}/ui/sae?release={RELEASE}&sae_id=standard"
        cookie = next(c for c in context.cookies() if c["name"] == "saecat_token")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert httpx.get(f"{url}/ui/", follow_redirects=False).status_code == 303
        assert httpx.get(f"{url}/ui/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert httpx.get(f"{url}/saes").status_code == 401
        context.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_neuronpedia_urls_and_errors(page, server, catalog):
    with writer(catalog) as cat:
        cat.con.execute("UPDATE saes SET neuronpedia_id = 'gpt2-small/1-res-test' WHERE sae = 1")
    page.goto(f"{server}/ui/np/gpt2-small/1-res-test/3")
    page.wait_for_selector("#feature-title:text-is('Feature 3')")
    assert "feature=3" in page.url
    # and back out to Neuronpedia's own page of it, from the feature and from its SAE
    assert page.get_attribute("#neuronpedia-link", "href") == "https://www.neuronpedia.org/gpt2-small/1-res-test/3"
    page.click(".crumbs a:last-child")
    page.wait_for_selector("#sae-title")
    assert page.get_attribute("#neuronpedia-link", "href") == "https://www.neuronpedia.org/gpt2-small/1-res-test"
    page.goto(f"{server}/ui/feature?release={RELEASE}&sae_id=standard&feature=999999")
    assert "out of range" in page.inner_text("#error")
    page.goto(f"{server}/ui/np/nope/nope/1")
    assert "Neuronpedia id nope/nope" in page.inner_text("#error")


def test_other_saes_past_the_scan_bound_go_through_their_approximate_indexes(browser, catalog, tmp_path):
    """With more decoder rows in the model's other SAEs than an exact scan allows ($SAECAT_EXACT_SCAN_MB,
    512 by default: lowered to 0 here), the feature page searches them through the approximate
    indexes already on disk, and says so with their recall."""
    with Catalog.open(catalog) as cat:  # SAE 2's approximate index, as an approximate search leaves it
        want = neighbors(cat, 1, [3], 10, "others", approximate=True)
    recall = float(want.schema.metadata[b"recall"])
    proc, url = serve(catalog, env={"SAECAT_EXACT_SCAN_MB": "0"})
    try:
        pg = browser.new_page()
        pg.goto(f"{url}/ui/feature?{urlencode({'release': RELEASE, 'sae_id': 'standard', 'feature': 3})}")
        note = pg.inner_text("#across-recall")
        assert "Approximate search in 1 of 1 SAEs" in note
        assert float(re.search(r"recall@10 ([\d.]+)", note).group(1)) == pytest.approx(recall, abs=5e-4)
        shown = [(r[0], int(r[1]), number(r[2])) for r in table(pg, "#neighbors-model")]
        assert shown == [(r["sae_id"], r["feature"], pytest.approx(r["cosine"], abs=5e-4)) for r in want.to_pylist()]
        screenshot(pg, tmp_path, "feature-approximate")
    finally:
        proc.terminate()
        proc.wait(30)


def test_search_by_meaning_token_and_text(page, server, catalog, probe_model, sae_dirs, tmp_path):
    from queries.search import search

    # by meaning: the same hits as the search API's core call, in order; a hit opens its feature
    page.goto(f"{server}/ui/search")
    page.fill("#q", "fires on a script tag")
    page.click("button[type=submit]")
    page.wait_for_selector("#hits")
    with Catalog.open(catalog) as cat:
        want = [(h["sae_id"], h["feature"]) for h in search(cat, "fires on a script tag", k=30)]
    assert [(r[0].split(" / ")[1], int(r[1])) for r in table(page, "#hits")] == want
    page.click("#hits tbody tr:first-child a")
    page.wait_for_selector(f"#feature-title:text-is('Feature {want[0][1]}')")

    # by token: every feature whose top examples fire on it, by brute force over the examples
    [(probe,)] = rows(catalog, "SELECT token FROM feature_examples WHERE list_contains(?, token) GROUP BY token "
                               "ORDER BY count(*) DESC, token LIMIT 1", [PROBES])
    page.goto(f"{server}/ui/search?{urlencode({'mode': 'token', 'q': probe})}")
    page.wait_for_selector("#hits")
    examples = rows(catalog, "SELECT sae, feature, token FROM feature_examples")
    counts: dict[tuple[int, int], int] = {}
    for sae, feature, token in examples:
        if token.strip().lower() == probe.lower():
            counts[(sae, feature)] = counts.get((sae, feature), 0) + 1
    names = dict(rows(catalog, "SELECT sae, sae_id FROM saes"))
    counts = {(names[s], f): n for (s, f), n in counts.items()}
    shown = [((r[0].split(" / ")[1], int(r[1])), int(r[2])) for r in table(page, "#hits")]
    firing = [(key, n) for key, n in shown if n]  # most examples first, then those found by the logit lens
    assert counts and [n for _, n in firing] == sorted(counts.values(), reverse=True)[:len(firing)]
    assert all(counts[key] == n for key, n in firing)
    assert not page.dialogs and page.evaluate("window.__pwned") is None

    # on a text: the SAE's activations at each token, against the model and SAE run by hand
    text = f"def loads(s):\n    return {PROBES[0]} + s"
    page.goto(f"{server}/ui/search")
    page.fill("#q", text)
    page.select_option("#mode", "text")
    page.select_option("#sae-choice", label=f"{RELEASE} / standard")
    page.click("button[type=submit]")
    page.wait_for_selector("#fired", timeout=120_000)
    acts = reference_acts(probe_model, sae_dirs["standard"], text)
    fired = table(page, "#fired")
    peaks = acts.max(axis=0)
    order = [f for f in np.argsort(-peaks, kind="stable") if peaks[f] > 0][:12]
    assert [int(r[0]) for r in fired] == order
    assert [number(r[1]) for r in fired] == pytest.approx(peaks[order].tolist(), rel=1e-2)
    shaded = page.eval_on_selector_all("#shaded-text .tok", "ts => ts.map(t => [t.textContent, t.title, t.className])")
    assert "".join(t for t, _, _ in shaded).replace("↵", "\n") == text
    assert [float(v) for _, v, _ in shaded] == pytest.approx(acts[:, order[0]].tolist(), rel=1e-2, abs=1e-6)
    page.click("#fired tbody tr:nth-child(2) a.shade-by")
    page.wait_for_selector(f"main p.summary a:text-is('{order[1]}')")  # the page shaded by the second feature
    screenshot(page, tmp_path, "search-text")
    assert not page.dialogs and page.evaluate("window.__pwned") is None


def reference_acts(model_folder: Path, sae_folder: Path, text: str) -> np.ndarray:
    """The SAE's activations on `text` without saecat: Hugging Face's GPT-2 (BOS prepended, its
    output dropped), the residual entering block 1, sae-lens' encode."""
    import torch
    from sae_lens import SAE
    from transformers import AutoTokenizer, GPT2Model

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        resid = GPT2Model.from_pretrained(model_folder).eval()(torch.tensor([ids]), output_hidden_states=True)
        acts = SAE.load_from_disk(str(sae_folder), device="cpu").eval().encode(resid.hidden_states[1][0])
    return acts.float().numpy()[1:]


def test_sql_console_pages_downloads_and_refusals(page, server, catalog, tmp_path):
    import pyarrow.parquet as pq

    query = ("SELECT feature, fire_count, top_tokens -- the logit lens\nFROM labelled_features "
             f"WHERE sae = 1 AND '{PROBES[1]}' <> 'x' ORDER BY feature")
    want = rows(catalog, query)
    page.goto(f"{server}/ui/sql")
    page.fill("#query", query)
    # highlighted as typed: the pieces sqlglot's tokenizer cuts, over the textarea, hostile text as text
    pieces = sql_pieces(query)
    assert {kind for _, kind in pieces} >= {"kw", "str", "num", "op", "com"}
    page.wait_for_function("n => document.querySelectorAll('#query-view span').length === n",
                           arg=sum(1 for _, kind in pieces if kind))
    shown = page.eval_on_selector_all("#query-view span", "ss => ss.map(s => [s.textContent, s.className])")
    assert shown == [[text, kind] for text, kind in pieces if kind]
    assert page.inner_text("#query-view").rstrip("\n") == query
    # a query too long to highlight as typed shows as the textarea's own text, then highlighted again
    page.fill("#query", "SELECT 1 -- " + "x" * SQL_HIGHLIGHT_CHARS)
    page.wait_for_selector("#editor:not(.highlighting)")
    assert page.eval_on_selector("#query", "q => getComputedStyle(q).color") != "rgba(0, 0, 0, 0)"
    page.fill("#query", query)
    page.wait_for_selector("#editor.highlighting")
    assert page.inner_text("#query-view").rstrip("\n") == query
    page.press("#query", "Control+Enter")  # runs it
    page.wait_for_selector("#result")
    assert f"{len(want)} rows" in page.inner_text("#result-count")
    assert [(int(r[0]), int(r[1])) for r in table(page, "#result")] == [(f, n) for f, n, _ in want[:50]]
    screenshot(page, tmp_path, "sql-editor")
    page.keyboard.press("ArrowRight")  # the next page, by keyboard as on the other pages
    page.wait_for_selector("#result-count:has-text('51 to')")
    assert [int(r[0]) for r in table(page, "#result")] == [f for f, _, _ in want[50:100]]
    with page.expect_download() as csv_download:
        page.click("#download-csv")
    lines = Path(csv_download.value.path()).read_text().splitlines()
    assert lines[0] == "feature,fire_count,top_tokens" and len(lines) == len(want) + 1
    with page.expect_download() as parquet_download:
        page.click("#download-parquet")
    got = pq.read_table(parquet_download.value.path())
    assert list(zip(*(c.to_pylist() for c in got.columns))) == want
    screenshot(page, tmp_path, "sql")

    # the SQL gate refuses writes, as POST /sql does, and the catalog is unchanged
    page.fill("#query", "DELETE FROM features")
    page.click("#run")
    page.wait_for_selector("#error")
    assert "SELECT" in page.inner_text("#error")
    assert rows(catalog, "SELECT count(*) FROM features WHERE sae = 1")[0][0] == len(want)
    # and a form posted from another site's page is refused before it runs
    other = f"<form method=post action='{server}/ui/sql'><input name=query value='SELECT 1'></form>"
    page.goto(f"data:text/html,{other}")  # a page of another origin (an opaque one)
    with page.expect_navigation():
        page.eval_on_selector("form", "f => f.submit()")
    assert "own page only" in page.inner_text("body")
    assert httpx.post(f"{server}/ui/sql", data={"query": "SELECT 1"},
                      headers={"Origin": "http://elsewhere.example"}).status_code == 403


def test_analyses_pages_show_stored_runs_with_their_figures(page, server, catalog, tmp_path):
    from queries import spectra

    result = spectra.run(catalog, RELEASE, "standard")
    page.goto(f"{server}/ui/analyses")
    page.wait_for_selector("#analyses")
    listed = [(int(r[0]), r[1]) for r in table(page, "#analyses")]
    assert listed == [(a, k) for a, k in rows(catalog, "SELECT analysis, kind FROM analyses ORDER BY analysis DESC")]
    page.click(f"#analyses a:text-is('{result.analysis}')")
    page.wait_for_selector("#analysis-title")
    page.wait_for_load_state("load")  # the figure is an image: loaded before the load event
    assert page.eval_on_selector("#figure", "img => img.naturalWidth") > 100
    assert json.loads(page.inner_text("#summary")) == json.loads(json.dumps(result.summary, default=str))
    screenshot(page, tmp_path, "analysis")
    assert not page.errors


def test_an_imported_neuronpedia_source_has_its_pages(browser, tmp_path):
    """An SAE known only from a Neuronpedia export (imported as users import one) is browsable:
    its features, each with its activation windows shaded by their values, its logit lens, its
    explanations and Neuronpedia's own cosine neighbours."""
    from ingest.neuronpedia import import_neuronpedia
    from neuronpedia_fixture import expected_source, make_source, write_export

    source = make_source(source_id="6-res-browse", n_features=60, seed=4, explanations_per_feature=(1, 2))
    db = tmp_path / "imported.duckdb"
    [done] = import_neuronpedia(write_export(tmp_path / "v1", source, "A"), db)
    want = {f.index: f for f in expected_source(source, "A").features}
    proc, url = serve(db)
    try:
        page = browser.new_page()
        page.goto(f"{url}/ui/")
        page.click(f"#saes a:text-is('{done.sae_id}')")
        page.wait_for_selector("#imported-note")
        listed = table(page, "#features")
        assert [int(r[0]) for r in listed] == sorted(want)[:50]
        assert [float(r[1]) for r in listed] == pytest.approx([want[i].frac_nonzero for i in sorted(want)[:50]],
                                                              rel=1e-2)
        page.click("#features a:text-is('0')")
        page.wait_for_selector("#feature-title:text-is('Feature 0')")
        feature = want[0]
        windows = sorted(feature.activations, key=lambda a: (-a.max_value, a.id))
        shown = page.eval_on_selector_all("#examples li .text", "ls => ls.map(l => [...l.querySelectorAll('.tok')]"
                                                                ".map(t => [t.textContent, t.className]))")
        assert len(shown) == len(windows) > 0
        for tokens, window in zip(shown, windows):
            assert [t for t, _ in tokens] == [visible(t) for t in window.tokens]
            assert [int(re.search(r"\bs(\d)\b", c).group(1)) for _, c in tokens] == [
                shade(v, feature.max_act_approx) for v in window.values]
        text = page.inner_text("main")
        assert all(e.description in text for e in feature.explanations)
        near = [int(r[0]) for r in table(page, "#neighbors")]
        assert near and near == [i for i in feature.top_cos_sim_indices if i != 0]
        assert "no co-occurrence" in text and not page.evaluate("window.__pwned")
        screenshot(page, tmp_path, "imported-feature")
    finally:
        proc.terminate()
        proc.wait(30)
