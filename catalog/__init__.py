"""saecat's catalog: the DuckDB schema, the store, the vector index and the SQL sandbox."""

from catalog.errors import SaecatError
from catalog.store import Catalog, SaeRecord, default_path, writer

__all__ = ["Catalog", "SaeRecord", "SaecatError", "default_path", "writer"]
