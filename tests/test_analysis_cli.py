"""The analyses from the command line, over a real ingestion (the fixture GPT-2, a sae-lens SAE,
stdlib code and prose with a `kind` field): `saecat lobes|spectra|crystals ... --json`, stored
results listed and redrawn, and bad input as one line. The analyses' values are proven in their
own test files; here, that the command runs the same code and stores what it prints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catalog import Catalog
from ingest import IngestOptions, ingest, resolve_source
from queries import analyses, lobes, spectra
from test_catalog import _main


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, sae_dirs, corpus):
    db = tmp_path_factory.mktemp("analysis_cli") / "catalog.duckdb"
    result = ingest(resolve_source(None, None, str(sae_dirs["standard"])),
                    IngestOptions(dataset=str(corpus), max_doc_tokens=256, block_size=32, group_column="kind",
                                  batch_tokens=2048, progress=False), db=db)
    return db, result.sae_id


def saecat(db, capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    return _main([*args, "--db", str(db)], capsys, monkeypatch)


def test_lobes_command_stores_what_it_prints(ingested, capsys, monkeypatch, tmp_path):
    db, sae_id = ingested
    figure = tmp_path / "lobes.png"
    code, out, err = saecat(db, capsys, monkeypatch, "lobes", "--sae-id", sae_id, "--n-lobes", "2,3",
                            "--affinity", "phi", "--affinity", "jaccard", "--permutations", "10",
                            "--null-repeats", "2", "--json", "--figure", str(figure))
    assert code == 0, err
    got = json.loads(out)
    assert got["kind"] == "lobes" and not got["cached"]
    assert got["params"]["n_lobes"] == [2, 3] and got["params"]["affinities"] == ["phi", "jaccard"]
    with Catalog.open(db) as cat:
        d_sae = cat.con.execute("SELECT d_sae FROM saes").fetchall()[0][0]
        counts = cat.con.execute("SELECT affinity, n_lobes, count(*) FROM lobes WHERE analysis = ? "
                                 "GROUP BY ALL ORDER BY ALL", [got["analysis"]]).fetchall()
        groups = {r[0] for r in cat.con.execute("SELECT DISTINCT group_value FROM lobe_documents").fetchall()}
    assert counts == [(a, n, d_sae) for a in ("geometry", "jaccard", "phi") for n in (2, 3)]
    assert groups <= {"code", "prose"} and groups
    assert figure.read_bytes().startswith(b"\x89PNG")
    again = lobes.run(db, "local", sae_id, params=lobes.LobesParams(affinities=("phi", "jaccard"), n_lobes=(2, 3),
                                                                    permutations=10, null_repeats=2))
    assert again.cached and again.analysis == got["analysis"]


def test_spectra_command_per_sae_and_per_release(ingested, capsys, monkeypatch, tmp_path):
    db, sae_id = ingested
    code, out, err = saecat(db, capsys, monkeypatch, "spectra", "--release", "local", "--sae-id", sae_id,
                            "--rank-min", "2", "--rank-max", "20", "--entropy-rows", "200", "--entropy-dims", "10",
                            "--json")
    assert code == 0, err
    got = json.loads(out)
    with Catalog.open(db) as cat:
        key = cat.find_sae("local", sae_id).sae
        dec = cat.decoders(key).astype(np.float64)
        activation = [r[0] for r in cat.con.execute(
            "SELECT eigenvalue FROM activation_spectrum WHERE sae = ? ORDER BY rank", [key]).fetchall()]
    rows = got["tables"]["spectra"]
    np.testing.assert_allclose([r["eigenvalue"] for r in rows], np.linalg.eigvalsh(np.cov(dec.T))[::-1], rtol=1e-6)
    assert [r["activation_eigenvalue"] for r in rows] == pytest.approx(activation)
    figure = tmp_path / "layers.svg"
    code, out, err = saecat(db, capsys, monkeypatch, "spectra", "--release", "local", "--rank-min", "2",
                            "--rank-max", "20", "--entropy-rows", "200", "--entropy-dims", "10", "--figure",
                            str(figure), "--json")
    assert code == 0, err
    [layer] = json.loads(out)  # the stored run, reused for the release summary
    assert layer["cached"] and layer["analysis"] == got["analysis"] and layer["summary"] == got["summary"]
    assert b"<svg" in figure.read_bytes()


def test_crystals_command_both_modes(ingested, capsys, monkeypatch):
    db, sae_id = ingested
    code, out, err = saecat(db, capsys, monkeypatch, "crystals", "--sae-id", sae_id, "--top", "5",
                            "--distractor", "pc:1", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["kind"] == "crystals" and len(got["tables"]["crystals"]) == 5
    code, out, err = saecat(db, capsys, monkeypatch, "crystals", "--sae-id", sae_id, "--words", "builtin",
                            "--task", "country-capital", "--task", "singular-plural", "--json")
    assert code == 0, err
    words = json.loads(out)
    assert words["kind"] == "word_pairs"
    assert {r["task"] for r in words["tables"]["crystal_tasks"]} == {"country-capital", "singular-plural"}


def test_stored_analyses_are_listed_and_redrawn(ingested, capsys, monkeypatch, tmp_path):
    db, sae_id = ingested
    first = spectra.run(db, "local", sae_id, params=spectra.SpectraParams(rank_min=2, rank_max=20, entropy_rows=200,
                                                                         entropy_dims=10, seed=7))
    code, out, err = saecat(db, capsys, monkeypatch, "analyses", "--kind", "spectra", "--json")
    assert code == 0, err
    assert first.analysis in [a["analysis"] for a in json.loads(out)]
    figure = tmp_path / "again.png"
    code, out, err = saecat(db, capsys, monkeypatch, "analysis", str(first.analysis), "--figure", str(figure))
    assert code == 0, err
    assert figure.read_bytes().startswith(b"\x89PNG") and "from the catalog" in out
    with Catalog.open(db) as cat:
        assert analyses.load_analysis(cat, first.analysis).summary == first.summary


@pytest.mark.parametrize("args,named", [
    (["lobes", "--sae-id", "nope"], "no SAE"),
    (["lobes", "--sae-id", "{sae}", "--n-lobes", "two"], "comma-separated integers"),
    (["lobes", "--sae-id", "{sae}", "--affinity", "cosine"], "cosine"),
    (["spectra", "--sae-id", "{sae}"], "--release"),
    (["spectra"], "name one SAE"),
    (["crystals", "--sae-id", "{sae}", "--task", "x"], "word-pair mode"),
    (["analysis", "4242"], "no analysis 4242"),
])
def test_bad_input_is_one_line(ingested, capsys, monkeypatch, args, named):
    db, sae_id = ingested
    code, out, err = saecat(db, capsys, monkeypatch, *[a.format(sae=sae_id) for a in args])
    assert code == 1
    assert named in err and "Traceback" not in err


def test_tour_shows_the_catalogs_own_answers(ingested, capsys, monkeypatch, tmp_path):
    from queries.crystals import with_labels
    from queries.neighbors import neighbors
    from queries.front.tour import tour

    db, sae_id = ingested
    seen = tour(db, "local", sae_id, figures=tmp_path, top=4, k=3)
    with Catalog.open(db) as cat:
        key = cat.find_sae("local", sae_id).sae
        counts = np.array([r[0] for r in cat.con.execute(
            "SELECT fire_count FROM features WHERE sae = ? ORDER BY feature", [key]).fetchall()])
        n_tokens = cat.con.execute("SELECT n_tokens FROM saes WHERE sae = ?", [key]).fetchall()[0][0]
        fired_on: dict[int, list[str]] = {}
        for feature, token in cat.con.execute("SELECT feature, token FROM feature_examples WHERE sae = ?", [key]).fetchall():
            fired_on.setdefault(feature, []).append(token.strip().lower())
        sampled = cat.con.execute("SELECT count(*) FROM blocks WHERE sae = ?", [key]).fetchall()[0][0]
        stored = cat.con.execute("SELECT count(*) FROM analyses").fetchall()[0][0]
        l0, explained, dead, d_sae = cat.con.execute(
            "SELECT l0, explained_variance, dead_latents, d_sae FROM sae_quality JOIN saes USING (sae) WHERE sae = ?",
            [key]).fetchone()
    # features worth a look: mid-density first, then by how much their top examples agree on a word of
    # two or more characters they fire on, then the most frequent, one feature per word; the first one's neighbours
    def word(feature: int) -> str:
        tokens = fired_on[feature]
        return max(sorted(set(tokens)), key=tokens.count)

    def rank(feature: int) -> tuple:
        tokens = fired_on[feature]
        return (not 1e-3 <= counts[feature] / n_tokens <= 5e-2, -tokens.count(word(feature)) / len(tokens),
                -counts[feature], feature)

    candidates = [f for f in fired_on if len(fired_on[f]) >= 4 and len(word(f)) >= 2 and any(map(str.isalnum, word(f)))]
    expected, words = [], set()
    for f in sorted(candidates, key=rank):  # one feature per word, the best ranked
        if word(f) not in words:
            expected.append(f)
            words.add(word(f))
    expected = expected[:4]
    assert seen.features.column("feature").to_pylist() == expected
    assert seen.features.column("fire_count").to_pylist() == counts[expected].tolist()
    with Catalog.open(db) as cat:
        near = neighbors(cat, key, [expected[0]], 3)
    assert seen.neighbors.column("feature").to_pylist() == near.column("feature").to_pylist()
    # the analyses are stored runs with their defaults, lobes at n = 2 only
    assert seen.crystal == with_labels(seen.crystals)[0]
    assert seen.lobes.params["n_lobes"] == [2]
    rows = seen.lobe_rows()
    assert len(rows) == 2 and sum(r["features"] for r in rows) == seen.lobes.summary["n_included"]
    unwon = (seen.lobes.summary["blocks_without_lobe"] or {}).get("phi/2", 0)
    assert sum(r["blocks_won"] for r in rows) + unwon == sampled
    assert set(seen.figures) == {"crystals", "lobes", "spectrum"}
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in seen.figures.values())
    # the command prints the same tour, reading the stored analyses back instead of adding runs
    code, out, err = saecat(db, capsys, monkeypatch, "tour", "--sae-id", sae_id, "--top", "4", "-k", "3")
    assert code == 0, err
    assert f"nearest neighbours of feature {expected[0]}" in out and "two lobes" in out
    assert f"/ui/feature?release=local&sae_id={sae_id}&feature={expected[0]}" in out.replace("\n", "")
    assert (f"quality: L0 {l0:.1f}, explained variance {explained:.3f}, {dead:,} of {d_sae:,} latents dead"
            in out.replace("\n", " ")) and dead == int((counts == 0).sum())
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT count(*) FROM analyses").fetchall()[0][0] == stored
