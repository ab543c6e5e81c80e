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
        max_activation   FLOAT,             -- over its firings; NULL if it never fired
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

# v4: what the three geometry analyses need from an ingestion, and where their results live.
_V4 = [
    # Ingestion extras: a sample of full blocks with the features that fired in each (the lobes'
    # "which documents does each lobe win"), and the spectrum of the model's own activations.
    "ALTER TABLE saes ADD COLUMN group_column VARCHAR",  # dataset field recorded with each sampled block
    "ALTER TABLE saes ADD COLUMN sample_blocks INTEGER",  # most blocks kept in `blocks`
    """CREATE TABLE blocks (
        sae              INTEGER NOT NULL,
        block            BIGINT NOT NULL,    -- index of the full block among all counted ones, in stream order
        document         BIGINT NOT NULL,    -- index of its document in the dataset stream
        start            INTEGER NOT NULL,   -- position of its first token in the document (BOS, if any, is 0)
        group_value      VARCHAR,            -- the document's saes.group_column value; NULL without one
        features         INTEGER[] NOT NULL  -- the features that fired anywhere in the block, ascending
    )""",
    """CREATE TABLE activation_spectrum (
        sae              INTEGER NOT NULL,
        rank             INTEGER NOT NULL,   -- 1 = largest
        eigenvalue       DOUBLE NOT NULL     -- of the covariance of the model's activations at the hook, counted tokens
    )""",
    # Every analysis run: what it was asked, what it read, what it found.
    "CREATE SEQUENCE analysis_key START 1",
    """CREATE TABLE analyses (
        analysis         INTEGER PRIMARY KEY DEFAULT nextval('analysis_key'),
        kind             VARCHAR NOT NULL,   -- 'crystals', 'word_pairs', 'lobes' or 'spectra'
        sae              INTEGER NOT NULL,
        params           JSON NOT NULL,
        params_hash      VARCHAR NOT NULL,
        inputs           JSON NOT NULL,      -- the catalog state it read (the SAE's ingestion, schema, saecat)
        summary          JSON NOT NULL,      -- the headline figures
        seconds          DOUBLE,
        created_at       TIMESTAMP DEFAULT current_timestamp
    )""",
    """CREATE TABLE crystals (
        analysis         INTEGER NOT NULL,
        rank             INTEGER NOT NULL,   -- 0 = best
        shape            VARCHAR NOT NULL,   -- 'parallelogram' (ranked by error) or 'trapezoid' (by cosine)
        a INTEGER NOT NULL, b INTEGER NOT NULL, c INTEGER NOT NULL, d INTEGER NOT NULL,  -- b - a ~ d - c
        error            FLOAT NOT NULL,     -- |(b-a)-(d-c)| / (|b-a|+|d-c|), distractors removed
        cosine           FLOAT NOT NULL,     -- cos(b-a, d-c), distractors removed
        error_before     FLOAT NOT NULL,     -- the same two on the decoder directions as stored
        cosine_before    FLOAT NOT NULL
    )""",
    """CREATE TABLE crystal_sweep (
        analysis         INTEGER NOT NULL,
        space            VARCHAR NOT NULL,   -- 'residual' (model activations) or 'sae' (SAE encodings)
        method           VARCHAR NOT NULL,   -- 'raw', 'project' (named distractors projected out) or 'lda'
        n_components     INTEGER,            -- LDA directions kept; NULL for raw and project
        silhouette       DOUBLE NOT NULL,    -- of the pair differences under the task labels
        silhouette_held_out DOUBLE           -- LDA fitted without the scored pairs (cross-validated)
    )""",
    """CREATE TABLE crystal_tasks (
        analysis         INTEGER NOT NULL,
        space            VARCHAR NOT NULL,
        method           VARCHAR NOT NULL,
        task             VARCHAR NOT NULL,   -- e.g. 'country-capital'
        n_pairs          INTEGER NOT NULL,
        mean_cosine      DOUBLE,             -- mean cosine between the task's pair differences (trapezoid)
        mean_error       DOUBLE              -- mean parallelogram error between them
    )""",
    """CREATE TABLE lobes (
        analysis         INTEGER NOT NULL,
        affinity         VARCHAR NOT NULL,   -- smc, jaccard, dice, overlap, phi, pmi, or 'geometry' (decoder angles)
        n_lobes          INTEGER NOT NULL,
        feature          INTEGER NOT NULL,
        lobe             INTEGER,            -- NULL when the feature was excluded
        excluded         VARCHAR             -- why: 'dead' (no full block) or 'saturated' (every block)
    )""",
    """CREATE TABLE lobe_agreement (
        analysis         INTEGER NOT NULL,
        affinity         VARCHAR NOT NULL,
        n_lobes          INTEGER NOT NULL,
        ami              DOUBLE,             -- adjusted mutual information with the geometric clusters
        ami_null_mean    DOUBLE,             -- over permutations of one labelling
        ami_null_std     DOUBLE,
        ami_z            DOUBLE,
        accuracy_index   DOUBLE,             -- balanced accuracy, decoder vector -> lobe, first 80% of features train
        accuracy_shuffled DOUBLE,            -- the same with a shuffled stratified split
        accuracy_null_mean DOUBLE,           -- random unit vectors in place of the decoder vectors
        accuracy_null_std DOUBLE,
        accuracy_z       DOUBLE
    )""",
    """CREATE TABLE lobe_documents (
        analysis         INTEGER NOT NULL,
        affinity         VARCHAR NOT NULL,
        n_lobes          INTEGER NOT NULL,
        lobe             INTEGER NOT NULL,
        group_value      VARCHAR,            -- the blocks' dataset field value (NULL: no group column)
        blocks           BIGINT NOT NULL     -- sampled blocks this lobe wins
    )""",
    """CREATE TABLE spectra (
        analysis         INTEGER NOT NULL,
        rank             INTEGER NOT NULL,   -- 1 = largest
        eigenvalue       DOUBLE NOT NULL,    -- covariance of the SAE's decoder directions
        null_eigenvalue  DOUBLE NOT NULL,    -- an isotropic Gaussian cloud of the same shape (mean over draws)
        activation_eigenvalue DOUBLE         -- the model's activations at the hook, when recorded
    )""",
    # The co-occurrence affinities of every stored pair (n11 > 0; pairs that never co-fire have
    # Jaccard, Dice, overlap 0 and are not listed). NULL where a formula is undefined.
    # (v6 replaces it, adding pairs_complete: a pair policy may store fewer pairs.)
    """CREATE VIEW feature_affinities AS
    WITH counts AS (
        SELECT c.sae, c.i, c.j, c.n11::DOUBLE AS n11, fi.block_count::DOUBLE AS n_i,
               fj.block_count::DOUBLE AS n_j, s.n_blocks::DOUBLE AS t
        FROM cooccurrence c
        JOIN saes s ON s.sae = c.sae
        JOIN features fi ON fi.sae = c.sae AND fi.feature = c.i
        JOIN features fj ON fj.sae = c.sae AND fj.feature = c.j
    )
    SELECT sae, i, j, n11::BIGINT AS n11, n_i::BIGINT AS n_i, n_j::BIGINT AS n_j, t::BIGINT AS n_blocks,
           (t - n_i - n_j + 2 * n11) / nullif(t, 0) AS smc,
           n11 / nullif(n_i + n_j - n11, 0) AS jaccard,
           2 * n11 / nullif(n_i + n_j, 0) AS dice,
           n11 / nullif(least(n_i, n_j), 0) AS overlap,
           (n11 * (t - n_i - n_j + n11) - (n_i - n11) * (n_j - n11))
               / nullif(sqrt(n_i * (t - n_i) * n_j * (t - n_j)), 0) AS phi,
           n11 * t / nullif(n_i * n_j, 0) AS lift,
           ln(n11 * t / nullif(n_i * n_j, 0)) AS pmi
    FROM counts""",
    # Spectra, one row per analysis with its SAE's place: plot alpha against layer in SQL.
    """CREATE VIEW spectrum_layers AS
    SELECT a.analysis, a.sae, s.release, s.sae_id, s.model, s.hook_name, s.layer, s.d_sae, s.d_in,
           (a.summary->>'alpha')::DOUBLE AS alpha,
           (a.summary->>'alpha_low')::DOUBLE AS alpha_low,
           (a.summary->>'alpha_high')::DOUBLE AS alpha_high,
           (a.summary->>'null_alpha')::DOUBLE AS null_alpha,
           (a.summary->>'activation_alpha')::DOUBLE AS activation_alpha,
           (a.summary->>'negentropy')::DOUBLE AS negentropy,
           (a.summary->>'null_negentropy')::DOUBLE AS null_negentropy,
           a.created_at
    FROM analyses a JOIN saes s USING (sae)
    WHERE a.kind = 'spectra'""",
]

# v5: the sae-lens registry in the catalog, the watch list, and what each sync found.
_V5 = [
    # What the registry says of an SAE before any weights are read (NULL for local SAEs).
    "ALTER TABLE saes ADD COLUMN repo_path VARCHAR",         # the SAE's folder in its release's repo
    "ALTER TABLE saes ADD COLUMN registry_l0 DOUBLE",        # L0 as the registry states it
    "ALTER TABLE saes ADD COLUMN registry_variance_explained DOUBLE",
    "ALTER TABLE saes ADD COLUMN registered_at TIMESTAMP",   # first seen in a registry sync
    "ALTER TABLE saes ADD COLUMN unlisted_at TIMESTAMP",     # gone from the registry (its rows are kept)
    "CREATE SEQUENCE snapshot_key START 1",
    """CREATE TABLE registry_snapshots (
        snapshot         INTEGER PRIMARY KEY DEFAULT nextval('snapshot_key'),
        source           VARCHAR NOT NULL,   -- 'sae-lens 6.54.12' for the packaged YAML, else its path or URL
        version          VARCHAR,            -- the sae-lens version, for the packaged YAML
        sha256           VARCHAR NOT NULL,   -- of the YAML as read
        n_releases       INTEGER NOT NULL,
        n_saes           INTEGER NOT NULL,
        problems         VARCHAR[] NOT NULL, -- malformed entries, skipped
        synced_at        TIMESTAMP DEFAULT current_timestamp
    )""",
    """CREATE TABLE registry_changes (
        snapshot         INTEGER NOT NULL,   -- the sync that saw the change, against the one before
        kind             VARCHAR NOT NULL,   -- 'release' or 'sae'
        action           VARCHAR NOT NULL,   -- 'added', 'removed' or 'changed'
        release          VARCHAR NOT NULL,
        sae_id           VARCHAR,            -- NULL for a release
        fields           VARCHAR[] NOT NULL  -- what changed, for 'changed'
    )""",
    "CREATE SEQUENCE watch_key START 1",
    """CREATE TABLE watches (
        watch            INTEGER PRIMARY KEY DEFAULT nextval('watch_key'),
        release_pattern  VARCHAR NOT NULL,   -- glob over release names ('*' for all)
        model            VARCHAR,            -- exact model name; NULL for any
        hook_pattern     VARCHAR,            -- glob over hook names ('blocks.*.hook_resid_pre'); NULL for any
        min_width        INTEGER,
        max_width        INTEGER,
        min_l0           DOUBLE,
        max_l0           DOUBLE,
        options          JSON NOT NULL,      -- the ingestion options for what it selects (dataset, max_tokens, ...)
        created_at       TIMESTAMP DEFAULT current_timestamp
    )""",
]

# v6: which co-occurring pairs an SAE's catalog keeps (ingest.pair_policy). A wide SAE cannot store
# every pair with n11 > 0; its policy keeps those seen in at least pair_min_blocks blocks and, with
# pair_top_partners K, only those among either feature's K best partners (by pair_rank_by). Stored
# n11 are exact either way. Where pairs_complete is false, a pair missing from `cooccurrence` (and
# from `feature_affinities`) is below the policy, not n11 = 0.
_V6 = [
    "ALTER TABLE saes ADD COLUMN pair_min_blocks INTEGER",    # NULL until ingested
    "ALTER TABLE saes ADD COLUMN pair_top_partners INTEGER",  # NULL: no top, every pair that passes the minimum
    "ALTER TABLE saes ADD COLUMN pair_rank_by VARCHAR",       # 'n11' or 'phi' with a top; NULL without
    "ALTER TABLE saes ADD COLUMN pairs_complete BOOLEAN",     # every pair with n11 > 0 is stored
    # every SAE ingested before v6 stored all its pairs
    "UPDATE saes SET pair_min_blocks = 1, pairs_complete = true WHERE status = 'ready'",
    # feature_affinities as in v4, and whether the row's SAE stores all its pairs: where
    # pairs_complete is false, a pair absent from the view is below the SAE's pair policy, not
    # a pair that never co-fired.
    """CREATE OR REPLACE VIEW feature_affinities AS
    WITH counts AS (
        SELECT c.sae, c.i, c.j, c.n11::DOUBLE AS n11, fi.block_count::DOUBLE AS n_i,
               fj.block_count::DOUBLE AS n_j, s.n_blocks::DOUBLE AS t,
               s.pairs_complete
        FROM cooccurrence c
        JOIN saes s ON s.sae = c.sae
        JOIN features fi ON fi.sae = c.sae AND fi.feature = c.i
        JOIN features fj ON fj.sae = c.sae AND fj.feature = c.j
    )
    SELECT sae, i, j, n11::BIGINT AS n11, n_i::BIGINT AS n_i, n_j::BIGINT AS n_j, t::BIGINT AS n_blocks,
           (t - n_i - n_j + 2 * n11) / nullif(t, 0) AS smc,
           n11 / nullif(n_i + n_j - n11, 0) AS jaccard,
           2 * n11 / nullif(n_i + n_j, 0) AS dice,
           n11 / nullif(least(n_i, n_j), 0) AS overlap,
           (n11 * (t - n_i - n_j + n11) - (n_i - n11) * (n_j - n11))
               / nullif(sqrt(n_i * (t - n_i) * n_j * (t - n_j)), 0) AS phi,
           n11 * t / nullif(n_i * n_j, 0) AS lift,
           ln(n11 * t / nullif(n_i * n_j, 0)) AS pmi,
           pairs_complete
    FROM counts""",
]

# v7: Neuronpedia's public exports (ingest.neuronpedia). What came from Neuronpedia lives in its
# own tables, keyed by (sae, feature) through the source's catalog SAE, beside saecat's own rows:
# an import never touches an ingestion's rows, nor an ingestion an import's. Activation and
# explanation rows keep Neuronpedia's ids; a re-import replaces its source's rows.
_V7 = [
    # the feature's activation at each token of `context` (0 where it did not fire), as Neuronpedia
    # shows an example; NULL for SAEs ingested before v7
    "ALTER TABLE feature_examples ADD COLUMN context_values FLOAT[]",
    """CREATE TABLE neuronpedia_sources (
        sae              INTEGER NOT NULL,   -- the catalog SAE (saes.neuronpedia_id = model_id/source_id)
        model_id         VARCHAR NOT NULL,   -- Neuronpedia's model id ('gemma-2-2b')
        source_id        VARCHAR NOT NULL,   -- Neuronpedia's source (layer) id ('20-gemmascope-res-16k')
        set_name         VARCHAR,
        dataset          VARCHAR,            -- what its activations were computed on, as the source says
        num_prompts      BIGINT,
        num_tokens_in_prompt INTEGER,
        model            JSON,               -- model.jsonl, source.jsonl, sourceset.jsonl, release.jsonl as read
        source           JSON,
        sourceset        JSON,
        release          JSON,
        location         VARCHAR NOT NULL,   -- the folder or URL it was imported from
        n_features       BIGINT NOT NULL,
        n_activations    BIGINT NOT NULL,
        n_explanations   BIGINT NOT NULL,
        imported_at      TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (model_id, source_id)
    )""",
    """CREATE TABLE neuronpedia_features (
        sae              INTEGER NOT NULL,
        feature          INTEGER NOT NULL,   -- Neuronpedia's index
        max_act_approx   DOUBLE,             -- the largest maxValue among its exported activations
        frac_nonzero     DOUBLE,             -- density: the fraction of sampled tokens where it fired
        freq_hist_heights DOUBLE[],          -- histogram of its nonzero activations: counts ...
        freq_hist_values DOUBLE[],           -- ... and bin centres
        logits_hist_heights DOUBLE[],        -- histogram of its logit effects over the vocabulary
        logits_hist_values DOUBLE[],
        pos_str          VARCHAR[],          -- most promoted tokens and their logits
        pos_values       DOUBLE[],
        neg_str          VARCHAR[],          -- most suppressed
        neg_values       DOUBLE[],
        top_cos_sim_indices INTEGER[],       -- most cosine-similar features
        top_cos_sim_values DOUBLE[],
        neuron_alignment_indices INTEGER[],
        neuron_alignment_values DOUBLE[],
        neuron_alignment_l1 DOUBLE[],
        correlated_neurons_indices INTEGER[],
        correlated_neurons_pearson DOUBLE[],
        correlated_neurons_l1 DOUBLE[],
        correlated_features_indices INTEGER[],
        correlated_features_pearson DOUBLE[],
        correlated_features_l1 DOUBLE[],
        decoder_weights_dist DOUBLE[],
        PRIMARY KEY (sae, feature)
    )""",
    """CREATE TABLE neuronpedia_activations (
        sae              INTEGER NOT NULL,
        feature          INTEGER NOT NULL,
        id               VARCHAR NOT NULL,   -- Neuronpedia's activation id
        tokens           VARCHAR[] NOT NULL, -- the window's tokens, as Neuronpedia shows them
        "values"         DOUBLE[] NOT NULL,  -- the feature's activation at each of them
        max_value        DOUBLE NOT NULL,
        min_value        DOUBLE NOT NULL,
        max_value_token_index INTEGER NOT NULL,
        bin_min          DOUBLE,             -- the sampling group: -1 for the top activations, else a
        bin_max          DOUBLE,             -- quantile interval, with the share of activations inside
        bin_contains     DOUBLE,
        qualifying_token_index INTEGER,
        dfa_values       DOUBLE[],           -- direct feature attribution (attention SAEs)
        dfa_max_value    DOUBLE,
        dfa_target_index INTEGER,
        PRIMARY KEY (sae, feature, id)
    )""",
    """CREATE TABLE neuronpedia_explanations (
        sae              INTEGER NOT NULL,
        feature          INTEGER NOT NULL,
        id               VARCHAR NOT NULL,
        description      VARCHAR NOT NULL,
        type_name        VARCHAR,            -- how it was made ('oai_token-act-pair', 'np_max-act-logits', ...)
        explanation_model_name VARCHAR,      -- by which model ('gpt-4o-mini', ...)
        author_id        VARCHAR,
        embedding        FLOAT[],            -- Neuronpedia's embedding of the description, where exported
        folder           VARCHAR NOT NULL,   -- 'explanations', or the explanations-<model> folder it came from
        PRIMARY KEY (sae, feature, id)
    )""",
]

# v8: each SAE's sparsity and fidelity, measured by its ingestion over the run's counted tokens
# (ingest.quality: sae-lens 6.54's definitions), and, with `--evaluate`, the model's loss with the
# SAE spliced in; the registry's claimed L0 stays in saes.registry_l0.
_V8 = [
    """CREATE TABLE sae_quality (
        sae              INTEGER PRIMARY KEY,
        n_tokens         BIGINT NOT NULL,    -- the counted tokens measured on (BOS and padding left out)
        l0               DOUBLE,             -- token mean of the latents != 0
        l0_values        INTEGER[],          -- the L0 distribution: each L0 that occurred ...
        l0_counts        BIGINT[],           -- ... and on how many tokens
        l1               DOUBLE,             -- token mean of sum |f|
        mse              DOUBLE,             -- token mean of ||x - x_hat||^2 (summed over dimensions)
        explained_variance DOUBLE,           -- 1 - E||x - x_hat||^2 / total variance of x, pooled
        fvu              DOUBLE,             -- 1 - explained_variance
        cossim           DOUBLE,             -- token mean of cos(x, x_hat)
        l2_norm_in       DOUBLE,
        l2_norm_out      DOUBLE,
        l2_ratio         DOUBLE,             -- token mean of ||x_hat|| / ||x||
        relative_reconstruction_bias DOUBLE, -- E||x_hat||^2 / E(x . x_hat): below 1 is shrinkage
        dead_latents     INTEGER,            -- latents that never fired over these tokens
        dense_1pct       INTEGER,            -- latents firing on more than 1% of them
        dense_10pct      INTEGER,            -- ... and on more than 10%
        eval_tokens      BIGINT,             -- --evaluate: the tokens the losses are measured on
        ce_loss_clean    DOUBLE,             -- next-token cross-entropy of the model as it is,
        ce_loss_sae      DOUBLE,             -- with x_hat spliced in at the hook,
        ce_loss_ablated  DOUBLE,             -- with the hook zero-ablated
        ce_loss_score    DOUBLE,             -- (ablated - sae) / (ablated - clean): loss recovered
        delta_lm_loss    DOUBLE,             -- sae - clean (Gemma Scope's fidelity)
        kl_div_sae       DOUBLE,             -- KL(clean || with the SAE), token mean
        kl_div_ablated   DOUBLE,
        kl_div_score     DOUBLE              -- 1 - kl_div_sae / kl_div_ablated
    )""",
]

# v9: explanations. A sampled block keeps its text (ingest.blocks), where a feature's scorer finds
# text on which it never fired; saecat's own explanations (ingest.explain), each with its method
# and score, sit beside Neuronpedia's imported ones, and the view `explanations` reads both.
_V9 = [
    "ALTER TABLE blocks ADD COLUMN tokens VARCHAR[]",  # the block's tokens; NULL for SAEs ingested before v9
    """CREATE TABLE feature_explanations (
        sae              INTEGER NOT NULL,
        feature          INTEGER NOT NULL,
        explainer        VARCHAR NOT NULL,   -- the model that wrote it, as its endpoint names it
        method           VARCHAR NOT NULL,   -- how its prompt was made, with a version ('token-act-pair/1')
        explanation      VARCHAR NOT NULL,
        prompt_examples  INTEGER[],          -- the feature_examples ranks its prompt showed
        score            DOUBLE,             -- the scorer's balanced accuracy on held-out text; NULL: not scored
        score_method     VARCHAR,            -- 'detection/1'
        scorer           VARCHAR,            -- the model that scored it
        score_details    JSON,               -- the scorer's counts: tp, fp, tn, fn, failed prompts
        created_at       TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (sae, feature, explainer, method)
    )""",
    """CREATE OR REPLACE VIEW explanations AS
    SELECT sae, feature, explanation, 'saecat' AS source, explainer, method, score, score_method
    FROM feature_explanations
    UNION ALL
    SELECT sae, feature, description, 'neuronpedia', explanation_model_name, type_name, NULL, NULL
    FROM neuronpedia_explanations""",
]

# v10: an explanation names the ingestion whose examples it was made from (the SAE's ingested_at
# then). A re-ingestion keeps explanations, which describe the SAE's unchanged weights and cost
# LLM calls, but replaces the examples their prompt_examples ranks point into; a differing
# ingested_at says so (NULL: made before v10).
_V10 = ["ALTER TABLE feature_explanations ADD COLUMN ingested_at TIMESTAMP"]

# (version, statements). Append only; never edit a released entry.
MIGRATIONS: list[tuple[int, list[str]]] = [(1, _V1), (2, _V2), (3, _V3), (4, _V4), (5, _V5), (6, _V6), (7, _V7),
                                           (8, _V8), (9, _V9), (10, _V10)]

SCHEMA_VERSION = MIGRATIONS[-1][0]

# The labels of a feature: rows keyed by (sae, feature), ordered by their next column.
LABEL_TABLES = ("feature_tokens", "feature_examples", "feature_histograms")

# Tables with rows per SAE: replaced together when an SAE is re-ingested.
SAE_TABLES = ("features", "cooccurrence", *LABEL_TABLES, "blocks", "activation_spectrum", "sae_quality")

# Views over those tables, for convenience in SQL.
VIEWS = ("labelled_features", "feature_affinities", "spectrum_layers", "explanations")

# The results of the analyses, keyed by `analyses.analysis`.
ANALYSIS_TABLES = ("crystals", "crystal_sweep", "crystal_tasks", "lobes", "lobe_agreement", "lobe_documents", "spectra")

# What an import of a Neuronpedia source writes, replaced together when it is re-imported.
NEURONPEDIA_TABLES = ("neuronpedia_features", "neuronpedia_activations", "neuronpedia_explanations")

# The tables and views a user's SQL may read (the sandbox allow-list starts here).
QUERYABLE_TABLES = ("releases", "saes", *SAE_TABLES, "ingest_runs", "analyses", *ANALYSIS_TABLES, *VIEWS,
                    "registry_snapshots", "registry_changes", "watches", "neuronpedia_sources", *NEURONPEDIA_TABLES,
                    "feature_explanations")
