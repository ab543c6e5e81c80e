"""queries.crystals on synthetic SAEs with planted crystals hidden by a distractor direction.

The generator plants exact parallelograms (rectangles m ± αe1 ± βe2 on the unit sphere, so
b - a = d - c holds between unit directions) and isosceles trapezoids (four points of a circle on
the sphere with two parallel chords, b - a = t (d - c), t ≠ 1) among random unit directions, all
orthogonal to one distractor u; then every feature gets s_i u added with large random s_i. The
stored decoder rows hide the crystals; projecting u out and renormalising gives them back
exactly. Expected values are recomputed here with numpy, independently of the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog import Catalog, SaecatError, writer
from queries import crystals
from queries.crystals import CrystalParams, CrystalSearch, canonical
from test_catalog import features_table, pairs_table, sae_row

F, D = 400, 48
N_PAR, N_TRAP = 4, 3
TOP = 20
THETA = (0.3, -0.9)  # the trapezoids' chords: t = cos(0.3) / cos(0.9)
T_RATIO = np.cos(THETA[0]) / np.cos(THETA[1])
BENCH = Path(__file__).resolve().parents[1] / "bench" / "crystals.py"


def planted_sae(n: int = F, d: int = D, n_par: int = N_PAR, n_trap: int = N_TRAP, seed: int = 0,
                scale: float = 3.0, alpha: float = 0.3, beta: float = 0.25, rho: float = 0.4):
    """(stored decoder rows [n, d], distractor u, parallelograms, trapezoids), quads as (a, b, c, d)
    with b - a = d - c (parallelograms) or b - a = t (d - c) (trapezoids) once u is removed."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)

    def orthonormal(k: int) -> np.ndarray:  # k orthonormal rows, all orthogonal to u
        m = rng.standard_normal((d, k))
        m -= np.outer(u, u @ m)
        return np.linalg.qr(m)[0].T

    base = rng.standard_normal((n, d))
    base -= np.outer(base @ u, u)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    par, trap, row = [], [], 0
    for _ in range(n_par):
        m, e1, e2 = orthonormal(3)
        m *= np.sqrt(1 - alpha**2 - beta**2)
        base[row:row + 4] = [m - alpha * e1 - beta * e2, m + alpha * e1 - beta * e2,
                             m - alpha * e1 + beta * e2, m + alpha * e1 + beta * e2]
        par.append((row, row + 1, row + 2, row + 3))
        row += 4
    for _ in range(n_trap):
        m, e1, e2 = orthonormal(3)
        m *= np.sqrt(1 - rho**2)
        point = lambda th: m + rho * (np.cos(th) * e1 + np.sin(th) * e2)  # noqa: E731
        t1, t2 = THETA
        base[row:row + 4] = [point(np.pi - t1), point(t1), point(np.pi - t2), point(t2)]
        trap.append((row, row + 1, row + 2, row + 3))
        row += 4
    perm = rng.permutation(n)
    where = np.argsort(perm)
    stored = base[perm] + rng.normal(0, scale, n)[:, None] * u
    relabel = lambda quads: [tuple(int(where[i]) for i in q) for q in quads]  # noqa: E731
    return stored.astype(np.float32), u, relabel(par), relabel(trap)


def label_tables(n: int) -> dict[str, pa.Table]:
    """Logit-lens tokens for every feature but the last (6 top ranks, so the summary keeps 5)."""
    feats = np.repeat(np.arange(n - 1), 6)
    ranks = np.tile(np.arange(6), n - 1)
    return {"feature_tokens": pa.table({
        "feature": pa.array(feats.astype(np.int32)),
        "direction": ["top"] * len(feats),
        "rank": pa.array(ranks.astype(np.int32)),
        "token_id": pa.array(np.arange(len(feats), dtype=np.int32)),
        "token": [f"f{f}r{r}" for f, r in zip(feats, ranks)],
        "logit": pa.array(np.ones(len(feats), dtype=np.float32)),
    })}


def commit(db: Path, dec: np.ndarray, sae_id: str, labels: dict | None = None) -> int:
    with writer(db) as cat:
        return cat.commit_sae(sae_row("local", sae_id, dec), features_table(dec), pairs_table([0], [1], [1]),
                              {"release": "local"}, None, labels)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crystals")
    dec, u, par, trap = planted_sae()
    db = folder / "catalog.duckdb"
    key = commit(db, dec, "planted", label_tables(F))
    np.save(folder / "u.npy", u)
    return {"db": db, "key": key, "dec": dec, "u": u, "par": par, "trap": trap, "u_path": folder / "u.npy"}


def run(planted, **kw) -> crystals.Analysis:
    return crystals.run(planted["db"], sae=planted["key"], params=CrystalParams(top=TOP, **kw))


def quads_of(table: pa.Table) -> np.ndarray:
    return np.stack([table.column(c).to_numpy() for c in "abcd"], axis=1)


def found(table: pa.Table, quads: list[tuple], shape: str) -> list[bool]:
    got = {tuple(q) for q in canonical(quads_of(table), shape).tolist()}
    return [tuple(q) in got for q in canonical(np.array(quads), shape).tolist()]


def numpy_scores(x: np.ndarray, quads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    u = x[quads[:, 1]] - x[quads[:, 0]]
    v = x[quads[:, 3]] - x[quads[:, 2]]
    nu, nv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
    return np.linalg.norm(u - v, axis=1) / (nu + nv), (u * v).sum(1) / (nu * nv)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def without(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Unit rows with u projected out, renormalised: what the search compares after removal."""
    x = unit(x)
    return unit(x - np.outer(x @ u, u))


# --------------------------------------------------------------------------- recovery


def test_planted_parallelograms_hidden_by_the_distractor_are_found_after_removing_it(planted):
    par = np.array(planted["par"])
    before, _ = numpy_scores(unit(planted["dec"]), par)
    after, _ = numpy_scores(without(planted["dec"], planted["u"]), par)
    assert before.min() > 0.2 and after.max() < 1e-6  # the generator does what it says (float32 rows)

    raw = run(planted)
    assert not any(found(raw.tables["crystals"], planted["par"], "parallelogram"))
    assert raw.summary["projected_dims"] == 0 and raw.summary["index"]["knn"] == "catalog exact"

    result = run(planted, distractors=(f"file:{planted['u_path']}",))
    table = result.tables["crystals"]
    assert all(found(table, planted["par"], "parallelogram"))
    # the planted ones are exact, every random quad is far off: they are the top N_PAR, in any order
    top = table.slice(0, N_PAR)
    assert sorted(map(tuple, canonical(quads_of(top), "parallelogram").tolist())) == \
        sorted(map(tuple, canonical(par, "parallelogram").tolist()))
    assert max(top.column("error").to_pylist()) < 1e-5
    assert min(top.column("cosine").to_pylist()) > 1 - 1e-6
    assert table.column("error")[N_PAR].as_py() > 0.05
    # before removal, the same quads (as labelled in the result) are no parallelograms at all
    np.testing.assert_allclose(top.column("error_before").to_numpy(),
                               numpy_scores(unit(planted["dec"]), quads_of(top))[0], rtol=1e-5)
    assert min(top.column("error_before").to_pylist()) > 0.2
    gain = np.array(table.column("error_before")) - np.array(table.column("error"))
    assert result.summary["improvement"]["error"]["mean"] == pytest.approx(gain.mean(), rel=1e-6)
    assert result.summary["improvement"]["error"]["median"] == pytest.approx(np.median(gain), rel=1e-6)
    assert result.summary["improvement"]["error"]["mean"] > 0.1
    assert result.summary["n_pairs"] <= F * CrystalParams().pairs_per_feature


def test_the_cloud_pc_recovers_the_distractor_without_being_told(planted):
    result = run(planted, distractors=("cloud:1",))
    table = result.tables["crystals"]
    top = table.slice(0, N_PAR)  # u is recovered up to a small angle: the planted are still the best
    assert all(found(top, planted["par"], "parallelogram"))
    assert all(r["error"] < 0.25 and r["error"] < r["error_before"] for r in top.to_pylist())
    assert result.summary["distractors"][0]["spec"] == "cloud:1"
    assert result.summary["distractors"][0]["explained"] > 0.5  # u dominates the cloud's spread


def test_planted_trapezoids_are_found_by_cosine(planted):
    raw = run(planted, shape="trapezoid")
    assert not any(found(raw.tables["crystals"], planted["trap"], "trapezoid"))

    result = run(planted, shape="trapezoid", distractors=(f"file:{planted['u_path']}",))
    table = result.tables["crystals"]
    assert set(table.column("shape").to_pylist()) == {"trapezoid"}
    assert all(found(table, planted["trap"], "trapezoid"))
    rows = {tuple(q): r for q, r in zip(canonical(quads_of(table), "trapezoid").tolist(), table.to_pylist())}
    want_error = abs(T_RATIO - 1) / (T_RATIO + 1)  # b - a = t (d - c): |t - 1| / (t + 1)
    for quad in canonical(np.array(planted["trap"]), "trapezoid").tolist():
        row = rows[tuple(quad)]
        assert row["cosine"] > 1 - 1e-6 and row["cosine_before"] < 0.99
        assert row["error"] == pytest.approx(want_error, abs=1e-5)
    cosines = table.column("cosine").to_pylist()
    assert cosines == sorted(cosines, reverse=True)
    # a rectangle is a trapezoid twice over (both pairs of opposite sides are parallel)
    assert all(found(table, planted["par"], "trapezoid"))


def test_stored_scores_equal_numpy_on_the_stored_quads(planted):
    result = run(planted, distractors=(f"file:{planted['u_path']}",))
    with Catalog.open(planted["db"]) as cat:
        stored = cat.con.sql("SELECT * FROM crystals WHERE analysis = ? ORDER BY rank",
                             params=[result.analysis]).to_arrow_table()
    assert stored.column_names == ["analysis", "rank", "shape", "a", "b", "c", "d", "error", "cosine",
                                   "error_before", "cosine_before"]
    assert stored.column("rank").to_pylist() == list(range(TOP))
    quads = quads_of(stored)
    assert all(len(set(q)) == 4 for q in quads.tolist())
    error, cosine = numpy_scores(without(planted["dec"], planted["u"]), quads)
    error_before, cosine_before = numpy_scores(unit(planted["dec"]), quads)
    for name, want in (("error", error), ("cosine", cosine), ("error_before", error_before),
                       ("cosine_before", cosine_before)):
        np.testing.assert_allclose(stored.column(name).to_numpy(), want, rtol=1e-5, atol=2e-6, err_msg=name)
    assert np.all(np.diff(error) >= -1e-6)  # best first


def brute_force(x: np.ndarray, per_feature: int, shape: str) -> list[tuple[tuple, float]]:
    """Every pair of candidate pairs (each feature with its nearest directions by cosine), both
    orientations, no shared feature: (quad key, score), best first. A quad's key is its two
    diagonals (parallelogram) or its two parallel sides up to reversing both (trapezoid)."""
    xu = unit(x)
    cos = xu @ xu.T
    np.fill_diagonal(cos, -np.inf)
    near = np.argsort(-cos, axis=1, kind="stable")[:, :per_feature]
    pairs = sorted({tuple(sorted((i, int(j)))) for i in range(len(x)) for j in near[i]})
    best: dict = {}
    for p, (a, b) in enumerate(pairs):
        for c, d in pairs[p + 1:]:
            if len({a, b, c, d}) < 4:
                continue
            for quad in ((a, b, c, d), (a, b, d, c)):
                e, cs = numpy_scores(xu, np.array([quad]))
                score = float(e[0]) if shape == "parallelogram" else -float(cs[0])
                q = quad
                key = (frozenset({frozenset({q[0], q[3]}), frozenset({q[1], q[2]})}) if shape == "parallelogram"
                       else frozenset({(q[0], q[1], q[2], q[3]), (q[1], q[0], q[3], q[2]),
                                       (q[2], q[3], q[0], q[1]), (q[3], q[2], q[1], q[0])}))
                best[key] = min(best.get(key, np.inf), score)
    return sorted(best.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("shape", ["parallelogram", "trapezoid"])
def test_search_equals_brute_force_over_all_pairs_of_candidate_pairs(shape):
    """With matches_per_pair covering every pair, the index search is the exhaustive one."""
    x = np.random.default_rng(3).standard_normal((60, 12)).astype(np.float32)
    want = brute_force(x, 4, shape)[:25]
    search = CrystalSearch(CrystalParams(shape=shape, pairs_per_feature=4, matches_per_pair=10_000, top=25))
    table = search.fit(x)
    score = table.column("error" if shape == "parallelogram" else "cosine").to_numpy().astype(np.float64)
    want_score = np.array([s for _, s in want]) * (1 if shape == "parallelogram" else -1)
    np.testing.assert_allclose(score, want_score, atol=2e-6)
    got_keys = []
    for a, b, c, d in quads_of(table).tolist():
        got_keys.append(frozenset({frozenset({a, d}), frozenset({b, c})}) if shape == "parallelogram"
                        else frozenset({(a, b, c, d), (b, a, d, c), (c, d, a, b), (d, c, b, a)}))
    assert len(set(got_keys)) == len(got_keys)  # no quad twice
    gaps = np.abs(np.diff(want_score)) > 1e-6
    clear = [i for i in range(1, 24) if gaps[i - 1] and gaps[i]]  # ranks without ties on either side
    assert [got_keys[i] for i in clear] == [want[i][0] for i in clear]


def test_the_search_never_makes_the_f_squared_differences(monkeypatch):
    """F = 2000, d = 64: all pair differences would be F² d float32 = 1 GB. The search makes
    differences only for candidate pairs, a chunk at a time, and its peak stays a few tens of MB."""
    n, d = 2000, 64
    x = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32)
    made: list[int] = []
    original = CrystalSearch._differences

    def spy(self, x, pairs, chunk):
        out = original(self, x, pairs, chunk)
        made.append(len(out))
        return out

    search = CrystalSearch(CrystalParams(distractors=("pc:1",)))
    search.fit(x[:50])  # warm up: lazy imports would count as the search's memory
    monkeypatch.setattr(CrystalSearch, "_differences", spy)
    tracemalloc.start()
    try:
        search.fit(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n_pairs = search.summary_["n_pairs"]
    assert n_pairs <= n * search.params.pairs_per_feature
    assert max(made) <= crystals.chunk_rows(d)
    assert sum(made) <= 3 * n_pairs + crystals.PC_SAMPLE  # index, queries (+recall/pc samples)
    dense = n * n * d * 4
    assert peak < dense / 16, f"peak {peak / 2**20:.1f} MB"


def test_approximate_indexes_report_recall_and_still_find_the_planted(planted):
    result = run(planted, distractors=(f"file:{planted['u_path']}",), exact_limit=0, index_dims=16)
    index = result.summary["index"]
    assert index["knn"] == "hnsw" and index["differences"] == "hnsw" and index["index_dims"] == 16
    assert 0 <= index["recall"] <= 1 and 0 < index["index_variance"] < 1
    assert all(found(result.tables["crystals"], planted["par"], "parallelogram"))


# --------------------------------------------------------------------------- catalog


def test_second_run_is_cached_and_force_or_an_edited_file_recompute(planted, tmp_path):
    params = CrystalParams(top=5, distractors=(f"file:{planted['u_path']}",))
    first = crystals.run(planted["db"], "local", "planted", params=params)
    second = crystals.run(planted["db"], "local", "planted", params=params)
    assert not first.cached and second.cached and second.analysis == first.analysis
    assert second.tables["crystals"].to_pylist() == first.tables["crystals"].to_pylist()
    assert second.summary == first.summary
    forced = crystals.run(planted["db"], "local", "planted", params=params, force=True)
    assert not forced.cached and forced.analysis != first.analysis

    path = tmp_path / "v.npy"
    np.save(path, planted["u"])
    moved = CrystalParams(top=5, distractors=(f"file:{path}",))
    a = crystals.run(planted["db"], sae=planted["key"], params=moved)
    np.save(path, np.roll(planted["u"], 1))  # same name, other vector
    b = crystals.run(planted["db"], sae=planted["key"], params=moved)
    assert not b.cached and b.params["digests"] != a.params["digests"]


def test_labels_of_the_four_features_come_with_the_result(planted):
    result = run(planted, distractors=(f"file:{planted['u_path']}",))
    with Catalog.open(planted["db"]) as cat:
        labels = {f: t for f, t in cat.con.execute(
            "SELECT feature, top_tokens FROM labelled_features WHERE sae = ?", [planted["key"]]).fetchall()}
    used = {int(f) for f in quads_of(result.tables["crystals"]).ravel()}
    want = {str(f): labels[f][:5] for f in used if labels[f] is not None}
    assert result.summary["labels"] == want
    rows = crystals.with_labels(result)
    assert rows[0]["a_tokens"] == want.get(str(rows[0]["a"]), [])
    assert all(len(r[f"{c}_tokens"]) in (0, 5) for r in rows for c in "abcd")


def test_plot_draws_planes_and_histogram(planted, tmp_path):
    result = run(planted, distractors=(f"file:{planted['u_path']}",))
    hist = result.summary["histogram"]
    assert sum(hist["after"]) == sum(hist["before"]) == hist["sample"]
    assert hist["sample"] == min(result.summary["n_candidates"], crystals.HISTOGRAM_SAMPLE)
    assert len(result.summary["planes"]) == crystals.PLANES
    pts = np.array(result.summary["planes"][0]["points"])
    # a parallelogram's plane coordinates keep b - a = d - c
    np.testing.assert_allclose(pts[1] - pts[0], pts[3] - pts[2], atol=1e-4)
    out = crystals.plot(result, tmp_path / "crystals.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_clear_error(planted, tmp_path):
    for params in (CrystalParams(shape="hexagon"), CrystalParams(distractors=("sideways:1",)),
                   CrystalParams(top=0), CrystalParams(distractors=("feature:x",))):
        with pytest.raises(SaecatError):
            crystals.run(planted["db"], sae=planted["key"], params=params)
    with pytest.raises(SaecatError, match="cannot read"):
        crystals.run(planted["db"], sae=planted["key"], params=CrystalParams(distractors=("file:/no/such.npy",)))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones(D + 1))
    with pytest.raises(SaecatError, match="dimension"):
        crystals.run(planted["db"], sae=planted["key"], params=CrystalParams(distractors=(f"file:{wrong}",)))
    with pytest.raises(SaecatError, match="features"):
        crystals.run(planted["db"], sae=planted["key"], params=CrystalParams(distractors=(f"feature:{F}",)))
    tiny_db = tmp_path / "tiny.duckdb"
    key = commit(tiny_db, np.eye(3, 8, dtype=np.float32), "tiny")
    with pytest.raises(SaecatError, match="needs 4"):
        crystals.run(tiny_db, sae=key)


def test_bench_smoke_runs():
    out = subprocess.run([sys.executable, str(BENCH), "--smoke"], check=True, capture_output=True, text=True).stdout
    lines = [json.loads(line) for line in out.strip().splitlines()]
    runs = {line["method"]: line for line in lines if "method" in line}
    assert set(runs) == {"naive", "saecat_sub", "saecat"}
    assert all(run["planted_found"] == 1.0 for run in runs.values())
    assert lines[-1]["summary"] and 0 <= lines[-1]["recall_of_naive_top"] <= 1
