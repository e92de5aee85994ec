"""CARAT's model state outside the parameters: label prototypes and the contrastive memory queue.

Prototypes (Peng et al., AAAI 2024, "prototype-based missing modality imputation"): per modality and label a
positive and a negative prototype in the latent space, EMAs of L2-normalised latent vectors of samples that have
(positive) or lack (negative) the label. The reference updates them in a sequential Python loop over samples;
:func:`ema_closed_form` computes the identical sequential result in one vectorised step.

Queue (MoCo-style, He et al. CVPR 2020): a ring buffer of normalised latent rows and their contrastive class
ids, used as extra anchors / contrast rows by SupCon. carat initialises it harmlessly (``init="empty"``): rows
are random unit vectors and ids are -1, an id the losses treat as "empty" (matches nothing, and empty rows are
left out of SupCon entirely), so the loss before the queue fills is SupCon over the filled part only. The
reference (``init="noise"``, model.queue_init) fills it with Gaussian noise normalised along the feature
*columns* (rows of norm ~sqrt(z / size), 0.09 at z = 64, size 8,192) and Gaussian float "labels" that equal no
class id: until overwritten, those rows are extra negatives and anchors without positives, which contribute 0
but count in SupCon's mean, so its first-step SupCon is the batch's value times n / (n + size) for n batch rows
(64 x 54 = 3,456 rows against 8,192 at the seed's sizes: x0.30).

Both are updated only from features gathered across all data-parallel ranks, so every rank holds the same state,
and both keep float32 buffers when the model is cast to bf16 (:class:`Float32State`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMPTY_ID = -1
"""Class id of a queue row that holds no feature yet (left out of SupCon)."""

NOISE_ID = -2
"""Class id of a queue row that holds the reference's initial noise: a row of SupCon (contrast row, and an anchor
that has no positive) that matches no class."""


def ema_closed_form(state: torch.Tensor, items: torch.Tensor, selected: torch.Tensor,
                    momentum: float) -> torch.Tensor:
    """Result of applying ``state[c] <- m * state[c] + (1 - m) * items[n, c]`` for n = 0..N-1 in order, for
    every n with ``selected[n, c]``, computed at once.

    state [C, z], items [N, C, z], selected [N, C] bool. With k_c selected items, item n weighs
    (1 - m) * m^(number of selected items after n) and the old state weighs m^k_c. Computed in float64 so it
    equals the loop to float32 rounding, and returned in ``state``'s dtype.
    """
    sel = selected.to(torch.float64)
    later = sel.flip(0).cumsum(0).flip(0) - sel  # selected items after n, per label
    weights = (1.0 - momentum) * torch.pow(momentum, later) * sel
    decay = torch.pow(momentum, sel.sum(0))  # [C]
    updated = decay[:, None] * state.to(torch.float64) + torch.einsum("nc,ncz->cz", weights,
                                                                       items.to(torch.float64))
    return updated.to(state.dtype)


class Float32State(nn.Module):
    """A module whose floating buffers stay float32 when the model is cast (``.bfloat16()``, DeepSpeed bf16):
    an EMA with momentum 0.99 stored in bf16 (8-bit mantissa) would round most updates away."""

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN201 - torch's signature
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self


class FeatureStandardizer(Float32State):
    """(x - mean) / std per raw feature dimension with train-split statistics (buffers, saved with the model;
    identity until :meth:`set_stats`). Padded frames stay exactly zero."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def set_stats(self, mean: object, std: object, name: str = "features") -> None:
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        dim = self.mean.numel()
        if mean_t.numel() != dim or std_t.numel() != dim:
            raise ValueError(f"{name}: feature statistics have {mean_t.numel()}/{std_t.numel()} values, "
                             f"the model's {name} features have {dim}")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
            raise ValueError(f"{name}: feature statistics must be finite with std > 0")
        self.mean.copy_(mean_t.to(self.mean.device))
        self.inv_std.copy_(std_t.reciprocal().to(self.inv_std.device))

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scaled = (frames - self.mean.to(frames.dtype)) * self.inv_std.to(frames.dtype)
        return scaled * mask[..., None].to(frames.dtype)


class LabelPrototypes(Float32State):
    """Positive / negative prototypes [C, z] of one modality (buffers, zero at start as in the reference)."""

    def __init__(self, num_classes: int, latent_size: int, momentum: float, temperature: float = 1.0) -> None:
        super().__init__()
        self.momentum = momentum
        self.temperature = temperature
        self.register_buffer("pos_protos", torch.zeros(num_classes, latent_size))
        self.register_buffer("neg_protos", torch.zeros(num_classes, latent_size))

    def similarity(self, latent_normed: torch.Tensor) -> torch.Tensor:
        """softmax over {pos, neg} of <latent, prototype> / temperature: [B, C, z] -> [B, C, 2] (0 = positive)."""
        protos = torch.stack([self.pos_protos, self.neg_protos], dim=-2).to(latent_normed.dtype)  # [C, 2, z]
        return torch.softmax(torch.einsum("bcz,cnz->bcn", latent_normed, protos) / self.temperature, dim=-1)

    def stand_in(self, similarity: torch.Tensor, hard: bool) -> torch.Tensor:
        """The prototype standing in for the modality [B, C, z]: the similarity-weighted mix (training) or,
        ``hard``, the more similar prototype (evaluation; ties go to the negative one, as in the reference)."""
        protos = torch.stack([self.pos_protos, self.neg_protos], dim=-2).to(similarity.dtype)  # [C, 2, z]
        if hard:
            pos = (similarity[..., 0] > similarity[..., 1]).to(similarity.dtype)
            similarity = torch.stack([pos, 1.0 - pos], dim=-1)
        return torch.einsum("bcn,cnz->bcz", similarity, protos)

    @torch.no_grad()
    def update(self, latent_normed: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA update from normalised latents [N, C, z] in sample order; labels [N, C] 0/1 (>= 0.5 = present)."""
        present = labels >= 0.5
        self.pos_protos.copy_(ema_closed_form(self.pos_protos, latent_normed, present, self.momentum))
        self.neg_protos.copy_(ema_closed_form(self.neg_protos, latent_normed, ~present, self.momentum))


class ContrastiveQueue(Float32State):
    """Ring buffer of ``size`` rows [size, z] with class ids [size]: until written, random unit rows with EMPTY_ID
    (``init="empty"``) or the reference's column-normalised noise with NOISE_ID (``init="noise"``)."""

    def __init__(self, size: int, latent_size: int, init: str = "empty") -> None:
        super().__init__()
        if init not in ("empty", "noise"):
            raise ValueError(f"queue init {init!r}: use 'empty' or 'noise'")
        self.size = size
        noise = torch.randn(size, latent_size)
        # The reference normalises its initial queue over dim 0 (each feature column), not per row.
        features = F.normalize(noise, dim=0) if init == "noise" else F.normalize(noise, dim=1)
        self.register_buffer("features", features)
        self.register_buffer("ids", torch.full((size,), EMPTY_ID if init == "empty" else NOISE_ID, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Write rows [n, z] and ids [n] in order after the pointer, wrapping around; when n > size only the
        last ``size`` rows survive, exactly as writing them one by one would leave the buffer."""
        n = rows.shape[0]
        if n == 0:
            return
        kept = min(n, self.size)
        start = int(self.ptr) + n - kept
        positions = (start + torch.arange(kept, device=self.features.device)) % self.size
        self.features[positions] = rows[n - kept:].to(self.features.dtype)
        self.ids[positions] = ids[n - kept:].to(self.ids.dtype)
        self.ptr.fill_((int(self.ptr) + n) % self.size)

    def filled(self) -> torch.Tensor:
        """[size] bool: rows SupCon uses (every row but the empty ones: written rows, and initial noise rows)."""
        return self.ids != EMPTY_ID
