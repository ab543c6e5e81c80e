"""Which SAE to use: each SAE's sparsity (L0) against a fidelity figure, and the Pareto frontier.

Choosing an SAE for a site is a trade: fewer active latents per token (lower L0) against a better
reconstruction. Gemma Scope's Figure 2 plots this per site, fidelity against L0. `compare` reads
the figures ingestion measured (`sae_quality`) and marks the SAEs on the frontier: those no
other SAE at the same site beats, that is, none has an L0 as low and a fidelity as good, and one
of them strictly better.

A site is a (model, hook_name) pair: SAEs reading different activations reconstruct different
things, so their figures are not compared. An SAE whose chosen figure (or L0) is NULL, not
measured, is listed but never on the frontier. Exact ties are deliberate: two SAEs equal in both
are both on the frontier unless a third dominates them.

>>> from catalog import Catalog                                                  # doctest: +SKIP
>>> with Catalog.open("saecat.duckdb") as cat:
...     result = compare(cat, release="gemma-scope-2b-pt-res", hook="blocks.12.*")
>>> result.table.filter(result.table["pareto"]).to_pylist()
>>> plot(result, "fidelity.png")
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pyarrow as pa

from catalog import Catalog
from catalog.errors import NotFound, SaecatError

Fidelity = Literal["fvu", "explained_variance", "mse", "delta_lm_loss", "ce_loss_score", "kl_div_score"]
FIDELITIES: tuple[str, ...] = get_args(Fidelity)
HIGHER_IS_BETTER = {"fvu": False, "explained_variance": True, "mse": False, "delta_lm_loss": False,
                    "ce_loss_score": True, "kl_div_score": True}
# What each figure is, for axes and titles.
DESCRIPTIONS = {
    "fvu": "fraction of variance unexplained",
    "explained_variance": "explained variance",
    "mse": "MSE, ||x - x_hat||^2",
    "delta_lm_loss": "delta LM loss (CE with the SAE - clean)",
    "ce_loss_score": "CE loss recovered",
    "kl_div_score": "KL divergence recovered",
}
# The figures only an ingestion that evaluates the model's loss fills.
_LOSS_FIGURES = ("delta_lm_loss", "ce_loss_score", "kl_div_score")
_MARKERS = "osD^vP*Xph"


@dataclass(frozen=True)
class Comparison:
    """One row per selected SAE with measured quality, ordered by site then L0: sae, release, sae_id,
    model, hook_name, d_sae, l0, the fidelity figure (a column named after it), registry_l0 and
    pareto (on its site's frontier)."""

    fidelity: str
    table: pa.Table

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.fidelity]

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


def compare(cat: Catalog, *, release: str | None = None, model: str | None = None, hook: str | None = None,
            fidelity: Fidelity = "fvu") -> Comparison:
    """The SAEs of `release` and/or `model` whose hook_name matches the glob `hook` (all SAEs where
    none is given) that have measured quality, with L0, the `fidelity` figure and the frontier."""
    if fidelity not in HIGHER_IS_BETTER:
        raise SaecatError(f"unknown fidelity {fidelity!r}: use one of {', '.join(FIDELITIES)}")
    table = _select(cat, release, model, hook, fidelity)
    pareto = frontier(table["l0"].to_numpy(zero_copy_only=False), _fidelity_values(table, fidelity),
                      _site_codes(table), higher_is_better=HIGHER_IS_BETTER[fidelity])
    return Comparison(fidelity, table.append_column("pareto", pa.array(pareto)))


def _select(cat: Catalog, release: str | None, model: str | None, hook: str | None, fidelity: str) -> pa.Table:
    """The selected SAEs' rows, or an error saying whether nothing matched or nothing was measured."""
    where = ("(?::VARCHAR IS NULL OR s.release = ?) AND (?::VARCHAR IS NULL OR s.model = ?) "
             "AND (?::VARCHAR IS NULL OR s.hook_name GLOB ?)")
    params = [release, release, model, model, hook, hook]
    # `fidelity` is one of FIDELITIES (checked by the caller): safe to name as a column
    table = cat.con.sql(
        f"SELECT s.sae, s.release, s.sae_id, s.model, s.hook_name, s.d_sae, q.l0, q.{fidelity}, s.registry_l0 "
        f"FROM saes s JOIN sae_quality q USING (sae) WHERE {where} "
        "ORDER BY s.model NULLS LAST, s.layer NULLS LAST, s.hook_name NULLS LAST, q.l0 NULLS LAST, s.sae_id, s.sae",
        params=params).to_arrow_table()
    selection = _describe(release, model, hook)
    if table.num_rows == 0:
        matched = cat.con.execute(f"SELECT count(*) FROM saes s WHERE {where}", params).fetchall()[0][0]
        if not matched:
            raise NotFound(f"no SAE in the catalog {selection}")
        raise NotFound(f"no SAE {selection} has measured quality ({matched} match, ingested before sae_quality "
                       "existed: saecat ingest --force measures it)")
    if table[fidelity].null_count == table.num_rows:
        hint = " (saecat ingest --evaluate measures the model's loss)" if fidelity in _LOSS_FIGURES else ""
        raise NotFound(f"no measured SAE {selection} has {fidelity}{hint}")
    return table


def _describe(release: str | None, model: str | None, hook: str | None) -> str:
    named = [f"{what} {value!r}" for what, value in (("of release", release), ("of model", model),
                                                      ("with a hook matching", hook)) if value is not None]
    return " ".join(named) if named else "at all"


def _fidelity_values(table: pa.Table, fidelity: str) -> np.ndarray:
    return table[fidelity].cast(pa.float64()).to_numpy(zero_copy_only=False)


def _site_codes(table: pa.Table) -> np.ndarray:
    """An integer per (model, hook_name): SAEs are compared only with those at the same site."""
    sites = [f"{m}\x00{h}" for m, h in zip(table["model"].to_pylist(), table["hook_name"].to_pylist())]
    return np.unique(np.array(sites, dtype=object), return_inverse=True)[1].reshape(-1)


def frontier(l0: np.ndarray, fidelity: np.ndarray, site: np.ndarray, *, higher_is_better: bool) -> np.ndarray:
    """Which points are on their site's Pareto frontier of (lower L0, better fidelity): no other
    point of the site has an L0 as low and a fidelity as good, one of them strictly. Points equal in
    both are alike: all on it or none. NaN in either (not measured) is never on it.

    Vectorised: sort by (site, L0, loss), then a running best (minimum loss) over the sorted order."""
    l0 = np.asarray(l0, dtype=np.float64)
    fidelity = np.asarray(fidelity, dtype=np.float64)
    on = np.zeros(len(l0), dtype=bool)
    valid = np.isfinite(l0) & np.isfinite(fidelity)
    if not valid.any():
        return on
    x = l0[valid]
    # The loss, lower better, as its dense rank: ties stay exact ties, and integers can be offset exactly.
    loss = np.unique(-fidelity[valid] if higher_is_better else fidelity[valid], return_inverse=True)[1].reshape(-1)
    s = np.asarray(site)[valid]
    order = np.lexsort((loss, x, s))
    x, loss, s = x[order], loss[order], s[order]
    # Later sites get lower keys, by more than any rank spread, so one running minimum over all sites
    # never carries a site's best into the next: at a site's first point it sees only larger keys.
    n = len(x)
    key = loss - np.unique(s, return_inverse=True)[1].reshape(-1).astype(np.int64) * (n + 1)
    best_so_far = np.minimum.accumulate(key)
    # A run: the points of one site at one L0; the best of smaller L0s is the running minimum before it.
    starts_run = np.r_[True, (s[1:] != s[:-1]) | (x[1:] != x[:-1])]
    run_start = np.maximum.accumulate(np.where(starts_run, np.arange(n), 0))
    before = np.r_[np.iinfo(np.int64).max, best_so_far][run_start]
    # Beaten by nothing at a lower L0 (strictly better loss needed to get on) and the best of its own L0.
    sorted_on = (key < before) & (key == key[run_start])
    on[np.flatnonzero(valid)[order]] = sorted_on
    return on


# --------------------------------------------------------------------------- figure


def short_ids(sae_ids: list[str]) -> list[str]:
    """Labels for one site's points: the sae_ids less the leading path parts they all share
    (gemma-scope's `layer_12/`), never less than their last part; one sae_id stays whole."""
    parts = [s.split("/") for s in sae_ids]
    shared = 0
    while len(parts) > 1 and all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return ["/".join(p[shared:]) for p in parts]


def plot(result: Comparison, path: str | os.PathLike) -> pathlib.Path:
    """Fidelity against L0 (log x), one colour and marker per site, each site's frontier joined by a
    line, every point labelled with its (shortened) sae_id. PNG or SVG by the suffix; SVG keeps its
    text as text, so the labels can be searched and selected."""
    import matplotlib

    from queries.spectra import _figure

    path = pathlib.Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise SaecatError(f"cannot draw {path}: name a .png or an .svg file")
    rows = result.table.to_pylist()
    drawn = [r for r in rows if r["l0"] is not None and r[result.fidelity] is not None]
    sites = list(dict.fromkeys((r["model"], r["hook_name"]) for r in rows))  # colours follow the table's order
    several_models = len({model for model, _ in sites}) > 1
    fig, (ax,) = _figure(7.2, 5.0)
    labelled: dict[tuple[float, float], int] = {}  # labels at each point so far, across sites: ties stack up
    for n, site in enumerate(sites):
        points = [r for r in drawn if (r["model"], r["hook_name"]) == site]
        if points:
            _draw_site(ax, points, result.fidelity, n, f"{site[0]} {site[1]}" if several_models else str(site[1]),
                       labelled)
    missing = len(rows) - len(drawn)
    note = f"; {missing} SAE{'s' if missing > 1 else ''} without {result.fidelity} not drawn" if missing else ""
    ax.set_title(f"{result.fidelity} against L0; lines join each site's Pareto frontier{note}", fontsize=9)
    _axes(ax, result)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(path, dpi=150)
    return path


def _draw_site(ax, points: list[dict], fidelity: str, n: int, label: str,
               labelled: dict[tuple[float, float], int]) -> None:
    """One site's points, its frontier as a line, and a label by each point (above those already there)."""
    style = {"color": f"C{n % 10}"}
    ax.scatter([r["l0"] for r in points], [r[fidelity] for r in points], marker=_MARKERS[n % len(_MARKERS)], s=30,
               zorder=3, label=label, **style)
    best = sorted((r["l0"], r[fidelity]) for r in points if r["pareto"])
    ax.plot([b[0] for b in best], [b[1] for b in best], lw=1.2, zorder=2, **style)
    for r, text in zip(points, short_ids([r["sae_id"] for r in points])):
        at = (r["l0"], r[fidelity])
        labelled[at] = labelled.get(at, -1) + 1
        ax.annotate(text, at, textcoords="offset points", xytext=(4, 3 + 8 * labelled[at]), fontsize=7, **style)


def _axes(ax, result: Comparison) -> None:
    """Log L0 with plain numbers on its ticks (L0s span a decade or two), room for the labels, the
    axes named with the figures and which way is better."""
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("L0: mean active latents per token (log scale; lower is sparser)")
    ax.set_ylabel(f"{result.fidelity}: {DESCRIPTIONS[result.fidelity]} ({result.direction})")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8)
