"""The loader's configuration section (``[loader]``): token-budget batching, rank balancing, shard reading.

*Cost weights.* ``modality_weights`` scale frames per modality in the batch cost; the default (1, 1, 1)
counts padded frames, since carat's per-modality aligners (historically "CTC" modules; no CTC loss is
involved) run an LSTM over raw frames whose per-step work is similar across modalities. Audio (~100 Hz) has
~3.5x the frames of visual (~30 Hz) and ~30x the text steps, so it sets the cost of every realistic batch.

Kept apart from :mod:`carat.data.loader.pipeline` so that composing the configuration tree (:mod:`carat.config`)
does not import torch's DataLoader or WebDataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carat.errors import ConfigError


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
    """Byte ranges of one batch in the same shard closer than this are read with one read (one ranged GET for a
    corpus in object storage)."""
    cache_dir: str | None = None
    """For a corpus in object storage (``train.shard_dir=s3://...``): a local directory keeping the shards' bytes
    in 4 MiB blocks, so later epochs read from local disk. Shared by workers, ranks and runs on one machine
    (blocks are named by the shard's sha256). None = every read is a ranged GET. Ignored for a local corpus."""
    cache_max_bytes: int = 50 << 30
    """Bound of cache_dir in bytes; least recently used blocks are evicted beyond it."""

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
        if self.cache_max_bytes < 1:
            raise ConfigError(f"loader.cache_max_bytes={self.cache_max_bytes} must be >= 1 (bytes of loader.cache_dir)")
        if self.merge_gap_bytes < 0:
            raise ConfigError(f"loader.merge_gap_bytes={self.merge_gap_bytes} must be >= 0")


TINY_OVERRIDES: dict[str, object] = {"token_budget": 4096, "max_batch_size": 16, "num_workers": 0}
"""The tiny preset's batches: up to 16 clips per rank, so the quickstart's two Ray workers step on 32 clips
together (the batch the tiny preset's lr was measured at, BENCHMARKS.md, Learning)."""
