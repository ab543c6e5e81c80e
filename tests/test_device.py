"""The CUDA path: the same counts and searches on the GPU as on the CPU. Runs where torch (or
faiss-gpu) sees a GPU."""

import faiss
import numpy as np
import pytest
import torch

from catalog import Catalog
from catalog.index import VectorIndex
from ingest import IngestOptions, ingest, resolve_source
from ingest.accumulate import FeatureAccumulator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
faiss_gpu = pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs faiss-gpu and a GPU")


@cuda
def test_accumulator_on_cuda_matches_cpu_exactly():
    gen = torch.Generator().manual_seed(0)
    d_sae, docs, width = 300, 6, 700
    acts = torch.relu(torch.randn(docs, width, d_sae, generator=gen) - 1.5)
    lengths = torch.tensor([700, 650, 513, 257, 100, 1])
    results = []
    for device in ("cpu", "cuda"):
        acc = FeatureAccumulator(d_sae, block_size=64, device=device, tile=128, flush_blocks=5)
        tokens = torch.arange(docs * width).reshape(docs, width)
        for half in (slice(0, 3), slice(3, 6)):
            acc.update(acts[half].to(device), lengths[half], 3, tokens[half], torch.arange(3))
        pairs = acc.pairs.pairs()
        state = {k: v for k, v in acc.state_dict().items() if k.startswith(("top_", "histogram"))}
        results.append((acc.results(), pairs, state, acc.n_tokens, acc.n_blocks))
    (cpu, cpu_pairs, cpu_state, *cpu_n), (gpu, gpu_pairs, gpu_state, *gpu_n) = results
    assert cpu_n == gpu_n
    for name, value in cpu_state.items():  # labels: top examples (values, places, windows), histograms
        torch.testing.assert_close(gpu_state[name], value, rtol=0, atol=0, msg=name)
    for column in ("fire_count", "block_count"):
        np.testing.assert_array_equal(cpu[column], gpu[column])
    np.testing.assert_allclose(cpu["mean_activation"], gpu["mean_activation"], rtol=1e-5)
    np.testing.assert_array_equal(cpu["max_activation"], gpu["max_activation"])
    for field in ("i", "j", "n11"):
        np.testing.assert_array_equal(getattr(cpu_pairs, field), getattr(gpu_pairs, field))
    assert len(cpu_pairs.n11) > 1000


@cuda
def test_ingestion_on_cuda_agrees_with_cpu(sae_dirs, model_dir, corpus, tmp_path):
    tables = {}
    for device in ("cpu", "cuda"):
        db = tmp_path / f"{device}.duckdb"
        ingest(resolve_source(None, None, str(sae_dirs["standard"])),
               IngestOptions(dataset=str(corpus), model=str(model_dir), block_size=32, device=device,
                             progress=False), db=db)
        with Catalog.open(db) as cat:
            tables[device] = (
                cat.con.execute("SELECT n_tokens, n_blocks FROM saes").fetchall(),
                np.array(cat.con.execute("SELECT fire_count, block_count FROM features ORDER BY feature").fetchall()),
            )
    assert tables["cpu"][0] == tables["cuda"][0]
    cpu_counts, gpu_counts = tables["cpu"][1], tables["cuda"][1]
    # float differences between devices may flip activations within ~1e-6 of the threshold
    assert np.abs(cpu_counts - gpu_counts).sum() <= 1e-3 * cpu_counts.sum()


@faiss_gpu
def test_exact_search_on_the_gpu_matches_the_cpu(monkeypatch):
    dec = np.random.default_rng(0).standard_normal((5000, 96)).astype(np.float32)
    queries = dec[::7]
    results = {}
    for device in ("cpu", "auto"):
        monkeypatch.setenv("SAECAT_INDEX_DEVICE", device)
        index = VectorIndex.build(3, dec)
        results[device] = index.search(queries, 10)
        assert (index._gpu is not None) == (device == "auto")
    (cpu_sae, cpu_feature, cpu_cos), (gpu_sae, gpu_feature, gpu_cos) = results["cpu"], results["auto"]
    np.testing.assert_array_equal(gpu_sae, cpu_sae)
    np.testing.assert_array_equal(gpu_feature, cpu_feature)
    np.testing.assert_allclose(gpu_cos, cpu_cos, atol=1e-5)
    assert (cpu_feature[:, 0] == np.arange(0, 5000, 7)).all()
