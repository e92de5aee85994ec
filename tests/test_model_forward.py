"""CARAT forward pass: shapes, padding invariance, kernels, checkpointing, autocast, determinism, gradients."""

from __future__ import annotations

import pytest
import torch

from carat.model import CARAT, CaratLoss, LossConfig
from tests.model_helpers import (
    labels_for, make_batch, output_tensors, perturb_parameters, stack_samples, tiny_config, tiny_model,
)

LENGTHS = {"text": [7, 20, 3], "visual": [30, 11, 5], "audio": [90, 40, 17]}


def test_every_output_has_its_documented_shape():
    model = tiny_model()
    model.train()
    out = model(**make_batch(LENGTHS))
    b, c, d, z, t = 3, 6, 16, 8, 8
    expected = {
        "lsr_logits": (b, c), "frr_logits": (b, c), "srr_logits": (b, c), "recon_logits": (b, c),
        "agg_logits": (b, 3, c), "label_features": (b, 3, c, d), "latent": (b, 3, c, z), "recon": (b, 3, c, d),
        "frr": (b, 3, c, d), "srr": (b, 3, c, d), "prototype_similarity": (b, 3, c, 2), "pooled": (b, 3, d),
        "visual_slot_mask": (b, t), "audio_slot_mask": (b, t), "contrast_features": (b, 9, c, z),
        "shuffled_agg_logits": (b, 3, c), "shuffle_sample_index": (b, 3, c),
    }
    shapes = {name: tuple(tensor.shape) for name, tensor in output_tensors(out).items()}
    assert shapes == expected
    assert model.scores(out).shape == (b, c)
    assert all(torch.isfinite(v.float()).all() for v in output_tensors(out).values())


def test_eval_output_skips_the_training_extras():
    model = tiny_model().eval()
    out = model(**make_batch(LENGTHS))
    assert out.contrast_features is None and out.shuffled_agg_logits is None and out.shuffle_sample_index is None
    scores = model.scores(out)
    assert ((scores > 0) & (scores < 1)).all()
    assert torch.equal(model.predict(out), scores > 0.2)


def test_named_encoders_and_reference_parameter_shapes():
    model = tiny_model()
    names = dict(model.named_children())
    for m in ("text", "visual", "audio"):
        assert f"{m}_encoder" in names
        assert model.get_submodule(f"{m}_attention.scores").weight.shape == (6, 16)
        assert model.get_submodule(f"{m}_protos").pos_protos.shape == (6, 8)
    assert model.visual_align.lstm.hidden_size == 9 and model.visual_align.lstm.num_layers == 2
    assert model.reconstruct.tv2a.weight.shape == (16, 48)
    assert model.agg.hidden.weight.shape == (16, 6 * 16) and model.agg.output.weight.shape == (6, 16)
    assert model.classifiers.text_weight.shape == (6, 16)
    assert model.queue.features.shape == (256, 8)


@pytest.mark.parametrize("ctc_target_length", [8, None])
def test_a_sample_does_not_depend_on_the_padding_of_its_batch(ctc_target_length):
    model = tiny_model(ctc_target_length=ctc_target_length).eval()
    perturb_parameters(model)
    with torch.no_grad():  # non-zero prototypes, so the prototype path is exercised too
        for m in ("text", "visual", "audio"):
            getattr(model, f"{m}_protos").pos_protos.normal_()
            getattr(model, f"{m}_protos").neg_protos.normal_()
    alone = make_batch({"text": [6], "visual": [9], "audio": [31]}, seed=1)
    longer = make_batch({"text": [60, 90], "visual": [150, 120], "audio": [640, 500]}, seed=2)
    with torch.no_grad():
        single = model(**alone)
        batched = model(**stack_samples([longer_sample(longer, 0), alone, longer_sample(longer, 1)]))
    for name, tensor in output_tensors(single).items():
        if name.endswith("slot_mask"):
            width = tensor.shape[1]
            assert torch.equal(getattr(batched, name)[1, :width], tensor[0])
            assert not getattr(batched, name)[1, width:].any()
        else:
            torch.testing.assert_close(getattr(batched, name)[1:2], tensor, atol=2e-5, rtol=1e-4, msg=name)


def longer_sample(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Sample ``index`` of a batch, cut to its own lengths."""
    sample = {}
    for name in ("text", "visual", "audio"):
        length = int(batch[f"{name}_mask"][index].sum())
        sample[name] = batch[name][index:index + 1, :length]
        sample[f"{name}_mask"] = batch[f"{name}_mask"][index:index + 1, :length]
    return sample


def test_adaptive_alignment_length_follows_the_formula():
    model = tiny_model(ctc_target_length=None, min_target_len=4, max_target_len=40).eval()
    # visual ratio 0.333, audio 0.1: round(L * r) clipped to [4, 40]
    batch = make_batch({"text": [5, 5, 5], "visual": [3, 60, 400], "audio": [20, 175, 900]})
    out = model(**batch)
    assert out.visual_slot_mask.sum(1).tolist() == [4, 20, 40]
    assert out.audio_slot_mask.sum(1).tolist() == [4, 18, 40]
    assert out.visual_slot_mask.shape[1] == 40 and out.audio_slot_mask.shape[1] == 40
    assert model.audio_align.lstm.hidden_size == 41


def test_fixed_alignment_length_masks_nothing():
    out = tiny_model().eval()(**make_batch(LENGTHS))
    assert out.visual_slot_mask.all() and out.audio_slot_mask.all()


def test_eager_and_sdpa_attention_agree():
    batch = make_batch(LENGTHS)
    sdpa = tiny_model(attention="sdpa").eval()
    eager = tiny_model(attention="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        for name, tensor in output_tensors(sdpa(**batch)).items():
            torch.testing.assert_close(output_tensors(eager(**batch))[name], tensor, atol=1e-5, rtol=1e-4)


def _loss_and_grads(model: CARAT, batch, seed: int = 5) -> tuple[dict, dict[str, torch.Tensor]]:
    loss_fn = CaratLoss.from_config(LossConfig(), tiny_config())
    torch.manual_seed(seed)  # same dropout masks and shuffle in both runs
    out = model(**batch)
    terms = loss_fn(model, out, labels_for(3))
    terms["total"].backward()
    return output_tensors(out), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_frames", [512, 7, None])  # one segment, several (not dividing), one block
def test_activation_checkpointing_changes_neither_outputs_nor_gradients(chunk_frames):
    batch = make_batch(LENGTHS)
    plain = tiny_model().train()
    ckpt = tiny_model(checkpoint_encoders=("text", "visual", "audio"), checkpoint_alignment=("visual", "audio"),
                      alignment_chunk_frames=chunk_frames).train()
    ckpt.load_state_dict(plain.state_dict())
    out_a, grads_a = _loss_and_grads(plain, batch)
    out_b, grads_b = _loss_and_grads(ckpt, batch)
    for name in out_a:
        torch.testing.assert_close(out_b[name], out_a[name], msg=name)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_reaches_every_trainable_parameter_but_the_poolers():
    model = tiny_model().train()
    _, grads = _loss_and_grads(model, make_batch(LENGTHS))
    missing = {n for n, p in model.named_parameters() if n not in grads or not grads[n].abs().sum() > 0}
    # The reference computes the encoders' poolers but no loss uses them.
    assert missing == {f"{m}_encoder.pooler.dense.{w}" for m in ("text", "visual", "audio")
                       for w in ("weight", "bias")}


def test_fixed_seed_gives_identical_training_steps():
    batch = make_batch(LENGTHS)
    out_a, grads_a = _loss_and_grads(tiny_model(seed=3).train(), batch, seed=11)
    out_b, grads_b = _loss_and_grads(tiny_model(seed=3).train(), batch, seed=11)
    for name in out_a:
        assert torch.equal(out_a[name], out_b[name]), name
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_bf16_autocast_on_cpu_gives_finite_outputs_and_loss():
    model = tiny_model().train()
    loss_fn = CaratLoss.from_config(LossConfig(), tiny_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_batch(LENGTHS))
        terms = loss_fn(model, out, labels_for(3))
    assert all(torch.isfinite(v.float()).all() for v in output_tensors(out).values())
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    model.update_memory(out, labels_for(3))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_cast_model_keeps_float32_memory():
    model = tiny_model().bfloat16().train()
    assert model.text_encoder.embedding.frame_projection.weight.dtype == torch.bfloat16
    assert model.queue.features.dtype == torch.float32 and model.text_protos.pos_protos.dtype == torch.float32
    batch = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in make_batch(LENGTHS).items()}
    out = model(**batch)
    model.update_memory(out, labels_for(3))
    assert model.queue.features.dtype == torch.float32 and int(model.queue.ptr) == 3 * 9 * 6


def test_long_text_is_an_error_or_a_counted_truncation():
    batch = make_batch({"text": [130, 20, 5], "visual": [9, 9, 9], "audio": [30, 30, 30]})
    with pytest.raises(ValueError, match=r"text: batch index \[0\] has \[130\] real steps.*text_max_positions=128"):
        tiny_model(text_max_positions=128).eval()(**batch)
    model = tiny_model(text_overflow="truncate", text_max_positions=128).eval()
    out = model(**batch)
    assert out.text_truncated == 1 and model.text_truncated_total == 1
    # Padding beyond the limit alone is no truncation.
    short = make_batch({"text": [20, 5], "visual": [9, 9], "audio": [30, 30]})
    short["text"] = torch.nn.functional.pad(short["text"], (0, 0, 0, 200))
    short["text_mask"] = torch.nn.functional.pad(short["text_mask"], (0, 200))
    assert tiny_model(text_max_positions=128).eval()(**short).text_truncated == 0
