"""Parquet export reads back as the catalog's own rows."""

import json
import subprocess
import sys

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from catalog import Catalog
from catalog.export import export_parquet
from catalog.schema import SAE_TABLES
from ingest import IngestOptions, ingest, resolve_source


@pytest.fixture(scope="module")
def two_saes(tmp_path_factory, sae_dirs, corpus):
    db = tmp_path_factory.mktemp("export") / "catalog.duckdb"
    for arch in ("standard", "topk"):
        ingest(resolve_source(None, None, str(sae_dirs[arch])),
               IngestOptions(dataset=str(corpus), block_size=32, max_doc_tokens=120, top_k=3, progress=False), db=db)
    return db


def rows(table, columns):
    return sorted(zip(*(table.column(c).to_pylist() for c in columns)), key=repr)


def test_every_table_reads_back_exactly(two_saes, tmp_path):
    with Catalog.open(two_saes) as cat:
        written = export_parquet(cat, tmp_path)
        assert rows(pq.read_table(tmp_path / "saes.parquet"), ["sae", "release", "sae_id", "n_tokens"]) == \
            sorted(cat.con.execute("SELECT sae, release, sae_id, n_tokens FROM saes").fetchall(), key=repr)
        for table in SAE_TABLES:
            back = ds.dataset(tmp_path / table, format="parquet", partitioning="hive").to_table()
            expected = cat.con.sql(f"SELECT * FROM {table}").to_arrow_table()
            assert back.num_rows == expected.num_rows > 0, table
            assert rows(back, expected.column_names) == rows(expected, expected.column_names), table
    assert written["cooccurrence/sae=2/data.parquet"] > 0


def test_cli_exports_one_sae(two_saes, tmp_path):
    out = subprocess.run([sys.executable, "-c", "from queries.front.cli import main; main()", "export", "parquet",
                          str(tmp_path),
                          "--release", "local", "--sae-id", "topk", "--db", str(two_saes), "--json"],
                         capture_output=True, text=True, check=True).stdout
    files = {r["file"]: r["rows"] for r in json.loads(out)}
    assert "features/sae=2/data.parquet" in files and not any("sae=1" in f for f in files)
    assert pq.read_table(tmp_path / "features" / "sae=2" / "data.parquet").num_rows == files["features/sae=2/data.parquet"] == 96
