"""`saecat compare` (queries/compare.py): each SAE's L0 against a fidelity figure and the Pareto
frontier per site, through the Python API, the CLI, GET /compare and the figure.

The catalog is filled as in test_catalog, through `Catalog.commit_sae`, with each SAE's
`sae_quality` row passed as an extra table. Its frontier is known by construction and checked
against a brute-force dominance test as well.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from catalog import Catalog, SaecatError, writer
from catalog.errors import NotFound
from queries.compare import compare, frontier, plot, short_ids
from queries.front.server import create_app
from test_catalog import _invoke, _main, features_table, pairs_table, sae_row

HOOK_A = "blocks.1.hook_resid_pre"
HOOK_B = "blocks.2.hook_resid_pre"

# (release, sae_id, model, hook, layer, registry_l0, l0, fvu, ce_loss_score); None: not measured.
SAES = [
    ("rel-a", "a/width_1k/l0_10", "gpt2", HOOK_A, 1, 12.0, 10.0, 0.30, 0.50),  # lowest L0 measured: on
    ("rel-a", "a/width_1k/l0_20", "gpt2", HOOK_A, 1, 20.0, 20.0, 0.20, 0.80),  # on
    ("rel-a", "a/width_2k/l0_20", "gpt2", HOOK_A, 1, 20.0, 20.0, 0.20, 0.70),  # fvu: the tie, on; ce: beaten
    ("rel-a", "a/width_1k/l0_40", "gpt2", HOOK_A, 1, 40.0, 40.0, 0.25, 0.90),  # fvu: dominated by l0_20s
    ("rel-a", "a/width_2k/l0_40", "gpt2", HOOK_A, 1, 40.0, 40.0, 0.10, None),  # fvu: on; ce: not measured
    ("rel-a", "a/width_4k/l0_80", "gpt2", HOOK_A, 1, 80.0, 80.0, 0.10, 0.95),  # fvu: as good, L0 worse: off
    ("rel-a", "a/width_4k/l0_5", "gpt2", HOOK_A, 1, None, 5.0, None, 0.40),    # fvu not measured: never on
    ("rel-b", "b/width_1k", "gpt2", HOOK_B, 2, 100.0, 100.0, 0.90, 0.10),      # worse than all of A, alone: on
    ("rel-c", "c/width_1k", "pythia-70m", HOOK_A, 1, None, 100.0, 0.90, 0.10),  # same hook, other model: on
]
ON_FVU = {"a/width_1k/l0_10", "a/width_1k/l0_20", "a/width_2k/l0_20", "a/width_2k/l0_40", "b/width_1k", "c/width_1k"}
ON_CE = {"a/width_4k/l0_5", "a/width_1k/l0_10", "a/width_1k/l0_20", "a/width_1k/l0_40", "a/width_4k/l0_80",
         "b/width_1k", "c/width_1k"}
SITE_ORDER = [s[1] for s in sorted(SAES, key=lambda s: (s[2], s[4], s[3], s[6], s[1]))]
UNMEASURED = ("rel-u", "u/width_1k")  # ingested without quality figures


def quality(l0: float, fvu: float | None, ce_loss_score: float | None) -> pa.Table:
    return pa.table({"n_tokens": pa.array([1000], pa.int64()), "l0": [l0], "fvu": pa.array([fvu], pa.float64()),
                     "explained_variance": pa.array([None if fvu is None else 1.0 - fvu], pa.float64()),
                     "mse": pa.array([None if fvu is None else 3.0 * fvu], pa.float64()),
                     "ce_loss_score": pa.array([ce_loss_score], pa.float64())})


def commit(db: Path, release: str, sae_id: str, model: str, hook: str, layer: int, registry_l0: float | None,
           extra: dict[str, pa.Table] | None) -> int:
    dec = np.random.default_rng(len(sae_id)).standard_normal((8, 4)).astype(np.float32)
    row = sae_row(release, sae_id, dec, model=model, hook_name=hook, layer=layer, registry_l0=registry_l0)
    with writer(db) as cat:
        return cat.commit_sae(row, features_table(dec), pairs_table([0, 0, 3], [1, 7, 7], [5, 2, 9]),
                              {"release": release, "repo_id": None, "model": model, "conversion_func": None,
                               "links": None}, extra=extra)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compare") / "catalog.duckdb"
    for release, sae_id, model, hook, layer, registry_l0, l0, fvu, ce in SAES:
        commit(path, release, sae_id, model, hook, layer, registry_l0, {"sae_quality": quality(l0, fvu, ce)})
    commit(path, *UNMEASURED, "gpt2", HOOK_A, 1, None, None)
    return path


def dominated_brute_force(rows: list[dict], fidelity: str, higher_is_better: bool) -> set[str]:
    """The sae_ids on their site's frontier, by comparing every pair: O(n^2), obviously right."""
    def loss(r: dict) -> float:
        return -r[fidelity] if higher_is_better else r[fidelity]

    measured = [r for r in rows if r["l0"] is not None and r[fidelity] is not None]
    return {r["sae_id"] for r in measured if not any(
        o is not r and (o["model"], o["hook_name"]) == (r["model"], r["hook_name"])
        and o["l0"] <= r["l0"] and loss(o) <= loss(r) and (o["l0"] < r["l0"] or loss(o) < loss(r))
        for o in measured)}


# ------------------------------------------------------------------------------- the frontier


@pytest.mark.parametrize("fidelity,higher,want", [("fvu", False, ON_FVU), ("explained_variance", True, ON_FVU),
                                                  ("mse", False, ON_FVU), ("ce_loss_score", True, ON_CE)])
def test_frontier_is_the_one_built_and_the_brute_force_one(db, fidelity, higher, want):
    with Catalog.open(db) as cat:
        result = compare(cat, fidelity=fidelity)
    rows = result.table.to_pylist()
    assert result.higher_is_better is higher
    assert [r["sae_id"] for r in rows] == SITE_ORDER  # the unmeasured SAE is not listed: no quality row
    assert {r["sae_id"] for r in rows if r["pareto"]} == want == dominated_brute_force(rows, fidelity, higher)
    assert result.table.column_names == ["sae", "release", "sae_id", "model", "hook_name", "d_sae", "l0", fidelity,
                                         "registry_l0", "pareto"]


def test_frontier_equals_brute_force_on_random_ties():
    """Small integer grids: many exact ties in L0, in fidelity and in both; NaN for not measured."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 25))
        l0 = rng.integers(1, 6, n).astype(float)
        fid = rng.integers(0, 4, n).astype(float)
        fid[rng.random(n) < 0.15] = np.nan
        site = rng.integers(0, 3, n)
        higher = bool(rng.integers(0, 2))
        rows = [{"sae_id": str(i), "model": "m", "hook_name": int(site[i]), "l0": l0[i],
                 "f": None if np.isnan(fid[i]) else fid[i]} for i in range(n)]
        got = frontier(l0, fid, site, higher_is_better=higher)
        assert {str(i) for i in np.flatnonzero(got)} == dominated_brute_force(rows, "f", higher)


def test_selection_by_release_model_and_hook_glob(db):
    with Catalog.open(db) as cat:
        def ids(**given) -> list[str]:
            return compare(cat, **given).table["sae_id"].to_pylist()

        assert ids(release="rel-b") == ["b/width_1k"]
        assert ids(model="pythia-70m") == ["c/width_1k"]
        assert ids(hook="blocks.2.*") == ["b/width_1k"]
        assert ids(hook="blocks.?.hook_resid_pre") == SITE_ORDER
        assert ids(model="gpt2", hook="*.1.*") == [s for s in SITE_ORDER if s.startswith("a/")]
        # a release alone: its frontier is the same as among every SAE, as no other release shares its sites
        on = {r["sae_id"] for r in compare(cat, release="rel-a").table.to_pylist() if r["pareto"]}
        assert on == {s for s in ON_FVU if s.startswith("a/")}


@pytest.mark.parametrize("given,message", [
    ({"release": "nope"}, "no SAE in the catalog of release 'nope'"),
    ({"model": "gpt2", "hook": "blocks.9.*"}, "no SAE in the catalog of model 'gpt2' with a hook matching"),
    ({"release": "rel-u"}, "no SAE of release 'rel-u' has measured quality (1 match"),
    ({"release": "rel-a", "fidelity": "delta_lm_loss"},
     "no measured SAE of release 'rel-a' has delta_lm_loss (saecat ingest --evaluate"),
])
def test_empty_selection_is_a_clear_error(db, given, message):
    with Catalog.open(db) as cat, pytest.raises(NotFound, match="^" + re.escape(message)):
        compare(cat, **given)


def test_unknown_fidelity_is_refused(db):
    with Catalog.open(db) as cat, pytest.raises(SaecatError, match="unknown fidelity 'l2'.*fvu"):
        compare(cat, fidelity="l2")


def test_short_ids_drop_shared_leading_parts_only():
    assert short_ids(["layer_12/width_16k/l0_82", "layer_12/width_65k/l0_41"]) == ["width_16k/l0_82",
                                                                                   "width_65k/l0_41"]
    assert short_ids(["x/a", "x/a"]) == ["a", "a"]
    assert short_ids(["blocks.8.hook_resid_pre"]) == ["blocks.8.hook_resid_pre"]
    assert short_ids(["layer_12/width_16k/l0_82"]) == ["layer_12/width_16k/l0_82"]


# --------------------------------------------------------------------------------- CLI and HTTP


def test_cli_json_equals_the_api_and_the_http_endpoint(db):
    result = _invoke(["compare", "--fidelity", "ce_loss_score", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    with Catalog.open(db) as cat:
        assert got == compare(cat, fidelity="ce_loss_score").table.to_pylist()
    assert {r["sae_id"] for r in got if r["pareto"]} == ON_CE
    assert got[0] == {"sae": got[0]["sae"], "release": "rel-a", "sae_id": "a/width_4k/l0_5", "model": "gpt2",
                      "hook_name": HOOK_A, "d_sae": 8, "l0": 5.0, "ce_loss_score": 0.4, "registry_l0": None,
                      "pareto": True}
    answer = TestClient(create_app(db)).get("/compare", params={"fidelity": "ce_loss_score"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == got  # the other figures are left out, not null


def test_cli_tsv_marks_the_frontier(db):
    result = _invoke(["compare", "--release", "rel-a", "--db", str(db), "--format", "tsv"])
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split("\t") == ["sae", "release", "sae_id", "model", "hook_name", "d_sae", "l0", "fvu",
                                  "registry_l0", "pareto"]
    marked = {line.split("\t")[2] for line in lines if line.split("\t")[-1] == "true"}
    assert marked == {s for s in ON_FVU if s.startswith("a/")}


def test_cli_empty_selection_is_one_line_and_exit_1(db, capsys, monkeypatch):
    code, out, err = _main(["compare", "--release", "nope", "--db", str(db)], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err.strip() == "error: no SAE in the catalog of release 'nope'"


@pytest.mark.parametrize("params,status,named", [
    ({"release": "nope"}, 404, "no SAE in the catalog of release 'nope'"),
    ({"release": "rel-a", "fidelity": "kl_div_score"}, 404, "has kl_div_score"),
    ({"fidelity": "l2"}, 422, None),
    ({"relase": "rel-a"}, 422, None),  # a misspelt filter is refused, not ignored into selecting everything
])
def test_http_refusals(db, params, status, named):
    answer = TestClient(create_app(db)).get("/compare", params=params)
    assert answer.status_code == status, answer.text
    if named:
        assert named in answer.json()["error"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_compare_by_its_schema(db, mode):
    """As test_server's fuzz of every endpoint: no 5xx, and every response one the schema declares."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(db, token="t"))

    @given(case=schema.find_operation_by_label("GET /compare").as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(headers={"Authorization": "Bearer t"})

    fuzz()


# ------------------------------------------------------------------------------------- figures


DRAWN_LABELS = {"width_1k/l0_10", "width_1k/l0_20", "width_2k/l0_20", "width_1k/l0_40", "width_2k/l0_40",
                "width_4k/l0_80", "b/width_1k", "c/width_1k"}  # site A's share "a/"; a/width_4k/l0_5 has no fvu


def test_figures_are_drawn_by_the_cli(db, tmp_path):
    png, svg = tmp_path / "fidelity.png", tmp_path / "fidelity.svg"
    for path in (png, svg):
        result = _invoke(["compare", "--figure", str(path), "--db", str(db), "--json"])
        assert result.exit_code == 0, result.output
        assert f"figure written to {path}" in result.stderr
    from matplotlib.image import imread

    image = imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 600
    inked = (image[..., :3] < 0.8).any(axis=-1)
    assert 0.01 < inked.mean() < 0.5  # axes, points, lines and labels; not blank, not a filled box
    assert len(np.unique(image[..., :3].reshape(-1, 3).round(2), axis=0)) > 20  # several colours

    texts = {"".join(t.itertext()).strip() for t in ET.parse(svg).iter("{http://www.w3.org/2000/svg}text")}
    assert DRAWN_LABELS <= texts
    assert "a/width_4k/l0_5" not in texts and "width_4k/l0_5" not in texts
    joined = " ".join(texts)
    assert "1 SAE without fvu not drawn" in joined
    assert "(lower is better)" in joined and "log scale" in joined
    assert {"gpt2 blocks.1.hook_resid_pre", "gpt2 blocks.2.hook_resid_pre", "pythia-70m blocks.1.hook_resid_pre"} \
        <= texts  # one legend entry per site, models named since the selection spans two


def test_figure_refuses_other_suffixes(db, tmp_path):
    with Catalog.open(db) as cat:
        result = compare(cat, release="rel-b")
    with pytest.raises(SaecatError, match=r"\.png or an \.svg"):
        plot(result, tmp_path / "fidelity.pdf")
    assert not (tmp_path / "fidelity.pdf").exists()
