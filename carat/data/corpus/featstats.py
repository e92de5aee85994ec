"""Per-dimension feature statistics of a corpus' train split: what a model needs to standardise its inputs.

Real CMU-MOSEI features span wildly different magnitudes (COVAREP and FACET dimensions from ~0.05 to ~450),
so a model should standardise each dimension before anything else, with statistics of the train split only
(valid / test must not leak into them). They are collected while the shards are written, on exactly the values
the shards hold: after the NaN / inf replacement policy, rounded to the storage dtype. The card stores them as
``feature_stats``; :func:`load_feature_stats` reads them back, or computes them from the train shards for a
corpus whose card predates the key.

Accumulation is in float64 with a per-dimension shift (the first segment's mean), so sums of squares do not
cancel catastrophically for dimensions whose mean is large next to their spread.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from carat.data.sources.segment import FEATURE_DIMS, MODALITIES, Segment, SegmentRef
from carat.errors import DataError
from carat.storage import as_location

STATS_SPLIT = "train"
STD_FLOOR = 1e-6
"""A dimension whose std is below ``STD_FLOOR * max(1, |mean|)`` is constant: its std is reported as 1.0, so
standardising never divides by (nearly) zero, and the card counts such dimensions."""


class FeatureStatsAccumulator:
    """Running per-dimension sums over every frame of every train segment, one segment at a time.

    ``wrap(load)`` records the segments a shard writer loads (no second pass); ``complete(refs, load)`` loads
    the train segments the writer skipped (shards kept from an interrupted run). A key is counted once.
    """

    def __init__(self, storage_dtype: str = "float32") -> None:
        self.storage_dtype = np.dtype(storage_dtype)
        self.seen: set[str] = set()
        self.frames = {m: 0 for m in MODALITIES}
        self.shift: dict[str, np.ndarray | None] = {m: None for m in MODALITIES}
        self.sums = {m: np.zeros(FEATURE_DIMS[m]) for m in MODALITIES}
        self.sumsq = {m: np.zeros(FEATURE_DIMS[m]) for m in MODALITIES}

    def add(self, key: str, features: dict[str, np.ndarray]) -> None:
        """Count one train segment's frames (each modality [L, D]); a key already counted is ignored."""
        if key in self.seen:
            return
        self.seen.add(key)
        for m in MODALITIES:
            # The values the shards hold: rounded to the storage dtype, then accumulated in float64.
            x = np.asarray(features[m]).astype(self.storage_dtype, copy=False).astype(np.float64)
            if len(x) == 0:
                continue
            if self.shift[m] is None:
                self.shift[m] = x.mean(axis=0)
            d = x - self.shift[m]
            self.sums[m] += d.sum(axis=0)
            self.sumsq[m] += np.einsum("td,td->d", d, d)
            self.frames[m] += len(x)

    def record(self, seg: Segment) -> None:
        if seg.split == STATS_SPLIT:
            self.add(seg.key, {m: getattr(seg, m) for m in MODALITIES})

    def wrap(self, load: Callable[[SegmentRef], Segment]) -> Callable[[SegmentRef], Segment]:
        def recording_load(ref: SegmentRef) -> Segment:
            seg = load(ref)
            self.record(seg)
            return seg
        return recording_load

    def complete(self, refs_by_split: dict[str, list[SegmentRef]], load: Callable[[SegmentRef], Segment]) -> int:
        """Load the train segments not counted yet; returns how many were loaded here."""
        missing = [r for r in refs_by_split.get(STATS_SPLIT, []) if r.key not in self.seen]
        for ref in missing:
            self.record(load(ref))
        return len(missing)

    def mean_std(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """modality -> (mean [D] float64, floored std [D] float64, number of constant dims)."""
        out = {}
        for m in MODALITIES:
            n = self.frames[m]
            if n == 0:
                d = FEATURE_DIMS[m]
                out[m] = (np.zeros(d), np.ones(d), d)
                continue
            centred = self.sums[m] / n
            var = np.maximum(self.sumsq[m] / n - centred * centred, 0.0)
            mean = self.shift[m] + centred
            std, constant = floor_std(mean, np.sqrt(var))
            out[m] = (mean, std, constant)
        return out

    def to_card(self) -> dict[str, Any]:
        """The card's ``feature_stats`` entry."""
        stats = self.mean_std()
        return {
            "split": STATS_SPLIT,
            "segments": len(self.seen),
            "frames": dict(self.frames),
            "values": f"as stored in the shards ({self.storage_dtype.name}, after the NaN/inf policy); population "
                      "std (ddof=0) over every frame of every train segment",
            "std_floor": f"std < {STD_FLOOR:g} * max(1, |mean|) is reported as 1.0 (constant dimension)",
            "constant_dims": {m: int(stats[m][2]) for m in MODALITIES},
            "mean": {m: [float(v) for v in stats[m][0]] for m in MODALITIES},
            "std": {m: [float(v) for v in stats[m][1]] for m in MODALITIES},
        }


def floor_std(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, int]:
    """std with (near-)constant dimensions set to 1.0, and how many there were."""
    constant = std < STD_FLOOR * np.maximum(1.0, np.abs(mean))
    return np.where(constant, 1.0, std), int(constant.sum())


# ------------------------------------------------------------------------------------------------ reading

def _stats_from_card(entry: Any, where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Check and convert a card's ``feature_stats``; DataError naming the card file and the bad part."""
    if not isinstance(entry, dict) or not isinstance(entry.get("mean"), dict) or not isinstance(entry.get("std"), dict):
        raise DataError(f"{where}: feature_stats must hold 'mean' and 'std' mappings of modality -> list")
    out = {}
    for m in MODALITIES:
        pair = []
        for name in ("mean", "std"):
            values = entry[name].get(m)
            dim = FEATURE_DIMS[m]
            try:
                arr = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.shape != (dim,):
                shape = None if arr is None else arr.shape
                raise DataError(f"{where}: feature_stats.{name}.{m} must be {dim} numbers (got shape {shape})")
            if not np.isfinite(arr).all():
                raise DataError(f"{where}: feature_stats.{name}.{m} holds non-finite values")
            if name == "std" and (arr <= 0).any():
                raise DataError(f"{where}: feature_stats.std.{m} holds values <= 0")
            pair.append(arr.astype(np.float32))
        out[m] = (pair[0], pair[1])
    return out


def compute_feature_stats(shard_dir: Path, *, max_segments: int = 4000) -> FeatureStatsAccumulator:
    """Statistics from the train shards: at most ``max_segments`` segments, evenly spaced over the split.

    The shards are sorted by length, so evenly spaced rows cover short and long segments alike."""
    from carat.data.loader.split_index import load_split_index
    from carat.data.loader.tar_reader import ShardReader

    index = load_split_index(as_location(shard_dir), STATS_SPLIT)
    n = len(index)
    rows = np.unique(np.linspace(0, n - 1, min(n, max(1, max_segments))).round().astype(np.int64))
    acc = FeatureStatsAccumulator()
    reader = ShardReader(as_location(shard_dir), index)
    try:
        for chunk in np.array_split(rows, max(1, math.ceil(len(rows) / 64))):
            samples, skips = reader.read(chunk)
            if skips:
                shard, key, why = skips[0]
                raise DataError(f"{shard}: cannot read sample {key} for feature statistics ({why})")
            for s in samples:
                acc.add(s.key, s.features)
    finally:
        reader.close()
    return acc


def load_feature_stats(shard_dir: Path, *, max_segments: int = 4000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """modality -> (mean float32 [D], std float32 [D]) of the train split, for standardising features.

    From the card's ``feature_stats``; for a corpus whose card predates it (or has no card), computed from at
    most ``max_segments`` train segments of the shards, saying so in one line on stderr. DataError naming the
    card file when the stored statistics are malformed."""
    from carat.data.corpus.card import CARD_FILE, read_card

    shard_dir = as_location(shard_dir)
    card_path = shard_dir / CARD_FILE
    card = read_card(shard_dir) if card_path.is_file() else {}
    if "feature_stats" in card:
        return _stats_from_card(card["feature_stats"], str(card_path))
    acc = compute_feature_stats(shard_dir, max_segments=max_segments)
    print(f"{card_path}: no feature_stats in the dataset card; computed them from {len(acc.seen)} train segments "
          "of the shards", file=sys.stderr)
    return {m: (mean.astype(np.float32), std.astype(np.float32)) for m, (mean, std, _) in acc.mean_std().items()}


__all__ = ["FeatureStatsAccumulator", "load_feature_stats", "compute_feature_stats", "floor_std", "STD_FLOOR"]
