"""saecat's HTTP API (`saecat serve`): FastAPI glue over the catalog's Python API, `Catalog`.

Concurrency: DuckDB lets one process write a file, and only while no other process has it open,
even read-only. So the server holds no connection between requests: each request opens the
catalog read-only, reads, and closes it before its response is sent. An ingestion in another
process opens the file only briefly (checkpoints, the final commit) and retries while a request
has it; a request that finds it held waits up to `lock_wait_s`, then answers 503 with
Retry-After. A SQL query holds the file while it runs, which `timeout_s` bounds.

Access: with a token, every catalog endpoint needs `Authorization: Bearer <token>`. /health and
the API's description (/openapi.json, /docs, /redoc) stay open: they tell nothing about the
catalog, and /docs is where a user types the token in (its Authorize button).

Errors are `{"error": message}`: 400 for a refused or failing query and other catalog errors, 404
for an unknown SAE or feature, 401, 503 while the catalog is held. Two come from FastAPI as they
are: 413 (plain text) for a body over `max_body_bytes`, and 422 with the details for a request
that does not fit the schema.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time,
# and one of them names a variable of create_app.
import functools
import os
import secrets
from datetime import datetime
from importlib.metadata import version
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, Json, WithJsonSchema
from sqlglot.dialects import Dialects
from starlette.exceptions import HTTPException

from catalog import Catalog
from catalog.errors import CatalogBusy, NotFound, SaecatError
from catalog.query import json_value

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
    sae: int
    feature: int
    cosine: float


class Health(BaseModel):
    status: str


# ------------------------------------------------------------------------------------- errors


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description, **extra}


_BUSY = _error("The catalog is held by a writer (an ingestion committing); retry after Retry-After seconds.",
               headers={"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}})
_NOT_FOUND = {404: _error("No such SAE or feature.")}
_STATUS = {NotFound: 404, CatalogBusy: 503}


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _saecat_error(request: Request, err: SaecatError) -> JSONResponse:
    status = next((code for kind, code in _STATUS.items() if isinstance(err, kind)), 400)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return _error_response(status, str(err), headers)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    return _error_response(err.status_code, str(err.detail), err.headers)


# ---------------------------------------------------------------------------------------- app


def create_app(db_path: str | os.PathLike, token: str | None = None, *, max_body_bytes: int = 64 * 1024,
               max_rows: int = 1000, timeout_s: float = 10.0, lock_wait_s: float = 5.0) -> FastAPI:
    """The API over the catalog at `db_path`. `token`: require it as a bearer token; `max_rows`:
    the most rows /sql returns; `timeout_s`: the longest a query may run; `lock_wait_s`: how long
    a request waits for a writer to let go of the catalog before answering 503."""
    open_catalog = functools.partial(Catalog.open, db_path, wait_s=lock_wait_s)
    bearer = HTTPBearer(auto_error=False, description="The token `saecat serve` was given.")

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        # Compared as bytes: compare_digest refuses non-ASCII str, and a header may hold anything.
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "a valid token is required: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="saecat", version=version("saecat"), max_body_size=max_body_bytes,
                  description="Read-only access to a catalog of sparse-autoencoder features.",
                  exception_handlers={SaecatError: _saecat_error, HTTPException: _http_error})
    api = APIRouter(
        dependencies=[Depends(require_token)] if token else [],
        responses={400: _error("A refused or failing query, or another catalog error."), 503: _BUSY,
                   **({401: _error("Missing or wrong token.")} if token else {})},
    )

    @app.get("/health", summary="Liveness (open without a token)")
    def health() -> Health:
        return Health(status="ok")

    @api.post("/sql", summary="Run one read-only SELECT",
              responses={413: {"description": f"The request body is over {max_body_bytes} bytes.",
                               "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def sql(request: SqlRequest) -> SqlResult:
        limit = max_rows if request.max_rows is None else min(request.max_rows, max_rows)
        with open_catalog() as cat:
            result = cat.sql(request.query, dialect=request.dialect and request.dialect.value, max_rows=limit,
                             timeout_s=timeout_s)
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

    @api.get("/neighbors", summary="Features of the same SAE nearest by decoder cosine", responses=_NOT_FOUND)
    def neighbors(sae: Annotated[int, Query(ge=0, le=_INT32, description="SAE key (see /saes).")],
                  feature: Annotated[int, Query(ge=0, le=_INT32)],
                  k: Annotated[int, Query(ge=1, le=1000, description="How many neighbours.")] = 10) -> list[Neighbor]:
        with open_catalog() as cat:
            hits = cat.neighbors(sae, feature, k)
        return [Neighbor(sae=s, feature=f, cosine=c) for s, f, c in hits]

    app.include_router(api)
    return app
