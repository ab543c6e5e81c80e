"""The catalog's counts against a brute-force reference computed here, one document at a time.

The reference shares no code with ingestion: documents are read from the jsonl with `json`,
tokenized one by one with the model folder's own tokenizer (no batching, no padding), run one
by one through Hugging Face's GPT2Model (not transformer-lens) — `hidden_states[1]` is the
residual stream entering block 1, i.e. `blocks.1.hook_resid_pre` — encoded with the SAE as
sae-lens loads it from disk, and counted with plain numpy and Python sets.

Semantics checked (the spec): BOS prepended when the SAE's metadata says prepend_bos, each
document cut to max_doc_tokens (BOS included), the BOS position never counted; a feature fires
where its activation is > threshold; a document's counted tokens are cut into consecutive
blocks of block_size and only full blocks count; max_tokens caps counted tokens exactly.

Floats are compared with a tight tolerance (batching with padding may move the last bits);
every integer is compared exactly. Each reference is also checked to be non-trivial, so a
comparison cannot pass by both sides being empty or constant.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog import Catalog
from catalog.errors import SaecatError
from conftest import ARCHITECTURES, make_sae
from ingest import IngestOptions, ingest, resolve_source
from ingest.accumulate import PairCounter
from ingest.tokens import batches

BLOCK = 16
MAX_DOC = 200  # BOS included, so 199 counted tokens; most corpus documents are far longer
NO_BOS_MAX_DOC = 150  # for the prepend_bos=False SAE: 150 counted tokens, position 0 included
D_SAE = 96
RTOL, ATOL = 1e-4, 1e-5

# ----------------------------------------------------------------------------- the reference


@dataclass
class Reference:
    n_tokens: int
    n_blocks: int
    n_documents: int
    fire_count: np.ndarray  # int64 [F]
    block_count: np.ndarray  # int64 [F]
    max_activation: np.ndarray  # float64 [F], over firings, nan where the feature never fired
    mean_activation: np.ndarray  # float64 [F], nan where the feature never fired
    pairs: dict[tuple[int, int], int]  # i < j -> blocks where both fired, n11 > 0 only
    doc_tokens: list[int]  # counted tokens of each consumed document
    margin: float  # smallest |activation - threshold| over counted activations != threshold


def count(docs: list[np.ndarray], threshold: float, block_size: int, max_tokens: int | None = None) -> Reference:
    """Count, the slow and obvious way. `docs`: per document, activations [counted tokens, F]
    (BOS already dropped), in stream order."""
    n_features = docs[0].shape[1]
    fire = np.zeros(n_features, dtype=np.int64)
    sums = np.zeros(n_features, dtype=np.float64)
    top = np.full(n_features, -np.inf)
    block_sets: list[set[int]] = []
    doc_tokens: list[int] = []
    margin = np.inf
    n_tokens = 0
    for acts in docs:
        if max_tokens is not None:
            if n_tokens >= max_tokens:
                break
            acts = acts[: max_tokens - n_tokens]
        doc_tokens.append(len(acts))
        n_tokens += len(acts)
        fired = acts > threshold
        fire += fired.sum(axis=0)
        sums += np.where(fired, acts, 0).astype(np.float64).sum(axis=0)
        if len(acts):
            top = np.maximum(top, np.where(fired, acts, -np.inf).max(axis=0))
            gaps = np.abs(acts.astype(np.float64) - threshold)
            if (gaps > 0).any():
                margin = min(margin, float(gaps[gaps > 0].min()))
        for b in range(len(acts) // block_size):
            block = fired[b * block_size: (b + 1) * block_size]
            block_sets.append({f for f in range(n_features) if block[:, f].any()})
    block_count = np.array([sum(f in s for s in block_sets) for f in range(n_features)], dtype=np.int64)
    pairs: Counter = Counter()
    for s in block_sets:
        for i, j in itertools.combinations(sorted(s), 2):
            pairs[(i, j)] += 1
    mean = np.full(n_features, np.nan)
    mean[fire > 0] = sums[fire > 0] / fire[fire > 0]
    top[fire == 0] = np.nan
    return Reference(n_tokens, len(block_sets), len(doc_tokens), fire, block_count, top, mean, dict(pairs),
                     doc_tokens, margin)


def gap_threshold(docs: list[np.ndarray], quantile: float) -> float:
    """A positive threshold near the `quantile` of all counted activations, placed in the middle
    of the widest gap between neighbouring activation values there (and exactly representable in
    float32), so no activation is anywhere near it and float noise cannot flip a comparison."""
    values = np.unique(np.concatenate([d.ravel() for d in docs]))
    at = int(np.searchsorted(values, np.quantile(np.concatenate([d.ravel() for d in docs]), quantile)))
    window = range(max(at - 20, 1), min(at + 20, len(values)))
    k = max(window, key=lambda n: values[n] - values[n - 1])
    threshold = float(np.float32((values[k] + values[k - 1]) / 2))
    assert threshold > 0 and values[k - 1] < threshold < values[k]
    return threshold


# ----------------------------------------------------------------------------- ingestion runs


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """run(sae_path or (release, sae_id), **options) -> (db, release, sae_id, result): one
    ingestion per distinct request, each into its own catalog, shared by the tests."""
    cache: dict = {}

    def go(source, **options):
        key = (str(source), tuple(sorted(options.items())))
        if key not in cache:
            db = tmp_path_factory.mktemp("catalog") / "catalog.duckdb"
            src = resolve_source(*source, None) if isinstance(source, tuple) else resolve_source(None, None, str(source))
            result = ingest(src, IngestOptions(dataset=str(corpus), progress=False, **options), db=db)
            assert result.status == "ingested"
            cache[key] = (db, src.release, src.sae_id, result)
        return cache[key]

    return go


@dataclass
class Stored:
    sae: dict
    feature: np.ndarray
    decoder: np.ndarray
    decoder_norm: np.ndarray
    fire_count: np.ndarray
    block_count: np.ndarray
    max_activation: np.ndarray
    mean_activation: np.ndarray
    pair_rows: list[tuple[int, int, int]]

    @property
    def pairs(self) -> dict[tuple[int, int], int]:
        return {(i, j): n for i, j, n in self.pair_rows}


def stored(db: Path, release: str, sae_id: str) -> Stored:
    with Catalog.open(db) as cat:
        cols = ["sae", "n_tokens", "n_blocks", "n_documents", "block_size", "threshold", "max_doc_tokens",
                "d_sae", "status"]
        rows = cat.con.execute(f"SELECT {', '.join(cols)} FROM saes WHERE release = ? AND sae_id = ?",
                               [release, sae_id]).fetchall()
        assert len(rows) == 1
        sae = dict(zip(cols, rows[0]))
        feats = cat.con.execute(
            "SELECT feature, decoder, decoder_norm, fire_count, block_count, max_activation, mean_activation "
            "FROM features WHERE sae = ? ORDER BY feature", [sae["sae"]]).fetchall()
        pair_rows = cat.con.execute("SELECT i, j, n11 FROM cooccurrence WHERE sae = ? ORDER BY i, j",
                                    [sae["sae"]]).fetchall()
    as_float = lambda k: np.array([np.nan if f[k] is None else f[k] for f in feats], dtype=np.float64)  # noqa: E731
    return Stored(
        sae=sae,
        feature=np.array([f[0] for f in feats]),
        decoder=np.array([f[1] for f in feats], dtype=np.float32),
        decoder_norm=as_float(2),
        fire_count=np.array([f[3] for f in feats], dtype=np.int64),
        block_count=np.array([f[4] for f in feats], dtype=np.int64),
        max_activation=as_float(5),
        mean_activation=as_float(6),
        pair_rows=[tuple(r) for r in pair_rows],
    )


def assert_matches(got: Stored, ref: Reference, what: str = "") -> None:
    note = f"{what} (reference margin to threshold: {ref.margin:.2e})"
    assert got.sae["status"] == "ready"
    assert (got.sae["n_tokens"], got.sae["n_blocks"], got.sae["n_documents"]) == (
        ref.n_tokens, ref.n_blocks, ref.n_documents), note
    np.testing.assert_array_equal(got.feature, np.arange(len(ref.fire_count)), err_msg=note)
    np.testing.assert_array_equal(got.fire_count, ref.fire_count, err_msg=f"fire_count {note}")
    np.testing.assert_array_equal(got.block_count, ref.block_count, err_msg=f"block_count {note}")
    # max and mean: NULL exactly where the feature never fired, over its firing tokens elsewhere
    np.testing.assert_array_equal(np.isnan(got.max_activation), ref.fire_count == 0, err_msg=note)
    np.testing.assert_array_equal(np.isnan(got.mean_activation), ref.fire_count == 0, err_msg=note)
    np.testing.assert_allclose(got.max_activation, ref.max_activation, rtol=RTOL, atol=ATOL, equal_nan=True,
                               err_msg=f"max_activation {note}")
    np.testing.assert_allclose(got.mean_activation, ref.mean_activation, rtol=RTOL, atol=ATOL, equal_nan=True,
                               err_msg=f"mean_activation {note}")
    # cooccurrence: i < j, n11 > 0 only, one row per pair, and exactly the reference's counts
    assert all(i < j and n > 0 for i, j, n in got.pair_rows)
    assert len(got.pairs) == len(got.pair_rows)
    assert got.pairs == ref.pairs, note


def assert_same_tables(a: Stored, b: Stored) -> None:
    for col in ("n_tokens", "n_blocks", "n_documents"):
        assert a.sae[col] == b.sae[col], col
    np.testing.assert_array_equal(a.fire_count, b.fire_count)
    np.testing.assert_array_equal(a.block_count, b.block_count)
    np.testing.assert_array_equal(a.decoder, b.decoder)
    np.testing.assert_allclose(a.max_activation, b.max_activation, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(a.mean_activation, b.mean_activation, rtol=RTOL, atol=ATOL, equal_nan=True)
    assert a.pair_rows == b.pair_rows


def assert_nontrivial(ref: Reference, block_size: int) -> None:
    """The reference exercises what it should: several full blocks, partial blocks left over,
    documents with more than one block, features firing on some tokens but not all, and pairs."""
    n_features = len(ref.fire_count)
    assert ref.n_blocks > 10
    assert any(n >= 2 * block_size for n in ref.doc_tokens)  # documents with several blocks
    assert any(n % block_size for n in ref.doc_tokens)  # leftover partial blocks, not counted
    assert any(0 < n < block_size for n in ref.doc_tokens)  # a document with no full block at all
    assert ref.n_tokens > ref.n_blocks * block_size
    assert ref.fire_count.sum() > 0 and (ref.fire_count < ref.n_tokens).all()
    assert len(set(ref.fire_count.tolist())) > 5 and len(set(ref.block_count.tolist())) > 3
    assert (ref.block_count < ref.fire_count).any()  # several firings inside one block count once
    assert (ref.block_count <= ref.n_blocks).all()
    assert 0 < len(ref.pairs) and len(set(ref.pairs.values())) > 3
    assert np.isfinite(ref.max_activation[ref.fire_count > 0]).all()
    assert n_features == D_SAE


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def thresholds(sae_dirs, sae_acts) -> dict[str, float]:
    """A positive threshold per architecture, high enough that some features never fire and
    many feature pairs never share a block."""
    return {arch: gap_threshold(sae_acts(sae_dirs[arch], True, MAX_DOC), 0.998) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("level", ["zero", "positive"])
def test_counts_match_reference(arch, level, sae_dirs, sae_acts, thresholds, raw_ids, run):
    threshold = 0.0 if level == "zero" else thresholds[arch]
    docs = sae_acts(sae_dirs[arch], True, MAX_DOC)
    ref = count(docs, threshold, BLOCK)

    assert_nontrivial(ref, BLOCK)
    assert ref.n_documents == len(raw_ids) == 24
    # truncation: BOS + 199 tokens for every document longer than that, all of a shorter one
    assert ref.doc_tokens == [min(len(ids), MAX_DOC - 1) for ids in raw_ids]
    assert sum(len(ids) >= MAX_DOC for ids in raw_ids) > 10
    if level == "positive":
        assert threshold > 0
        fired = ref.fire_count > 0
        assert 0 < fired.sum() < D_SAE  # some features never reach the threshold: NULL mean
        # some features that do fire never share a block: pairs absent from the table
        live = np.flatnonzero(ref.block_count)
        assert any((i, j) not in ref.pairs for i, j in itertools.combinations(live.tolist(), 2))
        assert (ref.mean_activation[fired] > threshold).all()  # the mean is over firing tokens only
        assert np.isnan(ref.max_activation[~fired]).all()  # no firing, no max: NULL, like the mean

    db, release, sae_id, result = run(sae_dirs[arch], block_size=BLOCK, threshold=threshold, max_doc_tokens=MAX_DOC)
    got = stored(db, release, sae_id)
    assert got.sae["threshold"] == threshold and got.sae["block_size"] == BLOCK
    assert got.sae["max_doc_tokens"] == MAX_DOC and got.sae["d_sae"] == D_SAE
    assert_matches(got, ref, f"{arch} threshold={threshold}")
    assert (result.n_tokens, result.n_blocks, result.n_pairs) == (ref.n_tokens, ref.n_blocks, len(ref.pairs))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoder_columns(arch, sae_dirs, run):
    from sae_lens import SAE

    w_dec = SAE.load_from_disk(str(sae_dirs[arch]), device="cpu").W_dec.detach().float().numpy()
    norms = np.linalg.norm(w_dec.astype(np.float64), axis=1)
    assert w_dec.shape == (D_SAE, 64) and norms.std() > 1e-3  # rows differ, norms differ
    db, release, sae_id, _ = run(sae_dirs[arch], block_size=BLOCK, threshold=0.0, max_doc_tokens=MAX_DOC)
    got = stored(db, release, sae_id)
    np.testing.assert_array_equal(got.decoder, w_dec)
    np.testing.assert_allclose(got.decoder_norm, norms, rtol=1e-6)


def test_batch_tokens_invariance(sae_dirs, sae_acts, texts, tokenizer, run):
    # the two settings really batch differently: one padded batch of all documents vs ~one each
    def n_batches(size):
        return len(list(batches(texts, tokenizer, bos_id=tokenizer.bos_token_id, max_doc_tokens=MAX_DOC,
                                batch_tokens=size)))

    assert n_batches(8192) == 1 and n_batches(300) > 15

    ref = count(sae_acts(sae_dirs["standard"], True, MAX_DOC), 0.0, BLOCK)
    big = run(sae_dirs["standard"], block_size=BLOCK, threshold=0.0, max_doc_tokens=MAX_DOC)
    small = run(sae_dirs["standard"], block_size=BLOCK, threshold=0.0, max_doc_tokens=MAX_DOC, batch_tokens=300)
    assert big[0] != small[0]
    got_big, got_small = stored(*big[:3]), stored(*small[:3])
    assert_same_tables(got_small, got_big)
    assert_matches(got_small, ref, "batch_tokens=300")


@pytest.mark.parametrize("where", ["mid-document", "document-boundary"])
def test_max_tokens_is_exact(where, sae_dirs, sae_acts, model_dir, run):
    docs = sae_acts(sae_dirs["standard"], True, MAX_DOC)
    lengths = [len(d) for d in docs]
    assert lengths[4] > 2 * BLOCK + 5
    if where == "mid-document":
        # cut the 5th document after 2 full blocks and 5 tokens of a third
        budget, n_docs = sum(lengths[:4]) + 2 * BLOCK + 5, 5
    else:
        budget, n_docs = sum(lengths[:6]), 6
    ref = count(docs, 0.0, BLOCK, max_tokens=budget)
    assert ref.n_tokens == budget and ref.n_documents == n_docs and ref.n_blocks > 10
    assert ref.n_tokens < sum(lengths)
    if where == "mid-document":
        assert ref.doc_tokens[-1] == 2 * BLOCK + 5
    # the local model folder and small batches here, so the budget is met across batches
    db, release, sae_id, result = run(sae_dirs["standard"], block_size=BLOCK, threshold=0.0, max_doc_tokens=MAX_DOC,
                                      max_tokens=budget, batch_tokens=450, model=str(model_dir))
    got = stored(db, release, sae_id)
    assert got.sae["n_tokens"] == budget == result.n_tokens
    assert_matches(got, ref, f"max_tokens={budget}")


def test_sae_without_bos(tmp_path_factory, sample_acts, sae_acts, raw_ids, model_dir, run):
    folder = make_sae(tmp_path_factory.mktemp("nobos") / "nobos", "standard", seed=11, prepend_bos=False,
                      sparsity_from=sample_acts)
    docs = sae_acts(folder, False, NO_BOS_MAX_DOC)
    ref = count(docs, 0.0, BLOCK)
    assert_nontrivial(ref, BLOCK)
    # no BOS: every token counts, position 0 included, up to max_doc_tokens
    assert ref.doc_tokens == [min(len(ids), NO_BOS_MAX_DOC) for ids in raw_ids]
    assert max(ref.doc_tokens) == NO_BOS_MAX_DOC
    db, release, sae_id, _ = run(folder, block_size=BLOCK, threshold=0.0, max_doc_tokens=NO_BOS_MAX_DOC,
                                 model=str(model_dir))
    assert_matches(stored(db, release, sae_id), ref, "prepend_bos=False")


def test_registry_source_matches_local_folder(registry_sae, sae_dirs, sae_acts, tmp_path_factory, run):
    """The registry entry (gpt2-small-res-jb) tells sae-lens to load the model with
    center_writing_weights=True, and ingestion honours it: the registry run counts the centred
    residual. A local folder of the same SAE whose metadata asks for the same model loading gives
    identical tables; the plain local folder (no such request) counts the uncentred residual."""
    options = dict(block_size=BLOCK, threshold=0.0, max_doc_tokens=MAX_DOC)
    registry = stored(*run(registry_sae, **options)[:3])
    plain = stored(*run(sae_dirs["standard"], **options)[:3])

    centred_folder = tmp_path_factory.mktemp("centred") / "standard-centred"
    shutil.copytree(sae_dirs["standard"], centred_folder)
    cfg = json.loads((centred_folder / "cfg.json").read_text())
    cfg["metadata"]["model_from_pretrained_kwargs"] = {"center_writing_weights": True}
    (centred_folder / "cfg.json").write_text(json.dumps(cfg))
    local = stored(*run(centred_folder, **options)[:3])

    ref = count(sae_acts(sae_dirs["standard"], True, MAX_DOC, centered=True), 0.0, BLOCK)
    assert_nontrivial(ref, BLOCK)
    assert_matches(registry, ref, "registry (centred model)")
    assert_same_tables(registry, local)
    # the centring matters here, so the comparisons above could tell the two apart
    plain_ref = count(sae_acts(sae_dirs["standard"], True, MAX_DOC), 0.0, BLOCK)
    assert (plain_ref.fire_count != ref.fire_count).any()
    assert_matches(plain, plain_ref, "plain local folder")
    np.testing.assert_array_equal(registry.decoder, plain.decoder)


def test_pair_counter_tiles_match_gram():
    """Tiles of 7 over 20 features (widths 7, 7, 6), flushed every 5 blocks: n11 == X^T X."""
    rng = np.random.default_rng(0)
    n_features = 20
    x = rng.random((53, n_features)) < 0.12
    x[:, 3] = False  # a feature that never fires
    x[::4, 15] = True  # and a frequent one
    counter = PairCounter(n_features, "cpu", tile=7, flush_blocks=5)
    assert counter.starts == [0, 7, 14] and len(counter.tiles) == 6
    for lo, hi in [(0, 1), (1, 4), (4, 4), (4, 13), (13, 30), (30, 31), (31, 53)]:
        counter.add(torch.from_numpy(x[lo:hi]))
    gram = x.astype(np.int64).T @ x.astype(np.int64)
    upper = {(i, j): int(gram[i, j]) for i in range(n_features) for j in range(i + 1, n_features) if gram[i, j]}
    assert 0 < len(upper) < n_features * (n_features - 1) // 2  # some pairs co-occur, some never
    assert any(gram[i, j] == 0 for i in range(n_features) for j in range(i + 1, n_features)
               if gram[i, i] and gram[j, j])  # pairs of live features that never share a block
    cross = [(i, j) for (i, j) in upper if i // 7 != j // 7]
    assert cross and len({(i // 7, j // 7) for i, j in cross}) == 3  # every off-diagonal tile used

    np.testing.assert_array_equal(counter.diagonal().numpy(), np.diag(gram))
    pairs = counter.pairs()
    rows = list(zip(pairs.i.tolist(), pairs.j.tolist(), pairs.n11.tolist()))
    assert rows == sorted(rows) and {(i, j): n for i, j, n in rows} == upper

    # the state round-trips, and counting goes on after a read
    clone = PairCounter(n_features, "cpu", tile=7, flush_blocks=5)
    clone.load_state_dict(counter.state_dict())
    more = rng.random((9, n_features)) < 0.3
    for c in (counter, clone):
        c.add(torch.from_numpy(more))
    both = np.vstack([x, more]).astype(np.int64)
    gram2 = both.T @ both
    for c in (counter, clone):
        p = c.pairs()
        assert {(i, j): n for i, j, n in zip(p.i.tolist(), p.j.tolist(), p.n11.tolist())} == {
            (i, j): int(gram2[i, j]) for i in range(n_features) for j in range(i + 1, n_features) if gram2[i, j]}
        np.testing.assert_array_equal(c.diagonal().numpy(), np.diag(gram2))

    # a checkpoint tiled another way (an older TILE) is refused with a clear message, never half-loaded
    with pytest.raises(SaecatError, match="--restart"):
        PairCounter(n_features, "cpu", tile=5, flush_blocks=5).load_state_dict(counter.state_dict())
