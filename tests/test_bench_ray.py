"""The Ray fan-out benchmark, tiny: it runs, and every configuration writes the same catalog.

Not timed; bench/ray_fanout.py --smoke over the fixture GPT-2 and a fixture TopK SAE, one
machine against a 2-CPU local Ray cluster.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ray_fanout.py"


def test_ray_bench_smoke_writes_the_same_catalog_everywhere(model_dir, corpus, sae_dirs):
    command = [sys.executable, str(BENCH), "--smoke", "--model", str(model_dir), "--sae", str(sae_dirs["topk"]),
               "--dataset", str(corpus), "--tokens", "1500", "--block-size", "32", "--max-doc-tokens", "200",
               "--batch-tokens", "400", "--workers", "2"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    steps = [json.loads(line) for line in out.strip().splitlines()]
    runs = {s["config"]: s for s in steps if s["step"] == "run"}
    assert set(runs) == {"one machine", "ray x2"}
    assert all(r["tokens"] == 1500 and r["pairs"][0] > 0 for r in runs.values())
    summary = steps[-1]
    assert summary["step"] == "summary" and summary["same_results"]
    assert summary["configs"]["ray x2"]["speedup"] > 0
