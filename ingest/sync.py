"""Keeping the catalog up with the sae-lens registry: register, diff, watch, ingest unattended.

`sync` reads a registry (the YAML sae-lens ships, a file or a URL), diffs it against what the
catalog last saw, and records both in one transaction: every release and SAE (status
'registered' until ingested; weights are never read here), a snapshot row and its changes. With
`ingest=True` it then ingests the watched SAEs that are not ready, one after another, each in its
own transaction; a failure is recorded in `ingest_runs` and the next SAE goes on, and a failed
SAE is retried on a later sync once its back-off has passed.

One sync runs at a time per catalog: an flock on a file in the catalog's sidecar folder. The
kernel drops it when its process dies, so the lock a killed sync leaves behind is stale by
construction and the next sync simply takes it. A killed sync loses nothing: the registry
transaction committed or did not, and an interrupted ingestion resumes from its checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from catalog import Catalog
from catalog.errors import SaecatError, one_line
from catalog.store import default_path, first_row, sidecar_dir, writer
from ingest.registry import Change, Registry, RegistryRelease, RegistrySae, diff, read_registry

LOCK_FILE = "sync.lock"
RETRY_BASE = timedelta(hours=1)  # the first retry of a failed SAE; doubled per further failure
RETRY_MAX = timedelta(days=7)


# --------------------------------------------------------------------------- the lock


def lock_path(db: Path) -> Path:
    return sidecar_dir(db) / LOCK_FILE


def lock_holder(db: Path) -> dict[str, Any] | None:
    """Who holds the sync lock now ({pid, host, since}), or None when no live process does."""
    try:
        f = lock_path(db).open()  # for reading: the status of a catalog on a read-only disk reads it too
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                return json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                return {}
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


@contextmanager
def sync_lock(db: Path) -> Iterator[None]:
    """Hold the catalog's sync lock, or fail at once naming the process that holds it."""
    path = lock_path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SaecatError(f"a sync is already running on {db} ({f.read().strip() or 'holder unknown'})") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- registry -> catalog


def catalog_registry(cat: Catalog) -> Registry | None:
    """The registry as the catalog last recorded it (None before the first sync)."""
    last = first_row(cat.con, "SELECT source, version, sha256 FROM registry_snapshots ORDER BY snapshot DESC LIMIT 1")
    if last is None:
        return None
    saes: dict[str, list[RegistrySae]] = {}
    for release, sae_id, path, l0, ve, np_id, hook, layer, width in cat.con.execute(
            "SELECT release, sae_id, repo_path, registry_l0, registry_variance_explained, neuronpedia_id, "
            "hook_name, layer, d_sae FROM saes WHERE registered_at IS NOT NULL AND unlisted_at IS NULL "
            "ORDER BY sae").fetchall():
        saes.setdefault(release, []).append(RegistrySae(release, sae_id, path, l0, ve, np_id, hook, layer, width))
    releases = {}
    for release, repo_id, model, conversion, links in cat.con.execute(
            "SELECT release, repo_id, model, conversion_func, links FROM releases ORDER BY release").fetchall():
        if release in saes:
            releases[release] = RegistryRelease(release, repo_id, model, conversion,
                                                json.loads(links) if links else None, tuple(saes[release]))
    return Registry(releases, last[0], last[1], last[2], [])


def _release_rows(registry: Registry, names: set[str]) -> list[list[Any]]:
    return [[r.release, r.repo_id, r.model, r.conversion_func, json.dumps(r.links) if r.links else None]
            for name in sorted(names) for r in [registry.releases[name]]]


_SAE_COLUMNS = ("release", "sae_id", "source", "model", "hook_name", "layer", "d_sae", "neuronpedia_id", "repo_path",
                "registry_l0", "registry_variance_explained")


def _sae_rows(registry: Registry, keys: set[tuple[str, str]]) -> pa.Table:
    every = {(s.release, s.sae_id): s for r in registry.releases.values() for s in r.saes}
    rows = [(every[key], registry.releases[key[0]]) for key in sorted(keys)]
    return pa.table({
        "release": pa.array([s.release for s, _ in rows], pa.string()),
        "sae_id": pa.array([s.sae_id for s, _ in rows], pa.string()),
        "source": pa.array([f"registry:{s.release}/{s.sae_id}" for s, _ in rows], pa.string()),
        "model": pa.array([r.model for _, r in rows], pa.string()),
        "hook_name": pa.array([s.hook_name for s, _ in rows], pa.string()),
        "layer": pa.array([s.layer for s, _ in rows], pa.int32()),
        "d_sae": pa.array([s.width for s, _ in rows], pa.int32()),
        "neuronpedia_id": pa.array([s.neuronpedia_id for s, _ in rows], pa.string()),
        "repo_path": pa.array([s.path for s, _ in rows], pa.string()),
        "registry_l0": pa.array([s.l0 for s, _ in rows], pa.float64()),
        "registry_variance_explained": pa.array([s.variance_explained for s, _ in rows], pa.float64()),
    })


def _change_rows(changes: list[Change]) -> pa.Table:
    return pa.table({"kind": pa.array([c.kind for c in changes], pa.string()),
                     "action": pa.array([c.action for c in changes], pa.string()),
                     "release": pa.array([c.release for c in changes], pa.string()),
                     "sae_id": pa.array([c.sae_id for c in changes], pa.string()),
                     "fields": pa.array([list(c.fields) for c in changes], pa.list_(pa.string()))})


def record_registry(cat: Catalog, registry: Registry) -> tuple[int, list[Change]]:
    """Write the registry and its changes against the last sync in one transaction."""
    changes = diff(catalog_registry(cat), registry)
    by = {(c.kind, c.action): [] for c in changes}
    for c in changes:
        by[(c.kind, c.action)].append(c)
    added = {(c.release, c.sae_id) for c in by.get(("sae", "added"), [])}
    changed = {(c.release, c.sae_id) for c in by.get(("sae", "changed"), [])}
    removed = pa.table({"release": pa.array([c.release for c in by.get(("sae", "removed"), [])], pa.string()),
                        "sae_id": pa.array([c.sae_id for c in by.get(("sae", "removed"), [])], pa.string())})
    releases = {c.release for c in changes if c.kind == "release" and c.action in ("added", "changed")}
    with cat.transaction() as con:
        for name, table in (("registered", _sae_rows(registry, added | changed)), ("removed", removed),
                            ("found", _change_rows(changes))):
            con.register(name, table)
        if releases:
            con.executemany(
                "INSERT INTO releases (release, repo_id, model, conversion_func, links) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (release) DO UPDATE SET repo_id = excluded.repo_id, model = excluded.model, "
                "conversion_func = excluded.conversion_func, links = excluded.links",
                _release_rows(registry, releases))
        columns = ", ".join(_SAE_COLUMNS)
        # an SAE ingested before it was ever synced keeps its ingestion's values; it gains the registry's
        con.execute(
            f"INSERT INTO saes ({columns}, status, registered_at) SELECT {columns}, 'registered', now() "
            "FROM registered ON CONFLICT (release, sae_id) DO UPDATE SET "
            "repo_path = excluded.repo_path, registry_l0 = excluded.registry_l0, "
            "registry_variance_explained = excluded.registry_variance_explained, "
            "neuronpedia_id = coalesce(excluded.neuronpedia_id, saes.neuronpedia_id), "
            "hook_name = coalesce(saes.hook_name, excluded.hook_name), layer = coalesce(saes.layer, excluded.layer), "
            "d_sae = coalesce(saes.d_sae, excluded.d_sae), model = coalesce(saes.model, excluded.model), "
            "registered_at = coalesce(saes.registered_at, now()), unlisted_at = NULL")
        con.execute("UPDATE saes SET unlisted_at = now() FROM removed "
                    "WHERE saes.release = removed.release AND saes.sae_id = removed.sae_id")
        snapshot = first_row(
            con, "INSERT INTO registry_snapshots (source, version, sha256, n_releases, n_saes, problems) "
                 "VALUES (?, ?, ?, ?, ?, ?) RETURNING snapshot",
            [registry.source, registry.version, registry.sha256, len(registry.releases), registry.n_saes,
             registry.problems])[0]
        con.execute("INSERT INTO registry_changes SELECT ?, kind, action, release, sae_id, fields FROM found",
                    [snapshot])
        for name in ("registered", "removed", "found"):
            con.unregister(name)
    return snapshot, changes


# --------------------------------------------------------------------------- the watch list


@dataclass
class Watch:
    """Which registered SAEs to ingest, and how: `options` are IngestOptions fields (dataset, ...)."""

    options: dict[str, Any]
    release_pattern: str = "*"
    model: str | None = None
    hook_pattern: str | None = None
    min_width: int | None = None
    max_width: int | None = None
    min_l0: float | None = None
    max_l0: float | None = None


def _ingest_options(options: dict[str, Any]):
    from ingest.pipeline import IngestOptions

    known = {f.name for f in fields(IngestOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SaecatError(f"unknown ingestion option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not options.get("dataset"):
        raise SaecatError("a watch needs a dataset to ingest over")
    return IngestOptions(**options)


def add_watch(db: str | os.PathLike | None, watch: Watch) -> int:
    _ingest_options(watch.options)
    for low, high in ((watch.min_width, watch.max_width), (watch.min_l0, watch.max_l0)):
        if low is not None and high is not None and low > high:
            raise SaecatError(f"empty range: minimum {low} is above maximum {high}")
    row = asdict(watch)
    row["options"] = json.dumps(watch.options, sort_keys=True)
    with writer(db) as cat:
        return first_row(cat.con, f"INSERT INTO watches ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}) "
                                  "RETURNING watch", list(row.values()))[0]


def remove_watch(db: str | os.PathLike | None, key: int) -> None:
    with writer(db) as cat:
        if first_row(cat.con, "DELETE FROM watches WHERE watch = ? RETURNING watch", [key]) is None:
            raise SaecatError(f"no watch {key}")


# The registered SAEs each watch selects (the lowest-numbered watch decides the options), with how
# often each has failed since its last success and when it last failed.
WATCHED = """
WITH selected AS (
    SELECT s.release, s.sae_id, s.status, min(w.watch) AS watch,
           bool_or((w.hook_pattern IS NOT NULL AND s.hook_name IS NULL)
                   OR (coalesce(w.min_width, w.max_width) IS NOT NULL AND s.d_sae IS NULL)) AS unresolved
    FROM saes s JOIN watches w
      ON s.release GLOB w.release_pattern
     AND (w.model IS NULL OR s.model = w.model)
     -- the registry often does not say the hook and width: unknown matches, until resolved
     AND (w.hook_pattern IS NULL OR s.hook_name IS NULL OR s.hook_name GLOB w.hook_pattern)
     AND (w.min_width IS NULL OR s.d_sae IS NULL OR s.d_sae >= w.min_width)
     AND (w.max_width IS NULL OR s.d_sae IS NULL OR s.d_sae <= w.max_width)
     AND (w.min_l0 IS NULL OR s.registry_l0 >= w.min_l0) AND (w.max_l0 IS NULL OR s.registry_l0 <= w.max_l0)
    WHERE s.registered_at IS NOT NULL AND s.unlisted_at IS NULL
    GROUP BY ALL
), last_done AS (
    SELECT release, sae_id, max(run) AS run FROM ingest_runs WHERE status = 'done' GROUP BY ALL
), failures AS (
    SELECT r.release, r.sae_id, count(*) AS failures, max(coalesce(r.finished_at, r.updated_at)) AS last_failure,
           arg_max(r.error, r.run) AS last_error
    FROM ingest_runs r LEFT JOIN last_done d USING (release, sae_id)
    WHERE r.status = 'failed' AND r.run > coalesce(d.run, 0)
    GROUP BY ALL
)
SELECT s.release, s.sae_id, s.status, s.watch, s.unresolved, w.options, coalesce(f.failures, 0) AS failures,
       f.last_failure, f.last_error,
       f.last_failure + to_seconds(least(? * pow(2, coalesce(f.failures, 1) - 1), ?)) AS retry_at
FROM selected s JOIN watches w USING (watch) LEFT JOIN failures f USING (release, sae_id)
ORDER BY s.release, s.sae_id
"""


def watched(cat: Catalog, retry_base: timedelta = RETRY_BASE, retry_max: timedelta = RETRY_MAX) -> pa.Table:
    """Every watched SAE with its status, failures since its last success and when it is retried."""
    return cat.con.sql(WATCHED, params=[retry_base.total_seconds(), retry_max.total_seconds()]).to_arrow_table()


def watches(cat: Catalog, selected: pa.Table | None = None) -> list[dict[str, Any]]:
    """Each watch: its selection, its ingestion options, how many registered SAEs it selects
    (`selects`) and how many of those are ready. `selected`: `watched(cat)`, where the caller has it."""
    rows = cat.con.sql("SELECT watch, release_pattern, model, hook_pattern, min_width, max_width, min_l0, max_l0, "
                       "options FROM watches ORDER BY watch").to_arrow_table().to_pylist()
    if selected is None:
        selected = watched(cat)  # one row per watched SAE, under the watch that selects it
    ready = pc.fill_null(pc.equal(selected["status"], "ready"), False).cast(pa.int64())
    counts = {c["watch"]: c for c in pa.table({"watch": selected["watch"], "ready": ready}).group_by("watch")
              .aggregate([("ready", "count"), ("ready", "sum")]).to_pylist()}
    none = {"ready_count": 0, "ready_sum": 0}  # a watch that selects nothing
    return [{**row, "selects": counts.get(row["watch"], none)["ready_count"],
             "ready": counts.get(row["watch"], none)["ready_sum"]} for row in rows]


def queued(cat: Catalog, retry_base: timedelta = RETRY_BASE, retry_max: timedelta = RETRY_MAX) -> list[dict[str, Any]]:
    """The watched SAEs a sync would ingest now: not ready, and past any back-off."""
    return _due(cat, watched(cat, retry_base, retry_max).to_pylist())


def _due(cat: Catalog, watch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The watched SAEs (rows of `watched`) that are not ready, resolved, and past any back-off."""
    now = first_row(cat.con, "SELECT current_timestamp::TIMESTAMP")[0]
    return [row for row in watch if row["status"] != "ready" and not row["unresolved"]
            and (row["retry_at"] is None or row["retry_at"] <= now)]


def _config(release: str, sae_id: str) -> dict[str, Any]:
    """An SAE's hook, widths and architecture from its cfg.json alone (no weights)."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    from ingest.sources import layer_of

    cfg = load_sae_config_from_huggingface(release, sae_id)
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    return {"hook_name": hook, "layer": layer_of(hook) if hook else None, "d_in": cfg.get("d_in"),
            "d_sae": cfg.get("d_sae"), "architecture": cfg.get("architecture")}


def resolve_watched(db: Path, report: Callable[[str], None] = lambda line: None) -> list[tuple[str, str, str]]:
    """Fill in hook and width, from each SAE's config, for the SAEs a watch may select but cannot
    decide on from the registry alone. Returns those whose config could not be read."""
    with Catalog.open(db) as cat:
        pending = [(r["release"], r["sae_id"]) for r in watched(cat).to_pylist() if r["unresolved"]]
    found, missing = {}, []
    for release, sae_id in pending:
        try:
            found[(release, sae_id)] = _config(release, sae_id)
        except Exception as err:  # offline, a missing file, a config sae-lens cannot read: skip this one
            missing.append((release, sae_id, f"{type(err).__name__}: {one_line(err)}"))
    if pending:
        report(f"read {len(found)} of {len(pending)} configs for hook and width"
               + (f"; {len(missing)} unreadable (e.g. {missing[0][2]})" if missing else ""))
    if found:
        with writer(db) as cat, cat.transaction() as con:
            con.executemany("UPDATE saes SET hook_name = ?, layer = ?, d_in = ?, d_sae = ?, architecture = ? "
                            "WHERE release = ? AND sae_id = ?",
                            [[*c.values(), release, sae_id] for (release, sae_id), c in found.items()])
    return missing


# --------------------------------------------------------------------------- sync


@dataclass
class SyncReport:
    snapshot: int
    changes: list[Change]
    problems: list[str]
    ingested: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (release, sae_id, error)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.changes:
            out[f"{c.kind}s {c.action}"] = out.get(f"{c.kind}s {c.action}", 0) + 1
        return out


def _record_failure(db: Path, release: str, sae_id: str, options: dict[str, Any], error: str, after_run: int) -> None:
    """Mark this attempt's run failed, or add a failed run when it failed before starting one."""
    with writer(db) as cat:
        marked = cat.con.execute(
            "UPDATE ingest_runs SET status = 'failed', error = coalesce(error, ?), finished_at = current_timestamp, "
            "updated_at = current_timestamp WHERE release = ? AND sae_id = ? AND run > ? AND pid = ? "
            "AND status = 'running' RETURNING run", [error, release, sae_id, after_run, os.getpid()]).fetchall()
        seen = first_row(cat.con, "SELECT run FROM ingest_runs WHERE release = ? AND sae_id = ? AND run > ? "
                                  "AND pid = ? AND status = 'failed'", [release, sae_id, after_run, os.getpid()])
        if not marked and seen is None:
            cat.con.execute(
                "INSERT INTO ingest_runs (release, sae_id, params, params_hash, status, pid, finished_at, error) "
                "VALUES (?, ?, ?, 'sync', 'failed', ?, current_timestamp, ?)",
                [release, sae_id, json.dumps(options, sort_keys=True), os.getpid(), error])


def ingest_queued(db: Path, *, retry_base: timedelta = RETRY_BASE, progress: bool = True,
                  report: Callable[[str], None] = lambda line: None, ray: str | None = None) -> tuple[list, list]:
    """Ingest the queued SAEs one after another (each fanned out on Ray at `ray`, if given); a
    failure is recorded and the next goes on."""
    from ingest.pipeline import ingest
    from ingest.sources import resolve_source

    resolve_watched(db, report)
    with Catalog.open(db) as cat:
        queue = queued(cat, retry_base)
    ingested, failed = [], []
    for n, item in enumerate(queue, 1):
        release, sae_id = item["release"], item["sae_id"]
        options = json.loads(item["options"])
        report(f"[{n}/{len(queue)}] ingesting {release} / {sae_id}")
        with Catalog.open(db) as cat:
            last_run = first_row(cat.con, "SELECT coalesce(max(run), 0) FROM ingest_runs")[0]
        try:
            opts = _ingest_options({**options, "progress": progress, **({"ray": ray} if ray else {})})
            ingest(resolve_source(release, sae_id, None), opts, db=db)
            ingested.append((release, sae_id))
        except Exception as err:  # one SAE's failure, whatever it is, must not stop the others
            error = one_line(err) if isinstance(err, SaecatError) else f"{type(err).__name__}: {one_line(err)}"
            _record_failure(db, release, sae_id, options, error, last_run)
            failed.append((release, sae_id, error))
            report(f"failed: {release} / {sae_id}: {error}")
    return ingested, failed


def sync(db: str | os.PathLike | None = None, registry: str | None = None, *, ingest: bool = False,
         retry_base: timedelta = RETRY_BASE, progress: bool = True,
         report: Callable[[str], None] = lambda line: None, ray: str | None = None) -> SyncReport:
    """Register the registry's releases and SAEs, record what changed, and (with `ingest`)
    ingest the watched SAEs that are not ready yet."""
    db = Path(db) if db is not None else default_path()
    found = read_registry(registry)
    with sync_lock(db):
        with writer(db) as cat:
            snapshot, changes = record_registry(cat, found)
        result = SyncReport(snapshot, changes, found.problems)
        report(f"registry {found.source}: {len(found.releases)} releases, {found.n_saes} SAEs; "
               + (", ".join(f"{v} {k}" for k, v in result.counts().items()) or "no changes"))
        if ingest:
            result.ingested, result.failed = ingest_queued(db, retry_base=retry_base, progress=progress, report=report,
                                                           ray=ray)
    return result


def parse_every(text: str) -> timedelta:
    """'6h', '30m', '1d', '45s' -> a timedelta."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise SaecatError(f"--every takes a number and a unit (s, m, h, d), e.g. 6h; not {text!r}") from None
    if value <= 0:
        raise SaecatError("--every must be positive")
    return timedelta(**{unit: value})


def schedule(db: str | os.PathLike | None, every: timedelta, registry: str | None = None, *,
             rounds: int | None = None, report: Callable[[str], None] = print, **options: Any) -> None:
    """Sync (and ingest) every `every`, in the foreground, until stopped (or after `rounds`).

    A round that fails (the registry unreachable, the lock held) is reported and the next round
    comes on time: a service should outlive one bad hour.
    """
    done = 0
    while rounds is None or done < rounds:
        started = time.monotonic()
        try:
            sync(db, registry, ingest=True, report=report, **options)
        except SaecatError as err:
            report(f"sync failed: {err}")
        done += 1
        if rounds is not None and done >= rounds:
            break
        wait = every.total_seconds() - (time.monotonic() - started)
        report(f"next sync in {max(wait, 0) / 60:.0f} min")
        time.sleep(max(wait, 0))


# --------------------------------------------------------------------------- status


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sync_status(db: str | os.PathLike | None = None, retry_base: timedelta = RETRY_BASE) -> dict[str, Any]:
    """What is running, done, failed and queued: the sync lock's holder, the ingestion runs, and
    the watched SAEs with their failures and next retry."""
    with Catalog.open(Path(db) if db is not None else default_path()) as cat:
        return catalog_status(cat, retry_base)


def catalog_status(cat: Catalog, retry_base: timedelta = RETRY_BASE,
                   selected: pa.Table | None = None) -> dict[str, Any]:
    """sync_status of an open catalog. `selected`: `watched(cat, retry_base)`, where the caller has it."""
    runs = cat.con.sql(
        "SELECT run, release, sae_id, status, pid, n_tokens, started_at, updated_at, error, "
        "json_extract_string(params, '$.plan.summary') AS plan FROM ingest_runs "
        "ORDER BY run DESC").to_arrow_table().to_pylist()
    watch = (selected if selected is not None else watched(cat, retry_base)).to_pylist()
    last = cat.con.sql("SELECT snapshot, source, n_releases, n_saes, synced_at FROM registry_snapshots "
                       "ORDER BY snapshot DESC LIMIT 1").to_arrow_table().to_pylist()
    running = [dict(r, alive=_alive(r["pid"])) for r in runs if r["status"] == "running"]
    return {
        "sync": lock_holder(cat.path),
        "last_sync": last[0] if last else None,
        "running": running,
        "done": [r for r in runs if r["status"] == "done"],
        "failed": [r for r in watch if r["status"] != "ready" and r["failures"]],
        "queued": _due(cat, watch),
        "unresolved": [r for r in watch if r["unresolved"]],
        "watched": len(watch),
    }
