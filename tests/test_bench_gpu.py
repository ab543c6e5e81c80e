"""bench/gpu.sh, the GPU column in one call, proven on a CPU: never timed.

--smoke runs every step at tiny sizes on the CPU and must write every file with the fields
bench/README.md's GPU table is filled from; a full run on a machine without CUDA must skip every
GPU step with its reason; a step that runs past its budget or fails is recorded and the next one
runs (a stand-in python that sleeps or fails, and facts that pretend to one GPU without faiss-gpu).
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "bench" / "gpu.sh"
STEPS = ["device", "prepare", "ingestion", "cooccurrence_16k", "cooccurrence_65k", "blockpairs", "neighbors_gpu",
         "neighbors_cpu", "ray"]


def _ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def start_gpu_sh(out: Path, *args: str, python: str = sys.executable, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_SH_", "SMOKE"))}
    environ.update(PYTHON=python, **env)
    return subprocess.Popen(["bash", str(GPU_SH), str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environ, cwd="/")


def fake_python(folder: Path) -> Path:
    """A python that hangs in the co-occurrence benchmark and fails in the neighbours one."""
    fake = folder / "python"
    fake.write_text(f"""#!/bin/sh
case "$*" in
  *cooccurrence.py*) sleep 60 ;;
  *neighbors.py*) echo "neighbors: no catalog here" >&2; exit 3 ;;
esac
exec {sys.executable} "$@"
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The smoke run; then, side by side (a few seconds each, mostly imports), a full run (no
    CUDA here: every GPU step skipped) and a full run with a python that hangs or fails and facts
    that pretend to one GPU, no GPU in faiss and no ray."""
    def finish(started: dict) -> dict:
        done = {}
        for name, (out, process) in started.items():
            stdout, stderr = process.communicate(timeout=300)
            done[name] = out, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        return done

    out = tmp_path_factory.mktemp("gpu-smoke")
    # the smoke's Ray step starts a local cluster of CPU workers: 22 s alone, past the GPU run's 60 s
    # budget on a machine doing something else too
    done = finish({"smoke": (out, start_gpu_sh(out, "--smoke", GPU_SH_BUDGET_ray="150"))})
    started = {}
    if not torch.cuda.is_available():
        out = tmp_path_factory.mktemp("gpu-full")
        started["full"] = out, start_gpu_sh(out)
    out = tmp_path_factory.mktemp("gpu-faults")
    started["faults"] = out, start_gpu_sh(
        out, python=str(fake_python(out)), GPU_SH_FACTS="CUDA=1 GPUS=1 FAISS_GPUS=0 RAY=0",
        GPU_SH_STEPS="cooccurrence_16k neighbors_gpu neighbors_cpu ray", GPU_SH_BUDGET_cooccurrence_16k="2")
    return {**done, **finish(started)}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def statuses(out: Path) -> dict[str, dict]:
    """Each step's status record, the last line of its file, as summary.jsonl has it too."""
    records = {step: lines(out / f"{step}.jsonl")[-1] for step in STEPS}
    summary = {r["step"]: r for r in lines(out / "summary.jsonl") if "status" in r}
    assert records == summary
    return records


@pytest.fixture(scope="module")
def smoke(runs) -> Path:
    out, result = runs["smoke"]
    assert result.returncode == 0, result.stderr[-3000:]
    for i, step in enumerate(STEPS, 1):  # one progress line per step, with its budget
        assert f"[{i}/{len(STEPS)}] " in result.stderr
    assert "budget" in result.stderr and " ... done in " in result.stderr
    return out


def test_smoke_writes_every_file_and_every_step_passes(smoke):
    assert {p.name for p in smoke.glob("*.jsonl")} == {"env.jsonl", "summary.jsonl", *(f"{s}.jsonl" for s in STEPS)}
    found = statuses(smoke)
    expected = "passed" if _ray_installed() else "skipped"
    assert {s: r["status"] for s, r in found.items()} == {**dict.fromkeys(STEPS, "passed"), "ray": expected}
    assert all(r["budget_s"] >= r["seconds"] >= 0 for r in found.values() if r["status"] == "passed")
    assert lines(smoke / "summary.jsonl")[-1]["ok"]


def test_smoke_env_names_the_machine(smoke):
    (env,) = lines(smoke / "env.jsonl")
    assert {"gpu_name", "gpu_memory_gb", "gpus", "cuda", "faiss_gpus", "cpus", "nvidia_smi", "versions",
            "installed"} <= set(env)
    assert env["cpus"] == os.cpu_count() and env["cuda"] == torch.cuda.is_available()
    assert env["versions"]["torch"] and env["versions"]["duckdb"] and env["versions"]["faiss-cpu"]
    assert env["installed"]["sae_lens"] and env["installed"]["duckdb"]


def test_smoke_records_carry_the_figures_of_the_readme_table(smoke):
    (device, _) = lines(smoke / "device.jsonl")
    assert device["tests"] == 3 and device["passed"] + device["skipped"] == 3 and device["failed"] == 0

    prepare = {r["step"]: r for r in lines(smoke / "prepare.jsonl")}
    assert prepare["corpus"]["documents"] > 100  # the smoke corpus: the stdlib's email package
    model = prepare["model"]
    assert model["config"]["hidden_size"] == 640 and model["config"]["num_hidden_layers"] == 6
    assert model["tokenizer"].startswith("byte-level BPE")

    ingestion = {r["step"]: r for r in lines(smoke / "ingestion.jsonl")}
    assert ingestion["setup"]["device"] == "cpu" and ingestion["setup"]["d_sae"] == 512
    assert {"bare_tokens_per_s", "full_tokens_per_s", "overhead", "counting_over_encode", "l0"} <= set(
        ingestion["overhead"])
    assert ingestion["check"]["fire_count_equal"] and ingestion["check"]["block_count_equal"]
    assert ingestion["end_to_end"]["tokens_per_s"] > 0

    for step, methods in (("cooccurrence_16k", ["numpy", "saecat", "python"]),
                          ("cooccurrence_65k", ["saecat", "python"])):
        *rows, summary, _ = lines(smoke / f"{step}.jsonl")
        assert [r["method"] for r in rows] == methods
        assert all({"ms_per_block", "peak_gb", "device", "blocks"} <= set(r) for r in rows)
        assert summary["tables_agree"] and summary["speedup_saecat_over_python"] > 0

    # blockpairs: the complete table by both paths, then the out-of-core pass alone with the top 8 partners
    incore, outofcore, summary, top, _ = lines(smoke / "blockpairs.jsonl")
    assert [r["method"] for r in (incore, outofcore, top)] == ["incore", "outofcore", "outofcore"]
    assert {r["device"] for r in (incore, outofcore, summary, top)} == {"cpu"}
    assert summary["tables_agree"] and incore["sha256"] == outofcore["sha256"]
    assert incore["pairs"] == outofcore["pairs"] > 10_000 and outofcore["bands"] >= 2
    assert summary["outofcore_over_incore_time"] > 0 and summary["outofcore_over_incore_peak"] > 0
    assert top["policy"]["top_partners"] == 8 and 0 < top["pairs"] < outofcore["pairs"]
    assert top["method_used"] in ("dense", "sparse") and top["bands"] >= 1
    assert all(r["seconds"] > 0 and r["peak_gb"] > 0 for r in (incore, outofcore, top))

    for step, device_, methods in (("neighbors_gpu", None, {"duckdb", "exact", "neighbors"}),
                                   ("neighbors_cpu", "cpu", {"exact", "neighbors"})):
        records = lines(smoke / f"{step}.jsonl")[:-1]
        summaries = [r for r in records if "features" in r and "method" not in r and "step" not in r]
        assert [s["size"] for s in summaries] == ["16k", "65k"]
        timed = [r for r in records if "method" in r]
        assert {r["method"] for r in timed} == methods
        assert {r["index_device"] for r in timed} == {device_ or "cpu"}  # no faiss-gpu on this machine
        exact = [r for r in timed if r["method"] == "exact"]
        assert all({"ms_per_query_held", "batch_queries_per_s_held"} <= set(r) for r in exact)
    gpu_summaries = [r for r in lines(smoke / "neighbors_gpu.jsonl") if "top10_agree_duckdb_exact" in r]
    assert [s["top10_agree_duckdb_exact"] for s in gpu_summaries] == [1.0, 1.0]
    assert all(s["speedup_batch_exact_held"] > 0 for s in gpu_summaries)


@pytest.mark.skipif(not _ray_installed(), reason="ray is not installed")
def test_smoke_ray_counts_the_same_on_cpu_workers(smoke):
    summary = lines(smoke / "ray.jsonl")[-2]
    assert summary["step"] == "summary" and summary["same_results"]
    assert set(summary["configs"]) == {"one machine", "ray x1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skips on a machine without CUDA")
def test_a_full_run_without_cuda_skips_every_gpu_step_with_its_reason(runs):
    tmp_path, result = runs["full"]
    assert result.returncode == 0, result.stderr[-3000:]
    found = statuses(tmp_path)
    assert {s: (r["status"], r["reason"]) for s, r in found.items()} == dict.fromkeys(
        STEPS, ("skipped", "no CUDA device"))
    assert lines(tmp_path / "env.jsonl")[0]["cuda"] is False
    assert "[9/9] Ray fan-out over GPUs: skipped: no CUDA device" in result.stderr


def test_timeouts_failures_and_missing_prerequisites_are_recorded_and_the_run_goes_on(runs):
    out, result = runs["faults"]
    assert result.returncode == 1, result.stderr[-3000:]
    found = statuses(out)
    assert found["cooccurrence_16k"]["status"] == "timeout"
    assert found["cooccurrence_16k"]["reason"].startswith("ran past its budget of 2 s")
    assert found["cooccurrence_16k"]["budget_s"] == 2 and found["cooccurrence_16k"]["seconds"] < 20
    assert found["neighbors_gpu"]["status"] == "skipped"
    assert found["neighbors_gpu"]["reason"].startswith("faiss sees no GPU")
    assert found["neighbors_cpu"] == {**found["neighbors_cpu"], "status": "failed",
                                      "reason": "exit 3: neighbors: no catalog here"}
    assert found["neighbors_cpu"]["budget_s"] == 120  # DuckDB and the catalogs, in step 6's time
    assert (found["ray"]["status"], found["ray"]["reason"]) == ("skipped", "fewer than 2 GPUs (1)")
    for step in ("device", "prepare", "ingestion", "cooccurrence_65k", "blockpairs"):
        assert (found[step]["status"], found[step]["reason"]) == ("skipped", "not selected (GPU_SH_STEPS)")
    summary = lines(out / "summary.jsonl")[-1]
    assert (summary["timeout"], summary["failed"], summary["ok"]) == (1, 1, False)
    assert "timed out after" in result.stderr and "failed (exit 3)" in result.stderr
