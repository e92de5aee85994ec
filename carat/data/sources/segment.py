"""The unit every data source yields and every shard stores: one labelled segment of one video.

Sources (synthetic, ``.csd``, pickle) first list :class:`SegmentRef` records (key, split, lengths), cheap to
hold for the whole corpus, so the shard writer can sort by length; then load one :class:`Segment` at a time
in sorted order, so nothing ever holds the whole corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

EMOTIONS: tuple[str, ...] = ("happy", "sad", "anger", "surprise", "disgust", "fear")
MODALITIES: tuple[str, ...] = ("text", "visual", "audio")
FEATURE_DIMS: dict[str, int] = {"text": 300, "visual": 35, "audio": 74}
SPLITS: tuple[str, ...] = ("train", "valid", "test")


@dataclass(frozen=True)
class SegmentRef:
    """A segment known by key and lengths only; ``locator`` is whatever its source needs to load it."""

    key: str
    split: str
    lengths: tuple[int, int, int]
    """Frames per modality, in MODALITIES order (text, visual, audio)."""
    locator: Any = field(default=None, compare=False)

    @property
    def sort_key(self) -> tuple[int, int, int, str]:
        """Shards are sorted by audio frames (the most expensive modality), then visual, text, key."""
        t, v, a = self.lengths
        return (a, v, t, self.key)


@dataclass
class Segment:
    """One segment's features and labels, as written to a shard."""

    key: str
    """``<video_id>[<k>]``: the k-th labelled interval of the video."""
    video_id: str
    split: str
    text: np.ndarray
    """[L_t, 300] float32."""
    visual: np.ndarray
    """[L_v, 35] float32."""
    audio: np.ndarray
    """[L_a, 74] float32."""
    labels: np.ndarray
    """[6] uint8 in {0, 1}, EMOTIONS order; present when the raw intensity is > 0."""
    intensities: np.ndarray
    """[6] float32 raw 0..3 annotator means; NaN where the source only has binary labels."""
    sentiment: float | None = None
    """Raw sentiment in -3..3 where the source has it."""

    @property
    def lengths(self) -> tuple[int, int, int]:
        return (len(self.text), len(self.visual), len(self.audio))
