"""The ingestion-overhead benchmark, tiny: it runs, and the timed full run counts what the bare run encoded.

Not timed; bench/ingestion.py --smoke over the fixture GPT-2, a fixture TopK SAE and a random
JumpReLU SAE the script builds itself (--width), with one whole ingest() as well.
"""

import json
import subprocess
import sys
from pathlib import Path

from conftest import HOOK, make_sae

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ingestion.py"


def test_ingest_bench_smoke_counts_what_the_bare_run_encoded(model_dir, corpus, sample_acts, tmp_path):
    sae = make_sae(tmp_path / "sae", "topk", hook=HOOK, sparsity_from=sample_acts)
    command = [sys.executable, str(BENCH), "--smoke", "--model", str(model_dir), "--sae", str(sae), "--dataset",
               str(corpus), "--width", "512", "--l0", "16", "--block-size", "32", "--max-doc-tokens", "200",
               "--threads", "1", "--end-to-end", "--evaluate"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    steps = {line["step"]: line for line in map(json.loads, out.strip().splitlines())}
    assert steps["setup"]["d_sae"] == 512 and steps["setup"]["architecture"] == "jumprelu"
    check = steps["check"]
    assert check["tokens"] == 600 and check["firings"] > 0 and check["blocks_fired"] > 0
    assert check["fire_count_equal"] and check["block_count_equal"] and check["plain_firings_equal"]
    assert steps["overhead"]["tokens"] == 600 and steps["overhead"]["l0"] > 0
    assert "quality_overhead" in steps["overhead"]
    assert steps["evaluate"]["layers"] == 2 and steps["evaluate"]["seconds"] > 0  # the whole fixture model
    assert "histogram" in steps["breakdown"]["ms_per_1k_tokens"]
    assert steps["end_to_end"]["tokens"] == 600 and steps["end_to_end"]["pairs"] > 0
