"""The shared analysis runner: results stored with their parameters and inputs, reused while the
catalog state they read is unchanged, recomputed after a re-ingestion, never half-written."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

from catalog import Catalog, SaecatError
from queries import analyses
from tests.test_catalog import BASE_TIME, commit, random_decoders


@dataclass(frozen=True)
class ToyParams:
    scale: float = 1.0
    ranks: tuple[int, ...] = (1, 2)


calls: list[ToyParams] = []


def _load(cat: Catalog, record, params: ToyParams) -> np.ndarray:
    return cat.decoders(record.sae)


def _compute(dec: np.ndarray, params: ToyParams):
    """A real computation with a checkable answer: the decoder covariance spectrum."""
    calls.append(params)
    eig = np.sort(np.linalg.eigvalsh(np.cov(dec.T.astype(np.float64))))[::-1] * params.scale
    ranks = np.array(params.ranks)
    table = pa.table({"rank": pa.array(ranks, pa.int32()), "eigenvalue": eig[ranks - 1],
                      "null_eigenvalue": np.zeros(len(ranks)), "activation_eigenvalue": pa.nulls(len(ranks), pa.float64())})
    return {"top": float(eig[0]), "n": len(dec)}, {"spectra": table}


def _run(db, params=ToyParams(), **kw):
    return analyses.run("spectra", params, _load, _compute, db=db, release="local", sae_id="a", **kw)


@pytest.fixture
def dec(db) -> np.ndarray:
    d = random_decoders(1)
    commit(db, d)
    calls.clear()
    return d


def test_result_is_stored_with_params_inputs_and_rows(db, dec):
    result = _run(db)
    want = np.sort(np.linalg.eigvalsh(np.cov(dec.T.astype(np.float64))))[::-1]
    assert not result.cached and result.analysis is not None
    assert result.summary == {"top": pytest.approx(want[0]), "n": len(dec)}
    with Catalog.open(db) as cat:
        stored = analyses.load_analysis(cat, result.analysis)
        rows = cat.con.execute("SELECT rank, eigenvalue FROM spectra WHERE analysis = ? ORDER BY rank",
                               [result.analysis]).fetchall()
        kind, params = cat.con.execute("SELECT kind, params->>'scale' FROM analyses").fetchall()[0]
    assert rows == [(1, pytest.approx(want[0])), (2, pytest.approx(want[1]))]
    assert (kind, float(params)) == ("spectra", 1.0)
    assert stored.params == {"scale": 1.0, "ranks": [1, 2]}
    assert stored.inputs == result.inputs and stored.inputs["n_tokens"] == 12345
    assert stored.summary == result.summary
    assert stored.tables["spectra"].equals(result.tables["spectra"])


def test_same_params_same_state_is_served_from_the_catalog(db, dec):
    first = _run(db)
    again = _run(db)
    assert again.cached and again.analysis == first.analysis
    assert len(calls) == 1
    other = _run(db, ToyParams(scale=2.0))
    assert not other.cached and other.analysis != first.analysis
    assert other.summary["top"] == pytest.approx(2 * first.summary["top"])
    forced = _run(db, force=True)
    assert not forced.cached and len(calls) == 3


def test_reingestion_changes_the_inputs_so_the_analysis_recomputes(db, dec):
    first = _run(db)
    commit(db, random_decoders(7), ingested_at=BASE_TIME + timedelta(days=1))
    second = _run(db)
    assert not second.cached and second.inputs["ingested_at"] != first.inputs["ingested_at"]
    assert second.summary["top"] != pytest.approx(first.summary["top"])


def test_a_failing_computation_stores_nothing(db, dec):
    def broken(data, params):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        analyses.run("spectra", ToyParams(), _load, broken, db=db, release="local", sae_id="a")
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT count(*) FROM analyses").fetchall() == [(0,)]


def test_a_bad_result_table_is_refused_before_anything_is_written(db, dec):
    def wrong_table(data, params):
        return {}, {"features": pa.table({"x": [1]})}

    with pytest.raises(ValueError, match="not analysis tables"):
        analyses.run("spectra", ToyParams(), _load, wrong_table, db=db, release="local", sae_id="a")
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT count(*) FROM analyses").fetchall() == [(0,)]


def test_unknown_sae_and_unknown_analysis_are_clear(db, dec):
    with pytest.raises(SaecatError, match="no SAE"):
        analyses.run("spectra", ToyParams(), _load, _compute, db=db, release="local", sae_id="zzz")
    with Catalog.open(db) as cat, pytest.raises(SaecatError, match="no analysis 99"):
        analyses.load_analysis(cat, 99)


def test_list_and_json(db, dec):
    a = _run(db)
    b = _run(db, ToyParams(scale=3.0))
    with Catalog.open(db) as cat:
        listed = analyses.list_analyses(cat, kind="spectra").to_pylist()
        assert analyses.list_analyses(cat, kind="lobes").num_rows == 0
    assert [r["analysis"] for r in listed] == [b.analysis, a.analysis]
    data = a.to_json()
    assert data["tables"]["spectra"][0]["rank"] == 1 and data["params"]["ranks"] == [1, 2]
