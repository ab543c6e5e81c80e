"""Counting one SAE's token stream on a Ray cluster.

The driver tokenises and batches the stream exactly as a single-machine run does, cuts it into
parts of whole shards (`IngestOptions.ray_task_shards` shards of `shard_batches` batches) and
hands each part to a Ray task. A task loads the SAE and its model once per worker process, counts
its part with the single-machine code (`encode`, `count_batch`) from the part's place in the
stream, and returns the accumulator's state. The driver merges the states as they come: sums,
maxima, top-k and bottom-k merges, and the float sums folded shard by shard in stream order, so
the catalog is the one a single-machine run on the same device and thread count writes, bit for
bit. Ray retries a task whose worker dies; a task that fails on its input fails the ingestion,
and nothing is committed. The merged counters know which shards they hold, so a checkpoint of
them lets a rerun hand out only the shards still missing.

On the out-of-core pair path (ingest.budget) a task has no pair tiles: it returns its part's full
blocks' firing sets beside its state, and the driver appends them to the run's block sets on disk
as it merges, before the checkpoint that counts them. Blocks land in merge order, not stream
order; n11 is a sum over blocks, so the pair pass after the stream counts the same pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from catalog.errors import SaecatError
from ingest.accumulate import StreamPlace
from ingest.model import model_for_sae
from ingest.sources import SaeSource, load_sae
from ingest.tokens import Batch

if TYPE_CHECKING:
    from ingest.pipeline import IngestOptions, _Session

MAX_RETRIES = 3  # a task whose worker process dies is run again this many times


@dataclass(frozen=True)
class Part:
    """A run of whole shards: where it starts in the stream and its batches."""

    index: int
    place: StreamPlace
    batches: list[Batch]


def _ray():
    try:
        import ray
    except ImportError:
        raise SaecatError("counting on Ray needs the ray extra: pip install 'saecat[ray]'") from None
    return ray


def connect(address: str) -> None:
    """Join the cluster at `address` ('auto': $RAY_ADDRESS or a running local one; 'local': start
    one here), unless this process is connected already."""
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    except ConnectionError as err:
        raise SaecatError(f"no Ray cluster at {address!r}: {err}") from None


def parts(batches: Iterator[Batch], batches_per_shard: int, shards_per_part: int, counted: set[int],
          block_size: int, bos_offset: int) -> Iterator[Part]:
    """Cut the whole stream into parts of up to `shards_per_part` shards, each with its place,
    leaving out the shards in `counted` (a resumed run's)."""
    place, chunk, first, index = StreamPlace(), [], StreamPlace(), 0
    for batch in batches:
        if place.batch // batches_per_shard in counted:
            if chunk:  # a counted shard ends the part before it
                yield Part(index, first, chunk)
                chunk, index = [], index + 1
        else:
            if not chunk:
                first = place
            chunk.append(batch)
        blocks = int(((batch.lengths - bos_offset).clamp(min=0) // block_size).sum())
        place = StreamPlace(place.batch + 1, place.document + batch.n_documents, place.block + blocks)
        if len(chunk) == batches_per_shard * shards_per_part:
            yield Part(index, first, chunk)
            chunk, index = [], index + 1
    if chunk:
        yield Part(index, first, chunk)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to load and count like the driver."""

    source: SaeSource
    opts: "IngestOptions"
    model_name: str
    encode_tokens: int  # tokens encoded at once, as the run's memory plan says
    pair_tiles: bool  # count pairs in tiles (the dense path), or return the block sets (out of core)


class PartBlockSets:
    """A task's block_sink: its part's full blocks' firing sets, collected in memory and returned
    with its state for the driver to append to the run's BlockSets."""

    def __init__(self) -> None:
        self.lengths: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []

    def add_sets(self, lengths: np.ndarray, indices: np.ndarray) -> None:
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.ids.append(np.asarray(indices, dtype=np.int32))

    def state(self) -> dict[str, np.ndarray]:
        return {"part_block_lengths": np.concatenate([np.zeros(0, np.int64), *self.lengths]),
                "part_block_ids": np.concatenate([np.zeros(0, np.int32), *self.ids])}


_LOADED: dict[str, tuple[Any, Any, str]] = {}  # per worker process, by repr(spec): loaded once, reused


def count_part(spec: WorkerSpec, part: Part) -> dict:
    """A Ray task: count one part of the stream, return the accumulator's state (and, out of core,
    the part's block sets)."""
    from ingest.pipeline import count_batch, encode, new_accumulator, resolve_device

    key = repr(spec)
    if key not in _LOADED:
        device = resolve_device(spec.opts.device)
        loaded = load_sae(spec.source, device, spec.opts.fold_decoder_norm)
        _LOADED[key] = loaded, model_for_sae(loaded, spec.opts.model, device), device
    loaded, model, device = _LOADED[key]
    acc = new_accumulator(loaded, spec.opts, device, pair_tiles=spec.pair_tiles)
    blocks = None if spec.pair_tiles else PartBlockSets()
    acc.block_sink = blocks
    acc.begin(part.place)
    for batch in part.batches:
        count_batch(acc, batch, encode(loaded, model, spec.model_name, device, batch, spec.opts.threshold,
                                       spec.encode_tokens))
    acc.end_shard()
    return acc.state_dict() if blocks is None else {**acc.state_dict(), **blocks.state()}


def count_on_ray(session: "_Session", stream: Iterator[Batch], on_merge: Callable[[], None],
                 task: Callable = count_part) -> None:
    """Count the shards of `stream` (the session's whole stream) that its accumulator has not
    counted on Ray tasks, and merge them into it; `on_merge` runs after each merge (progress,
    checkpoints). `task` is count_part, or a wrapper of it."""
    from ingest.pipeline import new_accumulator

    ray = _ray()
    opts, acc = session.opts, session.acc
    if acc.open_shard is not None:
        raise SaecatError("this run was checkpointed in the middle of a shard by a run without --ray: resume it "
                          "without --ray, or start over with --restart")
    connect(opts.ray)
    gpus = 0 if opts.device.startswith("cpu") else ray.cluster_resources().get("GPU", 0)
    remote = ray.remote(task).options(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=MAX_RETRIES,
                                      retry_exceptions=False)
    tiles = session.block_sets is None
    spec = WorkerSpec(session.loaded.source, replace(opts, progress=False), session.model_name,
                      session.plan.memory.encode_tokens, tiles)
    workers = int(gpus or ray.cluster_resources().get("CPU", 1))
    in_flight: dict[Any, Part] = {}

    def merge_one() -> None:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        part = in_flight.pop(ref)
        try:
            state = ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the task raised: its input is bad, a retry would not help
            cause = getattr(err, "cause", None) or err
            message = str(cause) if isinstance(cause, SaecatError) else f"{type(cause).__name__}: {cause}"
            raise SaecatError(f"counting part {part.index} of the stream failed on Ray: {message}") from None
        except ray.exceptions.RayError as err:  # its worker died on every try
            raise SaecatError(f"part {part.index} of the stream failed on Ray after {MAX_RETRIES} retries: "
                              f"{type(err).__name__}") from None
        counts = new_accumulator(session.loaded, opts, session.device, pair_tiles=tiles)
        counts.load_state_dict(state)
        acc.merge(counts)
        if not tiles:  # on disk before on_merge's checkpoint, which counts them
            session.block_sets.add_sets(state["part_block_lengths"], state["part_block_ids"])
        on_merge()

    try:
        done = set(range(acc.folded)) | set(acc.pending)
        for part in parts(stream, opts.shard_batches, opts.ray_task_shards, done, opts.block_size,
                          acc.bos_offset):
            in_flight[remote.remote(spec, part)] = part
            while len(in_flight) > 2 * workers:  # a bounded queue: the driver tokenises only a little ahead
                merge_one()
        while in_flight:
            merge_one()
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
