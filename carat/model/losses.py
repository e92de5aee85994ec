"""The CARAT objective (Peng et al., AAAI 2024): BCE classification terms, reconstruction MSEs, aggregation
BCEs and a supervised contrastive term (SupCon, Khosla et al., NeurIPS 2020) over latent rows plus a memory
queue. ``CaratLoss`` returns every term separately and their weighted sum as ``"total"``.

carat differences from the reference: BCE has a per-class ``pos_weight`` (all 1.0 = reference); a per-sample
``sample_weight`` (0 for filler samples) removes samples from every term (weighted means; SupCon drops their
rows); empty queue rows (id -1) are neither anchors nor contrast rows (the reference's initial noise rows, id -2
with model.queue_init="noise", are both, without positives); SupCon runs in float32 even under
autocast (a 0.07 temperature amplifies bf16 rounding of the similarities 14x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from carat.model.config import LossConfig, ModelConfig, check_pos_weight
from carat.model.memory import EMPTY_ID

TERMS: tuple[str, ...] = ("lsr_clf", "aug_clf", "final_clf", "supcon", "recon_mse", "aug_mse", "beta_mse",
                          "total_aug_clf", "shuffle_aug_clf", "recon_clf")
"""Names of the loss terms, as reported (each also has a ``<name>_weight`` in LossConfig, supcon's is cl_weight)."""

NUM_STAGES = 9
"""Latent rows per (sample, label) in the contrastive stack: e_t, e_v, e_a, then proj of FRR and SRR (t, v, a)."""


def contrastive_class_ids(labels: torch.Tensor, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Class id of every contrastive row: labels [B, C] -> ids [B, num_stages, C].

    Stage s belongs to modality m = s mod 3; id = c + C * (2m + (0 if label c present else 1)), i.e. 6C
    classes (same modality, label and polarity), as the reference's ``get_cl_labels``.
    """
    num_classes = labels.shape[1]
    absent = (labels < 0.5).long()  # [B, C]
    modality = torch.arange(num_stages, device=labels.device) % 3  # [S]
    label = torch.arange(num_classes, device=labels.device)  # [C]
    return label[None, None, :] + num_classes * (2 * modality[None, :, None] + absent[:, None, :])


def supcon_loss(features: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, temperature: float,
                base_temperature: float, chunk_rows: int = 2048, num_ids: int | None = None) -> torch.Tensor:
    """Supervised contrastive loss with every valid row as an anchor (the reference's ``SupConLoss`` with
    ``batch_size = N``): features [N, z] L2-normalised, ids [N] (a negative id, EMPTY_ID or NOISE_ID, matches
    nothing), valid [N] bool.

    For anchor i over the contrast set A(i) = {valid j != i} and positives P(i) = {j in A(i): id_j = id_i}:
    loss_i = -(T / T_base) * mean_{p in P(i)} log( exp(s_ip / T) / sum_{a in A(i)} exp(s_ia / T) ),
    0 when P(i) is empty; the result is the mean over valid anchors (0 if there are none).

    Written as mean_p s_ip / T - logsumexp_a s_ia / T, with the positives' sum taken through per-class sums of
    the features (s_i . sum_{p in P(i)} f_p = s_i . (class sum of id_i) - s_i . f_i): only the similarity row
    and its log-sum-exp are N wide. The element-wise form with N x N masks spent ~30% of a tiny-preset training
    step here (BENCHMARKS.md, Performance, CPU, 2026-12-03).

    Anchors are processed ``chunk_rows`` at a time, each chunk under activation checkpointing when gradients
    are on: the seed's 8,192-row queue plus 64 x 54 batch rows makes N ~ 11,600, and the N x N similarity and
    exp matrices (~0.5 GB each) would otherwise both be kept for the backward pass.
    """
    features = features.float()
    n = features.shape[0]
    class_sum, class_count = _positive_class_sums(features, ids, valid, num_ids)
    total = features.new_zeros(())
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        args = (features, ids, valid, class_sum, class_count, start, stop, temperature, base_temperature)
        if torch.is_grad_enabled() and features.requires_grad and n > chunk_rows:
            part = checkpoint(_supcon_anchor_sum, *args, use_reentrant=False)
        else:
            part = _supcon_anchor_sum(*args)
        total = total + part
    return total / valid.sum().clamp_min(1)


_MASKED_LOGIT = -1e9
"""Logit of an excluded contrast entry (self, invalid rows): exp() of it is exactly 0 next to any real logit
(|s/T| <= 1/T), and unlike -inf a row with nothing left in it stays finite in value and gradient."""


def _positive_class_sums(features: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                         num_ids: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per contrastive class: the sum of its valid rows' features [K, z] and their count [K]; row 0 of each
    collects the negative ids (EMPTY_ID, NOISE_ID; ids are shifted by one), which never count as positives.
    ``num_ids`` (ids lie in 0..num_ids-1) fixes K without reading ``ids.max()``: on a GPU that read is a host
    sync every step."""
    slot = (ids.long() - EMPTY_ID).clamp_min(0)
    member = (valid & (ids >= 0)).to(features.dtype)
    if num_ids is not None:
        num_slots = num_ids - EMPTY_ID
    else:
        num_slots = int(slot.max().item()) + 1 if slot.numel() else 1
    class_sum = features.new_zeros(num_slots, features.shape[1]).index_add(0, slot, features * member[:, None])
    class_count = member.new_zeros(num_slots).index_add(0, slot, member)
    return class_sum, class_count


def _supcon_anchor_sum(features: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, class_sum: torch.Tensor,
                       class_count: torch.Tensor, start: int, stop: int, temperature: float,
                       base_temperature: float) -> torch.Tensor:
    """Sum of the SupCon loss of the valid anchors start..stop-1 (see :func:`supcon_loss`)."""
    anchors = features[start:stop] / temperature
    column_mask = torch.where(valid, 0.0, _MASKED_LOGIT).to(features.dtype)
    logits = torch.addmm(column_mask, anchors, features.T)
    rows = torch.arange(stop - start, device=features.device)
    logits[rows, rows + start] = _MASKED_LOGIT  # an anchor is not in its own contrast set
    # logsumexp by hand: autograd then keeps exp()'s output for backward instead of recomputing it (measured
    # 1.5x faster than torch.logsumexp's forward + backward at the tiny preset's N ~ 1,100).
    row_max = logits.detach().amax(dim=1, keepdim=True)
    log_denominator = row_max.squeeze(1) + (logits - row_max).exp().sum(dim=1).log()
    anchor_ids = ids[start:stop]
    is_member = valid[start:stop] & (anchor_ids >= 0)
    slot = (anchor_ids.long() - EMPTY_ID).clamp_min(0)
    self_logit = (anchors * features[start:stop]).sum(dim=1)
    positive_logit_sum = (anchors * class_sum[slot]).sum(dim=1) - torch.where(is_member, self_logit, 0.0)
    num_positive = class_count[slot] - is_member.to(features.dtype)
    has_positive = is_member & (num_positive > 0.5)
    mean_log_prob_pos = positive_logit_sum / num_positive.clamp_min(1.0) - log_denominator
    per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
    return torch.where(has_positive, per_anchor, 0.0).sum()


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                 pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits (per-class pos_weight on the last dim) with each element weighted by ``weights``
    (broadcast to the logits' shape); elements of weight 0 do not count in the mean."""
    per_element = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none",
                                                     pos_weight=pos_weight.to(logits.device, torch.float32))
    weights = weights.float().expand_as(per_element)
    return (per_element * weights).sum() / weights.sum().clamp_min(1e-12)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error over [B, ...] with each sample weighted (the reference's MSELoss when all are 1)."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    weight = sample_weight.float()
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-12)


def _modality_mse_sum(prediction: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor) -> torch.Tensor:
    """sum over the 3 modalities of MSE(prediction[:, m], target[:, m]) for [B, 3, C, d] stacks."""
    return sum(weighted_mse(prediction[:, m], target[:, m], sample_weight) for m in range(prediction.shape[1]))


def _base_model(model: nn.Module) -> nn.Module:
    """The CARAT module itself, also when wrapped (DeepSpeed engine / DDP keep it in ``.module``)."""
    return model if hasattr(model, "queue") else model.module


class CaratLoss(nn.Module):
    """The weighted sum of CARAT's ten terms; call ``loss_fn(model, out, labels, sample_weight=None)``.

    Returns a dict with every term of :data:`TERMS` (unweighted, as float32 scalars) and ``"total"``. Terms that
    need training-mode outputs (supcon, shuffle_aug_clf) are 0 for an evaluation-mode output.
    """

    def __init__(self, *, pos_weight: Sequence[float], term_weights: dict[str, float], temperature: float,
                 base_temperature: float, detach_recon_targets: bool = False) -> None:
        super().__init__()
        self.detach_recon_targets = detach_recon_targets
        missing = set(TERMS) - set(term_weights)
        if missing:
            raise ValueError(f"term_weights lacks {sorted(missing)}")
        self.term_weights = dict(term_weights)
        self.temperature = temperature
        self.base_temperature = base_temperature
        self.register_buffer("pos_weight", torch.tensor(list(pos_weight), dtype=torch.float32), persistent=False)

    @classmethod
    def from_config(cls, loss_cfg: LossConfig, model_cfg: ModelConfig) -> "CaratLoss":
        """Unpack the configs; checks that pos_weight has one value per label."""
        check_pos_weight(loss_cfg, model_cfg)
        weights = {term: getattr(loss_cfg, f"{term}_weight") for term in TERMS if term != "supcon"}
        weights["supcon"] = loss_cfg.cl_weight
        return cls(pos_weight=loss_cfg.pos_weight, term_weights=weights, temperature=loss_cfg.temperature,
                   base_temperature=loss_cfg.base_temperature, detach_recon_targets=loss_cfg.detach_recon_targets)

    def forward(self, model: nn.Module, out: "CaratOutput", labels: torch.Tensor,  # noqa: F821
                sample_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        labels = labels.float()
        weight = torch.ones(labels.shape[0], device=labels.device) if sample_weight is None \
            else sample_weight.to(labels.device, torch.float32)
        terms = self._classification_terms(out, labels, weight)
        terms.update(self._reconstruction_terms(out, weight))
        terms["supcon"] = self._supcon_term(_base_model(model), out, labels, weight)
        total = sum(self.term_weights[name] * terms[name] for name in TERMS)
        return {**{name: terms[name] for name in TERMS}, "total": total}

    def _classification_terms(self, out, labels: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        per_sample = weight[:, None]
        terms = {
            "lsr_clf": weighted_bce(out.lsr_logits, labels, per_sample, self.pos_weight),
            "aug_clf": weighted_bce(out.frr_logits, labels, per_sample, self.pos_weight),
            "final_clf": weighted_bce(out.srr_logits, labels, per_sample, self.pos_weight),
            "recon_clf": weighted_bce(out.recon_logits, labels, per_sample, self.pos_weight),
            "total_aug_clf": weighted_bce(out.agg_logits, labels[:, None, :].expand_as(out.agg_logits),
                                          weight[:, None, None], self.pos_weight),
        }
        if out.shuffle_sample_index is None:
            terms["shuffle_aug_clf"] = out.agg_logits.new_zeros((), dtype=torch.float32)
        else:
            # Element (b, slot, c) of the shuffled stack carries label c of sample shuffle_sample_index[b, slot, c].
            index = out.shuffle_sample_index
            label_index = torch.arange(labels.shape[1], device=labels.device)[None, None, :]
            terms["shuffle_aug_clf"] = weighted_bce(out.shuffled_agg_logits, labels[index, label_index],
                                                    weight[index], self.pos_weight)
        return terms

    def _reconstruction_terms(self, out, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        target = out.label_features.detach() if self.detach_recon_targets else out.label_features
        return {
            "recon_mse": _modality_mse_sum(out.recon, target, weight),
            "aug_mse": _modality_mse_sum(out.frr, target, weight),
            "beta_mse": _modality_mse_sum(out.srr, target, weight),
        }

    def _supcon_term(self, model: nn.Module, out, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if out.contrast_features is None:
            return out.agg_logits.new_zeros((), dtype=torch.float32)
        batch, stages, num_classes, size = out.contrast_features.shape
        with torch.autocast(device_type=out.contrast_features.device.type, enabled=False):
            rows = F.normalize(out.contrast_features.float(), dim=-1).reshape(-1, size)
            ids = contrastive_class_ids(labels, stages).reshape(-1)
            row_valid = (weight > 0)[:, None].expand(batch, stages * num_classes).reshape(-1)
            queue = model.queue
            features = torch.cat([rows, queue.features.detach().float()])
            all_ids = torch.cat([ids, queue.ids])
            valid = torch.cat([row_valid, queue.filled()])
            # contrastive_class_ids gives 6 classes per label (3 modalities x present / absent)
            return supcon_loss(features, all_ids, valid, self.temperature, self.base_temperature,
                               num_ids=6 * num_classes)
