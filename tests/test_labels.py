"""Feature labels against a brute-force reference: logit lens, top examples, histograms.

The reference comes from conftest's `sae_acts` (Hugging Face GPT2Model, one document at a time,
the SAE as sae-lens loads it) and plain numpy; nothing is shared with ingestion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalog import Catalog
from ingest import IngestOptions, ingest, resolve_source
from ingest.examples import HIST_EDGES, TopExamples

MAX_DOC, TOP_K, CONTEXT, LOGIT_K = 200, 5, 3, 4


@pytest.fixture(scope="module")
def labelled_db(tmp_path_factory, sae_dirs, corpus):
    db = tmp_path_factory.mktemp("labels") / "catalog.duckdb"
    ingest(resolve_source(None, None, str(sae_dirs["jumprelu"])),
           IngestOptions(dataset=str(corpus), max_doc_tokens=MAX_DOC, block_size=32, top_k=TOP_K,
                         context_tokens=CONTEXT, logit_k=LOGIT_K, batch_tokens=700, progress=False), db=db)
    return db


@pytest.fixture(scope="module")
def labelled(labelled_db):
    with Catalog.open(labelled_db) as cat:
        def rows(query):
            rel = cat.con.sql(query)
            return [dict(zip(rel.columns, r)) for r in rel.fetchall()]
        return {
            "tokens": rows("SELECT * FROM feature_tokens ORDER BY feature, direction, rank"),
            "examples": rows("SELECT * FROM feature_examples ORDER BY feature, rank"),
            "histograms": rows("SELECT * FROM feature_histograms ORDER BY feature, bin"),
            "features": rows("SELECT feature, fire_count, max_activation FROM features ORDER BY feature"),
        }


@pytest.fixture(scope="module")
def reference(sae_acts, sae_dirs, raw_ids):
    """Every counted activation as (feature, value, document, position), from the reference path."""
    docs = sae_acts(sae_dirs["jumprelu"], True, MAX_DOC)
    return docs, [[0] + list(ids)[: MAX_DOC - 1] for ids in raw_ids]  # with BOS id placeholder at 0


def test_logit_lens_equals_numpy(labelled, model_dir, sae_dirs, tokenizer):
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    unembed = GPT2LMHeadModel.from_pretrained(str(model_dir)).lm_head.weight.detach().numpy().T  # [d, V]
    decoders = load_file(str(sae_dirs["jumprelu"] / "sae_weights.safetensors"))["W_dec"].numpy()
    logits = decoders.astype(np.float64) @ unembed.astype(np.float64)
    got = labelled["tokens"]
    assert len(got) == 2 * LOGIT_K * len(decoders)
    for row in got:
        order = np.argsort(-logits[row["feature"]]) if row["direction"] == "top" else np.argsort(logits[row["feature"]])
        assert row["token_id"] == order[row["rank"]]
        assert row["logit"] == pytest.approx(logits[row["feature"], row["token_id"]], rel=1e-4, abs=1e-5)
        assert row["token"] == tokenizer.decode([row["token_id"]])


def test_top_examples_equal_brute_force(labelled, reference, tokenizer):
    docs, doc_ids = reference
    d_sae = docs[0].shape[1]
    examples = {}
    for row in labelled["examples"]:
        examples.setdefault(row["feature"], []).append(row)
    checked_positions = 0
    for f in range(d_sae):
        values = np.concatenate([d[:, f] for d in docs])
        where = [(n, p + 1) for n, d in enumerate(docs) for p in range(len(d))]  # position counts BOS as 0
        order = np.argsort(-values, kind="stable")
        fired = values[order] > 0
        expected = order[: TOP_K][fired[: TOP_K]]
        got = examples.get(f, [])
        assert [r["rank"] for r in got] == list(range(len(expected)))
        np.testing.assert_allclose([r["activation"] for r in got], values[expected], rtol=1e-4, atol=1e-5)
        for r, flat in zip(got, expected):
            # positions are exact wherever the value has no near-tie among the candidates
            if np.sum(np.abs(values - values[flat]) < 1e-4) == 1:
                doc, pos = where[flat]
                assert (r["document"], r["position"]) == (doc, pos)
                ids = doc_ids[doc]
                window = [ids[p] for p in range(max(1, pos - CONTEXT), min(len(ids), pos + CONTEXT + 1))]
                assert r["context"] == [tokenizer.decode([i]) for i in window]
                assert r["context"][r["center"]] == r["token"] == tokenizer.decode([ids[pos]])
                np.testing.assert_allclose(  # the feature's activation at each token of the window
                    r["context_values"], [docs[doc][p - 1, f] for p in range(max(1, pos - CONTEXT),
                                                                             min(len(ids), pos + CONTEXT + 1))],
                    rtol=1e-4, atol=1e-5)
                assert r["context_values"][r["center"]] == r["activation"]
                checked_positions += 1
    assert checked_positions > d_sae  # the comparison is not vacuous


def test_histograms_bin_every_firing_and_sum_to_fire_count(labelled, reference):
    docs, _ = reference
    d_sae = docs[0].shape[1]
    edges = HIST_EDGES.numpy()
    # A value within float noise of a bin edge may land on either side (GPU vs CPU arithmetic):
    # such firings bound the count of both bins they could fall in; every other firing is exact.
    certain = np.zeros((d_sae, len(edges) + 1), dtype=np.int64)
    either = np.zeros_like(certain)
    for d in docs:
        feature, value = np.nonzero(d > 0)[1], d[d > 0].astype(np.float64)
        low = np.searchsorted(edges, value * (1 - 1e-5), side="left")
        high = np.searchsorted(edges, value * (1 + 1e-5), side="left")
        np.add.at(certain, (feature[low == high], low[low == high]), 1)
        np.add.at(either, (feature[low != high], low[low != high]), 1)
        np.add.at(either, (feature[low != high], high[low != high]), 1)
    got = np.zeros_like(certain)
    for row in labelled["histograms"]:
        got[row["feature"], row["bin"]] = row["count"]
        assert row["count"] > 0
        assert row["upper"] == (np.inf if row["bin"] == len(edges) else pytest.approx(edges[row["bin"]]))
    assert np.all(certain <= got) and np.all(got <= certain + either)
    assert either.sum() <= 0.001 * certain.sum()  # near-edge values are rare: the bound is tight
    assert (certain > 0).sum(1).max() > 2  # several bins per feature: the test can tell bins apart
    fire_count = np.array([r["fire_count"] for r in labelled["features"]])
    np.testing.assert_array_equal(got.sum(1), fire_count)


def test_max_activation_is_the_best_example(labelled):
    best = {r["feature"]: r["activation"] for r in labelled["examples"] if r["rank"] == 0}
    for row in labelled["features"]:
        if row["feature"] in best:
            assert row["max_activation"] == best[row["feature"]]


def test_labelled_features_view_joins_each_feature_to_its_labels(labelled_db):
    with Catalog.open(labelled_db) as cat:
        view = {r[0]: r[1:] for r in cat.con.execute(
            "SELECT feature, top_tokens, bottom_tokens, top_example_token, density, feature_ref "
            "FROM labelled_features ORDER BY feature").fetchall()}
        tokens = cat.con.execute("SELECT feature, direction, token FROM feature_tokens ORDER BY feature, rank").fetchall()
        best = dict(cat.con.execute("SELECT feature, token FROM feature_examples WHERE rank = 0").fetchall())
        fire, n_tokens = cat.con.execute("SELECT list(fire_count ORDER BY feature), any_value(n_tokens) "
                                         "FROM features JOIN saes USING (sae)").fetchall()[0]
    assert len(view) == len(fire)
    for f, (top, bottom, example, density, ref) in view.items():
        assert top == [t for g, d, t in tokens if g == f and d == "top"]
        assert bottom == [t for g, d, t in tokens if g == f and d == "bottom"]
        assert example == best.get(f)
        assert density == pytest.approx(fire[f] / n_tokens)
        assert ref is None  # a local SAE has no Neuronpedia id
    assert sum(e is not None for _, _, e, _, _ in view.values()) > len(view) // 2


def _top_examples(parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> TopExamples:
    """TopExamples fed (acts [docs, positions, F], tokens, first document) part by part, every
    position counted."""
    top = TopExamples(parts[0][0].shape[2], k=4, context=1)
    for acts, tokens, first in parts:
        row, pos, feature = (acts > 0).nonzero().unbind(1)
        lengths = torch.full((len(acts),), acts.shape[1])
        top.update((row, pos, feature, acts[row, pos, feature]), tokens, lengths, first + torch.arange(len(acts)),
                   bos_offset=0)
    return top


@pytest.mark.parametrize("merge_features", [4096, 2, 1])
def test_top_examples_are_a_total_order_whatever_the_batching(merge_features, monkeypatch):
    """Quantised activations make ties common: each feature's top k must still be the first k of
    a stable sort (activation descending, stream order), for any batching, any order of the
    batches, any merge of parts, and whether features are merged all at once or a few at a time."""
    monkeypatch.setattr("ingest.examples.MERGE_FEATURES", merge_features)
    gen = torch.Generator().manual_seed(0)
    acts = (torch.randint(0, 4, (12, 6, 7), generator=gen) * (torch.rand(12, 6, 7, generator=gen) < 0.3)).float()
    acts[:, :, 6] = 0  # a feature that never fires
    tokens = torch.randint(0, 50, (12, 6), generator=gen)

    whole = _top_examples([(acts, tokens, 0)])
    values = acts.reshape(-1, 7).numpy()
    for f in range(7):
        order = np.argsort(-values[:, f], kind="stable")
        order = order[values[order, f] > 0][:4]
        got = whole.values[f][torch.isfinite(whole.values[f])]
        np.testing.assert_array_equal(got.numpy(), values[order, f])
        np.testing.assert_array_equal(whole.document[f, : len(order)].numpy(), order // 6)
        np.testing.assert_array_equal(whole.position[f, : len(order)].numpy(), order % 6)
        for r, flat in enumerate(order):  # the window (context 1) holds the feature's values around it
            doc, pos = divmod(int(flat), 6)
            want = [acts[doc, p, f] if 0 <= p < 6 else 0.0 for p in (pos - 1, pos, pos + 1)]
            assert whole.window_values[f, r].tolist() == want
    assert (whole.values[6] == -torch.inf).all() and (whole.document[6] == -1).all()
    assert whole.values[:6, 1:].eq(whole.values[:6, :-1]).any()  # ties were there to break

    def parts(cuts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        firsts = np.cumsum([0, *cuts[:-1]]).tolist()
        return list(zip(acts.split(cuts), tokens.split(cuts), firsts))

    state = whole.state_dict()
    runs = {"one document per batch": _top_examples(parts([1] * 12)),
            "uneven batches, last first": _top_examples(parts([3, 3, 6])[::-1]),
            "reversed": _top_examples(parts([1] * 12)[::-1])}
    for name, order in (("early + late", [0, 1]), ("late + early", [1, 0])):
        halves = [_top_examples([part]) for part in parts([5, 7])]
        halves[order[0]].merge(halves[order[1]])
        runs[name] = halves[order[0]]
    for name, run in runs.items():
        for k, v in run.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
