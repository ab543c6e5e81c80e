"""What a reader asks of one SAE or one feature beyond its row: the catalog's SAEs by filter, an
SAE's features by page, a density histogram, a feature's explanations, co-occurrence partners and
lobes. Plain reads over the catalog, shared by the browser pages and the HTTP API."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from catalog.errors import NotFound, SaecatError
from catalog.store import Catalog, SaeRecord, first_row

# The columns an SAE's feature table can be sorted by (a whitelist: they go into SQL as names).
FEATURE_SORTS = ("feature", "density", "fire_count", "max_activation", "mean_activation", "score")
PartnerOrder = Literal["phi", "n11", "pmi"]


@dataclass(frozen=True)
class SaeFilter:
    model: str | None = None
    release: str | None = None  # a substring of the release name
    hook: str | None = None  # a substring of the hook name
    min_width: int | None = None
    max_width: int | None = None
    status: str | None = None  # 'ready' or 'registered'
    max_l0: float | None = None  # measured quality (sae_quality): SAEs not measured yet are left out
    min_explained_variance: float | None = None

    def source(self) -> tuple[str, list]:
        """The FROM and WHERE of the SAEs it selects (`s`, with their quality `q`), and the parameters."""
        clauses, params = ["true"], []
        for clause, value in (("s.model = ?", self.model), ("s.release ILIKE '%' || ? || '%'", self.release),
                              ("s.hook_name ILIKE '%' || ? || '%'", self.hook),
                              ("s.d_sae >= ?", self.min_width), ("s.d_sae <= ?", self.max_width),
                              ("s.status = ?", self.status), ("q.l0 <= ?", self.max_l0),
                              ("q.explained_variance >= ?", self.min_explained_variance)):
            if value not in (None, ""):
                clauses.append(clause)
                params.append(value)
        return f"FROM saes s LEFT JOIN sae_quality q USING (sae) WHERE {' AND '.join(clauses)}", params


def saes(cat: Catalog, filt: SaeFilter = SaeFilter(), page: int = 0, per_page: int = 100
         ) -> tuple[list[dict[str, Any]], int]:
    """One page of the SAEs the filter selects, with their quality figures, ready ones first, then
    by release and layer; and how many the filter selects (the registry holds ~13,900)."""
    found, params = filt.source()
    total = first_row(cat.con, f"SELECT count(*) {found}", params)[0]
    rows = cat.con.sql(
        f"""SELECT s.sae, s.release, s.sae_id, s.model, s.hook_name, s.layer, s.d_sae, s.status, s.n_tokens,
                   s.neuronpedia_id, s.ingested_at, q.l0, q.explained_variance, q.dead_latents,
                   s.sae IN (SELECT DISTINCT sae FROM neuronpedia_features) AS imported
            {found}
            ORDER BY s.status = 'ready' DESC, s.release, s.layer NULLS LAST, s.sae_id
            LIMIT {int(per_page)} OFFSET {int(page) * int(per_page)}""", params=params,
    ).to_arrow_table().to_pylist()
    return rows, total


def latest_ready(cat: Catalog, filt: SaeFilter = SaeFilter(), n: int = 3) -> list[dict[str, Any]]:
    """The n SAEs the filter selects that were ingested last (the home page shows their features)."""
    found, params = filt.source()
    return cat.con.sql(f"SELECT s.sae, s.release, s.sae_id {found} AND s.status = 'ready' "
                       f"ORDER BY s.ingested_at DESC, s.sae LIMIT {int(n)}", params=params).to_arrow_table().to_pylist()


def find_by_neuronpedia(cat: Catalog, model_id: str, source_id: str) -> SaeRecord:
    row = first_row(cat.con, "SELECT release, sae_id FROM saes WHERE neuronpedia_id = ? ORDER BY sae",
                    [f"{model_id}/{source_id}"])
    if row is None:
        raise NotFound(f"no SAE in the catalog has the Neuronpedia id {model_id}/{source_id}")
    return cat.find_sae(*row, ready=False)


def sae_overview(cat: Catalog, record: SaeRecord) -> dict[str, Any]:
    """The SAE's row, its quality figures and how many of its features fired."""
    overview = cat.con.sql("SELECT s.*, q.* EXCLUDE (sae, l0_values, l0_counts, n_tokens) "
                           "FROM saes s LEFT JOIN sae_quality q USING (sae) WHERE s.sae = ?",
                           params=[record.sae]).to_arrow_table().to_pylist()[0]
    overview["alive"], overview["explained"] = first_row(
        cat.con, "SELECT count(*) FILTER (WHERE fire_count > 0), "
                 "(SELECT count(DISTINCT feature) FROM explanations WHERE sae = $1) FROM features WHERE sae = $1",
        [record.sae])
    return overview


SHOWCASE_DENSITY = (1e-3, 5e-2)  # where features tend to be specific enough to read and common enough to trust


def showcase(cat: Catalog, sae: int, n: int = 8, min_examples: int = 4) -> list[dict[str, Any]]:
    """Features that show something, for a first look: mid-density ones (SHOWCASE_DENSITY) first,
    then those whose top examples agree most on a word they fire on (the share of them whose firing
    token, stripped and lower-cased, is the most common one, which must be two or more characters
    with a letter or digit: whitespace, punctuation and word pieces agree easily and say little),
    then the most frequent; one feature per word, so the first look is not five features of 'the'."""
    low, high = SHOWCASE_DENSITY
    order = "density BETWEEN $low AND $high DESC, agreement DESC, fire_count DESC, feature"
    return cat.con.sql(
        f"""WITH tokens AS (
                SELECT feature, lower(trim(token)) AS token, count(*) AS n
                FROM feature_examples WHERE sae = $sae GROUP BY ALL),
            agreed AS (
                SELECT feature, arg_max(token, n ORDER BY token) AS agreed_token, max(n) / sum(n) AS agreement,
                       sum(n) AS examples
                FROM tokens GROUP BY feature),
            candidates AS (
                SELECT f.feature, f.fire_count, f.fire_count / nullif(s.n_tokens, 0) AS density, f.max_activation,
                       a.agreement, a.agreed_token
                FROM features f JOIN saes s ON s.sae = f.sae JOIN agreed a ON a.feature = f.feature
                WHERE f.sae = $sae AND a.examples >= $min_examples AND length(a.agreed_token) >= 2
                      AND regexp_matches(a.agreed_token, '[[:alnum:]]')),
            chosen AS (
                SELECT * FROM candidates
                QUALIFY row_number() OVER (PARTITION BY agreed_token ORDER BY {order}) = 1
                ORDER BY {order} LIMIT $n),
            lens AS (  -- labels for the chosen few only: labelled_features would label the whole catalog
                SELECT feature, list(token ORDER BY rank) AS top_tokens FROM feature_tokens
                WHERE sae = $sae AND direction = 'top' AND rank < 5 AND feature IN (SELECT feature FROM chosen)
                GROUP BY feature),
            best AS (
                SELECT feature, array_to_string(context, '') AS top_example FROM feature_examples
                WHERE sae = $sae AND rank = 0 AND feature IN (SELECT feature FROM chosen))
            SELECT chosen.*, lens.top_tokens, best.top_example
            FROM chosen LEFT JOIN lens USING (feature) LEFT JOIN best USING (feature)
            ORDER BY {order}""", params={"sae": sae, "n": n, "min_examples": min_examples, "low": low, "high": high},
    ).to_arrow_table().to_pylist()


def density_histogram(cat: Catalog, sae: int, bins_per_decade: int = 4, *, imported: bool = False
                      ) -> tuple[list[dict], int]:
    """Features by log10 density, in bins of 1/bins_per_decade of a decade (lower edge, count), and
    the number that never fired: from the ingestion, or from the imported Neuronpedia rows."""
    density = ("SELECT frac_nonzero AS d FROM neuronpedia_features WHERE sae = $1" if imported else
               "SELECT f.fire_count / s.n_tokens AS d FROM features f JOIN saes s USING (sae) WHERE f.sae = $1")
    rows = cat.con.execute(f"SELECT floor(log10(d) * $2) / $2 AS lower, count(*) AS n FROM ({density}) WHERE d > 0 "
                           "GROUP BY 1 ORDER BY 1", [sae, bins_per_decade]).fetchall()
    dead = first_row(cat.con, f"SELECT count(*) FROM ({density}) WHERE coalesce(d, 0) = 0", [sae])[0]
    return [{"lower": lower, "upper": lower + 1 / bins_per_decade, "count": n} for lower, n in rows], dead


def feature_page(cat: Catalog, sae: int, *, sort: str = "feature", descending: bool = False, page: int = 0,
                 per_page: int = 50, min_density: float | None = None, max_density: float | None = None,
                 text: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """One page of the SAE's features (with each one's top token, example and best explanation),
    sorted and filtered; and how many features the filter selects."""
    if sort not in FEATURE_SORTS:
        raise SaecatError(f"cannot sort by {sort!r}: use one of {', '.join(FEATURE_SORTS)}")
    if page < 0 or not 1 <= per_page <= 1000:
        raise SaecatError("page must be >= 0 and per_page in 1..1000")
    where = ["sae = $sae"]
    params: dict[str, Any] = {"sae": sae}
    for clause, name, value in (("density >= $min_density", "min_density", min_density),
                                ("density <= $max_density", "max_density", max_density),
                                ("(explanation ILIKE '%' || $text || '%' OR list_contains(top_tokens, $text))",
                                 "text", text or None)):
        if value is not None:
            where.append(clause)
            params[name] = value
    base = f"""
        WITH f AS (
            SELECT l.feature, l.density, l.fire_count, l.max_activation, l.mean_activation, l.top_tokens,
                   l.top_example, e.explanation, e.score
            FROM labelled_features l
            LEFT JOIN (SELECT sae, feature, arg_max(explanation, coalesce(score, -1)) AS explanation,
                              max(score) AS score
                       FROM explanations WHERE sae = $sae GROUP BY sae, feature) e USING (sae, feature)
            WHERE l.sae = $sae)
        SELECT * FROM f WHERE {' AND '.join(where[1:]) or 'true'}"""
    total = first_row(cat.con, f"SELECT count(*) FROM ({base})", params)[0]
    order = f"{sort} {'DESC' if descending else 'ASC'} NULLS LAST, feature"
    rows = cat.con.sql(f"{base} ORDER BY {order} LIMIT {per_page} OFFSET {page * per_page}",
                       params=params).to_arrow_table().to_pylist()
    return rows, total


def explanations(cat: Catalog, sae: int, feature: int) -> list[dict[str, Any]]:
    """The feature's explanations, saecat's and imported, best score first."""
    return cat.con.sql(
        """SELECT e.explanation, e.source, e.explainer, e.method, e.score, e.score_method,
                  coalesce(f.ingested_at <> s.ingested_at, false) AS stale
           FROM explanations e JOIN saes s USING (sae)
           LEFT JOIN feature_explanations f ON e.source = 'saecat' AND f.sae = e.sae AND f.feature = e.feature
                AND f.explainer = e.explainer AND f.method = e.method
           WHERE e.sae = ? AND e.feature = ? ORDER BY e.score DESC NULLS LAST, e.source, e.explainer""",
        params=[sae, feature]).to_arrow_table().to_pylist()


def partners(cat: Catalog, sae: int, feature: int, k: int = 10, order: PartnerOrder = "phi") -> list[dict[str, Any]]:
    """The k features that fire in the most related blocks with this one (by phi, n11 or PMI), with
    their counts and top tokens; only pairs the SAE's pair policy stored are known."""
    if order not in ("phi", "n11", "pmi"):
        raise SaecatError(f"cannot order partners by {order!r}: use phi, n11 or pmi")
    return cat.con.sql(
        f"""WITH found AS (
                SELECT CASE WHEN i = $feature THEN j ELSE i END AS partner, n11, phi, pmi
                FROM feature_affinities WHERE sae = $sae AND (i = $feature OR j = $feature)
                ORDER BY {order} DESC NULLS LAST, partner LIMIT $k),
            lens AS (  -- the partners' top tokens only: labelled_features would label every feature
                SELECT feature, list(token ORDER BY rank) AS top_tokens FROM feature_tokens
                WHERE sae = $sae AND direction = 'top' AND rank < 5 AND feature IN (SELECT partner FROM found)
                GROUP BY feature)
            SELECT found.*, f.fire_count / nullif(s.n_tokens, 0) AS density, lens.top_tokens
            FROM found JOIN features f ON f.sae = $sae AND f.feature = found.partner JOIN saes s ON s.sae = $sae
            LEFT JOIN lens ON lens.feature = found.partner
            ORDER BY found.{order} DESC NULLS LAST, found.partner""",
        params={"sae": sae, "feature": feature, "k": k}).to_arrow_table().to_pylist()


def lobes(cat: Catalog, sae: int, feature: int) -> list[dict[str, Any]]:
    """The feature's lobe in each stored lobes analysis of its SAE, newest first."""
    return cat.con.sql(
        """SELECT l.analysis, l.affinity, l.n_lobes, l.lobe, l.excluded, a.created_at
           FROM lobes l JOIN analyses a USING (analysis)
           WHERE a.sae = ? AND l.feature = ? ORDER BY l.analysis DESC, l.affinity, l.n_lobes""",
        params=[sae, feature]).to_arrow_table().to_pylist()


def token_features(cat: Catalog, token: str, sae: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Features that fire on a token (their top examples' firing tokens) or promote it (their top
    logit-lens tokens), matched stripped and case-blind, in one SAE or all: most examples first."""
    return cat.con.sql(
        """WITH hits AS (
               SELECT sae, feature, count(*) AS examples, NULL::INTEGER AS lens_rank FROM feature_examples
               WHERE lower(trim(token)) = lower(trim($token)) AND ($sae IS NULL OR sae = $sae) GROUP BY ALL
               UNION ALL
               SELECT sae, feature, 0, min(rank) FROM feature_tokens
               WHERE direction = 'top' AND lower(trim(token)) = lower(trim($token)) AND ($sae IS NULL OR sae = $sae)
               GROUP BY ALL)
           SELECT h.sae, l.release, l.sae_id, h.feature, sum(h.examples)::BIGINT AS examples,
                  min(h.lens_rank) AS lens_rank, any_value(l.density) AS density,
                  any_value(l.top_tokens[1:5]) AS top_tokens
           FROM hits h JOIN labelled_features l USING (sae, feature)
           GROUP BY h.sae, l.release, l.sae_id, h.feature
           ORDER BY examples DESC, lens_rank NULLS LAST, h.sae, h.feature LIMIT $limit""",
        params={"token": token, "sae": sae, "limit": limit}).to_arrow_table().to_pylist()


_ENCODER: dict[tuple, tuple] = {}  # the last SAE and model loaded for text, by (catalog, sae, ingestion)
_ENCODER_LOCK = threading.Lock()


def fires_on(cat: Catalog, sae: int, text: str, top: int = 12) -> dict[str, Any]:
    """Which of the SAE's features fire on `text`: its tokens (BOS left out), and the `top`
    features by their largest activation on it, each with its activation at every token and its labels. The SAE and
    its model stay loaded in this process for the next text (one at a time)."""
    from queries.neighbors import activation_model, encode_text, loaded_sae

    if not text.strip():
        raise SaecatError("give some text to run through the model")
    record = cat.sae_by_key(sae)
    key = (str(cat.path), sae, str(record.ingested_at))
    with _ENCODER_LOCK:
        if key not in _ENCODER:
            _ENCODER.clear()
            loaded = loaded_sae(cat, record)
            _ENCODER[key] = (loaded, activation_model(cat, record, loaded))
        loaded, lm = _ENCODER[key]
        tokens, acts, threshold = encode_text(cat, sae, text, model=lm, loaded=loaded)
    if loaded.prepend_bos:  # BOS is no token of the text, and its outsized activations are left out as ingestion does
        tokens, acts = tokens[1:], acts[1:]
    peak = acts.max(axis=0)
    order = np.argsort(-peak, kind="stable")
    chosen = [int(f) for f in order[:top] if peak[f] > threshold]
    labels = {r["feature"]: r for r in cat.con.sql(
        "SELECT feature, density, top_tokens[1:5] AS top_tokens, max_activation FROM labelled_features "
        "WHERE sae = ? AND list_contains(?, feature)", params=[sae, chosen]).to_arrow_table().to_pylist()}
    return {"tokens": tokens, "threshold": threshold,
            "features": [{"feature": f, "peak": float(peak[f]), "values": acts[:, f].tolist(), **labels.get(f, {})}
                         for f in chosen]}


def shade(value: float, peak: float, levels: int = 10) -> int:
    """A token's shading level 0..levels-1 from its activation relative to the feature's peak."""
    if not peak or not value or value <= 0 or math.isnan(value):
        return 0
    return max(1, min(levels - 1, math.ceil(value / peak * (levels - 1))))


def has_imported(cat: Catalog, sae: int) -> bool:
    """Whether Neuronpedia's rows were imported for this SAE (saecat import neuronpedia)."""
    return first_row(cat.con, "SELECT count(*) FROM neuronpedia_features WHERE sae = ?", [sae])[0] > 0


def imported_feature(cat: Catalog, sae: int, feature: int, examples: int = 20) -> dict[str, Any]:
    """A feature as its Neuronpedia export describes it, in the shapes of an ingested one: its row
    (density and max activation; no firing counts), its label rows (activation windows with their
    per-token values, logit-lens tokens), its activation histogram and its nearest features by
    Neuronpedia's own cosine list. Raises NotFound when the export has no such feature."""
    row = cat.con.sql("SELECT * FROM neuronpedia_features WHERE sae = ? AND feature = ?",
                      params=[sae, feature]).to_arrow_table().to_pylist()
    if not row:
        raise NotFound(f"feature {feature} is not in the Neuronpedia export imported for SAE {sae}")
    n = row[0]
    windows = cat.con.sql(
        """SELECT max_value AS activation, tokens AS context, "values" AS context_values,
                  max_value_token_index AS center
           FROM neuronpedia_activations WHERE sae = ? AND feature = ? ORDER BY max_value DESC, id LIMIT ?""",
        params=[sae, feature, examples]).to_arrow_table().to_pylist()
    lens = [{"direction": direction, "rank": rank, "token": token, "logit": logit}
            for direction, tokens, logits in (("top", n["pos_str"], n["pos_values"]),
                                              ("bottom", n["neg_str"], n["neg_values"]))
            for rank, (token, logit) in enumerate(zip(tokens or [], logits or []))]
    centres, heights = n["freq_hist_values"] or [], n["freq_hist_heights"] or []
    half = (centres[1] - centres[0]) / 2 if len(centres) > 1 else 0.0
    histogram = [{"lower": c - half, "upper": c + half, "count": h} for c, h in zip(centres, heights)]
    near = [(int(i), float(v)) for i, v in zip(n["top_cos_sim_indices"] or [], n["top_cos_sim_values"] or [])
            if int(i) != feature]
    labels = {int(r["feature"]): r for r in cat.con.sql(
        "SELECT feature, frac_nonzero AS density, pos_str[1:4] AS top_tokens FROM neuronpedia_features "
        "WHERE sae = ? AND list_contains(?, feature)", params=[sae, [i for i, _ in near]]).to_arrow_table().to_pylist()}
    record = cat.sae_by_key(sae)
    neighbours = [{"release": record.release, "sae_id": record.sae_id, "feature": i, "cosine": v,
                   "density": labels.get(i, {}).get("density"), "top_tokens": labels.get(i, {}).get("top_tokens")}
                  for i, v in near]
    return {"row": {"feature": feature, "density": n["frac_nonzero"], "max_activation": n["max_act_approx"],
                    "fire_count": None, "block_count": None, "mean_activation": None, "decoder_norm": None},
            "labels": {"feature_examples": windows, "feature_tokens": lens}, "histogram": histogram,
            "neighbors": neighbours}


def imported_features(cat: Catalog, sae: int, page: int = 0, per_page: int = 50) -> tuple[list[dict[str, Any]], int]:
    """One page of an imported SAE's features, by index, with density, max activation, top tokens
    and best explanation; and how many there are."""
    total = first_row(cat.con, "SELECT count(*) FROM neuronpedia_features WHERE sae = ?", [sae])[0]
    rows = cat.con.sql(
        """SELECT n.feature, n.frac_nonzero AS density, NULL AS fire_count, n.max_act_approx AS max_activation,
                  NULL AS mean_activation, e.score, n.pos_str[1:5] AS top_tokens, e.explanation
           FROM neuronpedia_features n
           LEFT JOIN (SELECT feature, arg_max(explanation, coalesce(score, -1)) AS explanation, max(score) AS score
                      FROM explanations WHERE sae = $1 GROUP BY feature) e USING (feature)
           WHERE n.sae = $1 ORDER BY n.feature LIMIT $2 OFFSET $3""",
        params=[sae, per_page, page * per_page]).to_arrow_table().to_pylist()
    return rows, total
