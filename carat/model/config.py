"""Configuration of the CARAT network (:class:`ModelConfig`) and of its training objective (:class:`LossConfig`).

Defaults are the seed configuration: the configuration of the variable-length derivative of CARAT (Peng et al.,
AAAI 2024) this project started from, not the authors' published one (that is the ``official`` preset,
``carat.config``). "Reference" in this module always means the authors' published code (github.com/chengzju/CARAT);
every option whose default differs from it says so, and :data:`REFERENCE_MODEL` / :data:`REFERENCE_LOSS` set the
reference's behaviour (``tests/test_reference_parity.py`` checks it against numbers from the authors' code).
``TINY_MODEL_OVERRIDES`` / ``TINY_LOSS_OVERRIDES`` give the "tiny" preset used by tests and the quickstart (a few
thousand parameters per encoder, short aligned sequences).

The decision threshold (seed 0.2) lives in :class:`ModelConfig` (``threshold``): it is part of the prediction
rule (``CARAT.predict``), not of the objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from carat.errors import ConfigError

ALIGNED_MODALITIES: tuple[str, ...] = ("visual", "audio")
"""Modalities passed through the alignment (the reference's "CTC module": no CTC loss, see alignment.py); text is
never aligned."""
ENCODED_MODALITIES: tuple[str, ...] = ("text", "visual", "audio")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Shapes and behaviour of the CARAT network. Defaults = the seed configuration."""

    text_dim: int = 300
    """Raw text feature size (GloVe)."""
    visual_dim: int = 35
    """Raw visual feature size (FACET)."""
    audio_dim: int = 74
    """Raw audio feature size (COVAREP)."""
    num_classes: int = 6
    """Number of emotion labels (happy, sad, anger, surprise, disgust, fear)."""
    hidden_size: int = 512
    """Encoder width d (all three encoders); must be even (the projections use d/2)."""
    intermediate_size: int = 512
    """Width of each encoder layer's feed-forward block."""
    num_heads: int = 8
    """Attention heads per encoder layer; must divide hidden_size (the seed text's 12 does not divide 512)."""
    hidden_act: Literal["gelu", "relu"] = "gelu"
    """Feed-forward activation (exact erf GELU as in BERT)."""
    text_dropout: float = 0.3
    """Dropout of the text encoder (embeddings, attention probabilities, residual branches)."""
    visual_dropout: float = 0.3
    """Dropout of the visual encoder."""
    audio_dropout: float = 0.1
    """Dropout of the audio encoder."""
    init_std: float = 0.02
    """Std of the normal init of the encoders' linear and embedding weights (BERT)."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (the reference's TF-style LayerNorm uses 1e-12)."""
    text_layers: int = 4
    """Transformer layers of the text encoder."""
    visual_layers: int = 3
    """Transformer layers of the visual encoder."""
    audio_layers: int = 3
    """Transformer layers of the audio encoder."""
    text_max_positions: int = 600
    """Size of the text position table: the longest text the encoder accepts (see text_overflow)."""
    visual_max_positions: int = 1200
    """Size of the visual position table: bounds the aligned visual length."""
    audio_max_positions: int = 1200
    """Size of the audio position table: bounds the aligned audio length."""
    text_overflow: Literal["error", "truncate"] = "error"
    """Text with more real steps than text_max_positions: "error" raises DataError naming the samples;
    "truncate" keeps the first text_max_positions steps and counts the truncated samples
    (CaratOutput.text_truncated, CARAT.text_truncated_total)."""
    ctc_target_length: int | None = 400
    """Aligned length of visual and audio: the number of slots the alignment produces (a historic name: no CTC
    loss is involved, see carat/model/alignment.py). The seed's 400; the authors' code uses 500, or 50 with its
    --unaligned_mask_same_length. None = adaptive length per sample: round(L_in * <modality>_compression_ratio)
    clipped to [min_target_len, max_target_len]. Unused with aligner="none"."""
    visual_compression_ratio: float = 0.333
    """Adaptive alignment: aligned visual slots per raw FACET frame. FACET runs at ~30 Hz, so 1/3 gives
    ~10 slots per second, the same temporal resolution as audio_compression_ratio."""
    audio_compression_ratio: float = 0.1
    """Adaptive alignment: aligned audio slots per raw COVAREP frame. COVAREP runs at 100 Hz, so 0.1 gives
    ~10 slots per second (~4x the word rate of the text); the longest MOSEI audio (10,891 frames) maps to
    1,089 slots, within the 1,200 positions, so nothing is clipped at the top."""
    min_target_len: int = 16
    """Adaptive alignment: fewest aligned slots per sample."""
    max_target_len: int | None = None
    """Adaptive alignment: most aligned slots per sample; None = the modality's max positions. Never above
    visual_max_positions / audio_max_positions. Also sets the LSTM width (max_target_len + 1)."""
    projection_size: int = 64
    """Latent (contrastive / prototype) size z."""
    prototype_momentum: float = 0.99
    """EMA momentum of the positive / negative label prototypes."""
    queue_size: int = 8192
    """Rows in the contrastive memory queue (ring buffer)."""
    queue_init: Literal["empty", "noise"] = "empty"
    """What the queue holds before the batches overwrite it. "empty": rows that SupCon leaves out (carat). "noise":
    the reference's Gaussian noise, normalised per feature column, with ids that match no class: extra
    negatives, and anchors without positives that count in SupCon's mean, so the loss starts at the batch's
    value times n / (n + queue_size) for n batch rows (x0.30 at the seed's sizes) until the noise is
    overwritten (carat/model/memory.py)."""
    threshold: float = 0.2
    """Decision threshold on CARAT.scores for CARAT.predict (metrics may tune their own)."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: torch scaled_dot_product_attention (flash / memory-efficient on GPU) or the
    explicit softmax(QK^T/sqrt(d)+mask)V reference."""
    checkpoint_encoders: tuple[str, ...] = ()
    """Modalities (text, visual, audio) whose encoder layers use activation checkpointing."""
    checkpoint_alignment: tuple[str, ...] = ()
    """Modalities (visual, audio) whose soft alignment (LSTM, softmax, P @ x) uses activation checkpointing."""
    alignment_chunk_frames: int | None = 512
    """Checkpointed alignment: input frames per checkpointed time segment (the LSTM's (h, c) is carried across
    segments, each segment's share of P @ x is accumulated), so backward rebuilds one segment at a time: the
    alignment's activation memory is O(batch x this x LSTM width) instead of O(batch x L_in x width). Same
    outputs as unsegmented. 512 keeps a segment's activations small (B=64, width 401, fp32: ~0.3 GB per LSTM
    layer) while the extra per-segment calls stay few (22 for MOSEI's longest audio). None = the whole
    alignment is one checkpointed block. Unused without checkpoint_alignment."""
    check_inputs: bool = True
    """Validate every batch (feature dims, empty samples, NaN/inf, mask layout): one host sync per batch."""
    standardize_features: bool = False
    """Standardise every raw feature dimension with the train split's mean and std (from the dataset card,
    set by the training code through CARAT.set_feature_stats, saved with the model) before the per-frame
    LayerNorm. The reference only LayerNorms each frame over its feature dimension: with COVAREP/FACET
    magnitudes spanning 0.05-450 that normalisation is dominated by a few large dimensions. False = reference."""
    aligner: Literal["lstm", "pool", "none"] = "lstm"
    """How visual and audio are brought to the aligned length. "lstm": the reference's soft alignment (a
    2-layer LSTM predicts, per frame, a softmax over the slots; aligned = P @ x). Its LSTM outputs are bounded
    to +-1, so the softmax over the slots can never be sharp: measured at init, per-frame slot entropy 0.999 of
    the maximum and aligned slots with cosine 0.999 to each other, i.e. every slot is the same sum over the
    whole clip (BENCHMARKS.md, Learning). "pool": each sample's own frames are cut into its target number of
    contiguous, equal segments and each slot is the mean of one segment (adaptive average pooling per
    sample, no parameters, O(frames)): a local cue stays local and the slot keeps the frames' scale. "none":
    no alignment, every frame is one encoder step (the reference's aligned mode, aligned=True, for corpora
    already aligned to the words); a clip longer than <modality>_max_positions is an error."""
    score_rule: Literal["reference", "with_lsr", "lsr"] = "reference"
    """CARAT.scores: "reference" = (mean over the 3 aggregation rows of sigmoid + sigmoid(out_4)) / 2;
    "with_lsr" also averages in sigmoid(out_1), the classifiers on the label-specific representations Z
    themselves (train it with loss.lsr_clf_weight ~ 1; the reference weighs it 0.01); "lsr" scores with
    sigmoid(out_1) alone (the other heads are still trained by their loss terms; they only leave the decision).
    Measured: trained alone, out_1 reaches validation AUC 0.63-0.68 where out_4 and the aggregation head stay
    at 0.58-0.60."""
    modality_fusion: Literal["max", "sum"] = "max"
    """How the per-label classifiers' three modality logits become one (out_1, out_3, out_4): "max" over
    modalities (reference) sends each (sample, label) gradient to one modality only, so a modality that starts
    behind stays behind; "sum" trains all three on every sample. Measured with an attention-pooling model on a
    1,633-clip corpus: validation AUC 0.62 with max against 0.73 with sum."""
    input_dropout: float = 0.0
    """Dropout on the encoders' inputs (the normalised text frames and the aligned visual/audio slots), i.e.
    on individual raw feature values, during training. The reference has none. Measured on a 1,633-clip
    corpus: even a small model fits the train split (train BCE 0.07) while validation AUC stalls; dropping
    30% of the input values raised a plain attention-pooling model's test AUC from 0.64 to 0.67-0.68."""
    prototype_temperature: float = 1.0
    """Temperature of the prototype similarity softmax over {positive, negative}: sim = softmax(<e, proto> / T).
    The reference has none (T = 1): with unit-norm latents and prototypes the two logits differ by at most ~2
    and, measured, positive-prototype probabilities stay in [0.48, 0.52], so the prototype stand-ins are
    inert. A smaller T makes them choose."""

    def __post_init__(self) -> None:
        self.checkpoint_encoders = tuple(self.checkpoint_encoders)
        self.checkpoint_alignment = tuple(self.checkpoint_alignment)
        for name in ("text_dim", "visual_dim", "audio_dim", "num_classes", "hidden_size", "intermediate_size",
                     "num_heads", "text_layers", "visual_layers", "audio_layers", "text_max_positions",
                     "visual_max_positions", "audio_max_positions", "min_target_len", "projection_size",
                     "queue_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"model.{name}={value!r} must be an integer >= 1")
        _require(self.alignment_chunk_frames is None or (isinstance(self.alignment_chunk_frames, int)
                                                         and self.alignment_chunk_frames >= 1),
                 f"model.alignment_chunk_frames={self.alignment_chunk_frames!r} must be an integer >= 1 "
                 f"(frames per checkpointed alignment segment) or None (one block)")
        _require(self.hidden_size % self.num_heads == 0,
                 f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size} "
                 f"(e.g. num_heads=8 for hidden_size=512)")
        _require(self.hidden_size % 2 == 0,
                 f"model.hidden_size={self.hidden_size} must be even (the projections use hidden_size/2)")
        for name in ("text_dropout", "visual_dropout", "audio_dropout", "input_dropout"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"model.{name}={value} must be in [0, 1)")
        _require(self.init_std > 0, f"model.init_std={self.init_std} must be > 0")
        _require(self.layer_norm_eps > 0, f"model.layer_norm_eps={self.layer_norm_eps} must be > 0")
        _require(0.0 <= self.prototype_momentum < 1.0,
                 f"model.prototype_momentum={self.prototype_momentum} must be in [0, 1)")
        _require(0.0 < self.threshold < 1.0, f"model.threshold={self.threshold} must be in (0, 1)")
        _require(math.isfinite(self.prototype_temperature) and self.prototype_temperature > 0,
                 f"model.prototype_temperature={self.prototype_temperature} must be > 0 (1 = reference)")
        self._check_alignment()
        self._check_choices()

    def _check_alignment(self) -> None:
        if self.aligner == "none":  # no aligned lengths: each modality's max positions bound its frames
            return
        limit = min(self.visual_max_positions, self.audio_max_positions)
        if self.ctc_target_length is not None:
            _require(1 <= self.ctc_target_length <= limit,
                     f"model.ctc_target_length={self.ctc_target_length} must be in [1, {limit}] "
                     f"(min of visual_max_positions and audio_max_positions), or None for adaptive lengths")
        if self.max_target_len is not None:
            _require(self.max_target_len <= limit,
                     f"model.max_target_len={self.max_target_len} must be <= {limit} "
                     f"(min of visual_max_positions and audio_max_positions)")
        top = self.max_target_len if self.max_target_len is not None else limit
        _require(self.min_target_len <= top,
                 f"model.min_target_len={self.min_target_len} must be <= max_target_len={top}")
        for name in ("visual_compression_ratio", "audio_compression_ratio"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, f"model.{name}={value} must be > 0")

    def _check_choices(self) -> None:
        _require(self.hidden_act in ("gelu", "relu"), f"model.hidden_act={self.hidden_act!r}: use gelu or relu")
        _require(self.text_overflow in ("error", "truncate"),
                 f"model.text_overflow={self.text_overflow!r}: use 'error' or 'truncate'")
        _require(self.attention in ("sdpa", "eager"), f"model.attention={self.attention!r}: use 'sdpa' or 'eager'")
        _require(self.score_rule in ("reference", "with_lsr", "lsr"),
                 f"model.score_rule={self.score_rule!r}: use 'reference', 'with_lsr' or 'lsr'")
        _require(self.modality_fusion in ("max", "sum"),
                 f"model.modality_fusion={self.modality_fusion!r}: use 'max' or 'sum'")
        _require(self.queue_init in ("empty", "noise"),
                 f"model.queue_init={self.queue_init!r}: use 'empty' or 'noise'")
        _require(self.aligner in ("lstm", "pool", "none"),
                 f"model.aligner={self.aligner!r}: use 'lstm', 'pool' or 'none'")
        for m in self.checkpoint_encoders:
            _require(m in ENCODED_MODALITIES,
                     f"model.checkpoint_encoders has {m!r}; allowed: {', '.join(ENCODED_MODALITIES)}")
        for m in self.checkpoint_alignment:
            _require(m in ALIGNED_MODALITIES,
                     f"model.checkpoint_alignment has {m!r}; allowed: {', '.join(ALIGNED_MODALITIES)}")

    def alignment_width(self, modality: str) -> int:
        """Aligned slots the LSTM of ``modality`` can emit (its hidden size is this + 1 for the blank)."""
        if self.ctc_target_length is not None:
            return self.ctc_target_length
        limit = getattr(self, f"{modality}_max_positions")
        return min(self.max_target_len, limit) if self.max_target_len is not None else limit


@dataclass
class LossConfig:
    """Weights and constants of the CARAT objective. Defaults = the seed configuration.

    The term names are the reference's: ``lsr`` = label-specific representations (the label-attention
    features Z), ``aug`` = the first-round reconstruction (FRR, which the reference calls the augmented
    features), ``beta`` = the second-round reconstruction (SRR), ``total_aug_clf`` = the aggregation head on the
    three SRR rows, ``shuffle_aug_clf`` = the same head on the sample/modality-shuffled rows, ``cl`` = the
    supervised contrastive term.
    """

    lsr_clf_weight: float = 0.01
    """BCE on the label-specific representations' logits (out_1)."""
    aug_clf_weight: float = 0.1
    """BCE on the first-round reconstruction logits (out_3)."""
    final_clf_weight: float = 1.0
    """BCE on the second-round reconstruction logits (out_4); fixed at 1.0 in the reference."""
    cl_weight: float = 1.0
    """Supervised contrastive term (with the memory queue)."""
    recon_mse_weight: float = 1.0
    """sum over modalities of MSE(de_proj(proj(Z_m)), Z_m)."""
    aug_mse_weight: float = 1.0
    """sum over modalities of MSE(first-round reconstruction, Z_m)."""
    beta_mse_weight: float = 0.0
    """sum over modalities of MSE(second-round reconstruction, Z_m)."""
    total_aug_clf_weight: float = 1.0
    """BCE of the aggregation head on the three SRR rows, each against y."""
    shuffle_aug_clf_weight: float = 0.1
    """BCE of the aggregation head on the sample/modality-shuffled SRR rows."""
    recon_clf_weight: float = 0.0
    """BCE of the per-label classifiers on the reconstructions r_m (the reference parses a weight for it but
    computes no such term: keep 0 for the reference's objective)."""
    detach_recon_targets: bool = False
    """Stop the gradient of the reconstruction MSE terms at their target Z_m. The reference does not, so
    the MSE can also be lowered by moving Z_m towards its reconstructions, and the cheapest way to do that is
    to make every label feature the same constant: measured, at weight 1.0 a small model then sits at the
    label prior. Detached, the reconstructions learn to follow Z and Z is shaped by the classifiers only."""
    pos_weight: tuple[float, ...] = (1.0, 1.1, 1.2, 2.5, 1.3, 3.0)
    """BCE positive-class weight per label (happy, sad, anger, surprise, disgust, fear); all 1.0 = reference."""
    temperature: float = 0.07
    """SupCon temperature."""
    base_temperature: float = 0.07
    """SupCon base temperature (the loss is scaled by temperature / base_temperature)."""

    def __post_init__(self) -> None:
        self.pos_weight = tuple(float(p) for p in self.pos_weight)
        for name in ("lsr_clf_weight", "aug_clf_weight", "final_clf_weight", "cl_weight", "recon_mse_weight",
                     "aug_mse_weight", "beta_mse_weight", "total_aug_clf_weight", "shuffle_aug_clf_weight",
                     "recon_clf_weight"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"loss.{name}={value} must be a finite number >= 0")
        _require(len(self.pos_weight) >= 1 and all(math.isfinite(p) and p > 0 for p in self.pos_weight),
                 f"loss.pos_weight={self.pos_weight} must be positive finite numbers, one per label")
        for name in ("temperature", "base_temperature"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, f"loss.{name}={value} must be > 0")


REFERENCE_MODEL: dict[str, object] = {
    "aligner": "lstm",
    "standardize_features": False,
    "modality_fusion": "max",
    "score_rule": "reference",
    "prototype_temperature": 1.0,
    "input_dropout": 0.0,
    "queue_init": "noise",
}
"""The behaviour of the authors' published model, every ModelConfig option that has a carat alternative set to
the reference's choice (all are the defaults except queue_init). For the reference's aligned mode set
``aligner="none"``. What no option restores (padding is masked) is listed in the README, "How carat differs from
the published code"."""

REFERENCE_LOSS: dict[str, object] = {
    "pos_weight": (1.0,) * 6,
    "detach_recon_targets": False,
    "recon_clf_weight": 0.0,
    "final_clf_weight": 1.0,
}
"""The authors' published objective's form: no per-class positive weights, reconstruction targets not detached,
no recon_clf term, out_4's BCE at weight 1. The other term weights are numbers of a configuration, not of the
form (the seed's and the official preset's are in carat.config)."""


LEARNING_FIX_MODEL: dict[str, object] = {
    "aligner": "pool",
    "standardize_features": True,
    "modality_fusion": "sum",
    "input_dropout": 0.3,
    "prototype_temperature": 0.1,
    "score_rule": "with_lsr",
}
"""carat's measured changes to the reference model (each field's docstring says what was measured; the full
table is in BENCHMARKS.md, Learning). Used by the tiny and small presets; the seed and official presets keep the
reference's behaviour (:data:`REFERENCE_MODEL`)."""

LEARNING_FIX_LOSS: dict[str, object] = {"detach_recon_targets": True, "cl_weight": 0.1, "lsr_clf_weight": 1.0}
"""carat's measured changes to the reference objective: reconstruction targets detached, SupCon at 0.1 (its
gradient on the encoders is ~30x a BCE term's at init, so under global clipping at 1.0 it sets the direction
of almost every early step), and the classifiers on the label features Z trained at full weight (they are
part of the score with score_rule="with_lsr")."""

TINY_MODEL_SIZE: dict[str, object] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "text_layers": 1,
    "visual_layers": 1,
    "audio_layers": 1,
    "text_max_positions": 400,
    "visual_max_positions": 64,
    "audio_max_positions": 64,
    "ctc_target_length": 8,
    "min_target_len": 4,
    "projection_size": 8,
    "queue_size": 256,
}
"""The size of the "tiny" preset's model: ~5-14k parameters per encoder (most of the text one is its 300->16
input layer and 400x16 position table, long enough for any CMU-MOSEI text: 374 steps), 8 aligned slots, a
256-row queue. The model tests build it with the reference behaviour (no learning fixes)."""

TINY_ADAPTIVE_SLOTS: dict[str, object] = {"ctc_target_length": None, "visual_max_positions": 256,
                                          "audio_max_positions": 256, "visual_compression_ratio": 1.0,
                                          "audio_compression_ratio": 1.0}
"""Adaptive aligned lengths at one slot per frame (longer clips are pooled to the 256 positions). The seed's
ratios (1/3 of FACET's and 1/10 of COVAREP's frames, ~10 slots per second) are in units of real frame rates;
the tiny preset is for corpora synthesized with ``synth.length_scale`` 0.1 or less (the quickstart's), where
one frame already stands for a tenth of a second or more, so ~10 slots per second of real time is one slot per
frame. Measured through the real loop (BENCHMARKS.md, Learning, 2026-12-03, second part): on a 3,265-clip
corpus at length_scale 0.025, test macro-AUC 0.794 with one slot per frame against 0.696 with the seed's
ratios (the pooled floor: 0.735); 8 fixed slots before that did worse still on the five bench corpora."""

SLOTS_PER_SECOND: float = 10.0
"""The seed's aligned temporal resolution in real time: its compression ratios (1/3 of FACET's 30 Hz, 1/10 of
COVAREP's 100 Hz) both give ~10 aligned slots per second of speech."""


def slots_per_second_ratios(visual_hz: float, audio_hz: float, length_scale: float) -> dict[str, float]:
    """``visual_compression_ratio`` and ``audio_compression_ratio`` that keep :data:`SLOTS_PER_SECOND` on a corpus
    whose sequences were shrunk by ``length_scale`` (a frame then stands for 1 / length_scale as much time), at
    most one slot per frame. At length_scale 1 these are the seed's ratios; at the quickstart's 0.025 both are 1
    (TINY_ADAPTIVE_SLOTS); at the small preset's 0.25, visual 1 and audio 0.4."""
    _require(length_scale > 0 and visual_hz > 0 and audio_hz > 0,
             f"frame rates and length_scale must be > 0; got {visual_hz}, {audio_hz}, {length_scale}")
    return {f"{modality}_compression_ratio": min(1.0, SLOTS_PER_SECOND / (hz * length_scale))
            for modality, hz in (("visual", visual_hz), ("audio", audio_hz))}


TINY_MODEL_OVERRIDES: dict[str, object] = {**TINY_MODEL_SIZE, **LEARNING_FIX_MODEL, **TINY_ADAPTIVE_SLOTS}
"""The "tiny" preset of ModelConfig: the tiny size with carat's learning fixes and adaptive aligned lengths."""

TINY_LOSS_OVERRIDES: dict[str, object] = {"recon_mse_weight": 0.1, "aug_mse_weight": 0.1, **LEARNING_FIX_LOSS}
"""The "tiny" preset of LossConfig: the seed objective with the two reconstruction MSE terms at 0.1. Measured on
a strong-signal synthetic corpus (where pooled logistic regression reaches test micro-F1 0.98): at weight 1.0
the MSE terms, reachable by making every label feature Z the same constant, win against the classifiers in a
16-wide model, and it stays at the label prior (valid micro-F1 0.44) at lr 1e-3 and 3e-4 alike; at 0.1
it learns (0.57 after 4 epochs). The seed keeps 1.0 (the authors' train.sh value too)."""


def check_pos_weight(loss: LossConfig, model: ModelConfig) -> None:
    """loss.pos_weight needs one value per label of the model."""
    if len(loss.pos_weight) != model.num_classes:
        raise ConfigError(f"loss.pos_weight has {len(loss.pos_weight)} values; model.num_classes="
                          f"{model.num_classes} needs one per label")
