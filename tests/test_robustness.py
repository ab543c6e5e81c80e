import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from conftest import STDLIB

def _env():
    return {**os.environ}

def cli(*args, cwd=None):
    return [sys.executable, "-c", "from queries.cli import main; main()", *args]

def test_explore(model_dir, sae_dirs, tmp_path):
    rows = [{"text": p.read_text(errors="replace")[:2000]} for p in sorted(STDLIB.glob("*.py"))]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = time.time()
    p = subprocess.run(cli("ingest", "--dataset", "docs.jsonl", "--sae-path", str(sae_dirs["standard"]), "--model", str(model_dir),
                           "--db", "catalog.duckdb", "--batch-tokens", "256", "--checkpoint-every", "0", "--block-size", "32", "--json"),
                       cwd=tmp_path, env=_env(), capture_output=True, text=True)
    print("ckpt0", time.time() - t, p.returncode, p.stdout, p.stderr)
    t = time.time()
    p = subprocess.run(cli("ingest", "--dataset", "docs.jsonl", "--sae-path", str(sae_dirs["standard"]), "--model", str(model_dir),
                           "--db", "c2.duckdb", "--batch-tokens", "256", "--block-size", "32", "--json"),
                       cwd=tmp_path, env=_env(), capture_output=True, text=True)
    print("nockpt", time.time() - t, p.returncode, p.stdout, p.stderr)
    t = time.time()
    p = subprocess.run(cli("ingest", "--dataset", "docs.jsonl", "--release", "gpt2-small-res-jb", "--sae-id", "blocks.5.hook_resid_pre",
                           "--db", "c3.duckdb"),
                       cwd=tmp_path, env=_env(), capture_output=True, text=True)
    print("reg", time.time() - t, p.returncode, repr(p.stdout), repr(p.stderr))
