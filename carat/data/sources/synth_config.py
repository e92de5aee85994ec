"""The ``[synth]`` section: the knobs of the synthetic corpus (the generator is :mod:`carat.data.sources.synth`).

Kept apart from that code so that reading a configuration (:mod:`carat.config`) loads no generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES
from carat.errors import ConfigError

CUE_LAYOUTS: tuple[str, ...] = ("default", "shuffled")
MAX_SPREAD = 4.0  # feature_scale_spread = 4 already gives scales of exp(+-16) at 4 sigma


@dataclass
class SynthConfig:
    """Knobs of the synthetic CMU-MOSEI-like corpus. Defaults reproduce the real corpus' size and shape."""

    seed: int = 0
    """Seed of everything: the same seed and config give byte-identical shards."""
    scale: float = 1.0
    """Fraction of the real split sizes to generate (each split keeps at least ``min_split_size``)."""
    length_scale: float = 1.0
    """Shrinks every sequence length proportionally (bounded below by ``min_frames``). Only for fast CPU tests
    and quickstarts: real training uses 1.0. Recorded in the dataset card."""
    min_frames: int = 4
    """Lower bound of any sequence length after ``length_scale``."""
    train_size: int = 16326
    """Segments in the train split at scale 1 (the real CMU-MOSEI count)."""
    valid_size: int = 1871
    """Segments in the valid split at scale 1."""
    test_size: int = 4659
    """Segments in the test split at scale 1."""
    min_split_size: int = 8
    """Smallest split size whatever ``scale`` is (so every split has a few segments)."""
    segments_per_video: float = 7.0
    """Mean labelled segments per video (real CMU-MOSEI: about 7)."""
    duration_floor_s: float = 4.0
    """Shortest segment duration in seconds; the duration is this plus a lognormal excess."""
    duration_median_excess_s: float = 4.0
    """Median of the lognormal excess duration (seconds) above the floor."""
    duration_sigma: float = 0.85
    """Log-space spread of the excess duration: the long tail (p50 ~ 8 s, p99 ~ 33 s; the longest of ~23k
    segments reach the real maxima of ~109 s)."""
    words_per_second: tuple[float, float] = (2.0, 4.0)
    """Range of a segment's speaking rate (words per second), drawn uniformly per segment."""
    visual_hz: float = 30.0
    """Visual (FACET) frame rate."""
    audio_hz: float = 100.0
    """Audio (COVAREP) frame rate."""
    prevalence: tuple[float, float, float, float, float, float] = (0.537, 0.242, 0.230, 0.095, 0.173, 0.083)
    """Probability that each emotion (happy, sad, anger, surprise, disgust, fear) is present: the real test split."""
    cue_strength: float = 5.0
    """Amplitude of a planted cue (in units of the per-dimension background noise), times the per-emotion,
    per-modality factors of CUE_STRENGTH and an intensity factor."""
    cue_seconds: float = 1.0
    """Duration of a cue window; text cues span about 3 words per second of it."""
    modality_dropout: float = 0.25
    """Probability that a present emotion leaves no cue in one given modality (fusion recovers it)."""
    label_noise: float = 0.1
    """Probability that a present emotion leaves no cue in any modality (its label disagrees with the data)."""
    spurious_cue_rate: float = 0.02
    """Probability that an absent emotion leaves cues anyway (the other side of label noise)."""
    ar_coefficients: tuple[float, float, float] = (0.3, 0.85, 0.9)
    """AR(1) coefficient of the background noise per modality (text, visual, audio): frames are smooth."""
    cue_dims: tuple[int, int, int] = (8, 4, 8)
    """Dimensions each emotion's cue direction spans per modality (text, visual, audio): emotion cues live in
    a few features (a facial action unit, a pitch statistic), which is what makes them learnable."""
    speaker_offset: float = 0.3
    """Std of a constant per-video offset added to every frame: it hides cues from mean pooling."""
    cue_layout: Literal["default", "shuffled"] = "default"
    """Which modality carries which emotion. "default": the CUE_STRENGTH table (surprise in the face, anger in the
    voice, ...). "shuffled": each emotion's row of that table is permuted across the three modalities by a draw
    from the seed, so a corpus can be made whose structure nothing was tuned to. The table used is in the card."""
    feature_scale_spread: float = 0.5
    """Log-space std of the per-dimension feature scale: frames are ``x * scale + mean`` with ``scale =
    exp(N(0, spread))``. 0.5 spans ~0.4-2.7 over a modality; ~2.0 mimics real COVAREP / FACET magnitudes
    (~0.05-450), which models must standardise away. Above ~2.5 the largest values can pass float16's +-65504:
    the shard writer then stops with a DataError naming the segment (store float32)."""
    feature_mean_spread: float = 0.5
    """Std of the per-dimension feature mean ``mean ~ N(0, spread)``, in feature units (independent of the
    dimension's scale, so a small-scale dimension can sit far from 0, as real features do)."""
    reference_max_train: int = 4000
    """Reference scorer: at most this many train segments (a seeded subsample), to keep it fast."""
    reference_max_eval: int = 3000
    """Reference scorer: at most this many valid and test segments each."""

    def __post_init__(self) -> None:
        self.words_per_second = tuple(float(v) for v in self.words_per_second)  # type: ignore[assignment]
        self.prevalence = tuple(float(v) for v in self.prevalence)  # type: ignore[assignment]
        self.ar_coefficients = tuple(float(v) for v in self.ar_coefficients)  # type: ignore[assignment]
        if not 0.0 < self.scale <= 1.0:
            raise ConfigError(f"synth.scale={self.scale} must be in (0, 1] (a fraction of the real split sizes)")
        if not 0.0 < self.length_scale <= 1.0:
            raise ConfigError(f"synth.length_scale={self.length_scale} must be in (0, 1]")
        for name in ("min_frames", "train_size", "valid_size", "test_size", "min_split_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synth.{name}={getattr(self, name)} must be >= 1")
        for name in ("segments_per_video", "duration_median_excess_s", "duration_sigma", "visual_hz",
                     "audio_hz", "cue_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"synth.{name}={getattr(self, name)} must be > 0")
        for name in ("duration_floor_s", "cue_strength", "speaker_offset"):
            if getattr(self, name) < 0:
                raise ConfigError(f"synth.{name}={getattr(self, name)} must be >= 0")
        for name in ("modality_dropout", "label_noise", "spurious_cue_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"synth.{name}={getattr(self, name)} must be in [0, 1)")
        wps = self.words_per_second
        if len(wps) != 2 or not 0 < wps[0] <= wps[1]:
            raise ConfigError(f"synth.words_per_second={self.words_per_second} must be (low, high) with 0 < low <= high")
        if len(self.prevalence) != len(EMOTIONS) or not all(0.0 < p < 1.0 for p in self.prevalence):
            raise ConfigError(f"synth.prevalence={self.prevalence} must be {len(EMOTIONS)} values in (0, 1) "
                              f"(one per emotion: {', '.join(EMOTIONS)})")
        if len(self.ar_coefficients) != len(MODALITIES) or not all(0.0 <= a < 1.0 for a in self.ar_coefficients):
            raise ConfigError(f"synth.ar_coefficients={self.ar_coefficients} must be 3 values in [0, 1) "
                              "(text, visual, audio)")
        self.cue_dims = tuple(int(v) for v in self.cue_dims)  # type: ignore[assignment]
        dims = tuple(FEATURE_DIMS[m] for m in MODALITIES)
        if len(self.cue_dims) != len(MODALITIES) or not all(1 <= k <= d for k, d in zip(self.cue_dims, dims)):
            raise ConfigError(f"synth.cue_dims={self.cue_dims} must be 3 ints, each in 1..{dims} (text, visual, audio)")
        if self.reference_max_train < 2 or self.reference_max_eval < 2:
            raise ConfigError("synth.reference_max_train and synth.reference_max_eval must be >= 2")
        if self.cue_layout not in CUE_LAYOUTS:
            raise ConfigError(f"synth.cue_layout={self.cue_layout!r} must be one of {CUE_LAYOUTS}")
        for name in ("feature_scale_spread", "feature_mean_spread"):
            value = getattr(self, name)
            if not 0.0 <= value <= MAX_SPREAD:
                raise ConfigError(f"synth.{name}={value} must be in [0, {MAX_SPREAD}] (log-space / feature-unit "
                                  "std; 0.5 is the default, ~2.0 mimics real feature magnitudes)")


TINY_OVERRIDES: dict[str, object] = {"scale": 0.2, "length_scale": 0.025}
"""The "tiny" preset (the quickstart's corpus): ~4,570 segments (3,265 / 374 / 932) with sequences a fortieth
of the real length (median text 4 words, visual 6 frames, audio 20 frames), about the token count of the
earlier 1,143-clip corpus at a tenth of the length. Measured (BENCHMARKS.md, Learning, 2026-12-03, second
part): on 816 train clips every learned model, CARAT and bench-only probes alike, stayed at or below the
pooled logistic-regression floor (test macro-AUC ~0.59 against the floor's 0.595 and the oracle's 0.816),
too few clips to learn where a short cue sits; on 3,265 clips the same tiny CARAT reaches 0.797 against the
floor's 0.735. At scale 0.02 a 37-clip validation split made threshold tuning and epoch selection noise."""
