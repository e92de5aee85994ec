"""A collated batch: padded tensors plus boolean masks (True = a real frame) per modality."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    keys: list[str]
    text: torch.Tensor
    """[B, L_t, 300] float, zero-padded at the end."""
    text_mask: torch.Tensor
    """[B, L_t] bool, True on real steps."""
    visual: torch.Tensor
    visual_mask: torch.Tensor
    audio: torch.Tensor
    audio_mask: torch.Tensor
    labels: torch.Tensor
    """[B, 6] float 0/1."""
    intensities: torch.Tensor
    """[B, 6] float raw intensities (NaN where unknown)."""
    weight: torch.Tensor
    """[B] float: 1 for real samples, 0 for filler samples that only keep ranks in step."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``CARAT.forward``."""
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
