"""`saecat import neuronpedia`: every producer's layout imports, and SQL returns the fixture's values."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from catalog import Catalog
from catalog.errors import SaecatError
from ingest import IngestOptions, ingest, resolve_source
from ingest import neuronpedia
from ingest.neuronpedia import import_neuronpedia
from tests.neuronpedia_fixture import PRODUCERS, expected_source, make_source, write_explanations_folder, write_export

FEATURE_COLUMNS = ("feature, frac_nonzero, max_act_approx, pos_str, pos_values, neg_str, neg_values, "
                   "freq_hist_heights, freq_hist_values, logits_hist_heights, logits_hist_values, "
                   "top_cos_sim_indices, top_cos_sim_values")


def _rows(db, query: str, params: list | None = None) -> list[tuple]:
    with Catalog.open(db) as cat:
        return cat.con.execute(query, params or []).fetchall()


def _want_features(source) -> list[tuple]:
    return sorted((f.index, f.frac_nonzero, f.max_act_approx, f.pos_str, f.pos_values, f.neg_str, f.neg_values,
                   f.freq_hist_heights, f.freq_hist_values, f.logits_hist_heights, f.logits_hist_values,
                   f.top_cos_sim_indices, f.top_cos_sim_values) for f in source.features)


def _want_activations(source) -> list[tuple]:
    return sorted((f.index, a.id, a.tokens, a.values, a.max_value, a.min_value, a.max_value_token_index,
                   a.bin_min, a.bin_max, a.bin_contains, a.qualifying_token_index)
                  for f in source.features for a in f.activations)


def _float32(values):
    return None if values is None else np.asarray(values, dtype=np.float32).tolist()


def _want_explanations(source) -> list[tuple]:
    return sorted((f.index, e.id, e.description, e.type_name, e.explanation_model_name, e.author_id,
                   _float32(e.embedding)) for f in source.features for e in f.explanations)


def _got(db, sae: int) -> tuple[list, list, list]:
    features = _rows(db, f"SELECT {FEATURE_COLUMNS} FROM neuronpedia_features WHERE sae = ? ORDER BY feature", [sae])
    activations = _rows(db, "SELECT feature, id, tokens, \"values\", max_value, min_value, max_value_token_index, "
                            "bin_min, bin_max, bin_contains, qualifying_token_index FROM neuronpedia_activations "
                            "WHERE sae = ? ORDER BY feature, id", [sae])
    explanations = _rows(db, "SELECT feature, id, description, type_name, explanation_model_name, author_id, "
                             "embedding FROM neuronpedia_explanations WHERE sae = ? ORDER BY feature, id", [sae])
    return features, activations, explanations


@pytest.mark.parametrize("batch_size", [None, 7], ids=["producer-batches", "small-batches"])
@pytest.mark.parametrize("producer", PRODUCERS)
def test_each_producers_export_imports_with_its_values(tmp_path, producer, batch_size):
    truth = make_source(n_features=40, seed=3)
    folder = write_export(tmp_path / "v1", truth, producer, batch_size=batch_size)
    [done] = import_neuronpedia(folder, tmp_path / "catalog.duckdb")
    want = expected_source(truth, producer)
    features, activations, explanations = _got(tmp_path / "catalog.duckdb", done.sae)
    assert features == _want_features(want)
    assert activations == _want_activations(want)
    assert explanations == _want_explanations(want)
    assert (done.n_features, done.n_activations, done.n_explanations) == (len(features), len(activations),
                                                                         len(explanations))
    assert len(activations) > 40 and (producer == "B" or len(explanations) > 20)


def test_rows_repeated_across_batch_files_import_once(tmp_path):
    truth = make_source(n_features=20, seed=6)
    folder = write_export(tmp_path / "v1", truth, "B+D", batch_size=7)
    for kind in ("features", "activations", "explanations"):  # a re-run of one batch, written beside the first
        first = sorted((folder / kind).iterdir())[0]
        (folder / kind / f"batch-99{''.join(first.suffixes)}").write_bytes(first.read_bytes())
    [done] = import_neuronpedia(folder, tmp_path / "catalog.duckdb")
    want = expected_source(truth, "B+D")
    assert _got(tmp_path / "catalog.duckdb", done.sae) == (_want_features(want), _want_activations(want),
                                                           _want_explanations(want))


def test_a_model_folder_and_v1_import_every_source_and_sibling_explanation_folders(tmp_path):
    root = tmp_path / "v1"
    first, second = make_source(source_id="8-res-jb", seed=1), make_source(source_id="9-res-jb", seed=2)
    write_export(root, first, "A")
    write_export(root, second, "B+D")
    sibling = make_source(source_id="8-res-jb", seed=5)
    write_explanations_folder(root, sibling, "gpt-4o-mini")
    (root / "config").mkdir()
    (root / "config" / "explanation_type.jsonl").write_text('{"name": "oai_token-act-pair"}\n')
    (root / "gpt2-small" / "headvis" / "pile").mkdir(parents=True)  # a model-level folder that is not a source
    db = tmp_path / "catalog.duckdb"
    done = {d.ref: d for d in import_neuronpedia(root, db)}
    assert set(done) == {"gpt2-small/8-res-jb", "gpt2-small/9-res-jb"}
    [(folders,)] = _rows(db, "SELECT list(DISTINCT folder ORDER BY folder) FROM neuronpedia_explanations "
                             "WHERE sae = ?", [done["gpt2-small/8-res-jb"].sae])
    assert folders == ["explanations", "explanations-gpt-4o-mini"]
    again = {d.ref: d for d in import_neuronpedia(root / "gpt2-small", db)}  # the model folder: the same sources
    assert again == done


def test_a_source_without_registry_entry_becomes_its_own_sae_and_reimporting_changes_nothing(tmp_path):
    folder = write_export(tmp_path / "v1", make_source(seed=4), "C+D")
    db = tmp_path / "catalog.duckdb"
    [first] = import_neuronpedia(folder, db)
    before = _got(db, first.sae)
    [second] = import_neuronpedia(folder, db)
    assert second == first and _got(db, first.sae) == before
    assert _rows(db, "SELECT release, sae_id, status, neuronpedia_id, layer, source FROM saes") == [
        ("neuronpedia:gpt2-small", "8-res-jb", "registered", "gpt2-small/8-res-jb", 8, "neuronpedia")]
    assert _rows(db, "SELECT model_id, source_id, set_name, n_features FROM neuronpedia_sources") == [
        ("gpt2-small", "8-res-jb", "res-jb", 40)]


def test_a_source_maps_to_its_registry_sae_and_never_touches_its_ingested_rows(tmp_path, registry_sae, corpus):
    release, sae_id = registry_sae  # gpt2-small-res-jb, whose registry entry names gpt2-small/1-res-jb
    db = tmp_path / "catalog.duckdb"
    options = IngestOptions(dataset=str(corpus), max_tokens=2000, progress=False)
    ingest(resolve_source(release, sae_id, None), options, db=db)
    own = _rows(db, "SELECT * FROM features ORDER BY feature")
    truth = make_source(source_id="1-res-jb", n_features=96, seed=6)
    [done] = import_neuronpedia(write_export(tmp_path / "v1", truth, "B+D"), db)
    assert (done.release, done.sae_id, done.status) == (release, sae_id, "ready")
    assert _rows(db, "SELECT * FROM features ORDER BY feature") == own
    ingest(resolve_source(release, sae_id, None), options, db=db, force=True)
    assert _got(db, done.sae)[0] == _want_features(expected_source(truth, "B+D"))  # a re-ingestion keeps them
    with Catalog.open(db) as cat:  # and SQL joins the two by (sae, feature)
        result = cat.sql("SELECT count(*) FROM features f JOIN neuronpedia_features n USING (sae, feature)")
    assert result.rows == [(96,)]


def _rewrite_line(path, number: int, text: str) -> None:
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    lines[number - 1] = text
    with gzip.open(path, "wt", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines))


@pytest.mark.parametrize("damage,message", [
    (lambda row: "{not json", r"activations/batch-0\.jsonl\.gz:3: not JSON"),
    (lambda row: json.dumps({**row, "values": "1, 2"}), r"activations/batch-0\.jsonl\.gz:3: values is missing or not "
                                                        r"a list of numbers"),
    (lambda row: json.dumps({k: v for k, v in row.items() if k != "index"}), r":3: index is missing or not an integer"),
    (lambda row: json.dumps({**row, "layer": "9-res-jb"}), r":3: layer 9-res-jb is not this source \(8-res-jb\)"),
    (lambda row: json.dumps({**row, "tokens": row["tokens"][:-1]}), r":3: tokens and values differ in length"),
], ids=["json", "type", "missing", "layer", "lengths"])
def test_a_malformed_line_names_its_file_and_line_and_commits_nothing(tmp_path, damage, message):
    good = write_export(tmp_path / "v1", make_source(source_id="7-res-jb", seed=8), "B")
    bad = write_export(tmp_path / "v1", make_source(seed=7), "B")
    path = bad / "activations" / "batch-0.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        row = json.loads(f.read().split("\n")[2])
    _rewrite_line(path, 3, damage(row))
    db = tmp_path / "catalog.duckdb"
    with pytest.raises(SaecatError, match=message) as caught:
        import_neuronpedia(good.parent, db)
    assert "\n" not in str(caught.value)
    assert _rows(db, "SELECT count(*) FROM saes") == [(0,)]
    assert _rows(db, "SELECT count(*) FROM neuronpedia_activations") == [(0,)]


def test_an_interrupted_import_resumes_without_reading_staged_files_again(tmp_path, monkeypatch):
    folder = write_export(tmp_path / "v1", make_source(seed=9), "A+D", batch_size=7)
    db = tmp_path / "catalog.duckdb"
    commit = neuronpedia._commit

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(neuronpedia, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        import_neuronpedia(folder, db)
    assert _rows(db, "SELECT count(*) FROM neuronpedia_sources") == [(0,)]
    changed = folder / "activations" / "batch-0.jsonl.gz"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))  # touched since
    monkeypatch.setattr(neuronpedia, "_commit", commit)
    reads = []
    stage_query = neuronpedia._stage_query
    monkeypatch.setattr(neuronpedia, "_stage_query", lambda *a: reads.append(a[1]) or stage_query(*a))
    [done] = import_neuronpedia(folder, db)
    assert reads == [changed] and done.n_activations > 0
    assert not any((db.parent / "catalog.duckdb.d" / "imports").iterdir())  # staging is gone once committed


def test_a_folder_without_sources_is_a_clear_error(tmp_path):
    with pytest.raises(SaecatError, match="no Neuronpedia source in"):
        import_neuronpedia(tmp_path, tmp_path / "catalog.duckdb")
    with pytest.raises(SaecatError, match="is not a folder"):
        import_neuronpedia(tmp_path / "missing", tmp_path / "catalog.duckdb")


def test_the_cli_imports_reports_each_source_and_sql_reads_it(tmp_path):
    from typer.testing import CliRunner

    from queries.front.cli import app

    folder = write_export(tmp_path / "v1", make_source(seed=10), "A")
    db = tmp_path / "catalog.duckdb"
    result = CliRunner().invoke(app, ["import", "neuronpedia", str(tmp_path / "v1"), "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert (row["source"], row["release"], row["status"], row["features"]) == (
        "gpt2-small/8-res-jb", "neuronpedia:gpt2-small", "registered", 40)
    assert "no sae-lens registry entry names it" in result.stderr
    bad = CliRunner().invoke(app, ["import", "neuronpedia", str(folder / "features"), "--db", str(db)])
    assert isinstance(bad.exception, SaecatError) and "no Neuronpedia source in" in str(bad.exception)
