"""The run's memory budget (ingest/budget.py) and the chunked encoding it sizes.

The budget's parts are formulas of the allocations they stand for, so they are checked against
the real ones; the encoding chunk shrinks to what the budget leaves and never changes a firing:
an SAE's firings encoded a few tokens at a time are the firings of the whole batch encoded at once.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch
from conftest import ARCHITECTURES

from catalog.errors import SaecatError
from ingest.accumulate import FeatureAccumulator
from ingest.budget import (ACTIVATION_BUDGET, BLOCKS, DENSE, DUCKDB_FLOOR, ENCODE_COPIES, dense_tile_bytes,
                           feature_state_bytes, module_bytes, plan_pairs, process_memory, run_memory)
from ingest.blockpairs import FEATURE_BYTES, PAIR_BYTES
from ingest.model import hook_activations, model_for_sae
from ingest.pipeline import encode
from ingest.sources import load_sae, resolve_source
from ingest.tokens import batches


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_firings_encoded_in_chunks_are_the_whole_batchs(arch, sae_dirs, model_dir, corpus):
    loaded = load_sae(resolve_source(None, None, str(sae_dirs[arch])), "cpu")
    model = model_for_sae(loaded, str(model_dir), "cpu")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][:6]
    batch = next(batches(texts, model.tokenizer, bos_id=model.tokenizer.bos_token_id, max_doc_tokens=200,
                         batch_tokens=2048))
    assert len(batch.lengths) > 1 and int(batch.lengths.min()) < batch.tokens.shape[1]  # padding to skip
    acts = hook_activations(model, batch.tokens, loaded.hook_name, loaded.layer)
    with torch.inference_mode():
        dense = loaded.sae.encode(acts)
    real = torch.arange(acts.shape[1])[None, :] < batch.lengths[:, None]
    want = (dense > 0) & real[..., None]  # padding is not encoded
    # chunks change the matmul's row count, so BLAS may round differently (~3e-8 here): an
    # activation that close to the threshold may land either side
    clear = (dense.abs() > 1e-5) | ~real[..., None]
    assert want.sum() > 1000
    for chunk in (7, None):  # a few tokens at a time, and ACTIVATION_BUDGET's worth (the whole batch here)
        inputs, got, x_hat = encode(loaded, model, str(model_dir), "cpu", batch, 0.0, chunk)
        assert torch.equal(inputs, acts) and got.shape == tuple(acts.shape[:2])
        with torch.inference_mode():  # the reconstruction, chunk by chunk, is the whole batch's (0 on padding)
            whole = loaded.sae.decode(dense) * real[..., None]
        torch.testing.assert_close(x_hat, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
        fired = torch.zeros_like(want)
        fired[got.doc, got.at, got.feature] = True
        assert len(got.doc) == int(fired.sum())  # each firing once
        assert torch.equal(fired & clear, want & clear), chunk
        order = (got.doc * acts.shape[1] + got.at) * dense.shape[-1] + got.feature
        assert torch.equal(order, order.sort().values)  # row-major, as Firings.of lists them
        torch.testing.assert_close(got.value, dense[got.doc, got.at, got.feature], rtol=0,
                                   atol=1e-6 * float(dense.abs().max()))


def test_feature_state_is_what_the_accumulator_allocates():
    d_sae, top_k, context = 1000, 7, 3
    acc = FeatureAccumulator(d_sae, top_k=top_k, context=context, d_in=16)
    ex = acc.examples
    held = sum(t.nbytes for t in (ex.values, ex.document, ex.position, ex.window, ex.window_values,
                                  acc.histogram.counts, acc.open.act_sum, acc.total.act_sum))
    held += acc.total.act_sum.nbytes  # a closed shard waiting for an earlier one
    assert feature_state_bytes(d_sae, top_k, context) == held


def test_the_encoding_chunk_shrinks_to_the_budget_and_refuses_below_one_token():
    d_sae, parts = 50_000, dict(baseline=5_000, model=10_000, sae=20_000, d_sae=50_000, batch_tokens=8192, top_k=20,
                                context=8)
    free = run_memory(**parts)
    assert free.encode_tokens == ACTIVATION_BUDGET // (4 * d_sae)  # 2,684 tokens: 512 MiB of activations
    per_token = ENCODE_COPIES * 4 * d_sae
    assert free.encoding == per_token * free.encode_tokens
    tight = run_memory(**parts, budget=free.resident + 10 * per_token + per_token - 1)
    assert tight.encode_tokens == 10 and tight.total <= free.resident + 11 * per_token
    assert run_memory(**parts, budget=free.resident + per_token).encode_tokens == 1
    with pytest.raises(SaecatError, match=r"too small for this SAE: the model \(9\.8 KiB\), the SAE \(19\.5 KiB\), "
                                          r"its per-feature state \(.*\), this process's own memory \(4\.9 KiB\) and"):
        run_memory(**parts, budget=free.resident + per_token - 1)


def test_the_plan_takes_dense_tiles_when_they_fit_and_gives_the_pair_pass_what_stays_free():
    d_sae, parts = 4096, dict(baseline=3 << 20, model=1 << 20, sae=2 << 20, batch_tokens=8192, top_k=20, context=8)
    tiles, full = dense_tile_bytes(d_sae), run_memory(d_sae=d_sae, **parts)
    assert tiles >= 4 * d_sae * d_sae // 2  # the upper triangle's float32 at least
    dense = plan_pairs(d_sae, budget=tiles + full.total, **parts)
    assert dense.path == DENSE and dense.memory == full
    blocks = plan_pairs(d_sae, budget=tiles + full.total - 1, **parts)
    assert blocks.path == BLOCKS and blocks.room == tiles + full.total - 1 - full.resident
    # DuckDB, writing the SAE, gets what the kept pairs and (on the dense path) the tiles leave
    assert blocks.duckdb_limit(1 << 20) == max(blocks.room - (1 << 20), DUCKDB_FLOOR)
    big = plan_pairs(d_sae, budget=tiles + full.total + (4 << 30), **parts)
    assert big.path == DENSE and big.duckdb_limit(1 << 20) == big.room - tiles - (1 << 20) > DUCKDB_FLOOR
    least = (FEATURE_BYTES + PAIR_BYTES) * d_sae
    assert least > ENCODE_COPIES * 4 * d_sae  # so the budgets below leave the stream at least one token's encoding
    assert plan_pairs(d_sae, budget=full.resident + least, **parts).room == least
    with pytest.raises(SaecatError, match="too small to count the pairs of 4,096 features even out of core"):
        plan_pairs(d_sae, budget=full.resident + least - 1, **parts)
    with pytest.raises(SaecatError, match="checkpoint counts pairs in memory"):
        plan_pairs(d_sae, budget=tiles + full.total - 1, resumed_path=DENSE, **parts)
    assert plan_pairs(d_sae, budget=tiles + full.total, resumed_path=BLOCKS, **parts).path == BLOCKS


def test_a_ray_driver_plans_for_merging_a_tasks_counters():
    """The state a task returns and the counters it is loaded into: twice the per-feature state,
    and twice the tiles on the dense path; the dense path needs that much more to be chosen."""
    d_sae, parts = 4096, dict(baseline=3 << 20, model=1 << 20, sae=2 << 20, batch_tokens=8192, top_k=20, context=8)
    tiles, features = dense_tile_bytes(d_sae), feature_state_bytes(d_sae, 20, 8)
    alone = plan_pairs(d_sae, budget=1 << 40, **parts)
    driver = plan_pairs(d_sae, budget=1 << 40, merges=True, **parts)
    assert alone.memory.merging == 0 and driver.memory.merging == 2 * (features + tiles)
    assert driver.memory.total == alone.memory.total + 2 * (features + tiles)
    edge = tiles + driver.memory.total
    assert plan_pairs(d_sae, budget=edge, merges=True, **parts).path == DENSE
    blocks = plan_pairs(d_sae, budget=edge - 1, merges=True, **parts)
    assert blocks.path == BLOCKS and blocks.memory.merging == 2 * features
    assert "merging a task's counters" in blocks.describe() and "merging" not in alone.describe()


def test_the_process_memory_is_its_anonymous_memory_and_counts_what_it_holds():
    import numpy as np

    before = process_memory("cpu")
    held = np.ones(256 << 20, dtype=np.uint8)  # touched: 256 MiB of anonymous pages
    grown = process_memory("cpu") - before
    assert 250 << 20 <= grown <= 300 << 20, grown
    del held
    assert process_memory("cuda:0") == 0  # a GPU's budget is the device's memory


def test_an_ingestion_plans_with_its_process_memory(sae_dirs, model_dir, corpus, tmp_path):
    from catalog import Catalog
    from ingest import IngestOptions, ingest

    source = resolve_source(None, None, str(sae_dirs["standard"]))
    opts = IngestOptions(dataset=str(corpus), model=str(model_dir), max_tokens=2000, progress=False)
    gc.collect()  # so that no earlier test's garbage is freed between this reading and the run's own
    start = process_memory("cpu")
    ingest(source, opts, db=tmp_path / "catalog.duckdb")
    with Catalog.open(tmp_path / "catalog.duckdb") as cat:
        [(params,)] = cat.con.execute("SELECT params FROM ingest_runs").fetchall()
    memory = json.loads(params)["plan"]["memory"]
    # what the process held when the run began: this reading, give or take the allocations of opening
    # the catalog to look for the SAE (DuckDB may return or keep a few MB of its buffers)
    assert abs(memory["baseline"] - start) <= 64 << 20
    assert memory["model"] >= module_bytes(model_for_sae(load_sae(source, "cpu"), str(model_dir), "cpu"))
    assert memory["resident"] == memory["baseline"] + memory["model"] + memory["sae"] + memory["features"]
    assert "this process" in json.loads(params)["plan"]["summary"]
