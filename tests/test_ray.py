"""Ingestion fanned out on a local Ray cluster: the same catalog as one machine, and a worker
that dies is retried."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from catalog import Catalog
from catalog.errors import SaecatError
from catalog.store import sidecar_dir
from ingest import IngestOptions, ingest, resolve_source
from ingest.distributed import count_part

# Small batches and one-batch shards, so 24 documents make many parts for two workers.
OPTIONS = dict(max_doc_tokens=200, block_size=16, batch_tokens=600, shard_batches=1, ray_task_shards=1,
               progress=False)
VOLATILE = {"ingested_at", "registered_at", "unlisted_at", "started_at", "updated_at", "finished_at", "run"}
# what one SAE's ingestion writes, and the order that makes its rows comparable
TABLES = {"features": "feature", "cooccurrence": "i, j", "feature_tokens": "feature, direction, rank",
          "feature_examples": "feature, rank", "feature_histograms": "feature, bin", "blocks": "block",
          "activation_spectrum": "rank", "saes": "sae"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def checkpoints(db: Path) -> list[Path]:
    return sorted((sidecar_dir(db) / "runs").glob("*/state.pt"))


def dump(db: Path) -> dict[str, list[tuple]]:
    """Every row the ingestion wrote, without timestamps and run ids."""
    with Catalog.open(db) as cat:
        out = {}
        for table, order in TABLES.items():
            columns = [c for (c,) in cat.con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
                [table]).fetchall() if c not in VOLATILE]
            out[table] = cat.con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()
    return out


def ingest_into(db: Path, sae_dir: Path, corpus: Path, **options):
    source = resolve_source(None, None, str(sae_dir))
    return ingest(source, IngestOptions(dataset=str(corpus), group_column="kind", **OPTIONS, **options), db=db)


def one_thread(db: Path, sae_dir: Path, corpus: Path):
    """The single-machine ingestion, on one thread as each Ray task runs (one CPU): float
    kernels split their work by thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ingest_into(db, sae_dir, corpus)
    finally:
        torch.set_num_threads(threads)


def test_ray_ingestion_writes_the_single_machine_catalog_bit_for_bit(cluster, tmp_path, sae_dirs, corpus):
    here = one_thread(tmp_path / "here.duckdb", sae_dirs["jumprelu"], corpus)
    there = ingest_into(tmp_path / "ray.duckdb", sae_dirs["jumprelu"], corpus, ray="auto")
    assert (there.status, there.n_tokens, there.n_blocks, there.n_pairs) == (
        "ingested", here.n_tokens, here.n_blocks, here.n_pairs)
    assert here.n_tokens > 2000 and here.n_blocks > 50
    a, b = dump(tmp_path / "here.duckdb"), dump(tmp_path / "ray.duckdb")
    for table in TABLES:
        assert a[table] == b[table], table
    assert len(a["cooccurrence"]) > 100 and len(a["blocks"]) > 10 and len(a["activation_spectrum"]) > 0


def crash_once(marker: str):
    """A count_part whose first call kills its worker process, as a lost machine would."""
    def task(spec, part):
        if part.index == 2 and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)
        return count_part(spec, part)
    return task


def test_a_worker_that_dies_is_retried_on_its_part(cluster, tmp_path, sae_dirs, corpus, monkeypatch):
    import ingest.distributed as distributed

    marker = tmp_path / "crashed"
    real = distributed.count_on_ray
    monkeypatch.setattr(distributed, "count_on_ray",
                        lambda session, stream, on_merge: real(session, stream, on_merge, task=crash_once(str(marker))))
    db = tmp_path / "retried.duckdb"
    result = ingest_into(db, sae_dirs["topk"], corpus, ray="auto")
    assert marker.exists() and result.status == "ingested"
    expected = ingest_into(tmp_path / "plain.duckdb", sae_dirs["topk"], corpus, ray="auto")
    assert dump(db) == dump(tmp_path / "plain.duckdb") and expected.n_tokens == result.n_tokens


def logging_task(log: Path, fail_from: int | None = None):
    """A count_part that notes the batches of each part it counts in `log`, and fails on purpose
    from part `fail_from` on (after the parts before it)."""
    def task(spec, part):
        if fail_from is not None and part.index >= fail_from:
            time.sleep(1)
            raise SaecatError("stopped on purpose")
        state = count_part(spec, part)
        (log / f"{part.place.batch}-{len(part.batches)}").touch()
        return state
    return task


def test_a_failed_ray_run_resumes_counting_only_the_missing_shards(cluster, tmp_path, sae_dirs, corpus,
                                                                    monkeypatch):
    import ingest.distributed as distributed

    real = distributed.count_on_ray
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    db = tmp_path / "resumed.duckdb"
    monkeypatch.setattr(distributed, "count_on_ray", lambda session, stream, on_merge: real(
        session, stream, on_merge, task=logging_task(first, fail_from=4)))
    with pytest.raises(SaecatError, match="stopped on purpose"):
        ingest_into(db, sae_dirs["jumprelu"], corpus, ray="auto", checkpoint_every_s=0)
    [saved_state] = checkpoints(db)
    state = torch.load(saved_state, weights_only=True)
    saved = set(range(state["folded"])) | set(state["pending"])  # shards (one batch each) the checkpoint holds
    assert saved and state["n_tokens"] > 0

    monkeypatch.setattr(distributed, "count_on_ray", lambda session, stream, on_merge: real(
        session, stream, on_merge, task=logging_task(second)))
    resumed = ingest_into(db, sae_dirs["jumprelu"], corpus, ray="auto", checkpoint_every_s=0)
    again = {b for name in os.listdir(second) for start, n in [map(int, name.split("-"))] for b in range(start, start + n)}
    assert saved.isdisjoint(again) and saved | again == set(range(len(saved | again)))  # each shard counted once
    assert not checkpoints(db)
    here = one_thread(tmp_path / "here.duckdb", sae_dirs["jumprelu"], corpus)
    assert resumed.n_tokens == here.n_tokens
    assert dump(db) == dump(tmp_path / "here.duckdb")


def plan_of(db: Path) -> dict:
    """The memory plan each run's params record, in run order."""
    with Catalog.open(db) as cat:
        return [json.loads(params)["plan"] for (params,) in cat.con.execute(
            "SELECT params FROM ingest_runs ORDER BY run").fetchall()]


def test_ray_out_of_core_resumes_and_writes_the_single_machine_catalog(cluster, tmp_path, sae_dirs, corpus,
                                                                      monkeypatch):
    """Out of core, each task returns its part's block sets and the driver appends them as it
    merges: a run that fails part-way keeps the blocks its checkpoint counts, the rerun counts each
    missing shard once, and the pair pass after the stream gives the dense single-machine catalog."""
    import ingest.blockpairs as blockpairs
    import ingest.distributed as distributed

    # a budget a few KB past the resident part: finer than the process's own memory stays put
    monkeypatch.setattr("ingest.pipeline.process_memory", lambda device: 0)
    here = one_thread(tmp_path / "here.duckdb", sae_dirs["jumprelu"], corpus)
    [dense] = plan_of(tmp_path / "here.duckdb")
    # room to merge a task's counters (twice the per-feature state) and for the tiles, not beside the encoding
    budget = dense["memory"]["resident"] + 2 * dense["memory"]["features"] + dense["tile_bytes"]
    real = distributed.count_on_ray
    db, log = tmp_path / "blocks.duckdb", tmp_path / "log"
    log.mkdir()
    monkeypatch.setattr(distributed, "count_on_ray", lambda session, stream, on_merge: real(
        session, stream, on_merge, task=logging_task(log, fail_from=6)))
    with pytest.raises(SaecatError, match="stopped on purpose"):
        ingest_into(db, sae_dirs["jumprelu"], corpus, ray="auto", checkpoint_every_s=0, memory_budget=budget)
    [saved] = checkpoints(db)
    state = torch.load(saved, weights_only=True)
    assert state["pair_path"] == "blocks" and 0 < state["block_sets_n_blocks"] < here.n_blocks

    monkeypatch.setattr(distributed, "count_on_ray", real)
    passes = []
    count = blockpairs.count_pairs
    monkeypatch.setattr("ingest.pipeline.count_pairs", lambda *a, **k: passes.append(1) or count(*a, **k))
    resumed = ingest_into(db, sae_dirs["jumprelu"], corpus, ray="auto", memory_budget=budget)
    assert [p["pair_path"] for p in plan_of(db)] == ["blocks", "blocks"] and passes == [1]
    assert (resumed.n_tokens, resumed.n_blocks, resumed.n_pairs) == (here.n_tokens, here.n_blocks, here.n_pairs)
    assert dump(db) == dump(tmp_path / "here.duckdb")


def test_a_part_that_fails_on_its_input_fails_the_run_and_commits_nothing(cluster, tmp_path, sae_dirs, corpus,
                                                                          monkeypatch):
    import ingest.distributed as distributed

    def bad(spec, part):
        if part.index == 3:
            raise SaecatError("weights went NaN")
        return count_part(spec, part)

    real = distributed.count_on_ray
    monkeypatch.setattr(distributed, "count_on_ray",
                        lambda session, stream, on_merge: real(session, stream, on_merge, task=bad))
    db = tmp_path / "failed.duckdb"
    with pytest.raises(SaecatError, match="part 3 .*weights went NaN"):
        ingest_into(db, sae_dirs["topk"], corpus, ray="auto")
    with Catalog.open(db) as cat:
        assert cat.con.execute("SELECT count(*) FROM saes WHERE status = 'ready'").fetchone() == (0,)
        assert cat.con.execute("SELECT count(*) FROM features").fetchone() == (0,)
        assert cat.con.execute("SELECT status FROM ingest_runs").fetchall() == [("failed",)]


def test_the_cli_takes_ray_without_an_address(cluster, tmp_path, sae_dirs, corpus, monkeypatch, capsys):
    from queries.front.cli import _flag_default, main

    assert _flag_default(["ingest", "--ray", "--json"], "--ray", "auto") == ["ingest", "--ray", "auto", "--json"]
    assert _flag_default(["ingest", "--ray"], "--ray", "auto") == ["ingest", "--ray", "auto"]
    assert _flag_default(["ingest", "--ray", "ray://h:10001"], "--ray", "auto") == ["ingest", "--ray", "ray://h:10001"]
    monkeypatch.setattr("sys.argv", ["saecat", "ingest", "--sae-path", str(sae_dirs["topk"]), "--dataset", str(corpus),
                                     "--max-doc-tokens", "200", "--block-size", "16", "--ray", "--json",
                                     "--db", str(tmp_path / "cli.duckdb")])
    main()
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ingested" and result["n_blocks"] > 50


def test_without_ray_installed_the_error_says_what_to_install(tmp_path, sae_dirs, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(SaecatError, match=r"pip install 'saecat\[ray\]'"):
        ingest_into(tmp_path / "c.duckdb", sae_dirs["topk"], corpus, ray="auto")


def test_ctrl_c_checkpoints_a_ray_run_and_a_rerun_finishes_it(cluster, tmp_path, sae_dirs, model_dir, monkeypatch):
    """Through the CLI on its own local cluster (`--ray local`), the first Ctrl-C checkpoints the
    merged counters and stops; the same work run again (here through the API, on this module's
    cluster) counts only what is left."""
    from test_robustness import (HOW, WORK, _ingest_args, assert_error, big_corpus_texts, popen_cli, runs,
                                 wait_for_checkpoint, write_jsonl)

    write_jsonl(tmp_path / "docs.jsonl", big_corpus_texts())
    db = tmp_path / "catalog.duckdb"
    proc = popen_cli(*_ingest_args(sae_dirs["standard"], model_dir), "--shard-batches", "1", "--ray-task-shards", "2",
                     "--ray", "local", cwd=tmp_path)
    wait_for_checkpoint(proc, db, timeout=180)
    assert proc.poll() is None, "ingestion finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert "checkpoint saved" in assert_error(proc.returncode, stderr, r"interrupted after [\d,]+ tokens")
    assert [r[1] for r in runs(db)] == ["interrupted"]
    [saved] = checkpoints(db)
    state = torch.load(saved, weights_only=True)
    assert 0 < state["n_tokens"] and (state["folded"] or state["pending"])

    monkeypatch.chdir(tmp_path)
    opts = IngestOptions(model=str(model_dir), **WORK, **HOW, checkpoint_every_s=0, shard_batches=1,
                         ray_task_shards=2, ray="auto")
    assert ingest(resolve_source(None, None, str(sae_dirs["standard"])), opts, db=Path("catalog.duckdb")).status \
        == "ingested"
    assert [r[1] for r in runs(db)] == ["interrupted", "done"] and not checkpoints(db)
    with Catalog.open(db) as cat:
        n_tokens, status = cat.con.execute("SELECT n_tokens, status FROM saes").fetchone()
    assert status == "ready" and n_tokens == runs(db)[1][3] > state["n_tokens"]
