"""JSON lines for bench/gpu.sh: the machine, test counts, each step's status, the summary.

    python bench/gpu_report.py env --shell FILE      # the machine as one JSON line; FILE gets
                                                    # CUDA=0|1 GPUS=N FAISS_GPUS=N RAY=0|1 for bash
    python bench/gpu_report.py junit FILE.xml        # pytest's junit XML as counts
    python bench/gpu_report.py status STEP STATUS [--reason R] [--seconds S] [--budget B] [--log FILE]
    python bench/gpu_report.py summary OUTDIR        # every step's status, counted

Only the standard library at import: `env` imports torch and faiss (a failure is recorded as a
string in place of the facts), reads versions from the installed distributions, and looks the
rest up without importing them (sae-lens alone takes seconds).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# Distributions whose versions say what ran (the device image has some, gpu_wheels.sh brings the rest).
VERSIONS = ("torch", "numpy", "transformers", "huggingface-hub", "tokenizers", "pyarrow", "datasets", "duckdb",
            "faiss-cpu", "faiss-gpu", "sae-lens", "transformer-lens", "sqlglot", "ray", "wandb")


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> list[dict] | str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return _error(err)
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    return [{"name": r[0], "memory_mib": int(r[1]) if r[1].isdigit() else r[1], "driver": r[2]}
            for r in rows if len(r) == 3]


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def env(shell: Path | None) -> dict:
    started = time.perf_counter()
    facts: dict = {"step": "env", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                   "python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count(),
                   "load_average": round(os.getloadavg()[0], 2), "nvidia_smi": _nvidia_smi()}
    cuda, gpus = False, 0
    try:
        import torch

        cuda = torch.cuda.is_available()
        gpus = torch.cuda.device_count() if cuda else 0
        facts["torch_cuda"] = torch.version.cuda
        facts["gpus"] = gpus
        facts["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(gpus)]
        facts["gpu_memory_gb"] = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                                  for i in range(gpus)]
        facts["gpu_name"] = facts["gpu_names"][0] if gpus else None
    except Exception as err:  # noqa: BLE001 - a broken torch is a fact to record
        facts["torch_error"] = _error(err)
    facts["cuda"] = cuda
    faiss_gpus = 0
    try:
        import faiss

        faiss_gpus = faiss.get_num_gpus()
        facts["faiss"] = faiss.__version__
        facts["faiss_gpu_build"] = hasattr(faiss, "StandardGpuResources")
    except Exception as err:  # noqa: BLE001
        facts["faiss"] = _error(err)
    facts["faiss_gpus"] = faiss_gpus
    # faiss-gpu 1.15.1 (PyPI) links libcudart.so.12 and libcublas.so.12 (versioned symbols): a
    # CUDA 13 image without them cannot load its GPU code.
    facts["cuda12_libs"] = {lib: _loadable(lib) for lib in ("libcudart.so.12", "libcublas.so.12")}
    facts["versions"] = {name: _version(name) for name in VERSIONS}
    # Installed or not, without importing (sae-lens and transformer-lens take seconds): a step that
    # cannot import one fails with the ImportError as its reason.
    facts["installed"] = {m: importlib.util.find_spec(m) is not None
                          for m in ("duckdb", "datasets", "sae_lens", "transformer_lens", "sqlglot", "ray", "wandb")}
    spec = importlib.util.find_spec("wandb")
    facts["wandb"] = None if spec is None else ("stub" if "gpu_stubs" in str(spec.origin) else "real")
    facts["seconds"] = round(time.perf_counter() - started, 1)
    if shell is not None:
        shell.write_text(f"CUDA={int(cuda)}\nGPUS={gpus}\nFAISS_GPUS={faiss_gpus}\nRAY={int(facts['installed']['ray'])}\n")
    return facts


def junit(path: Path) -> dict:
    """{tests, passed, failed, errors, skipped, skipped_reasons} of a pytest junit XML file."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    reasons: dict[str, str] = {}
    failures: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        counts["tests"] += 1
        name = case.get("name", "?")
        if (node := case.find("skipped")) is not None:
            counts["skipped"] += 1
            reasons[name] = (node.get("message") or "").strip()[:200]
        elif (node := case.find("failure")) is not None or (node := case.find("error")) is not None:
            counts["failed" if node.tag == "failure" else "errors"] += 1
            failures[name] = (node.get("message") or "").strip()[:300]
        else:
            counts["passed"] += 1
    return {"step": "device", **counts, "skipped_reasons": reasons, "failures": failures}


def last_line(log: Path | None) -> str:
    if log is None or not log.is_file():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def status(args: argparse.Namespace) -> dict:
    record: dict = {"step": args.step, "status": args.status}
    if args.reason:
        record["reason"] = args.reason
    if args.status in ("failed", "timeout") and (tail := last_line(args.log)):
        record["reason"] = f"{record.get('reason', '')}: {tail}".lstrip(": ")
    for key in ("seconds", "budget"):
        if getattr(args, key) is not None:
            record[f"{key}_s" if key == "budget" else key] = getattr(args, key)
    return record


def summary(folder: Path) -> dict:
    statuses = [json.loads(line) for line in (folder / "summary.jsonl").read_text().splitlines() if line.strip()]
    statuses = [s for s in statuses if "status" in s]
    counted = {key: sum(s["status"] == key for s in statuses) for key in ("passed", "failed", "timeout", "skipped")}
    return {"step": "summary", **counted, "steps": {s["step"]: s["status"] for s in statuses},
            "ok": counted["failed"] == counted["timeout"] == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--shell", type=Path)
    p = sub.add_parser("junit")
    p.add_argument("path", type=Path)
    p = sub.add_parser("status")
    p.add_argument("step")
    p.add_argument("status", choices=["passed", "failed", "timeout", "skipped"])
    p.add_argument("--reason", default="")
    p.add_argument("--seconds", type=int)
    p.add_argument("--budget", type=int)
    p.add_argument("--log", type=Path, help="a failed step's log: its last line joins the reason")
    p = sub.add_parser("summary")
    p.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "env":
        record = env(args.shell)
    elif args.command == "junit":
        record = junit(args.path)
    elif args.command == "status":
        record = status(args)
    else:
        record = summary(args.folder)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
