"""The balanced, token-budget bucketed loader over carat's WebDataset shards: the stages listed, in order, in
:mod:`carat.data.loader`, wired into torch's DataLoader (:func:`build_loader`).

Design
------
*Plan globally, read locally.* Every rank reads the manifest (never the tars, :mod:`carat.data.loader.split_index`)
and computes the same :class:`~carat.data.loader.plan.EpochPlan` for (seed, epoch): length-sorted token-budget
batches dealt so that every rank runs the same number of steps (see :mod:`carat.data.loader.plan`). A rank then reads
only the samples of its own batches, with ranged reads of their byte ranges (:mod:`carat.data.loader.tar_reader`).
Compared with streaming whole shards per rank (``split_by_node``), no rank reads another rank's samples,
memory holds one batch per worker, and any number of ranks x workers works with any number of shards,
including more workers than shards: the unit of splitting is the planned batch, not the shard.

*Workers.* DataLoader worker ``w`` of ``n`` takes slots ``w, w+n, w+2n, ...`` of its rank's schedule (the
``split_by_worker`` rule applied to batches). The DataLoader collects workers round-robin, so batches come
out in exactly the planned order, deterministically. Workers pad features in the stored dtype (float16 by
default: half the bytes) straight into a ring of shared-memory buffers that the main process made once per
epoch (:class:`~carat.data.loader.shm_pool.SharedBufferPool`), and send only where they are; the main process copies
them out, cast to float32 (page-locked when ``pin_memory``), into the :class:`~carat.data.loader.batch.Batch` it
yields, and hands the slot back. torch's default transfer (a fresh shared segment per batch, whose page
population and fd passing cost more than reading the batch) remains as ``reuse_buffers=False``.
``feature_dtype="stored"`` skips the CPU cast and yields float16 features, for a consumer that casts on its
device.

*Errors.* A sample that cannot be read (truncated or corrupt tar, bytes that differ from the hash recorded at
write time, bad ``.npy``, json or shape not matching the manifest, non-finite values) raises
:class:`~carat.errors.DataError` naming shard and key (``on_error="raise"``), or is skipped, counted and named
(``on_error="skip"``): its batch still comes out with the remaining samples (weight 1 each), or, if nothing of
it survived, as a one-sample zero-weight filler, so step counts never change. Workers never raise for bad
samples: they send them with the batch and the main process raises, so the error stays one line (torch would
wrap a worker's exception in its traceback). Shards missing or of the wrong size are a DataError when the
loader is built.

The configuration (:class:`~carat.data.loader.loader_config.LoaderConfig`, with the batch cost's modality weights)
lives in :mod:`carat.data.loader.loader_config`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from carat.data.loader.batch import Batch, CollatedBatch
from carat.data.loader.collate import Alloc, collate, empty_filler, nonfinite_rows, select_rows, to_batch
from carat.data.loader.loader_config import LoaderConfig
from carat.data.loader.plan import FILLER, EpochPlan, plan_epoch
from carat.data.corpus.shards import storage_dtype
from carat.data.loader.shm_pool import SharedBufferPool
from carat.data.loader.split_index import SplitIndex, load_split_index
from carat.data.loader.tar_reader import ShardReader, Skip, StorageFailure
from carat.errors import ConfigError, DataError
from carat.storage import ObjectPath, as_location

if TYPE_CHECKING:
    from carat.data.corpus.remote import BlockCache


# ----------------------------------------------------------------------------------- the torch dataset


class PlannedBatches(IterableDataset):
    """One rank's schedule of planned batches, split across DataLoader workers by slot (w, w+n, ...)."""

    def __init__(self, shard_dir: Path | ObjectPath, index: SplitIndex, plan: EpochPlan, rank: int, on_error: str,
                 merge_gap_bytes: int, cache_dir: Path | None = None, cache_max_bytes: int = 0,
                 stored_dtype: str | None = None):
        super().__init__()
        self.stored_dtype = stored_dtype
        """The shards' feature dtype when known at build time (else read from the manifest when needed)."""
        self.shard_dir = as_location(shard_dir)
        self.cache_dir = cache_dir
        """Local block cache of a corpus in object storage (None = every read is a GET)."""
        self.cache_max_bytes = cache_max_bytes
        self.index = index
        self.plan = plan
        self.rank = rank
        self.on_error = on_error
        self.merge_gap_bytes = merge_gap_bytes
        self.pool: SharedBufferPool | None = None
        """Set on the per-iteration copy that DataLoader workers run (see :class:`SharedBufferPool`)."""

    def with_pool(self, pool: SharedBufferPool) -> "PlannedBatches":
        """A shallow copy whose workers write into ``pool``."""
        out = copy.copy(self)
        out.pool = pool
        return out

    @property
    def slots(self) -> list[int]:
        return self.plan.schedule[self.rank]

    def __len__(self) -> int:
        return len(self.slots)

    def rows(self, slot: int) -> np.ndarray:
        """Manifest rows of schedule slot ``slot``: a planned batch, or the one filler sample."""
        return np.array([self.plan.filler_index]) if slot == FILLER else self.plan.batches[slot]

    def shared_pool(self, workers: int, depth: int) -> SharedBufferPool:
        """Rings of ``depth`` slots for ``workers`` DataLoader workers, each slot sized for the largest batch
        that worker makes this epoch."""
        itemsize = 2 if (self.stored_dtype or storage_dtype(self.shard_dir)) == "float16" else 4
        worker_rows = [[self.rows(slot) for slot in self.slots[w::workers]] for w in range(workers)]
        return SharedBufferPool.for_batches(worker_rows, self.index.lengths, itemsize, depth)

    def __iter__(self) -> Iterator[CollatedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_worker(worker, workers)

    def iter_worker(self, worker: int, workers: int) -> Iterator[CollatedBatch]:
        """The collated batches of slots ``worker::workers``, each with the samples it had to skip.

        With a pool (inside DataLoader workers), each batch is written into the worker's next ring slot and
        carries its ``ring_slot`` = (worker, slot); the consumer must copy it out and release the slot."""
        reader = ShardReader(self.shard_dir, self.index, self.merge_gap_bytes, reuse_buffers=True,
                             cache=self._block_cache())
        pool = self.pool
        try:
            for m, slot in enumerate(self.slots[worker::workers]):
                if pool is None:
                    yield self._batch(reader, slot)
                    continue
                ring_slot = m % pool.depth
                pool.acquire(worker)  # exactly one permit per batch yielded; the consumer releases it
                alloc, buf = pool.allocator(worker, ring_slot)
                yield pool.describe(self._batch(reader, slot, alloc), worker, ring_slot, buf)
        finally:
            reader.close()

    def _block_cache(self) -> "BlockCache | None":
        """This worker's handle on the local block cache, for a corpus in object storage."""
        if self.cache_dir is None or not isinstance(self.shard_dir, ObjectPath):
            return None
        from carat.data.corpus.remote import BlockCache

        return BlockCache(self.cache_dir, self.cache_max_bytes)

    def _batch(self, reader: ShardReader, slot: int, alloc: Alloc | None = None) -> CollatedBatch:
        filler = slot == FILLER
        rows = self.rows(slot)
        samples, skips = reader.read(rows)
        if not samples:
            return replace(empty_filler(), skipped=self._reported(skips, filler))
        batch = collate(samples, weight=0.0 if filler else 1.0, alloc=alloc)
        bad = nonfinite_rows(batch.features())  # values are checked here, batched over the padded tensors
        if bad:
            skips = skips + [(self._shard_of(batch.keys[i], rows), batch.keys[i], why) for i, why in bad.items()]
            keep = [i for i in range(len(samples)) if i not in bad]
            batch = select_rows(batch, keep) if keep else empty_filler()
        return replace(batch, skipped=self._reported(skips, filler))

    def _reported(self, skips: list[Skip], filler: bool) -> list[Skip]:
        """The skips a batch carries to the main process: a filler's copy is not a lost sample (skip), but a
        bad one still stops the run (raise)."""
        return skips if not filler or self.on_error == "raise" else []

    def _shard_of(self, key: str, rows: np.ndarray) -> str:
        row = next(r for r in rows.tolist() if self.index.keys[r] == key)
        return str(self.shard_dir / self.index.shards[int(self.index.shard_ids[row])])


def skip_error(skips: list[Skip]) -> DataError:
    """The one-line error of ``on_error="raise"`` for the first of ``skips``."""
    shard, key, why = skips[0]
    return DataError(f"{shard}: sample {key!r}: {why}" + (f" (and {len(skips) - 1} more)" if len(skips) > 1 else ""))


# ---------------------------------------------------------------------------------------- the loader


def _keep_as_is(batch: CollatedBatch) -> CollatedBatch:
    return batch


@dataclass
class BatchLoader:
    """An epoch of batches for one rank: ``len`` is equal on every rank; iterating yields :class:`Batch`."""

    dataset: PlannedBatches
    num_workers: int
    prefetch_factor: int
    pin_memory: bool
    reuse_buffers: bool = True
    """Workers transfer through a :class:`SharedBufferPool` (else torch's fresh segment per batch)."""
    feature_dtype: torch.dtype | None = torch.float32
    """dtype of the yielded features; None = as stored."""
    skipped: int = 0
    """Samples skipped as unreadable so far (on_error='skip')."""
    skipped_samples: list[Skip] = field(default_factory=list)
    """(shard, key, reason) of each skipped sample."""

    @property
    def plan(self) -> EpochPlan:
        return self.dataset.plan

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_samples(self) -> int:
        """Real (weight-1) samples planned for this rank this epoch."""
        return self.plan.num_samples(self.dataset.rank)

    @property
    def num_samples_global(self) -> int:
        """Real samples planned over all ranks this epoch (normalise losses and metrics by it)."""
        return self.plan.num_samples_global

    @property
    def num_fillers(self) -> int:
        """Zero-weight filler batches in this rank's schedule."""
        return sum(1 for b in self.dataset.slots if b == FILLER)

    @property
    def dropped_batches(self) -> int:
        return len(self.plan.dropped)

    @property
    def dropped_samples(self) -> int:
        return self.plan.dropped_samples

    def _count_skips(self, skips: list[Skip]) -> None:
        failures = [s for s in skips if isinstance(s[2], StorageFailure)]
        if failures:  # the store failed, not the sample: skipping would silently drop the rest of the epoch
            raise skip_error(failures)
        if skips and self.dataset.on_error == "raise":
            raise skip_error(skips)
        self.skipped += len(skips)
        self.skipped_samples.extend(tuple(s) for s in skips)

    def __iter__(self) -> Iterator[Batch]:
        dataset, pool = self.dataset, None
        if self.num_workers > 0 and self.reuse_buffers:
            pool = dataset.shared_pool(self.num_workers, depth=self.prefetch_factor + 1)
            dataset = dataset.with_pool(pool)  # created before the workers fork: they inherit its mappings
        loader = DataLoader(
            # Pinning happens in to_batch, after the float16 -> float32 cast (pinning half tensors would be
            # wasted); _keep_as_is stops default_convert from turning the small numpy arrays into tensors (each
            # would cost a shared-memory segment).
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=False,
            collate_fn=_keep_as_is, prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None)
        batches = iter(loader)
        try:
            for collated in batches:
                self._count_skips(collated.skipped)
                if collated.ring_slot is None:
                    yield to_batch(collated, pin_memory=self.pin_memory, dtype=self.feature_dtype)
                    continue
                # Copy out of the worker's slot, then hand the slot back (see SharedBufferPool).
                batch = to_batch(pool.resolve(collated), pin_memory=self.pin_memory, dtype=self.feature_dtype,
                                 copy=True)
                pool.release(collated.ring_slot[0])
                yield batch
        finally:
            if pool is not None:
                pool.close()  # no worker may stay blocked on a slot while the DataLoader shuts them down
            del batches
        if self.skipped:
            shown = "; ".join(f"{s} {k!r}: {w}" for s, k, w in self.skipped_samples[:3])
            warnings.warn(f"loader skipped {self.skipped} unreadable samples of split "
                          f"{self.dataset.index.split!r} (first: {shown})", stacklevel=2)


def build_loader(shard_dir: Path, split: str, cfg: LoaderConfig, *, rank: int, world_size: int, epoch: int,
                 train: bool) -> BatchLoader:
    """The loader of ``split`` for ``rank`` of ``world_size`` in ``epoch`` (see the module docstring).

    Cheap to call (reads the manifest, plans; no worker starts until iteration).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    shard_dir = as_location(shard_dir)
    index = load_split_index(shard_dir, split)
    plan = plan_epoch(index.lengths, token_budget=cfg.token_budget, max_batch_size=cfg.max_batch_size,
                      weights=cfg.modality_weights, min_batch_size=cfg.min_batch_size, world_size=world_size,
                      train=train, seed=cfg.seed, epoch=epoch, sort_jitter=cfg.sort_jitter,
                      remainder=cfg.remainder)
    if plan.steps == 0:
        raise DataError(f"split {split!r} of {shard_dir} has {len(plan.batches)} batches, fewer than "
                        f"world_size={world_size}: use loader.remainder='pad' or a smaller token_budget")
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    dataset = PlannedBatches(shard_dir, index, plan, rank, cfg.on_error, cfg.merge_gap_bytes,
                             cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
                             cache_max_bytes=cfg.cache_max_bytes,
                             # known now, so that an epoch needs nothing but shard bytes from a remote store
                             stored_dtype=storage_dtype(shard_dir) if isinstance(shard_dir, ObjectPath) else None)
    return BatchLoader(dataset, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, pin_memory=pin,
                       reuse_buffers=cfg.reuse_buffers,
                       feature_dtype=torch.float32 if cfg.feature_dtype == "float32" else None)
