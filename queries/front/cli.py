"""The `saecat` command: thin glue that parses arguments and calls the Python API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console

from catalog.errors import SaecatError
from catalog.query import json_value
from queries.compare import Fidelity
from queries.front.output import Format, Rows, choose, emit, emit_sections

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A catalog of sparse-autoencoder features: ingest SAEs, then query them.")
# soft_wrap: a message is one line in a pipe or a log, not folded at rich's assumed 80 columns
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DbOpt = Annotated[Optional[Path], typer.Option("--db", help="Catalog file (default $SAECAT_DB or ./saecat.duckdb).")]
FormatOpt = Annotated[Optional[Format], typer.Option(
    "--format", help="table (the default at a terminal), tsv (the default in a pipe: a header line, then one line "
                     "per row, never wrapped), csv or json.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", help="Count on a Ray cluster (pip install 'saecat[ray]'): an address, 'auto' (the default with no "
                  "value: $RAY_ADDRESS or a running cluster) or 'local' (start one here).")]
ReleaseOpt = Annotated[str, typer.Option(help="Release of the SAE.")]
SaeIdOpt = Annotated[str, typer.Option(help="SAE id.")]


@app.command()
def ingest(
    dataset: Annotated[str, typer.Option(help="HF dataset name, or local files/folder/glob (txt, json/jsonl, parquet, csv).")],
    release: Annotated[Optional[str], typer.Option(help="sae-lens release, or hub repo id (owner/name).")] = None,
    sae_id: Annotated[Optional[str], typer.Option(help="SAE id in the release (a path in the repo).")] = None,
    sae_path: Annotated[Optional[Path], typer.Option(help="Local sae-lens folder (cfg.json + sae_weights.safetensors).")] = None,
    model: Annotated[Optional[str], typer.Option(help="transformer-lens model name or local HF folder (default: the SAE's).")] = None,
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    split: Annotated[str, typer.Option(help="Dataset split (hub datasets).")] = "train",
    max_tokens: Annotated[Optional[int], typer.Option(help="Stop after this many counted tokens.")] = None,
    max_doc_tokens: Annotated[int, typer.Option(help="Truncate each document to this many tokens, BOS included.")] = 1024,
    block_size: Annotated[int, typer.Option(help="Tokens per co-occurrence block; only full blocks count.")] = 256,
    threshold: Annotated[float, typer.Option(help="A feature fires where its activation is above this.")] = 0.0,
    fold_decoder_norm: Annotated[bool, typer.Option(help="Rescale decoder rows to unit norm first (Neuronpedia's scale).")] = False,
    top_k: Annotated[int, typer.Option(help="Top activating examples kept per feature.")] = 20,
    context_tokens: Annotated[int, typer.Option(help="Tokens of context on each side of an example.")] = 8,
    logit_k: Annotated[int, typer.Option(help="Logit-lens tokens per feature, top and bottom.")] = 10,
    group_column: Annotated[Optional[str], typer.Option(help="Dataset field kept with each sampled block (a.b for nested).")] = None,
    sample_blocks: Annotated[int, typer.Option(help="Full blocks kept in the `blocks` sample (0: none).")] = 4096,
    min_pair_blocks: Annotated[int, typer.Option(
        help="Store only pairs seen together in at least this many blocks (1: every co-occurring pair).")] = 1,
    top_partners: Annotated[Optional[int], typer.Option(
        help="Store only pairs among either feature's K best partners (default: no limit).")] = None,
    rank_partners_by: Annotated[str, typer.Option(help="Rank partners for --top-partners by n11 or phi.")] = "n11",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward batch.")] = 8192,
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between checkpoints.")] = 300.0,
    shard_batches: Annotated[int, typer.Option(
        help="Batches per shard: float sums restart per shard (a change moves their last bits); the unit of --ray work.")] = 64,
    ray: RayOpt = None,
    ray_task_shards: Annotated[int, typer.Option(help="With --ray: shards per task.")] = 8,
    memory_budget: Annotated[Optional[str], typer.Option(
        help="Memory the run may hold (512MB, 8GiB, ...; default: half of the machine's memory, or of the GPU's "
             "on CUDA). Pair counts stay in memory when they fit, else go through block sets on disk (same "
             "results).")] = None,
    evaluate: Annotated[bool, typer.Option(
        help="Also measure the model's next-token loss with the SAE spliced in and with the hook zero-ablated "
             "(CE loss recovered, delta LM loss, KL): three passes of the whole model over --evaluate-tokens.")] = False,
    evaluate_tokens: Annotated[int, typer.Option(
        help="With --evaluate: the counted tokens evaluated, whole batches from the start of the stream (20,480: "
             "sae-lens' default).")] = 20480,
    force: Annotated[bool, typer.Option(help="Re-ingest an SAE already in the catalog (replaces its rows).")] = False,
    restart: Annotated[bool, typer.Option(help="Ignore an interrupted run's checkpoint and start over.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load an SAE and its model, run it over a dataset, and record every feature in the catalog."""
    from ingest import IngestOptions, ingest as run_ingest, resolve_source

    source = resolve_source(release, sae_id, str(sae_path) if sae_path else None)
    opts = IngestOptions(dataset=dataset, text_column=text_column, split=split, model=model,
                         max_tokens=max_tokens, max_doc_tokens=max_doc_tokens, block_size=block_size,
                         threshold=threshold, fold_decoder_norm=fold_decoder_norm, top_k=top_k,
                         context_tokens=context_tokens, logit_k=logit_k, group_column=group_column,
                         sample_blocks=sample_blocks, min_pair_blocks=min_pair_blocks,
                         top_partners=top_partners, rank_partners_by=rank_partners_by,
                         shard_batches=shard_batches, device=device,
                         batch_tokens=batch_tokens, checkpoint_every_s=checkpoint_every,
                         progress=progress and not as_json and sys.stderr.isatty(), ray=ray,
                         ray_task_shards=ray_task_shards, memory_budget=memory_budget,
                         evaluate_tokens=evaluate_tokens if evaluate else 0)
    result = run_ingest(source, opts, db=db, force=force, restart=restart)
    if as_json:
        print(json.dumps(result.__dict__))
    elif result.status == "exists":
        out.print(f"({result.release}, {result.sae_id}) is already in the catalog as sae {result.sae}; "
                  "--force re-ingests it")
    else:
        out.print(f"ingested ({result.release}, {result.sae_id}) as sae {result.sae}: {result.n_tokens:,} tokens, "
                  f"{result.n_blocks:,} blocks, {result.n_pairs:,} co-occurring pairs in {result.seconds:.1f}s")


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="One SELECT over the catalog tables (saes, features, cooccurrence, ...).")],
    dialect: Annotated[Optional[str], typer.Option(help="Write the query in this SQL dialect (e.g. postgres).")] = None,
    fmt: Annotated[Optional[Literal["table", "tsv", "csv", "json", "arrow"]], typer.Option(
        "--format", help="table (the default at a terminal), tsv (the default in a pipe), csv, json (a list of "
                         "objects), or arrow (an Arrow IPC stream).")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write tsv, csv, json or arrow here instead of to stdout.")] = None,
    max_rows: Annotated[int, typer.Option(help="Return at most this many rows (stderr says when more matched).")] = 1000,
    timeout: Annotated[float, typer.Option(help="Interrupt the query after this many seconds.")] = 30.0,
    memory_limit: Annotated[Optional[str], typer.Option(
        "--memory-limit", help="Stop the query past this much memory, e.g. 512MB or 2GB (default $SAECAT_QUERY_MEMORY, "
                               "else an eighth of RAM, at most 4 GiB).")] = None,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
) -> None:
    """Run a read-only SQL query over the catalog."""
    from catalog import Catalog

    if output is not None and fmt in (None, "table") and not as_json:
        raise SaecatError("--output needs --format tsv, csv, json or arrow")
    fmt = choose(fmt, as_json)
    if fmt == "arrow" and output is None and sys.stdout.isatty():
        raise SaecatError("arrow output is binary: redirect stdout or use --output FILE")
    with Catalog.open(db) as cat:
        result = cat.sql(query, dialect=dialect, max_rows=max_rows, timeout_s=timeout,
                         memory_limit=query_memory(memory_limit))
    if result.truncated:
        err.print(f"note: more than {max_rows} rows matched; only the first {max_rows} are returned (--max-rows)",
                  highlight=False)
    if fmt == "table":
        emit(Rows(result.columns, result.rows), fmt)
        return
    text = {"json": lambda: result.to_json() + "\n", "csv": result.to_csv, "tsv": result.to_tsv}
    data = result.to_ipc() if fmt == "arrow" else text[fmt]().encode()
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        output.write_bytes(data)


def _print_query(db: Path | None, query: str, fmt: str) -> None:
    """Run one of saecat's own read queries and print its rows."""
    from catalog import Catalog

    with Catalog.open(db) as cat:
        rel = cat.con.sql(query)
        emit(Rows(rel.columns, rel.fetchall()), fmt)


@app.command()
def saes(
    registered: Annotated[bool, typer.Option(
        "--registered", help="Also the SAEs a registry sync registered but nobody ingested yet.")] = False,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the ingested SAEs in the catalog, with their measured L0 beside the registry's and their fidelity."""
    where = "" if registered else "WHERE status = 'ready' "
    _print_query(db, "SELECT sae, release, sae_id, model, hook_name, d_in, d_sae, architecture, status, "
                     "s.n_tokens, q.l0, registry_l0, q.explained_variance, q.dead_latents, q.delta_lm_loss, "
                     "threshold, pair_min_blocks, pair_top_partners, pair_rank_by, pairs_complete, "
                     f"ingested_at FROM saes s LEFT JOIN sae_quality q USING (sae) {where}ORDER BY sae",
                 choose(fmt, as_json))


@app.command()
def compare(
    release: Annotated[Optional[str], typer.Option(help="Only this release's SAEs.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Only this model's SAEs (e.g. gemma-2-2b).")] = None,
    hook: Annotated[Optional[str], typer.Option(
        help="Only hooks matching this glob (case-sensitive; * any characters, ? one), e.g. 'blocks.12.*'.")] = None,
    fidelity: Annotated[Fidelity, typer.Option(
        help="The reconstruction figure: fvu (lower is better; measured with L0), explained_variance (higher), mse "
             "(lower), or after --evaluate delta_lm_loss (lower), ce_loss_score or kl_div_score (higher).")] = "fvu",
    figure: Annotated[Optional[Path], typer.Option(
        help="Also draw fidelity against L0 here (.png or .svg), each site's frontier joined by a line.")] = None,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which SAE reconstructs a site best for its sparsity: each SAE's measured L0 and fidelity, pareto
    marking those on the frontier of (lower L0, better fidelity) at their site (model and hook; SAEs
    at different sites are not compared). SAEs without the figure are listed, never on the frontier."""
    from catalog import Catalog
    from queries.compare import compare as run_compare, plot

    with Catalog.open(db) as cat:
        result = run_compare(cat, release=release, model=model, hook=hook, fidelity=fidelity)
    if figure is not None:
        _say(f"figure written to {plot(result, figure)}")
    emit(_rows(result.table, f"{result.fidelity} ({result.direction}) against L0; pareto: on its site's frontier"),
         choose(fmt, as_json))


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="What the features should be about, in words.")],
    release: Annotated[Optional[str], typer.Option(help="Only this release's SAEs.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Only this model's SAEs.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many features.")] = 10,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Features whose explanations are nearest TEXT in meaning (saecat's and Neuronpedia's explanations)."""
    from catalog import Catalog
    from queries.search import COLUMNS, search as run_search

    fmt = choose(fmt, as_json)
    with Catalog.open(db) as cat:
        hits = run_search(cat, text, k=k, release=release, model=model, progress=fmt == "table")
    emit(Rows(list(COLUMNS), [tuple(h[c] for c in COLUMNS) for h in hits], title=f"explanations nearest {text!r}"), fmt)


@app.command()
def runs(db: DbOpt = None, fmt: FormatOpt = None, as_json: JsonOpt = False) -> None:
    """List ingestion runs: status, progress and errors."""
    _print_query(db, "SELECT run, release, sae_id, status, n_documents, n_tokens, started_at, finished_at, "
                     "error FROM ingest_runs ORDER BY run", choose(fmt, as_json))


# ------------------------------------------------------------------------ registry and watch list

RegistryOpt = Annotated[Optional[str], typer.Option(
    help="Registry YAML file or URL (default: the one the installed sae-lens ships).")]


def _say(line: str) -> None:
    err.print(line, highlight=False, soft_wrap=True)


@app.command()
def sync(
    registry: RegistryOpt = None,
    ingest_watched: Annotated[bool, typer.Option("--ingest", help="Then ingest the watched SAEs not ready yet.")] = False,
    ray: RayOpt = None,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register every release and SAE of the sae-lens registry (no weights read), record what
    changed since the last sync, and with --ingest ingest the watched ones."""
    from ingest.sync import sync as run_sync

    fmt = choose(fmt, as_json)
    result = run_sync(db, registry, ingest=ingest_watched, progress=fmt == "table", report=_say, ray=ray)
    for line in result.problems:
        _say(f"[yellow]skipped:[/yellow] {line}")
    emit(Rows(["what", "count"], [*result.counts().items(), ("ingested", len(result.ingested)),
                                  ("failed", len(result.failed))], title=f"sync {result.snapshot}"), fmt)
    if result.failed:
        raise typer.Exit(1)


@app.command()
def releases(
    new: Annotated[bool, typer.Option("--new", help="Only what the last sync found added: releases and SAEs.")] = False,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Releases in the catalog with their SAE counts; --new lists what appeared at the last sync."""
    fmt = choose(fmt, as_json)
    if new:
        _print_query(db, "SELECT c.kind, c.release, c.sae_id, s.model, s.hook_name, s.d_sae AS width, s.registry_l0, "
                         "q.l0 AS measured_l0 FROM registry_changes c LEFT JOIN saes s USING (release, sae_id) "
                         "LEFT JOIN sae_quality q USING (sae) "
                         "WHERE c.action = 'added' AND c.snapshot = (SELECT max(snapshot) FROM registry_snapshots) "
                         "ORDER BY c.kind, c.release, c.sae_id", fmt)
        return
    _print_query(db, "SELECT r.release, r.model, r.repo_id, count(s.sae) AS saes, "
                     "count(s.sae) FILTER (WHERE s.status = 'ready') AS ready "
                     "FROM releases r LEFT JOIN saes s USING (release) GROUP BY ALL ORDER BY r.release", fmt)


@app.command()
def explain(
    release: ReleaseOpt,
    sae_id: SaeIdOpt,
    explainer: Annotated[str, typer.Option(
        help="An OpenAI-compatible endpoint's base URL (http://host:port/v1; key from $SAECAT_EXPLAINER_KEY or "
             "$OPENAI_API_KEY), or a local transformers model: hub name, folder or .gguf file.")],
    explainer_model: Annotated[Optional[str], typer.Option(help="The model the endpoint serves.")] = None,
    scorer: Annotated[Optional[str], typer.Option(help="Score with another endpoint or model (default: the explainer).")] = None,
    scorer_model: Annotated[Optional[str], typer.Option(help="The model the scorer's endpoint serves.")] = None,
    where: Annotated[Optional[str], typer.Option(
        help="SQL condition choosing features, over labelled_features (e.g. 'density BETWEEN 1e-4 AND 1e-2').")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many features (lowest ids first).")] = None,
    prompt_examples: Annotated[int, typer.Option(help="Top examples in the explainer's prompt.")] = 10,
    logit_tokens: Annotated[int, typer.Option(help="Also show the feature's top logit-lens tokens (0: no).")] = 0,
    score: Annotated[bool, typer.Option(help="Score each explanation on held-out text (detection).")] = True,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take before it is retried.")] = 120.0,
    retries: Annotated[int, typer.Option(help="Retries of a request (rate limits, errors, timeouts), with backoff.")] = 5,
    force: Annotated[bool, typer.Option(help="Explain again features this explainer already explained.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the first prompt and the number of calls; call nothing.")] = False,
    device: Annotated[str, typer.Option(help="Device of a local model.")] = "cpu",
    db: DbOpt = None,
) -> None:
    """Explain features with an LLM and score the explanations (saved in feature_explanations)."""
    from ingest.explain import ExplainOptions, calls, explain as run_explain, plan
    from ingest.explainers import open_explainer

    opts = ExplainOptions(where=where, limit=limit, prompt_examples=prompt_examples, logit_tokens=logit_tokens,
                          score=score, concurrency=concurrency, force=force, progress=not dry_run)
    if dry_run:
        name = explainer_model or explainer
        _, tasks, summary = plan(db, release, sae_id, name, opts)
        if tasks:
            for message in tasks[0].explain_prompt():
                out.print(f"[bold]{message['role']}[/bold]", highlight=False)
                out.print(message["content"], markup=False, highlight=False)
        _say(f"{len(tasks)} features to explain ({summary.done_before} done before, {summary.no_examples} never "
             f"fired): {sum(calls(t, opts) for t in tasks)} calls")
        return
    model = open_explainer(explainer, explainer_model, timeout=timeout, retries=retries, device=device)
    grader = open_explainer(scorer, scorer_model, timeout=timeout, retries=retries, device=device) if scorer else None
    summary = run_explain(db, release, sae_id, model, grader, opts)
    mean = "" if summary.mean_score is None else f", mean score {summary.mean_score:.3f}"
    _say(f"explained {summary.explained} of {summary.selected} features{mean}; {summary.done_before} done before, "
         f"{summary.no_examples} never fired, {summary.unparsed} answers without an explanation, "
         f"{summary.failed} failed (run again to retry them)")
    if summary.stale:
        _say(f"{summary.stale} of the features done before were explained from the examples of an earlier ingestion "
             "of this SAE: --force explains them again")
    for error in dict.fromkeys(summary.errors):
        _say(f"  {error}")


import_app = typer.Typer(no_args_is_help=True, help="Bring features computed elsewhere into the catalog.")
app.add_typer(import_app, name="import")


@import_app.command("neuronpedia")
def import_neuronpedia(
    location: Annotated[str, typer.Argument(help="A Neuronpedia export: a local source folder "
                                                 "(v1/<modelId>/<sourceId>), model folder or v1/, or the same in "
                                                 "the bucket (s3://neuronpedia-datasets/v1/..., or https://).")],
    download_to: Annotated[Optional[Path], typer.Option(
        help="Where a bucket prefix is downloaded (default: beside the catalog); a rerun reuses it.")] = None,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import Neuronpedia's exported features, top activations and explanations, each source into
    its catalog SAE (through the registry's neuronpedia id) or an SAE of its own."""
    from ingest.neuronpedia import RELEASE_PREFIX, import_neuronpedia as run_import

    fmt = choose(fmt, as_json)
    done = run_import(location, db, progress=fmt == "table", download_to=download_to)
    emit(Rows(["source", "sae", "release", "sae_id", "status", "features", "activations", "explanations"],
              [(d.ref, d.sae, d.release, d.sae_id, d.status, d.n_features, d.n_activations, d.n_explanations)
               for d in done], title=f"imported from {location}"), fmt)
    for d in done:
        if d.status == "ready":
            continue
        if d.release.startswith(RELEASE_PREFIX):
            _say(f"{d.ref}: no sae-lens registry entry names it, so no decoder vectors")
        else:
            _say(f"{d.ref}: no decoder vectors until its weights are ingested "
                 f"(saecat ingest --release {d.release} --sae-id {d.sae_id} --dataset ...)")


watch_app = typer.Typer(no_args_is_help=True, help="The watch list: which registered SAEs `sync --ingest` ingests.")
app.add_typer(watch_app, name="watch")


@watch_app.command("add")
def watch_add(
    dataset: Annotated[str, typer.Option(help="Dataset to ingest the selected SAEs over (as for ingest).")],
    release: Annotated[str, typer.Option(help="Glob over release names.")] = "*",
    model: Annotated[Optional[str], typer.Option(help="The SAEs' model, exactly (e.g. gpt2-small).")] = None,
    hook: Annotated[Optional[str], typer.Option(help="Glob over hook names, e.g. 'blocks.*.hook_resid_pre'.")] = None,
    min_width: Annotated[Optional[int], typer.Option(help="Fewest features.")] = None,
    max_width: Annotated[Optional[int], typer.Option(help="Most features.")] = None,
    min_l0: Annotated[Optional[float], typer.Option(help="Lowest L0 the registry states.")] = None,
    max_l0: Annotated[Optional[float], typer.Option(help="Highest L0 the registry states.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Tokens to ingest each over.")] = None,
    option: Annotated[list[str], typer.Option(help="Any other ingestion option, NAME=JSON (e.g. group_column='\"kind\"').")] = [],
    db: DbOpt = None,
) -> None:
    """Watch registered SAEs: those matching every criterion given are ingested by `sync --ingest`."""
    from ingest.sync import Watch, add_watch

    options: dict = {"dataset": dataset}
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    for item in option:
        name, _, value = item.partition("=")
        try:
            options[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[name.strip()] = value
    key = add_watch(db, Watch(options, release, model, hook, min_width, max_width, min_l0, max_l0))
    out.print(f"watch {key} added")


@watch_app.command("list")
def watch_list(db: DbOpt = None, fmt: FormatOpt = None, as_json: JsonOpt = False) -> None:
    """The watches, with how many registered SAEs each selects and how many are ready."""
    from catalog import Catalog
    from ingest.sync import watches

    with Catalog.open(db) as cat:
        rows = watches(cat)
    emit(Rows(["watch", "release", "model", "hook", "min_width", "max_width", "min_l0", "max_l0", "options", "selects",
               "ready"], [tuple(row.values()) for row in rows], title="watch list"), choose(fmt, as_json))


@watch_app.command("remove")
def watch_remove(key: Annotated[int, typer.Argument(help="The watch's number (see watch list).")],
                 db: DbOpt = None) -> None:
    """Stop watching: SAEs already ingested stay."""
    from ingest.sync import remove_watch

    remove_watch(db, key)
    out.print(f"watch {key} removed")


@app.command()
def schedule(
    every: Annotated[str, typer.Option(help="Interval: a number and s, m, h or d (e.g. 6h).")] = "6h",
    registry: RegistryOpt = None,
    ray: RayOpt = None,
    db: DbOpt = None,
) -> None:
    """Run `sync --ingest` now and then every interval, in the foreground (a service; Ctrl-C stops).
    A killed round is picked up by the next: ingestions resume from their checkpoints."""
    from ingest.sync import parse_every, schedule as run_schedule

    run_schedule(db, parse_every(every), registry, report=_say, ray=ray)


@app.command()
def status(db: DbOpt = None, fmt: FormatOpt = None, as_json: JsonOpt = False) -> None:
    """What sync and ingestion are doing: the running sync, running, failed and queued SAEs."""
    from ingest.sync import sync_status

    state = sync_status(db)
    fmt = choose(fmt, as_json)
    if fmt == "json":
        print(json.dumps(json_value(state)))
        return
    holder, last = state["sync"], state["last_sync"]
    notes = [f"sync: {'running, ' + json.dumps(holder) if holder else 'not running'}"]
    if last:
        notes.append(f"last sync: {last['synced_at']} ({last['source']}: {last['n_releases']} releases, "
                     f"{last['n_saes']} SAEs); {state['watched']} SAEs watched")
    emit_sections([
        *notes,
        Rows(["run", "release", "sae_id", "pid", "alive", "tokens", "since", "plan"],
             [(r["run"], r["release"], r["sae_id"], r["pid"], r["alive"], r["n_tokens"], r["started_at"], r["plan"])
              for r in state["running"]], title="running (alive = its process still runs)"),
        Rows(["release", "sae_id", "failures", "last error", "retry at"],
             [(r["release"], r["sae_id"], r["failures"], r["last_error"], r["retry_at"]) for r in state["failed"]],
             title="failed"),
        Rows(["release", "sae_id", "watch"], [(r["release"], r["sae_id"], r["watch"]) for r in state["queued"]],
             title="queued for the next sync"),
        f"done: {len(state['done'])} ingestion runs",
    ], fmt)


export_app = typer.Typer(no_args_is_help=True, help="Write the catalog, or one SAE, in another format.")
app.add_typer(export_app, name="export")


@export_app.command("parquet")
def export_parquet(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write Parquet files into.")],
    release: Annotated[Optional[str], typer.Option(help="Export only this SAE (with --sae-id).")] = None,
    sae_id: Annotated[Optional[str], typer.Option(help="SAE id, with --release.")] = None,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the catalog (or one SAE) to Parquet: per table, per SAE (hive layout, sae=<key>)."""
    from catalog import Catalog
    from catalog.export import export_parquet as write

    if (release is None) != (sae_id is None):
        raise SaecatError("name an SAE with both --release and --sae-id, or neither to export all")
    with Catalog.open(db) as cat:
        keys = [cat.find_sae(release, sae_id).sae] if release is not None else None
        written = write(cat, out_dir, keys)
    emit(Rows(["file", "rows"], sorted(written.items()), title=f"exported to {out_dir}"), choose(fmt, as_json))


@export_app.command("neuronpedia")
def export_neuronpedia(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write <modelId>/<sourceId>/ into.")],
    release: ReleaseOpt,
    sae_id: SaeIdOpt,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one SAE as a Neuronpedia export folder (features, activations, explanations), checked
    against the rules of Neuronpedia's importer."""
    from catalog import Catalog
    from catalog.neuronpedia import export_neuronpedia as write

    with Catalog.open(db) as cat:
        folder = write(cat, cat.find_sae(release, sae_id, ready=False).sae, out_dir)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    emit(Rows(["file", "bytes"], [(str(p.relative_to(out_dir)), p.stat().st_size) for p in files],
              title=f"exported to {folder}"), choose(fmt, as_json))


@app.command()
def neighbors(
    features: Annotated[list[int], typer.Argument(help="Feature indices in the SAE (one search for all).")],
    sae_id: SaeIdOpt,
    release: ReleaseOpt = "local",
    k: Annotated[int, typer.Option("-k", help="How many neighbours per feature.")] = 10,
    scope: Annotated[Literal["sae", "model", "others"], typer.Option(
        help="sae: the same SAE; model: every SAE of the same model and d_in; others: those but this one.")] = "sae",
    approximate: Annotated[bool, typer.Option(help="Search approximate indexes (HNSW, IVF from 16,384 latents); stderr reports their recall@k.")] = False,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Features nearest to each FEATURE by decoder cosine (FAISS; exact unless --approximate),
    with their density and labels (top logit-lens tokens, top example token)."""
    from catalog import Catalog
    from queries.neighbors import neighbors as find_neighbors

    if k < 1:
        raise SaecatError("-k must be at least 1")
    with Catalog.open(db) as cat:
        record = cat.find_sae(release, sae_id)
        table = find_neighbors(cat, record.sae, features, k, scope, approximate=approximate)
    recall = (table.schema.metadata or {}).get(b"recall")
    if recall is not None:
        err.print(f"approximate search: recall@{k} {float(recall):.3f} against exact search on a sample",
                  highlight=False)
    emit(_rows(table, f"neighbours of feature{'s' if len(features) > 1 else ''} {', '.join(map(str, features))}"),
         choose(fmt, as_json))


def _rows(table, title: str, name: str | None = None) -> Rows:
    """An Arrow table's rows, to print."""
    return Rows(table.column_names, [tuple(r.values()) for r in table.to_pylist()], title, name)


def _on_sae(db: Path | None, release: str, sae_id: str, k: int, query):
    """query(catalog, SAE key) on the named SAE, once -k is checked."""
    from catalog import Catalog

    if k < 1:
        raise SaecatError("-k must be at least 1")
    with Catalog.open(db) as cat:
        return query(cat, cat.find_sae(release, sae_id).sae)


ModelOpt = Annotated[Optional[str], typer.Option(
    help="transformer-lens model name or local HF folder (default: the one the SAE was ingested with).")]


@app.command()
def concept(
    text: Annotated[str, typer.Argument(help="Text to run through the model and the SAE.")],
    sae_id: SaeIdOpt,
    release: ReleaseOpt = "local",
    k: Annotated[int, typer.Option("-k", help="How many neighbours per fired feature.")] = 10,
    model: ModelOpt = None,
    db: DbOpt = None,
    fmt: Annotated[Optional[Format], typer.Option(
        "--format", help="table (the default at a terminal), tsv (the default in a pipe), csv, or json: one "
                         "object, {fired, neighbors}.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The features that fire on the last token of TEXT, strongest first, and their neighbours in the SAE."""
    from queries.neighbors import concept as find_concept

    fired, near = _on_sae(db, release, sae_id, k, lambda cat, sae: find_concept(cat, sae, text, k, model=model))
    emit_sections([_rows(fired, "features fired on the last token", "fired"),
                   _rows(near, "their neighbours", "neighbors")], choose(fmt, as_json))


@app.command()
def token(
    token: Annotated[str, typer.Argument(help="One token of the model's tokenizer (text, e.g. ' the').")],
    sae_id: SaeIdOpt,
    release: ReleaseOpt = "local",
    k: Annotated[int, typer.Option("-k", help="How many features.")] = 10,
    model: ModelOpt = None,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Features whose decoder directions are nearest TOKEN's unembedding direction."""
    from queries.neighbors import token_direction

    table = _on_sae(db, release, sae_id, k, lambda cat, sae: token_direction(cat, sae, token, k, model=model))
    emit(_rows(table, f"features nearest the direction of {token!r}"), choose(fmt, as_json))


# ------------------------------------------------------------------------------- analyses

FigureOpt = Annotated[Optional[Path], typer.Option(help="Also draw the figure here (.png or .svg).")]
ForceOpt = Annotated[bool, typer.Option(help="Recompute even if the catalog holds this result already.")]
RowsOpt = Annotated[int, typer.Option(help="Rows of each result table to print (--json prints all).")]


def _ints(text: str | None) -> list[int] | None:
    """'2,3,4' -> [2, 3, 4]."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SaecatError(f"expected comma-separated integers, got {text!r}") from None


def _params(kind: str, **given):
    """The kind's parameters: the options the user gave, the analysis's defaults for the rest."""
    from queries.analyses import make_params

    return make_params(kind, {k: v for k, v in given.items() if v is not None and v != []})


def _show(result, fmt: str, rows: int, figure: Path | None) -> None:
    """Print an analysis: its headline figures and the first rows of each result table (JSON: all
    of it, as the analysis's own JSON)."""
    if figure is not None:
        from queries.analyses import plot

        plot(result, figure)
    if fmt == "json":
        print(json.dumps(result.to_json()))
        return
    origin = "from the catalog" if result.cached else f"computed in {result.seconds:.1f}s"
    scalars = [(k, v) for k, v in _flat(result.summary) if not isinstance(v, list) or len(v) <= 8]
    emit_sections([
        Rows(["summary", "value"], scalars, f"{result.kind} of ({result.release}, {result.sae_id}): "
                                            f"analysis {result.analysis}, {origin}"),
        *(_rows(table.slice(0, rows), f"{name} (first {min(rows, table.num_rows)} of {table.num_rows} rows)")
          for name, table in result.tables.items()),
        *([f"figure written to {figure}"] if figure is not None else []),
    ], fmt)


def _flat(value, prefix: str = ""):
    """Nested summary dicts as (dotted key, value) pairs."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), value


@app.command()
def lobes(
    sae_id: SaeIdOpt,
    release: ReleaseOpt = "local",
    affinity: Annotated[list[str], typer.Option(
        help="Co-occurrence affinity: smc, jaccard, dice, overlap, phi (default) or pmi; repeat for several.")] = [],
    n_lobes: Annotated[Optional[str], typer.Option(help="Numbers of lobes, comma-separated (default 2,3,4,8).")] = None,
    permutations: Annotated[Optional[int], typer.Option(help="Permutations for the AMI null (default 100).")] = None,
    null_repeats: Annotated[Optional[int], typer.Option(help="Random-vector draws for the accuracy null (default 5).")] = None,
    knn: Annotated[Optional[int], typer.Option(help="Sparsify affinities to each feature's k strongest (wide SAEs).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default 42).")] = None,
    force: ForceOpt = False,
    figure: FigureOpt = None,
    rows: RowsOpt = 20,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Lobes: clusters of co-occurring features, against clusters of their decoder directions.

    Spectral clustering of a co-occurrence affinity and of the decoder angles; their agreement
    (AMI with a permutation null, decoder -> lobe regression with a random-vector null), and the
    documents each lobe wins."""
    from queries import lobes as analysis

    params = _params("lobes", affinities=affinity, n_lobes=_ints(n_lobes), permutations=permutations,
                     null_repeats=null_repeats, knn=knn, seed=seed)
    _show(analysis.run(db, release, sae_id, params=params, force=force), choose(fmt, as_json), rows, figure)


@app.command()
def spectra(
    release: Annotated[Optional[str], typer.Option(help="Release of the SAE; alone, every layer of the release.")] = None,
    sae_id: Annotated[Optional[str], typer.Option(help="One SAE of --release.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Every layer of this model's SAEs (instead of --release).")] = None,
    hook: Annotated[Optional[str], typer.Option(help="With --model: hooks matching this glob only.")] = None,
    rank_min: Annotated[Optional[int], typer.Option(help="First rank of the power-law fit (default 11).")] = None,
    rank_max: Annotated[Optional[int], typer.Option(help="Last rank of the power-law fit (default 150).")] = None,
    entropy_rows: Annotated[Optional[int], typer.Option(help="Rows subsampled for the clustering entropy (default 5000).")] = None,
    entropy_dims: Annotated[Optional[int], typer.Option(help="PCA dimensions for the entropy (default 100).")] = None,
    normalize: Annotated[Optional[bool], typer.Option(help="Unit-normalise decoder rows first (default no).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default 0).")] = None,
    force: ForceOpt = False,
    figure: FigureOpt = None,
    rows: RowsOpt = 20,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Spectra: the shape of the decoder point cloud, per SAE or per layer.

    The power-law exponent of its covariance spectrum with an isotropic null of the same shape,
    and its clustering entropy with a Gaussian null of the same covariance."""
    from queries import spectra as analysis

    params = _params("spectra", rank_min=rank_min, rank_max=rank_max, entropy_rows=entropy_rows,
                     entropy_dims=entropy_dims, normalize=normalize, seed=seed)
    if sae_id is not None:
        if release is None:
            raise SaecatError("--sae-id needs --release")
        _show(analysis.run(db, release, sae_id, params=params, force=force), choose(fmt, as_json), rows, figure)
        return
    if (release is None) == (model is None):
        raise SaecatError("name one SAE (--release and --sae-id), a release (--release) or a model (--model)")
    results = analysis.layers(db, release=release, model=model, hook=hook, params=params, force=force)
    if figure is not None:
        analysis.plot_layers(results, figure)
    fmt = choose(fmt, as_json)
    if fmt == "json":
        print(json.dumps([r.to_json() for r in results]))
        return
    keys = ("alpha", "alpha_low", "alpha_high", "null_alpha", "activation_alpha", "negentropy", "null_negentropy")
    emit_sections([
        Rows(["analysis", "sae_id", "layer", *keys],
             [(r.analysis, r.sae_id, r.inputs.get("layer", r.summary.get("layer")), *(r.summary.get(k) for k in keys))
              for r in results], f"spectra by layer of {release or model}"),
        *([f"figure written to {figure}"] if figure is not None else []),
    ], fmt)


@app.command()
def crystals(
    sae_id: SaeIdOpt,
    release: ReleaseOpt = "local",
    shape: Annotated[Optional[str], typer.Option(help="parallelogram (default) or trapezoid.")] = None,
    distractor: Annotated[list[str], typer.Option(
        help="Direction to project out first: pc:N, feature:I, file:PATH.npy (SAE search), length (word pairs); "
             "repeat for several.")] = [],
    top: Annotated[Optional[int], typer.Option(help="Crystals kept (default 100).")] = None,
    pairs_per_feature: Annotated[Optional[int], typer.Option(help="Candidate pairs per feature: its nearest (default 8).")] = None,
    words: Annotated[Optional[str], typer.Option(
        help="Word-pair mode: 'builtin' or a file of pairs (TSV task, a, b; or the Google analogy format).")] = None,
    task: Annotated[list[str], typer.Option(help="Word-pair mode: only this task; repeat for several.")] = [],
    lda: Annotated[Optional[str], typer.Option(help="Word-pair mode: LDA components to sweep, comma-separated.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default 0).")] = None,
    force: ForceOpt = False,
    figure: FigureOpt = None,
    rows: RowsOpt = 20,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Crystals: analogy parallelograms and trapezoids, among decoder directions or word pairs.

    Without --words: an index-driven search of the SAE's decoder directions, scored before and
    after projecting out distractor directions. With --words: the crystal quality of labelled word
    pairs in the model's activations and the SAE's codes, with LDA and distractor removal."""
    if words is not None:
        from queries import word_pairs as analysis

        params = _params("word_pairs", pairs=words, tasks=task, distractors=distractor, lda_components=_ints(lda),
                         seed=seed)
    else:
        if task or lda:
            raise SaecatError("--task and --lda belong to word-pair mode (--words)")
        from queries import crystals as analysis

        params = _params("crystals", shape=shape, distractors=distractor, top=top,
                         pairs_per_feature=pairs_per_feature, seed=seed)
    _show(analysis.run(db, release, sae_id, params=params, force=force), choose(fmt, as_json), rows, figure)


@app.command()
def analyses(
    kind: Annotated[Optional[str], typer.Option(help="Only this kind: crystals, word_pairs, lobes, spectra.")] = None,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the analyses stored in the catalog, newest first."""
    from catalog import Catalog
    from queries.analyses import list_analyses

    with Catalog.open(db) as cat:
        table = list_analyses(cat, kind)
    fmt = choose(fmt, as_json)
    emit(_rows(table if fmt == "json" else table.drop_columns(["params", "summary"]), "stored analyses"), fmt)


@app.command()
def analysis(
    key: Annotated[int, typer.Argument(help="The analysis's key (see saecat analyses).")],
    figure: FigureOpt = None,
    rows: RowsOpt = 20,
    db: DbOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a stored analysis, and draw its figure again without recomputing it."""
    from catalog import Catalog
    from queries.analyses import load_analysis

    with Catalog.open(db) as cat:
        result = load_analysis(cat, key)
    _show(result, choose(fmt, as_json), rows, figure)


@app.command()
def tour(
    sae_id: SaeIdOpt,
    release: ReleaseOpt = "local",
    figures: Annotated[Optional[Path], typer.Option(help="Folder to draw the analyses' figures in.")] = None,
    top: Annotated[int, typer.Option(help="How many of the most frequent features to show.")] = 8,
    k: Annotated[int, typer.Option("-k", help="How many neighbours of the most frequent feature.")] = 5,
    db: DbOpt = None,
    fmt: FormatOpt = None,
) -> None:
    """A first look at one SAE: features worth reading, a neighbour lookup, the best crystal, the
    lobes at n = 2 and what text each wins, the spectrum's power law, and where to browse it."""
    from queries.browse import SHOWCASE_DENSITY
    from queries.front.pages import feature_url
    from queries.front.tour import tour as take_tour

    if top < 1 or k < 1:
        raise SaecatError("--top and -k must be at least 1")
    seen = take_tour(db, release, sae_id, figures=figures, top=top, k=k)
    s, c, sp = seen.sae, seen.crystal, seen.spectrum.summary
    sections: list = [
        f"{s['release']} / {s['sae_id']}: {s['d_sae']} features at {s['hook_name']} of {s['model']}, "
        f"{s['n_tokens']:,} tokens ingested",
        *([_quality_line(s)] if s["l0"] is not None else []),
        _rows(seen.features, f"features worth a look: density {SHOWCASE_DENSITY[0]:.1%} to {SHOWCASE_DENSITY[1]:.0%}, "
              "their top examples agreeing on the word they fire on", "features"),
        _rows(seen.neighbors.select(["feature", "cosine", "density", "top_tokens", "top_example"]),
              f"nearest neighbours of feature {seen.features.column('feature')[0].as_py()} by decoder cosine",
              "neighbors"),
    ]
    if c is None:
        sections.append("no crystal kept")
    else:
        sections.append(Rows(["role", "feature", "top tokens"],
                             [(role, c[col], " ".join(c[f"{col}_tokens"][:5])) for role, col in
                              (("a", "a"), ("b (b - a ~ d - c)", "b"), ("c", "c"), ("d", "d"))],
                             f"the best {c['shape']}: error {c['error']:.3f} (before distractor removal "
                             f"{c['error_before']:.3f}), cosine {c['cosine']:.3f}", "crystal"))
    sections.append(Rows(["lobe", "features", "blocks won", "groups among them"],
                         [tuple(r.values()) for r in seen.lobe_rows()],
                         "two lobes of the co-occurrence graph (phi), and the sampled blocks each wins", "lobes"))
    if sp.get("alpha") is None:
        sections.append(f"decoder spectrum: no power law fitted ({', '.join(sp.get('notes') or []) or 'too few features'})")
    else:
        null = "n/a" if sp.get("null_alpha") is None else f"{sp['null_alpha']:.3f}"
        sections.append(f"decoder spectrum: alpha = {sp['alpha']:.3f} [{sp['alpha_low']:.3f}, {sp['alpha_high']:.3f}], "
                        f"against {null} for isotropic Gaussian directions of the same shape")
    for query, hits in seen.searches.items():
        sections.append(Rows(["feature", "similarity", "explanation", "score", "density"],
                             [(h["feature"], round(h["similarity"], 3), h["explanation"],
                               None if h["score"] is None else round(h["score"], 2),
                               None if h["density"] is None else round(h["density"], 5)) for h in hits],
                             f"features whose explanations are nearest {query!r}", f"search: {query}"))
    sections.extend(f"{name} figure: {path}" for name, path in seen.figures.items())
    first = seen.features.column("feature")[0].as_py()
    sections.append(f"browse it: saecat serve{f' --db {db}' if db else ''}, then open "
                    f"http://127.0.0.1:8000{feature_url(s['release'], s['sae_id'], first)}")
    emit_sections(sections, choose(fmt))


def _quality_line(s: dict) -> str:
    """The SAE's sparsity and fidelity over the tokens ingested, in one line."""
    claimed = f" (the registry says {s['registry_l0']:g})" if s["registry_l0"] is not None else ""
    line = (f"quality: L0 {s['l0']:.1f}{claimed}, explained variance {s['explained_variance']:.3f}, "
            f"{s['dead_latents']:,} of {s['d_sae']:,} latents dead and {s['dense_10pct']:,} above 10% density")
    if s["delta_lm_loss"] is not None:
        line += f"; delta LM loss {s['delta_lm_loss']:.4f} over {s['eval_tokens']:,} tokens"
    return line


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; the default keeps the API on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        envvar="SAECAT_TOKEN", help="Require `Authorization: Bearer TOKEN` ($SAECAT_TOKEN keeps it out of `ps`).")] = None,
    memory_limit: Annotated[Optional[str], typer.Option(
        "--memory-limit", help="Stop a /sql query past this much memory, e.g. 512MB or 2GB (default $SAECAT_QUERY_MEMORY, "
                               "else an eighth of RAM, at most 4 GiB; two run at once).")] = None,
    db: DbOpt = None,
) -> None:
    """Serve the catalog over HTTP: SQL, SAEs, features, neighbours (OpenAPI docs at /docs)."""
    import uvicorn

    from catalog import Catalog, default_path
    from queries.front.server import create_app

    path = db or default_path()
    Catalog.open(path).close()  # a missing or unreadable catalog is one error now, not one per request
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/yellow] serving {host} without --token: anyone who reaches it can query the catalog")
    uvicorn.run(create_app(path, token=token, memory_limit=memory_limit), host=host, port=port)


def query_memory(value: str | None) -> int:
    """--memory-limit, else $SAECAT_QUERY_MEMORY, else the default, in bytes."""
    from catalog.limits import memory_limit

    return memory_limit(value)


def _flag_default(argv: list[str], option: str, value: str) -> list[str]:
    """`--ray` alone means `--ray auto`: click has no option with an optional value."""
    out = []
    for n, arg in enumerate(argv):
        out.append(arg)
        if arg == option and (n + 1 == len(argv) or argv[n + 1].startswith("-")):
            out.append(value)
    return out


_DEBUG = {"on": False}


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option(
        "--debug", envvar="SAECAT_DEBUG",
        help="Show the full traceback of an error (also SAECAT_DEBUG=1); without it an unexpected error is one "
             "line and its traceback goes to a file.")] = False,
) -> None:
    _DEBUG["on"] = debug


def _debugging() -> bool:
    return _DEBUG["on"] or os.environ.get("SAECAT_DEBUG", "").lower() not in ("", "0", "false", "no")


def _save_traceback(error: BaseException) -> Path | None:
    """Write an unexpected error's traceback to a file (under $SAECAT_CACHE, else the system temp
    folder) and return its path; None if no folder can be written."""
    import tempfile
    import time
    import traceback

    name = f"saecat-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    cache = os.environ.get("SAECAT_CACHE") or Path.home() / ".cache" / "saecat"
    text = (f"saecat {' '.join(sys.argv[1:])}\n\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    for folder in (Path(cache) / "errors", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def main() -> None:
    """Entry point: every error is one line on stderr and a non-zero exit, never a traceback.

    A SaecatError (bad input, a problem the user can fix) is its message. Anything else is a bug
    or a failure nobody foresaw: its type and message on one line, its traceback in a file the
    line names (with --debug or SAECAT_DEBUG=1 the traceback is printed instead). Click's usage
    errors keep their own form.
    """
    from rich.markup import escape

    from catalog.errors import one_line

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        code = app(args=_flag_default(sys.argv[1:], "--ray", "auto"), standalone_mode=False)  # returns an Exit's code
        if isinstance(code, int) and code:
            sys.exit(code)
    except SaecatError as error:
        if _debugging():
            import traceback

            traceback.print_exc()
        err.print(f"[red]error:[/red] {escape(one_line(error, limit=2000))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as error:
        import click

        # usage errors, as click shows them (typer >= 0.2x raises its own copy of click's classes)
        if isinstance(error, (click.ClickException, typer.TyperException)) and hasattr(error, "show"):
            error.show()
            sys.exit(error.exit_code)
        if _debugging():
            raise
        saved = _save_traceback(error)
        where = f"full traceback in {saved}" if saved else "run again with --debug for the traceback"
        err.print(f"[red]error:[/red] {escape(type(error).__name__)}: {escape(one_line(error))} ({escape(where)})",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
