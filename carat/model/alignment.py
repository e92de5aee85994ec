"""Soft alignment of an unaligned modality to a target length (the reference's ``CTCModule``).

A 2-layer LSTM (hidden = width + 1) reads the frames; for each input frame a softmax over the width + 1 output
slots gives where that frame goes (slot 0 = blank, dropped); P [B, L_out, L_in] is the transposed result and the
aligned sequence is P @ x [B, L_out, feature dim]. No CTC loss is applied (as in the reference). The idea comes
from MulT's CTC module (Tsai et al., ACL 2019).

carat additions (padding never matters):
- the LSTM runs on a packed sequence, so it never reads past a sample's last real frame;
- columns of P that belong to padded input frames are zero, so padding contributes nothing to P @ x;
- every sample has its own target length (fixed ``ctc_target_length``, or adaptive
  ``round(L_in * compression_ratio)`` clipped to [min_target_len, max_target_len]); for each input frame the
  softmax runs over the blank and the sample's own slots only, and slots beyond the sample's target are masked
  in the returned output mask (and are exactly zero). A sample's aligned output thus depends on its own frames
  only, whatever else is in the batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint


def target_lengths(lengths: torch.Tensor, fixed: int | None, ratio: float, min_len: int,
                   max_len: int) -> torch.Tensor:
    """Aligned length per sample: ``fixed``, or ``min(max(round(L_in * ratio), min_len), max_len)``."""
    if fixed is not None:
        return torch.full_like(lengths, fixed)
    scaled = torch.round(lengths.to(torch.float64) * ratio).to(lengths.dtype)
    return scaled.clamp(min=min_len, max=max_len)


class SoftAlignment(nn.Module):
    """LSTM-predicted soft assignment of input frames to output slots; see the module docstring.

    forward(frames [B, L_in, F], mask [B, L_in] bool) -> (aligned [B, T, F], slot_mask [B, T] bool) where
    T = the largest per-sample target in the batch.
    """

    def __init__(self, input_dim: int, width: int, *, fixed_target: int | None, compression_ratio: float,
                 min_target_len: int, checkpointed: bool = False) -> None:
        super().__init__()
        self.width = width
        self.fixed_target = fixed_target
        self.compression_ratio = compression_ratio
        self.min_target_len = min(min_target_len, width)
        self.checkpointed = checkpointed
        # +1 output slot for the blank, as in the reference (hidden = L_out + 1).
        self.lstm = nn.LSTM(input_dim, width + 1, num_layers=2, batch_first=True)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = mask.sum(dim=1)
        targets = target_lengths(lengths, self.fixed_target, self.compression_ratio, self.min_target_len,
                                 self.width)
        num_slots = self.width if self.fixed_target is not None else int(targets.max())
        # pack_padded_sequence wants lengths on the CPU; one small copy per batch.
        lengths_cpu = lengths.cpu()
        if self.checkpointed and torch.is_grad_enabled():
            aligned = checkpoint(self._align, frames, mask, lengths_cpu, targets, num_slots, use_reentrant=False)
        else:
            aligned = self._align(frames, mask, lengths_cpu, targets, num_slots)
        slot_mask = torch.arange(num_slots, device=frames.device)[None, :] < targets[:, None]
        return aligned, slot_mask

    def _align(self, frames: torch.Tensor, mask: torch.Tensor, lengths_cpu: torch.Tensor,
               targets: torch.Tensor, num_slots: int) -> torch.Tensor:
        logits = self._slot_logits(frames, lengths_cpu)[..., : num_slots + 1]
        if self.fixed_target is None:
            # Each sample distributes a frame over the blank and its own slots only (slot s <= target).
            slots = torch.arange(num_slots + 1, device=frames.device)
            outside = slots[None, None, :] > targets[:, None, None]
            logits = logits.masked_fill(outside, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1)
        # Drop the blank and zero the columns of P that belong to padded frames.
        assignment = probs[..., 1:] * mask[..., None].to(probs.dtype)
        # P @ x with P = assignment^T: bmm reads the transposed view without copying it.
        return torch.bmm(assignment.transpose(1, 2), frames.to(assignment.dtype))

    def _slot_logits(self, frames: torch.Tensor, lengths_cpu: torch.Tensor) -> torch.Tensor:
        """LSTM outputs [B, L_in, width + 1] over each sample's real frames only (zeros after its end)."""
        packed = pack_padded_sequence(frames, lengths_cpu, batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        padded, _ = pad_packed_sequence(output, batch_first=True, total_length=frames.shape[1])
        return padded
