"""Soft alignment: the time-segmented checkpointed path equals the unsegmented one (values, gradients, masking)."""

from __future__ import annotations

import pytest
import torch

from carat.model.alignment import SoftAlignment
from tests.model_helpers import tiny_model

LENGTHS = [23, 50, 3, 50, 14]  # ties, a 1-segment sample, none divisible by the chunk sizes below


def _pair(chunk_frames: int | None, fixed_target: int | None, seed: int = 0) -> tuple[SoftAlignment, SoftAlignment]:
    """An unsegmented alignment and a checkpointed one with the same (non-trivial) weights."""
    torch.manual_seed(seed)
    kwargs = {"fixed_target": fixed_target, "compression_ratio": 0.2, "min_target_len": 2}
    width = fixed_target or 12  # as in CARAT: a fixed target is the LSTM's width
    plain = SoftAlignment(5, width, **kwargs)
    ckpt = SoftAlignment(5, width, checkpointed=True, chunk_frames=chunk_frames, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def _frames(lengths: list[int], total: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random frames with random (finite, non-zero) padding, so any leak of padded frames shows."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(len(lengths), total, 5, generator=g)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return frames, mask


def _run(module: SoftAlignment, frames: torch.Tensor, mask: torch.Tensor, weight_seed: int = 2):
    """Output, slot mask, and the gradients (input, parameters) of a random linear function of the output."""
    x = frames.clone().requires_grad_()
    out, slots = module(x, mask)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(weight_seed))
    module.zero_grad(set_to_none=True)
    (out * weight).sum().backward()
    return out.detach(), slots, x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("fixed_target", [8, None])
@pytest.mark.parametrize("chunk_frames", [1, 7, 16, 64, None])
def test_segmented_alignment_equals_the_unsegmented_one(chunk_frames, fixed_target):
    plain, ckpt = _pair(chunk_frames, fixed_target)
    frames, mask = _frames(LENGTHS, total=57)  # 7 padded frames beyond the longest sample
    out_a, slots_a, dx_a, grads_a = _run(plain, frames, mask)
    out_b, slots_b, dx_b, grads_b = _run(ckpt, frames, mask)
    assert torch.equal(slots_a, slots_b)
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx_b, dx_a, atol=1e-6, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not dx_b[~mask].any()  # padded frames get exactly zero gradient
    assert not out_b[~slots_b].any()  # slots beyond a sample's own target are exactly zero


@pytest.mark.parametrize("fixed_target", [8, None])
def test_segmented_alignment_of_a_sample_ignores_the_rest_of_its_batch(fixed_target):
    _, ckpt = _pair(7, fixed_target)
    frames, mask = _frames(LENGTHS, total=57)
    out, slots, _, _ = _run(ckpt, frames, mask)
    for index, length in enumerate(LENGTHS):
        alone_out, alone_slots, _, _ = _run(ckpt, frames[index:index + 1, :length],
                                                   mask[index:index + 1, :length])
        width = alone_out.shape[1]
        torch.testing.assert_close(out[index:index + 1, :width], alone_out, atol=1e-6, rtol=1e-5)
        assert not out[index, width:].any() and torch.equal(slots[index, :width], alone_slots[0])
    # Gradients: the same linear function of one sample's output, taken in the batch and alone.
    weight = torch.randn(1, slots.shape[1], 5, generator=torch.Generator().manual_seed(4))
    for index, length in enumerate(LENGTHS):
        x_all = frames.clone().requires_grad_()
        (ckpt(x_all, mask)[0][index:index + 1] * weight).sum().backward()
        x_one = frames[index:index + 1, :length].clone().requires_grad_()
        out_one = ckpt(x_one, mask[index:index + 1, :length])[0]
        (out_one * weight[:, : out_one.shape[1]]).sum().backward()
        torch.testing.assert_close(x_all.grad[index, :length], x_one.grad[0], atol=1e-6, rtol=1e-5)
        assert not x_all.grad[torch.arange(len(LENGTHS)) != index].any()  # other samples: no gradient
        assert not x_all.grad[index, length:].any()


def test_no_lstm_call_sees_more_than_one_segment_of_frames():
    """Segmentation is real: in forward and in the backward recomputation, the LSTM reads <= chunk frames."""
    _, ckpt = _pair(7, None)
    steps = []
    ckpt.lstm.register_forward_hook(lambda module, args, output: steps.append(len(args[0].batch_sizes)))
    frames, mask = _frames(LENGTHS, total=57)
    _run(ckpt, frames, mask)
    segments = -(-max(LENGTHS) // 7)
    assert len(steps) == 2 * segments  # each segment once in forward, once when backward recomputes it
    assert max(steps) == 7 and min(steps) == max(LENGTHS) % 7


def test_without_gradients_the_checkpointed_alignment_runs_unsegmented():
    plain, ckpt = _pair(7, 8)
    calls = []
    ckpt.lstm.register_forward_hook(lambda module, args, output: calls.append(len(args[0].batch_sizes)))
    frames, mask = _frames(LENGTHS, total=57)
    with torch.no_grad():
        out = ckpt(frames, mask)[0]
        torch.testing.assert_close(out, plain(frames, mask)[0])
    assert calls == [max(LENGTHS)]


def test_segmented_alignment_under_bf16_autocast_matches_the_unsegmented_dtype_and_values():
    plain, ckpt = _pair(7, None)
    frames, mask = _frames(LENGTHS, total=57)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a = plain(frames, mask)[0]
        out_b = ckpt(frames.requires_grad_(), mask)[0]
    assert out_b.dtype == out_a.dtype
    torch.testing.assert_close(out_b.float(), out_a.float(), atol=0.05, rtol=0.05)


def test_model_wires_the_chunk_size_into_both_alignments():
    model = tiny_model(checkpoint_alignment=("audio",), alignment_chunk_frames=5)
    assert model.audio_align.checkpointed and model.audio_align.chunk_frames == 5
    assert not model.visual_align.checkpointed and model.visual_align.chunk_frames == 5


# ------------------------------------------------------------------------------- alignment weights, pooling
def test_lstm_alignment_weights_are_a_distribution_over_slots_for_real_frames_only():
    """Each real frame's weights over (blank + its sample's slots) sum to 1; padded frames weigh nothing."""
    plain, _ = _pair(None, None)
    frames, mask = _frames(LENGTHS, total=57)
    p = plain.assignment(frames, mask)  # [B, T, L]
    assert torch.all(p >= 0)
    assert torch.all(p.transpose(1, 2)[~mask] == 0)
    per_frame = p.sum(dim=1)[mask]  # the blank takes the rest of each real frame's mass
    assert torch.all(per_frame <= 1 + 1e-6) and torch.all(per_frame > 0)
    # P @ x is what the module returns
    out, _ = plain(frames, mask)
    torch.testing.assert_close(out, torch.bmm(p, frames), rtol=1e-5, atol=1e-5)


def test_lstm_alignment_entropy_is_recorded_in_training_and_normalised():
    plain, ckpt = _pair(7, 8)
    frames, mask = _frames(LENGTHS, total=57)
    for module in (plain, ckpt):
        module.train()
        _run(module, frames, mask)
        entropy = module.mean_entropy()
        assert entropy is not None and 0.0 < entropy <= 1.0 + 1e-6
    # the segmented path records the same mean as the unsegmented one (recomputation does not double count)
    assert abs(plain.mean_entropy() - ckpt.mean_entropy()) < 1e-5


@pytest.mark.parametrize("fixed_target", [8, 80, None])
def test_segment_pooling_weights_are_a_distribution_over_real_frames(fixed_target):
    from carat.model.alignment import SegmentPooling

    pool = SegmentPooling(fixed_target or 12, fixed_target=fixed_target, compression_ratio=0.2, min_target_len=2)
    frames, mask = _frames(LENGTHS, total=57)
    out, slots = pool(frames, mask)
    p = pool.assignment(mask)
    assert torch.all(p.transpose(1, 2)[~mask] == 0)  # padding never weighs
    rows = p.sum(dim=-1)
    torch.testing.assert_close(rows[slots], torch.ones(int(slots.sum())))  # each real slot: a mean of frames
    assert torch.all(rows[~slots] == 0) and torch.all(out[~slots] == 0)
    torch.testing.assert_close(out, torch.bmm(p, frames * mask[..., None]), rtol=1e-5, atol=1e-5)


def test_segment_pooling_equals_adaptive_average_pooling_per_sample():
    from carat.model.alignment import SegmentPooling

    pool = SegmentPooling(8, fixed_target=8, compression_ratio=0.1, min_target_len=2)
    frames, mask = _frames(LENGTHS, total=57)
    out, _ = pool(frames, mask)
    for b, length in enumerate(LENGTHS):
        own = torch.nn.functional.adaptive_avg_pool1d(frames[b:b + 1, :length].transpose(1, 2), 8).transpose(1, 2)
        torch.testing.assert_close(out[b:b + 1], own, rtol=1e-5, atol=1e-5)


def test_pooling_model_is_padding_invariant_and_has_no_alignment_parameters():
    from tests.model_helpers import make_batch, perturb_parameters, stack_samples

    model = tiny_model(aligner="pool")
    assert not any(n.startswith(("visual_align", "audio_align")) for n, _ in model.named_parameters())
    perturb_parameters(model)
    model.eval()
    lengths = {"text": [5, 30], "visual": [9, 40], "audio": [12, 61]}
    alone = make_batch({m: [v[0]] for m, v in lengths.items()}, seed=3)
    other = make_batch({m: [v[1]] for m, v in lengths.items()}, seed=4)
    with torch.no_grad():
        single = model.scores(model(**alone))
        batched = model.scores(model(**stack_samples([alone, other])))
    torch.testing.assert_close(batched[:1], single, rtol=1e-5, atol=1e-6)


def test_no_alignment_feeds_every_frame_and_refuses_clips_longer_than_the_positions():
    from carat.errors import DataError
    from tests.model_helpers import make_batch, perturb_parameters, stack_samples

    model = tiny_model(aligner="none", ctc_target_length=None)  # the reference's aligned mode
    assert not any(n.startswith(("visual_align", "audio_align")) for n, _ in model.named_parameters())
    perturb_parameters(model)
    model.eval()
    lengths = {"text": [5, 30], "visual": [9, 40], "audio": [12, 61]}
    alone = make_batch({m: [v[0]] for m, v in lengths.items()}, seed=3)
    other = make_batch({m: [v[1]] for m, v in lengths.items()}, seed=4)
    with torch.no_grad():
        out = model(**alone)
        assert out.visual_slot_mask.shape == alone["visual_mask"].shape and out.visual_slot_mask.all()
        batched = model.scores(model(**stack_samples([alone, other])))
    torch.testing.assert_close(batched[:1], model.scores(out), rtol=1e-5, atol=1e-6)
    too_long = make_batch({"text": [5], "visual": [65], "audio": [12]}, seed=5)  # tiny: 64 visual positions
    with pytest.raises(DataError, match=r"visual: batch index \[0\] has \[65\] real frames.*visual_max_positions=64"):
        model(**too_long)
    padded = stack_samples([alone, make_batch({"text": [5], "visual": [70], "audio": [12]}, seed=6)])
    with pytest.raises(DataError, match="visual_max_positions"):
        model(**padded)
    cut = {k: v[:1] for k, v in padded.items()}  # the short sample alone, padded to 70: padding is cut to 64
    with torch.no_grad():
        torch.testing.assert_close(model.scores(model(**cut)), model.scores(out), rtol=1e-5, atol=1e-6)
