"""`saecat search`: the features whose explanations are closest in meaning to a text.

Every explanation in the catalog (the `explanations` view: saecat's own and Neuronpedia's) is
embedded once (catalog.explanation_index); a query is embedded the same way and the nearest
explanations by cosine similarity come back, one per feature (its closest explanation), with the
feature's SAE, density and the explanation's score. Plain text matching stays in SQL:
`SELECT * FROM explanations WHERE explanation ILIKE '%python%'`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from catalog import Catalog
from catalog.errors import NotFound, SaecatError
from catalog.explanation_index import Embedder, ExplanationIndex, catalog_state
from catalog.index import INDEXES

COLUMNS = ("similarity", "sae", "release", "sae_id", "feature", "explanation", "source", "explainer", "score",
           "density")
OVERFETCH = 4  # explanations fetched per feature asked for: a feature can have several


def explanation_index(catalog: Catalog, embedder: Embedder, progress: bool = False) -> ExplanationIndex:
    """The catalog's explanation index, kept in this process (with the decoder indexes, in one
    memory budget) while the catalog's explanations stay as they are."""
    key = ("explanations", str(catalog.path.resolve()), json.dumps(catalog_state(catalog, embedder.name)))
    return INDEXES.get(key, lambda: ExplanationIndex.load_or_build(catalog, embedder, progress))


def search(catalog: Catalog, text: str, *, k: int = 10, release: str | None = None, model: str | None = None,
           progress: bool = False) -> list[dict[str, Any]]:
    """The k features (of `release`, of `model`) whose explanations are nearest `text`, nearest first."""
    if not text.strip():
        raise SaecatError("search for some text: the query is empty")
    if k < 1:
        raise SaecatError(f"-k must be at least 1, not {k}")
    saes = None
    if release is not None or model is not None:
        saes = np.array([s for (s,) in catalog.con.execute(
            "SELECT sae FROM saes WHERE (? IS NULL OR release = ?) AND (? IS NULL OR model = ?)",
            [release, release, model, model]).fetchall()], dtype=np.int64)
        if not len(saes):
            wanted = " and ".join(f"{name} {value!r}" for name, value in (("release", release), ("model", model))
                                  if value is not None)
            raise NotFound(f"no SAE in the catalog is of {wanted}")
    embedder = Embedder.get()
    index = explanation_index(catalog, embedder, progress)
    similarity, at = index.search(embedder.encode([text])[0], k * OVERFETCH, saes)
    hits, seen = [], set()
    for sim, row in zip(similarity.tolist(), at.tolist()):
        sae, feature = index.rows.column("sae")[row].as_py(), index.rows.column("feature")[row].as_py()
        if (sae, feature) in seen:
            continue
        seen.add((sae, feature))
        hits.append({"similarity": sim, "sae": sae, "feature": feature,
                     **{c: index.rows.column(c)[row].as_py() for c in ("explanation", "source", "explainer", "method")}})
        if len(hits) == k:
            break
    return _with_details(catalog, hits)


def _with_details(catalog: Catalog, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each hit with its SAE's release and id, the feature's density and the explanation's score."""
    if not hits:
        return []
    columns = list(zip(*[(h["sae"], h["feature"], h["source"], h["explainer"], h["method"]) for h in hits]))
    details = {(r[0], r[1], r[2], r[3], r[4]): r[5:] for r in catalog.con.execute(
        """SELECT k.sae, k.feature, k.source, k.explainer, k.method, s.release, s.sae_id,
                  coalesce(f.fire_count / nullif(s.n_tokens, 0), n.frac_nonzero), e.score
           FROM (SELECT unnest(?::INTEGER[]) AS sae, unnest(?::INTEGER[]) AS feature, unnest(?::VARCHAR[]) AS source,
                        unnest(?::VARCHAR[]) AS explainer, unnest(?::VARCHAR[]) AS method) k
           JOIN saes s USING (sae)
           LEFT JOIN features f USING (sae, feature)
           LEFT JOIN neuronpedia_features n USING (sae, feature)
           LEFT JOIN feature_explanations e ON k.source = 'saecat' AND e.sae = k.sae AND e.feature = k.feature
                AND e.explainer = k.explainer AND e.method = k.method""", [list(c) for c in columns]).fetchall()}
    out = []
    for h in hits:
        key = (h["sae"], h["feature"], h["source"], h["explainer"], h["method"])
        release, sae_id, density, score = details.get(key, (None, None, None, None))
        out.append({"similarity": h["similarity"], "sae": h["sae"], "release": release, "sae_id": sae_id,
                    "feature": h["feature"], "explanation": h["explanation"], "source": h["source"],
                    "explainer": h["explainer"], "score": score, "density": density})
    return out
