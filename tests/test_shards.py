"""Counting in shards: one pass, a resumed pass, and shards counted apart in any order and merged
must give the same state, bit for bit (what a distributed ingestion relies on)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from catalog.errors import SaecatError
from ingest.accumulate import FeatureAccumulator, StreamPlace

D_SAE, D_IN, SHARD = 40, 6, 2


def make_batches(n: int = 9) -> list[dict]:
    """Batches of 1-4 documents of uneven length (several full 16-token blocks, partial ones,
    an empty row), float activations with many exact ties, hook inputs and group values."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for b in range(n):
        docs = 1 + b % 4
        lengths = torch.randint(1, 60, (docs,), generator=gen)
        width = int(lengths.max())
        acts = torch.randint(0, 5, (docs, width, D_SAE), generator=gen).float() * 0.25
        acts *= torch.rand(docs, width, D_SAE, generator=gen) < 0.15
        inputs = torch.randn(docs, width, D_IN, generator=gen, dtype=torch.float32)
        batches.append(dict(acts=acts, lengths=lengths, n_documents=docs + b % 2,  # odd batches skip an empty document
                            tokens=torch.randint(0, 100, (docs, width), generator=gen),
                            offsets=torch.arange(docs), inputs=inputs, groups=[f"g{(b + r) % 3}" for r in range(docs)]))
    return batches


def accumulator() -> FeatureAccumulator:
    return FeatureAccumulator(D_SAE, block_size=16, top_k=3, context=2, tile=16, flush_blocks=3, sample_blocks=5,
                              d_in=D_IN, shard_batches=SHARD)


def count(acc: FeatureAccumulator, batches: list[dict]) -> FeatureAccumulator:
    for batch in batches:
        acc.update(**{k: v for k, v in batch.items() if k not in ("inputs", "groups")},
                   inputs=batch["inputs"], groups=batch["groups"])
    return acc


def places(batches: list[dict]) -> list[StreamPlace]:
    """Where each batch starts: what a driver cutting the stream knows before counting it."""
    out, place = [], StreamPlace()
    for batch in batches:
        out.append(place)
        blocks = int(((batch["lengths"] - 1).clamp(min=0) // 16).sum())
        place = StreamPlace(place.batch + 1, place.document + batch["n_documents"], place.block + blocks)
    return out


def snapshot(acc: FeatureAccumulator) -> dict:
    results = acc.results()
    pairs = acc.pairs.pairs()
    state = acc.state_dict()
    return {"results": {k: v.tobytes() for k, v in results.items()},
            "pairs": (pairs.i.tobytes(), pairs.j.tobytes(), pairs.n11.tobytes()),
            "spectrum": acc.spectrum().tobytes(), "sample": acc.sample.table(),
            "labels": {k: v for k, v in state.items() if k.startswith(("top_", "histogram", "total_"))},
            "n": (acc.n_tokens, acc.n_documents, acc.n_blocks)}


def assert_same(got: dict, want: dict) -> None:
    for key in ("results", "pairs", "spectrum", "n"):
        assert got[key] == want[key], key
    assert got["sample"].equals(want["sample"])
    for name, value in want["labels"].items():
        assert torch.equal(got["labels"][name], value) if isinstance(value, torch.Tensor) else (
            got["labels"][name] == value), name


@pytest.fixture(scope="module")
def batches() -> list[dict]:
    return make_batches()


@pytest.fixture(scope="module")
def one_pass(batches) -> dict:
    snap = snapshot(count(accumulator(), batches))
    assert snap["n"][2] > 5 and len(snap["sample"]) == 5  # blocks were counted and sampled
    assert snap["sample"].column("group_value").null_count == 0
    assert len(pa.array(snap["pairs"][2]).to_pylist()) > 0
    return snap


def test_shards_on_two_workers_in_any_order_merge_to_one_pass(batches, one_pass):
    starts = places(batches)
    shards = [list(range(s, min(s + SHARD, len(batches)))) for s in range(0, len(batches), SHARD)]  # 5 shards
    workers = {"a": [3, 0, 4], "b": [2, 1]}  # shards each worker counts, out of order
    states = {}
    for name, mine in workers.items():
        acc = accumulator()
        for shard in mine:
            acc.begin(starts[shards[shard][0]])
            count(acc, [batches[b] for b in shards[shard]])
        acc.end_shard()
        states[name] = acc.state_dict()
    for order in (["a", "b"], ["b", "a"]):
        driver = accumulator()
        for name in order:
            worker = accumulator()
            worker.load_state_dict(states[name])  # as it travels: plain tensors
            driver.merge(worker)
        assert_same(snapshot(driver), one_pass)


def test_a_checkpoint_mid_shard_resumes_to_the_same_bits(batches, one_pass):
    first = count(accumulator(), batches[:5])  # shard 2 is open after batch 5
    assert first.open_shard == 2
    resumed = accumulator()
    resumed.load_state_dict(first.state_dict())
    assert_same(snapshot(count(resumed, batches[5:])), one_pass)


def test_float_sums_differ_without_shards_so_the_test_can_tell(batches, one_pass):
    """The same batches folded at other boundaries give other bits: the shard rule is what
    makes the merged state exact."""
    other = FeatureAccumulator(D_SAE, block_size=16, top_k=3, context=2, tile=16, flush_blocks=3, sample_blocks=5,
                               d_in=D_IN, shard_batches=3)
    snap = snapshot(count(other, batches))
    assert snap["pairs"] == one_pass["pairs"] and snap["results"]["fire_count"] == one_pass["results"]["fire_count"]
    assert snap["spectrum"] != one_pass["spectrum"] or snap["labels"]["total_moments_outer"].ne(
        one_pass["labels"]["total_moments_outer"]).any()


def test_shards_counted_twice_or_missing_are_refused(batches):
    starts = places(batches)
    one, two = accumulator(), accumulator()
    for acc in (one, two):
        acc.begin(starts[2])
        count(acc, batches[2:4])
    with pytest.raises(SaecatError, match="counted twice"):
        one.merge(two)
    with pytest.raises(SaecatError, match="never counted"):
        one.results()
    with pytest.raises(SaecatError, match="must start on a shard"):
        accumulator().begin(starts[1])
