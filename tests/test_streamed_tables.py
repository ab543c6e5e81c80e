"""The per-SAE tables written as streams of Arrow batches (ingest.tables): with batches of a few
features, a real ingestion of the fixture streams exactly the rows, in exactly the order, that one
batch a table gives and stores the same; DuckDB pulls a stream batch by batch; a stream that fails
part way leaves the catalog as it was; the logit lens shows its bar only where asked and worth it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from test_catalog import features_table, pairs_table, sae_row

from catalog import Catalog
from catalog.schema import SAE_TABLES
from catalog.store import writer
from ingest import IngestOptions, ingest, labels, pipeline, resolve_source, tables

STREAMED = ("features", "feature_examples", "feature_histograms", "feature_tokens")
WORK = {"max_doc_tokens": 200, "block_size": 32, "top_k": 5, "context_tokens": 3, "logit_k": 4,
        "batch_tokens": 700, "progress": False}
WHOLE = 2**40  # a budget no fixture table reaches: one batch a table, the whole table
TINY_BATCH = 4096  # a few features a batch: 12 features of d_in 64, 2 of examples or histograms
TINY_LENS = 4 * 1000 * 10  # ten features' logits over the fixture's 1000-token vocabulary


class Injected(RuntimeError):
    """The fault a test puts in the middle of a stream."""


def in_write_order(db: Path) -> dict[str, list[tuple]]:
    """Every per-SAE table's rows as DuckDB stored them (by rowid), and the saes rows, without keys and times."""
    with Catalog.open(db) as cat:
        rows = {t: cat.con.execute(f"SELECT * EXCLUDE (sae) FROM {t} ORDER BY rowid").fetchall() for t in SAE_TABLES}
        rows["saes"] = cat.con.execute("SELECT * EXCLUDE (sae, ingested_at) FROM saes ORDER BY sae").fetchall()
    return rows


def capture_streams(monkeypatch: pytest.MonkeyPatch, batch_bytes: int, lens_bytes: int) -> dict[str, list]:
    """Budgets for the next ingestion, whose streamed batches are kept, by table, as DuckDB reads them."""
    monkeypatch.setattr(tables, "BATCH_BYTES", batch_bytes)
    monkeypatch.setattr(labels, "LOGIT_BUDGET", lens_bytes)
    read: dict[str, list[pa.RecordBatch]] = {}

    def kept(name: str, reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        for batch in reader:
            read.setdefault(name, []).append(batch)
            yield batch

    def wrap(name: str, data: pa.Table | pa.RecordBatchReader) -> pa.Table | pa.RecordBatchReader:
        if isinstance(data, pa.Table):
            return data
        return pa.RecordBatchReader.from_batches(data.schema, kept(name, data))

    def capturing(*args, **kwargs):
        features, pairs, extra = tables.sae_tables(*args, **kwargs)
        return wrap("features", features), pairs, {name: wrap(name, t) for name, t in extra.items()}

    monkeypatch.setattr(pipeline, "sae_tables", capturing)
    return read


@pytest.fixture(scope="module")
def source(sae_dirs):
    return resolve_source(None, None, str(sae_dirs["standard"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, source, corpus) -> dict[str, tuple[Path, dict[str, list]]]:
    """The fixture ingested whole and in tiny batches: each catalog and the batches its streams gave."""
    out = {}
    for name, budgets in {"whole": (WHOLE, WHOLE), "tiny": (TINY_BATCH, TINY_LENS)}.items():
        db = tmp_path_factory.mktemp(name) / "catalog.duckdb"
        with pytest.MonkeyPatch.context() as mp:
            read = capture_streams(mp, *budgets)
            assert ingest(source, IngestOptions(dataset=str(corpus), **WORK), db=db).status == "ingested"
        out[name] = db, read
    return out


def test_tiny_batches_stream_the_whole_tables_rows_in_order(runs):
    (_, whole), (_, tiny) = runs["whole"], runs["tiny"]
    assert set(whole) == set(tiny) == set(STREAMED)
    for name in STREAMED:
        assert len(whole[name]) == (2 if name == "feature_tokens" else 1), name  # tokens: tops, then bottoms
        assert len(tiny[name]) >= 8, name  # really several batches
        got, want = pa.Table.from_batches(tiny[name]), pa.Table.from_batches(whole[name])
        assert got.num_rows > 0 and got.equals(want), name
    d_sae = pa.Table.from_batches(whole["features"]).num_rows
    features = [b["feature"].to_numpy() for b in tiny["features"]]
    np.testing.assert_array_equal(np.concatenate(features), np.arange(d_sae))  # ranges cover each feature once
    assert max(len(f) for f in features) < d_sae


def test_tiny_batches_store_the_same_rows_in_the_same_order(runs, source):
    whole, tiny = in_write_order(runs["whole"][0]), in_write_order(runs["tiny"][0])
    assert tiny == whole
    assert all(whole[t] for t in STREAMED)
    tokens = whole["feature_tokens"]  # direction-major, then feature and rank, as ever
    assert [r[:3] for r in tokens] == sorted((r[:3] for r in tokens), key=lambda r: (r[1] != "top", r[0], r[2]))


def test_commit_sae_reads_a_stream_batch_by_batch(tmp_path):
    """Each batch is made in Arrow's pool and freed once inserted: had DuckDB read the stream whole
    before inserting it, the pool would hold every batch at the end."""
    n, rows = 200, 4096
    dec = np.random.default_rng(0).normal(size=(n * rows, 4)).astype(np.float32)
    whole = features_table(dec).combine_chunks().to_batches()[0]
    held = []

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, len(dec), rows):
            held.append(pa.total_allocated_bytes())
            part = whole.slice(start, rows)
            yield part.set_column(3, "fire_count", pc.add(part["fire_count"], 0))  # a copy in the pool

    with writer(tmp_path / "catalog.duckdb") as cat:
        cat.con.execute("SET threads = 2")
        key = cat.commit_sae(sae_row("local", "a", dec), pa.RecordBatchReader.from_batches(whole.schema, batches()),
                             pairs_table([0], [1], [1]))
        stored = cat.con.execute("SELECT fire_count FROM features WHERE sae = ? ORDER BY rowid", [key]).fetchnumpy()
    assert len(held) == n
    np.testing.assert_array_equal(stored["fire_count"], whole["fire_count"].to_numpy())
    one = rows * 8  # a batch's copied fire_count
    assert max(held) - held[0] < 16 * one < n * one


@pytest.mark.parametrize("where", ["features", "feature_tokens"])
def test_a_stream_failing_part_way_leaves_the_catalog_as_it_was(where, tmp_path, monkeypatch, source, corpus, runs):
    db = tmp_path / "catalog.duckdb"
    opts = IngestOptions(dataset=str(corpus), **WORK)
    module, builder = (tables, "_features_batch") if where == "features" else (labels, "_tokens_batch")
    made = getattr(module, builder)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Injected(f"in the middle of {where}")
        return made(*args, **kwargs)

    monkeypatch.setattr(tables, "BATCH_BYTES", TINY_BATCH)
    monkeypatch.setattr(labels, "LOGIT_BUDGET", TINY_LENS)
    monkeypatch.setattr(module, builder, failing)
    with pytest.raises(Injected):  # the stream's own error, not DuckDB's report of it
        ingest(source, opts, db=db)
    assert len(calls) == 3
    assert not any(in_write_order(db).values())  # nothing of the SAE: not even the tables written before

    replaced = tmp_path / "ingested.duckdb"  # a catalog holding the SAE already: the tiny run's
    shutil.copy(runs["tiny"][0], replaced)
    before = in_write_order(replaced)
    calls.clear()
    with pytest.raises(Injected):  # a forced re-ingestion fails after deleting the SAE's old rows
        ingest(source, opts, db=replaced, force=True)
    assert len(calls) == 3
    assert in_write_order(replaced) == before


@pytest.mark.parametrize("progress,work,shown", [(True, 0, True), (False, 0, False), (True, 10**18, False)])
def test_the_lens_bar_shows_where_asked_and_worth_it(progress, work, shown, capsys, monkeypatch):
    monkeypatch.setattr(labels, "LENS_PROGRESS_WORK", work)
    monkeypatch.setattr(labels, "LOGIT_BUDGET", 4 * 50 * 3)  # three features a chunk
    gen = torch.Generator().manual_seed(0)
    decoders, unembed = torch.randn(10, 4, generator=gen), torch.randn(4, 50, generator=gen)
    chunks = list(labels.logit_lens(decoders, unembed, 2, progress=progress))
    assert [c[0] for c in chunks] == [0, 3, 6, 9]
    logits = decoders @ unembed
    ids = np.concatenate([c[1][0] for c in chunks])
    np.testing.assert_array_equal(ids, logits.topk(2, dim=1).indices.numpy())
    np.testing.assert_array_equal(np.concatenate([c[2][0] for c in chunks]),
                                  logits.topk(2, dim=1, largest=False).indices.numpy())
    err = capsys.readouterr().err
    assert ("logit lens" in err and "10/10 features" in err) == shown


def test_token_strings_decode_each_distinct_id_once():
    decoded = []

    class Tokenizer:
        def decode(self, ids: list[int]) -> str:
            decoded.extend(ids)
            return f"<{ids[0]}>"

    strings = labels.TokenStrings(Tokenizer())
    assert list(strings(np.array([5, 2, 5]))) == ["<5>", "<2>", "<5>"]
    assert list(strings(np.array([[2, 40], [7, 5]])).ravel()) == ["<2>", "<40>", "<7>", "<5>"]
    assert list(strings(np.zeros(0, dtype=np.int32))) == []
    assert sorted(decoded) == [2, 5, 7, 40]
