"""The worker-to-main transfer ring: per-worker reusable shared-memory buffers guarded by semaphores.

DataLoader workers pad features in the stored dtype straight into a ring of shared-memory buffers that the
main process made once per epoch (:class:`SharedBufferPool`, a bounded buffer), and send only where they are
(:class:`PooledTensor`); the main process copies them out and hands the slot back. See the class docstring
for why, and for the protocol that makes reuse safe.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from carat.data.loader.batch import CollatedBatch
from carat.data.loader.collate import Alloc, shared_alloc
from carat.data.sources.segment import FEATURE_DIMS, MODALITIES


_ALIGN = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class PooledTensor:
    """Where a worker wrote a padded tensor in a slot of its ring: sent instead of the tensor itself."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class SharedBufferPool:
    """Per-worker rings of reusable shared-memory buffers for the worker-to-main transfer (a bounded buffer).

    Why: torch sends every tensor a DataLoader worker returns through a fresh shared-memory segment. The worker
    populates its new pages, passes a file descriptor over a socket, and the main process maps, reads and
    unmaps it: per batch, more CPU than reading the batch. Here the main process creates ``depth`` byte buffers
    per worker once per epoch, before the workers fork, so both sides map the same pages for the whole epoch;
    worker ``w`` writes its m-th batch into slot ``m % depth`` and sends only where the tensors are
    (:class:`PooledTensor`); the main process copies them out into the :class:`Batch` it yields.

    Safety is the classic bounded-buffer protocol with one counting semaphore per worker, starting at
    ``depth``: the worker acquires a permit before writing each batch, the main process releases one after it
    has copied out a batch of that worker. The main process consumes a worker's batches in the order the worker
    produced them, so when the worker acquires for its batch m, at least m - depth + 1 of its batches have
    been copied out, including batch m - depth, the previous user of slot ``m % depth``. Semaphore operations
    are full memory barriers, so the copy-out is complete before the worker's writes can begin. No deadlock:
    when the main process waits for batch m of worker w, it has released all of w's batches before m and w
    has written at most m batches, so w holds at least ``depth`` >= 1 permits for batch m. With
    ``depth = prefetch_factor + 1`` a worker never waits in steady state: the DataLoader gives it batch m + p
    only after the main process took batch m. Slots are sized from the plan (the largest batch the worker
    will make); a batch that does not fit (e.g. an unexpected dtype in a shard) falls back to torch's transfer.
    """

    def __init__(self, capacities: list[int], depth: int):
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.depth = depth
        self.buffers = [[self._shared_bytes(n) for _ in range(depth)] for n in capacities]
        self.free = [torch.multiprocessing.get_context().Semaphore(depth) for _ in capacities]
        self.parent_pid = os.getpid()

    @staticmethod
    def _shared_bytes(nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 tensor directly in shared memory (share_memory_() would first copy)."""
        proto = torch.empty(0, dtype=torch.uint8)
        return proto.new(proto._typed_storage()._new_shared(max(nbytes, 1), device=proto.device))

    @classmethod
    def for_batches(cls, worker_rows: list[list[np.ndarray]], lengths: np.ndarray, itemsize: int,
                    depth: int) -> "SharedBufferPool":
        """Rings sized for the largest batch each worker will produce this epoch: ``worker_rows[w]`` holds the
        manifest rows of worker ``w``'s batches, ``lengths`` the [N, 3] lengths of all rows, ``itemsize`` the
        bytes of one stored feature value."""
        capacities = [max((cls.batch_nbytes(lengths[rows], itemsize) for rows in batches), default=0)
                      for batches in worker_rows]
        return cls(capacities, depth)

    @staticmethod
    def batch_nbytes(lengths: np.ndarray, itemsize: int) -> int:
        """Slot bytes for one batch with rows ``lengths`` [B, 3]: its padded feature tensors, each aligned."""
        widths = np.maximum(np.asarray(lengths).max(axis=0), 1)
        dims = np.array([FEATURE_DIMS[m] for m in MODALITIES])
        return sum(_aligned(int(n)) for n in len(lengths) * widths * dims * itemsize)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for ring in self.buffers for b in ring)

    # -- worker side

    def acquire(self, worker: int) -> None:
        """Wait for a free slot of ``worker``'s ring (raises if the main process died meanwhile)."""
        while not self.free[worker].acquire(timeout=5.0):
            if os.getppid() != self.parent_pid:
                raise RuntimeError(f"loader worker {worker}: the main process is gone")

    def allocator(self, worker: int, slot: int) -> tuple[Alloc, torch.Tensor]:
        """An :data:`~carat.data.loader.collate.Alloc` carving tensors out of one slot (fresh shared memory
        when full)."""
        buf = self.buffers[worker][slot]
        used = 0

        def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            nonlocal used
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if used + nbytes > buf.numel():
                return shared_alloc(shape, dtype)
            out = buf[used : used + nbytes].view(dtype).view(shape)
            used = _aligned(used + nbytes)
            return out

        return alloc, buf

    @staticmethod
    def describe(batch: CollatedBatch, worker: int, slot: int, buf: torch.Tensor) -> CollatedBatch:
        """``batch`` marked as written into ``slot`` of ``worker``'s ring (``buf``), with the feature tensors
        that live in ``buf`` replaced by their :class:`PooledTensor` (a fallback tensor that did not fit stays
        a tensor and goes through torch's transfer)."""
        base = buf.untyped_storage().data_ptr()
        pooled = {m: PooledTensor(t.data_ptr() - buf.data_ptr(), tuple(t.shape), t.dtype)
                  for m, t in batch.features().items() if t.untyped_storage().data_ptr() == base}
        return replace(batch, **pooled, ring_slot=(worker, slot))

    # -- main side

    def resolve(self, batch: CollatedBatch) -> CollatedBatch:
        """``batch`` with its :class:`PooledTensor` features as views of its ring slot (valid until
        :meth:`release`)."""
        if batch.ring_slot is None:
            raise ValueError("resolve() takes a batch written into the ring (ring_slot is None)")
        worker, slot = batch.ring_slot
        buf = self.buffers[worker][slot]
        views = {}
        for m, t in batch.features().items():
            if isinstance(t, PooledTensor):
                nbytes = math.prod(t.shape) * torch.empty(0, dtype=t.dtype).element_size()
                views[m] = buf[t.offset : t.offset + nbytes].view(t.dtype).view(t.shape)
        return replace(batch, **views)

    def release(self, worker: int) -> None:
        """The main process has copied out one more batch of ``worker``."""
        self.free[worker].release()

    def close(self) -> None:
        """The main process reads no more: unblock any worker waiting for a slot so it can shut down."""
        for sem in self.free:
            for _ in range(self.depth):
                sem.release()
