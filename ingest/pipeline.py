"""An ingestion, in the order the data flows: source -> model -> accumulator -> commit.

Everything heavy happens outside the database. The catalog is opened for writing only to
register the run, to record progress at checkpoints, and to commit the finished SAE in one
transaction; readers in other processes are free the rest of the time.
"""

from __future__ import annotations

import gc
import itertools
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sae_lens
import torch

from catalog.errors import SaecatError
from catalog.index import write_indexes
from catalog.store import Catalog, check_writable, default_path, first_row, sidecar_dir, writer
from ingest.accumulate import SAMPLE_BLOCKS, SHARD_BATCHES, FeatureAccumulator, Firings, Pairs
from ingest.blockpairs import BlockSets, count_pairs, discard
from ingest.budget import (BLOCKS, DENSE, PairPlan, budget_bytes, encode_tokens, module_bytes, plan_pairs,
                           process_memory)
from ingest.checkpoint import Checkpoint, params_hash
from ingest.model import hook_activations, model_for_sae
from ingest.evaluate import eval_bytes, evaluate_batch
from ingest.pair_policy import PairPolicy
from ingest.quality import QUALITY_SUMS, token_quality
from ingest.sources import LoadedSae, SaeSource, load_sae
from ingest.tables import policy_columns, sae_tables
from ingest.text import iter_documents
from ingest.tokens import Batch, batches


@dataclass
class IngestOptions:
    """What to run the SAE over and how to count. The fields below "how, not what" never change a result."""

    dataset: str
    text_column: str = "text"
    split: str = "train"
    model: str | None = None  # transformer-lens name or local HF folder; default: the SAE's own
    max_tokens: int | None = None
    max_doc_tokens: int = 1024
    block_size: int = 256
    threshold: float = 0.0
    fold_decoder_norm: bool = False
    top_k: int = 20  # top activating examples kept per feature
    context_tokens: int = 8  # tokens of context on each side of an example
    logit_k: int = 10  # logit-lens tokens per feature and direction
    group_column: str | None = None  # dataset field (dotted for nested) stored with each sampled block
    sample_blocks: int = SAMPLE_BLOCKS  # full blocks kept in `blocks` (a uniform sample); 0: none
    shard_batches: int = SHARD_BATCHES  # batches per shard: float sums restart per shard (their last bits)
    # which co-occurring pairs are stored (ingest.pair_policy): the default, min 1 and no top, is all of them
    min_pair_blocks: int = 1  # pairs seen together in at least this many blocks
    top_partners: int | None = None  # and, if set, only those among either feature's K best partners
    rank_partners_by: str = "n11"  # how partners are ranked for top_partners: n11 or phi
    # below: how, not what
    device: str = "auto"
    batch_tokens: int = 8192
    checkpoint_every_s: float = 300.0
    progress: bool = True
    ray: str | None = None  # count on Ray: "local" (a new local cluster), "auto" or an address; None: here
    ray_task_shards: int = 8  # shards per Ray task: what a task counts and returns, and what a retry repeats
    # what the run may hold (512MB, 8GiB, ...; ingest.budget): it picks dense pair tiles or block sets
    # on disk, both exact; None: half of the device's memory
    memory_budget: str | int | None = None
    # what, again: --evaluate's tokens (ingest.evaluate), from the start of the stream; 0: none
    evaluate_tokens: int = 0

    def __post_init__(self) -> None:
        """Every option checked at the door, each error naming the CLI flag it came from."""
        for name, least in _LEAST.items():
            value = getattr(self, name)
            if value is None and name in ("max_tokens", "top_partners"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise SaecatError(f"{_flag(name)} must be a whole number, not {value!r}")
            if value < least:
                raise SaecatError(f"{_flag(name)} must be at least {least}, not {value}")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise SaecatError(f"--threshold must be a finite number >= 0 (a feature fires above it), not {threshold!r}")
        every = self.checkpoint_every_s
        if isinstance(every, bool) or not isinstance(every, (int, float)) or math.isnan(every) or every < 0:
            raise SaecatError(f"--checkpoint-every must be a number of seconds >= 0, not {every!r}")
        PairPolicy(self.min_pair_blocks, self.top_partners, self.rank_partners_by)  # a bad value names its flag
        if self.memory_budget is not None:
            budget_bytes(self.memory_budget, "cpu")  # a bad size fails at the door
        if self.evaluate_tokens and self.ray is not None:
            raise SaecatError("--evaluate runs on one machine: leave out --ray to evaluate the SAE")

    @property
    def pair_policy(self) -> PairPolicy:
        """Which co-occurring pairs the catalog keeps (ingest.pair_policy)."""
        return PairPolicy(self.min_pair_blocks, self.top_partners, self.rank_partners_by)


# The least value of each integer option (max_tokens and top_partners may also be None: no cap).
_LEAST = {"max_tokens": 1, "max_doc_tokens": 1, "block_size": 1, "top_k": 0, "context_tokens": 0, "logit_k": 0,
          "sample_blocks": 0, "shard_batches": 1, "batch_tokens": 1, "ray_task_shards": 1, "min_pair_blocks": 1,
          "top_partners": 1, "evaluate_tokens": 0}


def _flag(name: str) -> str:
    """The CLI flag of an IngestOptions field."""
    return "--" + name.removesuffix("_s").replace("_", "-")


@dataclass
class IngestResult:
    sae: int | None
    release: str
    sae_id: str
    status: str  # 'ingested' or 'exists'
    n_tokens: int = 0
    n_blocks: int = 0
    n_pairs: int = 0
    seconds: float = 0.0
    # (name, start, end) by time.monotonic(): load, prepare, stream, pairs (out of core only), write, index
    phases: list[tuple[str, float, float]] = field(default_factory=list)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaecatError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def _existing(db: Path, source: SaeSource) -> int | None:
    if not db.exists():
        return None
    with Catalog.open(db, older=True) as cat:  # an older catalog is upgraded when the SAE is committed
        if not first_row(cat.con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'saes'")[0]:
            return None  # an empty DuckDB file
        row = first_row(cat.con, "SELECT sae FROM saes WHERE release = ? AND sae_id = ? AND status = 'ready'",
                        [source.release, source.sae_id])
    return row[0] if row else None


# The counting rules' version, part of a run's hash: a checkpoint counted under other rules is not resumed.
COUNTING_RULES = 3  # 2: top examples rank firings only, ties to the earlier token; 3: float sums by shard


def _run_params(loaded: LoadedSae, opts: IngestOptions, model_name: str) -> dict[str, Any]:
    fields = asdict(opts)
    for how in ("device", "batch_tokens", "checkpoint_every_s", "progress", "ray", "ray_task_shards", "memory_budget",
                "min_pair_blocks", "top_partners", "rank_partners_by"):
        fields.pop(how)
    policy = opts.pair_policy
    if not policy.complete:
        # Only a policy that keeps less is part of the hash: a checkpoint of another policy is
        # never resumed as this one, and runs of the complete policy (every run before policies
        # existed) keep the hash they had.
        fields["pair_policy"] = policy_columns(policy)
    if not opts.evaluate_tokens:
        fields.pop("evaluate_tokens")  # likewise: a run without --evaluate keeps the hash it had
    fields.update(release=loaded.source.release, sae_id=loaded.source.sae_id, source=loaded.source.location,
                  weights=loaded.digest(), model=model_name, sae_lens=sae_lens.__version__,
                  counting_rules=COUNTING_RULES)
    return fields


def _progress(enabled: bool, total: int | None, done: int):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
        TextColumn("{task.fields[rate]:>10} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )
    task = progress.add_task("forward + count", total=total, completed=done, rate="-")
    return progress, task


def _quiet_libraries() -> None:
    """No progress bars from the libraries underneath when saecat shows none (scripts, --json)."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()


def _status(enabled: bool, message: str):
    """A spinner with a message while a step without a natural count runs."""
    from contextlib import nullcontext

    from rich.console import Console

    return Console(stderr=True).status(message) if enabled else nullcontext()


def _sae_row(loaded: LoadedSae, opts: IngestOptions, model_name: str, acc: FeatureAccumulator) -> dict[str, Any]:
    cfg = loaded.sae.cfg
    return {
        "release": loaded.source.release, "sae_id": loaded.source.sae_id,
        "source": loaded.source.location, "model": loaded.model_name, "hook_name": loaded.hook_name,
        "layer": loaded.layer, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "architecture": loaded.architecture,
        "neuronpedia_id": loaded.neuronpedia_id, "status": "ready", "decoder_folded": loaded.decoder_folded,
        "activation_model": model_name, "dataset": opts.dataset, "text_column": opts.text_column,
        "n_documents": acc.n_documents, "n_tokens": acc.n_tokens, "n_blocks": acc.n_blocks,
        "block_size": opts.block_size, "threshold": opts.threshold, "max_doc_tokens": opts.max_doc_tokens,
        "top_k": opts.top_k, "context_tokens": opts.context_tokens, "group_column": opts.group_column,
        "sample_blocks": opts.sample_blocks, **policy_columns(opts.pair_policy),
        "ingested_at": datetime.now(timezone.utc).replace(tzinfo=None),
    }


def _release_row(source: SaeSource, loaded: LoadedSae) -> dict[str, Any]:
    if loaded.release_info:
        return loaded.release_info
    return {"release": source.release, "repo_id": source.release if source.kind == "hub" else None}


def new_accumulator(loaded: LoadedSae, opts: IngestOptions, device: str, pair_tiles: bool = True) -> FeatureAccumulator:
    return FeatureAccumulator(loaded.sae.cfg.d_sae, threshold=opts.threshold, block_size=opts.block_size,
                              bos_offset=1 if loaded.prepend_bos else 0, top_k=opts.top_k, context=opts.context_tokens,
                              device=device, sample_blocks=opts.sample_blocks, d_in=loaded.sae.cfg.d_in,
                              shard_batches=opts.shard_batches, pair_tiles=pair_tiles)


# a batch encoded: the activations at the hook, the SAE's firings, its reconstruction of the activations
Encoded = tuple[torch.Tensor, Firings, torch.Tensor]


def encode(loaded: LoadedSae, model, model_name: str, device: str, batch: Batch, threshold: float,
           chunk_tokens: int | None = None) -> Encoded:
    """(activations at the hook, the SAE's firings above `threshold` with each token's
    reconstruction terms, the SAE's reconstruction of the activations), encoding the batch's
    non-padding tokens `chunk_tokens` at a time (default: budget.encode_tokens) and keeping only
    their firings, so a batch's dense activations never exist whole."""
    acts = hook_activations(model, batch.tokens.to(device), loaded.hook_name, loaded.layer)
    _check_width(loaded, model_name, acts.shape[-1])
    n_docs, width = acts.shape[:2]
    real = torch.arange(width, device=acts.device)[None, :] < batch.lengths.to(acts.device)[:, None]
    place = real.flatten().nonzero().squeeze(1)  # row-major, so the firings come out in row-major order
    step = chunk_tokens or encode_tokens(loaded.sae.cfg.d_sae)
    quality = torch.zeros(n_docs * width, len(QUALITY_SUMS), dtype=torch.float64, device=acts.device)
    x_hat = torch.zeros_like(acts).flatten(0, 1)
    parts = []
    with torch.inference_mode():
        for start in range(0, len(place), step):  # a batch holds at least one token: parts is never empty
            rows = place[start: start + step]
            x = acts.flatten(0, 1)[rows]
            encoded = loaded.sae.encode(x)
            # the SAE's own decode, of the latents taken sparse: L0 decoder rows a token, where a dense
            # decode would cost as much as the encode at any width
            sparse = encoded.to_sparse()
            x_hat[rows] = loaded.sae.decode(sparse).to(x_hat.dtype)
            quality[rows] = token_quality(x, sparse, x_hat[rows])
            token, feature = (encoded > threshold).nonzero().unbind(1)
            parts.append((rows[token], feature, encoded[token, feature]))
    flat, feature, value = (torch.cat(column) for column in zip(*parts))
    return acts, Firings(flat // width, flat % width, feature, value, (n_docs, width),
                         quality.view(n_docs, width, -1)), x_hat.view_as(acts)


def _check_width(loaded: LoadedSae, model_name: str, width: int) -> None:
    if width != loaded.sae.cfg.d_in and loaded.sae.cfg.reshape_activations == "none":
        raise SaecatError(
            f"model {model_name!r} gives {width}-wide activations at {loaded.hook_name}, "
            f"the SAE expects d_in={loaded.sae.cfg.d_in}"
        )


def check_hook_width(loaded: LoadedSae, model, model_name: str, device: str) -> None:
    """The model's width at the hook (one token run through it) against the SAE's d_in: a
    mismatch is an error before anything is locked, read or counted."""
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    _check_width(loaded, model_name, hook_activations(model, token, loaded.hook_name, loaded.layer).shape[-1])


def count_batch(acc: FeatureAccumulator, batch: Batch, encoded: Encoded,
                evaluation: torch.Tensor | None = None) -> None:
    inputs, firings, _ = encoded
    acc.update(firings, batch.lengths, batch.n_documents, batch.tokens, batch.offsets, inputs=inputs,
               groups=batch.groups, evaluation=evaluation)


def evaluation(session: "_Session", model, batch: Batch, encoded: Encoded) -> torch.Tensor | None:
    """The batch's loss terms with the SAE spliced in (ingest.evaluate), while the run has evaluated
    fewer tokens than --evaluate asks: whole batches from the start of the stream."""
    if session.acc.n_eval_tokens >= session.opts.evaluate_tokens:
        return None
    acts, _, x_hat = encoded
    tokens = batch.tokens.to(acts.device)
    pos = torch.arange(tokens.shape[1], device=acts.device)
    counted = (pos[None] >= session.acc.bos_offset) & (pos[None] < batch.lengths.to(acts.device)[:, None])
    return evaluate_batch(model, session.loaded.hook_name, tokens, counted, acts, x_hat)


class _Session:
    """One ingestion's moving parts, so the steps below stay small."""

    def __init__(self, db: Path, loaded: LoadedSae, opts: IngestOptions, device: str, model_name: str,
                 baseline: int, model_bytes: int):
        self.db, self.loaded, self.opts, self.device, self.model_name = db, loaded, opts, device, model_name
        # what the process held before the run, and what the model takes (the plan's parts)
        self.baseline, self.model_bytes = baseline, model_bytes
        self.params = _run_params(loaded, opts, model_name)
        self.hash = params_hash(self.params)
        self.checkpoint = Checkpoint(sidecar_dir(db) / "runs" / self.hash)
        self.pairs_dir = self.checkpoint.folder / "pairs"  # the out-of-core pair pass's finished bands
        self.acc: FeatureAccumulator
        self.plan: PairPlan
        self.block_sets: BlockSets | None = None
        self.run: int | None = None
        self.phases: list[tuple[str, float, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the run (IngestResult.phases), for reports and bench/wide.py."""
        start = time.monotonic()
        yield
        self.phases.append((name, start, time.monotonic()))

    def prepare(self, state: dict | None, model: torch.nn.Module) -> None:
        """Plan the run's memory (a resumed run keeps its checkpoint's pair path), then the
        accumulator, and for the out-of-core path the block sets, truncated back to the checkpoint's."""
        cfg, opts = self.loaded.sae.cfg, self.opts
        self.plan = plan_pairs(cfg.d_sae, budget=budget_bytes(opts.memory_budget, self.device), baseline=self.baseline,
                               # --evaluate's passes hold a few rows' logits beside the whole model
                               model=self.model_bytes + (eval_bytes(opts.max_doc_tokens, model.cfg.d_vocab)
                                                         if opts.evaluate_tokens else 0),
                               sae=module_bytes(self.loaded.sae),
                               batch_tokens=opts.batch_tokens, top_k=opts.top_k,
                               context=opts.context_tokens, merges=opts.ray is not None,
                               resumed_path=None if state is None else state.get("pair_path", DENSE))
        self.acc = new_accumulator(self.loaded, opts, self.device, pair_tiles=self.plan.path == DENSE)
        if self.plan.path == BLOCKS:
            if state is None:
                discard(self.pairs_dir)  # a pass over other block sets
            self.block_sets = BlockSets(self.checkpoint.folder / "block_sets", cfg.d_sae, state=state)
            self.acc.block_sink = self.block_sets
        if state is not None:
            self.acc.load_state_dict(state)

    def count_pairs(self) -> Pairs:
        """The out-of-core pair pass over the block sets: the pairs the policy keeps, exact,
        resumable band by band from the run's folder."""
        pairs, _ = count_pairs(self.block_sets, self.loaded.sae.cfg.d_sae, policy=self.opts.pair_policy,
                               memory_budget_bytes=self.plan.room, device=self.device,
                               checkpoint_dir=self.pairs_dir, progress=self.opts.progress)
        return pairs

    def close(self) -> None:
        if self.block_sets is not None:
            self.block_sets.close()

    def encode(self, batch: Batch, model) -> Encoded:
        return encode(self.loaded, model, self.model_name, self.device, batch, self.opts.threshold,
                      self.plan.memory.encode_tokens)

    def checkpoint_state(self) -> None:
        """Save the counters (call only between batches) and record the progress."""
        state = {**self.acc.state_dict(), "pair_path": self.plan.path}
        if self.block_sets is not None:
            self.block_sets.sync()  # on disk before the checkpoint that counts them
            state.update(self.block_sets.state())
        self.checkpoint.save(state)
        self.record()

    def record(self, status: str | None = None, error: str | None = None) -> None:
        with writer(self.db) as cat:
            cat.update_run(self.run, status=status, n_documents=self.acc.n_documents, n_tokens=self.acc.n_tokens,
                           error=error)


def ingest(source: SaeSource, opts: IngestOptions, *, db: str | Path | None = None, force: bool = False,
           restart: bool = False) -> IngestResult:
    """Ingest one SAE into the catalog: all of it in one transaction, or nothing.

    Bad input (unknown SAE, unloadable model, missing hook, empty dataset, shape mismatch) is
    found before the catalog is touched. Interrupted runs resume from their last checkpoint
    when the same command is run again (or start over with restart=True).
    """
    started = time.monotonic()
    db = Path(db) if db is not None else default_path()
    check_writable(db)  # a catalog that cannot be written fails now, not after the model has run
    existing = _existing(db, source)
    if existing is not None and not force:
        return IngestResult(existing, source.release, source.sae_id, "exists")

    if not opts.progress:
        _quiet_libraries()
    if opts.ray is not None:  # a missing extra or a wrong address fails before anything loads
        from ingest.distributed import connect

        connect(opts.ray)
    device = resolve_device(opts.device)
    baseline = process_memory(device)  # before the SAE and the model, which the plan counts apart
    with _status(opts.progress, f"loading SAE {source.location}"):
        loaded = load_sae(source, device, opts.fold_decoder_norm)
    model_name = opts.model or loaded.model_name
    whole = opts.evaluate_tokens > 0  # --evaluate runs the model to its logits
    with _status(opts.progress, f"loading model {model_name} {'' if whole else f'up to {loaded.hook_name} '}"
                                f"on {device}"):
        before_model = process_memory(device)
        model = model_for_sae(loaded, opts.model, device, whole=whole)
    # its parameters, or on the CPU what loading it added when that is more (the tokenizer, the loader's leftovers)
    model_bytes = max(module_bytes(model), process_memory(device) - before_model)
    check_hook_width(loaded, model, model_name, device)
    session = _Session(db, loaded, opts, device, model_name, baseline, model_bytes)
    session.phases.append(("load", started, time.monotonic()))

    session.checkpoint.acquire()
    try:
        # the checkpoint read back, the counters allocated, the first batch encoded
        with session.phase("prepare"):
            state = None if restart else session.checkpoint.load()
            session.prepare(state, model)
            if opts.progress:
                print(f"plan: {session.plan.describe()}", file=sys.stderr)
            if state is not None:
                if opts.ray is None and session.acc.pending:
                    raise SaecatError("this run was checkpointed by a --ray run with shards still to count: "
                                      "resume it with --ray, or start over with --restart")
            stream = _batches(session, model, whole=opts.ray is not None)
            first = next(stream, None)
            if first is None and state is None:
                raise SaecatError(f"dataset {opts.dataset!r} has no text to count (column {opts.text_column!r})")
            first_encoded = session.encode(first, model) if first is not None else None  # checks shapes

            with writer(db) as cat:
                plan = {**session.plan.to_json(), "summary": session.plan.describe()}  # shown by `saecat status`
                session.run = cat.start_run(source.release, source.sae_id, {**session.params, "plan": plan},
                                            session.hash)
        with session.phase("stream"):
            if opts.ray is None:
                _count(session, model, first, first_encoded, stream)
            else:
                _count_on_ray(session, itertools.chain([first] if first is not None else [], stream))

        kept = None
        if session.block_sets is not None:
            session.checkpoint_state()  # the stream is done: a kill in the pair pass resumes from here
            with session.phase("pairs"):
                kept = _pair_pass(session)
        with session.phase("write"):
            with _status(opts.progress, "collecting pairs"):
                features, pairs, extra = sae_tables(loaded, session.acc, model, opts.logit_k, opts.pair_policy, kept,
                                                    progress=opts.progress)  # streamed: built as DuckDB reads
            n_pairs = pairs.num_rows
            with _status(opts.progress, f"writing features, labels and {n_pairs:,} pairs to {db}"), writer(db) as cat:
                cat.con.execute(f"SET memory_limit = '{session.plan.duckdb_limit(pairs.nbytes)}B'")
                key = cat.commit_sae(_sae_row(loaded, opts, model_name, session.acc), features, pairs,
                                     _release_row(source, loaded), session.run, extra)
                record = cat.sae_by_key(key)
        n_tokens, n_blocks = session.acc.n_tokens, session.acc.n_blocks
        session.close()
        session.checkpoint.discard()  # block sets and pair bands too: they live in the run's folder
        # The index phase holds the decoder rows and one index: the model, the encoder and the
        # counters go first (at 1M latents they are 10 GiB, and an index beside them broke the budget).
        del model, stream, features, pairs, extra, first, first_encoded
        session.acc = None
        loaded.sae.W_enc = None
        gc.collect()
        # after the commit, outside the write lock: an index that is missing or stale (a kill here)
        # is rebuilt on first use
        with session.phase("index"), Catalog.open(db) as cat:
            write_indexes(cat, record, loaded.sae.W_dec, progress=opts.progress)
    finally:
        session.close()
        session.checkpoint.release()
    return IngestResult(key, source.release, source.sae_id, "ingested", n_tokens,
                        n_blocks, n_pairs, time.monotonic() - started, session.phases)


def _pair_pass(session: _Session) -> Pairs:
    """The out-of-core pair pass; the run is marked interrupted or failed if it does not finish."""
    try:
        return session.count_pairs()
    except KeyboardInterrupt:
        session.record("interrupted")
        raise SaecatError("interrupted while counting pairs; run the same command to resume from the finished "
                          "bands") from None
    except Exception as err:
        session.record("failed", error=_run_error(err))
        raise


def _batches(session: _Session, model, whole: bool = False) -> Iterator[Batch]:
    """The stream's batches from where the accumulator stands, or all of them (`whole`: a Ray run
    hands out the shards not counted yet, wherever they are)."""
    opts, acc = session.opts, session.acc
    tokenizer = model.tokenizer
    bos_id = None
    if session.loaded.prepend_bos:
        bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos_id is None:
            raise SaecatError("the SAE expects a BOS token but the model's tokenizer has none")
    counted_tokens, counted_documents = (0, 0) if whole else (acc.n_tokens, acc.n_documents)
    remaining = None if opts.max_tokens is None else opts.max_tokens - counted_tokens
    if remaining is not None and remaining <= 0:
        return iter(())
    docs = iter_documents(opts.dataset, opts.text_column, opts.split, skip=counted_documents,
                          group_column=opts.group_column)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return batches(docs, tokenizer, bos_id=bos_id, max_doc_tokens=min(opts.max_doc_tokens, model.cfg.n_ctx),
                   batch_tokens=opts.batch_tokens, max_tokens=remaining, pad_id=pad_id)


class _CtrlC:
    """First Ctrl-C: finish the batch in hand, checkpoint, stop. A second one stops at once.

    Counting a batch touches several counters; stopping halfway through would checkpoint a state
    that no prefix of the corpus produced, so the first request waits for a batch boundary.
    """

    def __enter__(self) -> "_CtrlC":
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _count_on_ray(session: _Session, stream: Iterator[Batch]) -> None:
    """Counting fanned out on Ray (ingest.distributed), checkpointed between merges on the same
    timer as a single-machine run; the run is marked failed if it does not finish."""
    from ingest.distributed import count_on_ray

    acc, opts = session.acc, session.opts
    progress, task = _progress(opts.progress, opts.max_tokens, acc.n_tokens)
    last_save = time.monotonic()

    def merged() -> None:
        nonlocal last_save
        progress.update(task, completed=acc.n_tokens)
        if ctrl_c.requested:
            session.checkpoint_state()
            session.record("interrupted")
            raise _Interrupted(f"interrupted after {acc.n_tokens:,} tokens; checkpoint saved, run the same command "
                               "to resume")
        if time.monotonic() - last_save >= opts.checkpoint_every_s:
            session.checkpoint_state()
            last_save = time.monotonic()

    try:
        with progress, _CtrlC() as ctrl_c:
            count_on_ray(session, stream, merged)
    except KeyboardInterrupt:
        session.record("interrupted")
        raise SaecatError("interrupted; run the same command to resume from the last checkpoint") from None
    except _Interrupted:
        raise
    except Exception as err:
        session.record("failed", error=_run_error(err))
        raise


class _Interrupted(SaecatError):
    """Stopped on request, with a checkpoint: not a failure."""


def _run_error(err: Exception) -> str:
    """What ingest_runs.error records: a user error's message, else the exception's type too."""
    return str(err) if isinstance(err, SaecatError) else f"{type(err).__name__}: {err}"


def _count(session: _Session, model, first: Batch | None, first_encoded: Encoded | None,
           stream: Iterator[Batch]) -> None:
    """The hot loop: forward, encode, count; checkpoint on a timer and between batches only."""
    acc, opts = session.acc, session.opts
    progress, task = _progress(opts.progress, opts.max_tokens, acc.n_tokens)
    last_save = time.monotonic()
    tick, tick_tokens = time.monotonic(), acc.n_tokens
    resume = "run the same command to resume"
    try:
        with progress, _CtrlC() as ctrl_c:
            batch, encoded = first, first_encoded
            while batch is not None:
                count_batch(acc, batch, encoded, evaluation(session, model, batch, encoded))
                now = time.monotonic()
                if now - tick >= 1.0:
                    rate = (acc.n_tokens - tick_tokens) / (now - tick)
                    tick, tick_tokens = now, acc.n_tokens
                    progress.update(task, completed=acc.n_tokens, rate=f"{rate:,.0f}")
                else:
                    progress.update(task, completed=acc.n_tokens)
                if ctrl_c.requested:
                    session.checkpoint_state()
                    session.record("interrupted")
                    raise _Interrupted(f"interrupted after {acc.n_tokens:,} tokens; checkpoint saved, {resume}")
                if now - last_save >= opts.checkpoint_every_s:
                    session.checkpoint_state()
                    last_save = time.monotonic()
                batch = next(stream, None)
                encoded = session.encode(batch, model) if batch is not None else None
    except KeyboardInterrupt:
        # a hard stop, maybe mid-batch: keep the last whole-batch checkpoint, not this state
        session.record("interrupted")
        raise SaecatError(f"interrupted; {resume} from the last checkpoint") from None
    except _Interrupted:
        raise
    except Exception as err:  # a bad record deep in the stream too: the run is failed, not left running
        session.record("failed", error=_run_error(err))
        raise
