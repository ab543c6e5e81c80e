"""Hard memory and time limits for a user's query: it runs in a worker process of its own.

Why a process. DuckDB's `memory_limit` governs its buffer manager only: sorts, hash aggregates
and joins spill or stop under it, but the values an expression computes are allocated outside
it, so `list_sum(range(1000000000))` builds an 8 GB list and `repeat('x', 1000000000)` a 1 GB
string whatever the setting says (bench/README.md, "Query limits"). And DuckDB looks for an
interrupt between vectors, so a timer's `con.interrupt()` does not stop one huge expression
before it ends. So the operating system enforces both:

- memory: the worker caps its data segment (RLIMIT_DATA: the heap and private writable
  mappings, where every DuckDB, Arrow and Python allocation lives) at its size when it starts
  plus the limit. An allocation past that fails, DuckDB raises OutOfMemoryException, and the
  worker answers with a refusal. DuckDB's own `memory_limit` is half the limit, so the operators
  that can spill do so (to a folder beside the catalog, at most twice the limit) before they
  reach the wall, whose other half is for everything DuckDB does not count;
- time: the caller waits for the worker's answer until the time limit, then kills it.

Each query gets a fresh interpreter (0.3-0.6 s to start on 2 busy cores, overlapped with the
sandbox check; the server keeps one spare waiting). A fork or a forkserver would be cheaper, but
multiprocessing's re-imports the caller's main script, which would run a user's unguarded script
again. The caller checks the query with the sandbox first; the worker opens the
catalog read-only with external access off and its configuration locked, as `Catalog.open` does.
A result larger than a quarter of the limit is refused rather than handed to the caller, which
converts it further (rows, JSON). Linux only: elsewhere RLIMIT_DATA may not bind, and the
time limit and DuckDB's memory_limit remain.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from catalog.errors import SaecatError, one_line
from catalog.macros import create_macros

if TYPE_CHECKING:
    from catalog.query import QueryResult

ENV = "SAECAT_QUERY_MEMORY"
MIN_LIMIT = 64 * 2**20
DEFAULT_SHARE = 8  # a query may take 1/8 of the machine's memory by default ...
DEFAULT_CAP = 4 * 2**30  # ... but at most 4 GiB
DUCKDB_SHARE = 0.5  # of the limit, for DuckDB's buffer manager; the rest is for what it does not count
SPILL_FACTOR = 2  # spill space on disk, in multiples of the limit
RESULT_SHARE = 4  # a result may be at most 1/4 of the limit

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from `512MB`, `2GiB`, `1.5G` (K, M, G, T are binary; KB, MB, GB, TB decimal, as in
    DuckDB) or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise SaecatError(f"cannot read {text!r} as a memory size: write e.g. 512MB, 2GB or 2GiB")
    return int(float(match.group(1)) * unit)


def format_size(n: float) -> str:
    """GiB to a tenth, MiB whole, KiB to a tenth below that (tests force budgets that small)."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def physical_memory() -> int:
    """The machine's memory, or the cgroup's limit where that is lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        cgroup = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cgroup.isdigit():
            total = min(total, int(cgroup))
    except OSError:
        pass
    return total


def default_memory_limit() -> int:
    """An eighth of the machine's memory, at most 4 GiB (the server runs two queries at once)."""
    return max(MIN_LIMIT, min(physical_memory() // DEFAULT_SHARE, DEFAULT_CAP))


def memory_limit(value: str | int | None = None) -> int:
    """The limit in bytes: `value` if given, else $SAECAT_QUERY_MEMORY, else the default."""
    if value is None:
        value = os.environ.get(ENV) or default_memory_limit()
    limit = parse_size(value)
    if limit < MIN_LIMIT:
        raise SaecatError(f"the query memory limit must be at least {format_size(MIN_LIMIT)}, not {format_size(limit)}")
    return limit


def memory_message(limit: int) -> str:
    return (f"query needs more than the {format_size(limit)} memory limit "
            f"(--memory-limit or ${ENV}); ask for fewer or smaller values")


# ------------------------------------------------------------------------------ the worker


def _data_bytes() -> int:
    """This process's data segment (VmData), the quantity RLIMIT_DATA bounds."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmData in /proc/self/status")


def _fence(limit: int, timeout_s: float | None) -> None:
    """The worker's walls: its data segment at most `limit` past its size now; an alarm shortly
    after the time limit, in case its caller died and cannot kill it."""
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        wall = _data_bytes() + limit
        resource.setrlimit(resource.RLIMIT_DATA, (wall if hard == resource.RLIM_INFINITY else min(wall, hard), hard))
    except (OSError, ValueError):
        pass  # not Linux: DuckDB's memory_limit and the caller's kill remain
    if timeout_s is not None:
        signal.alarm(math.ceil(timeout_s) + 5)


def _answer(path: str, checked: str, limit: int, temp: str) -> tuple[tuple, pa.Buffer | None]:
    """Run one checked query: ("ok", size) and the result as an Arrow IPC stream, or
    ("memory" | "error" | "large", detail) and None."""
    try:
        con = duckdb.connect(path, read_only=True, config={
            "enable_external_access": False, "memory_limit": f"{int(limit * DUCKDB_SHARE) // 1024}KiB",
            "temp_directory": temp, "max_temp_directory_size": f"{SPILL_FACTOR * limit // 1024}KiB"})
        con.execute("SET enable_progress_bar = false")
        con.execute("SET lock_configuration = true")
        create_macros(con)
        table = con.sql(checked).to_arrow_table()
        if table.nbytes > limit // RESULT_SHARE:
            return ("large", table.nbytes), None
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return ("ok", None), sink.getvalue()
    except (duckdb.OutOfMemoryException, MemoryError) as err:
        return ("memory", one_line(err)), None
    except duckdb.Error as err:
        text = one_line(err)
        return ("memory" if text.startswith("Out of Memory Error") else "error", text), None
    except Exception as err:  # noqa: BLE001 - the caller states it; the worker has nobody else to tell
        return ("error", f"{type(err).__name__}: {one_line(err)}"), None


def _worker_main() -> None:
    """A worker: loaded and waiting (a spare) until its request arrives on stdin; answers on stdout
    with a pickled header, then the Arrow IPC stream when there is one; then exits."""
    request = sys.stdin.buffer.read()
    if not request:
        return  # the caller let it go (or died) before it was needed
    path, checked, limit, temp, timeout_s = pickle.loads(request)
    _fence(limit, timeout_s)
    header, data = _answer(path, checked, limit, temp)
    out = sys.stdout.buffer
    out.write(pickle.dumps(header))
    if data is not None:
        out.write(memoryview(data))
    out.flush()


# ------------------------------------------------------------------------------ the caller

_ROOT = str(Path(__file__).resolve().parents[1])
_spare: subprocess.Popen | None = None
_spare_lock = threading.Lock()
keep_spare = False  # the server sets it: a worker waits, loaded, for the next query


def _spawn() -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-c", "from catalog.limits import _worker_main; _worker_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _take_worker() -> subprocess.Popen:
    """The spare worker if one is waiting, else a new one; with keep_spare, the next spare starts."""
    global _spare
    with _spare_lock:
        worker, _spare = _spare, None
        if keep_spare:
            _spare = _spawn()
    if worker is None or worker.poll() is not None:
        worker = _spawn()
    return worker


def _temp_folder(path: Path) -> str:
    """A fresh spill folder beside the catalog (on its disk, not a tmpfs), else in the system's."""
    from catalog.store import sidecar_dir

    try:
        parent = sidecar_dir(path) / "tmp"
        parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix="query-", dir=parent)
    except OSError:
        return tempfile.mkdtemp(prefix="saecat-query-")


def run_limited(path: str | os.PathLike, sql: str, *, dialect: str | None = None, max_rows: int | None = None,
                timeout_s: float | None = None, memory: str | int | None = None) -> "QueryResult":
    """Check `sql` with the sandbox and run it on the catalog at `path` in a worker process: at most
    `memory` bytes (see memory_limit), killed `timeout_s` seconds after this call, at most
    `max_rows` rows. Every refusal and failure is a SaecatError."""
    from catalog.query import QueryResult  # the caller's side only: the worker does without sqlglot
    from catalog.sandbox import check_query

    started = time.monotonic()
    limit = memory_limit(memory)
    if max_rows is not None and max_rows < 0:
        raise SaecatError(f"max_rows must be 0 or more, not {max_rows}")
    if timeout_s is not None and timeout_s <= 0:
        raise SaecatError(f"the time limit must be positive, not {timeout_s:g} s")
    worker = _take_worker()  # it loads while the query is checked
    temp = None
    try:
        checked = check_query(sql, dialect=dialect, max_rows=None if max_rows is None else max_rows + 1)
        temp = _temp_folder(Path(path))
        request = pickle.dumps((str(Path(path).resolve()), checked, limit, temp, timeout_s))
        # The time limit counts from this call: a worker's start is part of its query's time.
        left = None if timeout_s is None else max(timeout_s - (time.monotonic() - started), 0.001)
        out, err = worker.communicate(request, timeout=left)
    except subprocess.TimeoutExpired:
        raise SaecatError(f"query interrupted: it ran past the time limit of {timeout_s:g} s") from None
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    stream = io.BytesIO(out)
    try:
        kind, detail = pickle.load(stream)
    except Exception:  # noqa: BLE001 - no answer: the worker died
        code = worker.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise SaecatError(f"query failed: its worker process ended with {how} (memory limit "
                          f"{format_size(limit)}){': ' + last[0] if last[0] else ''}") from None
    if kind == "memory":
        raise SaecatError(memory_message(limit))
    if kind == "large":
        raise SaecatError(f"query result is {format_size(detail)}, more than a quarter of the "
                          f"{format_size(limit)} memory limit (--memory-limit or ${ENV}): ask for fewer rows or columns")
    if kind == "error":
        raise SaecatError(f"query failed: {detail}")
    table = pa.ipc.open_stream(pa.py_buffer(out)[stream.tell():]).read_all()
    truncated = max_rows is not None and table.num_rows > max_rows
    return QueryResult(table.slice(0, max_rows) if truncated else table, truncated)
