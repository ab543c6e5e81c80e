"""A first look at one SAE in the catalog: what `saecat tour` prints, and `make demo` ends with.

Each section answers one question through saecat's own API: which features show something
(mid-density ones whose top examples agree on a word: queries.browse.showcase) and what they
look like, which features lie nearest the first of them, the best analogy crystal among
the decoder directions, the two lobes of the co-occurrence graph and the text each wins, and
the power law of the decoder spectrum, and, where its features have explanations (saecat explain),
the features found by meaning for a few searches. The analyses run with their defaults (lobes at
n = 2 only) and are stored in the catalog like any other run, so a second tour reads them back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog import Catalog
from queries.analyses import Analysis, make_params, plot
from queries.browse import showcase


@dataclass
class Tour:
    sae: dict[str, Any]  # the SAE's row of `saes`, the main columns, and its quality figures (NULL if unmeasured)
    features: pa.Table  # features worth a look (queries.browse.showcase), labelled
    neighbors: pa.Table  # the nearest neighbours of the most frequent feature
    crystal: dict[str, Any] | None  # the best crystal, with its features' top tokens; None if none was kept
    lobes: Analysis  # lobes at n = 2
    spectrum: Analysis
    crystals: Analysis
    searches: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # query -> hits (queries.search)
    figures: dict[str, Path] = field(default_factory=dict)

    def lobe_rows(self, affinity: str = "phi") -> list[dict[str, Any]]:
        """One row per lobe at n = 2: its size, the sampled blocks it wins and the groups among them."""
        for entry in self.lobes.summary["lobes"]:
            if entry["affinity"] == affinity and entry["n_lobes"] == 2:
                return [{"lobe": lobe["lobe"], "features": lobe["size"], "blocks_won": lobe["blocks_won"],
                         "groups": ", ".join(f"{g['group']} {g['blocks']}" for g in lobe["top_groups"])}
                        for lobe in entry["lobes"]]
        return []


def _features(cat: Catalog, sae: int, top: int) -> pa.Table:
    rows = showcase(cat, sae, top)
    return pa.table({"feature": [r["feature"] for r in rows], "fire_count": [r["fire_count"] for r in rows],
                     "density": [round(r["density"], 5) for r in rows],
                     "agreement": [round(r["agreement"], 2) for r in rows],
                     "fires_on": [r["agreed_token"] for r in rows], "top_example": [r["top_example"] for r in rows]})


TOUR_KNN = 64  # neighbours per feature for the lobes of an SAE whose pairs are incomplete
SEARCHES = ("python code", "punctuation", "numbers")  # what the tour looks for among the explanations


def _searches(cat: Catalog, record, k: int) -> dict[str, list[dict[str, Any]]]:
    """The SAE's features nearest each of SEARCHES by their explanations; none without explanations."""
    from queries.search import search

    explained = cat.con.execute("SELECT count(*) FROM explanations WHERE sae = ?", [record.sae]).fetchall()[0][0]
    if not explained:
        return {}
    found = {q: search(cat, q, k=k * 4, release=record.release) for q in SEARCHES}
    return {q: [h for h in hits if h["sae"] == record.sae][:k] for q, hits in found.items()}


def tour(db: str | os.PathLike | None, release: str, sae_id: str, *, figures: str | os.PathLike | None = None,
         top: int = 8, k: int = 5) -> Tour:
    """Run (or read back) everything the tour shows; with `figures`, draw the analyses' figures there."""
    from queries import crystals, lobes, spectra
    from queries.neighbors import neighbors

    with Catalog.open(db) as cat:
        record = cat.find_sae(release, sae_id)
        sae = cat.con.sql("SELECT release, sae_id, model, hook_name, d_in, d_sae, s.n_tokens, n_blocks, "
                          "activation_model, l0, registry_l0, explained_variance, dead_latents, dense_10pct, "
                          "delta_lm_loss, eval_tokens "
                          "FROM saes s LEFT JOIN sae_quality q USING (sae) WHERE sae = ?",
                          params=[record.sae]).to_arrow_table().to_pylist()[0]
        features = _features(cat, record.sae, top)
        first = features.column("feature")[0].as_py()
        near = neighbors(cat, record.sae, [first], k)
        complete = lobes.pair_policy(cat, record)["complete"]
        searched = _searches(cat, record, k)
    found_crystals = crystals.run(db, release, sae_id)
    # an SAE that stores only some pairs is clustered from its stored partners (lobes' kNN mode)
    lobe_params = {"n_lobes": [2]} if complete else {"n_lobes": [2], "knn": TOUR_KNN}
    found_lobes = lobes.run(db, release, sae_id, params=make_params("lobes", lobe_params))
    spectrum = spectra.run(db, release, sae_id)
    best = crystals.with_labels(found_crystals)
    result = Tour(sae, features, near, best[0] if best else None, found_lobes, spectrum, found_crystals, searched)
    if figures is not None:
        folder = Path(figures)
        folder.mkdir(parents=True, exist_ok=True)
        for name, analysis in (("crystals", found_crystals), ("lobes", found_lobes), ("spectrum", spectrum)):
            result.figures[name] = plot(analysis, folder / f"{name}.png")
    return result
