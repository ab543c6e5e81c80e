"""Fault injection at every input boundary of `saecat ingest` (and of opening a catalog): each
bad input is made the way it really happens, from artifacts saved with the libraries' defaults
(sae-lens `save_model`, transformers `save_pretrained`, DuckDB) and then damaged, and the CLI
must answer with a non-zero exit, one line on stderr naming what is wrong and which file or
flag, no traceback, and the catalog exactly as it was (or not created at all).

One table row per fault. Rows marked "cli" run the real command in a subprocess (one or more per
boundary); the others call the same entry point, `queries.front.cli.main`, in this process with
sys.argv set and file descriptors 1 and 2 captured: the same code path without ~4 s of imports
per call. An error nobody foresaw is injected into a subprocess last: one line naming the file
its traceback was written to, or the traceback itself with --debug.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb
import pytest
import torch

from catalog import Catalog
from catalog.schema import SCHEMA_VERSION
from conftest import HOOK
from test_robustness import (  # noqa: F401  (base_db is a fixture: a catalog already holding one SAE)
    BLOCK,
    _env,
    assert_error,
    assert_stderr_is_one_line,
    base_db,
    checkpoints,
    copy_catalog,
    dump,
    run_cli,
)

# ------------------------------------------------------------------------------ making faults


@dataclass
class Inputs:
    """What one ingestion is run with; a fault's `make` damages one of them."""

    tmp: Path
    sae: Path
    model: Path
    dataset: Path
    db: Path
    extra: list[str] = field(default_factory=list)
    command: str = "ingest"  # or "saes": a read command, for the catalog faults
    immutable: list[Path] = field(default_factory=list)  # chattr +i'd, to be released after the test


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _sae(i: Inputs, name: str) -> Path:
    i.sae = _copy(i.sae, i.tmp / name)
    return i.sae


def _weights(damage: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Inputs], None]:
    """Load the SAE's weights with safetensors, change them, save them with safetensors again."""
    from safetensors.torch import load_file, save_file

    def make(i: Inputs) -> None:
        path = _sae(i, "damaged-sae") / "sae_weights.safetensors"
        tensors = load_file(path)
        damage(tensors)
        save_file(tensors, path)

    return make


def _truncate(path: Path, n: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:n])


def _garble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _sae_file(name: str, damage: Callable[[Path], None]) -> Callable[[Inputs], None]:
    return lambda i: damage(_sae(i, "damaged-sae") / name)


def _cfg(change: Callable[[dict], object]) -> Callable[[Inputs], None]:
    def make(i: Inputs) -> None:
        path = _sae(i, "damaged-sae") / "cfg.json"
        cfg = json.loads(path.read_text())
        result = change(cfg)
        path.write_text(json.dumps(cfg if result is None else result))

    return make


def _narrow_sae(i: Inputs) -> None:
    """An SAE saved by sae-lens for a 32-wide hook, run on the fixture model (64 wide there)."""
    from sae_lens import SAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=32, d_sae=40)
    cfg.metadata.hook_name = HOOK
    cfg.metadata.model_name = "gpt2"
    i.sae = i.tmp / "narrow-sae"
    SAE.from_dict(cfg.to_dict()).save_model(i.sae)


def _model(damage: Callable[[Path], None]) -> Callable[[Inputs], None]:
    def make(i: Inputs) -> None:
        i.model = _copy(i.model, i.tmp / "damaged-model")
        damage(i.model)

    return make


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)


def _model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "banana"
    (folder / "config.json").write_text(json.dumps(config))


def _dataset(name: str, content: Callable[[Path], bytes]) -> Callable[[Inputs], None]:
    """A dataset file made from the good corpus (its JSON lines)."""

    def make(i: Inputs) -> None:
        data = content(i.dataset)
        i.dataset = i.tmp / name
        i.dataset.write_bytes(data)

    return make


def _lines(corpus: Path) -> list[bytes]:
    return corpus.read_bytes().splitlines(keepends=True)


def _bad_line(corpus: Path) -> bytes:
    lines = _lines(corpus)
    return b"".join(lines[:2] + [lines[2][: len(lines[2]) // 2] + b"\n"] + lines[3:])  # line 3 cut in half


def _latin1_line(corpus: Path) -> bytes:
    lines = _lines(corpus)
    return b"".join(lines[:1] + [json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n"]
                    + lines[1:])  # line 2 written as Latin-1 by another tool


def _latin1_text(corpus: Path) -> bytes:
    text = json.loads(_lines(corpus)[0])["text"]
    return ("first line\nna\u00efve caf\u00e9 r\u00e9sum\u00e9\n" + text).encode("latin-1", errors="replace")


def _csv_renamed_parquet(corpus: Path) -> bytes:
    return b"text\n" + b"".join(b'"' + json.loads(line)["text"][:50].replace('"', "").encode() + b'"\n'
                                for line in _lines(corpus))


def _db_dir(i: Inputs) -> None:
    i.db = i.tmp / "catalog.duckdb"
    i.db.mkdir()


def _chattr(path: Path, i: Inputs) -> None:
    """Make a path immutable: the only way to stop root (these tests' user) from writing it."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot make {path} immutable here: {proc.stderr.strip()}")
    i.immutable.append(path)


def _db_read_only(i: Inputs) -> None:
    _chattr(i.db, i)


def _db_folder_read_only(i: Inputs) -> None:
    folder = i.tmp / "read-only-folder"
    folder.mkdir()
    i.db = folder / "catalog.duckdb"
    _chattr(folder, i)


def _db_random(i: Inputs) -> None:
    i.db = i.tmp / "random.duckdb"
    i.db.write_bytes(os.urandom(64 * 1024))


def _db_other_app(i: Inputs) -> None:
    """A DuckDB database another program made: its own tables, no saecat schema."""
    i.db = i.tmp / "shop.duckdb"
    con = duckdb.connect(str(i.db))
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR)")
    con.execute("INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace')")
    con.execute("CREATE VIEW names AS SELECT name FROM customers")
    con.close()


def _db_rails(i: Inputs) -> None:
    """Another program's database with a table named like saecat's version table (Rails keeps
    string versions in `schema_migrations`)."""
    i.db = i.tmp / "rails.duckdb"
    con = duckdb.connect(str(i.db))
    con.execute("CREATE TABLE schema_migrations (version VARCHAR PRIMARY KEY)")
    con.execute("INSERT INTO schema_migrations VALUES ('20240101120000')")
    con.close()


def _db_newer(i: Inputs) -> None:
    con = duckdb.connect(str(i.db))
    con.execute("INSERT INTO schema_migrations (version) VALUES (?)", [SCHEMA_VERSION + 1])
    con.close()


def _flags(*args: str) -> Callable[[Inputs], None]:
    return lambda i: i.extra.extend(args)


def _read(make: Callable[[Inputs], None]) -> Callable[[Inputs], None]:
    """The same catalog fault met by a read command."""

    def read(i: Inputs) -> None:
        make(i)
        i.command = "saes"

    return read


# ------------------------------------------------------------------------------ the faults


@dataclass(frozen=True)
class Fault:
    make: Callable[[Inputs], None]
    pattern: str  # what the one error line must say: what is wrong, and the file or flag
    via: str = "main"  # "cli": a real subprocess; "main": queries.front.cli.main in this process


# Path fragments the patterns need (the error line must name the file at fault).
W = r"damaged-sae/sae_weights\.safetensors"
C = r"damaged-sae/cfg\.json"

FAULTS: dict[str, Fault] = {
    # the SAE folder
    "sae-weights-missing": Fault(_sae_file("sae_weights.safetensors", Path.unlink),
                                 r"damaged-sae.*sae_weights\.safetensors is missing"),
    "sae-weights-truncated": Fault(_sae_file("sae_weights.safetensors", _truncate), W + r".*truncated", via="cli"),
    "sae-weights-garbage": Fault(_sae_file("sae_weights.safetensors", _garble), W + r".*not a readable safetensors"),
    "sae-weights-shape": Fault(_weights(lambda t: t.update(W_enc=torch.randn(64, 50))),
                               W + r".*W_enc.*\[64, 50\]"),
    "sae-weights-dtype": Fault(_weights(lambda t: t.update(W_dec=(t["W_dec"] * 1000).to(torch.int32))),
                               W + r".*W_dec.*I32.*floating point"),
    "sae-weights-key-renamed": Fault(_weights(lambda t: t.update(W_decoder=t.pop("W_dec"))),
                                     W + r".*Missing key.*W_dec.*Unexpected key.*W_decoder"),
    "sae-cfg-missing": Fault(_sae_file("cfg.json", Path.unlink), r"damaged-sae.*cfg\.json is missing"),
    "sae-cfg-truncated": Fault(_sae_file("cfg.json", _truncate), C + r".*not JSON.*line 1"),
    "sae-cfg-not-an-object": Fault(_cfg(lambda cfg: [cfg]), C + r".*JSON object.*not a list"),
    "sae-cfg-missing-d_sae": Fault(_cfg(lambda cfg: cfg.pop("d_sae") and None), C + r".*'d_sae' is missing"),
    "sae-cfg-bad-d_in": Fault(_cfg(lambda cfg: cfg.update(d_in="sixty-four")), C + r".*d_in must be a positive"),
    "sae-unknown-architecture": Fault(_cfg(lambda cfg: cfg.update(architecture="banana")),
                                      C + r".*unknown SAE architecture 'banana'.*standard"),
    "sae-d_in-not-the-model's": Fault(_narrow_sae, r"64-wide.*blocks\.1\.hook_resid_pre.*d_in=32"),
    # the model
    "model-folder-missing": Fault(lambda i: setattr(i, "model", i.tmp / "no-such-model"),
                                  r"model folder .*no-such-model does not exist"),
    "model-no-tokenizer": Fault(_model(_no_tokenizer), r"damaged-model.*tokenizer"),
    "model-unknown-model-type": Fault(_model(_model_type), r"damaged-model.*model type .banana."),
    "model-weights-truncated": Fault(_model(lambda f: _truncate(f / "model.safetensors")),
                                     r"damaged-model/model\.safetensors.*truncated", via="cli"),
    "model-weights-garbage": Fault(_model(lambda f: _garble(f / "model.safetensors")),
                                   r"damaged-model/model\.safetensors.*not a readable safetensors"),
    # the text
    "text-missing": Fault(lambda i: setattr(i, "dataset", i.tmp / "no-such-docs.jsonl"),
                          r"no dataset files match .*no-such-docs\.jsonl"),
    "text-malformed-jsonl-line": Fault(_dataset("cut.jsonl", _bad_line), r"cut\.jsonl line 3\b.*not valid JSON",
                                       via="cli"),
    "text-jsonl-line-not-an-object": Fault(_dataset("array.jsonl", lambda c: _lines(c)[0] + b"[1, 2]\n"),
                                           r"array\.jsonl line 2\b.*JSON object"),
    "text-jsonl-invalid-utf8": Fault(_dataset("latin1.jsonl", _latin1_line), r"latin1\.jsonl line 2\b.*UTF-8"),
    "text-txt-invalid-utf8": Fault(_dataset("latin1.txt", _latin1_text), r"latin1\.txt line 2\b.*UTF-8"),
    "text-parquet-not-parquet": Fault(_dataset("docs.parquet", _csv_renamed_parquet),
                                      r"docs\.parquet is not a Parquet file"),
    # the catalog (write: ingest; read: saes)
    "catalog-is-a-directory": Fault(_db_dir, r"catalog .*catalog\.duckdb is a directory"),
    "catalog-is-a-directory-read": Fault(_read(_db_dir), r"catalog .*catalog\.duckdb is a directory"),
    "catalog-read-only-file": Fault(_db_read_only, r"catalog .*catalog\.duckdb is read-only"),
    "catalog-read-only-folder": Fault(_db_folder_read_only, r"catalog .*read-only-folder/catalog\.duckdb.*read-only"),
    "catalog-random-bytes": Fault(_db_random, r"random\.duckdb.*not a valid DuckDB database"),
    "catalog-random-bytes-read": Fault(_read(_db_random), r"random\.duckdb.*not a valid DuckDB database"),
    "catalog-other-application": Fault(_db_other_app, r"shop\.duckdb is a DuckDB database but not a saecat catalog"
                                                      r".*customers", via="cli"),
    "catalog-other-application-read": Fault(_read(_db_other_app), r"shop\.duckdb .*not a saecat catalog"),
    "catalog-other-schema_migrations": Fault(_db_rails, r"rails\.duckdb .*not a saecat catalog.*schema_migrations"),
    "catalog-newer-schema": Fault(_db_newer, rf"catalog\.duckdb has schema v{SCHEMA_VERSION + 1}, newer"),
    "catalog-newer-schema-read": Fault(_read(_db_newer), rf"catalog\.duckdb has schema v{SCHEMA_VERSION + 1}, newer"),
    # the flags
    "flag-block-size-zero": Fault(_flags("--block-size", "0"), r"--block-size must be at least 1"),
    "flag-batch-tokens-negative": Fault(_flags("--batch-tokens", "-8"), r"--batch-tokens must be at least 1"),
    "flag-max-doc-tokens-zero": Fault(_flags("--max-doc-tokens", "0"), r"--max-doc-tokens must be at least 1"),
    "flag-max-tokens-negative": Fault(_flags("--max-tokens", "-1"), r"--max-tokens must be at least 1"),
    "flag-sample-blocks-negative": Fault(_flags("--sample-blocks", "-1"), r"--sample-blocks must be at least 0"),
    "flag-top-k-negative": Fault(_flags("--top-k", "-3"), r"--top-k must be at least 0"),
    "flag-context-tokens-negative": Fault(_flags("--context-tokens", "-1"), r"--context-tokens must be at least 0"),
    "flag-threshold-nan": Fault(_flags("--threshold", "nan"), r"--threshold must be a finite number.*nan", via="cli"),
    "flag-threshold-inf": Fault(_flags("--threshold", "inf"), r"--threshold must be a finite number.*inf"),
    "flag-threshold-negative": Fault(_flags("--threshold", "-0.5"), r"--threshold must be .*>= 0"),
    "flag-checkpoint-every-nan": Fault(_flags("--checkpoint-every", "nan"), r"--checkpoint-every must be"),
}


# ------------------------------------------------------------------------------ running them


@pytest.fixture
def inputs(tmp_path, base_db, sae_dirs, model_dir, corpus):
    """Good inputs (an existing catalog holding one SAE); the test damages one of them."""
    i = Inputs(tmp=tmp_path, sae=sae_dirs["standard"], model=model_dir, dataset=corpus,
               db=copy_catalog(base_db, tmp_path / "existing"))
    yield i
    for path in i.immutable:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def _args(i: Inputs) -> list[str]:
    if i.command == "saes":
        return ["saes", "--db", str(i.db)]
    return ["ingest", "--sae-path", str(i.sae), "--model", str(i.model), "--dataset", str(i.dataset),
            "--block-size", str(BLOCK), "--no-progress", "--db", str(i.db), *i.extra]


def run_main(args: list[str], capfd, monkeypatch, cache: Path) -> tuple[int, str]:
    """`saecat ARGS` through the CLI's entry point in this process: (exit code, stderr)."""
    from queries.front.cli import main

    monkeypatch.setattr(sys, "argv", ["saecat", *args])
    monkeypatch.setenv("SAECAT_CACHE", str(cache))  # where an unexpected error's traceback would go
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    return code, capfd.readouterr().err


def snapshot(path: Path):
    """What a catalog path holds: its rows if it is a saecat catalog, else its bytes (files and
    folders, recursively), or None if there is nothing there."""
    if not path.exists():
        return None
    if path.is_dir():
        return {str(p.relative_to(path)): snapshot(p) for p in sorted(path.rglob("*")) if p.is_file()}
    data = path.read_bytes()
    try:
        rows = dump(path)
    except Exception:  # not an openable saecat catalog: its bytes are what must not change
        rows = None
    return rows, hashlib.sha256(data).hexdigest()


def folder_listing(folder: Path) -> list[str]:
    """The files and folders under `folder`, but for the sidecar's run folders: a run that fails
    on its input after taking its run's lock leaves the empty lock folder behind, as
    test_robustness accepts (it checks that no checkpoint state is left, as test_fault does)."""
    listing = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if len(parts) >= 2 and parts[0].endswith(".d") and parts[1] == "runs" and path.name != "state.pt":
            continue
        listing.append("/".join(parts))
    return sorted(listing)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(fault, inputs, capfd, monkeypatch):
    spec = FAULTS[fault]
    monkeypatch.setenv("SAECAT_CACHE", str(inputs.tmp / "cache"))  # an unexpected error's traceback goes there
    spec.make(inputs)
    db = inputs.db
    before = snapshot(db)
    listing = folder_listing(db.parent) if db.parent.exists() else None
    args = _args(inputs)
    if spec.via == "cli":
        proc = run_cli(*args, cwd=inputs.tmp)
        code, stderr = proc.returncode, proc.stderr
    else:
        code, stderr = run_main(args, capfd, monkeypatch, inputs.tmp / "cache")
    line = assert_error(code, stderr, spec.pattern)
    assert code == 1, line
    assert snapshot(db) == before, "the catalog changed"
    if listing is not None:
        assert folder_listing(db.parent) == listing, "files appeared or vanished beside the catalog"
    assert not checkpoints(db)
    assert_stderr_is_one_line(stderr)


def test_fault_new_catalog_is_not_created(inputs, capfd, monkeypatch):
    """A failure before anything is counted leaves no catalog behind where there was none."""
    FAULTS["sae-weights-truncated"].make(inputs)
    inputs.db = inputs.tmp / "new" / "catalog.duckdb"
    code, stderr = run_main(_args(inputs), capfd, monkeypatch, inputs.tmp / "cache")
    assert_error(code, stderr, FAULTS["sae-weights-truncated"].pattern)
    assert not (inputs.tmp / "new").exists()


def test_debug_option_keeps_user_errors_one_line_and_usage_errors_as_click_shows_them(inputs, capfd, monkeypatch):
    """--debug adds the traceback of a user error above its line; usage errors stay click's."""
    FAULTS["sae-weights-truncated"].make(inputs)
    code, stderr = run_main(["--debug", *_args(inputs)], capfd, monkeypatch, inputs.tmp / "cache")
    assert code == 1 and "Traceback" in stderr and "SafetensorError" in stderr, stderr
    assert re.search(FAULTS["sae-weights-truncated"].pattern, stderr.splitlines()[-1]), stderr
    code, stderr = run_main(["ingest", "--block-size", "many"], capfd, monkeypatch, inputs.tmp / "cache")
    assert code == 2 and "Traceback" not in stderr and "Invalid value" in stderr, stderr


# ------------------------------------------------------------------- an error nobody foresaw

# A bug deep inside: opening the catalog raises an exception nothing expects.
BUGGY_CLI = ("import catalog.store as store\n"
             "def open_catalog(*args, **kwargs):\n"
             "    return {}['unforeseen key']\n"
             "store.Catalog.open = open_catalog\n"
             "from queries.front.cli import main\n"
             "main()\n")


def run_buggy(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BUGGY_CLI, *args], cwd=cwd, env={**_env(), **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_unforeseen_error_is_one_line_naming_its_traceback_file(tmp_path, base_db):
    cache = tmp_path / "cache"
    proc = run_buggy("saes", "--db", str(base_db), cwd=tmp_path, env={"SAECAT_CACHE": str(cache)})
    line = assert_error(proc.returncode, proc.stderr, r"^error: KeyError: 'unforeseen key' \(full traceback in \S+\)$")
    saved = Path(re.search(r"full traceback in (\S+)\)$", line).group(1))
    assert saved.is_file() and saved.is_relative_to(cache), saved
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "open_catalog" in text and "KeyError" in text, text
    assert_stderr_is_one_line(proc.stderr)


@pytest.mark.parametrize("how", ["--debug", "SAECAT_DEBUG=1"])
def test_unforeseen_error_with_debug_shows_the_traceback(how, tmp_path, base_db):
    cache = tmp_path / "cache"
    args = ["saes", "--db", str(base_db)]
    env = {"SAECAT_CACHE": str(cache)}
    if how == "--debug":
        args.insert(0, "--debug")
    else:
        env["SAECAT_DEBUG"] = "1"
    proc = run_buggy(*args, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "open_catalog" in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == "KeyError: 'unforeseen key'", proc.stderr
    assert not cache.exists(), "with --debug the traceback is shown, not filed"


# ------------------------------------------------------------ and what must not be refused


def test_ingest_into_an_older_catalog_upgrades_it(tmp_path, sae_dirs, model_dir, corpus, capfd, monkeypatch):
    """An older saecat's catalog is not a fault: `saecat ingest` upgrades it (it used to refuse
    it, telling the user to run a write command such as saecat ingest)."""
    import catalog.store as store
    from catalog.schema import MIGRATIONS

    db = tmp_path / "old.duckdb"
    with monkeypatch.context() as old:
        old.setattr(store, "MIGRATIONS", MIGRATIONS[:1])
        old.setattr(store, "SCHEMA_VERSION", 1)
        with store.writer(db):
            pass
    code, stderr = run_main(["ingest", "--sae-path", str(sae_dirs["standard"]), "--model", str(model_dir),
                             "--dataset", str(corpus), "--block-size", str(BLOCK), "--max-tokens", "256",
                             "--no-progress", "--db", str(db)], capfd, monkeypatch, tmp_path / "cache")
    assert code == 0, stderr
    rows = dump(db, ("schema_migrations", "saes"))
    assert max(version for version, _ in rows["schema_migrations"]) == SCHEMA_VERSION
    assert [row[2] for row in rows["saes"]] == ["standard"]


def test_a_bad_record_met_while_counting_fails_the_run(tmp_path, base_db, sae_dirs, model_dir, corpus, capfd,
                                                       monkeypatch):
    """A malformed line that only the stream meets (the glob's second file, after the run has
    started) is one line naming it, and the run is recorded as failed with that line, not left
    'running'; the SAEs in the catalog are unchanged."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(corpus.read_bytes() * 4)  # more documents than the tokenizer reads at once
    (data / "b.jsonl").write_bytes(_bad_line(corpus))
    db = copy_catalog(base_db, tmp_path / "existing")
    tables = ("saes", "features", "cooccurrence")
    before = dump(db, tables)
    code, stderr = run_main(["ingest", "--sae-path", str(sae_dirs["standard"]), "--model", str(model_dir),
                             "--dataset", str(data / "*.jsonl"), "--block-size", str(BLOCK), "--no-progress", "--db", str(db)], capfd, monkeypatch, tmp_path / "cache")
    line = assert_error(code, stderr, r"b\.jsonl line 3")
    assert dump(db, tables) == before
    with Catalog.open(db) as cat:
        runs = cat.con.execute("SELECT status, error, n_tokens FROM ingest_runs WHERE sae_id = 'standard'").fetchall()
    assert [run[:2] for run in runs] == [("failed", line.removeprefix("error: "))]
    assert runs[0][2] > 0  # it had counted the first file's tokens: the stream met the line, not a check before
