"""Checks of the Neuronpedia export fixture (tests/neuronpedia_fixture.py) against the format rules of
/work/shared/docs/neuronpedia-format.md, reading the files back with gzip and json only."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from neuronpedia_fixture import (
    DEFAULT_CREATOR_ID,
    EMBEDDING_DIMENSIONS,
    PRODUCERS,
    Source,
    expected_source,
    make_source,
    write_explanations_folder,
    write_export,
)

# Key lists transcribed from the doc (§4.1-4.3) and, for B/C/D, from the NP db_models dataclasses it cites.
A_FEATURE_KEYS = [
    "modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "neuron_alignment_indices", "neuron_alignment_l1", "neuron_alignment_values", "correlated_neurons_indices",
    "correlated_neurons_l1", "correlated_neurons_pearson", "decoder_weights_dist", "neg_str", "neg_values",
    "pos_str", "pos_values", "sourceSetName", "topkCosSimIndices", "topkCosSimValues", "vector", "vectorLabel",
    "hookName", "vectorDefaultSteerStrength", "hasVector"]
A_ACTIVATION_KEYS = [
    "id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "maxValue", "minValue", "values",
    "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex", "binContains", "binMin", "binMax"]
A_EXPLANATION_KEYS = [
    "id", "modelId", "layer", "index", "authorId", "description", "embedding", "typeName", "explanationModelName",
    "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity"]
BC_FEATURE_KEYS = [
    "modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector", "vectorLabel",
    "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues", "neuron_alignment_indices",
    "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson",
    "correlated_neurons_l1", "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "decoder_weights_dist", "sourceSetName"]
BC_ACTIVATION_KEYS = [
    "id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values", "creatorId",
    "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue", "createdAt", "lossValues",
    "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex", "zIndices", "zValues"]
D_EXPLANATION_KEYS = [
    "id", "modelId", "layer", "index", "description", "authorId", "embedding", "triggeredById", "typeName",
    "explanationModelName", "notes", "createdAt"]
ROOT_FILES = {"model.jsonl", "source.jsonl", "sourceset.jsonl", "release.jsonl"}
A_ROOT_FILES = ROOT_FILES | {"inference_hosts.jsonl", "inference_hosts_on_source.jsonl"}
BATCH = re.compile(r"batch-(\d+)\.jsonl(\.gz)?")


@pytest.fixture(scope="module")
def truth() -> Source:
    return make_source()


def read_rows(path: Path) -> list[dict]:
    """JSONL lines split on "\\n" only (U+2028 in a token is not a line break)."""
    data = path.read_bytes()
    text = (gzip.decompress(data) if path.name.endswith(".gz") else data).decode("utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def batch_files(folder: Path) -> list[Path]:
    """batch-<N>.jsonl[.gz] files of a folder, numerically (the names sort as text otherwise)."""
    files = [p for p in folder.iterdir() if BATCH.fullmatch(p.name)]
    return sorted(files, key=lambda p: int(BATCH.fullmatch(p.name).group(1)))


def numbers(files: list[Path]) -> list[int]:
    return [int(BATCH.fullmatch(p.name).group(1)) for p in files]


def indices(rows: list[dict]) -> list[int]:
    return [int(r["index"]) for r in rows]


def test_make_source_ground_truth(truth: Source) -> None:
    assert make_source() == truth and make_source(seed=1) != truth
    assert (truth.model_id, truth.source_id, truth.set_name) == ("gpt2-small", "8-res-jb", "res-jb")
    features = truth.features
    assert [f.index for f in features] == list(range(40))
    counts = Counter(len(f.activations) for f in features)
    assert counts[0] >= 2 and counts[3] >= 2 and len(counts) == 4  # 0..windows windows, some none
    first = features[0]
    assert first.activations[0].max_value == first.activations[1].max_value == first.max_act_approx  # tie
    tied = first.activations[2].values
    assert tied.count(max(tied)) == 2 and first.activations[2].max_value_token_index == tied.index(max(tied))
    assert features[2].activations and features[2].max_act_approx == 0 and not features[2].explanations  # dead
    tokens = {t for f in features for a in f.activations for t in a.tokens}
    assert {" the", "\n", "▁x", "é", 'say "hi" \\o/', "\u2028"} <= tokens
    explained = [f for f in features if f.explanations]
    assert any(len(f.explanations) > 1 for f in explained) and len(explained) < len(features)
    assert len({e.explanation_model_name for f in explained for e in f.explanations}) == 3
    for f in features:
        assert 0 <= f.frac_nonzero <= 1
        assert f.max_act_approx == max((a.max_value for a in f.activations), default=0.0)
        for a in f.activations:
            assert len(a.values) == len(a.tokens) == 24 and 0.0 in a.values
            assert all(round(v, 5) == v == json.loads(json.dumps(v)) for v in a.values)
            if a.bin_min == -1:
                assert a.bin_contains == -1 and a.bin_max == round(f.max_act_approx, 3)
        for e in f.explanations:
            assert e.embedding is None or len(e.embedding) == EMBEDDING_DIMENSIONS
            assert e.author_id == DEFAULT_CREATOR_ID


@pytest.mark.parametrize("producer", PRODUCERS)
def test_layout_keys_and_index_types(tmp_path: Path, truth: Source, producer: str) -> None:
    folder = write_export(tmp_path, truth, producer)
    assert folder == tmp_path / "gpt2-small" / "8-res-jb"
    root_files = {p.name for p in folder.iterdir() if p.is_file()}
    assert root_files == (A_ROOT_FILES if producer[0] == "A" else ROOT_FILES)
    for name in root_files:  # plain, one line each
        data = (folder / name).read_bytes()
        assert data[:2] != b"\x1f\x8b" and data.count(b"\n") == 1 and data.endswith(b"\n")
        assert isinstance(json.loads(data), dict)
    source_row = json.loads((folder / "source.jsonl").read_bytes())
    assert ("inferenceHosts" in source_row) == (producer[0] in "BC")
    subfolders = {p.name for p in folder.iterdir() if p.is_dir()}
    assert subfolders == {"features", "activations"} | (set() if producer == "B" else {"explanations"})

    for sub in ("features", "activations"):
        files = batch_files(folder / sub)
        assert numbers(files) == list(range(len(files))) and len(files) == 1
        assert {p.name for p in (folder / sub).iterdir()} == {p.name for p in files}
    index_type = str if producer[0] == "A" else int
    for sub, keys in (("features", A_FEATURE_KEYS if producer[0] == "A" else BC_FEATURE_KEYS),
                      ("activations", A_ACTIVATION_KEYS if producer[0] == "A" else BC_ACTIVATION_KEYS)):
        for path in batch_files(folder / sub):
            check_gzip(path)
            for row in read_rows(path):
                assert list(row) == keys  # every line: the same keys, in the producer's order
                assert type(row["index"]) is index_type
                assert (row["modelId"], row["layer"], row.get("creatorId")) == ("gpt2-small", "8-res-jb",
                                                                                DEFAULT_CREATOR_ID)
    if producer != "B":
        check_explanation_files(folder / "explanations", producer)


def check_gzip(path: Path) -> None:
    """A gzip member written at level 5: XFL (byte 8) is 2 only at level 9 and 4 only at level 1."""
    data = path.read_bytes()
    assert path.name.endswith(".jsonl.gz") and data[:2] == b"\x1f\x8b" and data[8] == 0
    assert gzip.compress(gzip.decompress(data), compresslevel=5, mtime=0) == data


def check_explanation_files(folder: Path, producer: str) -> None:
    files = batch_files(folder)
    assert numbers(files) == list(range(len(files))) and files
    others = {p.name for p in folder.iterdir()} - {p.name for p in files}
    assert others == ({"config.json", "failed_explanation_indexes.txt"} if producer.endswith("+D") else set())
    for path in files:
        rows = read_rows(path)
        if path.suffix == ".gz":  # written by the base producer
            check_gzip(path)
            keys = A_EXPLANATION_KEYS if producer[0] == "A" else D_EXPLANATION_KEYS
            assert all(list(r) == keys for r in rows)
            assert all(type(r["index"]) is (str if producer[0] == "A" else int) for r in rows)
        else:  # D: plain, index a string, embedding a number array or no key at all
            assert producer.endswith("+D")
            key_lists = {tuple(r) for r in rows}
            assert key_lists <= {tuple(D_EXPLANATION_KEYS), tuple(k for k in D_EXPLANATION_KEYS if k != "embedding")}
            assert len(key_lists) <= 1 and all(type(r["index"]) is str for r in rows)
        for row in rows:
            assert row["authorId"] == DEFAULT_CREATOR_ID
            embedding = row.get("embedding")
            if producer[0] == "A" and path.suffix == ".gz":
                assert embedding is None or (isinstance(embedding, str) and embedding.startswith("[")
                                             and "," in embedding and " " not in embedding)
            elif producer[0] == "C" and path.suffix == ".gz":
                assert embedding is None and row["typeName"] == row["explanationModelName"] == "unknown"
            elif embedding is not None:
                assert len(embedding) == EMBEDDING_DIMENSIONS and all(round(v, 9) == v for v in embedding)


def test_a_text_order_and_numeric_activation_ranges(tmp_path: Path, truth: Source) -> None:
    folder = write_export(tmp_path, truth, "A", batch_size=8)
    feature_files = [read_rows(p) for p in batch_files(folder / "features")]
    assert [len(rows) for rows in feature_files] == [8] * 5
    assert [r["index"] for rows in feature_files for r in rows] == sorted(str(i) for i in range(40))
    assert [r["index"] for r in feature_files[0]] == ["0", "1", "10", "11", "12", "13", "14", "15"]
    activation_files = [read_rows(p) for p in batch_files(folder / "activations")]
    assert len(activation_files) == 5
    for n, rows in enumerate(activation_files):
        in_range = [f for f in truth.features if 8 * n <= f.index < 8 * n + 8]
        assert sorted(r["id"] for r in rows) == sorted(a.id for f in in_range for a in f.activations)
    assert set(indices(activation_files[1])) != set(indices(feature_files[1]))  # batches do not line up
    explanation_files = [read_rows(p) for p in batch_files(folder / "explanations")]
    assert all(len(rows) <= 8 for rows in explanation_files)
    assert [r["index"] for rows in explanation_files for r in rows] == sorted(
        str(f.index) for f in truth.features for _ in f.explanations)
    in_files = [set(indices(rows)) for rows in explanation_files]
    assert any(a & b for a, b in zip(in_files, in_files[1:]))  # a feature's rows straddle two files
    bins = {r["binMin"] for rows in activation_files for r in rows}
    assert -1.0 in bins and all(type(b) is float for b in bins)  # a DB Float column comes back as a float
    default = write_export(tmp_path / "default", truth, "A")
    assert len(read_rows(default / "features" / "batch-0.jsonl.gz")) == 40  # 1024 a file


def test_b_array_split_batches(tmp_path: Path, truth: Source) -> None:
    folder = write_export(tmp_path, truth, "B", batch_size=16)
    feature_files = [read_rows(p) for p in batch_files(folder / "features")]
    assert [indices(rows) for rows in feature_files] == [list(range(0, 14)), list(range(14, 27)),
                                                         list(range(27, 40))]  # np.array_split(range(40), 3)
    for features, path in zip(feature_files, batch_files(folder / "activations")):
        assert set(indices(read_rows(path))) <= set(indices(features))  # the same features, file by file
    rows = [r for p in batch_files(folder / "activations") for r in read_rows(p)]
    assert all(re.fullmatch(r"c[0-9a-f]{20,24}", r["id"]) for r in rows) and len({r["id"] for r in rows}) == len(rows)
    top = [r for r in rows if r["binMin"] == -1]
    assert top and all(type(r["binMin"]) is int and type(r["binContains"]) is int for r in top)
    dead = next(r for rows in feature_files for r in rows if r["index"] == 2)
    assert type(dead["maxActApprox"]) is int and dead["maxActApprox"] == 0  # B's loop starts from the int 0
    assert all(r["hookName"] == "blocks.8.hook_resid_pre" and r["sourceSetName"] is None
               for rows in feature_files for r in rows)
    default = write_export(tmp_path / "default", truth, "B")
    assert len(read_rows(default / "features" / "batch-0.jsonl.gz")) == 40  # 128 a file


def test_c_batches_truncation_and_unknown_explanations(tmp_path: Path, truth: Source) -> None:
    folder = write_export(tmp_path, truth, "C", batch_size=16)
    feature_files = [read_rows(p) for p in batch_files(folder / "features")]
    assert [len(rows) for rows in feature_files] == [16, 16, 8]
    explanation_files = batch_files(folder / "explanations")
    for n, path in zip(numbers(explanation_files), explanation_files):  # beside features/batch-N, when not empty
        assert set(indices(read_rows(path))) <= set(indices(feature_files[n]))
    rows = [r for p in batch_files(folder / "activations") for r in read_rows(p)]
    assert all(round(v, 4) == v for r in rows for v in r["values"])  # truncated to 4 dp
    assert all(r["binMin"] is r["binMax"] is r["binContains"] is r["qualifyingTokenIndex"] is None for r in rows)
    patterns = [r for r in rows if r["zIndices"] is not None]
    assert patterns and all(len(r["zIndices"]) == 2 and len(r["zIndices"][0]) == len(r["zValues"]) for r in patterns)
    assert json.loads((folder / "source.jsonl").read_text())["dataset"] == ""
    default = write_export(tmp_path / "default", truth, "C")
    assert len(read_rows(default / "features" / "batch-0.jsonl.gz")) == 40  # 2048 a file
    with pytest.raises(ValueError):
        write_export(tmp_path, make_source(source_id="5-res-16k__l0-10", n_features=4), "C")
    with pytest.raises(ValueError):
        write_export(tmp_path, truth, "D")


@pytest.mark.parametrize("producer", ["B+D", "C+D", "A+D"])
def test_d_appends_plain_numbered_flushes(tmp_path: Path, truth: Source, producer: str) -> None:
    folder = write_export(tmp_path, truth, producer, autointerp_batch_size=4)
    files = batch_files(folder / "explanations")
    base = [p for p in files if p.suffix == ".gz"]
    added = [p for p in files if p.suffix == ".jsonl"]
    assert numbers(base + added) == list(range(len(files))) and added  # D numbers after the highest batch
    assert len(base) == (0 if producer == "B+D" else 1)
    for path in added:
        rows = read_rows(path)
        assert len(set(indices(rows))) <= 4 and [r["index"] for r in rows] == sorted(r["index"] for r in rows)
        assert len({(r["typeName"], r["explanationModelName"]) for r in rows}) <= 1  # one run per file
    config = json.loads((folder / "explanations" / "config.json").read_text())
    assert config["autointerp_batch_size"] == 4 and config["gzip_output"] is False
    default = write_export(tmp_path / "default", truth, producer)
    assert all(len(read_rows(p)) <= 50 for p in batch_files(default / "explanations") if p.suffix == ".jsonl")


def test_a_plus_d_follows_misaligned_batches(tmp_path: Path, truth: Source) -> None:
    folder = write_export(tmp_path, truth, "A+D", batch_size=8)
    reachable = set()
    for features, activations in zip(batch_files(folder / "features"), batch_files(folder / "activations")):
        reachable |= set(indices(read_rows(features))) & set(indices(read_rows(activations)))
    files = batch_files(folder / "explanations")
    held = [r for p in files if p.suffix == ".gz" for r in read_rows(p)]
    added = [r for p in files if p.suffix == ".jsonl" for r in read_rows(p)]
    assert added and set(indices(added)) <= reachable
    assert held and not set(indices(held)) <= reachable  # explanations D could not reach stay in A's files
    written = Counter(r["id"] for r in held + added)
    assert written == Counter(e.id for f in truth.features for e in f.explanations)  # nothing lost or doubled


@pytest.mark.parametrize("producer,batch_size", [(p, None) for p in PRODUCERS] + [(p, 8) for p in PRODUCERS])
def test_read_back_matches_expected_source(tmp_path: Path, truth: Source, producer: str,
                                           batch_size: int | None) -> None:
    folder = write_export(tmp_path, truth, producer, batch_size=batch_size, autointerp_batch_size=4)
    expected = expected_source(truth, producer)
    assert read_back(folder) == summarize(expected)
    assert any(f.explanations for f in expected.features) == (producer != "B")


def summarize(source: Source) -> dict:
    features = {f.index: {
        "feature": [f.frac_nonzero, f.max_act_approx, f.pos_str, f.pos_values, f.neg_str, f.neg_values,
                    f.freq_hist_heights, f.freq_hist_values, f.logits_hist_heights, f.logits_hist_values,
                    f.top_cos_sim_indices, f.top_cos_sim_values],
        "windows": {a.id: [a.tokens, a.values, a.bin_min, a.bin_max, a.bin_contains, a.qualifying_token_index,
                           a.z_indices, a.z_values] for a in f.activations},
        "explanations": {e.id: [e.description, e.type_name, e.explanation_model_name, e.embedding, e.author_id]
                         for e in f.explanations},
    } for f in source.features}
    meta = [source.model_id, source.source_id, source.set_name, source.dataset, source.num_prompts,
            source.num_tokens_in_prompt, source.release_name, source.hook_name]
    return {"source": meta, "features": features}


def read_back(folder: Path) -> dict:
    """The same summary, from the files alone."""
    features = {}
    hook_names = set()
    for path in batch_files(folder / "features"):
        for r in read_rows(path):
            hook_names.add(r["hookName"])
            features[int(r["index"])] = {"feature": [
                r["frac_nonzero"], r["maxActApprox"], r["pos_str"], r["pos_values"], r["neg_str"], r["neg_values"],
                r["freq_hist_data_bar_heights"], r["freq_hist_data_bar_values"], r["logits_hist_data_bar_heights"],
                r["logits_hist_data_bar_values"], r["topkCosSimIndices"], r["topkCosSimValues"]],
                "windows": {}, "explanations": {}}
    for path in batch_files(folder / "activations"):
        for r in read_rows(path):
            values = r["values"]
            assert (r["maxValue"], r["minValue"]) == (max(values), min(values))
            assert r["maxValueTokenIndex"] == values.index(max(values))
            features[int(r["index"])]["windows"][r["id"]] = [
                r["tokens"], values, r["binMin"], r["binMax"], r["binContains"], r.get("qualifyingTokenIndex"),
                r.get("zIndices"), r.get("zValues")]
    explanations = folder / "explanations"
    for path in batch_files(explanations) if explanations.is_dir() else []:
        for r in read_rows(path):
            embedding = r.get("embedding")
            features[int(r["index"])]["explanations"][r["id"]] = [
                r["description"], r["typeName"], r["explanationModelName"],
                json.loads(embedding) if isinstance(embedding, str) else embedding, r["authorId"]]
    model, source = (json.loads((folder / name).read_text()) for name in ("model.jsonl", "source.jsonl"))
    release = json.loads((folder / "release.jsonl").read_text())["name"]
    meta = [model["id"], source["id"], source["setName"], source["dataset"], source["num_prompts"],
            source["num_tokens_in_prompt"], release, hook_names.pop() if len(hook_names) == 1 else hook_names]
    return {"source": meta, "features": features}


def test_explanations_folder(tmp_path: Path, truth: Source) -> None:
    folder = write_explanations_folder(tmp_path, truth, "gpt-4o-mini")
    assert folder == tmp_path / "gpt2-small" / "8-res-jb" / "explanations-gpt-4o-mini"
    rows = [r for p in batch_files(folder) for r in read_rows(p)]
    assert {p.name for p in folder.iterdir()} == {"batch-0.jsonl.gz"}
    check_gzip(folder / "batch-0.jsonl.gz")
    assert all(list(r) == A_EXPLANATION_KEYS and r["explanationModelName"] == "gpt-4o-mini" for r in rows)
    assert sorted(r["id"] for r in rows) == sorted(
        e.id for f in truth.features for e in f.explanations if e.explanation_model_name == "gpt-4o-mini")
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows)
