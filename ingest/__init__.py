"""saecat's ingestion: SAE source -> model forward -> feature statistics -> one catalog commit.

The names below load their modules on first use: `ingest.sync`, `ingest.registry` and the CLI
commands built on them (sync, status, watch, releases) then start without importing torch,
sae-lens and transformer-lens, which take seconds.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.pipeline import IngestOptions, IngestResult, ingest
    from ingest.sources import SaeSource, resolve_source

_HOME = {"IngestOptions": "ingest.pipeline", "IngestResult": "ingest.pipeline", "ingest": "ingest.pipeline",
         "SaeSource": "ingest.sources", "resolve_source": "ingest.sources"}

__all__ = ["IngestOptions", "IngestResult", "SaeSource", "ingest", "resolve_source"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'ingest' has no attribute {name!r}")
