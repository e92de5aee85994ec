"""The balanced, token-budget bucketed loader over carat's WebDataset shards.

Design
------
*Plan globally, read locally.* Every rank reads the manifest (never the tars) and computes the same
:class:`~carat.data.plan.EpochPlan` for (seed, epoch): length-sorted token-budget batches dealt so that every
rank runs the same number of steps (see :mod:`carat.data.plan`). A rank then reads only the samples of its
own batches.

*Ranged tar reads.* The shards are sorted by length, so a planned batch is a run of consecutive samples in one
shard (or two, at a boundary). The manifest records each sample's byte range in its tar (``offset``,
``nbytes``), so the reader fetches a batch as one ``pread`` per shard it touches (nearby ranges are merged).
The bytes are split into members by :func:`fast_tar_samples`, which reads the ustar headers of carat's plain
layout directly (checksums verified, ~10x cheaper than Python's tarfile); anything unusual or damaged goes
through WebDataset's own tar expansion and key grouping (``webdataset.tariterators.tar_file_expander`` +
``group_by_keys``, the stages behind ``wds.tarfile_to_samples``) with a handler that records every error. Only
``.npy`` (refusing object arrays) and ``.json`` members are decoded; nothing is unpickled. Compared with
streaming whole shards per rank (``split_by_node``), no rank reads another rank's samples, memory holds one
batch per worker, and any number of ranks x workers works with any number of shards, including more workers
than shards: the unit of splitting is the planned batch, not the shard.

*Workers.* DataLoader worker ``w`` of ``n`` takes slots ``w, w+n, w+2n, ...`` of its rank's schedule (the
``split_by_worker`` rule applied to batches). The DataLoader collects workers round-robin, so batches come
out in exactly the planned order, deterministically. Workers pad features in the stored dtype (float16 by
default: half the bytes) straight into a ring of shared-memory buffers that the main process made once per
epoch (:class:`SharedBufferPool`, a semaphore-guarded bounded buffer), and send only where they are; the main
process copies them out, cast to float32 (page-locked when ``pin_memory``), into the
:class:`~carat.data.batch.Batch` it yields, and hands the slot back. torch's default transfer (a fresh shared
segment per batch, whose page population and fd passing cost more than reading the batch) remains as
``reuse_buffers=False``. ``feature_dtype="stored"`` skips the CPU cast and yields float16 features, for a
consumer that casts on its device.

*Errors.* A sample that cannot be read (truncated or corrupt tar, bad ``.npy``, json or shape not matching
the manifest, non-finite values) raises :class:`~carat.errors.DataError` naming shard and key
(``on_error="raise"``), or is skipped, counted and named (``on_error="skip"``): its batch still comes out with
the remaining samples (weight 1 each), or, if nothing of it survived, as a one-sample zero-weight filler, so
step counts never change. Shards missing or of the wrong size are a DataError when the loader is built.

*Cost weights.* ``modality_weights`` scale frames per modality in the batch cost; the default (1, 1, 1)
counts padded frames, since carat's per-modality CTC aligners run an LSTM over raw frames whose per-step
work is similar across modalities. Audio (~100 Hz) has ~3.5x the frames of visual (~30 Hz) and ~30x the
text steps, so it sets the cost of every realistic batch.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from carat.data.batch import Batch
from carat.data.collate import (
    Alloc, DecodedSample, collate, decode_sample, empty_filler, nonfinite_rows, select_rows, shared_alloc,
    to_batch,
)
from carat.data.plan import FILLER, EpochPlan, plan_epoch
from carat.data.segment import FEATURE_DIMS, MODALITIES, SPLITS
from carat.data.shards import read_manifest, read_shard_table, storage_dtype, tar_key
from carat.errors import ConfigError, DataError


@dataclass
class LoaderConfig:
    """Token-budget batching, rank balancing and reading of the shards."""

    token_budget: int = 65536
    """Max padded cost per batch: batch size x max over modalities of (weight x longest length in the batch).
    With the default weights that is padded audio frames: 64 clips of ~1,000 frames, or 6 of the longest."""
    max_batch_size: int = 64
    """Cap on samples per batch (the seed's batch size); short clips fill batches up to it."""
    min_batch_size: int = 1
    """A batch may exceed the token budget until it holds this many samples (1 = never)."""
    modality_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Cost per frame of text, visual, audio in the batch cost (see the module docstring)."""
    sort_jitter: float = 0.02
    """Training only: each sample's cost is scaled by exp(U(-j, j)) before cutting, so batch composition
    varies between epochs (0 = the same batches every epoch, only their order shuffled). 0.02 costs ~2% of
    padding efficiency (BENCHMARKS.md, Loader)."""
    remainder: Literal["drop", "pad"] = "drop"
    """Training only, when the batch count is not a multiple of the world size: drop that many random batches
    (counted, different each epoch) or complete the last step with weight-0 filler batches."""
    seed: int = 0
    """Seeds the per-epoch plan (jitter, dropped batches, step order, rank assignment)."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 = read in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (ignored with num_workers=0)."""
    pin_memory: bool | None = None
    """Page-locked batches for faster host-to-GPU copies; None = only when CUDA is available."""
    reuse_buffers: bool = True
    """Workers write batches into a per-worker ring of prefetch_factor + 1 shared-memory buffers made once per
    epoch, instead of torch's fresh shared segment per batch (whose page population and fd passing cost more
    than reading the batch; BENCHMARKS.md, Loader). False = torch's default transfer."""
    feature_dtype: Literal["float32", "stored"] = "float32"
    """dtype of Batch features: float32 (Batch's contract, what the model takes on the CPU) or the shards'
    stored dtype ('stored', float16 by default): half the host memory, pinning and host-to-device bytes, and no
    CPU cast; the consumer must cast after moving the batch to the device (the training loop's input cast to
    the model dtype does)."""
    on_error: Literal["raise", "skip"] = "raise"
    """A corrupt sample raises DataError (naming shard and key) or is skipped, counted and reported."""
    merge_gap_bytes: int = 1 << 20
    """Byte ranges of one batch in the same shard closer than this are read with one read."""

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise ConfigError(f"loader.token_budget={self.token_budget} must be >= 1 (padded frames per batch)")
        if self.max_batch_size < 1:
            raise ConfigError(f"loader.max_batch_size={self.max_batch_size} must be >= 1")
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ConfigError(f"loader.min_batch_size={self.min_batch_size} must be in 1..max_batch_size="
                              f"{self.max_batch_size}")
        weights = tuple(self.modality_weights)
        if len(weights) != 3 or any(not (float(w) > 0) for w in weights):
            raise ConfigError(f"loader.modality_weights={self.modality_weights!r} must be 3 positive numbers "
                              "(text, visual, audio)")
        self.modality_weights = tuple(float(w) for w in weights)  # type: ignore[assignment]
        if not 0.0 <= self.sort_jitter <= 1.0:
            raise ConfigError(f"loader.sort_jitter={self.sort_jitter} must be in [0, 1]")
        if self.remainder not in ("drop", "pad"):
            raise ConfigError(f"loader.remainder={self.remainder!r} must be 'drop' or 'pad'")
        if self.num_workers < 0:
            raise ConfigError(f"loader.num_workers={self.num_workers} must be >= 0")
        if self.prefetch_factor < 1:
            raise ConfigError(f"loader.prefetch_factor={self.prefetch_factor} must be >= 1")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"loader.on_error={self.on_error!r} must be 'raise' or 'skip'")
        if self.feature_dtype not in ("float32", "stored"):
            raise ConfigError(f"loader.feature_dtype={self.feature_dtype!r} must be 'float32' or 'stored'")
        if self.merge_gap_bytes < 0:
            raise ConfigError(f"loader.merge_gap_bytes={self.merge_gap_bytes} must be >= 0")


TINY_OVERRIDES: dict[str, object] = {"token_budget": 4096, "max_batch_size": 16, "num_workers": 0}
"""The tiny preset's batches: up to 16 clips per rank, so the quickstart's two Ray workers step on 32 clips
together (the batch the tiny preset's lr was measured at, BENCHMARKS.md, Learning)."""


# ------------------------------------------------------------------------------------------- the index


@dataclass
class SplitIndex:
    """The manifest rows of one split as arrays (the planner's input and the reader's address book)."""

    split: str
    keys: list[str]
    shards: list[str]
    """Distinct shard paths (relative to the corpus root); ``shard_ids`` index into it."""
    shard_ids: np.ndarray
    lengths: np.ndarray
    """[N, 3] int64 (text, visual, audio)."""
    offsets: np.ndarray
    nbytes: np.ndarray
    labels: np.ndarray
    """[N, 6] uint8."""

    def __len__(self) -> int:
        return len(self.keys)


def load_split_index(shard_dir: Path, split: str) -> SplitIndex:
    """Read the manifest rows of ``split`` and check its shard files exist with their recorded sizes."""
    shard_dir = Path(shard_dir)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} must be one of {SPLITS}")
    manifest = read_manifest(shard_dir)
    rows = manifest.filter(pc.equal(manifest.column("split"), split))
    if rows.num_rows == 0:
        raise DataError(f"{shard_dir / 'manifest.parquet'}: no samples in split {split!r}")
    shard_col = rows.column("shard").to_pylist()
    shards = sorted(set(shard_col))
    lookup = {s: i for i, s in enumerate(shards)}
    index = SplitIndex(
        split=split,
        keys=rows.column("key").to_pylist(),
        shards=shards,
        shard_ids=np.array([lookup[s] for s in shard_col], dtype=np.int64),
        lengths=np.stack([rows.column(f"len_{m}").to_numpy() for m in ("text", "visual", "audio")], 1).astype(np.int64),
        offsets=rows.column("offset").to_numpy().astype(np.int64),
        nbytes=rows.column("nbytes").to_numpy().astype(np.int64),
        labels=np.array(rows.column("labels").to_pylist(), dtype=np.uint8).reshape(-1, 6),
    )
    _check_shard_files(shard_dir, index)
    return index


def _check_shard_files(shard_dir: Path, index: SplitIndex) -> None:
    """Manifest vs files: each shard present, of its recorded size, and holding every recorded byte range."""
    table = {info.shard: info for info in read_shard_table(shard_dir)}
    for sid, rel in enumerate(index.shards):
        path = shard_dir / rel
        info = table.get(rel)
        if info is None:
            raise DataError(f"{path}: in the manifest but not in {shard_dir / 'shards.parquet'}")
        if not path.is_file():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        size = path.stat().st_size
        if size != info.bytes:
            raise DataError(f"{path}: size {size} bytes does not match the manifest's shard table ({info.bytes}); "
                            "the shards were rewritten or truncated: rewrite the corpus or restore the files")
        ends = index.offsets[index.shard_ids == sid] + index.nbytes[index.shard_ids == sid]
        if len(ends) and int(ends.max()) > size:
            raise DataError(f"{path}: manifest byte ranges run past the end of the file ({size} bytes)")


# ------------------------------------------------------------------------------------------- the reader


Skip = tuple[str, str, str]
"""(shard path, key, reason) of a skipped sample."""


_BLOCK = 512
_MEMBERS = ("json", "text.npy", "visual.npy", "audio.npy")
"""The members (suffixes after the tar key) of one stored sample."""
_HEADER_SPAN = np.arange(_BLOCK)
_CHKSUM_FIELD = slice(148, 156)


def _octal(field: memoryview) -> int:
    """A NUL/space-terminated octal number field of a ustar header; ValueError if it is not one."""
    text = bytes(field).rstrip(b"\0 ")
    if not text or text.strip(b"01234567"):
        raise ValueError(f"bad octal field {bytes(field)!r}")
    return int(text, 8)


def fast_tar_samples(data: bytes, base: int, spans: list[tuple[int, int, str]]) -> list[dict] | None:
    """WebDataset-style sample dicts read straight from ustar headers, or None if anything is unusual.

    ``spans`` are (offset in the shard, byte count, tar key) of samples inside ``data``, which starts at shard
    offset ``base``. This is the fast path of :meth:`ShardReader._read_run` for shards as carat's writer lays
    them out: each sample is exactly four regular members ``<key>.<suffix>`` filling its manifest byte range.
    Every header's checksum is verified (all at once, with numpy), as tarfile does. Payloads are zero-copy
    memoryviews of ``data``. Any deviation (checksum, type, name, size, a pax/GNU header, a short read)
    returns None and the caller takes WebDataset's general path, which names the error. Python's tarfile costs
    ~25 us per member; this costs ~2 us.
    """
    view = memoryview(data)
    headers: list[int] = []
    samples: list[dict] = []
    for offset, nbytes, key in spans:
        pos, end = offset - base, offset - base + nbytes
        if pos < 0 or end > len(data):
            return None
        sample: dict = {"__key__": key}
        while pos < end:
            if pos + _BLOCK > end:
                return None
            header = view[pos : pos + _BLOCK]
            # Regular file (type '0' or NUL), POSIX ustar magic, no name prefix (carat's names are short).
            if header[156] not in (0x30, 0) or header[257:265] != b"ustar\x0000" or header[345] != 0:
                return None
            name = bytes(header[:100]).split(b"\0", 1)[0].decode("ascii", "replace")
            try:
                size = _octal(header[124:136])
            except ValueError:
                return None
            stem, _, suffix = name.partition(".")
            if stem != key or suffix not in _MEMBERS or suffix in sample:
                return None
            data_end = pos + _BLOCK + size
            if data_end > end:
                return None
            sample[suffix] = bytes(view[pos + _BLOCK : data_end]) if suffix == "json" else view[pos + _BLOCK : data_end]
            headers.append(pos)
            pos += _BLOCK + -(-size // _BLOCK) * _BLOCK
        if pos != end or len(sample) != len(_MEMBERS) + 1:
            return None
        samples.append(sample)
    if headers:
        blocks = np.frombuffer(data, dtype=np.uint8)[np.add.outer(np.array(headers), _HEADER_SPAN)]
        # The checksum is the unsigned byte sum of the header with its own 8-byte field counted as spaces.
        computed = (blocks.sum(axis=1, dtype=np.int64) - blocks[:, _CHKSUM_FIELD].sum(axis=1, dtype=np.int64)
                    + 8 * 0x20)
        try:
            stored = [_octal(view[h + 148 : h + 156]) for h in headers]
        except ValueError:
            return None
        if not np.array_equal(computed, np.array(stored)):
            return None
    return samples


def _pread(fd: int, size: int, offset: int, buffer: bytearray | None = None) -> bytes | memoryview:
    """``size`` bytes at ``offset`` (fewer at the end of the file): a new bytes object, or a view of ``buffer``
    (at least ``size`` long) filled in place, which saves the page faults of a fresh ~10 MB allocation."""
    if buffer is None:
        parts = []
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                break
            parts.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return b"".join(parts)
    view = memoryview(buffer)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:size]], offset + done)
        if n == 0:
            break
        done += n
    return view[:done]


class ShardReader:
    """Reads given manifest rows from the tars with ranged reads and WebDataset's tar grouping."""

    def __init__(self, shard_dir: Path, index: SplitIndex, merge_gap_bytes: int = 1 << 20, max_open: int = 8,
                 reuse_buffers: bool = False):
        """``reuse_buffers``: read into buffers kept across :meth:`read` calls, so the samples one call returns
        (views of those bytes) are valid only until the next call; for callers that collate them at once."""
        self.shard_dir = Path(shard_dir)
        self.index = index
        self.merge_gap_bytes = merge_gap_bytes
        self.max_open = max_open
        self.reuse_buffers = reuse_buffers
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._buffers: list[bytearray] = []

    def _buffer(self, i: int, size: int) -> bytearray | None:
        """Reusable read buffer ``i`` (one per run of a read call), at least ``size`` bytes."""
        if not self.reuse_buffers:
            return None
        while len(self._buffers) <= i:
            self._buffers.append(bytearray())
        if len(self._buffers[i]) < size:
            # A new object rather than a resize: views of the old one may still be alive.
            self._buffers[i] = bytearray(max(size, 2 * len(self._buffers[i])))
        return self._buffers[i]

    def _fd(self, sid: int) -> int:
        fd = self._fds.pop(sid, None)
        if fd is None:
            fd = os.open(self.shard_dir / self.index.shards[sid], os.O_RDONLY)
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[sid] = fd  # most recently used last
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _runs(self, rows: np.ndarray) -> list[tuple[int, list[int]]]:
        """(shard id, rows) groups to read with one read each: same shard, byte ranges close together."""
        idx = self.index
        order = sorted(rows.tolist(), key=lambda r: (idx.shard_ids[r], idx.offsets[r]))
        runs: list[tuple[int, list[int]]] = []
        end = -1
        for r in order:
            sid = int(idx.shard_ids[r])
            if runs and runs[-1][0] == sid and idx.offsets[r] - end <= self.merge_gap_bytes:
                runs[-1][1].append(r)
            else:
                runs.append((sid, [r]))
            end = int(idx.offsets[r] + idx.nbytes[r])
        return runs

    def _read_run(self, sid: int, rows: list[int], buffer: int = 0) -> tuple[dict[int, DecodedSample], list[Skip]]:
        idx = self.index
        rel = str(self.shard_dir / idx.shards[sid])
        start = int(idx.offsets[rows[0]])
        stop = int(max(idx.offsets[r] + idx.nbytes[r] for r in rows))
        errors: list[str] = []

        def handler(exc: Exception) -> bool:  # the WebDataset handler: record, keep going
            errors.append(f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}")
            return True

        try:
            data = _pread(self._fd(sid), stop - start, start, self._buffer(buffer, stop - start))
        except OSError as exc:
            return {}, [(rel, idx.keys[r], f"cannot read shard: {exc}") for r in rows]
        wanted = {tar_key(idx.keys[r]): r for r in rows}
        found: dict[int, DecodedSample] = {}
        skips: list[Skip] = []
        samples = fast_tar_samples(data, start, [(int(idx.offsets[r]), int(idx.nbytes[r]), k)
                                                 for k, r in wanted.items()])
        if samples is None:  # not carat's plain layout, or damaged: WebDataset's general path names the error
            source = [{"url": rel, "stream": io.BytesIO(data)}]
            ours = lambda fname: fname.split(".", 1)[0] in wanted  # noqa: E731 - neighbours in a merged range
            members = tar_file_expander(source, handler=handler, select_files=ours)
            samples = group_by_keys(members, handler=handler)
        for sample in samples:
            r = wanted.get(sample["__key__"])
            if r is None or r in found:
                continue  # a neighbour inside a merged range, not ours
            try:
                found[r] = decode_sample(sample, idx.keys[r], tuple(idx.lengths[r]))
                if not np.array_equal(found[r].labels, idx.labels[r]):
                    raise ValueError(f"labels {found[r].labels.tolist()} differ from the manifest's "
                                     f"{idx.labels[r].tolist()}")
            except (ValueError, KeyError, TypeError) as exc:
                found.pop(r, None)
                skips.append((rel, idx.keys[r], f"offset {int(idx.offsets[r])}: {exc}"))
        skipped = {key for _, key, _ in skips}
        truncated = len(data) < stop - start
        for r in rows:
            if r not in found and idx.keys[r] not in skipped:
                mismatch = ("not at its manifest offset: manifest and shard do not match (a manifest from "
                            f"another corpus?); check with `python -m carat.data verify {self.shard_dir}`")
                why = (f"truncated shard: read {len(data)} of {stop - start} bytes at offset {start}" if truncated
                       else f"{'; '.join(errors)}: {mismatch}" if errors else mismatch)
                skips.append((rel, idx.keys[r], f"offset {int(idx.offsets[r])}: {why}"))
        return found, skips

    def read(self, rows: np.ndarray) -> tuple[list[DecodedSample], list[Skip]]:
        """Samples of ``rows`` in the given order, plus (shard, key, reason) of those that failed."""
        found: dict[int, DecodedSample] = {}
        skips: list[Skip] = []
        for i, (sid, run) in enumerate(self._runs(np.asarray(rows))):
            got, bad = self._read_run(sid, run, buffer=i)
            found.update(got)
            skips.extend(bad)
        return [found[r] for r in rows.tolist() if r in found], skips


# ------------------------------------------------------------------------------ the worker-to-main ring


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
    def for_plan(cls, dataset: "PlannedBatches", workers: int, depth: int) -> "SharedBufferPool":
        """Rings sized for the largest batch each worker of ``dataset`` will produce this epoch."""
        itemsize = 2 if storage_dtype(dataset.shard_dir) == "float16" else 4
        lengths = dataset.index.lengths
        capacities = []
        for w in range(workers):
            largest = 0
            for slot in dataset.slots[w::workers]:
                rows = [dataset.plan.filler_index] if slot == FILLER else dataset.plan.batches[slot]
                largest = max(largest, cls.batch_nbytes(lengths[rows], itemsize))
            capacities.append(largest)
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
        """An :data:`~carat.data.collate.Alloc` carving tensors out of one slot (fresh shared memory when full)."""
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
    def describe(parts: dict, worker: int, slot: int, buf: torch.Tensor) -> dict:
        """``parts`` with the feature tensors that live in ``buf`` replaced by their :class:`PooledTensor`."""
        base = buf.untyped_storage().data_ptr()
        for m in MODALITIES:
            t = parts[m]
            if t.untyped_storage().data_ptr() == base:
                parts[m] = PooledTensor(t.data_ptr() - buf.data_ptr(), tuple(t.shape), t.dtype)
        parts["pool"] = (worker, slot)
        return parts

    # -- main side

    def resolve(self, parts: dict, worker: int, slot: int) -> dict:
        """Views of the slot for the :class:`PooledTensor` entries (valid until :meth:`release`)."""
        buf = self.buffers[worker][slot]
        for m in MODALITIES:
            t = parts[m]
            if isinstance(t, PooledTensor):
                nbytes = math.prod(t.shape) * torch.empty(0, dtype=t.dtype).element_size()
                parts[m] = buf[t.offset : t.offset + nbytes].view(t.dtype).view(t.shape)
        return parts

    def release(self, worker: int) -> None:
        """The main process has copied out one more batch of ``worker``."""
        self.free[worker].release()

    def close(self) -> None:
        """The main process reads no more: unblock any worker waiting for a slot so it can shut down."""
        for sem in self.free:
            for _ in range(self.depth):
                sem.release()


# ----------------------------------------------------------------------------------- the torch dataset


class PlannedBatches(IterableDataset):
    """One rank's schedule of planned batches, split across DataLoader workers by slot (w, w+n, ...)."""

    def __init__(self, shard_dir: Path, index: SplitIndex, plan: EpochPlan, rank: int, on_error: str,
                 merge_gap_bytes: int):
        super().__init__()
        self.shard_dir = Path(shard_dir)
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

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_worker(worker, workers)

    def iter_worker(self, worker: int, workers: int) -> Iterator[dict]:
        """The collated batches of slots ``worker::workers``, each with the samples it had to skip.

        With a pool (inside DataLoader workers), each batch is written into the worker's next ring slot and
        carries ``pool`` = (worker, slot); the consumer must copy it out and release the slot."""
        reader = ShardReader(self.shard_dir, self.index, self.merge_gap_bytes, reuse_buffers=True)
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

    def _batch(self, reader: ShardReader, slot: int, alloc: Alloc | None = None) -> dict:
        filler = slot == FILLER
        rows = np.array([self.plan.filler_index]) if filler else self.plan.batches[slot]
        samples, skips = reader.read(rows)
        self._raise_if_any(skips)
        if not samples:
            return {**empty_filler(), "skipped": [] if filler else skips}
        parts = collate(samples, weight=0.0 if filler else 1.0, alloc=alloc)
        bad = nonfinite_rows(parts)  # values are checked here, batched, after the float32 cast
        if bad:
            new = [(self._shard_of(parts["keys"][i], rows), parts["keys"][i], why) for i, why in bad.items()]
            self._raise_if_any(new)
            skips = skips + new
            keep = [i for i in range(len(samples)) if i not in bad]
            parts = select_rows(parts, keep) if keep else empty_filler()
        parts["skipped"] = [] if filler else skips  # a filler's copy is not a lost sample
        return parts

    def _shard_of(self, key: str, rows: np.ndarray) -> str:
        row = next(r for r in rows.tolist() if self.index.keys[r] == key)
        return str(self.shard_dir / self.index.shards[int(self.index.shard_ids[row])])

    def _raise_if_any(self, skips: list[Skip]) -> None:
        if skips and self.on_error == "raise":
            shard, key, why = skips[0]
            raise DataError(f"{shard}: sample {key!r}: {why}"
                            + (f" (and {len(skips) - 1} more)" if len(skips) > 1 else ""))


# ---------------------------------------------------------------------------------------- the loader


def _keep_as_is(parts: dict) -> dict:
    return parts


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

    def __iter__(self) -> Iterator[Batch]:
        dataset, pool = self.dataset, None
        if self.num_workers > 0 and self.reuse_buffers:
            pool = SharedBufferPool.for_plan(dataset, self.num_workers, depth=self.prefetch_factor + 1)
            dataset = dataset.with_pool(pool)  # created before the workers fork: they inherit its mappings
        loader = DataLoader(
            # Pinning happens in to_batch, after the float16 -> float32 cast (pinning half tensors would be
            # wasted); _keep_as_is stops default_convert from turning the small numpy arrays into tensors (each
            # would cost a shared-memory segment).
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=False,
            collate_fn=_keep_as_is, prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None)
        batches = iter(loader)
        try:
            for parts in batches:
                skips = parts.pop("skipped")
                if skips:
                    self.skipped += len(skips)
                    self.skipped_samples.extend(tuple(s) for s in skips)
                ring = parts.pop("pool", None)
                if ring is None:
                    yield to_batch(parts, pin_memory=self.pin_memory, dtype=self.feature_dtype)
                    continue
                # Copy out of the worker's slot, then hand the slot back (see SharedBufferPool).
                batch = to_batch(pool.resolve(parts, *ring), pin_memory=self.pin_memory,
                                 dtype=self.feature_dtype, copy=True)
                pool.release(ring[0])
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
    index = load_split_index(Path(shard_dir), split)
    plan = plan_epoch(index.lengths, token_budget=cfg.token_budget, max_batch_size=cfg.max_batch_size,
                      weights=cfg.modality_weights, min_batch_size=cfg.min_batch_size, world_size=world_size,
                      train=train, seed=cfg.seed, epoch=epoch, sort_jitter=cfg.sort_jitter,
                      remainder=cfg.remainder)
    if plan.steps == 0:
        raise DataError(f"split {split!r} of {shard_dir} has {len(plan.batches)} batches, fewer than "
                        f"world_size={world_size}: use loader.remainder='pad' or a smaller token_budget")
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    dataset = PlannedBatches(Path(shard_dir), index, plan, rank, cfg.on_error, cfg.merge_gap_bytes)
    return BatchLoader(dataset, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, pin_memory=pin,
                       reuse_buffers=cfg.reuse_buffers,
                       feature_dtype=torch.float32 if cfg.feature_dtype == "float32" else None)
