"""Any catalog SAE as a Neuronpedia export folder, and a checker of Neuronpedia's importer rules.

`export_neuronpedia(cat, sae, out_dir)` writes `<out_dir>/<modelId>/<sourceId>/` as Neuronpedia's
database dump lays a source out (../shared/docs/neuronpedia-format.md, producer A): one-line
`model.jsonl`, `source.jsonl`, `sourceset.jsonl`, `release.jsonl`, and gzipped JSONL batches of
1,024 features in `features/`, `activations/` and `explanations/`, batch N holding features
[1024 N, 1024 N + 1023]. It follows the rules Neuronpedia's importer enforces: every line of a
file has the first line's keys, no null where a column is NOT NULL, `index` is a string, ids are
cuid-shaped and the creator is Neuronpedia's default bot user.

What is written comes from saecat's own ingestion where the SAE has it (density, max activation,
the activation histogram, logit-lens tokens, the top examples with the feature's value at each of
their tokens), else from what was imported from Neuronpedia; explanations are the imported ones
and saecat's own, whose explanation type and model are added to `<out_dir>/config/` as
Neuronpedia's `v1/config/` holds them.
`check_export(folder)` lists every rule a source folder breaks; an export is checked before it is
reported written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from catalog.errors import SaecatError
from catalog.store import Catalog, first_row

DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # the bot user a Neuronpedia instance seeds
BATCH_FEATURES = 1024
GZIP_LEVEL = 5
# saecat's own explanations as Neuronpedia names them (SQL over feature_explanations)
OWN_TYPE_NAME = "'saecat_' || replace(method, '/', '-v')"
OWN_MODEL_NAME = "regexp_extract(rtrim(explainer, '/'), '[^/]+$')"

FEATURE_KEYS = ("modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero", "freq_hist_data_bar_heights",
                "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                "neuron_alignment_indices", "neuron_alignment_l1", "neuron_alignment_values",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "decoder_weights_dist", "neg_str", "neg_values", "pos_str", "pos_values", "sourceSetName",
                "topkCosSimIndices", "topkCosSimValues", "vector", "vectorLabel", "hookName",
                "vectorDefaultSteerStrength", "hasVector")
ACTIVATION_KEYS = ("id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "maxValue", "minValue",
                   "values", "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex", "binContains",
                   "binMin", "binMax")
EXPLANATION_KEYS = ("id", "modelId", "layer", "index", "authorId", "description", "embedding", "typeName",
                    "explanationModelName", "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity")
# NOT NULL without a database default: a null there fails the importer's whole chunk
REQUIRED = {"features": ("modelId", "layer", "index"),
            "activations": ("id", "modelId", "layer", "index", "creatorId", "maxValue", "minValue",
                            "maxValueTokenIndex"),
            "explanations": ("id", "modelId", "layer", "index", "authorId", "description")}
ROOT_REQUIRED = {"model": ("id", "creatorId", "layers", "neuronsPerLayer", "owner"),
                 "source": ("id", "modelId", "setName", "creatorId"),
                 "sourceset": ("modelId", "name", "description", "creatorName", "creatorId"),
                 "release": ("name", "description", "creatorName", "creatorId")}


def _cuid(*parts: object) -> str:
    """A stable cuid-shaped id: 'c' and 24 base-36 characters."""
    digest = int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:16], "big")
    chars = []
    for _ in range(24):
        digest, rest = divmod(digest, 36)
        chars.append("0123456789abcdefghijklmnopqrstuvwxyz"[rest])
    return "c" + "".join(chars)


def source_ids(cat: Catalog, sae: int) -> tuple[str, str]:
    """Neuronpedia's (modelId, sourceId) for an SAE: its registry id, else one in Neuronpedia's
    grammar '<layer>-<set>__<sae id>' under the lower-cased model name."""
    release, sae_id, model, layer, hook, ref = first_row(
        cat.con, "SELECT release, sae_id, model, layer, hook_name, neuronpedia_id FROM saes WHERE sae = ?", [sae])
    if ref:
        return tuple(ref.split("/", 1))  # type: ignore[return-value]
    kind = (hook or "sae").rsplit(".", 1)[-1].replace("hook_", "").replace("_", "-")
    clean = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{release}-{sae_id}")
    model_id = (model or "unknown-model").split("/")[-1].lower()
    return model_id, f"{'e' if layer is None else layer}-saecat-{kind}__{clean}"


def export_neuronpedia(cat: Catalog, sae: int, out_dir: str | Path) -> Path:
    """Write the SAE's source folder under out_dir (see the module's docstring); returns it."""
    model_id, source_id = source_ids(cat, sae)
    folder = Path(out_dir) / model_id / source_id
    own = first_row(cat.con, "SELECT count(*) FROM features WHERE sae = ?", [sae])[0] > 0
    imported = first_row(cat.con, "SELECT count(*) FROM neuronpedia_features WHERE sae = ?", [sae])[0] > 0
    if not own and not imported:
        raise SaecatError(f"SAE {sae} has no features to export: ingest it or import its Neuronpedia source first")
    if own and first_row(cat.con, "SELECT count(*) FROM feature_examples WHERE sae = ? AND context_values IS NULL",
                         [sae])[0]:
        raise SaecatError(f"SAE {sae} was ingested before saecat recorded each example's per-token values, which "
                          "Neuronpedia's activations need: ingest it again with --force")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ids = {"modelId": model_id, "layer": source_id}
    _write_root(cat, sae, folder, model_id, source_id)
    _write_config(cat, sae, Path(out_dir) / "config")
    features = _own_features(cat, sae) if own else _imported_features(cat, sae)
    activations = _own_activations(cat, sae) if own else _imported_activations(cat, sae)
    for kind, rows in (("features", features), ("activations", activations),
                       ("explanations", _explanations(cat, sae))):
        _write_batches(folder / kind, ({**row, **ids} for row in rows), kind)
    problems = check_export(folder)
    if problems:
        raise SaecatError(f"the export in {folder} breaks Neuronpedia's import rules: {problems[0]}")
    return folder


def _write_batches(folder: Path, rows: Iterator[dict], kind: str) -> None:
    """Rows in feature order, each feature's in the batch of its index; keys in the producer's order."""
    keys = {"features": FEATURE_KEYS, "activations": ACTIVATION_KEYS, "explanations": EXPLANATION_KEYS}[kind]
    folder.mkdir()
    batch, out = -1, None
    try:
        for row in rows:
            number = int(row["index"]) // BATCH_FEATURES
            if number != batch:
                if out is not None:
                    out.close()
                batch, out = number, gzip.open(folder / f"batch-{number}.jsonl.gz", "wt", encoding="utf-8",
                                               compresslevel=GZIP_LEVEL)
            out.write(json.dumps({key: row[key] for key in keys}, ensure_ascii=False) + "\n")
    finally:
        if out is not None:
            out.close()


def _rows(cat: Catalog, query: str, params: list) -> Iterator[dict]:
    reader = cat.con.sql(query, params=params).to_arrow_reader(65536)
    for batch in reader:
        yield from batch.to_pylist()


def _feature_row(index: int, **fields) -> dict:
    empty = {key: [] for key in FEATURE_KEYS}
    return {**empty, "index": str(index), "creatorId": DEFAULT_CREATOR_ID, "maxActApprox": 0.0, "frac_nonzero": 0.0,
            "sourceSetName": None, "vectorLabel": None, "hookName": None, "vectorDefaultSteerStrength": None,
            "hasVector": False, **{k: v for k, v in fields.items() if v is not None}}


def _own_features(cat: Catalog, sae: int) -> Iterator[dict]:
    query = """
        WITH hist AS (
            SELECT feature, list(count::DOUBLE ORDER BY bin) AS heights,
                   list(CASE WHEN isinf(upper) THEN lower ELSE (lower + upper) / 2 END ORDER BY bin) AS centres
            FROM feature_histograms WHERE sae = $1 GROUP BY feature),
        lens AS (
            SELECT feature, list(token ORDER BY rank) FILTER (WHERE direction = 'top') AS pos_str,
                   list(logit::DOUBLE ORDER BY rank) FILTER (WHERE direction = 'top') AS pos_values,
                   list(token ORDER BY rank) FILTER (WHERE direction = 'bottom') AS neg_str,
                   list(logit::DOUBLE ORDER BY rank) FILTER (WHERE direction = 'bottom') AS neg_values
            FROM feature_tokens WHERE sae = $1 GROUP BY feature)
        SELECT f.feature, coalesce(f.max_activation, 0)::DOUBLE AS max_act,
               f.fire_count / nullif(s.n_tokens, 0) AS density, s.hook_name,
               hist.heights, hist.centres, lens.pos_str, lens.pos_values, lens.neg_str, lens.neg_values
        FROM features f JOIN saes s USING (sae) LEFT JOIN hist USING (feature) LEFT JOIN lens USING (feature)
        WHERE f.sae = $1 ORDER BY f.feature"""
    for r in _rows(cat, query, [sae]):
        yield _feature_row(r["feature"], maxActApprox=r["max_act"], frac_nonzero=r["density"] or 0.0,
                           hookName=r["hook_name"], freq_hist_data_bar_heights=r["heights"],
                           freq_hist_data_bar_values=r["centres"], pos_str=r["pos_str"], pos_values=r["pos_values"],
                           neg_str=r["neg_str"], neg_values=r["neg_values"])


def _imported_features(cat: Catalog, sae: int) -> Iterator[dict]:
    names = {"maxActApprox": "max_act_approx", "frac_nonzero": "frac_nonzero",
             "freq_hist_data_bar_heights": "freq_hist_heights", "freq_hist_data_bar_values": "freq_hist_values",
             "logits_hist_data_bar_heights": "logits_hist_heights", "logits_hist_data_bar_values": "logits_hist_values",
             "pos_str": "pos_str", "pos_values": "pos_values", "neg_str": "neg_str", "neg_values": "neg_values",
             "topkCosSimIndices": "top_cos_sim_indices", "topkCosSimValues": "top_cos_sim_values",
             "neuron_alignment_indices": "neuron_alignment_indices", "neuron_alignment_l1": "neuron_alignment_l1",
             "neuron_alignment_values": "neuron_alignment_values",
             "correlated_neurons_indices": "correlated_neurons_indices",
             "correlated_neurons_l1": "correlated_neurons_l1",
             "correlated_neurons_pearson": "correlated_neurons_pearson",
             "decoder_weights_dist": "decoder_weights_dist"}
    for r in _rows(cat, "SELECT * FROM neuronpedia_features WHERE sae = ? ORDER BY feature", [sae]):
        yield _feature_row(r["feature"], **{key: r[column] for key, column in names.items()})


def _activation_row(sae: int, feature: int, rank: object, tokens: list[str], values: list[float],
                    bins: tuple[float | None, float | None, float | None]) -> dict:
    top = int(np.argmax(values))
    return {"id": _cuid("activation", sae, feature, rank), "index": str(feature), "creatorId": DEFAULT_CREATOR_ID,
            "dataSource": None, "tokens": tokens, "values": values, "maxValue": values[top],
            "minValue": min(values), "maxValueTokenIndex": top, "dfaValues": [], "dfaMaxValue": None,
            "dfaTargetIndex": None, "binContains": bins[2], "binMin": bins[0], "binMax": bins[1]}


def _own_activations(cat: Catalog, sae: int) -> Iterator[dict]:
    """Each top example's window: a top-activations group (binMin -1, binMax the feature's max)."""
    query = """SELECT e.feature, e.rank, e.context, e.context_values, f.max_activation
               FROM feature_examples e JOIN features f USING (sae, feature)
               WHERE e.sae = ? ORDER BY e.feature, e.rank"""
    for r in _rows(cat, query, [sae]):
        yield _activation_row(sae, r["feature"], r["rank"], r["context"], r["context_values"],
                              (-1.0, r["max_activation"], -1.0))


def _imported_activations(cat: Catalog, sae: int) -> Iterator[dict]:
    query = 'SELECT feature, id, tokens, "values", bin_min, bin_max, bin_contains FROM neuronpedia_activations ' \
            "WHERE sae = ? ORDER BY feature, id"
    for r in _rows(cat, query, [sae]):
        yield {**_activation_row(sae, r["feature"], r["id"], r["tokens"], r["values"],
                                 (r["bin_min"], r["bin_max"], r["bin_contains"])), "id": r["id"]}


def _explanations(cat: Catalog, sae: int) -> Iterator[dict]:
    """The imported explanations and saecat's own, in feature order. saecat's carry its method as
    typeName ('saecat_token-act-pair-v1') and its explainer as explanationModelName (the part after
    the last '/', as Neuronpedia's autointerp script names models); scores have no column here."""
    query = f"""SELECT feature, id, description, type_name, explanation_model_name, embedding, NULL AS own
                FROM neuronpedia_explanations WHERE sae = $1
                UNION ALL
                SELECT feature, NULL, explanation, {OWN_TYPE_NAME}, {OWN_MODEL_NAME}, NULL, [explainer, method]
                FROM feature_explanations WHERE sae = $1
                ORDER BY feature, own NULLS FIRST, id"""
    for r in _rows(cat, query, [sae]):
        yield {"id": r["id"] or _cuid("explanation", sae, r["feature"], *r["own"]), "index": str(r["feature"]),
               "authorId": DEFAULT_CREATOR_ID, "description": r["description"], "embedding": r["embedding"],
               "typeName": r["type_name"], "explanationModelName": r["explanation_model_name"], "umap_x": None,
               "umap_y": None, "umap_cluster": None, "umap_log_feature_sparsity": None}


def _write_config(cat: Catalog, sae: int, config: Path) -> None:
    """The explanation types and models saecat's own explanations name, added to config/ beside the
    model folders (v1/config/ in Neuronpedia's layout): the importer's foreign keys need them."""
    names = cat.con.execute(f"SELECT DISTINCT {OWN_TYPE_NAME}, method, {OWN_MODEL_NAME}, explainer "
                            "FROM feature_explanations WHERE sae = ? ORDER BY ALL", [sae]).fetchall()
    if not names:
        return
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    common = {"featured": False, "url": None, "creatorName": "saecat", "createdAt": now, "updatedAt": now}
    types = {t: {"name": t, "displayName": t, "description": f"saecat explain, method {method}: top examples as "
                 "(token, activation) pairs; scored by detection (delphi) on held-out examples", "isAttention": False,
                 "explainerModelSettingsId": None, "settings": None, "creatorId": DEFAULT_CREATOR_ID, **common}
             for t, method, _, _ in names}
    models = {m: {"name": m, "displayName": m, "description": f"{explainer} (through saecat explain)",
                  "openRouterModelId": None, **common} for _, _, m, explainer in names}
    config.mkdir(parents=True, exist_ok=True)
    for file, rows in (("explanation_type.jsonl", types), ("explanation_model_type.jsonl", models)):
        path = config / file
        kept = {row["name"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())
                if row} if path.is_file() else {}
        merged = {**rows, **kept}  # a name another export wrote keeps its row
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged.values()),
                        encoding="utf-8")


def _write_root(cat: Catalog, sae: int, folder: Path, model_id: str, source_id: str) -> None:
    s = dict(zip(*_columns(cat, "SELECT * FROM saes WHERE sae = ?", [sae])))
    set_name = source_id.split("__", 1)[0].split("-", 1)[-1]
    created = str(s["ingested_at"] or s["registered_at"] or "1970-01-01 00:00:00").replace(" ", "T")
    release_name = f"saecat-{s['release']}"
    rows = {
        "model": {"id": model_id, "displayNameShort": model_id, "displayName": model_id,
                  "creatorId": DEFAULT_CREATOR_ID, "tlensId": s["activation_model"] or s["model"],
                  "dimension": s["d_in"], "thinking": False, "visibility": "PUBLIC", "defaultSourceSetName": set_name,
                  "defaultSourceId": source_id, "inferenceEnabled": False, "instruct": model_id.endswith("-it"),
                  "layers": 0, "neuronsPerLayer": 0, "owner": "", "createdAt": created, "updatedAt": created,
                  "website": None},
        "source": {"id": source_id, "modelId": model_id, "setName": set_name, "creatorId": DEFAULT_CREATOR_ID,
                   "hasDashboards": True, "inferenceEnabled": False, "saelensConfig": None,
                   "saelensRelease": s["release"], "saelensSaeId": s["sae_id"], "hfRepoId": None,
                   "hfFolderId": None, "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False,
                   "hasUmapLogSparsity": False, "hasUmapClusters": False, "num_prompts": s["n_documents"],
                   "num_tokens_in_prompt": s["max_doc_tokens"], "dataset": s["dataset"], "notes": None,
                   "cosSimMatchModelId": None, "cosSimMatchSourceId": None, "createdAt": created},
        "sourceset": {"modelId": model_id, "name": set_name, "hasDashboards": True, "allowInferenceSearch": False,
                      "visibility": "PUBLIC", "description": f"{s['release']} (exported by saecat)", "type": "",
                      "creatorName": "saecat", "urls": [], "creatorEmail": None, "creatorId": DEFAULT_CREATOR_ID,
                      "releaseName": release_name, "hasGraphs": False, "graphEnabled": False,
                      "similarityMatrixEnabled": False, "defaultOfModelId": None, "defaultGraphModelId": None,
                      "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                      "showHeadAttribution": False, "showUmap": False, "createdAt": created},
        "release": {"name": release_name, "visibility": "PUBLIC", "isNewUi": True, "featured": False,
                    "description": f"{s['release']} (exported by saecat)", "descriptionShort": None, "urls": [],
                    "creatorEmail": None, "creatorName": "saecat", "creatorNameShort": None,
                    "creatorId": DEFAULT_CREATOR_ID, "defaultSourceSetName": set_name, "defaultSourceId": source_id,
                    "defaultUmapSourceIds": [], "createdAt": created},
    }
    for name, row in rows.items():
        (folder / f"{name}.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")


def _columns(cat: Catalog, query: str, params: list) -> tuple[list[str], tuple]:
    rel = cat.con.execute(query, params)
    return [d[0] for d in rel.description], rel.fetchall()[0]


def _lines(path: Path) -> Iterator[tuple[int, dict | None]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        for number, line in enumerate(f.read().split("\n"), 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError:
                    yield number, None


def check_export(folder: str | Path) -> list[str]:
    """Every rule of Neuronpedia's importer a source folder breaks, as 'file:line: rule' (empty: none).

    Root files: model, source and sourceset present, one JSON object each, with their NOT NULL
    fields. Batch files (gzipped JSONL): every line has the keys of its file's first line; no null
    in a NOT NULL column; `index` a string of digits; modelId and layer those of the source; ids
    cuid-shaped and unique; the creator the default user; an activation's values as long as its
    tokens, with maxValue, minValue and maxValueTokenIndex agreeing with them; and every
    activation and explanation belongs to a feature of features/ (the foreign key)."""
    folder = Path(folder)
    problems: list[str] = []
    source: dict = {}
    for name, required in ROOT_REQUIRED.items():
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            if name != "release":
                problems.append(f"{path}: missing")
            continue
        lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        row = json.loads(lines[0]) if len(lines) == 1 else None
        if not isinstance(row, dict):
            problems.append(f"{path}: not one JSON object")
            continue
        problems += [f"{path}:1: {key} is null or missing" for key in required if row.get(key) is None]
        if name == "source":
            source = row
    features: set[str] = set()
    for kind in ("features", "activations", "explanations"):
        ids: set[str] = set()  # unique within a table
        for path in sorted((folder / kind).glob("*.jsonl.gz")):
            first_keys = None
            for number, row in _lines(path):
                where = f"{path}:{number}"
                if row is None:
                    problems.append(f"{where}: not JSON")
                    continue
                first_keys = first_keys or list(row)
                if list(row) != first_keys:
                    problems.append(f"{where}: keys differ from the file's first line")
                problems += [f"{where}: {key} is null or missing" for key in REQUIRED[kind] if row.get(key) is None]
                problems += _row_problems(where, kind, row, source, features, ids)
    return problems


def _row_problems(where: str, kind: str, row: dict, source: dict, features: set[str], ids: set[str]) -> list[str]:
    found = []
    index = row.get("index")
    if not (isinstance(index, str) and index.isdigit()):
        found.append(f"{where}: index {index!r} is not a string of digits")
    if source and (row.get("modelId"), row.get("layer")) != (source.get("modelId"), source.get("id")):
        found.append(f"{where}: modelId/layer {row.get('modelId')}/{row.get('layer')} is not the source's")
    if kind == "features":
        features.add(index)
        return found
    if index not in features:
        found.append(f"{where}: feature {index} is not in features/")
    creator = row.get("creatorId" if kind == "activations" else "authorId")
    if creator != DEFAULT_CREATOR_ID:
        found.append(f"{where}: creator {creator!r} is not the default user")
    rid = row.get("id")
    if not (isinstance(rid, str) and re.fullmatch(r"[a-z][a-z0-9]{19,31}", rid)):  # cuid or cuid2
        found.append(f"{where}: id {rid!r} is not cuid-shaped")
    elif rid in ids:
        found.append(f"{where}: id {rid} is not unique")
    ids.add(rid)
    if kind == "activations":
        tokens, values = row.get("tokens") or [], row.get("values") or []
        if len(tokens) != len(values) or not values:
            found.append(f"{where}: {len(values)} values for {len(tokens)} tokens")
        elif (row.get("maxValue"), row.get("minValue"), row.get("maxValueTokenIndex")) != (
                max(values), min(values), values.index(max(values))):
            found.append(f"{where}: maxValue, minValue or maxValueTokenIndex disagree with values")
    return found
