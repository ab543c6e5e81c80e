"""saecat's own SQL macros, conveniences for `saecat sql` and `Catalog.sql`.

They are temporary macros, created on the connection before each user query: temporary objects
live in memory, so this works on a read-only catalog whose configuration is locked, and on any
cursor a server hands out. The sandbox allows calling them by name (MACRO_NAMES).

    feature_cosine(sae_a, feature_a, sae_b, feature_b)   cosine of two features' decoder directions
    feature_cosine(sae_a, feature_a, feature_b)          the same, both features in SAE sae_a

Either form is NULL when a feature is missing, and an error when the two directions differ in size.
"""

from __future__ import annotations

import duckdb

MACRO_NAMES = frozenset({"feature_cosine"})

# The table is qualified with the catalog's database: a user's CTE named `features` would otherwise
# stand in for it, since a macro's body is bound where it is called.
_COSINE = (
    "(SELECT list_cosine_similarity(a.decoder, b.decoder) FROM {features} a, {features} b "
    "WHERE a.sae = sae_a AND a.feature = feature_a AND b.sae = {sae_b} AND b.feature = feature_b)"
)


def create_macros(con: duckdb.DuckDBPyConnection) -> None:
    """(Re)create saecat's macros on this connection; cheap (about a millisecond) and idempotent."""
    database = con.execute("SELECT current_database()").fetchall()[0][0]
    features = '"{}".main.features'.format(database.replace('"', '""'))
    con.execute(
        "CREATE OR REPLACE TEMP MACRO feature_cosine"
        f"(sae_a, feature_a, sae_b, feature_b) AS {_COSINE.format(features=features, sae_b='sae_b')}, "
        f"(sae_a, feature_a, feature_b) AS {_COSINE.format(features=features, sae_b='sae_a')}"
    )
