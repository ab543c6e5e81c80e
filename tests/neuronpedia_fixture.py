"""Hand-built Neuronpedia source exports, laid out exactly as each of Neuronpedia's four producers writes them.

The Neuronpedia importer tests need export folders whose content is known in advance. :func:`make_source` builds a
random but deterministic ground truth; :func:`write_export` writes it as a source folder
``<root>/<modelId>/<sourceId>/`` the way producer A, B or C writes it, optionally followed by D's explanations;
:func:`expected_source` says what such a folder records of the ground truth (each producer drops or rewrites some of
it), so a test can compare what it reads back with it. :func:`write_explanations_folder` adds the docs-only sibling
``explanations-<model>/`` folder.

Everything follows /work/shared/docs/neuronpedia-format.md (cited as "doc"):

- §1 layout: plain one-line ``*.jsonl`` files at the source root; ``<subfolder>/batch-<N>.jsonl.gz`` below it,
  gzipped at level 5, N from 0; the ``explanations-<model>/`` folders.
- §2 producers, rows per file and alignment: A (``export-data.py``, a dump of the production DB: 1024 rows per file in
  the TEXT order of ``index``, activations by numeric ranges), B (SAEDashboard converter: one file per dashboard
  batch, ``np.array_split`` of the features, default 128 a batch), C (llamascope converter: 2048 features a file),
  D (``batch-autointerp.py``: explanations only, a plain ``.jsonl`` file per flush of up to 50 features, numbered
  after the highest existing batch).
- §3 identifiers: ``layer`` holds the source id; ``index`` is a JSON string in A and D, a number in B and C.
- §4.1-4.8 row schemas: A's key sets and key order; B/C/D rows are the NP ``db_models`` dataclasses' ``__dict__``.
- §6 SAEDashboard conventions: values rounded to 5 dp, bin fields of the top and quantile groups, qualifying token.

Where the doc defers to the code it cites (dataclass key order, C's 4-dp truncation, D's flushes, numbering and
side files), the rows follow that code at the doc's snapshot (NP ``ebb8426f``). Serialisation follows each producer
too: A and D use ``json.dumps`` defaults (ASCII escapes, ``", "``), B and C use orjson (compact, raw UTF-8).
Gzip headers carry mtime 0 so that files are byte-for-byte reproducible.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # doc §5.5: the seeded bot user and the converters' fallback
PRODUCERS = ("A", "B", "C", "B+D", "C+D", "A+D")
FEATURES_PER_FILE = {"A": 1024, "B": 128, "C": 2048}  # doc §2 table
AUTOINTERP_BATCH_SIZE = 50  # D's --autointerp-batch-size default (doc §2)
FRAC_NONZERO_THRESHOLD = 1e-6  # D's --frac-nonzero-threshold default: sparser features are not explained
GZIP_LEVEL = 5  # doc §1: compress_files() and the converters use compresslevel=5
# (typeName, explanationModelName, D run with --generate-embeddings): names D accepts (doc §4.3).
EXPLAINERS = (
    ("oai_token-act-pair", "gpt-4o-mini", True),
    ("np_max-act-logits", "gpt-4.1-nano", True),
    ("np_acts-logits-general", "gemini-2.0-flash", False),
)
EMBEDDING_DIMENSIONS = 256  # doc §4.3: text-embedding-3-large with dimensions=256

_DB_TIME = "2024-04-15T17:42:08.123000"  # A: a Postgres timestamp(3) through isoformat()
_CONVERTER_TIME = "2025-02-03T04:05:06.789012"  # B/C: datetime.now() through orjson
_AUTOINTERP_TIME = "2025-03-04T05:06:07.890123"  # D: datetime.now().isoformat()
_HOST_ID = "clz0fixturehost00000000001"
_CREATOR_NAME = "saecat fixture"
# Token strings as SAEDashboard writes them (doc §4.2): spaces, newlines, SentencePiece pieces, non-ASCII, a quote and
# a backslash, U+2028 (a line break to str.splitlines, not to JSONL), special tokens.
_TOKENS = (" the", "\n", "▁x", "é", 'say "hi" \\o/', " of", ",", ".", "\t", " ", "<|endoftext|>", "日本", "🙂",
           "\u2028", "ing", " Paris", "<|outofrange|>", " 3", "▁", " café", "{", "}", "\\", '"')
_PHRASES = ("the token", '"quoted" words', "café menus", "日本語 text", "back\\slash paths", "numbers like 3.14",
            "Paris", "mentions of é", "closing braces }", "tabs and spaces")


@dataclass
class Activation:
    """One top-activating window: an ``activations/`` row (doc §4.2)."""

    id: str
    tokens: list[str]
    values: list[float]
    bin_min: float | None  # top group: binMin=-1, binContains=-1, binMax=feature max (doc §4.2, §6)
    bin_max: float | None
    bin_contains: float | None
    qualifying_token_index: int | None = None  # B/C only
    z_indices: list[list[int]] | None = None  # C only: [zKIndices, zQIndices] (doc §4.2)
    z_values: list[float] | None = None  # C only

    @property
    def max_value(self) -> float:
        return max(self.values)

    @property
    def min_value(self) -> float:
        return min(self.values)

    @property
    def max_value_token_index(self) -> int:
        return self.values.index(self.max_value)


@dataclass
class Explanation:
    """An ``explanations/`` row (doc §4.3)."""

    id: str
    description: str
    type_name: str | None
    explanation_model_name: str | None
    embedding: list[float] | None  # 256 floats for A/D when present
    author_id: str = DEFAULT_CREATOR_ID


@dataclass
class Feature:
    """A ``features/`` row (doc §4.1) with its windows and explanations."""

    index: int
    frac_nonzero: float
    max_act_approx: float
    pos_str: list[str]
    pos_values: list[float]
    neg_str: list[str]
    neg_values: list[float]
    freq_hist_heights: list[float]
    freq_hist_values: list[float]
    logits_hist_heights: list[float]
    logits_hist_values: list[float]
    top_cos_sim_indices: list[int]
    top_cos_sim_values: list[float]
    activations: list[Activation]
    explanations: list[Explanation]


@dataclass
class Source:
    """One Neuronpedia source (SAE): the ground truth of one export folder."""

    model_id: str  # e.g. "gpt2-small"
    source_id: str  # e.g. "8-res-jb" (grammar <layer>-<setName>[__<info>], doc §3)
    set_name: str  # e.g. "res-jb"
    features: list[Feature]
    dataset: str | None = "monology/pile-uncopyrighted"
    num_prompts: int | None = 24576
    num_tokens_in_prompt: int | None = 128
    release_name: str | None = "gpt2-small-res-jb"
    hook_name: str | None = "blocks.8.hook_resid_pre"


# ---------------------------------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------------------------------


def make_source(model_id: str = "gpt2-small", source_id: str = "8-res-jb", n_features: int = 40, seed: int = 0, *,
                windows: int = 3, window_tokens: int = 24,
                explanations_per_feature: tuple[int, int] = (0, 3)) -> Source:
    """A random but deterministic source of ``n_features`` features with indices 0..n_features-1.

    Feature 0 has ``windows`` windows (two of them tied at the feature max, one window with a tie inside), feature 1
    has none, feature 2 has all-zero windows (a dead feature); the others draw 0..``windows`` windows. Values are
    rounded to 5 dp as SAEDashboard does; live features draw ``explanations_per_feature`` (min, max) explanations
    from distinct :data:`EXPLAINERS`, dead ones get none.
    """
    layer, set_name = parse_source_id(source_id)
    rng = random.Random(f"{model_id}/{source_id}/{seed}")
    ids = _IdMaker(rng, seed)
    seen_windows: set[str] = set()
    features = []
    for index in range(n_features):
        count = {0: windows, 1: 0, 2: windows}.get(index, rng.randint(0, windows))
        acts = _make_windows(rng, ids, seen_windows, count, window_tokens, dead=index == 2, tie=index == 0)
        features.append(_make_feature(rng, ids, index, n_features, acts, explanations_per_feature))
    hook_name = f"blocks.{layer}.hook_resid_pre" if layer.isdigit() else None
    return Source(model_id, source_id, set_name, features, release_name=f"{model_id}-{set_name}", hook_name=hook_name)


def parse_source_id(source_id: str) -> tuple[str, str]:
    """(layer, setName) of ``<layerNum>-<sourceSetName>[__<additionalInfo>]``; an integer id is a "neurons" layer."""
    if source_id.lstrip("-").isdigit():
        return source_id, "neurons"
    layer, _, rest = source_id.partition("-")
    return layer, rest.split("__")[0]


class _IdMaker:
    """Activation ids like B/C's FastPseudoCuid (``c<pid hex><time hex><counter hex>``, cut to 25 characters) and
    explanation ids like D's cuid2 (25 lowercase characters starting with a letter)."""

    def __init__(self, rng: random.Random, seed: int) -> None:
        self._rng = rng
        self._prefix = f"c{0x3a00 + seed % 0x500:04x}{0x66a1b2c3 + seed:08x}"
        self._counter = 0

    def activation(self) -> str:
        self._counter += 1
        return f"{self._prefix}{self._counter:08x}"[:25]

    def explanation(self) -> str:
        tail = "".join(self._rng.choices(string.ascii_lowercase + string.digits, k=24))
        return self._rng.choice(string.ascii_lowercase) + tail


def _r5(x: float) -> float:
    return round(x, 5) + 0.0  # + 0.0 turns -0.0 into 0.0


def _make_windows(rng: random.Random, ids: _IdMaker, seen: set[str], count: int, n_tokens: int, *, dead: bool,
                  tie: bool) -> list[Activation]:
    peak = 0.0 if dead else _r5(rng.uniform(0.5, 20.0))
    n_top = (count + 1) // 2  # the first windows form the top group, the rest quantile groups (doc §6)
    acts = []
    for position in range(count):
        top = position < n_top
        if dead:
            window_peak = 0.0
        elif position == 0 or (tie and position == 1):
            window_peak = peak
        else:
            window_peak = _r5(peak * rng.uniform(0.7, 0.99) if top else peak * rng.uniform(0.1, 0.6))
        values = _make_values(rng, n_tokens, window_peak, inner_tie=tie and position == 2)
        bins = (-1, round(peak, 3), -1) if top else _quantile_bin(rng, window_peak)
        acts.append(Activation(ids.activation(), _unique_tokens(rng, seen, n_tokens), values, *bins,
                               qualifying_token_index=values.index(max(values)), **_z_pattern(rng, n_tokens)))
    return acts


def _make_values(rng: random.Random, n: int, peak: float, *, inner_tie: bool) -> list[float]:
    values = [0.0] * n
    if peak == 0.0:
        return values
    spots = rng.sample(range(n), k=min(n, 3 + n // 4))
    for spot in spots[1:]:
        values[spot] = _r5(peak * rng.uniform(0.05, 0.95))
    values[spots[0]] = peak
    if inner_tie and n > 1:
        values[spots[1]] = peak
    if rng.random() < 0.3:  # some windows dip below zero, so minValue < 0
        values[rng.choice([i for i, v in enumerate(values) if v == 0.0] or [spots[-1]])] = _r5(-rng.uniform(0.01, 0.5))
    return values


def _quantile_bin(rng: random.Random, window_peak: float) -> tuple[float, float, float]:
    """A quantile group's (binMin, binMax, binContains) as SAEDashboard parses "INTERVAL a - b<br>CONTAINS c%"."""
    low = round(window_peak * rng.uniform(0.5, 0.95), 3)
    high = round(window_peak * rng.uniform(1.05, 1.4), 3)
    return low, high, round(rng.uniform(0.5, 20.0), 3) / 100


def _unique_tokens(rng: random.Random, seen: set[str], n: int) -> list[str]:
    """D skips a window whose joined text it has seen before; keep every window's text distinct."""
    while True:
        tokens = rng.choices(_TOKENS, k=n)
        if "".join(tokens) not in seen:
            seen.add("".join(tokens))
            return tokens


def _z_pattern(rng: random.Random, n: int) -> dict[str, list]:
    if rng.random() < 0.5:
        return {}
    queries = sorted(rng.choices(range(n), k=2))
    keys = [rng.randint(0, q) for q in queries]
    return {"z_indices": [keys, queries], "z_values": [_r5(rng.uniform(0.01, 1.0)) for _ in queries]}


def _make_feature(rng: random.Random, ids: _IdMaker, index: int, n_features: int, acts: list[Activation],
                  explanations_per_feature: tuple[int, int]) -> Feature:
    max_act = max((a.max_value for a in acts), default=0.0)
    live = max_act > 0
    frac_nonzero = round(rng.uniform(0.001, 5.0), 3) / 100 if live else 0.0  # "DENSITY = x.xxx%" / 100
    pos_values = sorted((_r5(rng.uniform(0.1, 3.0)) for _ in range(10)), reverse=True)
    neg_values = sorted(_r5(-rng.uniform(0.1, 3.0)) for _ in range(10))
    freq_values, freq_heights = _histogram(rng, 0.0, max_act) if live else ([], [])
    logits_values, logits_heights = _histogram(rng, -1.0, 1.0)
    others = rng.sample([i for i in range(n_features) if i != index], k=min(4, n_features - 1))
    cos_values = sorted((_r5(rng.uniform(0.1, 0.9)) for _ in others), reverse=True)
    low, high = explanations_per_feature
    explainers = rng.sample(EXPLAINERS, k=min(len(EXPLAINERS), rng.randint(low, high))) if live else []
    return Feature(index, frac_nonzero, max_act, rng.choices(_TOKENS, k=10), pos_values, rng.choices(_TOKENS, k=10),
                   neg_values, freq_heights, freq_values, logits_heights, logits_values, [index, *others],
                   [1.0, *cos_values], acts, [_make_explanation(rng, ids, *e) for e in explainers])


def _histogram(rng: random.Random, low: float, high: float, bins: int = 50) -> tuple[list[float], list[float]]:
    """(bin centres, bar heights) as SAEDashboard writes them: n_bins=50, rounded to 5 dp, heights are counts."""
    width = (high - low) / bins
    return ([_r5(low + width * (i + 0.5)) for i in range(bins)], [float(rng.randint(0, 500)) for _ in range(bins)])


def _make_explanation(rng: random.Random, ids: _IdMaker, type_name: str, model_name: str,
                      with_embedding: bool) -> Explanation:
    description = " and ".join(rng.sample(_PHRASES, k=rng.randint(1, 3)))
    embedding = None
    if with_embedding:
        embedding = [round(rng.gauss(0.0, 0.0625), 6) + 0.0 for _ in range(EMBEDDING_DIMENSIONS)]
    return Explanation(ids.explanation(), description, type_name, model_name, embedding)


# ---------------------------------------------------------------------------------------------------------------------
# What each producer records
# ---------------------------------------------------------------------------------------------------------------------


def expected_source(source: Source, producer: str) -> Source:
    """The ground truth as an export by ``producer`` records it: what a reader can get back from the files.

    A drops ``qualifyingTokenIndex`` and z patterns; B drops topkCosSim, z patterns and explanations; C truncates
    floats to 4 dp, drops bins, histograms, topkCosSim and the dataset fields, and writes explanations with type and
    model "unknown" and no embedding; D rounds embeddings to 9 dp (or drops them for a run without embeddings).
    Every producer writes ``authorId`` = :data:`DEFAULT_CREATOR_ID`. For "X+D" the explanations are split as
    :func:`write_export` splits them; with "A+D" at a non-default batch size, rows D cannot reach stay in A's files,
    which records them the same way when descriptions are D-clean and embeddings have at most 9 decimals.
    """
    base, with_d = _parse_producer(producer)
    view = _feature_view(source, base)
    d_ids = _d_share(view, base, _live_indices(view)) if with_d else set()
    return replace(view, features=[_with_explanations(f, base, d_ids) for f in view.features])


def _parse_producer(producer: str) -> tuple[str, bool]:
    if producer not in PRODUCERS:
        raise ValueError(f"producer must be one of {PRODUCERS}, not {producer!r}")
    return producer[0], producer.endswith("+D")


def _feature_view(source: Source, base: str) -> Source:
    """``source`` with features and windows as ``base`` records them; explanations are left as they are."""
    if base == "A":
        n_rows = len(source.features)  # A exports activations of indices 0..COUNT(Neuron)-1 only
        features = [replace(f, activations=[_strip_window(a) for a in f.activations] if f.index < n_rows else [])
                    for f in source.features]
        return replace(source, features=features)
    _check_converter_source(source, base)
    if base == "B":
        features = [replace(f, top_cos_sim_indices=[], top_cos_sim_values=[],
                            activations=[replace(a, z_indices=None, z_values=None) for a in f.activations])
                    for f in source.features]
        return replace(source, features=features)
    return replace(source, features=[_c_feature(f) for f in source.features], dataset="", num_prompts=None,
                   num_tokens_in_prompt=None, hook_name=None)


def _strip_window(a: Activation) -> Activation:
    return replace(a, qualifying_token_index=None, z_indices=None, z_values=None)


def _truncate(x: float) -> float:
    """C's truncate_float: toward zero, to 4 decimal places."""
    return math.trunc(x * 10_000) / 10_000 if math.isfinite(x) else x


def _c_feature(f: Feature) -> Feature:
    acts = [Activation(a.id, a.tokens, [_truncate(v) for v in a.values], None, None, None, None, a.z_indices,
                       None if a.z_values is None else [_truncate(v) for v in a.z_values]) for a in f.activations]
    return replace(f, activations=acts, max_act_approx=max([0.0] + [a.max_value for a in acts]),
                   pos_values=[_truncate(v) for v in f.pos_values], neg_values=[_truncate(v) for v in f.neg_values],
                   freq_hist_heights=[], freq_hist_values=[], logits_hist_heights=[], logits_hist_values=[],
                   top_cos_sim_indices=[], top_cos_sim_values=[])


def _live_indices(view: Source) -> set[int]:
    """Features D explains when the activations and features batches line up (B, C, A at one file)."""
    return {f.index for f in view.features if f.activations and f.frac_nonzero >= FRAC_NONZERO_THRESHOLD
            and max(a.max_value for a in f.activations) != 0}


def _d_share(view: Source, base: str, live: set[int]) -> set[str]:
    """Ids of the explanations D writes: all of them after B (which writes none), otherwise every explanation but a
    feature's first that D can write (the feature is live and D-reachable, type and model are set)."""
    share = set()
    for f in view.features:
        for position, e in enumerate(f.explanations):
            can_write = f.index in live and e.type_name is not None and e.explanation_model_name is not None
            if base == "B" and not can_write:
                raise ValueError(f"batch-autointerp cannot write explanation {e.id} of feature {f.index}")
            if can_write and (base == "B" or position > 0):
                share.add(e.id)
    return share


def _with_explanations(f: Feature, base: str, d_ids: set[str]) -> Feature:
    """The explanations as written: D's share by D, the rest by A or C (B writes none)."""
    written = []
    for e in f.explanations:
        if e.id in d_ids:
            written.append(_d_explanation(e))
        elif base != "B":
            written.append(_a_explanation(e) if base == "A" else _c_explanation(e))
    return replace(f, explanations=written)


def _a_explanation(e: Explanation) -> Explanation:
    return replace(e, author_id=DEFAULT_CREATOR_ID)


def _c_explanation(e: Explanation) -> Explanation:
    return replace(e, type_name="unknown", explanation_model_name="unknown", embedding=None,
                   author_id=DEFAULT_CREATOR_ID)


def _d_explanation(e: Explanation) -> Explanation:
    """D strips one trailing "." and all newlines, and rounds embeddings to 9 dp."""
    description = e.description[:-1] if e.description.endswith(".") else e.description
    embedding = None if e.embedding is None else [round(v, 9) for v in e.embedding]
    return replace(e, description=description.replace("\n", "").replace("\r", ""), embedding=embedding,
                   author_id=DEFAULT_CREATOR_ID)


def _check_converter_source(source: Source, producer: str) -> None:
    """B and C build the source id as f"{layer_num}-{set}" (B: + "__<suffix>"), layer_num an int (doc §3)."""
    layer, set_name = parse_source_id(source.source_id)
    if not layer.isdigit() or set_name != source.set_name or (producer == "C" and "__" in source.source_id):
        raise ValueError(f"producer {producer} cannot write source id {source.source_id!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def write_export(root: Path, source: Source, producer: str, *, batch_size: int | None = None,
                 autointerp_batch_size: int = AUTOINTERP_BATCH_SIZE) -> Path:
    """Write ``root/<model_id>/<source_id>/`` as ``producer`` (one of :data:`PRODUCERS`) does; return that folder.

    ``batch_size`` is the base producer's features per file (default :data:`FEATURES_PER_FILE`: A 1024 rows, B 128
    features split with ``np.array_split``, C 2048); ``autointerp_batch_size`` is D's flush size. For "X+D" the base
    producer writes first, then D runs once per (typeName, explanationModelName), reading the activations/ and
    features/ files as D does: "B+D" gives D every explanation; "A+D"/"C+D" leave each feature's first explanation
    (and any D cannot reach) to A/C and give D the rest.
    """
    base, with_d = _parse_producer(producer)
    view = _feature_view(source, base)
    folder = Path(root) / source.model_id / source.source_id
    folder.mkdir(parents=True, exist_ok=True)
    per_file = batch_size or FEATURES_PER_FILE[base]
    for name, rows in (_a_root_rows(view) if base == "A" else _converter_root_rows(view, base)).items():
        _write_text(folder / name, "".join(_dumps_base(base, row) + "\n" for row in rows))
    _BODIES[base](folder, view, per_file)
    queue = _autointerp_queue(folder) if with_d else []
    d_ids = _d_share(view, base, {index for index, live in queue if live}) if with_d else set()
    if base == "A":
        _write_a_explanations(folder / "explanations", view, per_file, d_ids)
    elif base == "C":
        _write_c_explanations(folder, view, per_file, d_ids)
    if with_d:
        _write_autointerp(folder, view, d_ids, queue, autointerp_batch_size)
    return folder


def write_explanations_folder(root: Path, source: Source, model_name: str, *, batch_size: int = 1024) -> Path:
    """Write ``root/<model_id>/<source_id>/explanations-<model_name>/`` and return it (doc §1, docs only; no code
    writes it). It holds the source's explanations by ``model_name`` as A's gzipped explanation batches (A's keys,
    text order of ``index``, ``batch_size`` rows a file), keeping each row's ``authorId``."""
    folder = Path(root) / source.model_id / source.source_id / f"explanations-{model_name}"
    pairs = [(f, e) for f in _text_order(source.features) for e in f.explanations
             if e.explanation_model_name == model_name]
    _write_batches(folder, [_dumps_a(_a_explanation_row(source, f, e, e.author_id)) for f, e in pairs], batch_size)
    return folder


def _dumps_a(row: dict) -> str:
    """A and D: ``json.dumps`` defaults (ASCII escapes, ", " and ": " separators)."""
    return json.dumps(row)


def _dumps_orjson(row: dict) -> str:
    """B and C: what ``orjson.dumps`` writes (compact, raw UTF-8)."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def _dumps_base(base: str, row: dict) -> str:
    return _dumps_a(row) if base == "A" else _dumps_orjson(row)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())


def _write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))


def _write_batches(folder: Path, lines: list[str], per_file: int) -> None:
    """``folder/batch-<N>.jsonl.gz``, ``per_file`` lines each; the folder exists even with no lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(lines), per_file)):
        _write_gz(folder / f"batch-{n}.jsonl.gz", lines[start:start + per_file])


def _text_order(features: Iterable[Feature]) -> list[Feature]:
    """Postgres ``ORDER BY index`` on the TEXT column: "0", "1", "10", "100", ... (doc §2)."""
    return sorted(features, key=lambda f: str(f.index))


# --- root files (doc §4.4-4.8) ---------------------------------------------------------------------------------------


def _a_root_rows(s: Source) -> dict[str, list[dict]]:
    """A: ``SELECT *`` of each table (keys in the doc's schema order), creatorId rewritten, hostUrl blanked."""
    rows = {
        "model.jsonl": [{
            "id": s.model_id, "displayNameShort": s.model_id, "displayName": s.model_id,
            "creatorId": DEFAULT_CREATOR_ID, "tlensId": s.model_id, "openRouterId": None, "dimension": None,
            "thinking": False, "visibility": "PUBLIC", "defaultSourceSetName": s.set_name,
            "defaultSourceId": s.source_id, "defaultGraphSourceSetName": None, "inferenceEnabled": True,
            "instruct": s.model_id.endswith("-it"), "layers": 0, "neuronsPerLayer": 0, "createdAt": _DB_TIME,
            "owner": "", "updatedAt": _DB_TIME, "website": None}],
        "source.jsonl": [{
            "id": s.source_id, "modelId": s.model_id, "setName": s.set_name, "creatorId": DEFAULT_CREATOR_ID,
            "hasDashboards": True, "inferenceEnabled": True, "saelensConfig": None, "saelensRelease": None,
            "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
            "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
            "num_prompts": s.num_prompts, "num_tokens_in_prompt": s.num_tokens_in_prompt, "dataset": s.dataset,
            "notes": None, "cosSimMatchModelId": None, "cosSimMatchSourceId": None, "createdAt": _DB_TIME}],
        "sourceset.jsonl": [{
            "modelId": s.model_id, "name": s.set_name, "hasDashboards": True, "allowInferenceSearch": True,
            "visibility": "PUBLIC", "description": _set_description(s), "type": "", "creatorName": _CREATOR_NAME,
            "urls": [], "creatorEmail": None, "creatorId": DEFAULT_CREATOR_ID, "releaseName": s.release_name,
            "hasGraphs": False, "graphEnabled": False, "similarityMatrixEnabled": False, "defaultOfModelId": None,
            "defaultGraphModelId": None, "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False,
            "showCorrelated": False, "showHeadAttribution": False, "showUmap": False, "createdAt": _DB_TIME}],
        "inference_hosts_on_source.jsonl": [{
            "sourceId": s.source_id, "sourceModelId": s.model_id, "inferenceHostId": _HOST_ID}],
        "inference_hosts.jsonl": [{
            "id": _HOST_ID, "name": "fixture-host", "hostUrl": "", "engine": "TRANSFORMER_LENS",
            "modelId": s.model_id, "runpodServerlessUrl": None, "createdAt": _DB_TIME, "updatedAt": _DB_TIME}],
    }
    if s.release_name is not None:  # A exports the release only when the source set has one
        rows["release.jsonl"] = [{
            "name": s.release_name, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
            "description": _release_title(s), "descriptionShort": _release_title(s), "urls": [],
            "creatorEmail": None, "creatorName": _CREATOR_NAME, "creatorNameShort": _CREATOR_NAME,
            "creatorId": DEFAULT_CREATOR_ID, "defaultSourceSetName": None, "defaultSourceId": None,
            "defaultUmapSourceIds": [], "createdAt": _DB_TIME}]
    return rows


def _converter_root_rows(s: Source, producer: str) -> dict[str, list[dict]]:
    """B/C: the NP ``db_models`` dataclasses' ``__dict__`` (doc §4.4-4.7)."""
    b = producer == "B"
    rows = {
        "model.jsonl": [{
            "id": s.model_id, "instruct": s.model_id.endswith("-it"), "creatorId": DEFAULT_CREATOR_ID,
            "displayNameShort": s.model_id, "displayName": s.model_id, "tlensId": None, "dimension": None,
            "visibility": "PUBLIC", "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": True,
            "layers": 0, "neuronsPerLayer": 0, "createdAt": _CONVERTER_TIME, "owner": "",
            "updatedAt": _CONVERTER_TIME, "website": None}],
        "sourceset.jsonl": [{
            "modelId": s.model_id, "name": s.set_name, "creatorId": DEFAULT_CREATOR_ID, "hasDashboards": True,
            "visibility": "PUBLIC", "description": _set_description(s), "type": "", "creatorName": _CREATOR_NAME,
            "urls": [], "creatorEmail": None, "releaseName": s.release_name, "defaultOfModelId": None,
            "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
            "showHeadAttribution": False, "showUmap": False, "createdAt": _CONVERTER_TIME}],
        "source.jsonl": [{
            "id": s.source_id, "modelId": s.model_id, "setName": s.set_name, "creatorId": DEFAULT_CREATOR_ID,
            "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None,
            "saelensRelease": None, "saelensSaeId": None,
            # B: --hf-weights-repo-id and --hf-weights-path without its last segment; C: empty options become null
            "hfRepoId": f"saecat-fixtures/{s.model_id}" if b else None, "hfFolderId": s.source_id if b else None,
            "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
            "hasUmapClusters": False, "num_prompts": s.num_prompts, "num_tokens_in_prompt": s.num_tokens_in_prompt,
            "dataset": s.dataset, "notes": None, "createdAt": _CONVERTER_TIME}],
    }
    if s.release_name is not None:  # the converters require --release-id; a source without one gets no file here
        rows["release.jsonl"] = [{
            "name": s.release_name, "description": _release_title(s), "creatorName": _CREATOR_NAME,
            "creatorId": DEFAULT_CREATOR_ID, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
            "descriptionShort": _release_title(s), "urls": [], "creatorEmail": None, "creatorNameShort": _CREATOR_NAME,
            "defaultSourceSetName": None, "defaultSourceId": None, "defaultUmapSourceIds": [],
            "createdAt": _CONVERTER_TIME}]
    return rows


def _set_description(s: Source) -> str:
    return f"{s.set_name} ({s.model_id})"


def _release_title(s: Source) -> str:
    return f"Fixture release {s.release_name}"


# --- producer A ------------------------------------------------------------------------------------------------------


def _write_a_body(folder: Path, s: Source, per_file: int) -> None:
    """features/ in text order of index; activations/batch-N = numeric indices [per_file*N, per_file*N+per_file-1],
    a file for every N even when empty, rows in no particular order (doc §2, §4.2)."""
    _write_batches(folder / "features", [_dumps_a(_a_feature_row(s, f)) for f in _text_order(s.features)], per_file)
    by_index = {f.index: f for f in s.features}
    for n in range(math.ceil(len(s.features) / per_file)):
        rows = [_a_activation_row(s, by_index[i], a) for i in range(n * per_file, (n + 1) * per_file)
                if i in by_index for a in by_index[i].activations]
        random.Random(n).shuffle(rows)
        _write_gz(folder / "activations" / f"batch-{n}.jsonl.gz", [_dumps_a(r) for r in rows])


def _write_a_explanations(folder: Path, s: Source, per_file: int, d_ids: set[str]) -> None:
    """1024 rows a file in text order of index, so one feature's rows may straddle two files (doc §2)."""
    rows = [_a_explanation_row(s, f, e, DEFAULT_CREATOR_ID)
            for f in _text_order(s.features) for e in f.explanations if e.id not in d_ids]
    _write_batches(folder, [_dumps_a(r) for r in rows], per_file)


def _floats(values: list[float]) -> list[float]:
    return [float(v) for v in values]


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _a_feature_row(s: Source, f: Feature) -> dict:
    return {
        "modelId": s.model_id, "layer": s.source_id, "index": str(f.index), "maxActApprox": float(f.max_act_approx),
        "creatorId": DEFAULT_CREATOR_ID, "frac_nonzero": float(f.frac_nonzero),
        "freq_hist_data_bar_heights": _floats(f.freq_hist_heights),
        "freq_hist_data_bar_values": _floats(f.freq_hist_values),
        "logits_hist_data_bar_heights": _floats(f.logits_hist_heights),
        "logits_hist_data_bar_values": _floats(f.logits_hist_values),
        "neuron_alignment_indices": [], "neuron_alignment_l1": [], "neuron_alignment_values": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "decoder_weights_dist": [], "neg_str": f.neg_str, "neg_values": _floats(f.neg_values), "pos_str": f.pos_str,
        "pos_values": _floats(f.pos_values), "sourceSetName": s.set_name, "topkCosSimIndices": f.top_cos_sim_indices,
        "topkCosSimValues": _floats(f.top_cos_sim_values), "vector": [], "vectorLabel": None, "hookName": s.hook_name,
        "vectorDefaultSteerStrength": 10.0, "hasVector": False,
    }


def _a_activation_row(s: Source, f: Feature, a: Activation) -> dict:
    return {
        "id": a.id, "modelId": s.model_id, "layer": s.source_id, "index": str(f.index),
        "creatorId": DEFAULT_CREATOR_ID, "dataSource": None, "tokens": a.tokens, "maxValue": float(a.max_value),
        "minValue": float(a.min_value), "values": _floats(a.values), "maxValueTokenIndex": a.max_value_token_index,
        "dfaValues": [], "dfaMaxValue": None, "dfaTargetIndex": None, "binContains": _float_or_none(a.bin_contains),
        "binMin": _float_or_none(a.bin_min), "binMax": _float_or_none(a.bin_max),
    }


def _a_explanation_row(s: Source, f: Feature, e: Explanation, author_id: str) -> dict:
    """``embedding`` comes through psycopg2 without a pgvector adapter: the vector's text form, or null (doc §4.3)."""
    embedding = None if e.embedding is None else "[" + ",".join(repr(float(v)) for v in e.embedding) + "]"
    return {
        "id": e.id, "modelId": s.model_id, "layer": s.source_id, "index": str(f.index), "authorId": author_id,
        "description": e.description, "embedding": embedding, "typeName": e.type_name,
        "explanationModelName": e.explanation_model_name, "umap_x": 0.0, "umap_y": 0.0, "umap_cluster": 0,
        "umap_log_feature_sparsity": 0.0,
    }


# --- producers B and C -----------------------------------------------------------------------------------------------


def _array_split(items: list[Feature], per_file: int) -> list[list[Feature]]:
    """SAEDashboard's batches: ``np.array_split(range(d_sae), ceil(d_sae / n_features_at_a_time))`` (doc §6)."""
    if not items:
        return []
    n_parts = math.ceil(len(items) / per_file)
    size, extra = divmod(len(items), n_parts)
    bounds = [0]
    for part in range(n_parts):
        bounds.append(bounds[-1] + size + (part < extra))
    return [items[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def _c_chunks(items: list[Feature], per_file: int) -> list[list[Feature]]:
    """The llamascope converter's batches: ``--batch-size`` rows each, the last one shorter."""
    return [items[start:start + per_file] for start in range(0, len(items), per_file)]


def _write_b_body(folder: Path, s: Source, per_file: int) -> None:
    _write_converter_body(folder, s, _array_split(sorted(s.features, key=lambda f: f.index), per_file), "B")


def _write_c_body(folder: Path, s: Source, per_file: int) -> None:
    _write_converter_body(folder, s, _c_chunks(sorted(s.features, key=lambda f: f.index), per_file), "C")
    (folder / "explanations").mkdir(exist_ok=True)


def _write_converter_body(folder: Path, s: Source, batches: list[list[Feature]], producer: str) -> None:
    """features/batch-N and activations/batch-N hold the same features (doc §2: B and C files line up)."""
    for n, batch in enumerate(batches):
        _write_gz(folder / "features" / f"batch-{n}.jsonl.gz",
                  [_dumps_orjson(_converter_feature_row(s, f, producer)) for f in batch])
        _write_gz(folder / "activations" / f"batch-{n}.jsonl.gz",
                  [_dumps_orjson(_converter_activation_row(s, f, a)) for f in batch for a in f.activations])


def _write_c_explanations(folder: Path, s: Source, per_file: int, d_ids: set[str]) -> None:
    """explanations/batch-N beside features/batch-N, written only when the batch has explanations."""
    for n, batch in enumerate(_c_chunks(sorted(s.features, key=lambda f: f.index), per_file)):
        rows = [_dataclass_explanation_row(s, f.index, _c_explanation(e), _CONVERTER_TIME)
                for f in batch for e in f.explanations if e.id not in d_ids]
        if rows:
            _write_gz(folder / "explanations" / f"batch-{n}.jsonl.gz", [_dumps_orjson(r) for r in rows])


def _b_max_act(f: Feature) -> float:
    """B's maxActApprox loop starts from the int 0, so a feature without a positive window writes 0, not 0.0."""
    best: float = 0
    for a in f.activations:
        best = a.max_value if a.max_value > best else best
    return best


def _converter_feature_row(s: Source, f: Feature, producer: str) -> dict:
    """The ``Feature`` dataclass (NP db_models/feature.py). SAEDashboard batches always carry ``vector``, so B sets
    hookName and vectorDefaultSteerStrength = maxActApprox; C leaves both at their defaults."""
    b = producer == "B"
    max_act = _b_max_act(f) if b else f.max_act_approx
    return {
        "modelId": s.model_id, "layer": s.source_id, "index": f.index, "creatorId": DEFAULT_CREATOR_ID,
        "createdAt": _CONVERTER_TIME, "maxActApprox": max_act, "hasVector": False, "vector": [], "vectorLabel": None,
        "vectorDefaultSteerStrength": max_act if b else 10, "hookName": s.hook_name if b else None,
        "topkCosSimIndices": f.top_cos_sim_indices, "topkCosSimValues": f.top_cos_sim_values,
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        "neg_str": f.neg_str, "neg_values": f.neg_values, "pos_str": f.pos_str, "pos_values": f.pos_values,
        "frac_nonzero": f.frac_nonzero, "freq_hist_data_bar_heights": f.freq_hist_heights,
        "freq_hist_data_bar_values": f.freq_hist_values, "logits_hist_data_bar_heights": f.logits_hist_heights,
        "logits_hist_data_bar_values": f.logits_hist_values, "decoder_weights_dist": [], "sourceSetName": None,
    }


def _converter_activation_row(s: Source, f: Feature, a: Activation) -> dict:
    """The ``Activation`` dataclass (NP db_models/activation.py): B leaves zIndices/zValues null."""
    return {
        "id": a.id, "tokens": a.tokens, "index": f.index, "layer": s.source_id, "modelId": s.model_id,
        "maxValue": a.max_value, "maxValueTokenIndex": a.max_value_token_index, "minValue": a.min_value,
        "values": a.values, "creatorId": DEFAULT_CREATOR_ID, "dataSource": None, "dataIndex": None, "dfaValues": [],
        "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": _CONVERTER_TIME, "lossValues": [],
        "logitContributions": None, "binMin": a.bin_min, "binMax": a.bin_max, "binContains": a.bin_contains,
        "qualifyingTokenIndex": a.qualifying_token_index, "zIndices": a.z_indices, "zValues": a.z_values,
    }


def _dataclass_explanation_row(s: Source, index: int | str, e: Explanation, created_at: str) -> dict:
    """The ``Explanation`` dataclass (NP db_models/explanation.py), as C and D write it."""
    return {
        "id": e.id, "modelId": s.model_id, "layer": s.source_id, "index": index, "description": e.description,
        "authorId": e.author_id, "embedding": e.embedding, "triggeredById": None, "typeName": e.type_name,
        "explanationModelName": e.explanation_model_name, "notes": None, "createdAt": created_at,
    }


# --- producer D ------------------------------------------------------------------------------------------------------


def _batch_number(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def _read_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return [json.loads(line) for line in f.read().split("\n") if line]


def _autointerp_queue(folder: Path) -> list[tuple[int, bool]]:
    """(index, live) of the features D enqueues, in its order: activations files by batch number, each paired with
    the features file of the same name; a window whose text was seen before in the file is skipped; features absent
    from the paired file or below the density threshold are not enqueued; a live feature's top window is not 0."""
    queue = []
    for path in sorted((folder / "activations").glob("*.gz"), key=_batch_number):
        features = {row["index"]: row for row in _read_rows(folder / "features" / path.name)}
        seen: set[str] = set()
        maxima: dict[int | str, float] = {}
        for row in _read_rows(path):
            text = "".join(row["tokens"])
            if text not in seen:
                seen.add(text)
                maxima[row["index"]] = max(maxima.get(row["index"], row["maxValue"]), row["maxValue"])
        queue += [(int(index), top != 0) for index, top in maxima.items()
                  if index in features and features[index]["frac_nonzero"] >= FRAC_NONZERO_THRESHOLD]
    return queue


def _autointerp_runs(s: Source, d_ids: set[str]) -> dict[tuple[str, str], dict[int, Explanation]]:
    """D's share grouped by run: one (typeName, explanationModelName) a run, one explanation a feature."""
    runs: dict[tuple[str, str], dict[int, Explanation]] = {}
    for f in sorted(s.features, key=lambda f: f.index):
        for e in f.explanations:
            if e.id in d_ids:
                run = runs.setdefault((e.type_name, e.explanation_model_name), {})
                if f.index in run:
                    raise ValueError(f"feature {f.index} has two {e.explanation_model_name} explanations for D")
                run[f.index] = e
    return runs


def _write_autointerp(folder: Path, s: Source, d_ids: set[str], queue: list[tuple[int, bool]], per_flush: int) -> None:
    out = folder / "explanations"
    out.mkdir(exist_ok=True)
    for (type_name, model_name), chosen in _autointerp_runs(s, d_ids).items():
        with_embeddings = _run_embeddings(chosen.values())
        config = _autointerp_config(folder, type_name, model_name, per_flush, with_embeddings)
        _write_text(out / "config.json", json.dumps(config, indent=2))
        # D flushes every per_flush enqueued features, then once more at the end (possibly with nothing).
        flushes = [queue[i:i + per_flush] for i in range(0, len(queue), per_flush)]
        flushes += [[]] if len(queue) % per_flush == 0 else []
        for flush in flushes:
            rows = sorted((_d_row(s, index, chosen[index]) for index, _ in flush if index in chosen),
                          key=lambda row: row["index"])
            if rows or not with_embeddings:  # an embeddings request with no input fails and writes nothing
                lines = [_dumps_a(r) for r in rows]
                _write_text(out / f"batch-{_next_batch_number(out)}.jsonl", "".join(line + "\n" for line in lines))
        failed = [index for index, live in queue if live and index not in chosen]
        with open(out / "failed_explanation_indexes.txt", "a") as f:
            f.writelines(f"{index}\n" for index in failed)


def _run_embeddings(explanations: Iterable[Explanation]) -> bool:
    """A D run generates embeddings for all of its explanations or for none."""
    present = {e.embedding is not None for e in explanations}
    if len(present) > 1:
        raise ValueError("one D run cannot mix explanations with and without embeddings")
    return present == {True}


def _d_row(s: Source, index: int, e: Explanation) -> dict:
    """D's row: index as str(feature_index); no ``embedding`` key at all without --generate-embeddings."""
    row = _dataclass_explanation_row(s, str(index), _d_explanation(e), _AUTOINTERP_TIME)
    if row["embedding"] is None:
        del row["embedding"]
    return row


def _next_batch_number(folder: Path) -> int:
    """D's get_next_batch_number: one past the highest batch among ``*.jsonl*`` files (gzipped or not), else 0."""
    return max((_batch_number(p) for p in folder.glob("*.jsonl*")), default=-1) + 1


def _autointerp_config(folder: Path, type_name: str, model_name: str, per_flush: int, with_embeddings: bool) -> dict:
    """The ``AutoInterpConfig`` D writes to explanations/config.json at the start of each run."""
    return {
        "input_dir_with_source_exports": str(folder), "s3_exports_path": None, "api_provider": "openrouter",
        "start_index": 0, "end_index": None, "explainer_model_name": model_name, "explainer_type_name": type_name,
        "reasoning_effort": None, "max_top_activations_to_show_explainer_per_feature": 20,
        "autointerp_batch_size": per_flush, "gzip_output": False, "ignore_first_n_tokens": 0,
        "generate_embeddings": with_embeddings, "frac_nonzero_threshold": FRAC_NONZERO_THRESHOLD,
        "activation_selection_mode": "top",
    }

_BODIES: dict[str, Callable[[Path, Source, int], None]] = {"A": _write_a_body, "B": _write_b_body, "C": _write_c_body}
