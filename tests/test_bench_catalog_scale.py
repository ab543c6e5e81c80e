"""The catalog-scale benchmark at smoke size: what it registers, writes and queries; never timed."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_catalog_bench_smoke_counts_are_what_was_written():
    out = subprocess.run([sys.executable, str(BENCH / "catalog_scale.py"), "--smoke"], check=True, capture_output=True,
                         text=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    sync, registry, build, inventory, synthetic = lines
    # The smoke registry: 2 releases, 12 + 1 SAEs; a second sync finds nothing new.
    assert sync["added"] == {"releases added": 2, "saes added": 13} and sync["changes_on_resync"] == {}
    assert {n: q["rows"] for n, q in registry["queries"].items()} == {"releases": 2, "saes_registered": 13}
    # The synthetic catalog holds what was committed, and its queries answer as a brute force does.
    assert inventory["rows"]["features"] == build["features"] == 3 * 400
    assert inventory["rows"]["cooccurrence"] == build["pair_rows"]
    assert inventory["rows"]["feature_tokens"] == 1200 * 2 * 3 and inventory["rows"]["feature_examples"] == 1200 * 2
    assert inventory["top_fire_counts_equal_brute_force"]
    rows = {n: q["rows"] for n, q in synthetic["queries"].items()}
    assert rows == {"feature_row": 1, "top_fire": 100, "density_range": inventory["density_range_rows"],
                    "pair_count": 1}
    assert 0 < inventory["pair_count"] < build["pair_rows"]
