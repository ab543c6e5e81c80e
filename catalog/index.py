"""FAISS indexes over decoder directions, files beside the catalog, one per SAE and kind.

Each index holds the SAE's unit-normalised decoder rows under inner product, so a search returns
cosine similarities: "exact" (flat, written at ingestion) or approximate. The approximate kind
depends on the width (`approximate_kind`): "hnsw" below IVF_FROM features (built on first use,
seconds at those widths, and kept), "ivf" from there up (IndexIVFFlat, trained on a sample;
seconds where an HNSW graph takes minutes to hours, so ingestion writes it beside the exact one,
with its recall measured, `write_indexes`). FAISS ids encode (sae, feature) as
`sae << 32 | feature`, which keeps results from different SAEs unambiguous when they are merged.
A small JSON file beside each index records the catalog state it was built from, and the recall
estimates measured on an approximate one; an index whose record no longer matches the catalog is
stale and is rebuilt on first use.

Every build adds the rows in chunks (`DecoderRows`: an in-memory array or tensor, or batches
streamed from DuckDB), normalising one chunk at a time: an exact index's storage is allocated
once at its final size and filled in place, so a build holds the index and one chunk, never a
second copy of the decoder.

Reading an index back costs about ten of its searches (150 MB at 16k x 2,304), so a process
keeps the indexes it uses in INDEXES, an LRU cache within $SAECAT_INDEX_CACHE_GB (default 4).

Exact searches run on a GPU when FAISS has one (faiss-gpu, `pip install 'saecat[gpu]'`), else on
the CPU; $SAECAT_INDEX_DEVICE (auto, cpu, cuda) overrides. Approximate searches stay on the CPU
(FAISS has no GPU HNSW, and on a GPU the flat search is the faster one anyway).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Iterator, Literal, Protocol, TypeVar

import faiss
import numpy as np

from catalog.errors import SaecatError

if TYPE_CHECKING:
    from catalog.store import Catalog, SaeRecord

_FEATURE_BITS = 32
Kind = Literal["exact", "hnsw", "ivf"]
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128  # recall@10 0.97-0.99 (bench/README.md)
# From this many features on the approximate index is IVF, written at ingestion: an HNSW graph takes
# 47 s at 16,384 x 2,304 on 2 cores, 4.5 min at 65,536 and x5.8 per x4 rows; an IVF index 2.7 s,
# 14 s and 26 s at 262,144 x 768 (bench/README.md, "Wide SAEs"), searched 10-20x faster than a
# flat one at recall@10 0.95-0.97. Module-level so tests can lower it.
IVF_FROM = 16_384
# IVF: nlist ~ 4 sqrt(F) (a power of two), each list trained on >= 40 sample rows (FAISS's
# minimum is 39), 10 k-means iterations; nprobe = nlist / 32 lists scanned per query, which gave
# recall@10 0.963-0.969 at 65,536 x 2,304 and 262,144 x 768 (bench/README.md).
IVF_LISTS_PER_SQRT, IVF_TRAIN_PER_LIST, IVF_NITER, IVF_PROBE_FRACTION = 4, 40, 10, 32
CHUNK_BYTES = 64 << 20  # float32 rows normalised and added at a time


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


def chunk_rows(d: int) -> int:
    """Rows per chunk at width d: CHUNK_BYTES of float32."""
    return max(1, CHUNK_BYTES // (4 * max(d, 1)))


def _float32(rows: Any) -> np.ndarray:
    """A chunk of an array or a torch tensor (on any device, any dtype) as float32 numpy."""
    if hasattr(rows, "detach"):
        rows = rows.detach().float().cpu().numpy()
    return np.asarray(rows, dtype=np.float32)


Batches = Iterator[tuple[np.ndarray, np.ndarray]]  # (feature indices [b], their rows [b, d])


@dataclass(frozen=True)
class DecoderRows:
    """An SAE's decoder rows, read in batches as often as a build needs (IVF reads them twice:
    a training sample, then every row), without ever holding them all: from an array or tensor
    in memory, or streamed from the catalog. Batches may come in any order of features."""

    shape: tuple[int, int]
    batches: Callable[[], Batches]

    @classmethod
    def of(cls, decoders: "np.ndarray | Any", chunk: int | None = None) -> "DecoderRows":
        """Chunks of an array or tensor [d_sae, d_in], each converted to float32 on its own."""
        n, d = (int(x) for x in decoders.shape)
        step = chunk or chunk_rows(d)

        def batches() -> Batches:
            for start in range(0, n, step):
                stop = min(n, start + step)
                yield np.arange(start, stop), _float32(decoders[start:stop])

        return cls((n, d), batches)

    @classmethod
    def from_catalog(cls, catalog: "Catalog", record: "SaeRecord", chunk: int | None = None) -> "DecoderRows":
        """The SAE's `features.decoder` column, streamed from DuckDB in Arrow batches. No ORDER
        BY: a sort would materialise the whole column; builds place rows by their feature."""
        n, d = int(record.d_sae or 0), int(record.d_in or 0)
        rows_per_batch = chunk or chunk_rows(d)

        def batches() -> Batches:
            reader = catalog.con.sql(f"SELECT feature, decoder FROM features WHERE sae = {int(record.sae)}"
                                     ).to_arrow_reader(rows_per_batch)
            for batch in reader:
                decoder = batch.column(1)
                yield (batch.column(0).to_numpy().astype(np.int64),
                       decoder.flatten().to_numpy(zero_copy_only=False).reshape(len(decoder), d))

        return cls((n, d), batches)


def _rows(decoders: "DecoderRows | np.ndarray | Any") -> DecoderRows:
    return decoders if isinstance(decoders, DecoderRows) else DecoderRows.of(decoders)


def _progress(batches: Iterable[tuple[np.ndarray, np.ndarray]], total: int, label: str,
              show: bool) -> Batches:
    """The batches, with a rich progress bar in rows on stderr if `show` and stderr is a terminal."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not (show and console.is_terminal)) as bar:
        task = bar.add_task(label, total=total)
        for features, rows in batches:
            yield features, rows
            bar.advance(task, len(features))


def ivf_lists(n: int) -> int:
    """IVF lists for n rows: ~IVF_LISTS_PER_SQRT sqrt(n) as a power of two, fewer where n rows
    could not give each list IVF_TRAIN_PER_LIST training rows."""
    wanted = int(2 ** round(np.log2(max(IVF_LISTS_PER_SQRT * np.sqrt(max(n, 1)), 1))))
    return max(1, min(wanted, n // IVF_TRAIN_PER_LIST))


def ivf_probes(nlist: int) -> int:
    return max(1, nlist // IVF_PROBE_FRACTION)


def approximate_kind(record: "SaeRecord") -> Kind:
    """The approximate index an SAE's approximate searches use: HNSW, or IVF from IVF_FROM features."""
    return "ivf" if (record.d_sae or 0) >= IVF_FROM else "hnsw"


def fingerprint(record: "SaeRecord", kind: Kind = "exact") -> str:
    """What an index must agree with: a re-ingestion changes ingested_at, hence the fingerprint;
    an approximate index also records the parameters it was built with."""
    state = f"sae={record.sae};d_sae={record.d_sae};d_in={record.d_in};ingested_at={record.ingested_at}"
    if kind == "hnsw":
        return f"{state};hnsw=M{HNSW_M},efConstruction{HNSW_EF_CONSTRUCTION}"
    if kind == "ivf":
        nlist = ivf_lists(record.d_sae or 0)
        return f"{state};ivf=nlist{nlist},nprobe{ivf_probes(nlist)},train{IVF_TRAIN_PER_LIST}x{IVF_NITER}"
    return state


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


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file atomically: to a temp name of this process and thread (the HTTP server builds
    indexes in several threads), then rename over `path`."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    write(tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _stored_rows(index: faiss.Index) -> np.ndarray | None:
    """The unit rows a flat or HNSW-flat index stores, as a view of the index's own memory (in
    feature order: both are built in it); None for IVF, whose rows lie in its inverted lists."""
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)
    if isinstance(inner, faiss.IndexIVF):
        return None
    flat = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else inner
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def _add_in_chunks(index: faiss.IndexIDMap2, sae: int, rows: DecoderRows, label: str, show: bool) -> None:
    """Add every row, unit-normalised, one batch at a time, under its (sae, feature) id."""
    for features, batch in _progress(rows.batches(), rows.shape[0], label, show):
        index.add_with_ids(unit_rows(batch), encode_ids(sae, features))


class VectorIndex:
    """A cosine index over one SAE's decoder directions: exact (flat) or approximate (HNSW, IVF)."""

    def __init__(self, sae: int, index: faiss.Index):
        self.sae = sae
        self.faiss = index
        self._unit = _stored_rows(index)  # one copy of the rows: the index's; it lives as long as self
        self._gpu: faiss.Index | None = None  # the flat index's copy on the GPU, made on first search there

    @property
    def nbytes(self) -> int:
        return self.faiss.ntotal * self.faiss.d * 4  # the rows, which every kind stores once

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
    def build(cls, sae: int, decoders: "DecoderRows | np.ndarray | Any", *, progress: bool = False) -> "VectorIndex":
        """The exact index over decoder rows [d_sae, d_in] (an array, a tensor, or DecoderRows).
        The flat storage is allocated once at its final size and each batch is normalised into
        its rows' places: appending would regrow (and copy) it, and a batch may come in any order."""
        rows = _rows(decoders)
        n, d = rows.shape
        flat = faiss.IndexFlatIP(d)
        index = faiss.IndexIDMap2(flat)  # FAISS wraps only an empty index
        flat.codes.resize(n * d * 4)
        flat.ntotal = n
        stored = _stored_rows(flat)
        seen = np.zeros(n, dtype=bool)
        for features, batch in _progress(rows.batches(), n, f"exact index, SAE {sae}", progress and n >= IVF_FROM):
            stored[features] = unit_rows(batch)
            seen[features] = True
        if not seen.all():
            raise SaecatError(f"SAE {sae}: {n - int(seen.sum())} of its {n} decoder rows are missing")
        faiss.copy_array_to_vector(encode_ids(sae, np.arange(n)), index.id_map)
        index.ntotal = n
        index.construct_rev_map()
        return cls(sae, index)

    @classmethod
    def build_hnsw(cls, exact: "VectorIndex", m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
                   ef_search: int = HNSW_EF_SEARCH, chunk: int = 4096, progress: bool = True) -> "VectorIndex":
        """An HNSW index over the same unit rows and ids as an exact one; added in chunks to show
        progress (minutes at 65k features)."""
        graph = faiss.IndexHNSWFlat(exact.faiss.d, m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = ef_construction
        graph.hnsw.efSearch = ef_search
        index = faiss.IndexIDMap2(graph)
        n = exact.faiss.ntotal
        _add_in_chunks(index, exact.sae, DecoderRows.of(exact._unit, chunk), f"HNSW index, SAE {exact.sae}",
                       progress and n > chunk)
        return cls(exact.sae, index)

    @classmethod
    def build_ivf(cls, sae: int, decoders: "DecoderRows | np.ndarray | Any", nlist: int | None = None,
                  nprobe: int | None = None, *, progress: bool = True, seed: int = 0) -> "VectorIndex":
        """An IVF index (IndexIVFFlat, inner product on unit rows): k-means on a uniform sample of
        IVF_TRAIN_PER_LIST rows per list, gathered in a first pass over the batches, then every
        row added in a second. Holds the index, one batch and the sample."""
        rows = _rows(decoders)
        n, d = rows.shape
        nlist = nlist or ivf_lists(n)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter, ivf.cp.seed = IVF_NITER, seed
        picked = np.sort(np.random.default_rng(seed).choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))
        sample = np.empty((len(picked), d), dtype=np.float32)
        for features, batch in rows.batches():
            hit = np.isin(features, picked, assume_unique=True)
            sample[np.searchsorted(picked, features[hit])] = batch[hit]
        ivf.train(unit_rows(sample))
        del sample
        ivf.make_direct_map()  # rows by position: the id map's reconstruct (vector()) goes through it
        ivf.nprobe = nprobe or ivf_probes(nlist)
        index = faiss.IndexIDMap2(ivf)
        _add_in_chunks(index, sae, rows, f"IVF index, SAE {sae}", progress)
        return cls(sae, index)

    def save(self, catalog: "Catalog", record: "SaeRecord", kind: Kind = "exact") -> None:
        """Write the index, then its fingerprint, each atomically."""
        index_path, meta_path = self.paths(catalog, self.sae, kind)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(index_path, lambda tmp: faiss.write_index(self.faiss, str(tmp)))
        replace_file(meta_path, lambda tmp: tmp.write_text(json.dumps({"fingerprint": fingerprint(record, kind)})))

    @classmethod
    def load_or_build(cls, catalog: "Catalog", record: "SaeRecord", kind: Kind = "exact") -> "VectorIndex":
        """The index from its file if that matches the catalog, else built and written: exact and
        IVF from decoder rows streamed from the catalog, HNSW from the exact index."""
        if record.status != "ready":
            raise SaecatError(f"SAE {record.sae} ({record.release}, {record.sae_id}) has no features yet")
        index_path = cls.paths(catalog, record.sae, kind)[0]
        if is_written(catalog, record, kind):
            try:
                return cls(record.sae, faiss.read_index(str(index_path)))
            except RuntimeError:
                pass  # unreadable file: rebuild below
        if kind == "exact":
            built = cls.build(record.sae, DecoderRows.from_catalog(catalog, record), progress=True)
        elif kind == "ivf":
            built = cls.build_ivf(record.sae, DecoderRows.from_catalog(catalog, record))
        else:
            built = cls.build_hnsw(catalog.index(record.sae))
        built.save(catalog, record, kind)
        return built

    def vector(self, feature: int | np.ndarray) -> np.ndarray:
        """Unit rows, copied: a view would outlive the index if the cache dropped it."""
        if self._unit is not None:
            return np.array(self._unit[feature])
        features = np.asarray(feature, dtype=np.int64)
        rows = self.faiss.reconstruct_batch(encode_ids(self.sae, features.ravel()))
        return rows.reshape(*features.shape, self.faiss.d)

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


def write_indexes(catalog: "Catalog", record: "SaeRecord", decoders: "DecoderRows | np.ndarray | Any",
                  progress: bool = False) -> None:
    """What an ingestion writes beside the catalog: the exact index and, from IVF_FROM features,
    the IVF index too with its recall@RECALL_K against the exact one, so that no approximate
    query waits for a build or a measurement. `decoders` is the SAE's W_dec (array or tensor, any
    device and dtype) or DecoderRows, read chunk by chunk; the exact index is freed before the IVF
    one is built (its answers to the recall sample kept), so at most one is held."""
    rows = _rows(decoders)
    exact = VectorIndex.build(record.sae, rows, progress=progress)
    exact.save(catalog, record)
    if approximate_kind(record) != "ivf":
        return
    queries = exact.vector(recall_rows(rows.shape[0]))
    want = exact.search(queries, RECALL_K)[1]
    del exact
    ivf = VectorIndex.build_ivf(record.sae, rows, progress=progress)
    ivf.save(catalog, record, "ivf")
    store_recall(catalog, record, "ivf", recall_name(RECALL_K), overlap(want, ivf.search(queries, RECALL_K)[1]))


def is_written(catalog: "Catalog", record: "SaeRecord", kind: Kind) -> bool:
    """Whether the SAE's `kind` index is on disk and matches the catalog (a search would read it,
    not build it)."""
    index_path, meta_path = VectorIndex.paths(catalog, record.sae, kind)
    return index_path.is_file() and read_json(meta_path).get("fingerprint") == fingerprint(record, kind)


# ------------------------------------------------------------------------------------ recall

RECALL_K, RECALL_SAMPLE, RECALL_SEED = 10, 200, 0  # what ingestion measures an IVF index with


def recall_name(k: int, sample: int = RECALL_SAMPLE, seed: int = RECALL_SEED) -> str:
    return f"k={k},sample={sample},seed={seed}"


def recall_rows(n: int, sample: int = RECALL_SAMPLE, seed: int = RECALL_SEED) -> np.ndarray:
    """The SAE's own rows whose neighbours a recall estimate compares."""
    return np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)


def overlap(want: np.ndarray, got: np.ndarray) -> float:
    """Mean fraction of each row of `want` (exact top-k ids) that `got` also holds."""
    hits = sum(len(set(w.tolist()) & set(g.tolist())) for w, g in zip(want, got))
    return hits / want.size if want.size else 1.0


def recall_at_k(exact: VectorIndex, approx: VectorIndex, queries: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k that the approximate index also returns."""
    return overlap(exact.search(queries, k)[1], approx.search(queries, k)[1])


def _recall_meta(catalog: "Catalog", record: "SaeRecord", kind: Kind) -> tuple[Path, dict, dict]:
    """An approximate index's .json, its contents, and the recall estimates in it that are this
    index's (none if the file is from an older index, or damaged)."""
    path = VectorIndex.paths(catalog, record.sae, kind)[1]
    meta = read_json(path)
    recalls = meta.get("recall") if meta.get("fingerprint") == fingerprint(record, kind) else None
    return path, meta, recalls if isinstance(recalls, dict) else {}


def stored_recall(catalog: "Catalog", record: "SaeRecord", kind: Kind, name: str) -> float | None:
    """A recall estimate stored beside the SAE's `kind` index under `name`, if it is this index's."""
    value = _recall_meta(catalog, record, kind)[2].get(name)
    return float(value) if isinstance(value, (int, float)) else None


def store_recall(catalog: "Catalog", record: "SaeRecord", kind: Kind, name: str, value: float) -> None:
    """Keep a recall estimate beside the index it measured; a rebuilt index starts without."""
    path, meta, recalls = _recall_meta(catalog, record, kind)
    if meta.get("fingerprint") != fingerprint(record, kind):
        return  # the index changed since it was measured
    meta["recall"] = {**recalls, name: value}
    try:
        replace_file(path, lambda tmp: tmp.write_text(json.dumps(meta)))
    except OSError:
        pass  # a read-only catalog folder: the estimate is still returned, just not kept


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


AnyIndex = TypeVar("AnyIndex", bound=Sized)


class IndexCache:
    """Indexes kept in this process (decoder indexes, the explanation index), the least recently
    used dropped first past max_bytes.

    Keys carry the catalog state they were built from (`fingerprint`), so a re-ingested SAE is
    never answered from an old entry; the old one just ages out."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, Sized] = OrderedDict()
        self._lock = threading.Lock()  # the HTTP server searches from several threads

    def get(self, key: Hashable, build: Callable[[], AnyIndex]) -> AnyIndex:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[return-value]
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


def cached_index(catalog: "Catalog", record: "SaeRecord", kind: Kind) -> VectorIndex:
    """The SAE's `kind` index through INDEXES: in memory once used, else read, else built."""
    return INDEXES.get(cache_key(catalog, record, kind), lambda: VectorIndex.load_or_build(catalog, record, kind))


def approximate_index(catalog: "Catalog", record: "SaeRecord") -> VectorIndex:
    """The index an approximate search of this SAE uses: HNSW, or IVF for a wide SAE."""
    return cached_index(catalog, record, approximate_kind(record))
