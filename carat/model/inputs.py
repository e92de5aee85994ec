"""Cheap checks of a batch before it enters CARAT, with errors that name the modality and batch index.

All per-element checks are reduced on the device into one flag tensor and read with a single host sync; only
when something is wrong are the details computed to build the message.
"""

from __future__ import annotations

import torch

from carat.errors import DataError


def check_shapes(name: str, frames: torch.Tensor, mask: torch.Tensor, feature_dim: int, batch: int) -> None:
    """Shapes and dtypes: frames [B, L, feature_dim] floating, mask bool [B, L]."""
    if frames.dim() != 3 or frames.shape[-1] != feature_dim:
        raise DataError(f"{name}: expected features of shape [batch, frames, {feature_dim}], "
                        f"got {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise DataError(f"{name}: expected floating-point features, got {frames.dtype}")
    if mask.dtype != torch.bool:
        raise DataError(f"{name}_mask: expected a bool mask (True = real frame), got {mask.dtype}")
    if tuple(mask.shape) != tuple(frames.shape[:2]):
        raise DataError(f"{name}_mask: shape {tuple(mask.shape)} does not match {name} {tuple(frames.shape[:2])}")
    if frames.shape[0] != batch:
        raise DataError(f"{name}: batch size {frames.shape[0]} differs from text's {batch}")


def _problems(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[3] bool on the device: any empty sample, any non-finite value, any mask that is not a prefix."""
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    return torch.stack([(lengths == 0).any(), ~torch.isfinite(frames).all(), (prefix != mask).any()])


def check_values(modalities: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every sample has >= 1 real frame per modality, all values finite, masks of the form [1..1 0..0]."""
    flags = torch.stack([_problems(frames, mask) for frames, mask in modalities.values()])
    if not bool(flags.any()):
        return
    for name, (frames, mask) in modalities.items():
        lengths = mask.sum(dim=1)
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        if empty:
            raise DataError(f"{name}: batch index {empty} has no real frame (empty sequence); every sample "
                            f"needs at least one frame per modality (filler samples too)")
        bad = torch.nonzero(~torch.isfinite(frames).flatten(1).all(dim=1)).flatten().tolist()
        if bad:
            raise DataError(f"{name}: batch index {bad} contains NaN or inf")
        prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
        holes = torch.nonzero((prefix != mask).any(dim=1)).flatten().tolist()
        if holes:
            raise DataError(f"{name}_mask: batch index {holes} is not of the form [True..True, False..False] "
                            f"(real frames first, padding at the end)")
