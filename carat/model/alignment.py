"""Soft alignment of an unaligned modality to a target length (the reference's ``CTCModule``).

The names are historic: MulT (Tsai et al., ACL 2019) introduced a module of this shape as a "CTC module",
one that a connectionist temporal classification loss could train, and CARAT's code kept the name (its
``CTCModule``, ``*_ctc`` parameters) and called the output length the CTC target length (carat's
``model.ctc_target_length``). No CTC loss is involved, in CARAT's published code or here: the module is a
learned soft assignment of input frames to a number of output slots, trained only through the losses
downstream of it, and ``ctc_target_length`` is simply the number of aligned slots.

A 2-layer LSTM (hidden = width + 1) reads the frames; for each input frame a softmax over the width + 1 output
slots gives where that frame goes (slot 0 = blank, dropped); P [B, L_out, L_in] is the transposed result and the
aligned sequence is P @ x [B, L_out, feature dim]. No CTC loss is applied (as in the reference). The idea comes
from MulT's CTC module (Tsai et al., ACL 2019). :class:`SegmentPooling` is carat's parameter-free alternative and
:class:`NoAlignment` the reference's aligned mode (frames passed through as they are).

carat additions (padding never matters):
- the LSTM runs on a packed sequence, so it never reads past a sample's last real frame;
- columns of P that belong to padded input frames are zero, so padding contributes nothing to P @ x;
- every sample has its own target length (fixed ``ctc_target_length``, or adaptive
  ``round(L_in * compression_ratio)`` clipped to [min_target_len, max_target_len]); for each input frame the
  softmax runs over the blank and the sample's own slots only, and slots beyond the sample's target are masked
  in the returned output mask (and are exactly zero). A sample's aligned output thus depends on its own frames
  only, whatever else is in the batch.

Activation checkpointing (``checkpointed``) is time-segmented: the frames are cut into segments of
``chunk_frames``; each segment (LSTM from the carried (h, c) state, slot softmax, and its share
assignment_seg^T @ x_seg of P @ x, accumulated over segments) is one ``torch.utils.checkpoint`` block
(non-reentrant). P @ x is a sum over input frames and the LSTM is a recurrence, so this is the same function as
the unsegmented alignment, but the backward pass rebuilds one segment's activations at a time: the alignment's
peak activation memory is O(B x chunk_frames x width) instead of O(B x L_in x width). Samples are ordered by
length (longest first) so that the samples still running in a segment are a prefix of the batch: a segment
packs only those, with each one's frames left in that segment, so the LSTM never runs past a sample's end and
a finished sample's state is never touched again. ``chunk_frames=None`` checkpoints the whole alignment as one
block (whole activation set rebuilt at once in backward). Without checkpointing (or without gradients) the
alignment runs unsegmented: one packed LSTM call over the whole sequence (cuDNN on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

from carat.errors import DataError


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
                 min_target_len: int, checkpointed: bool = False, chunk_frames: int | None = 512) -> None:
        super().__init__()
        self._entropy: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if chunk_frames is not None and chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames} must be >= 1 or None")
        self.width = width
        self.fixed_target = fixed_target
        self.compression_ratio = compression_ratio
        self.min_target_len = min(min_target_len, width)
        self.checkpointed = checkpointed
        self.chunk_frames = chunk_frames
        # +1 output slot for the blank, as in the reference (hidden = L_out + 1).
        self.lstm = nn.LSTM(input_dim, width + 1, num_layers=2, batch_first=True)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._entropy = {}
        lengths = mask.sum(dim=1)
        targets = target_lengths(lengths, self.fixed_target, self.compression_ratio, self.min_target_len,
                                 self.width)
        num_slots = self.width if self.fixed_target is not None else int(targets.max())
        # pack_padded_sequence wants lengths on the CPU; one small copy per batch.
        lengths_cpu = lengths.cpu()
        if self.checkpointed and torch.is_grad_enabled():
            if self.chunk_frames is None:
                aligned = checkpoint(self._align, frames, mask, lengths_cpu, targets, num_slots,
                                     use_reentrant=False)
            else:
                aligned = self._align_segmented(frames, mask, lengths_cpu, targets, num_slots, self.chunk_frames)
        else:
            aligned = self._align(frames, mask, lengths_cpu, targets, num_slots)
        slot_mask = torch.arange(num_slots, device=frames.device)[None, :] < targets[:, None]
        return aligned, slot_mask

    def _align(self, frames: torch.Tensor, mask: torch.Tensor, lengths_cpu: torch.Tensor,
               targets: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Unsegmented alignment: one packed LSTM call over every sample's real frames, then P @ x."""
        packed = pack_padded_sequence(frames, lengths_cpu, batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        logits, _ = pad_packed_sequence(output, batch_first=True, total_length=frames.shape[1])
        return self._assign(logits, frames, mask, targets, num_slots)

    def _assign(self, logits: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                num_slots: int, segment: int = 0) -> torch.Tensor:
        """LSTM outputs [B, L, width + 1] of frames [B, L, F] -> their share of P @ x, [B, num_slots, F]."""
        assignment = self._frame_assignment(logits, mask, targets, num_slots, segment)
        # P @ x with P = assignment^T: bmm reads the transposed view without copying it.
        return torch.bmm(assignment.transpose(1, 2), frames.to(assignment.dtype))

    def _frame_assignment(self, logits: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, num_slots: int,
                          segment: int = 0) -> torch.Tensor:
        """[B, L, num_slots]: each real frame's softmax over the blank and its sample's slots, blank dropped;
        rows of padded frames are zero."""
        logits = logits[..., : num_slots + 1]
        if self.fixed_target is None:
            # Each sample distributes a frame over the blank and its own slots only (slot s <= target).
            slots = torch.arange(num_slots + 1, device=logits.device)
            outside = slots[None, None, :] > targets[:, None, None]
            logits = logits.masked_fill(outside, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1)
        if self.training and torch.is_grad_enabled():
            self._record_entropy(probs, mask, targets, segment)
        # Drop the blank and zero the columns of P that belong to padded frames.
        return probs[..., 1:] * mask[..., None].to(probs.dtype)

    @torch.no_grad()
    def assignment(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P [B, T, L] for inspection and tests: the weight of each input frame in each aligned slot."""
        lengths = mask.sum(dim=1)
        targets = target_lengths(lengths, self.fixed_target, self.compression_ratio, self.min_target_len,
                                 self.width)
        num_slots = self.width if self.fixed_target is not None else int(targets.max())
        packed = pack_padded_sequence(frames, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        logits, _ = pad_packed_sequence(output, batch_first=True, total_length=frames.shape[1])
        return self._frame_assignment(logits, mask, targets, num_slots).transpose(1, 2)

    @torch.no_grad()
    def _record_entropy(self, probs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, segment: int) -> None:
        """Sum over real frames of the slot distribution's entropy / log(own slots + 1), and the frame count
        (device tensors, no host sync). Keyed by the time segment, so a recomputation under checkpointing
        overwrites rather than adds. 1.0 = every frame spread uniformly (all slots are then the same sum)."""
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)  # [B, L]
        entropy = entropy / torch.log(targets.to(entropy.dtype) + 1.0).clamp_min(1e-6)[:, None]
        real = mask.to(entropy.dtype)
        self._entropy[segment] = ((entropy * real).sum(), real.sum())

    def mean_entropy(self) -> float | None:
        """Normalised slot entropy averaged over the real frames of the last training batch (None if none)."""
        if not self._entropy:
            return None
        total = sum(v[0] for v in self._entropy.values())
        count = sum(v[1] for v in self._entropy.values())
        return float(total / count.clamp_min(1.0))

    def _align_segmented(self, frames: torch.Tensor, mask: torch.Tensor, lengths_cpu: torch.Tensor,
                         targets: torch.Tensor, num_slots: int, chunk: int) -> torch.Tensor:
        """Time-segmented checkpointed alignment (see the module docstring); equals :meth:`_align`."""
        batch = frames.shape[0]
        # Longest first (stable, so ties keep batch order): the samples alive in a segment are a prefix.
        order = torch.argsort(lengths_cpu, descending=True, stable=True)
        lengths_sorted = lengths_cpu[order]
        order_dev = order.to(frames.device)
        frames_s, mask_s, targets_s = (t.index_select(0, order_dev) for t in (frames, mask, targets))
        total = frames.new_zeros((), dtype=torch.float32)
        out_dtype = frames.dtype
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        for start in range(0, int(lengths_sorted[0]), chunk):
            alive = int((lengths_sorted > start).sum())
            seg_lengths = (lengths_sorted[:alive] - start).clamp(max=chunk)
            stop = start + int(seg_lengths[0])
            hidden = None if state is None else (state[0][:, :alive], state[1][:, :alive])
            part, h, c = checkpoint(self._segment, frames_s[:alive, start:stop], mask_s[:alive, start:stop],
                                    seg_lengths, targets_s[:alive], num_slots, hidden, start, use_reentrant=False)
            state, out_dtype = (h, c), part.dtype
            # Accumulate in float32 (one bmm over all frames accumulates in float32 too, also under autocast).
            total = total + F.pad(part.float(), (0, 0, 0, 0, 0, batch - alive))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(batch)
        return total.index_select(0, inverse.to(frames.device)).to(out_dtype)

    def _segment(self, frames: torch.Tensor, mask: torch.Tensor, lengths_cpu: torch.Tensor,
                 targets: torch.Tensor, num_slots: int, hidden: tuple[torch.Tensor, torch.Tensor] | None,
                 start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One segment of samples sorted longest first: LSTM from ``hidden`` over each sample's frames in the
        segment, its share of P @ x, and the (h, c) after each sample's last frame in the segment."""
        packed = pack_padded_sequence(frames, lengths_cpu, batch_first=True, enforce_sorted=True)
        output, (h, c) = self.lstm(packed, hidden)
        logits, _ = pad_packed_sequence(output, batch_first=True, total_length=frames.shape[1])
        return self._assign(logits, frames, mask, targets, num_slots, start), h, c


class SegmentPooling(nn.Module):
    """Parameter-free alignment: each sample's own frames cut into its target number of contiguous segments,
    slot s = mean of frames [floor(s L / T), ceil((s + 1) L / T)) (torch's adaptive average pooling, per
    sample, so it never reads padding; with L < T a frame is repeated). Same interface and target lengths as
    :class:`SoftAlignment`: forward(frames, mask) -> (aligned [B, T, F], slot_mask [B, T]).

    Slot sums come from a float32 prefix sum over time: O(B x L x F) time and memory, no [B, T, L] matrix,
    so the longest MOSEI audio (10,891 frames) costs what one pass over it costs.
    """

    def __init__(self, width: int, *, fixed_target: int | None, compression_ratio: float,
                 min_target_len: int) -> None:
        super().__init__()
        self.width = width
        self.fixed_target = fixed_target
        self.compression_ratio = compression_ratio
        self.min_target_len = min(min_target_len, width)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = mask.sum(dim=1)
        targets = target_lengths(lengths, self.fixed_target, self.compression_ratio, self.min_target_len,
                                 self.width)
        num_slots = self.width if self.fixed_target is not None else int(targets.max())
        start, stop, slot_mask = self.segments(lengths, targets, num_slots)
        x = (frames.float() * mask[..., None])
        prefix = F.pad(x.cumsum(dim=1), (0, 0, 1, 0))  # [B, L + 1, F], prefix[:, t] = sum of frames < t
        index = lambda pos: pos[..., None].expand(-1, -1, x.shape[-1])  # noqa: E731
        sums = prefix.gather(1, index(stop)) - prefix.gather(1, index(start))
        count = (stop - start).clamp_min(1).to(sums.dtype)[..., None]
        aligned = (sums / count) * slot_mask[..., None]
        return aligned.to(frames.dtype), slot_mask

    @staticmethod
    def segments(lengths: torch.Tensor, targets: torch.Tensor,
                 num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, num_slots] first frame, end frame (exclusive) and validity of every slot of every sample."""
        slots = torch.arange(num_slots, device=lengths.device)[None, :]
        length, target = lengths[:, None].long(), targets[:, None].long().clamp_min(1)
        valid = slots < target
        start = torch.div(slots * length, target, rounding_mode="floor")
        stop = -torch.div(-(slots + 1) * length, target, rounding_mode="floor")  # ceil
        start = torch.where(valid, start, 0).clamp(max=length - 1)
        stop = torch.where(valid, stop, 1).clamp(max=length)
        return start, stop, valid

    def assignment(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, T, L] the weight of each frame in each slot (rows of real slots sum to 1 over real frames)."""
        lengths = mask.sum(dim=1)
        targets = target_lengths(lengths, self.fixed_target, self.compression_ratio, self.min_target_len,
                                 self.width)
        num_slots = self.width if self.fixed_target is not None else int(targets.max())
        start, stop, valid = self.segments(lengths, targets, num_slots)
        frames = torch.arange(mask.shape[1], device=mask.device)[None, None, :]
        inside = (frames >= start[..., None]) & (frames < stop[..., None]) & valid[..., None]
        return inside.float() / inside.sum(dim=-1, keepdim=True).clamp_min(1)


class NoAlignment(nn.Module):
    """No alignment: the frames go to the encoder as they are, one encoder step per frame, with their own mask.

    The reference's aligned mode (``aligned=True`` in the published code: corpora already aligned to the words,
    where every modality has the text's length), which has no alignment module at all. Same interface as
    :class:`SoftAlignment`: forward(frames, mask) -> (frames, mask). Padding beyond the longest sample is cut to
    ``max_positions``; a sample with more real frames than that is an error (DataError), never an index error.
    """

    def __init__(self, max_positions: int, modality: str) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.modality = modality

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.max_positions
        if frames.shape[1] <= limit:
            return frames, mask
        lengths = mask.sum(dim=1)
        over = torch.nonzero(lengths > limit).flatten().tolist()
        if over:
            raise DataError(f"{self.modality}: batch index {over} has {lengths[over].tolist()} real frames, more "
                            f"than model.{self.modality}_max_positions={limit}, and model.aligner='none' feeds "
                            f"every frame to the encoder; raise it or use model.aligner='lstm' or 'pool'")
        return frames[:, :limit], mask[:, :limit]
