"""The browser pages of `saecat serve` (under /ui): thin views over the catalog calls the JSON API
makes, rendered on the server by Jinja2 templates, with no build step and nothing from a CDN.

Safety: every string from a model or a dataset goes through Jinja2's autoescaping (a token such as
`<script>` is text); pages carry a Content-Security-Policy that allows scripts, styles and images
from this server only, so no inline script or style runs even if markup slipped through, and
shading is by CSS class, not inline style. With a token, pages need it too: as the API's bearer
header, or as the cookie the login form sets (HttpOnly, SameSite=Strict, so other sites' pages
cannot send it).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time.
import dataclasses
import json
import math
import pathlib
import secrets
from typing import Annotated, Any, Callable
from urllib.parse import quote, urlencode

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
import sqlglot
from sqlglot.dialects import Dialects
from sqlglot.tokens import TokenType
from starlette.exceptions import HTTPException

from catalog.errors import CatalogBusy, NotFound, SaecatError
from catalog.store import first_row
from ingest.sync import catalog_status, watched
from ingest.sync import watches as watch_list
from queries import analyses, browse
from queries import neighbors as nn
from queries.search import search

HERE = pathlib.Path(__file__).parent
COOKIE = "saecat_token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}
SHADES = 10  # token shading levels, classes s0..s9 in saecat.css
NEIGHBORS = 10
SHOWCASED_SAES, SHOWCASED_FEATURES = 3, 6  # the home page leads with features worth reading
SAES_PER_PAGE = 100
SEARCH_MODES = ("meaning", "token", "text")
SQL_PAGE = 50
SQL_HIGHLIGHT_CHARS = 8_000  # longer queries are not highlighted as typed: the URL would outgrow h11's limit
SQL_EXAMPLE = ("SELECT feature, density, top_tokens, explanation\nFROM labelled_features LEFT JOIN explanations "
               "USING (sae, feature)\nWHERE density BETWEEN 0.001 AND 0.05\nORDER BY density DESC\nLIMIT 100")
DIALECTS = sorted(d.value for d in Dialects if d.value)
DOWNLOADS = {"csv": ("text/csv; charset=utf-8", "csv"), "json": ("application/json", "json"),
             "parquet": ("application/vnd.apache.parquet", "parquet")}
SEARCH_HITS = 30


class LoginRequired(Exception):
    """A page asked for without the token: the handler sends the browser to the login form."""


def _url(path: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None and v != ""})
    return f"/ui/{path}" + (f"?{query}" if query else "")


def sae_url(release: str, sae_id: str) -> str:
    return _url("sae", release=release, sae_id=sae_id)


def feature_url(release: str, sae_id: str, feature: int) -> str:
    return _url("feature", release=release, sae_id=sae_id, feature=feature)


def neuronpedia_url(neuronpedia_id: str | None, feature: int | None = None) -> str | None:
    """The page of an SAE ('modelId/sourceId', as the registry names it), or of one of its
    features, on neuronpedia.org; None without an id."""
    if not neuronpedia_id:
        return None
    path = "/".join(quote(part, safe="") for part in neuronpedia_id.split("/"))
    return f"https://www.neuronpedia.org/{path}" + (f"/{int(feature)}" if feature is not None else "")


def visible(token: str) -> str:
    """A token as shown in an example: newlines and tabs as visible marks, so a window keeps its shape."""
    return token.replace("\n", "↵").replace("\t", "⇥")


def sql_pieces(query: str, dialect: str | None = None) -> list[tuple[str, str]]:
    """The query cut into (text, CSS class) pieces by sqlglot's tokenizer, for the console's
    highlighting: keywords 'kw', strings 'str', numbers 'num', operators 'op', comments 'com',
    names ''. A query that does not tokenize (an unclosed quote, half typed) is one plain piece."""
    try:
        tokens = sqlglot.tokenize(query, read=dialect or "duckdb")
    except sqlglot.errors.SqlglotError:
        return [(query, "")]
    pieces, at = [], 0
    for token in tokens:  # start and end are the token's raw span, quotes included
        if token.start > at:
            pieces.append(_between(query[at:token.start]))
        pieces.append((query[token.start:token.end + 1], _sql_class(token)))
        at = token.end + 1
    if at < len(query):
        pieces.append(_between(query[at:]))
    return pieces


def _sql_class(token: "sqlglot.tokens.Token") -> str:
    kind = token.token_type
    if kind.name.endswith("STRING"):
        return "str"
    if kind == TokenType.NUMBER:
        return "num"
    if kind in (TokenType.VAR, TokenType.IDENTIFIER, TokenType.PARAMETER, TokenType.PLACEHOLDER):
        return ""
    return "kw" if token.text[:1].isalpha() else "op"


def _between(text: str) -> tuple[str, str]:
    """What lies between tokens: whitespace, and the comments the tokenizer set aside."""
    return text, "com" if "--" in text or "/*" in text else ""


def bounds(low: float | None, high: float | None) -> str:
    """A watch's range as read aloud: 'any', '≥ 12', '≤ 20' or '12 – 30'."""
    shown = [f"{v:,}" if isinstance(v, int) else f"{v:g}" if v is not None else None for v in (low, high)]
    if shown[0] is None:
        return "any" if shown[1] is None else f"≤ {shown[1]}"
    return f"≥ {shown[0]}" if shown[1] is None else f"{shown[0]} – {shown[1]}"


def bars(rows: list[dict], value: str, width: float = 600, height: float = 120) -> list[dict]:
    """SVG rectangles for a histogram (x, y, w, h in the figure's units), one per row."""
    if not rows:
        return []
    top = max(r[value] for r in rows) or 1
    step = width / len(rows)
    return [{**r, "x": i * step, "w": max(step - 1, 1), "h": height * r[value] / top,
             "y": height - height * r[value] / top} for i, r in enumerate(rows)]


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals.update(sae_url=sae_url, feature_url=feature_url, url=_url, visible=visible, bounds=bounds,
                             neuronpedia_url=neuronpedia_url, sql_pieces=sql_pieces,
                             shade=lambda v, peak: browse.shade(v, peak, SHADES))
templates.env.filters["when"] = lambda t: "" if t is None else str(t)[:19]  # to the second
templates.env.filters["num"] = lambda v, digits=3: "" if v is None else (
    f"{v:,}" if isinstance(v, int) else ("nan" if math.isnan(v) else f"{v:.{digits}g}"))


def same_token(given: str | None, token: str) -> bool:
    # Compared as bytes: compare_digest refuses non-ASCII str, and a header or cookie may hold anything.
    return given is not None and secrets.compare_digest(given.encode(), token.encode())


def cookie_allows(request: Request, token: str) -> bool:
    """Whether the login cookie admits this request: it must hold the token, and a request that
    changes or runs something (not GET or HEAD) must come from this server's own pages (its Origin),
    on top of SameSite=Strict keeping the cookie off other sites' requests."""
    if not same_token(request.cookies.get(COOKIE), token):
        return False
    return request.method in ("GET", "HEAD") or request.headers.get("origin") == _own_origin(request)


def same_site(request: Request) -> bool:
    """Whether a form was posted from this server's own pages: a browser names the page's origin
    (Origin) and whether it is this site (Sec-Fetch-Site) on every POST; a client that is not a
    browser sends neither and cannot carry a user's cookie anyway."""
    origin, site = request.headers.get("origin"), request.headers.get("sec-fetch-site")
    return (origin is None or origin == _own_origin(request)) and site in (None, "same-origin", "none")


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def make_router(open_catalog: Callable, token: str | None, run_sql: Callable) -> APIRouter:
    """The /ui pages over the catalog `open_catalog()` opens read-only; `run_sql(query, dialect,
    max_rows)` runs a query under the server's limits."""

    def require_page_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if token is None or cookie_allows(request, token) or (
                header.startswith("Bearer ") and same_token(header.removeprefix("Bearer "), token)):
            return
        raise LoginRequired()

    router = APIRouter(prefix="/ui", include_in_schema=False)
    guarded = APIRouter(dependencies=[Depends(require_page_token)])

    def render(request: Request, name: str, **context: Any) -> HTMLResponse:
        return page_of(request, name, context)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/ui/", failed: bool = False) -> HTMLResponse:
        return render(request, "login.html", next=_local(next), failed=failed)

    @router.post("/login")
    def login(given: Annotated[str, Form(alias="token")], next: Annotated[str, Form()] = "/ui/") -> Response:
        if token is None or not same_token(given, token):
            return RedirectResponse(_url("login", next=_local(next), failed=1), status_code=303)
        reply = RedirectResponse(_local(next), status_code=303)
        reply.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return reply

    @guarded.get("/", response_class=HTMLResponse)
    def catalog_page(request: Request, model: str | None = None, release: str | None = None,
                     hook: str | None = None, min_width: Annotated[int | None, Query(ge=0)] = None,
                     max_width: Annotated[int | None, Query(ge=0)] = None, status: str | None = None,
                     max_l0: Annotated[float | None, Query(ge=0)] = None,
                     min_explained_variance: Annotated[float | None, Query(le=1)] = None,
                     page: Annotated[int, Query(ge=0)] = 0,
                     per_page: Annotated[int, Query(ge=1, le=1000)] = SAES_PER_PAGE) -> HTMLResponse:
        filt = browse.SaeFilter(model, release, hook, min_width, max_width, status, max_l0, min_explained_variance)
        with open_catalog() as cat:
            rows, total = browse.saes(cat, filt, page, per_page)
            models = [m for (m,) in cat.con.execute("SELECT DISTINCT model FROM saes WHERE model IS NOT NULL "
                                                    "ORDER BY 1").fetchall()]
            selected = watched(cat)  # what `saecat status` and `watch list` say, from one query of the watched SAEs
            state, watches = catalog_status(cat, selected=selected), watch_list(cat, selected)
            showcased = [(r, browse.showcase(cat, r["sae"], SHOWCASED_FEATURES))
                         for r in browse.latest_ready(cat, filt, SHOWCASED_SAES)]
        return render(request, "catalog.html", saes=rows, total=total, page=page, per_page=per_page, filt=filt,
                      models=models, state=state, watches=watches, showcased=showcased,
                      filters=dataclasses.asdict(filt))

    @guarded.get("/sae", response_class=HTMLResponse)
    def sae_page(request: Request, release: str, sae_id: str, sort: str = "feature", desc: bool = False,
                 page: Annotated[int, Query(ge=0)] = 0, min_density: float | None = None,
                 max_density: float | None = None, text: str | None = None) -> HTMLResponse:
        with open_catalog() as cat:
            record = cat.find_sae(release, sae_id, ready=False)
            imported = _source(cat, record) == "neuronpedia"
            overview = browse.sae_overview(cat, record)
            histogram, dead = browse.density_histogram(cat, record.sae, imported=imported)
            if imported:  # only what the export holds: by index, no sorting or filtering
                features, total = browse.imported_features(cat, record.sae, page)
            else:
                features, total = browse.feature_page(cat, record.sae, sort=sort, descending=desc, page=page,
                                                      min_density=min_density, max_density=max_density, text=text)
            figures = [a for a in cat.con.execute(
                "SELECT analysis, kind, created_at FROM analyses WHERE sae = ? AND kind IN ('spectra', 'lobes') "
                "ORDER BY analysis DESC", [record.sae]).fetchall()]
        return render(request, "sae.html", sae=overview, record=record, histogram=bars(histogram, "count"),
                      dead=dead, features=features, total=total, page=page, per_page=50, sort=sort, desc=desc,
                      sorts=browse.FEATURE_SORTS, min_density=min_density, max_density=max_density, text=text,
                      figures=figures, imported=imported)

    @guarded.get("/feature", response_class=HTMLResponse)
    def feature_page(request: Request, release: str, sae_id: str,
                     feature: Annotated[int, Query(ge=0, le=2**31 - 1)]) -> HTMLResponse:
        with open_catalog() as cat:
            record = cat.find_sae(release, sae_id, ready=False)
            source = _source(cat, record)
            explained = browse.explanations(cat, record.sae, feature)
            pairs_complete, neuronpedia_id = first_row(
                cat.con, "SELECT pairs_complete, neuronpedia_id FROM saes WHERE sae = ?", [record.sae])
            if source == "neuronpedia":  # an SAE known only from its Neuronpedia export
                found = browse.imported_feature(cat, record.sae, feature)
                row, labels, near, histogram = found["row"], found["labels"], found["neighbors"], found["histogram"]
                across, across_search, partners, lobes = [], None, [], []
                count = cat.con.execute("SELECT max(feature) + 1 FROM neuronpedia_features WHERE sae = ?",
                                        [record.sae]).fetchall()[0][0]
            else:
                row = cat.feature(record.sae, feature)
                labels = {name: table.to_pylist() for name, table in cat.feature_labels(record.sae, feature).items()}
                histogram = labels["feature_histograms"]
                near = nn.neighbors(cat, record.sae, [feature], NEIGHBORS).to_pylist()
                across, across_search = _across(cat, record, feature)
                partners = browse.partners(cat, record.sae, feature)
                lobes = browse.lobes(cat, record.sae, feature)
                count = record.d_sae or 0
        return render(request, "feature.html", record=record, f=row, labels=labels, near=near, across=across,
                      neuronpedia_id=neuronpedia_id,
                      across_search=across_search, neighbors_k=NEIGHBORS,
                      explanations=explained, partners=partners, lobes=lobes, histogram=bars(histogram, "count"),
                      pairs_complete=pairs_complete, source=source,
                      previous=feature - 1 if feature > 0 else None,
                      next=feature + 1 if feature + 1 < count else None)

    @guarded.get("/search", response_class=HTMLResponse)
    def search_page(request: Request, q: str = "", mode: str = "meaning",
                    sae: Annotated[str | None, Query(pattern=r"^\d{0,9}$")] = None, release: str | None = None,
                    sae_id: str | None = None, model: str | None = None,
                    feature: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None) -> HTMLResponse:
        """By meaning (explanations), by token (examples and logit lens), or the features that fire
        on a text (run through an SAE's model), its tokens shaded by one of them. The form names its
        SAE by key (`sae`, empty for every SAE); links by release and sae_id."""
        if mode not in SEARCH_MODES:
            raise SaecatError(f"unknown search mode {mode!r}: use {', '.join(SEARCH_MODES)}")
        q = q.replace("\r\n", "\n")  # a form sends a textarea's line breaks as CRLF; the text has LF
        hits: list[dict] = []
        fired = None
        with open_catalog() as cat:
            ready = cat.con.execute("SELECT sae, release, sae_id FROM saes WHERE status = 'ready' "
                                    "ORDER BY release, sae_id").fetchall()
            if sae:
                picked = cat.sae_by_key(int(sae))
                release, sae_id = picked.release, picked.sae_id
            if q.strip() and mode == "meaning":
                hits = search(cat, q, k=SEARCH_HITS, release=release or None, model=model or None)
            elif q.strip() and mode == "token":
                record = cat.find_sae(release, sae_id) if release and sae_id else None
                hits = browse.token_features(cat, q, record and record.sae, SEARCH_HITS)
            elif q.strip():
                if not (release and sae_id) and not ready:
                    raise NotFound("no ingested SAE to run the text through")
                record = cat.find_sae(release, sae_id) if release and sae_id else cat.sae_by_key(ready[0][0])
                fired = {"record": record, **browse.fires_on(cat, record.sae, q)}
                shown = next((f for f in fired["features"] if f["feature"] == feature), None)
                fired["shown"] = shown or (fired["features"][0] if fired["features"] else None)
        return render(request, "search.html", q=q, mode=mode, release=release, sae_id=sae_id, model=model,
                      hits=hits, fired=fired, ready=ready, modes=SEARCH_MODES)

    @guarded.get("/sql", response_class=HTMLResponse)
    def sql_form(request: Request) -> HTMLResponse:
        return render(request, "sql.html", query=SQL_EXAMPLE, dialect="", dialects=DIALECTS, result=None)

    @guarded.get("/sql/pieces")
    def sql_highlight(query: Annotated[str, Query(max_length=SQL_HIGHLIGHT_CHARS)], dialect: str = ""
                      ) -> list[tuple[str, str]]:
        """The console's highlighting as the query is typed: sql_pieces, as JSON."""
        if dialect and dialect not in DIALECTS:
            raise SaecatError(f"unknown SQL dialect {dialect!r}")
        return sql_pieces(query, dialect or None)

    @guarded.post("/sql", response_model=None)
    def sql_page(request: Request, query: Annotated[str, Form()], dialect: Annotated[str, Form()] = "",
                 page: Annotated[int, Form(ge=0)] = 0, download: Annotated[str, Form()] = "") -> Response:
        """The query's rows (up to the server's limit), a page of them on screen or all of them as
        a CSV, JSON or Parquet download; refused, like POST /sql, by the SQL gate."""
        if not same_site(request):
            raise HTTPException(403, "the SQL console takes queries from its own page only")
        if dialect and dialect not in DIALECTS:
            raise SaecatError(f"unknown SQL dialect {dialect!r}")
        try:
            result = run_sql(query, dialect or None, None)
        except CatalogBusy:
            raise
        except SaecatError as err:  # a refused or failing query: shown on the console, as the API answers 400
            return page_of(request, "sql.html", {"query": query, "dialect": dialect, "dialects": DIALECTS,
                                                  "result": None, "error": str(err)}, status=400)
        if download:
            return _download(result, download)
        rows = result.rows
        return render(request, "sql.html", query=query, dialect=dialect, dialects=DIALECTS, result=result,
                      columns=result.columns, rows=rows[page * SQL_PAGE:(page + 1) * SQL_PAGE], total=len(rows),
                      page=page, per_page=SQL_PAGE)

    @guarded.get("/analyses", response_class=HTMLResponse)
    def analyses_page(request: Request, kind: str | None = None) -> HTMLResponse:
        with open_catalog() as cat:
            stored = analyses.list_analyses(cat, kind or None).to_pylist()
        return render(request, "analyses.html", analyses=stored, kind=kind, kinds=analyses.KINDS)

    @guarded.get("/analyses/{analysis}", response_class=HTMLResponse)
    def analysis_page(request: Request, analysis: Annotated[int, Path(ge=0, le=2**31 - 1)]) -> HTMLResponse:
        with open_catalog() as cat:
            stored = analyses.load_analysis(cat, analysis)
        return render(request, "analysis.html", analysis=analysis, a=stored,
                      params=json.dumps(stored.params, indent=2), summary=json.dumps(stored.summary, indent=2,
                                                                                      default=str))

    @guarded.get("/np/{model_id}/{source_id}/{index}")
    def neuronpedia_link(model_id: str, source_id: str, index: Annotated[int, Path(ge=0, le=2**31 - 1)]) -> Response:
        """Neuronpedia's own URL shape (neuronpedia.org/<modelId>/<sourceId>/<index>), answered here."""
        with open_catalog() as cat:
            record = browse.find_by_neuronpedia(cat, model_id, source_id)
        return RedirectResponse(feature_url(record.release, record.sae_id, index), status_code=307)

    router.include_router(guarded)
    return router


def _source(cat, record) -> str:
    """Where an SAE's pages read from: its ingestion ('saecat'), else its imported Neuronpedia rows."""
    if record.status == "ready":
        return "saecat"
    if browse.has_imported(cat, record.sae):
        return "neuronpedia"
    raise NotFound(f"{record.release} / {record.sae_id} is registered but neither ingested nor imported: "
                   f"saecat ingest --release {record.release} --sae-id {record.sae_id} --dataset ...")


def _local(target: str) -> str:
    """Only a path on this server as a place to go after logging in (never another site)."""
    return target if target.startswith("/") and not target.startswith("//") else "/ui/"


def _download(result, fmt: str) -> Response:
    if fmt not in DOWNLOADS:
        raise SaecatError(f"unknown download format {fmt!r}: use {', '.join(DOWNLOADS)}")
    media, suffix = DOWNLOADS[fmt]
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(result.arrow(), sink)
        body = sink.getvalue().to_pybytes()
    else:
        body = (result.to_csv() if fmt == "csv" else result.to_json()).encode()
    return Response(body, media_type=media, headers={**PAGE_HEADERS,
                                                     "Content-Disposition": f'attachment; filename="saecat-query.{suffix}"'})


def page_of(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    """A rendered template with the pages' security headers."""
    return templates.TemplateResponse(request, name, context, status_code=status, headers=PAGE_HEADERS)


def page_error(request: Request, status: int, message: str) -> HTMLResponse:
    return page_of(request, "error.html", {"status": status, "message": message}, status)


def install(app, open_catalog: Callable, token: str | None, run_sql: Callable) -> None:
    """Mount the pages and their static files on `app`, and send a browser at / to them."""
    from fastapi.staticfiles import StaticFiles

    app.include_router(make_router(open_catalog, token, run_sql))
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(EmptyFieldsAbsent)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.exception_handler(LoginRequired)
    def to_login(request: Request, _: LoginRequired) -> Response:
        return RedirectResponse(_url("login", next=str(request.url.path) + (
            f"?{request.url.query}" if request.url.query else "")), status_code=303)


class EmptyFieldsAbsent:
    """A page's GET form sends every field, the empty ones as `name=`: the pages read those as
    absent (an empty width is no bound), rather than refusing '' as a number."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/ui") and scope.get("query_string"):
            fields = scope["query_string"].split(b"&")  # still percent-encoded: an '=' in a value is %3D
            scope = {**scope, "query_string": b"&".join(f for f in fields if f and not f.endswith(b"="))}
        await self.app(scope, receive, send)


def _across(cat, record, feature: int) -> tuple[list[dict], dict[str, Any]]:
    """The feature's nearest in the model's other SAEs, approximate once those are many, and how
    they were searched: how many SAEs, how many approximately, at what recall."""
    others = nn.scope_saes(cat, record, "others")
    if not others:  # an SAE alone in its model: no query at all
        return [], {"saes": 0, "approximate": 0, "recall": None}
    found = nn.neighbors(cat, record.sae, [feature], NEIGHBORS, "others", approximate="auto")
    meta = found.schema.metadata or {}
    return found.to_pylist(), {"saes": len(others), "approximate": int(meta.get(b"approximate_saes", 0)),
                               "recall": float(meta[b"recall"]) if b"recall" in meta else None}


def is_page(request: Request) -> bool:
    return request.url.path.startswith("/ui/") or request.url.path == "/ui"

