"""saecat's ingestion: SAE source -> model forward -> feature statistics -> one catalog commit."""

from ingest.pipeline import IngestOptions, IngestResult, ingest
from ingest.sources import SaeSource, resolve_source

__all__ = ["IngestOptions", "IngestResult", "SaeSource", "ingest", "resolve_source"]
