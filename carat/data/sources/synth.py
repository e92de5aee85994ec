"""A synthetic CMU-MOSEI-like corpus with a planted, learnable, unaligned multimodal signal.

CMU-MOSEI (Zadeh et al., ACL 2018) can no longer be downloaded, so carat ships a generator that mimics what
matters for training and systems work: the real split sizes (16,326 / 1,871 / 4,659 segments), feature
dimensions (GloVe 300 / FACET 35 / COVAREP 74), long-tailed unaligned lengths (text 16-374 words, visual
126-3,140 frames at ~30 Hz, audio 400-10,891 frames at ~100 Hz, all driven by one segment duration), and the
test-split label prevalences with plausible co-occurrence (a Gaussian copula over the six emotions).

The signal: each emotion that a segment carries leaves a short cue (a fixed random direction per emotion and
modality, shaped by a Hann window) at an independent random time in each modality, so the modalities are
unaligned. Cue strength differs by modality (surprise lives mostly in the face, anger in the voice, disgust in
the words), a cue can be missing from one modality, background is smooth AR(1) noise with per-dimension
scales, every video has its own constant offset ("speaker style"), and a fraction of labels disagree with
the evidence (label noise). Knobs change that structure for checks on corpora nothing was tuned to: which
modality carries which emotion (``cue_layout``), how far the per-dimension scales and means spread
(``feature_scale_spread``, ``feature_mean_spread``), cue strength and label noise. A short, local cue in a long sequence is diluted by mean pooling and a missing cue
in one modality is recovered from another, so fusing modalities and attending over time beats any single
modality or a mean-pooled linear model (the reference scorer in the dataset card is that floor).

Generation is vectorised numpy and deterministic: the cheap per-segment plan (lengths, labels) is drawn per
(seed, split); the features of one segment are drawn from a generator seeded by (seed, split, index), so the
shard writer can materialise segments one at a time in its own (length-sorted) order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES, Segment, SegmentRef
from carat.data.sources.synth_config import (  # noqa: F401  (re-exported)
    CUE_LAYOUTS, MAX_SPREAD, TINY_OVERRIDES, SynthConfig)
from carat.storage import ObjectPath, as_location, is_url

# Real CMU-MOSEI bounds of the unaligned sequences (frames), in MODALITIES order (text, visual, audio).
LENGTH_BOUNDS: dict[str, tuple[int, int]] = {"text": (16, 374), "visual": (126, 3140), "audio": (400, 10891)}

# Latent correlation of the six emotions (EMOTIONS order) for the Gaussian copula: the negative emotions
# co-occur (anger-disgust strongest, as annotators often mark both), happiness excludes them.
LABEL_CORRELATION: tuple[tuple[float, ...], ...] = (
    (1.00, -0.35, -0.30, 0.10, -0.30, -0.20),
    (-0.35, 1.00, 0.45, 0.05, 0.40, 0.30),
    (-0.30, 0.45, 1.00, 0.05, 0.60, 0.25),
    (0.10, 0.05, 0.05, 1.00, 0.05, 0.15),
    (-0.30, 0.40, 0.60, 0.05, 1.00, 0.25),
    (-0.20, 0.30, 0.25, 0.15, 0.25, 1.00),
)

# Relative cue strength per emotion (rows, EMOTIONS order) and modality (columns: text, visual, audio).
# Some emotions live mostly in one modality, so no single modality can see everything.
CUE_STRENGTH: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.9, 0.5),  # happy: words and smile
    (0.5, 0.4, 1.0),  # sad: voice
    (0.4, 0.6, 1.0),  # anger: voice
    (0.3, 1.1, 0.3),  # surprise: face
    (1.0, 0.5, 0.3),  # disgust: words
    (0.4, 0.7, 0.7),  # fear: face and voice
)


# Independent random streams derived from the seed (SeedSequence entropy), one per purpose.
_STREAM_PLAN, _STREAM_SEGMENT, _STREAM_VIDEO, _STREAM_GLOBAL, _STREAM_LAYOUT = 1, 2, 3, 4, 5


ORACLE_METHOD = (
    "the floor's one-vs-rest logistic regression on 18 matched-filter features that use the generator's "
    "parameters (per modality and emotion: frames un-scaled to the standardised space, projected on the planted "
    "cue direction, median-centred, correlated with the unit-norm Hann window of the cue's width, max over time) "
    "plus the 3 log lengths; it knows where the signal is, so it shows roughly what a model can be expected to reach")

@dataclass(frozen=True)
class SynthPlan:
    """What a SegmentRef's locator holds for a synthetic segment: enough to regenerate it alone."""

    split_index: int
    index: int
    video_index: int
    video_id: str
    labels: np.ndarray
    intensities: np.ndarray
    sentiment: float


def split_sizes(cfg: SynthConfig) -> dict[str, int]:
    """Segments per split: the real sizes times ``scale``, at least ``min_split_size``."""
    full = {"train": cfg.train_size, "valid": cfg.valid_size, "test": cfg.test_size}
    return {s: max(cfg.min_split_size, int(round(n * cfg.scale))) for s, n in full.items()}


def _rng(cfg: SynthConfig, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, *stream]))


def cue_strength_table(cfg: SynthConfig) -> np.ndarray:
    """[6, 3] relative cue strength per emotion (EMOTIONS) and modality (MODALITIES) under ``cfg.cue_layout``.

    "shuffled" permutes each emotion's row with its own stream, so the default layout's bytes never change."""
    table = np.asarray(CUE_STRENGTH, dtype=np.float32)
    if cfg.cue_layout == "shuffled":
        rng = _rng(cfg, _STREAM_LAYOUT)
        table = np.stack([row[rng.permutation(len(MODALITIES))] for row in table])
    return table


# ----------------------------------------------------------------------------------------------- plan (cheap)

def _draw_video_ids(rng: np.random.Generator, n: int, mean_per_video: float) -> np.ndarray:
    """Video index of each segment: consecutive runs of 1 + Poisson(mean - 1) segments per video."""
    counts = 1 + rng.poisson(max(mean_per_video - 1.0, 0.0), size=n)
    return np.repeat(np.arange(n), counts)[:n]


def draw_lengths(rng: np.random.Generator, n: int, cfg: SynthConfig) -> np.ndarray:
    """[n, 3] int lengths (text, visual, audio), all driven by one long-tailed duration per segment.

    Duration = floor + lognormal excess (seconds); audio at ~100 Hz, visual at ~30 Hz (with a little frame
    loss), text at a per-segment speaking rate; each clipped to the real bounds, then ``length_scale``d.
    """
    excess = np.exp(rng.normal(math.log(cfg.duration_median_excess_s), cfg.duration_sigma, size=n))
    duration = cfg.duration_floor_s + excess
    rate = rng.uniform(*cfg.words_per_second, size=n)
    frame_keep = rng.uniform(0.95, 1.0, size=n)  # face tracking drops a few frames
    raw = {
        "text": duration * rate,
        "visual": duration * cfg.visual_hz * frame_keep,
        "audio": duration * cfg.audio_hz,
    }
    out = np.empty((n, len(MODALITIES)), dtype=np.int64)
    for j, m in enumerate(MODALITIES):
        lo, hi = LENGTH_BOUNDS[m]
        clipped = np.clip(np.rint(raw[m]), lo, hi)
        out[:, j] = np.maximum(cfg.min_frames, np.rint(clipped * cfg.length_scale)).astype(np.int64)
    return out


def draw_labels(rng: np.random.Generator, n: int, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels [n, 6] uint8, raw intensities [n, 6] float32 in {0, 1/3, ..., 3}, sentiment [n] in -3..3.

    A Gaussian copula: latent z ~ N(0, LABEL_CORRELATION); emotion e is present when z_e exceeds the quantile
    giving its prevalence. The intensity grows with how far z_e is into the tail (mostly 1/3 or 2/3, as with
    three annotators' means). Sentiment follows happiness minus the negative emotions, plus noise.
    """
    from scipy.special import ndtr, ndtri

    corr = np.asarray(LABEL_CORRELATION)
    z = rng.standard_normal((n, len(EMOTIONS))) @ np.linalg.cholesky(corr).T
    prevalence = np.asarray(cfg.prevalence)
    present = z > ndtri(1.0 - prevalence)
    tail = np.clip((ndtr(z) - (1.0 - prevalence)) / prevalence, 0.0, 1.0)  # 0..1 within the present tail
    level = np.clip(1 + np.floor(tail ** 2.5 * 9), 1, 9)  # 1..9 thirds, low levels most common
    intensities = np.where(present, level / 3.0, 0.0).astype(np.float32)
    signed = intensities @ np.array([0.9, -0.5, -0.5, 0.1, -0.5, -0.3]) + rng.normal(0.0, 0.6, size=n)
    sentiment = np.clip(np.rint(signed * 3) / 3, -3.0, 3.0)
    return present.astype(np.uint8), intensities, sentiment


def plan_corpus(cfg: SynthConfig) -> dict[str, list[SegmentRef]]:
    """Every segment's key, split, lengths and labels, without features (cheap for the full corpus)."""
    refs: dict[str, list[SegmentRef]] = {}
    for split_index, (split, n) in enumerate(split_sizes(cfg).items()):
        rng = _rng(cfg, _STREAM_PLAN, split_index)
        video = _draw_video_ids(rng, n, cfg.segments_per_video)
        lengths = draw_lengths(rng, n, cfg)
        labels, intensities, sentiment = draw_labels(rng, n, cfg)
        split_refs = []
        k = 0
        for i in range(n):
            k = k + 1 if i > 0 and video[i] == video[i - 1] else 0
            video_id = f"{split}{video[i]:05d}"
            plan = SynthPlan(split_index, i, int(video[i]), video_id, labels[i], intensities[i], float(sentiment[i]))
            split_refs.append(SegmentRef(f"{video_id}[{k}]", split, tuple(int(v) for v in lengths[i]), plan))
        refs[split] = split_refs
    return refs


# ----------------------------------------------------------------------------------------- features (per key)

@dataclass
class _ModalityParams:
    """Fixed per-corpus parameters of one modality (drawn once from the seed)."""

    directions: np.ndarray  # [6, D] unit cue directions
    scale: np.ndarray       # [D] per-dimension noise scale
    mean: np.ndarray        # [D] per-dimension mean
    ar: float
    cue_frames: int         # cue window length in frames


def _hann(width: int) -> np.ndarray:
    """A strictly positive bump of ``width`` frames peaking at 1."""
    return np.hanning(width + 2)[1:-1].astype(np.float32)


def ar1_noise(rng: np.random.Generator, length: int, dim: int, phi: float) -> np.ndarray:
    """[length, dim] stationary AR(1) noise with unit variance: x_t = phi x_{t-1} + sqrt(1 - phi^2) e_t."""
    from scipy.signal import lfilter

    e = rng.standard_normal((dim, length), dtype=np.float32)
    if phi == 0.0 or length == 1:
        return np.ascontiguousarray(e.T)
    c = math.sqrt(1.0 - phi * phi)
    e[:, 0] /= c  # start in the stationary distribution
    x = lfilter(np.array([c], np.float32), np.array([1.0, -phi], np.float32), e, axis=1)
    return np.ascontiguousarray(x.T, dtype=np.float32)


class SyntheticCorpus:
    """The planned corpus plus the generator of each segment's features (``load`` for the shard writer)."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.refs_by_split = plan_corpus(cfg)
        self.params = self._draw_params()
        self.cue_strength = cue_strength_table(cfg)
        self._strength = self.cue_strength * cfg.cue_strength

    def _draw_params(self) -> dict[str, _ModalityParams]:
        rng = _rng(self.cfg, _STREAM_GLOBAL)
        cue_frames = {
            "text": 3.0 * self.cfg.cue_seconds,
            "visual": self.cfg.visual_hz * self.cfg.cue_seconds,
            "audio": self.cfg.audio_hz * self.cfg.cue_seconds,
        }
        params = {}
        for j, m in enumerate(MODALITIES):
            d = FEATURE_DIMS[m]
            directions = rng.standard_normal((len(EMOTIONS), d))
            # Sparse support: each emotion speaks through a few features of the modality.
            support = np.argsort(rng.random((len(EMOTIONS), d)), axis=1)[:, : self.cfg.cue_dims[j]]
            mask = np.zeros_like(directions)
            np.put_along_axis(mask, support, 1.0, axis=1)
            directions *= mask
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
            params[m] = _ModalityParams(
                directions=directions.astype(np.float32),
                scale=np.exp(rng.normal(0.0, self.cfg.feature_scale_spread, size=d)).astype(np.float32),
                mean=rng.normal(0.0, self.cfg.feature_mean_spread, size=d).astype(np.float32),
                ar=self.cfg.ar_coefficients[j],
                cue_frames=max(1, int(round(cue_frames[m] * self.cfg.length_scale))),
            )
        return params

    def refs(self) -> dict[str, list[SegmentRef]]:
        return self.refs_by_split

    def oracle_features(self, seg: Segment) -> np.ndarray:
        """[3 * 6 + 3]: matched-filter responses (MODALITIES-major, EMOTIONS-minor), then log lengths: what a
        scorer that knows the planted signal sees. Per modality and emotion: undo ``x * scale + mean``, project the
        frames on the emotion's cue direction, remove the median over time (the speaker offset and background
        level), correlate with the unit-norm Hann window of the cue's width and take the max over time. The max of
        pure noise grows with the number of windows, so the log length of each modality goes along (see
        ORACLE_METHOD)."""
        from scipy.signal import fftconvolve

        out = np.empty((len(MODALITIES), len(EMOTIONS)))
        for j, m in enumerate(MODALITIES):
            p = self.params[m]
            x = np.asarray(getattr(seg, m), dtype=np.float64)
            proj = ((x - p.mean) / p.scale) @ p.directions.T.astype(np.float64)  # [T, 6]
            proj -= np.median(proj, axis=0)
            window = _hann(min(p.cue_frames, len(proj))).astype(np.float64)
            window /= np.linalg.norm(window)
            response = fftconvolve(proj, window[::-1, None], mode="valid", axes=0)  # [T - width + 1, 6]
            out[j] = response.max(axis=0)
        log_lengths = [math.log(len(getattr(seg, m))) for m in MODALITIES]
        return np.concatenate([out.reshape(-1), log_lengths])

    def load(self, ref: SegmentRef) -> Segment:
        """Generate one segment's features from its own seeded stream (independent of any other segment)."""
        plan: SynthPlan = ref.locator
        cfg = self.cfg
        rng = _rng(cfg, _STREAM_SEGMENT, plan.split_index, plan.index)
        video_rng = _rng(cfg, _STREAM_VIDEO, plan.split_index, plan.video_index)
        present = plan.labels.astype(bool)
        # Label noise: some present emotions leave no evidence, a few absent ones leave some.
        cued = np.where(present, rng.random(len(EMOTIONS)) >= cfg.label_noise,
                        rng.random(len(EMOTIONS)) < cfg.spurious_cue_rate)
        # Stronger annotations leave stronger cues; a spurious cue has the weakest intensity.
        intensity = np.where(present, plan.intensities, 1.0 / 3.0)
        amplitude = 0.6 + 0.4 * np.minimum(intensity, 3.0) / 3.0
        features = {}
        for j, m in enumerate(MODALITIES):
            p = self.params[m]
            length, dim = ref.lengths[j], FEATURE_DIMS[m]
            x = ar1_noise(rng, length, dim, p.ar)
            x += (video_rng.standard_normal(dim) * cfg.speaker_offset).astype(np.float32)
            keep = rng.random(len(EMOTIONS)) >= cfg.modality_dropout
            starts = rng.random(len(EMOTIONS))
            width = min(p.cue_frames, length)
            bump = _hann(width)[:, None]
            for e in np.flatnonzero(cued & keep):
                t0 = int(starts[e] * (length - width + 1))  # unaligned: its own time in each modality
                x[t0:t0 + width] += (amplitude[e] * self._strength[e, j]) * bump * p.directions[e]
            features[m] = x * p.scale + p.mean
        return Segment(
            key=ref.key, video_id=plan.video_id, split=ref.split,
            text=features["text"], visual=features["visual"], audio=features["audio"],
            labels=plan.labels.copy(), intensities=plan.intensities.copy(), sentiment=plan.sentiment,
        )


def planted_signal(corpus: SyntheticCorpus) -> dict[str, Any]:
    """What the card says about the planted structure: the cue layout actually used (relative strength per
    emotion and modality, times ``cue_strength``) and the spread of the per-dimension scales and means."""
    return {
        "cue_layout": corpus.cfg.cue_layout,
        "cue_strength": {e: dict(zip(MODALITIES, (round(float(v), 4) for v in row)))
                         for e, row in zip(EMOTIONS, corpus.cue_strength)},
        "feature_scale_range": {m: [round(float(p.scale.min()), 6), round(float(p.scale.max()), 6)]
                                for m, p in corpus.params.items()},
        "feature_mean_range": {m: [round(float(p.mean.min()), 6), round(float(p.mean.max()), 6)]
                               for m, p in corpus.params.items()},
    }


def synthesize_corpus(out_dir: Path | str, cfg: SynthConfig, storage: Any = None, *, progress: bool = False,
                      reference: bool = True) -> Path | ObjectPath:
    """Write the synthetic corpus as sorted WebDataset shards + manifest + dataset card into ``out_dir``.

    ``storage`` is a :class:`carat.data.corpus.shards.StorageConfig` (default one if None). With ``reference`` the card
    gets the mean/std-pooled logistic-regression floor and the oracle that knows the planted cues (on bounded
    subsamples, as ``reference_scorer["fused"]`` and ``["oracle"]``); it always gets the train split's
    per-dimension feature statistics. ``out_dir`` is locked while it is written: a second writer gets
    :class:`~carat.locks.LockHeld` at once. An object-store URL (``s3://bucket/prefix``) is written locally and
    uploaded, manifest last (:func:`carat.data.corpus.remote.write_corpus_to`). Returns ``out_dir``.
    """
    from carat.data.corpus.outdir import corpus_write_lock
    from carat.data.corpus.shards import StorageConfig

    if is_url(out_dir):  # written locally, then published (carat.data.corpus.remote)
        from carat.data.corpus.remote import write_corpus_to

        return write_corpus_to(as_location(out_dir), lambda local: synthesize_corpus(
            local, cfg, storage, progress=progress, reference=reference), progress=progress)
    storage = storage if storage is not None else StorageConfig()
    with corpus_write_lock(Path(out_dir)) as out:
        _write_synthetic_corpus(out, cfg, storage, progress=progress, reference=reference)
    return Path(out_dir)


def _write_synthetic_corpus(out: Path, cfg: SynthConfig, storage: Any, *, progress: bool, reference: bool) -> None:
    """Shards, manifest and card of ``cfg``'s corpus into ``out`` (whose lock the caller holds)."""
    from carat.data.corpus.card import IssueLog, ReferenceCollector, build_card, write_card
    from carat.data.corpus.featstats import FeatureStatsAccumulator
    from carat.data.corpus.shards import write_corpus

    corpus = SyntheticCorpus(cfg)
    refs = corpus.refs()
    collector = ReferenceCollector(refs, max_train=cfg.reference_max_train, max_eval=cfg.reference_max_eval,
                                   seed=cfg.seed, oracle=corpus.oracle_features,
                                   oracle_method=ORACLE_METHOD) if reference else None
    stats = FeatureStatsAccumulator(storage.dtype)
    load = stats.wrap(collector.wrap(corpus.load) if collector else corpus.load)
    index = write_corpus(refs, load, out, storage, progress=progress)
    stats.complete(refs, corpus.load)  # train segments of shards kept from an interrupted run
    scores = None
    if collector is not None:
        collector.complete(corpus.load)
        scores = collector.score(progress=progress)
    card = build_card(
        out, source="synth", config={"synth": asdict(cfg), "storage": asdict(storage)},
        issues=IssueLog(), source_files={}, reference=scores, feature_stats=stats.to_card(),
        notes=[
            "Synthetic CMU-MOSEI-like corpus (carat.data.sources.synth); not real data.",
            f"length_scale={cfg.length_scale}: sequence lengths are "
            + ("the realistic ones." if cfg.length_scale == 1.0 else
               "shrunk for fast CPU runs; do not compare timings or scores with full-length data."),
        ],
        extra={"write": {"shards_reused": index.shards_reused}, "planted_signal": planted_signal(corpus)},
    )
    write_card(out, card)


__all__ = [
    "SynthConfig", "TINY_OVERRIDES", "SyntheticCorpus", "SynthPlan", "synthesize_corpus", "plan_corpus",
    "split_sizes", "draw_lengths", "draw_labels", "ar1_noise", "LENGTH_BOUNDS", "ORACLE_METHOD", "CUE_LAYOUTS",
    "cue_strength_table", "planted_signal",
]
