"""`saecat export neuronpedia`: an export passes the importer's rules and imports back to the same values."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from catalog import Catalog, writer
from catalog.errors import SaecatError
from catalog.neuronpedia import check_export, export_neuronpedia
from ingest import IngestOptions, ingest, resolve_source
from ingest.neuronpedia import import_neuronpedia
from tests.neuronpedia_fixture import make_source, write_export


OWN = [("gpt-4o-mini", "token-act-pair/1", "the word \"to\" <b>in</b> code", 0.75),
       ("/models/gemma-3-270m-it/", "token-act-pair/1", "numbers, ¼ and ½", None),
       ("Qwen/Qwen3-8B", "token-act-pair/1", "punctuation", 0.5)]


def _rows(db, query: str, params: list | None = None) -> list[tuple]:
    with Catalog.open(db) as cat:
        return cat.con.execute(query, params or []).fetchall()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, registry_sae, corpus):
    """The registry SAE (Neuronpedia's gpt2-small/1-res-jb) ingested, with Neuronpedia's explanations imported."""
    root = tmp_path_factory.mktemp("np-export")
    db = root / "catalog.duckdb"
    release, sae_id = registry_sae
    ingest(resolve_source(release, sae_id, None),
           IngestOptions(dataset=str(corpus), max_tokens=3000, top_k=4, context_tokens=3, progress=False), db=db)
    import_neuronpedia(write_export(root / "v1", make_source(source_id="1-res-jb", n_features=96, seed=11), "B+D"), db)
    with writer(db) as cat:  # saecat's own explanations, as `saecat explain` writes them
        sae = cat.find_sae(release, sae_id).sae
        cat.con.executemany("INSERT INTO feature_explanations (sae, feature, explainer, method, explanation, score) "
                            "VALUES (?, ?, ?, ?, ?, ?)", [[sae, f, *OWN[f % 3]] for f in range(0, 96, 5)])
    with Catalog.open(db) as cat:
        folder = export_neuronpedia(cat, sae, root / "out")
    back = root / "back.duckdb"
    [imported] = import_neuronpedia(folder, back)
    return {"db": db, "sae": sae, "folder": folder, "back": back, "imported": imported}


def test_the_export_is_laid_out_as_neuronpedia_and_breaks_none_of_its_importers_rules(ingested):
    folder = ingested["folder"]
    assert folder.relative_to(folder.parents[1]).as_posix() == "gpt2-small/1-res-jb"  # the registry's id
    assert {p.name for p in folder.iterdir()} == {"model.jsonl", "source.jsonl", "sourceset.jsonl", "release.jsonl",
                                                  "features", "activations", "explanations"}
    assert [p.name for p in (folder / "features").iterdir()] == ["batch-0.jsonl.gz"]
    assert check_export(folder) == []


def test_features_import_back_as_the_catalogs_statistics_and_labels(ingested):
    db, back, sae = ingested["db"], ingested["back"], ingested["sae"]
    want = _rows(db, """
        SELECT f.feature, f.fire_count / s.n_tokens, coalesce(f.max_activation, 0),
               (SELECT list(token ORDER BY rank) FROM feature_tokens t
                WHERE t.sae = f.sae AND t.feature = f.feature AND direction = 'top'),
               (SELECT list(count ORDER BY bin) FROM feature_histograms h WHERE h.sae = f.sae AND h.feature = f.feature)
        FROM features f JOIN saes s USING (sae) WHERE f.sae = ? ORDER BY f.feature""", [sae])
    got = _rows(back, "SELECT feature, frac_nonzero, max_act_approx, pos_str, freq_hist_heights "
                      "FROM neuronpedia_features ORDER BY feature")
    assert len(got) == len(want) == 96
    for g, w in zip(got, want):
        assert g[0] == w[0] and g[1] == pytest.approx(w[1], rel=1e-12) and g[2] == pytest.approx(w[2], rel=1e-6)
        assert g[3] == w[3] and g[4] == [float(c) for c in (w[4] or [])]


def test_activations_import_back_as_the_examples_with_their_per_token_values(ingested):
    want = _rows(ingested["db"], "SELECT feature, context, context_values FROM feature_examples WHERE sae = ? "
                                 "ORDER BY feature, rank", [ingested["sae"]])
    got = _rows(ingested["back"], "SELECT feature, tokens, \"values\", max_value, max_value_token_index, bin_min "
                                  "FROM neuronpedia_activations ORDER BY feature, max_value DESC")
    assert len(got) == len(want) > 96
    for (feature, tokens, values, top, at, bin_min), (f, context, context_values) in zip(got, want):
        assert (feature, tokens) == (f, context)
        np.testing.assert_array_equal(np.float32(values), np.float32(context_values))
        assert values[at] == top == max(values) and bin_min == -1


def test_explanations_import_back_unchanged_with_saecats_own(ingested):
    columns = "feature, description, type_name, explanation_model_name, embedding"
    imported = _rows(ingested["db"], f"SELECT {columns} FROM neuronpedia_explanations WHERE sae = ?", [ingested["sae"]])
    models = {"gpt-4o-mini": "gpt-4o-mini", "/models/gemma-3-270m-it/": "gemma-3-270m-it", "Qwen/Qwen3-8B": "Qwen3-8B"}
    own = [(f, text, "saecat_token-act-pair-v1", models[explainer], None)
           for f in range(0, 96, 5) for explainer, _, text, _ in [OWN[f % 3]]]
    assert len(imported) > 20
    got = _rows(ingested["back"], f"SELECT {columns} FROM neuronpedia_explanations")
    assert sorted(got, key=repr) == sorted(imported + own, key=repr)
    ids = _rows(ingested["back"], "SELECT id FROM neuronpedia_explanations")
    assert len(set(ids)) == len(ids)


def test_the_config_beside_names_every_type_and_model_of_saecats_explanations(ingested):
    config = ingested["folder"].parents[1] / "config"
    types = [json.loads(line) for line in (config / "explanation_type.jsonl").read_text().splitlines()]
    models = [json.loads(line) for line in (config / "explanation_model_type.jsonl").read_text().splitlines()]
    assert [t["name"] for t in types] == ["saecat_token-act-pair-v1"]
    assert sorted(m["name"] for m in models) == ["Qwen3-8B", "gemma-3-270m-it", "gpt-4o-mini"]
    required = {"explanation_type.jsonl": ("name", "displayName", "description", "creatorName", "creatorId"),
                "explanation_model_type.jsonl": ("name", "displayName", "description", "creatorName")}
    for file, rows in (("explanation_type.jsonl", types), ("explanation_model_type.jsonl", models)):
        assert all(row[key] is not None for row in rows for key in required[file])
    # a second export into the same folder keeps the names already there
    (config / "explanation_model_type.jsonl").write_text(
        (config / "explanation_model_type.jsonl").read_text() + json.dumps({**models[0], "name": "other"}) + "\n")
    with Catalog.open(ingested["db"]) as cat:
        export_neuronpedia(cat, ingested["sae"], ingested["folder"].parents[1])
    again = [json.loads(line)["name"] for line in (config / "explanation_model_type.jsonl").read_text().splitlines()]
    assert sorted(again) == ["Qwen3-8B", "gemma-3-270m-it", "gpt-4o-mini", "other"]


def test_an_imported_source_exports_and_imports_back_to_the_same_rows(tmp_path):
    folder = write_export(tmp_path / "v1", make_source(seed=12), "A+D", batch_size=9)
    first = tmp_path / "first.duckdb"
    [source] = import_neuronpedia(folder, first)
    with Catalog.open(first) as cat:
        out = export_neuronpedia(cat, source.sae, tmp_path / "out")
    assert check_export(out) == []
    second = tmp_path / "second.duckdb"
    import_neuronpedia(out, second)
    for table in ("neuronpedia_features", "neuronpedia_activations"):
        assert _rows(second, f"SELECT * EXCLUDE (sae) FROM {table} ORDER BY ALL") == _rows(
            first, f"SELECT * EXCLUDE (sae) FROM {table} ORDER BY ALL"), table
    columns = "feature, id, description, type_name, explanation_model_name, embedding"
    assert _rows(second, f"SELECT {columns} FROM neuronpedia_explanations ORDER BY ALL") == _rows(
        first, f"SELECT {columns} FROM neuronpedia_explanations ORDER BY ALL")


def _edit(path, line: int, change) -> None:
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    lines[line - 1] = json.dumps(change(json.loads(lines[line - 1])))
    with gzip.open(path, "wt", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines))


@pytest.mark.parametrize("kind,change,rule", [
    ("features", lambda r: {k: v for k, v in r.items() if k != "frac_nonzero"}, "keys differ from the file's first"),
    ("features", lambda r: {**r, "index": int(r["index"])}, "is not a string of digits"),
    ("activations", lambda r: {**r, "maxValue": None}, "maxValue is null"),
    ("activations", lambda r: {**r, "index": "999999"}, "feature 999999 is not in features/"),
    ("activations", lambda r: {**r, "values": r["values"][:-1]}, "values for"),
    ("activations", lambda r: {**r, "maxValueTokenIndex": r["maxValueTokenIndex"] + 1}, "disagree with values"),
    ("explanations", lambda r: {**r, "authorId": "someone"}, "is not the default user"),
    ("explanations", lambda r: {**r, "id": "x1"}, "is not cuid-shaped"),
], ids=["keys", "index", "null", "foreign-key", "lengths", "max-index", "author", "id"])
def test_the_checker_catches_each_rule(ingested, tmp_path, kind, change, rule):
    folder = tmp_path / "copy"
    shutil.copytree(ingested["folder"], folder)
    _edit(folder / kind / "batch-0.jsonl.gz", 2, change)
    problems = check_export(folder)
    assert len(problems) >= 1 and rule in problems[0] and f"{kind}/batch-0.jsonl.gz:2:" in problems[0]


def test_an_sae_with_nothing_to_export_is_refused(tmp_path):
    from catalog.store import writer

    with writer(tmp_path / "catalog.duckdb") as cat:
        [(sae,)] = cat.con.execute("INSERT INTO saes (release, sae_id, status) VALUES ('r', 's', 'registered') "
                                   "RETURNING sae").fetchall()
        with pytest.raises(SaecatError, match="no features to export: ingest it or import"):
            export_neuronpedia(cat, sae, tmp_path / "out")


def test_the_cli_writes_the_folder_and_lists_its_files(ingested, registry_sae, tmp_path):
    from typer.testing import CliRunner

    from queries.front.cli import app

    release, sae_id = registry_sae
    result = CliRunner().invoke(app, ["export", "neuronpedia", str(tmp_path), "--release", release, "--sae-id", sae_id,
                                      "--db", str(ingested["db"]), "--json"])
    assert result.exit_code == 0, result.output
    files = {r["file"] for r in json.loads(result.stdout)}
    assert {"gpt2-small/1-res-jb/source.jsonl", "gpt2-small/1-res-jb/activations/batch-0.jsonl.gz"} <= files
    assert check_export(tmp_path / "gpt2-small" / "1-res-jb") == []
