"""Export the catalog to Parquet: one file per table, per SAE for the per-SAE tables.

Layout (hive-style, so DuckDB, pyarrow and pandas read a folder back as one table with an `sae`
column):

    OUT/saes.parquet  OUT/releases.parquet
    OUT/<table>/sae=<key>/data.parquet     for features, cooccurrence and the label tables

Rows stream from DuckDB to the Parquet writer in batches, so a 1e8-row co-occurrence table never
sits in memory whole.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from catalog.schema import SAE_TABLES
from catalog.store import Catalog

BATCH_ROWS = 1 << 20


def _write(cat: Catalog, query: str, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    reader = cat.con.sql(query).to_arrow_reader(BATCH_ROWS)
    rows = 0
    tmp = path.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    tmp.replace(path)
    return rows


def export_parquet(cat: Catalog, out: Path, saes: list[int] | None = None) -> dict[str, int]:
    """Write the catalog (or the SAEs named by key) under `out`; returns rows written per file."""
    keys = saes if saes is not None else [k for (k,) in cat.con.execute(
        "SELECT sae FROM saes WHERE status = 'ready' ORDER BY sae").fetchall()]
    in_keys = f"sae IN ({', '.join(str(int(k)) for k in keys)})" if keys else "false"
    written = {
        "saes.parquet": _write(cat, f"SELECT * FROM saes WHERE {in_keys} ORDER BY sae", out / "saes.parquet"),
        "releases.parquet": _write(
            cat, f"SELECT * FROM releases WHERE release IN (SELECT release FROM saes WHERE {in_keys}) ORDER BY release",
            out / "releases.parquet"),
    }
    for table in SAE_TABLES:
        for key in keys:
            name = f"{table}/sae={int(key)}/data.parquet"
            # the key lives in the folder name; rows keep the table's own order
            written[name] = _write(cat, f"SELECT * EXCLUDE (sae) FROM {table} WHERE sae = {int(key)} ORDER BY ALL",
                                   out / name)
    return written
