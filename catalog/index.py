"""FAISS indexes over decoder directions, files beside the catalog, one per SAE and kind.

Each index holds the SAE's unit-normalised decoder rows under inner product, so a search returns
cosine similarities: "exact" (flat, written at ingestion) or "hnsw" (approximate, built on first
use, which takes a minute at 16k features, so it is kept too). FAISS ids encode (sae, feature) as
`sae << 32 | feature`, which keeps results from different SAEs unambiguous when they are merged.
A small JSON file beside each index records the catalog state it was built from; an index whose
record no longer matches the catalog is stale and is rebuilt on first use.

Reading an index back costs about ten of its searches (150 MB at 16k x 2,304), so a process
keeps the indexes it uses in INDEXES, an LRU cache within $SAECAT_INDEX_CACHE_GB (default 4).

Exact searches run on a GPU when FAISS has one (faiss-gpu, `pip install 'saecat[gpu]'`), else on
the CPU; $SAECAT_INDEX_DEVICE (auto, cpu, cuda) overrides. FAISS has no GPU HNSW, and on a GPU
the flat search is the faster one anyway.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Literal

import faiss
import numpy as np

from catalog.errors import SaecatError

if TYPE_CHECKING:
    from catalog.store import Catalog, SaeRecord

_FEATURE_BITS = 32
Kind = Literal["exact", "hnsw"]
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128  # recall@10 0.97-0.99 (bench/README.md)


def encode_ids(sae: int, features: np.ndarray) -> np.ndarray:
    return (np.int64(sae) << _FEATURE_BITS) | features.astype(np.int64)


def decode_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS ids -> (sae keys, feature indices); -1 (no result) maps to (-1, -1)."""
    missing = ids < 0
    sae = np.where(missing, -1, ids >> _FEATURE_BITS)
    feature = np.where(missing, -1, ids & ((1 << _FEATURE_BITS) - 1))
    return sae, feature


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as contiguous float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def fingerprint(record: "SaeRecord", kind: Kind = "exact") -> str:
    """What an index must agree with: a re-ingestion changes ingested_at, hence the fingerprint;
    an HNSW index also records the parameters it was built with."""
    state = f"sae={record.sae};d_sae={record.d_sae};d_in={record.d_in};ingested_at={record.ingested_at}"
    return state if kind == "exact" else f"{state};hnsw=M{HNSW_M},efConstruction{HNSW_EF_CONSTRUCTION}"


def index_device(requested: str | None = None) -> str:
    """Where exact searches run: 'cuda' if FAISS sees a GPU, else 'cpu', for 'auto'
    (the default, or $SAECAT_INDEX_DEVICE)."""
    requested = (requested or os.environ.get("SAECAT_INDEX_DEVICE") or "auto").lower()
    if requested not in ("auto", "cpu", "cuda"):
        raise SaecatError(f"unknown index device {requested!r}: use auto, cpu or cuda")
    if requested == "cpu" or (requested == "auto" and faiss.get_num_gpus() == 0):
        return "cpu"
    if faiss.get_num_gpus() == 0:
        raise SaecatError("index device 'cuda' asked for, but FAISS sees no GPU: install faiss-gpu "
                          "(pip install 'saecat[gpu]') on a machine with CUDA, or use auto or cpu")
    return "cuda"


_GPU_MAX_K = 2048  # FAISS's GPU k-selection limit; larger k searches on the CPU
_GPU: "faiss.StandardGpuResources | None" = None
_GPU_LOCK = threading.Lock()  # FAISS's GPU resources serve one search at a time


def _gpu_resources() -> "faiss.StandardGpuResources":
    global _GPU
    if _GPU is None:
        _GPU = faiss.StandardGpuResources()
    return _GPU


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file atomically: to a temp name of this process and thread (the HTTP server builds
    indexes in several threads), then rename over `path`."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    write(tmp)
    os.replace(tmp, path)


def _meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _stored_rows(index: faiss.Index) -> np.ndarray:
    """The unit rows a flat or HNSW-flat index stores, as a view of the index's own memory."""
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)
    flat = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else inner
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


class VectorIndex:
    """A cosine index over one SAE's decoder directions: exact (flat) or approximate (HNSW)."""

    def __init__(self, sae: int, index: faiss.Index):
        self.sae = sae
        self.faiss = index
        self._unit = _stored_rows(index)  # one copy of the rows: the index's; it lives as long as self
        self._gpu: faiss.Index | None = None  # the flat index's copy on the GPU, made on first search there

    @property
    def nbytes(self) -> int:
        return self._unit.nbytes

    @cached_property
    def ids(self) -> np.ndarray:
        """The FAISS id of each stored row."""
        return faiss.vector_to_array(self.faiss.id_map).astype(np.int64)

    @staticmethod
    def paths(catalog: "Catalog", sae: int, kind: Kind = "exact") -> tuple[Path, Path]:
        folder = catalog.sidecar / "indexes"
        stem = f"sae-{sae}" if kind == "exact" else f"sae-{sae}.{kind}"
        return folder / f"{stem}.faiss", folder / f"{stem}.json"

    @classmethod
    def build(cls, sae: int, decoders: np.ndarray) -> "VectorIndex":
        unit = unit_rows(decoders)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(unit.shape[1]))
        index.add_with_ids(unit, encode_ids(sae, np.arange(len(unit))))
        return cls(sae, index)

    @classmethod
    def build_hnsw(cls, exact: "VectorIndex", m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
                   ef_search: int = HNSW_EF_SEARCH, chunk: int = 4096) -> "VectorIndex":
        """An HNSW index over the same unit rows and ids as an exact one; added in chunks to show
        progress (minutes at 65k features)."""
        from rich.console import Console
        from rich.progress import track

        graph = faiss.IndexHNSWFlat(exact.faiss.d, m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = ef_construction
        graph.hnsw.efSearch = ef_search
        index = faiss.IndexIDMap2(graph)
        ids, n = exact.ids, exact.faiss.ntotal
        console = Console(stderr=True)
        for start in track(range(0, n, chunk), f"HNSW index, SAE {exact.sae}", console=console, transient=True,
                           disable=not console.is_terminal or n <= chunk):
            rows = np.arange(start, min(start + chunk, n))
            index.add_with_ids(exact.vector(rows), ids[rows])
        return cls(exact.sae, index)

    def save(self, catalog: "Catalog", record: "SaeRecord", kind: Kind = "exact") -> None:
        """Write the index, then its fingerprint, each atomically."""
        index_path, meta_path = self.paths(catalog, self.sae, kind)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        _replace(index_path, lambda tmp: faiss.write_index(self.faiss, str(tmp)))
        _replace(meta_path, lambda tmp: tmp.write_text(json.dumps({"fingerprint": fingerprint(record, kind)})))

    @classmethod
    def load_or_build(cls, catalog: "Catalog", record: "SaeRecord", kind: Kind = "exact") -> "VectorIndex":
        """The index from its file if that matches the catalog, else built (an HNSW one from the
        exact one) and written."""
        if record.status != "ready":
            raise SaecatError(f"SAE {record.sae} ({record.release}, {record.sae_id}) has no features yet")
        index_path, meta_path = cls.paths(catalog, record.sae, kind)
        if _meta(meta_path).get("fingerprint") == fingerprint(record, kind):
            try:
                return cls(record.sae, faiss.read_index(str(index_path)))
            except RuntimeError:
                pass  # unreadable file: rebuild below
        if kind == "exact":
            built = cls.build(record.sae, catalog.decoders(record.sae))
        else:
            built = cls.build_hnsw(catalog.index(record.sae))
        built.save(catalog, record, kind)
        return built

    def vector(self, feature: int | np.ndarray) -> np.ndarray:
        """Unit rows, copied: a view would outlive the index if the cache dropped it."""
        return np.array(self._unit[feature])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch search by cosine: (sae keys, features, cosines), each [n_queries, k]."""
        queries = unit_rows(np.atleast_2d(queries))
        if queries.shape[1] != self.faiss.d:
            raise SaecatError(f"query vectors have dimension {queries.shape[1]}, the index {self.faiss.d}")
        k = min(k, self.faiss.ntotal)
        if k <= _GPU_MAX_K and self._on_gpu():
            cosines, ids = self._search_gpu(queries, k)
        else:
            cosines, ids = self.faiss.search(queries, k)
        sae, feature = decode_ids(ids)
        return sae, feature, cosines

    def _on_gpu(self) -> bool:
        return index_device() == "cuda" and isinstance(faiss.downcast_index(self.faiss.index), faiss.IndexFlat)

    def _search_gpu(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The flat index's search on a GPU copy of it; FAISS's own id map turns rows into ids."""
        with _GPU_LOCK:
            if self._gpu is None:
                self._gpu = faiss.index_cpu_to_gpu(_gpu_resources(), 0, faiss.downcast_index(self.faiss.index))
            cosines, rows = self._gpu.search(queries, k)
        return cosines, np.where(rows < 0, -1, self.ids[np.maximum(rows, 0)])


def _hnsw_meta(catalog: "Catalog", record: "SaeRecord") -> tuple[Path, dict, dict]:
    """The HNSW index's .json, its contents, and the recall estimates in it that are this index's
    (none if the file is from an older index, or damaged)."""
    path = VectorIndex.paths(catalog, record.sae, "hnsw")[1]
    meta = _meta(path)
    recalls = meta.get("recall") if meta.get("fingerprint") == fingerprint(record, "hnsw") else None
    return path, meta, recalls if isinstance(recalls, dict) else {}


def hnsw_recall(catalog: "Catalog", record: "SaeRecord", name: str) -> float | None:
    """A recall estimate stored beside the SAE's HNSW index under `name`, if it is this index's."""
    value = _hnsw_meta(catalog, record)[2].get(name)
    return float(value) if isinstance(value, (int, float)) else None


def store_hnsw_recall(catalog: "Catalog", record: "SaeRecord", name: str, value: float) -> None:
    """Keep a recall estimate beside the HNSW index it measured; a rebuilt index starts without."""
    path, meta, recalls = _hnsw_meta(catalog, record)
    if meta.get("fingerprint") != fingerprint(record, "hnsw"):
        return  # the index changed since it was measured
    meta["recall"] = {**recalls, name: value}
    try:
        _replace(path, lambda tmp: tmp.write_text(json.dumps(meta)))
    except OSError:
        pass  # a read-only catalog folder: the estimate is still returned, just not kept


class IndexCache:
    """Indexes kept in this process, the least recently used dropped first past max_bytes.

    Keys carry the catalog state they were built from (`fingerprint`), so a re-ingested SAE is
    never answered from an old entry; the old one just ages out."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, VectorIndex] = OrderedDict()
        self._lock = threading.Lock()  # the HTTP server searches from several threads

    def get(self, key: Hashable, build: Callable[[], VectorIndex]) -> VectorIndex:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        index = build()  # outside the lock: a 50 s HNSW build must not block other SAEs' searches
        with self._lock:
            self._items[key] = index
            total = sum(i.nbytes for i in self._items.values())
            while total > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                total -= dropped.nbytes
        return index

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


INDEXES = IndexCache(int(float(os.environ.get("SAECAT_INDEX_CACHE_GB", "4")) * 2**30))


def cache_key(catalog: "Catalog", record: "SaeRecord", kind: Kind) -> tuple[str, str, str]:
    return str(catalog.path.resolve()), kind, fingerprint(record, kind)
