"""CARAT: ContrAstive feature Reconstruction and AggregaTion for multi-modal multi-label emotion recognition
(Peng et al., AAAI 2024, arXiv 2312.10201; reference code github.com/chengzju/CARAT), as fixed in the project's
design note (carat-model.md). Configured as the reference (carat.model.config.REFERENCE_MODEL / REFERENCE_LOSS),
it reproduces the authors' code's outputs, losses, gradients and memory update to float32 precision
(tests/test_reference_parity.py, on numbers saved from their code).

Forward: LayerNorm per modality -> soft alignment of visual and audio -> three BERT encoders -> label attention
(Z_m [B, C, d]) -> latent projection e_m and decode r_m -> prototypes P_m -> first-round (FRR) and second-round
(SRR) cross-modal reconstruction -> per-label classifiers (max over modalities) and the aggregation head.
Training adds the 9-stage contrastive stack and the shuffle augmentation; ``update_memory`` then moves the
prototypes and the queue.

Where carat deliberately differs from the published code (the README's "How carat differs from the published
code" lists each with the option that restores the reference):
- Masking: padded frames never matter. The alignment LSTM runs packed, P has zero columns for padded frames,
  aligned slots beyond a sample's own target are masked; encoders and label attention mask padding with the
  most negative finite number (never -inf, so no NaN). A sample's eval outputs do not depend on its batch.
- Alignment length: fixed ``ctc_target_length`` (the seed's 400; the authors' code uses 500, or 50 with its
  --unaligned_mask_same_length) or adaptive per sample (see alignment.py). ``aligner="none"`` is the reference's
  aligned mode (no alignment module).
- Long text: more real steps than ``text_max_positions`` is an explicit error or a counted truncation.
- Queue init: random unit rows with id -1 that match nothing and are left out of SupCon (memory.py);
  ``queue_init="noise"`` is the reference's noise.
- Vectorised exact state updates: the prototype EMA in closed form (equal to the reference's loop) and the
  shuffle augmentation by argsort of random numbers (same distribution as its numpy permutation loops); the
  queue is a ring buffer that also handles more rows than its size.
- Distributed: prototypes and queue are updated from features gathered across ranks (``update_memory``).
- Loss: per-class pos_weight (all 1 in the reference) and per-sample weights (losses.py); SupCon computed in
  float32, in anchor chunks under checkpointing (same value, O(chunk x N) instead of O(N^2) memory for the
  8,192-row queue).
- Prototypes and queue stay float32 when the model is cast to bf16 (an EMA at momentum 0.99 needs it).
- Not here but in other parts: coef_lr is applied to the encoders (optimizer side, by the ``*_encoder`` name
  prefixes); the Jaccard accuracy of an empty-vs-empty sample is 1 (metrics side).
- The threshold (``ModelConfig.threshold``: the seed's 0.2; the authors' 0.35 by default, 0.25 in their script)
  is applied by ``predict`` and the metrics with one rule: float32 score > float32 threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from carat.errors import DataError
from carat.model.alignment import NoAlignment, SegmentPooling, SoftAlignment
from carat.model.config import ModelConfig
from carat.model.encoder import ModalityEncoder
from carat.model.heads import CrossModalReconstruction, LabelAttention, LabelClassifiers, ProjectionMLP
from carat.model.inputs import check_shapes, check_values
from carat.model.losses import NUM_STAGES, contrastive_class_ids
from carat.model.memory import ContrastiveQueue, FeatureStandardizer, LabelPrototypes

MODALITY_ORDER: tuple[str, ...] = ("text", "visual", "audio")
"""Order of the modality axis (size 3) of every stacked output."""


@dataclass
class CaratOutput:
    """Everything the losses, the memory update and the score rule need. Stacks over modalities are in
    text, visual, audio order; B batch, C labels, d hidden size, z projection size."""

    lsr_logits: torch.Tensor
    """[B, C] out_1: classifiers on the label-specific representations Z, max over modalities."""
    frr_logits: torch.Tensor
    """[B, C] out_3: classifiers on the first-round reconstructions, max over modalities."""
    srr_logits: torch.Tensor
    """[B, C] out_4: classifiers on the second-round reconstructions, max over modalities."""
    recon_logits: torch.Tensor
    """[B, C] classifiers on the decoded latents r_m, max over modalities (recon_clf term)."""
    agg_logits: torch.Tensor
    """[B, 3, C] aggregation head on the SRR stack, one row per modality slot."""
    label_features: torch.Tensor
    """[B, 3, C, d] Z_m, the label-specific representations."""
    latent: torch.Tensor
    """[B, 3, C, z] e_m = proj_m(Z_m)."""
    recon: torch.Tensor
    """[B, 3, C, d] r_m = de_proj_m(e_m)."""
    frr: torch.Tensor
    """[B, 3, C, d] first-round reconstructions T', V', A'."""
    srr: torch.Tensor
    """[B, 3, C, d] second-round reconstructions T'', V'', A''."""
    prototype_similarity: torch.Tensor
    """[B, 3, C, 2] softmax over (positive, negative) prototype of <normalize(e_m), prototype>."""
    pooled: torch.Tensor
    """[B, 3, d] encoder poolers (computed as in the reference, unused by the losses)."""
    visual_slot_mask: torch.Tensor
    """[B, T_v] bool: aligned visual slots that belong to the sample."""
    audio_slot_mask: torch.Tensor
    """[B, T_a] bool: aligned audio slots that belong to the sample."""
    text_truncated: int
    """Samples of this batch whose text was truncated (text_overflow="truncate")."""
    contrast_features: torch.Tensor | None = None
    """Training only: [B, 9, C, z] un-normalised rows e_t, e_v, e_a, proj_m(FRR_m), proj_m(SRR_m)."""
    shuffled_agg_logits: torch.Tensor | None = None
    """Training only: [B, 3, C] aggregation head on the shuffled SRR stack."""
    shuffle_sample_index: torch.Tensor | None = None
    """Training only: [B, 3, C] long, the source sample of each shuffled element (its target's sample)."""


def shuffle_indices(batch: int, num_classes: int, device: torch.device,
                    real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (sample, modality) source of every element of the [B, 3, C] aggregation stack.

    sample[b, m, c] = perm_{c,m}(b) (one sample permutation per label and slot); modality[b, m, c] =
    perm'_{c,b}(m) (one modality permutation per label and destination sample), as the reference's loops, each
    permutation drawn as the argsort of uniform numbers. With ``real`` [B] bool, real samples are permuted
    among themselves and filler samples stay in place.
    """
    sample_keys = torch.rand(num_classes, 3, batch, device=device)
    modality = torch.rand(num_classes, batch, 3, device=device).argsort(dim=-1).permute(1, 2, 0)
    if real is None:
        return sample_keys.argsort(dim=-1).permute(2, 1, 0), modality
    order = torch.arange(batch, device=device)
    # Fillers get keys > 1, so the sorted order lists a random permutation of the real samples first...
    sample_keys = torch.where(real, sample_keys, 2.0 + order.to(sample_keys.dtype))
    sources = sample_keys.argsort(dim=-1)
    # ...which is written to the real positions (ascending), fillers to their own positions.
    destinations = torch.where(real, order, batch + order).argsort().expand_as(sources)
    sample = torch.empty_like(sources).scatter_(-1, destinations, sources)
    return sample.permute(2, 1, 0), modality


class CARAT(nn.Module):
    """The CARAT network; build with :meth:`from_config`. See the module docstring for the forward pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_classes = cfg.num_classes
        self.threshold = cfg.threshold
        self.check_inputs = cfg.check_inputs
        self.text_overflow = cfg.text_overflow
        self.text_max_positions = cfg.text_max_positions
        self.feature_dims = {"text": cfg.text_dim, "visual": cfg.visual_dim, "audio": cfg.audio_dim}
        self.text_truncated_total = 0
        d, z, c = cfg.hidden_size, cfg.projection_size, cfg.num_classes
        self.standardize_features = cfg.standardize_features
        self.input_dropout = cfg.input_dropout
        self.modality_fusion = cfg.modality_fusion
        self.score_rule = cfg.score_rule
        for m in MODALITY_ORDER:
            if cfg.standardize_features:
                self.add_module(f"{m}_standardize", FeatureStandardizer(self.feature_dims[m]))
            norm = nn.LayerNorm(self.feature_dims[m], eps=cfg.layer_norm_eps)
            self.add_module(f"{m}_norm", norm)
        for m in ("visual", "audio"):
            self.add_module(f"{m}_align", self._build_aligner(cfg, m))
        for m in MODALITY_ORDER:
            self.add_module(f"{m}_encoder", ModalityEncoder(
                self.feature_dims[m], d, cfg.intermediate_size, cfg.num_heads, getattr(cfg, f"{m}_layers"),
                getattr(cfg, f"{m}_max_positions"), getattr(cfg, f"{m}_dropout"), eps=cfg.layer_norm_eps,
                activation=cfg.hidden_act, kernel=cfg.attention, init_std=cfg.init_std,
                checkpoint_layers=m in cfg.checkpoint_encoders))
        for m in MODALITY_ORDER:
            self.add_module(f"{m}_attention", LabelAttention(d, c))
            self.add_module(f"{m}_proj", ProjectionMLP(d, d // 2, z))
            self.add_module(f"{m}_deproj", ProjectionMLP(z, d // 2, d))
            self.add_module(f"{m}_protos", LabelPrototypes(c, z, cfg.prototype_momentum,
                                                           cfg.prototype_temperature))
        self.reconstruct = CrossModalReconstruction(d)
        self.classifiers = LabelClassifiers(d, c)
        self.agg = ProjectionMLP(c * d, d, c)
        self.queue = ContrastiveQueue(cfg.queue_size, z, cfg.queue_init)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "CARAT":
        """Build the network from its config (the one place the config is unpacked)."""
        return cls(cfg)

    def _build_aligner(self, cfg: ModelConfig, m: str) -> nn.Module:
        common = dict(fixed_target=cfg.ctc_target_length, compression_ratio=getattr(cfg, f"{m}_compression_ratio"),
                      min_target_len=cfg.min_target_len)
        if cfg.aligner == "none":
            return NoAlignment(getattr(cfg, f"{m}_max_positions"), m)
        if cfg.aligner == "pool":
            return SegmentPooling(cfg.alignment_width(m), **common)
        return SoftAlignment(self.feature_dims[m], cfg.alignment_width(m), **common,
                             checkpointed=m in cfg.checkpoint_alignment, chunk_frames=cfg.alignment_chunk_frames)

    def set_feature_stats(self, stats: dict[str, tuple[object, object]]) -> None:
        """Per-dimension (mean, std) of the train split for each modality (model.standardize_features)."""
        if not self.standardize_features:
            raise ValueError("set_feature_stats needs model.standardize_features=true")
        for m in MODALITY_ORDER:
            if m not in stats:
                raise DataError(f"feature statistics lack the {m} modality")
            mean, std = stats[m]
            getattr(self, f"{m}_standardize").set_stats(mean, std, name=m)

    def diagnostics(self) -> dict[str, float]:
        """Cheap numbers about the last training batch for the logs: the LSTM alignment's normalised slot
        entropy per modality (1.0 = uniform: every aligned slot the same sum of the whole clip)."""
        out = {}
        for m in ("visual", "audio"):
            aligner = getattr(self, f"{m}_align")
            entropy = aligner.mean_entropy() if isinstance(aligner, SoftAlignment) else None
            if entropy is not None:
                out[f"align/{m}_entropy"] = entropy
        return out

    def _normalize_inputs(self, m: str, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.standardize_features:
            frames = getattr(self, f"{m}_standardize")(frames, mask)
        return getattr(self, f"{m}_norm")(frames)

    def _modules_of(self, kind: str) -> list[nn.Module]:
        return [getattr(self, f"{m}_{kind}") for m in MODALITY_ORDER]

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor,
                visual_mask: torch.Tensor, audio: torch.Tensor, audio_mask: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> CaratOutput:
        """Masks are bool [B, L], True = real frame. ``sample_weight`` (optional, [B]) only keeps filler samples
        (weight 0) out of the training-time shuffle augmentation."""
        self._validate(text, text_mask, visual, visual_mask, audio, audio_mask)
        text, text_mask, truncated = self._fit_text(text, text_mask)
        visual, visual_slots = self.visual_align(self._normalize_inputs("visual", visual, visual_mask), visual_mask)
        audio, audio_slots = self.audio_align(self._normalize_inputs("audio", audio, audio_mask), audio_mask)
        frames = (self._normalize_inputs("text", text, text_mask), visual, audio)
        if self.input_dropout > 0:  # zero stays zero, so padding is unaffected
            frames = tuple(F.dropout(x, self.input_dropout, self.training) for x in frames)
        masks = (text_mask, visual_slots, audio_slots)
        encoded = [enc(x, mask) for enc, x, mask in zip(self._modules_of("encoder"), frames, masks)]
        label_features = [att(h, mask) for att, (h, _), mask in zip(self._modules_of("attention"), encoded, masks)]
        out = self._heads(label_features)
        out.update(pooled=torch.stack([pooled for _, pooled in encoded], dim=1), visual_slot_mask=visual_slots,
                   audio_slot_mask=audio_slots, text_truncated=truncated)
        if self.training:
            out.update(self._training_extras(out, sample_weight))
        return CaratOutput(**out)

    def _heads(self, label_features: list[torch.Tensor]) -> dict:
        """Everything after label attention: latents, prototypes, FRR, SRR, classifiers, aggregation."""
        latent = [proj(zm) for proj, zm in zip(self._modules_of("proj"), label_features)]
        recon = [deproj(e) for deproj, e in zip(self._modules_of("deproj"), latent)]
        similarity = [protos.similarity(F.normalize(e, dim=-1)) for protos, e in zip(self._modules_of("protos"),
                                                                                       latent)]
        stand_ins = [deproj(protos.stand_in(sim, hard=not self.training)) for deproj, protos, sim
                     in zip(self._modules_of("deproj"), self._modules_of("protos"), similarity)]
        frr = self.reconstruct(*recon, *stand_ins)
        srr = self.reconstruct(*frr, *frr)
        stacks = {name: torch.stack(list(x), dim=1) for name, x in
                  (("label_features", label_features), ("latent", latent), ("recon", recon), ("frr", frr),
                   ("srr", srr), ("prototype_similarity", similarity))}
        logits = {f"{name}_logits": self._fuse(self.classifiers(stacks[key])) for name, key in
                  (("lsr", "label_features"), ("frr", "frr"), ("srr", "srr"), ("recon", "recon"))}
        return {**stacks, **logits, "agg_logits": self._aggregate(stacks["srr"])}

    def _fuse(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, 3, C] per-modality classifier logits -> [B, C] (model.modality_fusion)."""
        return logits.amax(dim=1) if self.modality_fusion == "max" else logits.sum(dim=1)

    def _aggregate(self, stack: torch.Tensor) -> torch.Tensor:
        """agg over [B, 3, C, d] -> [B, 3, C]: each slot's C label vectors concatenated (C*d) -> d -> C."""
        return self.agg(stack.flatten(2))

    def _training_extras(self, out: dict, sample_weight: torch.Tensor | None) -> dict:
        """The contrastive stack and the shuffle augmentation (training mode only)."""
        projections = self._modules_of("proj")
        frr, srr = out["frr"], out["srr"]
        contrast = [out["latent"][:, m] for m in range(3)]
        contrast += [projections[m](frr[:, m]) for m in range(3)]
        contrast += [projections[m](srr[:, m]) for m in range(3)]
        batch = srr.shape[0]
        real = None if sample_weight is None else sample_weight.to(srr.device) > 0
        sample, modality = shuffle_indices(batch, self.num_classes, srr.device, real)
        label = torch.arange(self.num_classes, device=srr.device)[None, None, :]
        shuffled = srr[sample, modality, label]  # [B, 3, C, d]
        return {"contrast_features": torch.stack(contrast, dim=1), "shuffled_agg_logits": self._aggregate(shuffled),
                "shuffle_sample_index": sample}

    # ------------------------------------------------------------------------------------------------ inputs
    def _validate(self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor,
                  visual_mask: torch.Tensor, audio: torch.Tensor, audio_mask: torch.Tensor) -> None:
        inputs = {"text": (text, text_mask), "visual": (visual, visual_mask), "audio": (audio, audio_mask)}
        batch = text.shape[0] if text.dim() >= 1 else -1
        for name, (frames, mask) in inputs.items():
            check_shapes(name, frames, mask, self.feature_dims[name], batch)
        if self.check_inputs:
            check_values(inputs)

    def _fit_text(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Bound the text to text_max_positions: cut padding freely; real steps by the overflow policy."""
        limit = self.text_max_positions
        if text.shape[1] <= limit:
            return text, mask, 0
        lengths = mask.sum(dim=1)
        over = torch.nonzero(lengths > limit).flatten().tolist()
        if over and self.text_overflow == "error":
            raise DataError(f"text: batch index {over} has {lengths[over].tolist()} real steps, more than "
                            f"model.text_max_positions={limit}; raise it or set model.text_overflow='truncate'")
        self.text_truncated_total += len(over)
        return text[:, :limit], mask[:, :limit], len(over)

    # ---------------------------------------------------------------------------------------- scores, memory
    def scores(self, out: CaratOutput) -> torch.Tensor:
        """[B, C] probabilities: (mean over the 3 aggregation rows of sigmoid + sigmoid(out_4)) / 2.
        In eval mode ``out`` was computed with the hard prototype choice."""
        if self.score_rule == "lsr":
            return torch.sigmoid(out.lsr_logits.float())
        heads = [torch.sigmoid(out.agg_logits.float()).mean(dim=1), torch.sigmoid(out.srr_logits.float())]
        if self.score_rule == "with_lsr":
            heads.append(torch.sigmoid(out.lsr_logits.float()))
        return sum(heads) / len(heads)

    def predict(self, out: CaratOutput) -> torch.Tensor:
        """[B, C] bool: scores above ``ModelConfig.threshold``, compared in float32 (the rule carat.metrics'
        ``above_threshold`` applies to saved scores, and the authors' code's)."""
        return self.scores(out).float() > torch.tensor(self.threshold, dtype=torch.float32)

    @torch.no_grad()
    def update_memory(self, out: CaratOutput, labels: torch.Tensor,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      sample_weight: torch.Tensor | None = None) -> None:
        """Prototype EMA and queue enqueue from this step's features on all ranks (training, after the loss).

        One call of ``gather`` (concatenate along dim 0 across ranks; rows may differ per rank; identity when
        None) on a [B, 9*C*z + C + 1] tensor packing the normalised contrastive rows, the labels and the sample
        weights, so every rank applies the same update in the same (rank-major) order. Samples of weight 0 are
        neither enqueued nor used by the prototypes.
        """
        if out.contrast_features is None:
            raise ValueError("update_memory needs a training-mode CaratOutput (model.train() before forward)")
        batch, stages, classes, size = out.contrast_features.shape
        rows = F.normalize(out.contrast_features.detach().float(), dim=-1).reshape(batch, -1)
        weight = torch.ones(batch, device=rows.device) if sample_weight is None \
            else sample_weight.to(rows.device, torch.float32)
        packed = torch.cat([rows, labels.to(rows.device, torch.float32), weight[:, None]], dim=1)
        if gather is not None:
            packed = gather(packed)
        keep = packed[:, -1] > 0
        features = packed[keep, : stages * classes * size].reshape(-1, stages, classes, size)
        all_labels = packed[keep, stages * classes * size: -1]
        for m, protos in enumerate(self._modules_of("protos")):
            protos.update(features[:, m], all_labels)
        ids = contrastive_class_ids(all_labels, NUM_STAGES)
        self.queue.enqueue(features.reshape(-1, size), ids.reshape(-1))
