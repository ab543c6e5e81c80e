"""The catalog schema, stated once: DDL, migrations and the table contract all read from here.

Each entry of MIGRATIONS moves the catalog from version N-1 to N and only adds (tables,
columns, views): an upgrade never drops a user's data. `catalog.store` applies the pending ones
in one transaction when a catalog is opened for writing.
"""

SCHEMA_VERSION_TABLE = "schema_migrations"

_V1 = [
    """CREATE TABLE releases (
        release          VARCHAR PRIMARY KEY,  -- sae-lens release name, or 'local', or a hub repo id
        repo_id          VARCHAR,
        model            VARCHAR,
        conversion_func  VARCHAR,
        links            JSON,
        registered_at    TIMESTAMP DEFAULT current_timestamp
    )""",
    "CREATE SEQUENCE sae_key START 1",
    """CREATE TABLE saes (
        sae              INTEGER PRIMARY KEY DEFAULT nextval('sae_key'),
        release          VARCHAR NOT NULL,
        sae_id           VARCHAR NOT NULL,
        source           VARCHAR,   -- 'registry', 'hub' or 'local', and where it was read from
        model            VARCHAR,   -- the model the SAE was trained on (sae-lens metadata)
        hook_name        VARCHAR,
        layer            INTEGER,
        d_in             INTEGER,
        d_sae            INTEGER,
        architecture     VARCHAR,
        neuronpedia_id   VARCHAR,   -- 'modelId/sourceId' when the registry gives one
        status           VARCHAR NOT NULL,  -- 'registered' (metadata only) or 'ready'
        decoder_folded   BOOLEAN,   -- were decoder rows rescaled to unit norm before encoding
        activation_model VARCHAR,   -- the model actually run (--model, or the SAE's own)
        dataset          VARCHAR,
        text_column      VARCHAR,
        n_documents      BIGINT,
        n_tokens         BIGINT,    -- counted tokens: no BOS, no padding
        n_blocks         BIGINT,    -- full blocks of block_size counted tokens
        block_size       INTEGER,
        threshold        DOUBLE,    -- a feature fires where its activation is > threshold
        max_doc_tokens   INTEGER,
        ingested_at      TIMESTAMP,
        UNIQUE (release, sae_id)
    )""",
    """CREATE TABLE features (
        sae              INTEGER NOT NULL,
        feature          INTEGER NOT NULL,  -- index of the feature in its SAE
        decoder          FLOAT[] NOT NULL,  -- decoder row as stored in the SAE (after folding, if any)
        decoder_norm     FLOAT NOT NULL,
        fire_count       BIGINT NOT NULL,   -- counted tokens where the feature fired
        block_count      BIGINT NOT NULL,   -- full blocks where it fired at least once
        max_activation   FLOAT,             -- over counted tokens
        mean_activation  FLOAT,             -- over the tokens where it fired; NULL if it never did
        PRIMARY KEY (sae, feature)
    )""",
    # No key on purpose: a 16k-wide SAE has ~1e8 pairs, and rows are written sorted by (sae, i, j)
    # in one transaction per SAE, so DuckDB's zone maps already make `WHERE sae = ?` cheap.
    """CREATE TABLE cooccurrence (
        sae              INTEGER NOT NULL,
        i                INTEGER NOT NULL,
        j                INTEGER NOT NULL,  -- i < j
        n11              BIGINT NOT NULL    -- full blocks where both fired; only n11 > 0 is stored
    )""",
    "CREATE SEQUENCE run_key START 1",
    """CREATE TABLE ingest_runs (
        run              INTEGER PRIMARY KEY DEFAULT nextval('run_key'),
        release          VARCHAR NOT NULL,
        sae_id           VARCHAR NOT NULL,
        params           JSON NOT NULL,
        params_hash      VARCHAR NOT NULL,  -- runs with the same hash resume one another
        status           VARCHAR NOT NULL,  -- running, done, failed, interrupted
        pid              INTEGER,
        n_documents      BIGINT DEFAULT 0,
        n_tokens         BIGINT DEFAULT 0,
        started_at       TIMESTAMP DEFAULT current_timestamp,
        updated_at       TIMESTAMP DEFAULT current_timestamp,
        finished_at      TIMESTAMP,
        error            VARCHAR
    )""",
]

# v2: feature labels, computed at ingestion so a feature means something without a hub.
_V2 = [
    "ALTER TABLE saes ADD COLUMN top_k INTEGER",          # examples kept per feature
    "ALTER TABLE saes ADD COLUMN context_tokens INTEGER",  # tokens of context on each side of an example
    """CREATE TABLE feature_tokens (
        sae              INTEGER NOT NULL,
        feature          INTEGER NOT NULL,
        direction        VARCHAR NOT NULL,  -- 'top' (most promoted) or 'bottom' (most suppressed)
        rank             INTEGER NOT NULL,  -- 0 = strongest
        token_id         INTEGER NOT NULL,
        token            VARCHAR NOT NULL,
        logit            FLOAT NOT NULL     -- (W_dec[feature] @ W_U)[token_id]
    )""",
    """CREATE TABLE feature_examples (
        sae              INTEGER NOT NULL,
        feature          INTEGER NOT NULL,
        rank             INTEGER NOT NULL,  -- 0 = highest activation
        activation       FLOAT NOT NULL,
        document         BIGINT NOT NULL,   -- index of the document in the dataset stream
        position         INTEGER NOT NULL,  -- token position in the document (BOS, if any, is 0)
        token            VARCHAR NOT NULL,  -- the token it fired on
        context          VARCHAR[] NOT NULL,  -- the tokens around it, in order
        center           INTEGER NOT NULL   -- index of `token` in `context`
    )""",
    """CREATE TABLE feature_histograms (
        sae              INTEGER NOT NULL,
        feature          INTEGER NOT NULL,
        bin              INTEGER NOT NULL,
        lower            DOUBLE NOT NULL,   -- activations in (lower, upper]; the first bin starts at the threshold
        upper            DOUBLE NOT NULL,
        count            BIGINT NOT NULL    -- firing tokens in the bin; empty bins are not stored
    )""",
]

# v3: a feature and its labels in one row, with its Neuronpedia id where the registry gives one.
_V3 = [
    """CREATE VIEW labelled_features AS
    WITH lens AS (
        SELECT sae, feature,
               list(token ORDER BY rank) FILTER (WHERE direction = 'top') AS top_tokens,
               list(token ORDER BY rank) FILTER (WHERE direction = 'bottom') AS bottom_tokens
        FROM feature_tokens GROUP BY sae, feature
    ),
    best AS (
        SELECT sae, feature, token AS top_example_token, array_to_string(context, '') AS top_example
        FROM feature_examples WHERE rank = 0
    )
    SELECT f.sae, s.release, s.sae_id, f.feature,
           s.neuronpedia_id || '/' || f.feature AS feature_ref,  -- modelId/sourceId/index, NULL without an id
           f.fire_count, f.fire_count / nullif(s.n_tokens, 0) AS density,
           f.block_count, f.block_count / nullif(s.n_blocks, 0) AS block_density,
           f.max_activation, f.mean_activation, f.decoder_norm,
           lens.top_tokens, lens.bottom_tokens, best.top_example_token, best.top_example
    FROM features f
    JOIN saes s USING (sae)
    LEFT JOIN lens USING (sae, feature)
    LEFT JOIN best USING (sae, feature)""",
]

# (version, statements). Append only; never edit a released entry.
MIGRATIONS: list[tuple[int, list[str]]] = [(1, _V1), (2, _V2), (3, _V3)]

SCHEMA_VERSION = MIGRATIONS[-1][0]

# The labels of a feature: rows keyed by (sae, feature), ordered by their next column.
LABEL_TABLES = ("feature_tokens", "feature_examples", "feature_histograms")

# Tables with rows per SAE: replaced together when an SAE is re-ingested.
SAE_TABLES = ("features", "cooccurrence", *LABEL_TABLES)

# Views over those tables, for convenience in SQL.
VIEWS = ("labelled_features",)

# The tables and views a user's SQL may read (the sandbox allow-list starts here).
QUERYABLE_TABLES = ("releases", "saes", *SAE_TABLES, "ingest_runs", *VIEWS)
