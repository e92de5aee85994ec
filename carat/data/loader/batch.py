"""The two shapes of a batch on its way from a shard to the model.

:class:`CollatedBatch` is what a loader worker makes (:func:`carat.data.loader.collate.collate`) and sends to the
training process: padded features in the stored dtype, lengths instead of masks, small numpy arrays for the
rest (one shared-memory segment per small tensor would cost more than the batch), plus what the loader needs
to account for it (skipped samples, the shared-memory slot it was written into).

:class:`Batch` is what the loader yields (:func:`carat.data.loader.collate.to_batch`): every field a tensor, features
cast (float32 by default), bool masks. The model never sees either type: the training loop unpacks
:meth:`Batch.model_inputs` into the model's keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: both modules import this one
    from carat.data.loader.shm_pool import PooledTensor
    from carat.data.loader.tar_reader import Skip


@dataclass
class CollatedBatch:
    """A worker's batch of B samples, as it crosses to the training process (B >= 1).

    Only the three feature tensors travel through shared memory; the numpy arrays and lists are pickled
    inline. Features are sent either as tensors (torch's shared-memory transfer) or, when they were written
    into a slot of the loader's ring, as :class:`~carat.data.loader.shm_pool.PooledTensor` addresses that the
    receiving process resolves against :attr:`ring_slot` before copying them out.
    """

    keys: list[str]
    """The B sample keys (manifest ``key``), in batch order."""
    text: torch.Tensor | PooledTensor
    """[B, L_t, 300] in the stored dtype (float16 or float32), zero-padded at the end; L_t >= 1."""
    visual: torch.Tensor | PooledTensor
    """[B, L_v, 35], as ``text``."""
    audio: torch.Tensor | PooledTensor
    """[B, L_a, 74], as ``text``."""
    lengths: np.ndarray
    """[B, 3] int64 real frames per modality (text, visual, audio); :func:`to_batch` makes the masks."""
    labels: np.ndarray
    """[B, 6] float32 0/1."""
    intensities: np.ndarray
    """[B, 6] float32 raw intensities, NaN where unknown."""
    weight: np.ndarray
    """[B] float32: 1 for real samples, 0 for the filler sample of a batch that only keeps ranks in step."""
    skipped: list[Skip] = field(default_factory=list)
    """(shard, key, reason) of the planned samples left out of this batch as unreadable (on_error='skip');
    empty for a filler batch, whose sample is a copy, not a loss."""
    ring_slot: tuple[int, int] | None = None
    """(worker, slot) of the shared-memory ring slot the features were written into, or None (plain
    tensors). The consumer copies the features out, then releases the slot."""

    def features(self) -> dict[str, torch.Tensor | PooledTensor]:
        """The padded feature tensors by modality, in :data:`~carat.data.sources.segment.MODALITIES` order."""
        return {"text": self.text, "visual": self.visual, "audio": self.audio}

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Batch:
    """A batch of B samples ready for the model: padded tensors plus boolean masks (True = a real frame)."""

    keys: list[str]
    """The B sample keys, in batch order."""
    text: torch.Tensor
    """[B, L_t, 300] float (float32 unless the loader keeps the stored dtype), zero-padded at the end."""
    text_mask: torch.Tensor
    """[B, L_t] bool, True on real steps."""
    visual: torch.Tensor
    """[B, L_v, 35] float, as ``text``."""
    visual_mask: torch.Tensor
    """[B, L_v] bool, True on real frames."""
    audio: torch.Tensor
    """[B, L_a, 74] float, as ``text``."""
    audio_mask: torch.Tensor
    """[B, L_a] bool, True on real frames."""
    labels: torch.Tensor
    """[B, 6] float 0/1."""
    intensities: torch.Tensor
    """[B, 6] float raw intensities (NaN where unknown)."""
    weight: torch.Tensor
    """[B] float: 1 for real samples, 0 for filler samples that only keep ranks in step."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``CARAT.forward`` (the model takes tensors, never a Batch)."""
        return {
            "text": self.text, "text_mask": self.text_mask,
            "visual": self.visual, "visual_mask": self.visual_mask,
            "audio": self.audio, "audio_mask": self.audio_mask,
        }

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self) for v in [getattr(self, f.name)]
        }
        return Batch(**moved)

    def __len__(self) -> int:
        return len(self.keys)
