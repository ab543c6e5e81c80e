"""The block sample (`blocks`) and the activation spectrum (`activation_spectrum`) of an ingestion,
against the brute-force reference of test_counts: Hugging Face's GPT2Model one document at a time,
the SAE as sae-lens loads it, and plain Python sets and numpy.

The sample's priority is recomputed here from its definition (splitmix64 of
document << 24 | block-in-document, in Python integers), so "the kept blocks are the k smallest"
is checked against an independent implementation, not against the code under test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog import Catalog
from catalog.errors import SaecatError
from ingest import IngestOptions, ingest, resolve_source
from ingest.accumulate import ActivationMoments
from ingest.blocks import BlockSample
from test_counts import BLOCK, D_SAE, MAX_DOC, gap_threshold
from test_robustness import ALL_TABLES, checkpoints, copy_catalog, dump, run_cli

SOURCES = ("alpha", "beta", "gamma")
NULL_SOURCE_DOC = 4  # this document's `source` is null: its blocks' group_value is NULL
ALL = 10**6  # a sample larger than the corpus: every full block is kept
M64 = 2**64


def priority(document: int, index: int) -> int:
    """splitmix64(document << 24 | index) as a signed 64-bit integer, the slow and obvious way."""
    z = ((document << 24 | index) + 0x9E3779B97F4A7C15) % M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    z ^= z >> 31
    return z - M64 if z >= 2**63 else z


@dataclass(frozen=True)
class RefBlock:
    block: int
    document: int
    start: int
    features: tuple[int, ...]


def reference_blocks(docs: list[np.ndarray], threshold: float, bos_offset: int = 1) -> list[RefBlock]:
    """Every full block in stream order, with the set of features that fired anywhere in it."""
    out = []
    for d, acts in enumerate(docs):
        for b in range(len(acts) // BLOCK):
            fired = acts[b * BLOCK: (b + 1) * BLOCK] > threshold
            out.append(RefBlock(len(out), d, bos_offset + b * BLOCK,
                                tuple(sorted({f for f in range(acts.shape[1]) if fired[:, f].any()}))))
    return out


# ----------------------------------------------------------------------------- fixtures


def corpus_rows(corpus: Path) -> list[dict]:
    """The fixture corpus with a flat `source` field (one null) and a nested `meta.kind`."""
    rows = []
    for i, line in enumerate(corpus.read_text().splitlines()):
        doc = json.loads(line)
        rows.append({"text": doc["text"], "source": None if i == NULL_SOURCE_DOC else SOURCES[i % 3],
                     "meta": {"kind": doc["kind"], "n": i}})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def grouped(tmp_path_factory, corpus) -> tuple[Path, list[dict]]:
    rows = corpus_rows(corpus)
    return write_rows(tmp_path_factory.mktemp("grouped") / "docs.jsonl", rows), rows


@pytest.fixture(scope="module")
def run(tmp_path_factory, sae_dirs, grouped):
    """run(**options) -> (db, result): one ingestion of the standard SAE over the grouped corpus
    per distinct request, each into its own catalog."""
    cache: dict = {}

    def go(**options):
        options = {"block_size": BLOCK, "max_doc_tokens": MAX_DOC, "threshold": 0.0, **options}
        key = tuple(sorted(options.items()))
        if key not in cache:
            db = tmp_path_factory.mktemp("catalog") / "catalog.duckdb"
            result = ingest(resolve_source(None, None, str(sae_dirs["standard"])),
                            IngestOptions(dataset=str(grouped[0]), progress=False, **options), db=db)
            assert result.status == "ingested"
            cache[key] = (db, result)
        return cache[key]

    return go


def stored_blocks(db: Path) -> list[tuple]:
    with Catalog.open(db) as cat:
        rows = cat.con.execute("SELECT block, document, start, group_value, features FROM blocks").fetchall()
    return [(b, d, s, g, tuple(f)) for b, d, s, g, f in rows]


def stored_spectrum(db: Path) -> list[tuple]:
    with Catalog.open(db) as cat:
        return cat.con.execute("SELECT rank, eigenvalue FROM activation_spectrum ORDER BY rank").fetchall()


def saes_row(db: Path) -> dict:
    with Catalog.open(db) as cat:
        rel = cat.con.sql("SELECT n_blocks, group_column, sample_blocks FROM saes").fetchall()
    assert len(rel) == 1
    return dict(zip(("n_blocks", "group_column", "sample_blocks"), rel[0]))


# ----------------------------------------------------------------------------- (a) block contents


@pytest.mark.parametrize("level", ["zero", "positive"])
def test_full_sample_is_every_block_exactly(level, sae_dirs, sae_acts, run):
    docs = sae_acts(sae_dirs["standard"], True, MAX_DOC)
    threshold = 0.0 if level == "zero" else gap_threshold(docs, 0.998)
    ref = reference_blocks(docs, threshold)
    # non-trivial: many blocks, documents with several, blocks whose feature sets differ, empty-ish ones
    assert len(ref) > 100 and len({r.document for r in ref}) > 10
    assert len({r.features for r in ref}) > len(ref) // 2
    assert any(len(r.features) < D_SAE for r in ref)
    if level == "positive":  # far sparser than at zero: the threshold is applied, not just stored
        assert any(not r.features for r in ref)  # blocks where nothing fired: stored as []
        assert 10 * sum(len(r.features) for r in ref) < sum(len(r.features) for r in reference_blocks(docs, 0.0))

    db, result = run(sample_blocks=ALL, threshold=threshold)
    got = stored_blocks(db)
    assert got == [(r.block, r.document, r.start, None, r.features) for r in ref]  # sorted by block, too
    assert saes_row(db) == {"n_blocks": len(ref), "group_column": None, "sample_blocks": ALL}
    assert result.n_blocks == len(ref)


def test_a_kept_blocks_text_is_its_tokens(sae_dirs, sae_acts, raw_ids, tokenizer, run):
    ref = reference_blocks(sae_acts(sae_dirs["standard"], True, MAX_DOC), 0.0)
    db, _ = run(sample_blocks=ALL)
    with Catalog.open(db) as cat:
        got = [tokens for (tokens,) in cat.con.execute("SELECT tokens FROM blocks ORDER BY block").fetchall()]
    # position p of a document is its raw token p - 1 (BOS is position 0)
    assert got == [[tokenizer.decode([i]) for i in raw_ids[r.document][r.start - 1: r.start - 1 + BLOCK]]
                   for r in ref]


def test_small_sample_is_the_bottom_k_by_priority(sae_dirs, sae_acts, run):
    k = 25
    ref = reference_blocks(sae_acts(sae_dirs["standard"], True, MAX_DOC), 0.0)
    ranked = sorted(ref, key=lambda r: priority(r.document, (r.start - 1) // BLOCK))
    kept = sorted(ranked[:k], key=lambda r: r.block)
    # the bottom-k is spread over the stream, not its first k blocks
    assert kept != ref[:k] and kept[-1].block > len(ref) // 2 and len({r.document for r in kept}) > 5

    db, _ = run(sample_blocks=k)
    assert stored_blocks(db) == [(r.block, r.document, r.start, None, r.features) for r in kept]
    assert saes_row(db)["sample_blocks"] == k


def test_no_sample(run):
    db, result = run(sample_blocks=0)
    assert stored_blocks(db) == []
    assert saes_row(db)["sample_blocks"] == 0 and result.n_blocks > 100
    assert len(stored_spectrum(db)) == 64  # the spectrum does not depend on the sample


# ----------------------------------------------------------------------------- (b) group values


@pytest.mark.parametrize("column", ["source", "meta.kind"])
def test_group_values_round_trip(column, grouped, sae_dirs, sae_acts, run):
    _, rows = grouped
    expected = [r["source"] if column == "source" else r["meta"]["kind"] for r in rows]
    ref = reference_blocks(sae_acts(sae_dirs["standard"], True, MAX_DOC), 0.0)
    db, _ = run(sample_blocks=ALL, group_column=column)
    got = stored_blocks(db)
    assert got == [(r.block, r.document, r.start, expected[r.document], r.features) for r in ref]
    values = {g for _, _, _, g, _ in got}
    assert values == ({*SOURCES, None} if column == "source" else {"code", "prose"})
    assert saes_row(db)["group_column"] == column


@pytest.mark.parametrize("column", ["nope", "meta.nope", "source.deeper"])
def test_missing_group_field_is_a_clear_error(column, grouped, sae_dirs, run, tmp_path):
    source = resolve_source(None, None, str(sae_dirs["standard"]))
    opts = IngestOptions(dataset=str(grouped[0]), block_size=BLOCK, max_doc_tokens=MAX_DOC, group_column=column,
                         progress=False)
    new_db = tmp_path / "new" / "catalog.duckdb"
    with pytest.raises(SaecatError, match=rf"no field '{column}'.*group column") as info:
        ingest(source, opts, db=new_db)
    assert "\n" not in str(info.value)
    assert not new_db.exists() and not checkpoints(new_db)

    existing = copy_catalog(run(sample_blocks=ALL)[0], tmp_path / "existing")
    tables = ALL_TABLES + ("blocks", "activation_spectrum")
    before = dump(existing, tables)
    with pytest.raises(SaecatError, match="group column"):
        ingest(source, opts, db=existing, force=True)
    assert dump(existing, tables) == before and not checkpoints(existing)


def test_cli_group_column_and_sample_blocks(grouped, sae_dirs, model_dir, tmp_path):
    args = ["ingest", "--dataset", str(grouped[0]), "--sae-path", str(sae_dirs["standard"]), "--model", str(model_dir),
            "--block-size", str(BLOCK), "--max-doc-tokens", str(MAX_DOC), "--db", "catalog.duckdb"]
    bad = run_cli(*args, "--group-column", "nope", cwd=tmp_path)
    assert bad.returncode == 1 and "no field 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "catalog.duckdb").exists()

    ok = run_cli(*args, "--group-column", "meta.kind", "--sample-blocks", "7", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    got = stored_blocks(tmp_path / "catalog.duckdb")
    assert len(got) == 7 and {g for *_, g, _ in got} <= {"code", "prose"}
    assert saes_row(tmp_path / "catalog.duckdb")["group_column"] == "meta.kind"


# ----------------------------------------------------------------------------- (c) activation spectrum


def reference_spectrum(resid, max_tokens: int | None = None) -> np.ndarray:
    """eigvalsh of np.cov over the counted tokens' residual (BOS dropped), largest first."""
    x = np.concatenate([r.numpy()[1:] for r in resid(True, MAX_DOC)]).astype(np.float64)
    if max_tokens is not None:
        x = x[:max_tokens]
    return np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]


def assert_spectrum(got: list[tuple], expected: np.ndarray) -> None:
    assert [rank for rank, _ in got] == list(range(1, len(expected) + 1))
    values = np.array([v for _, v in got])
    assert (np.diff(values) <= 0).all()
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-6 * expected[0])


def test_activation_spectrum_matches_numpy(resid, run):
    expected = reference_spectrum(resid)
    assert len(expected) == 64 and expected[0] > 10 * expected[-1] > 0  # a spread-out, full-rank spectrum
    db, result = run(sample_blocks=ALL)
    assert_spectrum(stored_spectrum(db), expected)
    # over counted tokens only: with the BOS row included the spectrum would differ a lot
    with_bos = np.concatenate([r.numpy() for r in resid(True, MAX_DOC)]).astype(np.float64)
    assert not np.allclose(np.linalg.eigvalsh(np.cov(with_bos, rowvar=False))[::-1], expected, rtol=1e-2)


def test_activation_spectrum_respects_max_tokens(resid, sae_dirs, sae_acts, run):
    lengths = [len(d) for d in sae_acts(sae_dirs["standard"], True, MAX_DOC)]
    budget = sum(lengths[:4]) + 37  # cut mid-document, across several batches
    db, result = run(sample_blocks=ALL, max_tokens=budget, batch_tokens=450)
    assert result.n_tokens == budget
    assert_spectrum(stored_spectrum(db), reference_spectrum(resid, budget))

    db, result = run(max_tokens=1)  # one counted token: no covariance, no rows
    assert result.n_tokens == 1 and stored_spectrum(db) == []


# ----------------------------------------------------------------------------- (d) resume, (e) batching


def test_interrupted_run_resumes_to_identical_rows(grouped, sae_dirs, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a batch (as in test_robustness), then the same command again: the
    resumed run's blocks and spectrum equal an uninterrupted run's, bit for bit."""
    from ingest import accumulate

    _, rows = grouped
    options = dict(block_size=BLOCK, max_doc_tokens=MAX_DOC, sample_blocks=9, group_column="source",
                   batch_tokens=450, checkpoint_every_s=0.0, progress=False)
    source = resolve_source(None, None, str(sae_dirs["standard"]))
    whole = tmp_path / "whole"
    whole.mkdir()
    write_rows(whole / "docs.jsonl", rows)
    monkeypatch.chdir(whole)
    assert ingest(source, IngestOptions(dataset="docs.jsonl", **options), db=Path("catalog.duckdb")).status == "ingested"
    expected = stored_blocks(whole / "catalog.duckdb"), stored_spectrum(whole / "catalog.duckdb")

    part = tmp_path / "part"
    part.mkdir()
    write_rows(part / "docs.jsonl", rows)
    monkeypatch.chdir(part)
    original_add = accumulate.PairCounter.add
    calls = {"n": 0}

    def add(self, blocks):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original_add(self, blocks)

    monkeypatch.setattr(accumulate.PairCounter, "add", add)
    with pytest.raises(SaecatError, match="resume"):
        ingest(source, IngestOptions(dataset="docs.jsonl", **options), db=Path("catalog.duckdb"))
    monkeypatch.setattr(accumulate.PairCounter, "add", original_add)
    [state] = checkpoints(part / "catalog.duckdb")
    saved = torch.load(state, weights_only=True)
    done = saved["n_documents"]
    assert 0 < done < len(rows) and len(saved["sample_priority"]) == 9 and saved["open_moments_n"] + saved["total_moments_n"] > 0
    # the checkpoint's sample is not the final one: blocks counted after it must displace some
    assert sorted(saved["sample_block"].tolist()) != [b for b, *_ in expected[0]]
    # blank what the checkpoint counted: a run that started over would see different blocks
    write_rows(part / "docs.jsonl", [{**r, "text": ""} if i < done else r for i, r in enumerate(rows)])

    assert ingest(source, IngestOptions(dataset="docs.jsonl", **options), db=Path("catalog.duckdb")).status == "ingested"
    assert (stored_blocks(part / "catalog.duckdb"), stored_spectrum(part / "catalog.duckdb")) == expected
    assert {g for *_, g, _ in expected[0]} - {None} <= set(SOURCES)


@pytest.mark.parametrize("k", [ALL, 20])
def test_batching_does_not_change_the_sample(k, run):
    big, _ = run(sample_blocks=k, group_column="source")
    small, _ = run(sample_blocks=k, group_column="source", batch_tokens=300)
    assert stored_blocks(big) == stored_blocks(small)
    assert len(stored_blocks(big)) == min(k, saes_row(big)["n_blocks"])
    np.testing.assert_allclose([v for _, v in stored_spectrum(small)], [v for _, v in stored_spectrum(big)],
                               rtol=1e-6)


def test_run_identity_covers_group_column_and_sample_size(sae_dirs, grouped):
    from ingest.checkpoint import params_hash
    from ingest.pipeline import _run_params
    from ingest.sources import load_sae

    loaded = load_sae(resolve_source(None, None, str(sae_dirs["standard"])))
    hashes = {params_hash(_run_params(loaded, IngestOptions(dataset=str(grouped[0]), **extra), "gpt2"))
              for extra in ({}, {"group_column": "source"}, {"group_column": "meta.kind"}, {"sample_blocks": 7})}
    assert len(hashes) == 4


# ----------------------------------------------------------------------------- the pieces on their own


def offer(sample: BlockSample, rows: np.ndarray, lo: int, hi: int, per_doc: int, groups: list[str | None]) -> None:
    """Blocks lo..hi of a synthetic stream with `per_doc` blocks per document."""
    block = torch.arange(lo, hi)
    document, index = block // per_doc, block % per_doc
    codes = sample.codes([groups[d] for d in range(int(document.min()), int(document.max()) + 1)])
    tokens = block[:, None] * 4 + torch.arange(4)  # block b's token ids: 4b .. 4b + 3
    sample.add(torch.from_numpy(rows[lo:hi]).nonzero().unbind(1), block=block, document=document, index=index,
               start=1 + index * 4, group=codes[document - document.min()], tokens=tokens)


def test_block_sample_is_bottom_k_however_split_and_merged():
    rng = np.random.default_rng(0)
    n, per_doc, k, n_features = 3000, 2, 5, 40
    rows = rng.random((n, n_features)) < 0.15
    groups = [f"doc-{d}" if d % 11 else None for d in range(n // per_doc + 1)]  # unique per document: compaction
    expected_blocks = sorted(sorted(range(n), key=lambda b: priority(b // per_doc, b % per_doc))[:k])

    one = BlockSample(n_features, k, block_size=4)
    cuts = [0, 1, 2, 50, 51, 700, 1500, 2999, n]
    for lo, hi in zip(cuts, cuts[1:]):
        offer(one, rows, lo, hi, per_doc, groups)
    halves = BlockSample(n_features, k, block_size=4), BlockSample(n_features, k, block_size=4)
    offer(halves[0], rows, 0, 1234, per_doc, groups)
    offer(halves[1], rows, 1234, n, per_doc, groups)
    halves[1].merge(halves[0])  # merge order does not matter either
    restored = BlockSample(n_features, k, block_size=4)
    restored.load_state_dict(one.state_dict())

    for sample in (one, halves[1], restored):
        table = sample.table(lambda ids: np.array([f"t{i}" for i in ids], dtype=object)).to_pydict()
        assert table["block"] == expected_blocks
        assert table["document"] == [b // per_doc for b in expected_blocks]
        assert table["start"] == [1 + (b % per_doc) * 4 for b in expected_blocks]
        assert table["group_value"] == [groups[b // per_doc] for b in expected_blocks]
        assert table["features"] == [np.flatnonzero(rows[b]).tolist() for b in expected_blocks]
        assert table["tokens"] == [[f"t{4 * b + j}" for j in range(4)] for b in expected_blocks]
    assert one.table().to_pydict()["tokens"] == [None] * k  # no decoder for the ids: no text
    assert len(one.group_values) < 100  # 1500 distinct values went through; unused ones were dropped


def test_block_sample_from_an_older_checkpoint_is_refused_clearly():
    sample = BlockSample(8, 3, block_size=4)
    offer(sample, np.ones((6, 8), dtype=bool), 0, 6, 2, [None] * 4)
    older = {k: v for k, v in sample.state_dict().items() if k != "sample_tokens"}
    with pytest.raises(SaecatError, match="older saecat.*--restart"):
        BlockSample(8, 3, block_size=4).load_state_dict(older)


def test_block_sample_priority_is_splitmix64():
    from ingest.blocks import block_priority

    # splitmix64's first output from state 0 is 0xE220A8397B1DCDAF (the reference implementation's)
    assert block_priority(torch.tensor([0]), torch.tensor([0])).item() % M64 == 0xE220A8397B1DCDAF
    documents = torch.tensor([0, 1, 2**38 + 12345, 77, 2**39 - 1])
    index = torch.tensor([0, 3, 2**24 - 1, 0, 5])
    assert block_priority(documents, index).tolist() == [priority(d, i) for d, i in
                                                         zip(documents.tolist(), index.tolist())]


def test_activation_moments_merge_and_spectrum():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3.0  # correlated, off-centre
    whole, a, b = ActivationMoments(6), ActivationMoments(6), ActivationMoments(6)
    whole.update(torch.from_numpy(x).float())
    a.update(torch.from_numpy(x[:123]).float())
    b.update(torch.from_numpy(x[123:]).float())
    a.merge(b)
    expected = np.linalg.eigvalsh(np.cov(x.astype(np.float32).astype(np.float64), rowvar=False))[::-1]
    for m in (whole, a):
        np.testing.assert_allclose(m.spectrum(), expected, rtol=1e-9, atol=1e-12)
    one = ActivationMoments(6)
    one.update(torch.from_numpy(x[:1]).float())
    assert len(one.spectrum()) == 0
