"""`saecat explain`: an explanation for each selected feature of an ingested SAE, written by an LLM
and scored on text held out from its prompt (ingest.autointerp says how).

Per feature: its top examples split by rank, alternately into the explainer's prompt (ranks 0, 2,
4, ...: the best first) and held out (1, 3, ...); the scorer then sees the held-out examples and as many windows of sampled
blocks in which the feature never fired (`blocks.features` is exact), shuffled. Many requests are
in flight at once, each feature's row is committed as it completes, so an interrupted run resumes
with the features it had not finished; a feature whose requests failed (after the client's
retries) is left for the next run, while an answer that does not parse is a result: a feature
without an explanation, or a scoring prompt counted as failed.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from catalog.errors import SaecatError
from catalog.sandbox import check_query
from catalog.store import SaeRecord, writer
from ingest.autointerp import (EXPLAIN_METHOD, EXPLAIN_PREFIX, SCORE_METHOD, SCORE_PREFIX, Detection, Example,
                               Message, explain_messages, parse_explanation, parse_labels, score_messages)
from ingest.explainers import Explainer

COMMIT_EVERY_S = 2.0  # finished features wait at most this long before their rows are committed


@dataclass(frozen=True)
class ExplainOptions:
    where: str | None = None  # a SQL condition over labelled_features (density, fire_count, ...)
    limit: int | None = None  # at most this many features (by feature id), after `where`
    prompt_examples: int = 10  # top examples shown to the explainer (ranks 0, 2, 4, ...)
    logit_tokens: int = 0  # the feature's top logit-lens tokens shown too (0: none)
    score: bool = True
    texts_per_prompt: int = 5  # texts the scorer labels at once
    concurrency: int = 8  # requests in flight
    max_tokens: int = 120  # of each explanation
    force: bool = False  # explain features again that this explainer and method already explained
    progress: bool = True


@dataclass(frozen=True)
class Task:
    """One feature's material: what the explainer sees and what the scorer is tested on."""
    feature: int
    ingested_at: object  # the SAE's ingestion these examples are from
    peak: float  # the feature's largest activation: the 0-10 scale's 10
    shown: list[Example]
    shown_ranks: list[int]
    held_out: list[Example]
    negatives: list[Example]
    logit_tokens: list[str]

    @property
    def scored(self) -> bool:
        """Held-out examples (none unless scoring was asked for) and texts without the feature: both."""
        return bool(self.held_out and self.negatives)

    def explain_prompt(self) -> list[Message]:
        return explain_messages(self.shown, self.peak, self.logit_tokens)

    def score_batches(self, texts_per_prompt: int) -> list[tuple[list[str], list[int]]]:
        """The scorer's prompts, each as (texts, truth), in an order fixed by the feature."""
        samples = [("".join(e.tokens), 1) for e in self.held_out] + [("".join(e.tokens), 0) for e in self.negatives]
        order = np.random.default_rng(self.feature).permutation(len(samples))
        shuffled = [samples[i] for i in order]
        return [([t for t, _ in part], [y for _, y in part])
                for part in (shuffled[i:i + texts_per_prompt] for i in range(0, len(shuffled), texts_per_prompt))]


@dataclass
class Summary:
    selected: int = 0
    done_before: int = 0  # already explained by this explainer and method (skipped)
    stale: int = 0  # of those, made from the examples of an earlier ingestion (--force redoes them)
    no_examples: int = 0  # never fired: nothing to explain
    explained: int = 0
    unparsed: int = 0  # the explainer's answer held no explanation
    failed: int = 0  # requests failed after retries: left for the next run
    scores: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def mean_score(self) -> float | None:
        return float(np.mean(self.scores)) if self.scores else None


# ----------------------------------------------------------------------------- selection


def select_features(con, record: SaeRecord, opts: ExplainOptions, explainer: str) -> tuple[list[int], int, int]:
    """The features `where` selects (ascending, at most `limit`), less those done before unless
    `force`; how many were done before, and how many of those were made from the examples of an
    earlier ingestion of the SAE (their prompt_examples no longer point at what the prompt showed;
    one made before schema v10 recorded no ingestion and is not counted)."""
    condition = f"AND ({opts.where})" if opts.where else ""
    query = check_query(f"SELECT feature FROM labelled_features WHERE sae = {record.sae} {condition} ORDER BY feature")
    try:
        selected = [f for (f,) in con.execute(query).fetchall()]
    except Exception as err:  # duckdb's errors name the column or the syntax at fault
        raise SaecatError(f"--where {opts.where!r}: {err}") from err
    if opts.limit is not None:
        selected = selected[: opts.limit]
    done = dict(con.execute(
        "SELECT feature, coalesce(ingested_at <> ?, false) FROM feature_explanations "
        "WHERE sae = ? AND explainer = ? AND method = ? AND list_contains(?, feature)",
        [record.ingested_at, record.sae, explainer, EXPLAIN_METHOD, selected]).fetchall())
    if opts.force:
        return selected, 0, 0
    return [f for f in selected if f not in done], len(done), sum(done.values())


def load_tasks(con, record: SaeRecord, features: list[int], opts: ExplainOptions) -> Iterator[Task | int]:
    """Each feature's Task, or the feature itself when it has no example (it never fired)."""
    examples: dict[int, list[tuple[int, list[str], list[float]]]] = {}
    for feature, rank, context, values in con.execute(
            "SELECT feature, rank, context, context_values FROM feature_examples "
            "WHERE sae = ? AND list_contains(?, feature) ORDER BY feature, rank", [record.sae, features]).fetchall():
        examples.setdefault(feature, []).append((rank, context, values))
    peaks = dict(con.execute("SELECT feature, max_activation FROM features WHERE sae = ? AND list_contains(?, feature)",
                             [record.sae, features]).fetchall())
    lens: dict[int, list[str]] = {}
    if opts.logit_tokens:
        top = con.execute("SELECT feature, token FROM feature_tokens WHERE sae = ? AND direction = 'top' AND rank < ? "
                          "AND list_contains(?, feature) ORDER BY feature, rank", [record.sae, opts.logit_tokens, features])
        for feature, token in top.fetchall():
            lens.setdefault(feature, []).append(token)
    most_held_out = max(map(len, examples.values()), default=0) // 2 if opts.score else 0  # the odd ranks
    negatives = negative_windows(con, record, features, most_held_out)
    for feature in features:
        rows = examples.get(feature, [])
        if not rows or not peaks.get(feature):
            yield feature
            continue
        as_examples = [(rank, Example(context, values or [0.0] * len(context))) for rank, context, values in rows]
        shown = [(r, e) for i, (r, e) in enumerate(as_examples) if i % 2 == 0][: opts.prompt_examples]
        held_out = [e for i, (_, e) in enumerate(as_examples) if i % 2 == 1] if opts.score else []
        width = max(len(e.tokens) for _, e in as_examples)
        yield Task(feature, record.ingested_at, float(peaks[feature]), [e for _, e in shown], [r for r, _ in shown],
                   held_out, negatives(feature, len(held_out), width), lens.get(feature, []))


def negative_windows(con, record: SaeRecord, features: list[int], n: int) -> Callable[[int, int, int], list[Example]]:
    """For each feature, up to n sampled blocks in which it never fired, each chosen by a hash of
    (feature, block): the same blocks on every run, read in one query. Returns a function of
    (feature, how many, width) -> that many windows of `width` tokens, from different blocks."""
    blocks: dict[int, list[list[str]]] = {}
    if n:
        for feature, tokens in con.execute(
                """SELECT f.feature, b.tokens FROM blocks b, (SELECT unnest(?::INTEGER[]) AS feature) f
                   WHERE b.sae = ? AND b.tokens IS NOT NULL AND NOT list_contains(b.features, f.feature)
                   QUALIFY row_number() OVER (PARTITION BY f.feature ORDER BY hash(b.block, f.feature)) <= ?
                   ORDER BY f.feature, hash(b.block, f.feature)""", [features, record.sae, n]).fetchall():
            blocks.setdefault(feature, []).append(tokens)

    def windows(feature: int, count: int, width: int) -> list[Example]:
        rng = np.random.default_rng([record.sae, feature])
        out = []
        for tokens in blocks.get(feature, [])[:count]:
            start = int(rng.integers(0, max(len(tokens) - width, 0) + 1))
            window = tokens[start:start + width]
            out.append(Example(window, [0.0] * len(window)))
        return out

    return windows


# ----------------------------------------------------------------------------- one feature


class Requests:
    """The explainer and scorer behind one limit on requests in flight."""

    def __init__(self, explainer: Explainer, scorer: Explainer, concurrency: int):
        self.explainer, self.scorer = explainer, scorer
        self.slots = asyncio.Semaphore(concurrency)

    async def ask(self, model: Explainer, messages: list[Message], max_tokens: int, prefix: str) -> str | None:
        async with self.slots:
            return await model.complete(messages, max_tokens, prefix)


ROW_COLUMNS = ("feature", "explainer", "method", "explanation", "prompt_examples", "score", "score_method", "scorer",
               "score_details", "ingested_at")


async def explain_one(task: Task, requests: Requests, opts: ExplainOptions) -> dict | None:
    """The feature's feature_explanations row (by ROW_COLUMNS, less `sae`), or None when the
    explainer's answer held no explanation."""
    explanation = parse_explanation(await requests.ask(requests.explainer, task.explain_prompt(), opts.max_tokens,
                                                       EXPLAIN_PREFIX))
    if explanation is None:
        return None
    row = {"feature": task.feature, "explainer": requests.explainer.name, "method": EXPLAIN_METHOD,
           "explanation": explanation, "prompt_examples": task.shown_ranks, "score": None, "score_method": None,
           "scorer": None, "score_details": None, "ingested_at": task.ingested_at}
    if task.scored:
        batches = task.score_batches(opts.texts_per_prompt)
        answers = await asyncio.gather(*(requests.ask(requests.scorer, score_messages(explanation, texts),
                                                      4 * len(texts) + 8, SCORE_PREFIX) for texts, _ in batches))
        detection = Detection()
        for (texts, truth), answer in zip(batches, answers):
            detection = detection.add(truth, parse_labels(answer, len(texts)))
        row.update(score=detection.balanced_accuracy, score_method=SCORE_METHOD, scorer=requests.scorer.name,
                   score_details=json.dumps({**detection.__dict__, "activating": len(task.held_out),
                                             "not_activating": len(task.negatives)}))
    return row


# ----------------------------------------------------------------------------- the run


def calls(task: Task, opts: ExplainOptions) -> int:
    return 1 + (math.ceil((len(task.held_out) + len(task.negatives)) / opts.texts_per_prompt) if task.scored else 0)


def plan(db: Path | None, release: str, sae_id: str, explainer_name: str, opts: ExplainOptions
         ) -> tuple[SaeRecord, list[Task], Summary]:
    """The features to explain, each with its material, and what was skipped (a read of the catalog)."""
    from catalog import Catalog

    with Catalog.open(db) as cat:
        record = cat.find_sae(release, sae_id)
        features, done_before, stale = select_features(cat.con, record, opts, explainer_name)
        summary = Summary(selected=len(features) + done_before, done_before=done_before, stale=stale)
        tasks = []
        for task in load_tasks(cat.con, record, features, opts):
            if isinstance(task, int):
                summary.no_examples += 1
            else:
                tasks.append(task)
    return record, tasks, summary


def explain(db: Path | None, release: str, sae_id: str, explainer: Explainer, scorer: Explainer | None = None,
            opts: ExplainOptions = ExplainOptions()) -> Summary:
    """Explain (and score) the selected features, committing each feature's row as it completes."""
    record, tasks, summary = plan(db, release, sae_id, explainer.name, opts)
    if tasks:
        asyncio.run(_run(db, record, tasks, Requests(explainer, scorer or explainer, opts.concurrency), opts, summary))
    return summary


async def _run(db: Path | None, record: SaeRecord, tasks: list[Task], requests: Requests, opts: ExplainOptions,
               summary: Summary) -> None:
    from ingest.explainers import FatalEndpointError

    pending: list[dict] = []
    last_commit = time.monotonic()
    with writer(db) as cat, _progress(opts.progress, len(tasks)) as advance:
        def commit() -> None:
            if pending:
                with cat.transaction() as con:
                    con.executemany(
                        f"INSERT OR REPLACE INTO feature_explanations (sae, {', '.join(ROW_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * (len(ROW_COLUMNS) + 1))})",
                        [[record.sae, *(row[c] for c in ROW_COLUMNS)] for row in pending])
                pending.clear()

        jobs = {asyncio.ensure_future(explain_one(task, requests, opts)): task for task in tasks}
        try:
            for job in asyncio.as_completed(list(jobs)):
                try:
                    row = await job
                except FatalEndpointError:
                    raise
                except Exception as err:  # timeouts, 429s and 5xx past the retries: this feature waits for a rerun
                    summary.failed += 1
                    summary.errors.append(f"{type(err).__name__}: {err}")
                else:
                    if row is None:
                        summary.unparsed += 1
                    else:
                        summary.explained += 1
                        if row["score"] is not None:
                            summary.scores.append(row["score"])
                        pending.append(row)
                advance()
                if time.monotonic() - last_commit > COMMIT_EVERY_S:
                    commit()
                    last_commit = time.monotonic()
        finally:
            for job in jobs:
                job.cancel()
            commit()
            for model in {id(requests.explainer): requests.explainer, id(requests.scorer): requests.scorer}.values():
                await model.close()


@contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[], None]]:
    """A function that advances a rich progress bar over the features (or does nothing)."""
    if not show:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("explain", total=total)
        yield lambda: bar.advance(task)
