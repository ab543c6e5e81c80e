"""Scheduled ingestion: the registry in the catalog, its diff, the watch list, unattended
ingestion with failures and back-off, the sync lock, a killed sync, and queries from another
process throughout. Registry SAEs are the fixture SAEs laid out in the hub cache under real
gpt2-small-res-jb paths, so sync ingests them through sae-lens exactly as it would from the hub."""

from __future__ import annotations

import fnmatch
import json
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from catalog import Catalog
from catalog.errors import SaecatError
from conftest import REGISTRY_REPO, hub_cache_put, make_sae
from ingest import IngestOptions, ingest, resolve_source
from ingest.sync import Watch, add_watch, lock_holder, queued, remove_watch, sync, sync_lock, sync_status, watched
from test_catalog import _main
from test_robustness import (big_corpus_texts, checkpoints, popen_cli, result_tables, run_cli, wait_for_checkpoint,
                             write_jsonl)

RES = "gpt2-small-res-jb"
SAE = {"l0": 10.0, "variance_explained": 0.999}
REGISTRY = {
    RES: {"conversion_func": None, "links": {"model": "https://huggingface.co/gpt2"}, "model": "gpt2-small",
          "repo_id": REGISTRY_REPO,
          "saes": [{"id": f"blocks.{n}.hook_resid_pre", "path": f"blocks.{n}.hook_resid_pre",
                    "neuronpedia": f"gpt2-small/{n}-res-jb", **SAE, "l0": 10.0 + 8 * n} for n in range(3)]},
    "gpt2-small-mlp-tm": {"model": "gpt2-small", "repo_id": "tommmcgrath/gpt2-small-mlp-out-saes",
                          "saes": [{"id": "blocks.0.hook_mlp_out", "path": "sae_group_gpt2_blocks.0.hook_mlp_out_24576:v1",
                                    **SAE}]},
    "pythia-70m-deduped-res-sm": {"model": "pythia-70m-deduped", "repo_id": "ctigges/pythia-70m-deduped__res-sm",
                                  "saes": [{"id": "blocks.0.hook_resid_post", "path": "0-res-sm", **SAE}]},
}
FAST = {"max_tokens": 1500, "block_size": 32, "max_doc_tokens": 129, "batch_tokens": 1024}


def write_registry(path: Path, registry: dict) -> str:
    path.write_text(yaml.safe_dump(registry))
    return str(path)


def rows(db: Path, query: str, params: list | None = None) -> list[tuple]:
    with Catalog.open(db) as cat:
        return cat.con.execute(query, params or []).fetchall()


@pytest.fixture(scope="module")
def hub_saes(sae_dirs, tmp_path_factory, registry_sae) -> dict[str, Path]:
    """blocks.0 and blocks.1 of gpt2-small-res-jb in the hub cache, and a blocks.2 that the 2-layer
    fixture model cannot run (the bad SAE among good ones)."""
    root = tmp_path_factory.mktemp("hub-saes")
    folders = {"blocks.0.hook_resid_pre": make_sae(root / "b0", "standard", seed=5, hook="blocks.0.hook_resid_pre"),
               "blocks.1.hook_resid_pre": sae_dirs["standard"],
               "blocks.2.hook_resid_pre": make_sae(root / "b2", "standard", seed=6, hook="blocks.2.hook_resid_pre")}
    for sae_id, folder in folders.items():
        hub_cache_put(REGISTRY_REPO, {f"{sae_id}/{p.name}": p for p in folder.iterdir()})
    return folders


# ----------------------------------------------------------------------------- the registry


def test_sync_registers_every_sae_without_weights(tmp_path, capsys, monkeypatch):
    db = tmp_path / "catalog.duckdb"
    report = sync(db, write_registry(tmp_path / "r.yaml", REGISTRY), progress=False)
    assert report.counts() == {"releases added": 3, "saes added": 5}
    got = rows(db, "SELECT release, sae_id, status, model, hook_name, layer, neuronpedia_id, repo_path, registry_l0, "
                   "registry_variance_explained, source FROM saes ORDER BY release, sae_id")
    expected = sorted(
        (release, s["id"], "registered", r["model"], s["id"] if s["id"].startswith("blocks.") else None,
         int(s["id"].split(".")[1]), s.get("neuronpedia"), s["path"], s["l0"], s["variance_explained"],
         f"registry:{release}/{s['id']}")
        for release, r in REGISTRY.items() for s in r["saes"])
    assert got == expected
    assert rows(db, "SELECT count(*) FROM features") == [(0,)]
    assert rows(db, "SELECT release, repo_id, model FROM releases ORDER BY release") == sorted(
        (k, r["repo_id"], r["model"]) for k, r in REGISTRY.items())
    assert rows(db, "SELECT n_releases, n_saes, source FROM registry_snapshots") == [(3, 5, str(tmp_path / "r.yaml"))]
    code, out, _ = _main(["releases", "--new", "--json", "--db", str(db)], capsys, monkeypatch)
    assert code == 0
    listed = json.loads(out)
    assert {(r["kind"], r["release"], r["sae_id"]) for r in listed} == \
        {("release", k, None) for k in REGISTRY} | {("sae", k, s["id"]) for k, r in REGISTRY.items() for s in r["saes"]}
    code, out, _ = _main(["saes", "--json", "--db", str(db)], capsys, monkeypatch)
    assert json.loads(out) == []  # nothing ingested; --registered lists them
    code, out, _ = _main(["saes", "--registered", "--json", "--db", str(db)], capsys, monkeypatch)
    assert len(json.loads(out)) == 5


def test_second_sync_records_exactly_what_changed_and_keeps_removed_saes(tmp_path):
    db = tmp_path / "catalog.duckdb"
    sync(db, write_registry(tmp_path / "v1.yaml", REGISTRY), progress=False)
    v2 = json.loads(json.dumps(REGISTRY))
    del v2[RES]["saes"][2]                                   # an SAE removed
    v2[RES]["saes"][1]["l0"] = 99.5                          # one changed
    v2["gpt2-small-mlp-tm"]["repo_id"] = "someone/else"     # a release changed
    del v2["pythia-70m-deduped-res-sm"]                      # a release removed, with its SAE
    v2["new-release"] = {"model": "gpt2-small", "repo_id": "me/new", "saes": [{"id": "x", "path": "x"}]}
    report = sync(db, write_registry(tmp_path / "v2.yaml", v2), progress=False)
    got = rows(db, "SELECT kind, action, release, sae_id, fields FROM registry_changes WHERE snapshot = ? "
                   "ORDER BY ALL", [report.snapshot])
    assert got == sorted([
        ("release", "added", "new-release", None, []),
        ("release", "changed", "gpt2-small-mlp-tm", None, ["repo_id"]),
        ("release", "removed", "pythia-70m-deduped-res-sm", None, []),
        ("sae", "added", "new-release", "x", []),
        ("sae", "changed", RES, "blocks.1.hook_resid_pre", ["l0"]),
        ("sae", "removed", RES, "blocks.2.hook_resid_pre", []),
        ("sae", "removed", "pythia-70m-deduped-res-sm", "blocks.0.hook_resid_post", []),
    ])
    assert rows(db, "SELECT registry_l0 FROM saes WHERE sae_id = 'blocks.1.hook_resid_pre'") == [(99.5,)]
    # removed SAEs stay in the catalog, marked
    assert rows(db, "SELECT sae_id FROM saes WHERE unlisted_at IS NOT NULL ORDER BY 1") == [
        ("blocks.0.hook_resid_post",), ("blocks.2.hook_resid_pre",)]
    assert rows(db, "SELECT count(*) FROM saes") == [(6,)]
    # the same registry again: a snapshot, no changes; the first one back: the removed ones return
    assert sync(db, str(tmp_path / "v2.yaml"), progress=False).changes == []
    back = sync(db, str(tmp_path / "v1.yaml"), progress=False)
    assert {(c.action, c.sae_id) for c in back.changes if c.kind == "sae"} == {
        ("added", "blocks.2.hook_resid_pre"), ("added", "blocks.0.hook_resid_post"), ("removed", "x"),
        ("changed", "blocks.1.hook_resid_pre")}
    assert rows(db, "SELECT count(*) FROM saes WHERE unlisted_at IS NOT NULL") == [(1,)]


def test_packaged_registry_loads_completely(tmp_path):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    db = tmp_path / "catalog.duckdb"
    report = sync(db, progress=False)
    directory = get_pretrained_saes_directory()
    assert rows(db, "SELECT count(DISTINCT release), count(*) FROM saes") == [
        (len(directory), sum(len(r.saes_map) for r in directory.values()))]
    assert report.counts()["saes added"] == sum(len(r.saes_map) for r in directory.values())


# ----------------------------------------------------------------------------- the watch list


def brute_force_selection(db: Path, watch: Watch) -> set[tuple[str, str]]:
    out = set()
    for release, sae_id, model, hook, width, l0 in rows(
            db, "SELECT release, sae_id, model, hook_name, d_sae, registry_l0 FROM saes"):
        ok = fnmatch.fnmatchcase(release, watch.release_pattern)
        ok &= watch.model is None or model == watch.model
        ok &= watch.hook_pattern is None or hook is None or fnmatch.fnmatchcase(hook, watch.hook_pattern)
        ok &= watch.min_width is None or width is None or width >= watch.min_width
        ok &= watch.max_width is None or width is None or width <= watch.max_width
        ok &= watch.min_l0 is None or (l0 is not None and l0 >= watch.min_l0)
        ok &= watch.max_l0 is None or (l0 is not None and l0 <= watch.max_l0)
        if ok:
            out.add((release, sae_id))
    return out


@pytest.mark.parametrize("watch", [
    Watch({"dataset": "d"}, model="gpt2-small", hook_pattern="blocks.*.hook_resid_pre"),
    Watch({"dataset": "d"}, release_pattern="gpt2-*", min_l0=12, max_l0=30),
    Watch({"dataset": "d"}, release_pattern="*-sm"),
    Watch({"dataset": "d"}, hook_pattern="blocks.0.*", max_l0=10),
])
def test_watch_selects_exactly_the_intended_saes(tmp_path, watch):
    db = tmp_path / "catalog.duckdb"
    sync(db, write_registry(tmp_path / "r.yaml", REGISTRY), progress=False)
    add_watch(db, watch)
    with Catalog.open(db) as cat:
        got = {(r["release"], r["sae_id"]) for r in watched(cat).to_pylist()}
    assert got == brute_force_selection(db, watch) and got


def test_watch_width_is_resolved_from_configs_in_the_hub_cache(tmp_path, hub_saes, model_dir, corpus):
    db = tmp_path / "catalog.duckdb"
    sync(db, write_registry(tmp_path / "r.yaml", REGISTRY), progress=False)
    key = add_watch(db, Watch({"dataset": str(corpus), "model": str(model_dir), **FAST}, release_pattern=RES,
                              max_width=100))
    with Catalog.open(db) as cat:
        assert all(r["unresolved"] for r in watched(cat).to_pylist())  # width unknown: undecided
        assert queued(cat) == []
    from ingest.sync import resolve_watched

    assert resolve_watched(db) == []  # all three configs are in the hub cache
    assert rows(db, "SELECT sae_id, d_sae, d_in, hook_name FROM saes WHERE release = ? ORDER BY 1", [RES]) == [
        (f"blocks.{n}.hook_resid_pre", 96, 64, f"blocks.{n}.hook_resid_pre") for n in range(3)]
    remove_watch(db, key)
    add_watch(db, Watch({"dataset": str(corpus)}, release_pattern=RES, max_width=50))
    with Catalog.open(db) as cat:
        assert watched(cat).num_rows == 0  # 96 wide now known: outside the range
    with pytest.raises(SaecatError, match="no watch 99"):
        remove_watch(db, 99)
    with pytest.raises(SaecatError, match="unknown ingestion option"):
        add_watch(db, Watch({"dataset": "d", "max_tokenz": 5}))


# ----------------------------------------------------------------------------- sync --ingest


def test_sync_ingests_the_watched_saes_and_records_the_bad_one(tmp_path, hub_saes, model_dir, corpus):
    db = tmp_path / "catalog.duckdb"
    registry = write_registry(tmp_path / "r.yaml", REGISTRY)
    sync(db, registry, progress=False)
    options = {"dataset": str(corpus), "model": str(model_dir), **FAST}
    add_watch(db, Watch(options, model="gpt2-small", hook_pattern="blocks.*.hook_resid_pre"))
    report = sync(db, registry, ingest=True, progress=False)
    assert report.ingested == [(RES, "blocks.0.hook_resid_pre"), (RES, "blocks.1.hook_resid_pre")]
    [(release, sae_id, error)] = report.failed
    assert (release, sae_id) == (RES, "blocks.2.hook_resid_pre") and "no hook 'blocks.2.hook_resid_pre'" in error
    assert rows(db, "SELECT sae_id, status FROM saes WHERE release = ? ORDER BY 1", [RES]) == [
        ("blocks.0.hook_resid_pre", "ready"), ("blocks.1.hook_resid_pre", "ready"),
        ("blocks.2.hook_resid_pre", "registered")]
    assert rows(db, "SELECT sae_id, status, error LIKE '%no hook%' FROM ingest_runs ORDER BY run") == [
        ("blocks.0.hook_resid_pre", "done", None), ("blocks.1.hook_resid_pre", "done", None),
        ("blocks.2.hook_resid_pre", "failed", True)]
    # the same tables as ingesting that SAE directly
    alone = tmp_path / "alone.duckdb"
    ingest(resolve_source(RES, "blocks.1.hook_resid_pre", None), IngestOptions(**options, progress=False), db=alone)
    got, expected = result_tables(db), result_tables(alone)
    key = rows(db, "SELECT sae FROM saes WHERE sae_id = 'blocks.1.hook_resid_pre'")[0][0]
    for table in ("features", "cooccurrence", "feature_examples"):
        assert [r[1:] for r in got[table] if r[0] == key] == [r[1:] for r in expected[table]], table
    # back-off: not retried within the hour, retried once it has passed; failures counted
    state = sync_status(db)
    assert [(r["sae_id"], r["failures"]) for r in state["failed"]] == [("blocks.2.hook_resid_pre", 1)]
    assert state["queued"] == []
    again = sync(db, registry, ingest=True, progress=False)
    assert again.ingested == [] and again.failed == []
    later = sync(db, registry, ingest=True, progress=False, retry_base=timedelta(0))
    assert [f[1] for f in later.failed] == ["blocks.2.hook_resid_pre"]
    assert [(r["sae_id"], r["failures"]) for r in sync_status(db)["failed"]] == [("blocks.2.hook_resid_pre", 2)]


def test_one_sync_at_a_time_and_a_dead_holder_is_taken_over(tmp_path):
    db = tmp_path / "catalog.duckdb"
    registry = write_registry(tmp_path / "r.yaml", REGISTRY)
    with sync_lock(db):
        assert lock_holder(db)["pid"] > 0
        with pytest.raises(SaecatError, match="already running"):
            sync(db, registry, progress=False)
    assert lock_holder(db) is None
    # a process that took the lock and was killed: its lock dies with it
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = {sys.path!r}
        from pathlib import Path
        from ingest.sync import sync_lock
        with sync_lock(Path({str(db)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert lock_holder(db)["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_holder(db) is None
    assert sync(db, registry, progress=False).counts()["saes added"] == 5


def test_killed_sync_resumes_and_duplicates_nothing(tmp_path, hub_saes, model_dir):
    db = tmp_path / "catalog.duckdb"
    docs = write_jsonl(tmp_path / "docs.jsonl", big_corpus_texts())
    registry = write_registry(tmp_path / "r.yaml", {RES: {**REGISTRY[RES], "saes": REGISTRY[RES]["saes"][1:2]}})
    options = {"dataset": str(docs), "model": str(model_dir), "block_size": 32, "max_doc_tokens": 129,
               "batch_tokens": 256, "checkpoint_every_s": 0}
    sync(db, registry, progress=False)
    add_watch(db, Watch(options, release_pattern=RES))
    proc = popen_cli("sync", "--registry", registry, "--ingest", "--db", str(db), cwd=tmp_path)
    wait_for_checkpoint(proc, db)
    assert proc.poll() is None, "the ingestion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert rows(db, "SELECT status FROM saes WHERE sae_id = 'blocks.1.hook_resid_pre'") == [("registered",)]
    done = run_cli("sync", "--registry", registry, "--ingest", "--db", str(db), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not checkpoints(db)
    assert rows(db, "SELECT status FROM ingest_runs ORDER BY run") == [("interrupted",), ("done",)]
    assert rows(db, "SELECT count(*), count(DISTINCT (release, sae_id)) FROM saes") == [(1, 1)]
    alone = tmp_path / "alone.duckdb"
    ingest(resolve_source(RES, "blocks.1.hook_resid_pre", None), IngestOptions(**options, progress=False), db=alone)
    got, expected = result_tables(db), result_tables(alone)
    for table in ("features", "cooccurrence", "feature_tokens", "feature_examples", "feature_histograms"):
        assert got[table] == expected[table], table


READER = """
import sys, time
sys.path[:0] = {path!r}
from catalog import Catalog
queries = errors = 0
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        with Catalog.open({db!r}) as cat:
            cat.con.execute("SELECT count(*) FROM saes").fetchall()
            cat.con.execute("SELECT count(*) FROM features").fetchall()
        queries += 1
    except Exception as err:
        errors += 1
        print(repr(err), file=sys.stderr, flush=True)
    if open({stop!r}).read():
        break
print(queries, errors)
"""


def test_queries_from_another_process_never_fail_during_a_sync(tmp_path, hub_saes, model_dir, corpus):
    db = tmp_path / "catalog.duckdb"
    registry = write_registry(tmp_path / "r.yaml", REGISTRY)
    sync(db, registry, progress=False)
    add_watch(db, Watch({"dataset": str(corpus), "model": str(model_dir), **FAST}, release_pattern=RES,
                        hook_pattern="blocks.[01].*"))
    stop = tmp_path / "stop"
    stop.write_text("")
    reader = subprocess.Popen([sys.executable, "-c", READER.format(path=sys.path, db=str(db), stop=str(stop))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        report = sync(db, registry, ingest=True, progress=False)
        time.sleep(0.5)
    finally:
        stop.write_text("stop")
        out, err = reader.communicate(timeout=120)
    assert len(report.ingested) == 2
    queries, errors = map(int, out.split())
    assert errors == 0, err
    assert queries > 10


def test_watch_and_status_commands(tmp_path, capsys, monkeypatch, hub_saes, model_dir, corpus):
    db = tmp_path / "catalog.duckdb"
    registry = write_registry(tmp_path / "r.yaml", REGISTRY)
    sync(db, registry, progress=False)
    code, out, err = _main(["watch", "add", "--dataset", str(corpus), "--model", "gpt2-small", "--hook",
                            "blocks.*.hook_resid_pre", "--max-tokens", "1500", "--option", f"model={json.dumps(str(model_dir))}",
                            "--option", "block_size=32", "--db", str(db)], capsys, monkeypatch)
    assert code == 0, err
    code, out, _ = _main(["watch", "list", "--json", "--db", str(db)], capsys, monkeypatch)
    [listed] = json.loads(out)
    assert listed["selects"] == 3 and listed["ready"] == 0
    assert json.loads(listed["options"]) == {"dataset": str(corpus), "max_tokens": 1500, "model": str(model_dir),
                                             "block_size": 32}
    code, out, _ = _main(["status", "--json", "--db", str(db)], capsys, monkeypatch)
    state = json.loads(out)
    assert state["sync"] is None and state["running"] == [] and state["failed"] == []
    assert [r["sae_id"] for r in state["queued"]] == [f"blocks.{n}.hook_resid_pre" for n in range(3)]
    code, out, err = _main(["sync", "--registry", registry, "--ingest", "--db", str(db)], capsys, monkeypatch)
    assert code == 1 and "blocks.2.hook_resid_pre" in err  # the bad one fails the command, after the others
    code, out, _ = _main(["status", "--json", "--db", str(db)], capsys, monkeypatch)
    state = json.loads(out)
    assert state["queued"] == [] and [r["sae_id"] for r in state["failed"]] == ["blocks.2.hook_resid_pre"]
    assert len(state["done"]) == 2
    code, out, _ = _main(["watch", "remove", "1", "--db", str(db)], capsys, monkeypatch)
    assert code == 0 and rows(db, "SELECT count(*) FROM watches") == [(0,)]
    code, _, err = _main(["watch", "add", "--dataset", "d", "--min-l0", "5", "--max-l0", "2", "--db", str(db)],
                         capsys, monkeypatch)
    assert code == 1 and "empty range" in err


def test_schedule_rounds_outlive_a_failed_one(tmp_path):
    from ingest.sync import parse_every, schedule

    db = tmp_path / "catalog.duckdb"
    registry = tmp_path / "r.yaml"
    lines: list[str] = []
    schedule(db, timedelta(0), str(registry), rounds=1, report=lines.append, progress=False)
    assert any("sync failed" in line and "does not exist" in line for line in lines)
    write_registry(registry, REGISTRY)
    schedule(db, timedelta(0), str(registry), rounds=2, report=lines.append, progress=False)
    assert rows(db, "SELECT count(*) FROM registry_snapshots") == [(2,)]
    assert parse_every("6h") == timedelta(hours=6) and parse_every("90s") == timedelta(seconds=90)
    with pytest.raises(SaecatError, match="--every"):
        parse_every("often")
