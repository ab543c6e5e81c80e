"""saecat's HTTP API (`saecat serve`): FastAPI glue over the catalog's Python API, `Catalog`.

Concurrency: DuckDB lets one process write a file, and only while no other process has it open,
even read-only. So the server holds no connection between requests: each request opens the
catalog read-only, reads, and closes it before its response is sent. An ingestion in another
process opens the file only briefly (checkpoints, the final commit) and retries while a request
has it; a request that finds it held waits up to `lock_wait_s`, then answers 503 with
Retry-After. A SQL query holds the file while it runs, which `timeout_s` bounds.

Queries: each /sql query runs in a worker process of its own (catalog/limits.py), which cannot
grow past `memory_limit` and is killed at `timeout_s`; the request's thread only waits for it, so
the event loop, /health and other requests go on. At most `max_queries` run at once (so the
server's queries take at most max_queries x memory_limit); one more waits up to `lock_wait_s`
for a turn, then gets 503. A spare worker waits, loaded, for the next query.

Access: with a token, every catalog endpoint needs `Authorization: Bearer <token>`, or the browser
pages' login cookie (queries.front.pages: HttpOnly, SameSite=Strict, and a POST must come from this
server's own origin). /health and the API's description (/openapi.json, /docs, /redoc) stay open:
they tell nothing about the catalog, and /docs is where a user types the token in (its Authorize
button).

Pages: /ui serves the browser pages over the same catalog calls (queries.front.pages); / sends a
browser there.

Errors are `{"error": message}`: 400 for a refused or failing query and other catalog errors, 404
for an unknown SAE or feature, 401, 503 while the catalog is held. Two come from FastAPI as they
are: 413 (plain text) for a body over `max_body_bytes`, and 422 with the details for a request
that does not fit the schema.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time,
# and one of them names a variable of create_app.
import functools
import os
import tempfile
import threading
from datetime import datetime
from pathlib import PurePath
from importlib.metadata import version
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, Json, WithJsonSchema, model_validator
from sqlglot.dialects import Dialects
from starlette.exceptions import HTTPException

from catalog import Catalog
from catalog import limits
from catalog.errors import CatalogBusy, NotFound, SaecatError
from catalog.query import QueryResult, json_value
from queries import analyses
from queries import neighbors as nn
from queries.compare import Fidelity, compare
from queries.front import pages
from queries.search import search

RETRY_AFTER_S = 1
_INT32 = 2**31 - 1  # SAE keys and feature indices are INTEGER columns


# ------------------------------------------------------------------------------------- models

# The catalog's TIMESTAMP columns carry no time zone, so their JSON has none either: not RFC 3339's
# date-time, which needs one.
Timestamp = Annotated[datetime, WithJsonSchema({"type": "string", "description": "ISO 8601, no time zone."})]


class ErrorBody(BaseModel):
    error: str


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(description="One SELECT over the catalog's tables.",
                       examples=["SELECT feature, fire_count FROM features ORDER BY fire_count DESC LIMIT 10"])
    dialect: Dialects | None = Field(None, description="The SQL dialect the query is written in (default duckdb).")
    max_rows: int | None = Field(None, ge=0, description="Return at most this many rows; the server caps it.")


class SqlResult(BaseModel):
    columns: list[str]
    rows: list[list[Any]] = Field(description="Rows in column order. NaN and infinities are null; dates and "
                                              "times ISO 8601; types JSON lacks (BLOB, UUID, INTERVAL) text.")
    truncated: bool = Field(description="The query had more rows than were returned.")


class Sae(BaseModel):
    """A row of `saes`. Columns added by later schema versions come along under their own names."""

    model_config = ConfigDict(extra="allow")

    sae: int
    release: str
    sae_id: str
    source: str | None
    model: str | None
    hook_name: str | None
    layer: int | None
    d_in: int | None
    d_sae: int | None
    architecture: str | None
    neuronpedia_id: str | None
    status: str
    decoder_folded: bool | None
    activation_model: str | None
    dataset: str | None
    text_column: str | None
    n_documents: int | None
    n_tokens: int | None
    n_blocks: int | None
    block_size: int | None
    threshold: float | None
    max_doc_tokens: int | None
    ingested_at: Timestamp | None
    # the pair policy (schema v6): where pairs_complete is false, a missing pair is below the policy, not n11 = 0
    pair_min_blocks: int | None = None
    pair_top_partners: int | None = None
    pair_rank_by: str | None = None
    pairs_complete: bool | None = None
    # sparsity and fidelity (schema v8, `sae_quality`), null until measured; registry_l0 is the registry's claim
    registry_l0: float | None = None
    l0: float | None = None
    l1: float | None = None
    mse: float | None = None
    explained_variance: float | None = None
    fvu: float | None = None
    cossim: float | None = None
    l2_ratio: float | None = None
    relative_reconstruction_bias: float | None = None
    dead_latents: int | None = None
    dense_1pct: int | None = None
    dense_10pct: int | None = None
    ce_loss_score: float | None = None
    delta_lm_loss: float | None = None
    kl_div_score: float | None = None


class CompareQuery(BaseModel):
    """GET /compare's filters. An unknown one is refused (422): a misspelt filter must not select everything."""

    model_config = ConfigDict(extra="forbid")

    release: str | None = Field(None, description="Only this release's SAEs.")
    model: str | None = Field(None, description="Only this model's SAEs.")
    hook: str | None = Field(None, description="Only hooks matching this glob (case-sensitive; * any characters, "
                                               "? one), e.g. blocks.12.*")
    fidelity: Fidelity = Field("fvu", description="fvu, mse, delta_lm_loss: lower is better; explained_variance, "
                                                  "ce_loss_score, kl_div_score: higher.")


class ComparedSae(BaseModel):
    """One SAE of GET /compare: its measured L0 and the fidelity figure asked for, under its own name
    (the others are left out), and whether it is on its site's frontier."""

    sae: int
    release: str
    sae_id: str
    model: str | None
    hook_name: str | None
    d_sae: int | None
    l0: float | None
    fvu: float | None = None
    explained_variance: float | None = None
    mse: float | None = None
    delta_lm_loss: float | None = None
    ce_loss_score: float | None = None
    kl_div_score: float | None = None
    registry_l0: float | None = Field(description="The L0 the registry states, beside the measured one.")
    pareto: bool = Field(description="On the frontier of (lower L0, better fidelity) among the SAEs of its model "
                                     "and hook_name; never where the figure is null (not measured).")


class SearchQuery(BaseModel):
    """GET /search's parameters."""

    model_config = ConfigDict(extra="forbid")

    q: str = Field(min_length=1, max_length=2000, description="What the features should be about, in words.")
    release: str | None = Field(None, description="Only this release's SAEs.")
    model: str | None = Field(None, description="Only this model's SAEs.")
    k: int = Field(10, ge=1, le=1000, description="How many features.")


class SearchHit(BaseModel):
    """A feature whose explanation is near the query, with that explanation."""

    similarity: float = Field(description="Cosine similarity of the explanation's embedding and the query's.")
    sae: int
    release: str | None
    sae_id: str | None
    feature: int
    explanation: str
    source: str = Field(description="'saecat' (saecat explain) or 'neuronpedia' (imported).")
    explainer: str | None
    score: float | None = Field(description="The explanation's detection score (balanced accuracy), if scored.")
    density: float | None


class Release(BaseModel):
    model_config = ConfigDict(extra="allow")

    release: str
    repo_id: str | None
    model: str | None
    conversion_func: str | None
    links: Json[Any] | None = Field(description="The registry's links, as stored (JSON).")
    registered_at: Timestamp | None


class Feature(BaseModel):
    sae: int
    feature: int
    decoder_norm: float
    fire_count: int
    block_count: int
    max_activation: float | None
    mean_activation: float | None = Field(description="Over the tokens where it fired; null if it never did.")
    density: float | None = Field(description="fire_count / the SAE's n_tokens.")
    decoder: list[float] | None = Field(None, description="The decoder row, when asked for with decoder=true.")
    labels: dict[str, list[dict[str, Any]]] = Field(
        description="The feature's rows in each label table the catalog has (feature_tokens, feature_examples, "
                    "...), by table name, in rank order.")


class Neighbor(BaseModel):
    """A row of queries.neighbors' results: one hit for one query."""

    query: int = Field(description="The query: its feature index (GET /neighbors) or its row (POST /neighbors/vectors).")
    rank: int = Field(description="0 for the nearest.")
    sae: int
    release: str
    sae_id: str
    feature: int
    cosine: float
    density: float | None = Field(description="fire_count / the SAE's n_tokens.")
    top_tokens: list[str] = Field(description="The feature's top logit-lens tokens (up to 3).")
    top_example: str | None = Field(description="The token of its top activating example.")
    recall: float | None = Field(None, description="With approximate=true: the approximate search's recall@k against "
                                                   "exact search, measured on a sample; null for exact search.")


MAX_VECTORS = 1000
MAX_DIM = 65536
_F32_MAX = float(np.finfo(np.float32).max)
Float32 = Annotated[float, Field(allow_inf_nan=False, ge=-_F32_MAX, le=_F32_MAX)]  # finite, and so in float32


class VectorsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vectors: list[Annotated[list[Float32], Field(min_length=1, max_length=MAX_DIM)]] = Field(
        min_length=1, max_length=MAX_VECTORS, description="Query vectors, all of one length (an SAE's d_in).")
    k: int = Field(10, ge=1, le=1000, description="How many neighbours per vector.")
    saes: list[Annotated[int, Field(ge=0, le=_INT32)]] | None = Field(
        None, min_length=1, max_length=1000,
        description="SAE keys to search (default: every ready SAE whose d_in is the vectors' length).")
    approximate: bool = Field(False, description="Search approximate indexes (HNSW, IVF from 16,384 latents); each row then carries their recall@k.")

    @model_validator(mode="after")
    def _equal_lengths(self) -> "VectorsRequest":
        if len({len(v) for v in self.vectors}) > 1:
            raise ValueError("every vector must have the same length")
        return self


class Health(BaseModel):
    status: str


AnalysisKind = Literal[analyses.KINDS]


class AnalysisRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae: int = Field(ge=0, le=_INT32, description="SAE key (see /saes).")
    params: dict[str, Any] = Field(default_factory=dict, description=(
        "The analysis's parameters by name (saecat's Python API lists them: queries.lobes.LobesParams, "
        "queries.spectra.SpectraParams, queries.crystals.CrystalParams, queries.word_pairs.WordPairParams); "
        "unnamed ones keep their defaults."))
    force: bool = Field(False, description="Recompute even if the catalog has this result already.")


class LayersRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    release: str | None = Field(None, description="Every ready SAE of this release ...")
    model: str | None = Field(None, description="... or of this model")
    hook: str | None = Field(None, description="With model: only hooks matching this glob (blocks.*.hook_resid_post).")
    params: dict[str, Any] = Field(default_factory=dict, description="queries.spectra.SpectraParams by name.")
    force: bool = False


class AnalysisResult(BaseModel):
    """One analysis of one SAE: what was asked, what it read, what it found."""

    analysis: int | None = Field(description="Its key in the catalog's `analyses` table.")
    kind: str
    sae: int
    release: str
    sae_id: str
    params: dict[str, Any]
    inputs: dict[str, Any] = Field(description="The catalog state it read (the SAE's ingestion, versions).")
    summary: dict[str, Any] = Field(description="The headline figures.")
    seconds: float | None
    cached: bool = Field(description="Served from the catalog rather than computed by this request.")
    tables: dict[str, list[dict[str, Any]]] = Field(description="Result rows by table name (crystals, lobes, ...).")


class AnalysisListing(BaseModel):
    analysis: int
    kind: str
    sae: int
    release: str
    sae_id: str
    params: Json[Any]
    summary: Json[Any]
    seconds: float | None
    created_at: Timestamp | None


# ------------------------------------------------------------------------------------- errors


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description, **extra}


_BUSY = _error("The catalog is held by a writer (an ingestion committing); retry after Retry-After seconds.",
               headers={"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}})
_NOT_FOUND = {404: _error("No such SAE or feature.")}
_STATUS = {NotFound: 404, CatalogBusy: 503}


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _saecat_error(request: Request, err: SaecatError) -> Response:
    status = next((code for kind, code in _STATUS.items() if isinstance(err, kind)), 400)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    if pages.is_page(request):
        return pages.page_error(request, status, str(err))
    return _error_response(status, str(err), headers)


async def _http_error(request: Request, err: HTTPException) -> Response:
    if pages.is_page(request):
        return pages.page_error(request, err.status_code, str(err.detail))
    return _error_response(err.status_code, str(err.detail), err.headers)


def _json_safe(value: Any) -> Any:
    """NaN and infinities (JSON has none) as null, at any depth."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


async def _validation_error(request: Request, err: RequestValidationError) -> Response:
    """FastAPI's 422, but one whose echoed input holds NaN (Python's json reads it) still encodes."""
    if pages.is_page(request):
        return pages.page_error(request, 422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                        for e in err.errors()))
    return JSONResponse({"detail": _json_safe(jsonable_encoder(err.errors()))}, status_code=422)


# ---------------------------------------------------------------------------------------- app


def _neighbor_rows(table) -> list[Neighbor]:
    """queries.neighbors' rows, with the recall it measured (approximate search) on each."""
    recall = (table.schema.metadata or {}).get(b"recall")
    extra = {"recall": float(recall)} if recall is not None else {}
    return [Neighbor(**row, **extra) for row in table.to_pylist()]


def create_app(db_path: str | os.PathLike, token: str | None = None, *, max_body_bytes: int = 64 * 1024,
               max_rows: int = 1000, timeout_s: float = 10.0, lock_wait_s: float = 5.0,
               memory_limit: str | int | None = None, max_queries: int = 2) -> FastAPI:
    """The API over the catalog at `db_path`. `token`: require it as a bearer token; `max_rows`:
    the most rows /sql returns; `timeout_s`: the longest a query may run; `memory_limit`: the most
    memory one may take (default $SAECAT_QUERY_MEMORY, else catalog.limits' default);
    `max_queries`: how many run at once; `lock_wait_s`: how long a request waits for a writer to
    let go of the catalog, or for a query's turn, before answering 503."""
    open_catalog = functools.partial(Catalog.open, db_path, wait_s=lock_wait_s)
    query_memory = limits.memory_limit(memory_limit)  # a bad $SAECAT_QUERY_MEMORY fails here, not per query
    query_turns = threading.BoundedSemaphore(max_queries)
    limits.keep_spare = True
    bearer = HTTPBearer(auto_error=False, description="The token `saecat serve` was given.")

    def require_token(request: Request,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        """The bearer token, or the pages' login cookie (so their figures and downloads load)."""
        if not (pages.same_token(credentials and credentials.credentials, token) or pages.cookie_allows(request, token)):
            raise HTTPException(401, "a valid token is required: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="saecat", version=version("saecat"), max_body_size=max_body_bytes,
                  description="Read-only access to a catalog of sparse-autoencoder features.",
                  exception_handlers={SaecatError: _saecat_error, HTTPException: _http_error,
                                      RequestValidationError: _validation_error})
    api = APIRouter(
        dependencies=[Depends(require_token)] if token else [],
        responses={400: _error("A refused or failing query, or another catalog error."), 503: _BUSY,
                   **({401: _error("Missing or wrong token.")} if token else {})},
    )

    @app.get("/health", summary="Liveness (open without a token)")
    def health() -> Health:
        return Health(status="ok")

    too_large = {413: {"description": f"The request body is over {max_body_bytes} bytes.",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}}

    def run_sql(query: str, dialect: str | None, rows: int | None) -> QueryResult:
        """One query under the server's limits (rows, time, memory, queries at once): /sql's and
        the SQL page's."""
        if not query_turns.acquire(timeout=lock_wait_s):
            raise CatalogBusy(f"the server is running {max_queries} queries already; retry shortly")
        try:
            with open_catalog() as cat:
                return cat.sql(query, dialect=dialect, max_rows=max_rows if rows is None else min(rows, max_rows),
                               timeout_s=timeout_s, memory_limit=query_memory)
        finally:
            query_turns.release()

    @api.post("/sql", summary="Run one read-only SELECT", responses=too_large)
    def sql(request: SqlRequest) -> SqlResult:
        result = run_sql(request.query, request.dialect and request.dialect.value, request.max_rows)
        # Values as `saecat sql --json` writes them.
        rows = [[json_value(v) for v in row] for row in result.rows]
        return SqlResult(columns=result.columns, rows=rows, truncated=result.truncated)

    @api.get("/saes", summary="Every SAE in the catalog")
    def saes() -> list[Sae]:
        with open_catalog() as cat:
            return cat.saes().to_pylist()

    @api.get("/saes/{release}/{sae_id:path}", summary="One SAE by its sae-lens name", responses=_NOT_FOUND)
    def sae(release: str, sae_id: str) -> Sae:
        """`sae_id` may contain slashes, and so may a release that is a hub repo id (`owner/name`):
        the path after /saes/ is matched against each SAE's `release/sae_id`, the first by key wins."""
        wanted = f"{release}/{sae_id}"
        with open_catalog() as cat:
            rows = cat.saes().to_pylist()
        found = next((row for row in rows if f"{row['release']}/{row['sae_id']}" == wanted), None)
        if found is None:
            raise NotFound(f"no SAE {wanted!r} in the catalog")
        return found

    @api.get("/compare", summary="SAEs' L0 against a fidelity figure, with each site's Pareto frontier",
             responses=_NOT_FOUND, response_model_exclude_unset=True)
    def compare_saes(query: Annotated[CompareQuery, Query()]) -> list[ComparedSae]:
        """The SAEs selected that have measured quality, by site then L0, as `saecat compare --json` lists
        them; 404 when none matches, none is measured, or none has the figure."""
        with open_catalog() as cat:
            return compare(cat, release=query.release, model=query.model, hook=query.hook,
                           fidelity=query.fidelity).table.to_pylist()

    @api.get("/search", summary="Features whose explanations are nearest a text in meaning", responses=_NOT_FOUND)
    def search_features(query: Annotated[SearchQuery, Query()]) -> list[SearchHit]:
        """As `saecat search --json`: one row per feature, nearest first; 404 when the release or model
        selects no SAE."""
        with open_catalog() as cat:
            return search(cat, query.q, k=query.k, release=query.release, model=query.model)

    @api.get("/releases", summary="Every release in the catalog")
    def releases() -> list[Release]:
        with open_catalog() as cat:
            return cat.releases().to_pylist()

    @api.get("/features/{sae}/{feature}", summary="One feature: statistics, labels, optionally its decoder",
             responses=_NOT_FOUND)
    def feature(sae: Annotated[int, Path(ge=0, le=_INT32, description="SAE key (see /saes).")],
                feature: Annotated[int, Path(ge=0, le=_INT32)],
                decoder: Annotated[bool, Query(description="Include the decoder row.")] = False) -> Feature:
        with open_catalog() as cat:
            row = cat.feature(sae, feature, decoder=decoder)
            labels = {name: table.to_pylist() for name, table in cat.feature_labels(sae, feature).items()}
        return Feature(**row, labels=labels)

    @api.get("/neighbors", summary="Features nearest each given feature by decoder cosine", responses=_NOT_FOUND)
    def neighbors(sae: Annotated[int, Query(ge=0, le=_INT32, description="SAE key (see /saes).")],
                  feature: Annotated[list[Annotated[int, Field(ge=0, le=_INT32)]], Query(
                      min_length=1, max_length=MAX_VECTORS,
                      description="Feature index; repeat it for a batch (?feature=3&feature=7).")],
                  k: Annotated[int, Query(ge=1, le=1000, description="How many neighbours per feature.")] = 10,
                  scope: Annotated[nn.Scope, Query(
                      description="sae: the same SAE; model: every ready SAE of the same model and d_in; "
                                  "others: those but this one.")] = "sae",
                  approximate: Annotated[bool, Query(
                      description="Search approximate indexes (HNSW, IVF from 16,384 latents); each row then carries their recall@k.")] = False,
                  ) -> list[Neighbor]:
        """One row per hit, in query order then rank order; a feature's self-match is left out."""
        with open_catalog() as cat:
            table = nn.neighbors(cat, sae, feature, k, scope, approximate=approximate)
        return _neighbor_rows(table)

    @api.post("/neighbors/vectors", summary="Features nearest each given vector by decoder cosine",
              responses={**_NOT_FOUND, **too_large})
    def neighbors_by_vector(request: VectorsRequest) -> list[Neighbor]:
        """One row per hit; `query` is the vector's position in `vectors`."""
        with open_catalog() as cat:
            table = nn.search_vectors(cat, np.asarray(request.vectors, dtype=np.float32), request.k, request.saes,
                                      approximate=request.approximate)
        return _neighbor_rows(table)

    @api.post("/analyses/spectra/layers", summary="The spectrum of every layer of a release or model",
              responses={**_NOT_FOUND, **too_large})
    def spectra_layers(request: LayersRequest) -> list[AnalysisResult]:
        """One spectra analysis per ready SAE, in layer order; stored ones are reused."""
        from queries import spectra

        params = analyses.make_params("spectra", request.params)
        runs = spectra.layers(db_path, release=request.release, model=request.model, hook=request.hook,
                              params=params, force=request.force)
        return [a.to_json() for a in runs]

    @api.post("/analyses/{kind}", summary="Run an analysis of one SAE and store it (or fetch it, if stored)",
              responses={**_NOT_FOUND, **too_large})
    def run_analysis(kind: AnalysisKind, request: AnalysisRequest) -> AnalysisResult:
        """Computes outside the catalog, then stores the result in one short write. Asked again with
        the same parameters over the same ingestion, it answers from the catalog (`cached`)."""
        params = analyses.make_params(kind, request.params)
        result = analyses.module(kind).run(db_path, sae=request.sae, params=params, force=request.force)
        return result.to_json()

    @api.get("/analyses", summary="Stored analyses, newest first")
    def list_analyses(kind: Annotated[AnalysisKind | None, Query()] = None,
                      sae: Annotated[int | None, Query(ge=0, le=_INT32)] = None) -> list[AnalysisListing]:
        with open_catalog() as cat:
            return analyses.list_analyses(cat, kind, sae).to_pylist()

    @api.get("/analyses/{analysis}", summary="One stored analysis with its result rows", responses=_NOT_FOUND)
    def get_analysis(analysis: Annotated[int, Path(ge=0, le=_INT32)]) -> AnalysisResult:
        with open_catalog() as cat:
            return analyses.load_analysis(cat, analysis).to_json()

    @api.get("/analyses/{analysis}/figure.{fmt}", summary="A stored analysis's figure", responses={
        **_NOT_FOUND, 200: {"content": {"image/png": {}, "image/svg+xml": {}}, "description": "The figure."}},
        response_class=Response)
    def figure(analysis: Annotated[int, Path(ge=0, le=_INT32)], fmt: Literal["png", "svg"]) -> Response:
        with open_catalog() as cat:
            stored = analyses.load_analysis(cat, analysis)
        with tempfile.TemporaryDirectory() as folder:
            path = analyses.plot(stored, PurePath(folder, f"figure.{fmt}"))
            data = open(path, "rb").read()
        return Response(data, media_type="image/png" if fmt == "png" else "image/svg+xml")

    app.include_router(api)
    pages.install(app, open_catalog, token, run_sql)
    return app
