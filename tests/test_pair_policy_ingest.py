"""The pair policy through ingestion and downstream: `saecat ingest --min-pair-blocks M
--top-partners K --rank-partners-by n11|phi` stores exactly `pair_policy.select` of the complete
table, which is test_counts' brute-force reference (not ingestion's own counts); `saes` records the
policy; a bad value is one line naming its flag; a checkpoint of another policy is not resumed;
and lobes refuse dense affinities over an incomplete SAE and cluster its stored pairs with --knn.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from test_counts import BLOCK, MAX_DOC, assert_matches, count, gap_threshold, stored

from catalog import Catalog
from catalog.errors import SaecatError
from catalog.store import sidecar_dir
from ingest import IngestOptions, ingest, resolve_source
from ingest.pair_policy import PairPolicy, select
from queries import lobes
from queries.lobes import LobesParams

POLICY_COLUMNS = "pair_min_blocks, pair_top_partners, pair_rank_by, pairs_complete"


@pytest.fixture(scope="module")
def threshold(sae_dirs, sae_acts) -> float:
    """test_counts' positive threshold: many pairs never share a block, the rest spread in n11."""
    return gap_threshold(sae_acts(sae_dirs["standard"], True, MAX_DOC), 0.998)


@pytest.fixture(scope="module")
def reference(sae_dirs, sae_acts, threshold):
    """The complete table, counted the slow way (test_counts.count), with enough spread in n11
    that every policy below keeps some pairs and drops others."""
    ref = count(sae_acts(sae_dirs["standard"], True, MAX_DOC), threshold, BLOCK)
    assert len(ref.pairs) > 100 and len(set(ref.pairs.values())) > 5
    return ref


def upper_quartile_n11(ref) -> int:
    return int(np.quantile(list(ref.pairs.values()), 0.75))


def expected(ref, policy: PairPolicy) -> list[tuple[int, int, int]]:
    """The reference's pairs that the policy keeps, sorted by (i, j)."""
    rows = sorted((i, j, n) for (i, j), n in ref.pairs.items())
    i, j, n11 = (np.array(c, dtype=np.int64) for c in zip(*rows))
    keep = select(policy, i, j, n11, ref.block_count, ref.n_blocks)
    return [row for row, kept in zip(rows, keep) if kept]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, sae_dirs, corpus, threshold):
    """ingested(**policy options) -> (db, release, sae_id): one ingestion per policy, each into
    its own catalog."""
    cache = {}

    def go(**policy):
        key = tuple(sorted(policy.items()))
        if key not in cache:
            db = tmp_path_factory.mktemp("policy") / "catalog.duckdb"
            source = resolve_source(None, None, str(sae_dirs["standard"]))
            opts = IngestOptions(dataset=str(corpus), block_size=BLOCK, max_doc_tokens=MAX_DOC, threshold=threshold,
                                 progress=False, **policy)
            assert ingest(source, opts, db=db).status == "ingested"
            cache[key] = (db, source.release, source.sae_id)
        return cache[key]

    return go


def policy_row(db, release, sae_id) -> tuple:
    with Catalog.open(db) as cat:
        return cat.con.execute(f"SELECT {POLICY_COLUMNS} FROM saes WHERE release = ? AND sae_id = ?",
                               [release, sae_id]).fetchall()[0]


def test_default_policy_stores_the_complete_table(reference, ingested):
    db, release, sae_id = ingested()
    assert_matches(stored(db, release, sae_id), reference, "default policy")
    assert policy_row(db, release, sae_id) == (1, None, None, True)
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT DISTINCT pairs_complete FROM feature_affinities").fetchall() == [(True,)]


@pytest.mark.parametrize("case", ["min", "top-phi", "min-and-top-n11"])
def test_policy_stores_exactly_the_reference_pairs_it_keeps(reference, ingested, case):
    m = upper_quartile_n11(reference)
    options, policy, recorded = {
        "min": ({"min_pair_blocks": m}, PairPolicy(min_blocks=m), (m, None, None, False)),
        "top-phi": ({"top_partners": 3, "rank_partners_by": "phi"}, PairPolicy(top_partners=3, rank_by="phi"),
                    (1, 3, "phi", False)),
        "min-and-top-n11": ({"min_pair_blocks": 2, "top_partners": 2}, PairPolicy(min_blocks=2, top_partners=2),
                            (2, 2, "n11", False)),
    }[case]
    assert m > 1
    want = expected(reference, policy)
    assert 0 < len(want) < len(reference.pairs)  # the policy really drops pairs, and keeps some
    db, release, sae_id = ingested(**options)
    got = stored(db, release, sae_id)
    assert got.pair_rows == want  # stored n11 are exact, and exactly the kept pairs
    np.testing.assert_array_equal(got.block_count, reference.block_count)  # features untouched
    assert policy_row(db, release, sae_id) == recorded
    with Catalog.open(db) as cat:
        view = cat.con.execute("SELECT i, j, n11, pairs_complete FROM feature_affinities ORDER BY i, j").fetchall()
    assert view == [(i, j, n, False) for i, j, n in want]


@pytest.mark.parametrize("args,flag", [(["--min-pair-blocks", "0"], "--min-pair-blocks"),
                                       (["--top-partners", "0"], "--top-partners"),
                                       (["--rank-partners-by", "pmi"], "--rank-partners-by")])
def test_a_bad_policy_flag_is_one_line_naming_it(args, flag, tmp_path, sae_dirs, corpus, capfd, monkeypatch):
    from queries.front.cli import main

    db = tmp_path / "catalog.duckdb"
    monkeypatch.setattr(sys, "argv", ["saecat", "ingest", "--sae-path", str(sae_dirs["standard"]),
                                      "--dataset", str(corpus), "--no-progress", "--db", str(db), *args])
    monkeypatch.setenv("SAECAT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code != 0
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in lines[0], lines
    assert not db.exists()


def test_watch_options_are_checked_as_ingestion_options():
    from ingest.sync import _ingest_options

    assert _ingest_options({"dataset": "d", "top_partners": 8, "rank_partners_by": "phi"}).pair_policy == \
        PairPolicy(top_partners=8, rank_by="phi")
    with pytest.raises(SaecatError, match="--top-partners"):
        _ingest_options({"dataset": "d", "top_partners": 0})
    with pytest.raises(SaecatError, match="--min-pair-blocks"):
        _ingest_options({"dataset": "d", "min_pair_blocks": 1.5})


def test_a_checkpoint_of_another_policy_is_not_resumed(tmp_path, reference, threshold, sae_dirs, corpus,
                                                       monkeypatch):
    """A run of policy A interrupted after two batches leaves its checkpoint; a run of policy B
    counts the whole stream itself (every batch reaches the pair counter) and leaves A's
    checkpoint where it was; rerunning A resumes it (fewer batches). Both store their policy's
    pairs of the reference."""
    from ingest import accumulate
    from ingest.checkpoint import params_hash
    from ingest.pipeline import _run_params
    from ingest.sources import load_sae

    db = tmp_path / "catalog.duckdb"
    source = resolve_source(None, None, str(sae_dirs["standard"]))
    base = dict(dataset=str(corpus), block_size=BLOCK, max_doc_tokens=MAX_DOC, threshold=threshold, progress=False,
                batch_tokens=600, checkpoint_every_s=0)
    a = IngestOptions(**base, top_partners=2)
    b = IngestOptions(**base, top_partners=2, rank_partners_by="phi")
    loaded = load_sae(source)
    hashes = {params_hash(_run_params(loaded, o, "gpt2")) for o in (a, b, IngestOptions(**base))}
    assert len(hashes) == 3
    # the complete policy keeps the hash runs had before policies existed
    complete = _run_params(loaded, IngestOptions(**base, rank_partners_by="phi"), "gpt2")
    assert "pair_policy" not in complete and not any(k.startswith(("min_pair", "top_partners", "rank_")) for k in complete)

    original = accumulate.PairCounter.add
    calls = {"n": 0, "stop_at": 3}

    def add(self, blocks):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return original(self, blocks)

    monkeypatch.setattr(accumulate.PairCounter, "add", add)
    with pytest.raises(SaecatError, match="resume"):
        ingest(source, a, db=db)
    runs = sidecar_dir(db) / "runs"
    assert [p.name for p in runs.iterdir() if (p / "state.pt").exists()]  # A's checkpoint is there

    calls.update(n=0, stop_at=-1)
    assert ingest(source, b, db=db).status == "ingested"
    full = calls["n"]
    assert stored(db, source.release, source.sae_id).pair_rows == expected(reference, b.pair_policy)
    assert len([p for p in runs.iterdir() if (p / "state.pt").exists()]) == 1  # A's, untouched

    calls.update(n=0)
    assert ingest(source, a, db=db, force=True).status == "ingested"
    assert 0 < calls["n"] < full  # A resumed its own checkpoint
    assert stored(db, source.release, source.sae_id).pair_rows == expected(reference, a.pair_policy)
    assert policy_row(db, source.release, source.sae_id) == (1, 2, "n11", False)


# --------------------------------------------------------------------------- lobes


def test_dense_lobes_refuse_an_incomplete_sae(ingested):
    db, release, sae_id = ingested(top_partners=3, rank_partners_by="phi")
    with pytest.raises(SaecatError) as info:
        lobes.run(db, release, sae_id, params=LobesParams(n_lobes=(2,), permutations=5, null_repeats=1))
    message = str(info.value)
    assert "\n" not in message
    for part in (sae_id, "--top-partners 3 --rank-partners-by phi", "n11 = 0", "--knn", "--force"):
        assert part in message, part


def test_knn_lobes_of_an_incomplete_sae_use_only_stored_pairs(ingested, reference):
    db, release, sae_id = ingested(top_partners=3, rank_partners_by="phi")
    params = LobesParams(n_lobes=(2,), knn=5, permutations=5, null_repeats=1)
    with Catalog.open(db) as cat:
        inputs = lobes.load(cat, cat.find_sae(release, sae_id), params)
    included = inputs.included
    kept = {(i, j) for i, j, _ in expected(reference, PairPolicy(top_partners=3, rank_by="phi"))}
    graph = lobes.affinity_matrix("phi", inputs, params.knn).tocoo()
    edges = {(int(included[min(r, c)]), int(included[max(r, c)])) for r, c in zip(graph.row, graph.col)}
    assert edges and edges <= kept  # only stored pairs, never one below the policy
    # the same graph over the complete table would take pairs the policy dropped (phi + 1 > 0 at n11 = 0)
    complete_db = ingested()[0]
    with Catalog.open(complete_db) as cat:
        full = lobes.load(cat, cat.find_sae(release, sae_id), params)
    full_graph = lobes.affinity_matrix("phi", full, params.knn).tocoo()
    assert {(int(full.included[min(r, c)]), int(full.included[max(r, c)]))
            for r, c in zip(full_graph.row, full_graph.col)} - kept

    result = lobes.run(db, release, sae_id, params=params)
    assert result.summary["pair_policy"] == {"min_blocks": 1, "top_partners": 3, "rank_by": "phi", "complete": False}
    assert "stored pairs only" in result.summary["mode"]
    assert any("exceeds the 3 top partners" in note for note in result.summary["notes"])
    inside = set(included.tolist())
    partners = np.array([sum(f in pair and (pair[0] in inside and pair[1] in inside) for pair in kept)
                         for f in included])
    assert result.summary["stored_partners"] == {
        "min": int(partners.min()), "median": int(np.median(partners)), "max": int(partners.max()),
        "fewer_than_k": int((partners < 5).sum())}
    assert partners.max() > 3  # a feature is among others' top 3 too: it can have more than 3 stored
    assert result.tables["lobes"].num_rows == 2 * len(inputs.block_count)  # geometry and phi, every feature
