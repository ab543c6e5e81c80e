"""Analogy crystals from labelled word pairs, in the model's activation space and the SAE's.

For each pair task (country-capital, singular-plural, ...) every word is run through the SAE's
own model, loaded the way ingestion loads it, and the activation at the SAE's hook on the
word's last token is taken (the 'residual' space), with its SAE encoding (the 'sae' space).
Each pair (a, b) gives a difference b - a. How well the differences cluster by task is the
silhouette score (Euclidean) under the task labels:

- 'raw': the differences as they are;
- 'project': the named distractor directions projected out ("length": the direction of the
  difference in last-token character length, fitted by ridge regression within tasks);
- 'lda': projected on the top n directions of linear discriminant analysis fitted with the task
  labels, for each n of the sweep: in sample (the paper's number: the LDA saw the pairs it is
  scored on) and held out (cross-validated: the honest number).

Per task and method, `crystal_tasks` has the mean cosine between the task's differences (how
trapezoid-like the task is) and their mean parallelogram error.

Words are fed as `prefix + word` (default " word") after BOS when the SAE's model uses one: a
pair word usually appears mid-sentence, where BPE tokenizers (GPT-2's, Gemma's) have a
leading-space token for it (" Paris", "▁Paris"); without the space the same word is often split
into rarer pieces. With GPT-2's tokenizer, 610 of the 634 built-in words are one token with the
space and only 338 without it. All words go through the model in one right-padded batch, with
an explicit attention mask; each word's last real position is read.

>>> from queries import word_pairs                                          # doctest: +SKIP
>>> result = word_pairs.run("saecat.duckdb", "gpt2-small-res-jb", "blocks.8.hook_resid_pre")
>>> result.summary["spaces"]["residual"]["silhouette"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa

from catalog import Catalog
from catalog.errors import SaecatError
from catalog.store import SaeRecord, first_row
from queries import analyses
from queries.analyses import Analysis

KIND = "word_pairs"
SPACES = ("residual", "sae")
BUILTIN = "builtin"
MAX_LDA = 11  # the authors swept LDA up to 11 directions
DISTRACTORS = ("length", "pc:N")
TSV_HEADER = ("task", "word_a", "word_b")


@dataclass(frozen=True)
class WordPairParams:
    """Which pairs, which distractors, how to score."""

    pairs: str = BUILTIN  # or a path: TSV (task, word_a, word_b) or the Google analogy format
    tasks: tuple[str, ...] = ()  # restrict to these tasks
    lda_components: tuple[int, ...] = ()  # empty: 1 .. min(classes - 1, 11)
    distractors: tuple[str, ...] = ("length",)  # "length", "pc:N" (N-th PC of the centred differences)
    folds: int = 5
    prefix: str = " "  # put before each word (see the module docstring)
    ridge: float = 1.0  # penalty of the length regression (squared characters)
    seed: int = 0
    pairs_digest: str = ""  # set by run(): sha256 of the pairs file, so an edited file is not answered
    # from the cache


@dataclass(frozen=True)
class WordPair:
    task: str
    a: str
    b: str


@dataclass
class WordInputs:
    """What a word-pair analysis reads from the catalog: how to load the SAE and its model."""

    release: str
    sae_id: str
    source: str | None
    activation_model: str | None
    decoder_folded: bool
    pairs: list[WordPair]
    empty_tasks: list[str]
    device: str = "auto"


@dataclass
class WordVectors:
    """Per word: its tokens, its last token's text, the hook activation there and its encoding."""

    words: list[str]
    tokens: list[list[int]]
    last_token: list[str]
    residual: np.ndarray  # [n_words, d_in]
    sae: np.ndarray  # [n_words, d_sae]
    unknown: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # no tokens, or the unknown token


# ----------------------------------------------------------------------------- public API


def run(db: str | os.PathLike | None = None, release: str | None = None, sae_id: str | None = None, *,
        sae: int | None = None, params: WordPairParams = WordPairParams(), force: bool = False,
        device: str = "auto") -> Analysis:
    """Score the word-pair crystals of one SAE's model and encodings, and store the result (or
    return the stored one for the same parameters over the same catalog state)."""
    params = check_params(params)
    params = dataclasses.replace(params, pairs_digest=_digest(params.pairs))

    def load_with_device(cat: Catalog, record: SaeRecord, p: WordPairParams) -> WordInputs:
        return load(cat, record, p, device=device)

    return analyses.run(KIND, params, load_with_device, compute, db=db, release=release, sae_id=sae_id, sae=sae,
                        force=force)


def check_params(params: WordPairParams) -> WordPairParams:
    if params.folds < 2:
        raise SaecatError(f"folds must be at least 2, not {params.folds}")
    if any(int(n) < 1 for n in params.lda_components):
        raise SaecatError("lda_components must be positive")
    if params.ridge < 0:
        raise SaecatError("ridge must be >= 0")
    for spec in params.distractors:
        _parse_distractor(spec)
    return dataclasses.replace(params, tasks=tuple(params.tasks), distractors=tuple(params.distractors),
                               lda_components=tuple(int(n) for n in params.lda_components))


def load(cat: Catalog, record: SaeRecord, params: WordPairParams, device: str = "auto") -> WordInputs:
    """Where the SAE and its model come from (loaded later, with the catalog closed), and the pairs."""
    source, activation_model, folded = first_row(
        cat.con, "SELECT source, activation_model, decoder_folded FROM saes WHERE sae = ?", [record.sae])
    pairs, empty = read_pairs(params.pairs)
    return WordInputs(record.release, record.sae_id, source, activation_model or record.model, bool(folded),
                      select_tasks(pairs, params.tasks), [t for t in empty if not params.tasks or t in params.tasks],
                      device)


def compute(inputs: WordInputs, params: WordPairParams) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """Load the SAE and its model, embed every word in one batch, score the differences."""
    from ingest.model import model_for_sae
    from ingest.pipeline import resolve_device
    from ingest.sources import SaeSource, load_sae

    device = resolve_device(inputs.device)
    loaded = load_sae(SaeSource.recorded(inputs.release, inputs.sae_id, inputs.source), device, inputs.decoder_folded)
    model = model_for_sae(loaded, inputs.activation_model, device)
    words = sorted({w for p in inputs.pairs for w in (p.a, p.b)})
    vectors = embed_words(model, loaded, words, params.prefix)
    summary, tables = evaluate_words(inputs.pairs, vectors, params)
    empty = [{"task": t, "reason": "no pairs"} for t in inputs.empty_tasks]
    summary["skipped_tasks"] = empty + summary["skipped_tasks"]
    summary["model"] = inputs.activation_model or loaded.model_name
    summary["hook_name"] = loaded.hook_name
    return summary, tables


# ----------------------------------------------------------------------------- pairs


def read_pairs(spec: str = BUILTIN) -> tuple[list[WordPair], list[str]]:
    """(pairs, tasks that have a header but no pairs) from the built-in list or a file.

    A file is in the Google analogy format when its first line starts with ':' (": section"
    lines, then four words a line, giving the pairs (w1, w2) and (w3, w4)), else TSV: task, word_a,
    word_b, with an optional header line. Blank lines and lines starting with '#' are skipped;
    repeated pairs are kept once, in first-seen order."""
    if spec == BUILTIN:
        text = resources.files("queries").joinpath("data/word_pairs.tsv").read_text(encoding="utf-8")
        name = "built-in word_pairs.tsv"
    else:
        path = pathlib.Path(spec).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SaecatError(f"cannot read word pairs from {path}: {err}") from err
        name = str(path)
    lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip() and not line.lstrip().startswith("#")]
    google = bool(lines) and lines[0][1].lstrip().startswith(":")
    pairs: list[WordPair] = []
    sections: list[str] = []
    for n, line in lines:
        if google:
            if line.lstrip().startswith(":"):
                sections.append(line.lstrip()[1:].strip())
                if not sections[-1]:
                    raise SaecatError(f"{name}:{n}: a ':' line must name its section")
                continue
            words = line.split()
            if len(words) != 4:
                raise SaecatError(f"{name}:{n}: expected 4 words (a b c d), got {len(words)}: {line!r}")
            pairs += [WordPair(sections[-1], words[0], words[1]), WordPair(sections[-1], words[2], words[3])]
        else:
            fields = [f.strip() for f in line.split("\t")]
            if tuple(f.lower() for f in fields) == TSV_HEADER and not pairs:
                continue
            if len(fields) != 3 or not all(fields):
                raise SaecatError(f"{name}:{n}: expected task<TAB>word_a<TAB>word_b, got {line!r}")
            pairs.append(WordPair(*fields))
            if fields[0] not in sections:
                sections.append(fields[0])
    if not pairs:
        raise SaecatError(f"{name} has no word pairs")
    unique = list(dict.fromkeys(pairs))
    present = {p.task for p in unique}
    return unique, [s for s in dict.fromkeys(sections) if s not in present]


def select_tasks(pairs: list[WordPair], tasks: tuple[str, ...]) -> list[WordPair]:
    if not tasks:
        return pairs
    known = list(dict.fromkeys(p.task for p in pairs))
    missing = [t for t in tasks if t not in known]
    if missing:
        raise SaecatError(f"unknown task(s) {', '.join(missing)}; the pairs have: {', '.join(known)}")
    return [p for p in pairs if p.task in tasks]


# ----------------------------------------------------------------------------- the model


def embed_words(model, loaded, words: list[str], prefix: str = " ") -> WordVectors:
    """Every word through the model in one right-padded batch (BOS first when the SAE's model
    uses one): the activation at the SAE's hook on the word's last token, and its SAE encoding."""
    import torch

    tokenizer = model.tokenizer
    ids = tokenizer([prefix + w for w in words], add_special_tokens=False)["input_ids"] if words else []
    unk = tokenizer.unk_token_id
    unknown = np.array([len(t) == 0 or (unk is not None and unk in t) for t in ids], dtype=bool)
    bos = []
    if loaded.prepend_bos:
        bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos_id is None:
            raise SaecatError("the SAE expects a BOS token but the model's tokenizer has none")
        bos = [bos_id]
    rows = [bos + (list(t) if len(t) else [tokenizer.eos_token_id or 0]) for t in ids]
    width = max((len(r) for r in rows), default=1)
    if width > model.cfg.n_ctx:
        raise SaecatError(f"a word is {width} tokens long, more than the model's context ({model.cfg.n_ctx})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    last = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
    device = next(model.parameters()).device
    stop = None if loaded.layer is None else loaded.layer + 1
    with torch.inference_mode():
        # An explicit mask: transformer-lens then never infers padding from the tokenizer's side.
        _, cache = model.run_with_cache(tokens.to(device), attention_mask=mask.to(device),
                                        names_filter=loaded.hook_name, stop_at_layer=stop)
        acts = cache[loaded.hook_name][torch.arange(len(rows), device=device), last.to(device)]
        encoded = loaded.sae.encode(acts.to(loaded.sae.W_dec.dtype))
    residual = acts.reshape(len(rows), -1).float().cpu().numpy()
    last_token = [tokenizer.decode([r[-1]]) for r in rows]
    return WordVectors(list(words), [list(t) for t in ids], last_token, residual,
                       encoded.float().cpu().numpy(), unknown)


# ----------------------------------------------------------------------------- scoring


def evaluate_words(pairs: list[WordPair], vectors: WordVectors,
                   params: WordPairParams) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """Differences per pair in both spaces, then `evaluate`; unusable pairs and tasks are skipped
    and reported."""
    where = {w: i for i, w in enumerate(vectors.words)}
    skipped_pairs, kept = [], []
    for p in pairs:
        bad = [w for w in (p.a, p.b) if vectors.unknown[where[w]]]
        if bad:
            skipped_pairs.append({"task": p.task, "a": p.a, "b": p.b,
                                  "reason": f"no usable tokens for {', '.join(map(repr, bad))}"})
        else:
            kept.append(p)
    ia = np.array([where[p.a] for p in kept], dtype=np.int64)
    ib = np.array([where[p.b] for p in kept], dtype=np.int64)
    length = np.array([len(t.strip()) for t in vectors.last_token], dtype=np.float64)
    diffs = {"residual": vectors.residual[ib] - vectors.residual[ia], "sae": vectors.sae[ib] - vectors.sae[ia]}
    summary, tables = evaluate(diffs, [p.task for p in kept], length[ib] - length[ia], params)
    summary["skipped_pairs"] = skipped_pairs + summary["skipped_pairs"]
    summary["words"] = len(vectors.words)
    summary["multi_token_words"] = int(sum(len(t) > 1 for t in vectors.tokens))
    return summary, tables


def evaluate(diffs: dict[str, np.ndarray], tasks: list[str], length_delta: np.ndarray,
             params: WordPairParams = WordPairParams()) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """Silhouettes (raw, distractors projected out, LDA in sample and held out) and per-task
    crystal scores of pair differences [n_pairs, dim] per space, given each pair's task and its
    difference in last-token length. Tasks with fewer than 2 pairs are skipped (reported)."""
    tasks_arr = np.asarray(tasks, dtype=object)
    names, counts = np.unique(tasks_arr, return_counts=True) if len(tasks_arr) else (np.array([]), np.array([]))
    skipped = [{"task": str(t), "reason": f"{c} pair (need 2)"} for t, c in zip(names, counts) if c < 2]
    keep = np.isin(tasks_arr, [t for t, c in zip(names, counts) if c >= 2])
    skipped_pairs = [{"task": str(t), "reason": "task skipped"} for t in tasks_arr[~keep]]
    labels = tasks_arr[keep].astype(str)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise SaecatError(f"need at least two tasks with two or more usable pairs each; have {len(classes)}"
                          + (f" (skipped: {', '.join(s['task'] for s in skipped)})" if skipped else ""))
    length_delta = np.asarray(length_delta, dtype=np.float64)[keep]
    sweep_rows, task_rows, spaces = [], [], {}
    for space, values in diffs.items():
        x = np.asarray(values, dtype=np.float64)[keep]
        result = _evaluate_space(x, labels, classes, length_delta, params)
        spaces[space] = result["summary"]
        sweep_rows += [{"space": space, **row} for row in result["sweep"]]
        task_rows += [{"space": space, **row} for row in result["tasks"]]
    summary = {
        "n_pairs": int(keep.sum()), "n_tasks": len(classes),
        "tasks": {t: int((labels == t).sum()) for t in classes},
        "spaces": spaces, "skipped_tasks": skipped, "skipped_pairs": skipped_pairs,
        "folds": params.folds, "distractors": list(params.distractors),
    }
    sweep = pa.Table.from_pylist(sweep_rows, schema=SWEEP)
    per_task = pa.Table.from_pylist(task_rows, schema=TASKS)
    return summary, {"crystal_sweep": sweep, "crystal_tasks": per_task}


# The result tables' columns (catalog/schema.py), without `analysis`.
SWEEP = pa.schema([("space", pa.string()), ("method", pa.string()), ("n_components", pa.int32()),
                   ("silhouette", pa.float64()), ("silhouette_held_out", pa.float64())])
TASKS = pa.schema([("space", pa.string()), ("method", pa.string()), ("task", pa.string()), ("n_pairs", pa.int32()),
                   ("mean_cosine", pa.float64()), ("mean_error", pa.float64())])


def _evaluate_space(x: np.ndarray, labels: np.ndarray, classes: list[str], length_delta: np.ndarray,
                    params: WordPairParams) -> dict[str, Any]:
    basis, distractors = distractor_basis(x, labels, length_delta, params)
    projected = project_out(x, basis)
    components = _components(params.lda_components, len(classes), x.shape[1])
    sweep = [
        {"method": "raw", "n_components": None, "silhouette": _silhouette(x, labels), "silhouette_held_out": None},
        {"method": "project", "n_components": None, "silhouette": _silhouette(projected, labels),
         "silhouette_held_out": None},
    ]
    for n, (in_sample, held_out) in lda_sweep(x, labels, components, params.folds, params.seed).items():
        sweep.append({"method": "lda", "n_components": n, "silhouette": in_sample, "silhouette_held_out": held_out})
    lda_rows = [r for r in sweep if r["method"] == "lda"]
    best = max(lda_rows, key=lambda r: (_finite(r["silhouette_held_out"]), -r["n_components"]))
    best_in = max(lda_rows, key=lambda r: (_finite(r["silhouette"]), -r["n_components"]))
    views = {"raw": x, "project": projected, "lda": lda_transform(x, labels, best["n_components"])}
    task_rows, tasks = [], {}
    for method, values in views.items():
        for task in classes:
            cos, err = crystal_scores(values[labels == task])
            task_rows.append({"method": method, "task": task, "n_pairs": int((labels == task).sum()),
                              "mean_cosine": cos, "mean_error": err})
            tasks.setdefault(task, {})[method] = {"mean_cosine": cos, "mean_error": err}
    for task, by in tasks.items():
        by["improvement"] = {  # after distractor removal: cosine up, error down is better
            "cosine": _minus(by["project"]["mean_cosine"], by["raw"]["mean_cosine"]),
            "error": _minus(by["raw"]["mean_error"], by["project"]["mean_error"]),
        }
    return {
        "sweep": sweep, "tasks": task_rows,
        "summary": {
            "dim": int(x.shape[1]),
            "silhouette": {
                "raw": sweep[0]["silhouette"], "project": sweep[1]["silhouette"],
                "lda": {"n_components": best["n_components"], "held_out": best["silhouette_held_out"],
                        "in_sample": best["silhouette"]},
                "lda_best_in_sample": {"n_components": best_in["n_components"], "in_sample": best_in["silhouette"]},
            },
            "distractors": distractors,
            "pc1_length_corr": _pc1_length_corr(x, length_delta),
            "tasks": tasks,
        },
    }


def distractor_basis(x: np.ndarray, labels: np.ndarray, length_delta: np.ndarray,
                     params: WordPairParams) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """An orthonormal basis [dim, k] of the named distractor directions, and what each was."""
    vectors, info = [], []
    for spec in params.distractors:
        kind, arg = _parse_distractor(spec)
        if kind == "length":
            direction, r2 = length_direction(x, labels, length_delta, params.ridge)
            vectors.append(direction)
            info.append({"spec": spec, "r2": r2, "norm": float(np.linalg.norm(direction))})
        else:
            centred = x - x.mean(axis=0)
            _, s, vt = np.linalg.svd(centred, full_matrices=False)
            if not 1 <= arg <= len(s):
                raise SaecatError(f"distractor {spec}: components are numbered 1..{len(s)}")
            vectors.append(vt[arg - 1])
            info.append({"spec": spec, "explained": float(s[arg - 1] ** 2 / max((s**2).sum(), 1e-300))})
    if not vectors:
        return np.zeros((x.shape[1], 0)), info
    stacked = np.stack(vectors, axis=1)
    norms = np.linalg.norm(stacked, axis=0)
    stacked = stacked[:, norms > 1e-12]
    if stacked.shape[1] == 0:
        return np.zeros((x.shape[1], 0)), info
    q, r = np.linalg.qr(stacked)
    return q[:, np.abs(np.diag(r)) > 1e-10 * np.abs(r).max()], info


def length_direction(x: np.ndarray, labels: np.ndarray, length_delta: np.ndarray,
                     ridge: float = 1.0) -> tuple[np.ndarray, float]:
    """The direction w minimising sum |x_i - m_task(i) - w (l_i - lbar_task(i))|^2 + ridge |w|^2:
    ridge regression of the differences on their difference in last-token length, within tasks
    (each task's mean removed from both), so a task's own offset is never taken for length when
    a task's words differ in length systematically (plurals are longer). Returns (w, R²), R² the
    share of the within-task variance of the differences that w·Δlength explains."""
    xc = x.copy()
    lc = np.asarray(length_delta, dtype=np.float64).copy()
    for task in np.unique(labels):
        rows = labels == task
        xc[rows] -= xc[rows].mean(axis=0)
        lc[rows] -= lc[rows].mean()
    w = lc @ xc / (lc @ lc + ridge) if (lc @ lc + ridge) > 0 else np.zeros(x.shape[1])
    total = float((xc**2).sum())
    residual = float(((xc - np.outer(lc, w)) ** 2).sum())
    return w, (1.0 - residual / total) if total > 0 else 0.0


def project_out(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    return x - (x @ basis) @ basis.T if basis.shape[1] else x


def lda_transform(x: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The pairs projected on the top n discriminant directions of an LDA fitted on all of them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _lda(n).fit(x, labels).transform(x)


def lda_sweep(x: np.ndarray, labels: np.ndarray, components: list[int], folds: int,
              seed: int) -> dict[int, tuple[float, float | None]]:
    """(in-sample, held-out) silhouette of the LDA projection on n directions, for each n.

    In sample: LDA fitted on all pairs, silhouette of their projections (what the paper did).
    Held out: StratifiedKFold(folds); for each fold the LDA is fitted on the other folds and the
    held-out pairs are projected with it; each held-out pair's silhouette value is computed among
    the held-out pairs of its fold, in that fold's projection, and the values are averaged over
    all pairs. (Pooling all out-of-fold projections in one silhouette would compare points from
    different fits, whose axes differ by signs and rotations: that measures the folds' mismatch,
    not the clusters.) None when no fold could be scored.

    One fit per fold serves every n: LDA's projection on n directions is the first n columns of
    its projection on more (the discriminant directions come ordered)."""
    from sklearn.metrics import silhouette_samples
    from sklearn.model_selection import StratifiedKFold

    most = max(components)
    full = lda_transform(x, labels, most)
    held: dict[int, list[np.ndarray]] = {n: [] for n in components}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for train, test in splitter.split(x, labels):
            y_test = labels[test]
            usable = [n for n in components if n < len(set(labels[train]))]
            if not usable or not 2 <= len(set(y_test)) <= len(test) - 1:
                continue
            z = _lda(max(usable)).fit(x[train], labels[train]).transform(x[test])
            for n in usable:
                held[n].append(silhouette_samples(z[:, :n], y_test, metric="euclidean"))
    return {n: (_silhouette(full[:, :n], labels), float(np.concatenate(held[n]).mean()) if held[n] else None)
            for n in components}


def crystal_scores(d: np.ndarray) -> tuple[float | None, float | None]:
    """(mean cosine, mean parallelogram error |d_i - d_j| / (|d_i| + |d_j|)) over the pairs i < j
    of a task's differences; pairs with a zero difference are left out."""
    norms = np.linalg.norm(d, axis=1)
    d, norms = d[norms > 0], norms[norms > 0]
    if len(d) < 2:
        return None, None
    i, j = np.triu_indices(len(d), k=1)
    gram = d @ d.T
    cos = gram[i, j] / (norms[i] * norms[j])
    dist = np.sqrt(np.maximum(norms[i] ** 2 + norms[j] ** 2 - 2 * gram[i, j], 0))
    return float(cos.mean()), float((dist / (norms[i] + norms[j])).mean())


def _lda(n: int):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    return LinearDiscriminantAnalysis(n_components=n)


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(x, labels, metric="euclidean"))


def _components(asked: tuple[int, ...], n_classes: int, dim: int) -> list[int]:
    most = min(n_classes - 1, dim)
    if not asked:
        return list(range(1, min(most, MAX_LDA) + 1))
    bad = [n for n in asked if n > most]
    if bad:
        raise SaecatError(f"lda_components {bad} too large: with {n_classes} tasks in {dim} dimensions "
                          f"LDA has at most {most} directions")
    return sorted(set(asked))


def _pc1_length_corr(x: np.ndarray, length_delta: np.ndarray) -> float | None:
    """Correlation of the differences' first principal component (z-scored) with the difference
    in last-token length: what the authors saw in Gemma's residual stream."""
    std = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(std > 0, std, 1)
    if len(z) < 3 or np.std(length_delta) == 0:
        return None
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    score = z @ vt[0]
    if np.std(score) == 0:
        return None
    return float(np.corrcoef(score, length_delta)[0, 1])


def _finite(value: float | None) -> float:
    return -np.inf if value is None or not np.isfinite(value) else float(value)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _parse_distractor(spec: str) -> tuple[str, Any]:
    kind, _, arg = str(spec).partition(":")
    if kind == "length" and not arg:
        return "length", None
    if kind == "pc":
        try:
            return "pc", int(arg)
        except ValueError:
            pass
    raise SaecatError(f"unknown word-pair distractor {spec!r}: use {' or '.join(DISTRACTORS)}")


def _digest(spec: str) -> str:
    if spec == BUILTIN:
        data = resources.files("queries").joinpath("data/word_pairs.tsv").read_bytes()
    else:
        try:
            data = pathlib.Path(spec).expanduser().read_bytes()
        except OSError as err:
            raise SaecatError(f"cannot read word pairs from {spec}: {err.strerror}") from err
    return hashlib.sha256(data).hexdigest()[:16]


# ----------------------------------------------------------------------------- plot


def plot(analysis: Analysis, path: str | os.PathLike) -> pathlib.Path:
    """Silhouette against the number of LDA directions, per space (in sample and held out), with
    the raw and distractor-projected silhouettes as reference lines."""
    from queries.figures import figure

    sweep = analysis.tables["crystal_sweep"].to_pylist()
    spaces = [s for s in SPACES if any(r["space"] == s for r in sweep)]
    fig = figure(5.5 * len(spaces), 4)
    axes = fig.subplots(1, len(spaces), squeeze=False)
    for ax, space in zip(axes[0], spaces):
        rows = [r for r in sweep if r["space"] == space]
        lda = sorted((r for r in rows if r["method"] == "lda"), key=lambda r: r["n_components"])
        n = [r["n_components"] for r in lda]
        ax.plot(n, [r["silhouette"] for r in lda], "o-", label="LDA, in sample")
        ax.plot(n, [r["silhouette_held_out"] if r["silhouette_held_out"] is not None else np.nan for r in lda],
                "s--", label="LDA, held out")
        for method, style in (("raw", ":"), ("project", "-.")):
            value = next((r["silhouette"] for r in rows if r["method"] == method), None)
            if value is not None:
                ax.axhline(value, color="0.4", linestyle=style, label=method)
        ax.axhline(0, color="0.85", lw=0.8)
        ax.set_xlabel("LDA directions")
        ax.set_ylabel("silhouette (task labels)")
        ax.set_title(space)
        ax.legend(fontsize=8)
    fig.suptitle(f"word-pair crystals, {analysis.release}/{analysis.sae_id}")
    fig.tight_layout()
    out = pathlib.Path(path)
    fig.savefig(out)
    return out
