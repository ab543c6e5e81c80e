"""Ingestion on the out-of-core pair path (issue 17): a --memory-budget too small for the dense
pair tiles sends each full block's firing set to disk and counts pairs after the stream.

Both paths are exact, so: every table an ingestion writes is the dense path's; with a pair policy
the stored pairs are exactly test_counts' brute-force reference's that the policy keeps; a run
killed (SIGKILL) in the stream or in the pair pass resumes to the same tables, keeping its
checkpoint's path whatever the new budget; a budget too small for the pair pass is one error line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_counts import BLOCK, MAX_DOC, assert_matches, stored
from test_pair_policy_ingest import expected, reference, threshold, upper_quartile_n11  # noqa: F401 (fixtures)
from test_robustness import (BATCH_TOKENS, MAX_DOC_TOKENS, _env, assert_error, assert_stderr_is_one_line,
                             big_corpus_texts, checkpoints, run_cli, write_jsonl)

import ingest.blockpairs as blockpairs
from catalog import Catalog
from catalog.errors import SaecatError
from catalog.limits import parse_size
from catalog.schema import SAE_TABLES
from catalog.store import sidecar_dir
from ingest import IngestOptions, ingest, resolve_source
from ingest.pair_policy import PairPolicy

# Budgets are what the fixture SAE's runs hold resident plus the pair pass's room, a few KB: finer
# than a process's own memory stays put from run to run, so the plan's process baseline is pinned
# at 0 here, in this process (no_baseline) and in the CLI's (CLI); test_budget measures it.
BANDS_ROOM = parse_size("48KB")  # the policy fixture out of core, its pair pass in several bands
KILL_ROOM = parse_size("700KB")  # the robustness corpus out of core, its pair pass in three bands


def every_table(db: Path) -> dict[str, list[tuple]]:
    """Every per-SAE table's rows and the saes row, without keys and wall-clock times."""
    with Catalog.open(db) as cat:
        tables = {t: cat.con.execute(f"SELECT * EXCLUDE (sae) FROM {t} ORDER BY ALL").fetchall() for t in SAE_TABLES}
        tables["saes"] = cat.con.execute("SELECT * EXCLUDE (sae, ingested_at) FROM saes ORDER BY ALL").fetchall()
    return tables


def pair_paths(db: Path) -> list[str]:
    """Each run's pair path, as its params record it."""
    with Catalog.open(db) as cat:
        return [r[0] for r in cat.con.execute(
            "SELECT json_extract_string(params, '$.plan.pair_path') FROM ingest_runs ORDER BY run").fetchall()]


@pytest.fixture(scope="module", autouse=True)
def no_baseline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ingest.pipeline.process_memory", lambda device: 0)
        yield


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, sae_dirs, corpus, threshold):  # noqa: F811
    """ingested(**options) -> db: test_pair_policy_ingest's work, once per set of options."""
    cache = {}

    def go(**options):
        key = tuple(sorted(options.items()))
        if key not in cache:
            db = tmp_path_factory.mktemp("ooc") / "catalog.duckdb"
            opts = IngestOptions(dataset=str(corpus), block_size=BLOCK, max_doc_tokens=MAX_DOC, threshold=threshold,
                                 progress=False, **options)
            assert ingest(resolve_source(None, None, str(sae_dirs["standard"])), opts, db=db).status == "ingested"
            cache[key] = db
        return cache[key]

    return go


@pytest.fixture(scope="module")
def resident(ingested) -> int:
    """What a run of the fixture SAE on the fixture model holds from start to end (model, SAE,
    per-feature state), as the dense run's plan records it."""
    with Catalog.open(ingested()) as cat:
        [(held,)] = cat.con.execute("SELECT json_extract(params, '$.plan.memory.resident') FROM ingest_runs").fetchall()
    return int(held)


@pytest.fixture
def bands(monkeypatch) -> list:
    """The pair pass's plans, as count_pairs makes them."""
    plans = []
    plan = blockpairs.plan
    monkeypatch.setattr(blockpairs, "plan", lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1])
    return plans


def test_out_of_core_writes_the_dense_paths_tables(ingested, reference, bands, sae_dirs, resident):  # noqa: F811
    dense, blocks = ingested(), ingested(memory_budget=resident + BANDS_ROOM)
    assert pair_paths(dense) == ["dense"] and pair_paths(blocks) == ["blocks"]
    assert bands[-1].n_bands > 1
    assert every_table(blocks) == every_table(dense)
    source = resolve_source(None, None, str(sae_dirs["standard"]))
    assert_matches(stored(blocks, source.release, source.sae_id), reference, "out of core")
    assert not (sidecar_dir(blocks) / "runs").exists() or not any((sidecar_dir(blocks) / "runs").iterdir())


@pytest.mark.parametrize("case", ["min", "top-phi", "min-and-top-n11"])
def test_out_of_core_stores_exactly_the_reference_pairs_the_policy_keeps(ingested, reference, bands, sae_dirs,  # noqa: F811
                                                                         resident, case):
    m = upper_quartile_n11(reference)
    options, policy = {
        "min": ({"min_pair_blocks": m}, PairPolicy(min_blocks=m)),
        "top-phi": ({"top_partners": 3, "rank_partners_by": "phi"}, PairPolicy(top_partners=3, rank_by="phi")),
        "min-and-top-n11": ({"min_pair_blocks": 2, "top_partners": 2}, PairPolicy(min_blocks=2, top_partners=2)),
    }[case]
    db = ingested(memory_budget=resident + BANDS_ROOM, **options)
    assert pair_paths(db) == ["blocks"] and bands[-1].n_bands > 1
    want = expected(reference, policy)
    assert 0 < len(want) < len(reference.pairs)
    source = resolve_source(None, None, str(sae_dirs["standard"]))
    assert stored(db, source.release, source.sae_id).pair_rows == want
    assert every_table(db) == every_table(ingested(**options))  # and the dense path's tables, all of them


def test_a_pair_pass_over_budget_fails_then_resumes_with_a_larger_one(tmp_path, ingested, sae_dirs, corpus,
                                                                      threshold, resident):  # noqa: F811
    db = tmp_path / "catalog.duckdb"
    source = resolve_source(None, None, str(sae_dirs["standard"]))
    work = dict(dataset=str(corpus), block_size=BLOCK, max_doc_tokens=MAX_DOC, threshold=threshold, progress=False)
    with pytest.raises(SaecatError, match="the pair pass needs at least .* more than the memory budget"):
        # passes the early check, not the pair pass's plan
        ingest(source, IngestOptions(memory_budget=resident + parse_size("24KB"), **work), db=db)
    assert len(checkpoints(db)) == 1  # the stream is kept: only the pair pass is left
    assert ingest(source, IngestOptions(**work), db=db).status == "ingested"  # default budget: keeps blocks
    assert pair_paths(db) == ["blocks", "blocks"]
    assert every_table(db) == every_table(ingested())


# ------------------------------------------------------------------ kill -9, through the CLI

# The CLI in a subprocess, its process baseline pinned at 0, that SIGKILLs itself: in the stream,
# after the Nth checkpoint and with blocks on disk past it; or in the pair pass, once N bands are
# finished; or never ("none").
CLI = """
import os, signal, sys
import ingest.blockpairs as bp, ingest.checkpoint as ck, ingest.pipeline as pipeline
pipeline.process_memory = lambda device: 0
where, after = sys.argv[1], int(sys.argv[2])
del sys.argv[1:3]
saves = [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where == "stream":
    save, add = ck.Checkpoint.save, bp.BlockSets.add_sets
    def counted_save(self, state):
        save(self, state)
        saves[0] += 1
    def add_then_die(self, lengths, ids):
        add(self, lengths, ids)
        if saves[0] >= after and self.n_blocks > 0:
            self.sync()
            die()
    ck.Checkpoint.save, bp.BlockSets.add_sets = counted_save, add_then_die
elif where == "pairs":
    put = bp._Store.put
    def put_then_die(self, band, rows):
        put(self, band, rows)
        if len(self.done) >= after:
            die()
    bp._Store.put = put_then_die
from queries.front.cli import main
main()
"""


def pinned_cli(where: str, after: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, where, str(after), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=180)


def _args(sae_path: Path, model_dir: Path, *budget: str) -> list[str]:
    return ["ingest", "--dataset", "docs.jsonl", "--sae-path", str(sae_path), "--model", str(model_dir),
            "--db", "catalog.duckdb", "--block-size", "32", "--max-doc-tokens", str(MAX_DOC_TOKENS),
            "--batch-tokens", str(BATCH_TOKENS), "--checkpoint-every", "0", *budget]


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory, sae_dirs, model_dir) -> dict:
    folder = tmp_path_factory.mktemp("dense")
    write_jsonl(folder / "docs.jsonl", big_corpus_texts())
    proc = run_cli(*_args(sae_dirs["standard"], model_dir), cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert pair_paths(folder / "catalog.duckdb") == ["dense"]
    return every_table(folder / "catalog.duckdb")


@pytest.mark.parametrize("where,after", [("stream", 5), ("pairs", 1)])
def test_kill_then_rerun_gives_the_same_tables(where, after, tmp_path, dense_reference, sae_dirs, model_dir,
                                               resident):
    write_jsonl(tmp_path / "docs.jsonl", big_corpus_texts())
    args = _args(sae_dirs["standard"], model_dir, "--memory-budget", str(resident + KILL_ROOM))
    killed = pinned_cli(where, after, *args, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    db = tmp_path / "catalog.duckdb"
    [state] = checkpoints(db)
    run = state.parent
    import torch

    saved = torch.load(state, weights_only=True)
    assert saved["pair_path"] == "blocks"
    on_disk = (run / "block_sets" / blockpairs.INDPTR_FILE).stat().st_size // 8 - 1
    if where == "stream":
        assert on_disk > saved["block_sets_n_blocks"] > 0  # blocks past the checkpoint, to be dropped
        rerun = run_cli(*_args(sae_dirs["standard"], model_dir), cwd=tmp_path)  # default budget: keeps blocks
    else:
        assert json.loads((run / "pairs" / blockpairs.MANIFEST).read_text())["done"] == [0]
        rerun = pinned_cli("none", 0, *args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert every_table(db) == dense_reference
    assert pair_paths(db) == ["blocks", "blocks"]
    assert not run.exists(), "block sets or pair bands left after the commit"


@pytest.mark.parametrize("room,error", [(None, r"--memory-budget 8\.0 KiB is too small for this SAE: the model "),
                                        ("8KiB", r"is too small to count the pairs of 96 features even out of core")])
def test_a_budget_too_small_for_the_run_or_one_band_is_one_cli_error(tmp_path, sae_dirs, model_dir, resident, room,
                                                                      error):
    write_jsonl(tmp_path / "docs.jsonl", big_corpus_texts()[:2])
    budget = "8KiB" if room is None else str(resident + parse_size(room))
    proc = pinned_cli("none", 0, *_args(sae_dirs["standard"], model_dir, "--memory-budget", budget), cwd=tmp_path)
    assert_error(proc.returncode, proc.stderr, error)
    assert_stderr_is_one_line(proc.stderr)
    assert not (tmp_path / "catalog.duckdb").exists() or not checkpoints(tmp_path / "catalog.duckdb")


def test_a_budget_that_is_not_a_size_is_one_cli_error(tmp_path, sae_dirs, model_dir):
    write_jsonl(tmp_path / "docs.jsonl", big_corpus_texts()[:2])
    bad = run_cli(*_args(sae_dirs["standard"], model_dir, "--memory-budget", "lots"), cwd=tmp_path)
    assert_error(bad.returncode, bad.stderr, "memory size")

