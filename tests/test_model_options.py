"""The measured options of the learning fixes: feature standardisation, detached reconstruction targets,
prototype temperature, model diagnostics. Each default reproduces the reference."""

from __future__ import annotations

import pytest
import torch

from carat.errors import DataError
from carat.model import CaratLoss, LossConfig
from tests.model_helpers import labels_for, make_batch, perturb_parameters, tiny_config, tiny_model

LENGTHS = {"text": [7, 20, 3], "visual": [30, 11, 5], "audio": [90, 40, 17]}
DIMS = {"text": 300, "visual": 35, "audio": 74}


def _stats(scale: float = 3.0, shift: float = 2.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {m: (torch.full((d,), shift), torch.full((d,), scale)) for m, d in DIMS.items()}


def test_standardisation_is_applied_before_the_layernorm_and_keeps_padding_zero():
    model = tiny_model(standardize_features=True)
    model.set_feature_stats(_stats())
    batch = make_batch(LENGTHS)
    x, mask = batch["audio"], batch["audio_mask"]
    out = model.audio_standardize(x, mask)
    torch.testing.assert_close(out[mask], (x[mask] - 2.0) / 3.0)
    assert torch.all(out[~mask] == 0)


def test_standardised_model_equals_the_plain_model_on_pre_standardised_inputs():
    """standardize_features changes only the inputs the LayerNorms see (same weights otherwise)."""
    plain = tiny_model(seed=1)
    std = tiny_model(seed=1, standardize_features=True)
    std.load_state_dict(plain.state_dict(), strict=False)
    std.set_feature_stats(_stats())
    perturb_parameters(plain)
    perturb_parameters(std)
    plain.eval(), std.eval()
    batch = make_batch(LENGTHS)
    manual = dict(batch)
    for m in DIMS:
        manual[m] = (batch[m] - 2.0) / 3.0 * batch[f"{m}_mask"][..., None]
    with torch.no_grad():
        torch.testing.assert_close(std.scores(std(**batch)), plain.scores(plain(**manual)), rtol=1e-5, atol=1e-6)


def test_feature_stats_are_saved_with_the_model_and_checked():
    model = tiny_model(standardize_features=True)
    model.set_feature_stats(_stats(scale=4.0))
    state = model.state_dict()
    assert "visual_standardize.inv_std" in state and torch.allclose(state["visual_standardize.inv_std"],
                                                                     torch.full((35,), 0.25))
    with pytest.raises(ValueError, match="audio.*73/73"):
        model.set_feature_stats({**_stats(), "audio": (torch.zeros(73), torch.ones(73))})
    with pytest.raises(ValueError, match="std > 0"):
        model.set_feature_stats({**_stats(), "text": (torch.zeros(300), torch.zeros(300))})
    with pytest.raises(DataError, match="visual"):
        model.set_feature_stats({"text": _stats()["text"], "audio": _stats()["audio"]})
    with pytest.raises(ValueError, match="standardize_features"):
        tiny_model().set_feature_stats(_stats())


def test_detaching_removes_exactly_the_target_path():
    model = tiny_model().train()
    perturb_parameters(model)
    batch = make_batch(LENGTHS)
    out = model(**batch)
    z = out.label_features
    attached = CaratLoss.from_config(LossConfig(), tiny_config())._reconstruction_terms(out, torch.ones(3))
    detached = CaratLoss.from_config(LossConfig(detach_recon_targets=True),
                                     tiny_config())._reconstruction_terms(out, torch.ones(3))
    # label_features is the stacked Z; the reconstructions are computed from its parts, so the stack's own
    # gradient is exactly the path through the MSE targets.
    g_att = torch.autograd.grad(attached["recon_mse"], z, retain_graph=True)[0]
    g_det = torch.autograd.grad(detached["recon_mse"], z, retain_graph=True, allow_unused=True)[0]
    n = z[:, 0].numel()
    torch.testing.assert_close(g_att, -2.0 * (out.recon - z) / n, rtol=1e-4, atol=1e-7)
    assert g_det is None
    torch.testing.assert_close(attached["recon_mse"], detached["recon_mse"])  # same value, other gradient


def test_prototype_temperature_sharpens_the_choice():
    from carat.model.memory import LabelPrototypes

    warm, cold = LabelPrototypes(6, 8, 0.99), LabelPrototypes(6, 8, 0.99, temperature=0.1)
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(2, 6, 8, generator=g), dim=-1)
    for p in (warm, cold):
        p.pos_protos.copy_(protos[0])
        p.neg_protos.copy_(protos[1])
    latent = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g), dim=-1)
    s1, s01 = warm.similarity(latent), cold.similarity(latent)
    logits = torch.einsum("bcz,ncz->bcn", latent, protos)
    torch.testing.assert_close(s01, torch.softmax(logits / 0.1, dim=-1))
    assert (s01[..., 0] - 0.5).abs().mean() > (s1[..., 0] - 0.5).abs().mean()


def test_diagnostics_report_the_lstm_alignment_entropy_only_for_the_lstm():
    batch = make_batch(LENGTHS)
    lstm = tiny_model().train()
    lstm(**batch)
    diag = lstm.diagnostics()
    assert set(diag) == {"align/visual_entropy", "align/audio_entropy"}
    assert all(0.9 < v <= 1.0 + 1e-6 for v in diag.values())  # at init: nearly uniform (the measured problem)
    pool = tiny_model(aligner="pool").train()
    pool(**batch)
    assert pool.diagnostics() == {}


def test_reference_defaults_are_unchanged():
    cfg, loss = tiny_config(), LossConfig()
    assert cfg.aligner == "lstm" and cfg.prototype_temperature == 1.0 and not cfg.standardize_features
    assert cfg.modality_fusion == "max" and cfg.score_rule == "reference" and cfg.input_dropout == 0.0
    assert cfg.label_pooling == "attention"
    assert not loss.detach_recon_targets


def test_sum_fusion_adds_the_modality_logits_and_max_takes_the_largest():
    batch = make_batch(LENGTHS)
    outs = {}
    for fusion in ("max", "sum"):
        model = tiny_model(seed=2, modality_fusion=fusion).eval()
        perturb_parameters(model)
        with torch.no_grad():
            out = model(**batch)
            outs[fusion] = (out, model.classifiers(out.label_features))
    (out_max, per_mod), (out_sum, _) = outs["max"], outs["sum"]
    torch.testing.assert_close(out_max.lsr_logits, per_mod.amax(dim=1))
    torch.testing.assert_close(out_sum.lsr_logits, per_mod.sum(dim=1))


def test_with_lsr_score_rule_averages_in_the_label_feature_classifiers():
    batch = make_batch(LENGTHS)
    model = tiny_model(seed=3, score_rule="with_lsr").eval()
    perturb_parameters(model)
    with torch.no_grad():
        out = model(**batch)
        score = model.scores(out)
    expected = (torch.sigmoid(out.agg_logits).mean(1) + torch.sigmoid(out.srr_logits)
                + torch.sigmoid(out.lsr_logits)) / 3
    torch.testing.assert_close(score, expected)


def test_lsr_score_rule_scores_with_the_label_feature_classifiers_alone():
    batch = make_batch(LENGTHS)
    model = tiny_model(seed=3, score_rule="lsr").eval()
    perturb_parameters(model)
    with torch.no_grad():
        out = model(**batch)
        torch.testing.assert_close(model.scores(out), torch.sigmoid(out.lsr_logits))


def test_input_dropout_acts_in_training_only_and_keeps_padding_invariance():
    from tests.model_helpers import stack_samples

    model = tiny_model(seed=4, input_dropout=0.5)
    perturb_parameters(model)
    batch = make_batch(LENGTHS)
    model.eval()
    with torch.no_grad():
        a, b = model.scores(model(**batch)), model.scores(model(**batch))
        torch.testing.assert_close(a, b)
        alone = {k: v[:1] for k, v in batch.items()}
        torch.testing.assert_close(model.scores(model(**stack_samples([alone, {k: v[1:2] for k, v in batch.items()}])))[:1],
                                   model.scores(model(**alone)), rtol=1e-5, atol=1e-6)
    model.train()
    torch.manual_seed(0)
    t1 = model(**batch).lsr_logits
    torch.manual_seed(1)
    t2 = model(**batch).lsr_logits
    assert not torch.allclose(t1, t2)


def test_blank_modalities_zeroes_at_most_one_modality_per_sample():
    from carat.model.carat import blank_modalities

    torch.manual_seed(0)
    frames = tuple(torch.randn(400, 5, d) + 3.0 for d in (4, 3, 2))  # + 3: no real value is exactly 0
    blanked = torch.stack([(x == 0).flatten(1).all(dim=1) for x in blank_modalities(frames, 1.0)], dim=1)
    assert torch.all(blanked.sum(dim=1) == 1)  # rate 1: exactly one per sample...
    assert torch.all(blanked.float().mean(dim=0) > 0.25)  # ...drawn uniformly over the three
    kept = torch.stack([(x != 0).flatten(1).all(dim=1) for x in blank_modalities(frames, 0.3)], dim=1)
    assert torch.all(kept.sum(dim=1) >= 2)  # never more than one modality blanked
    assert 0.2 < 1 - kept.all(dim=1).float().mean() < 0.4
    for x, y in zip(frames, blank_modalities(frames, 0.0)):
        torch.testing.assert_close(x, y)


def test_modality_dropout_acts_in_training_only_and_on_one_encoder_per_sample():
    no_dropout = dict(text_dropout=0.0, visual_dropout=0.0, audio_dropout=0.0)
    model = tiny_model(seed=4, modality_dropout=0.9, **no_dropout)
    perturb_parameters(model)
    reference = tiny_model(seed=4, **no_dropout)
    reference.load_state_dict(model.state_dict())
    batch = make_batch(LENGTHS)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.scores(model(**batch)), reference.scores(reference(**batch)))
    model.train(), reference.train()
    torch.manual_seed(1)
    with torch.no_grad():
        changed = (model(**batch).pooled - reference(**batch).pooled).abs().amax(dim=-1) > 1e-6  # [B, 3]
    # The encoders are per modality: a blanked modality changes its own pooled output and nothing else.
    assert changed.any() and torch.all(changed.sum(dim=1) <= 1)


def test_max_label_pooling_is_the_masked_max_over_real_steps_for_every_label():
    from tests.model_helpers import stack_samples

    batch = make_batch(LENGTHS)
    model = tiny_model(seed=5, label_pooling="max").eval()
    perturb_parameters(model)
    assert not hasattr(model.audio_attention, "scores")  # no attention parameters left to train
    h = torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    h_padded = h.masked_fill(~mask[..., None], 1e6)  # padding larger than any real step must not win the max
    z = model.text_attention(h_padded, mask)
    for b in range(3):
        expected = h[b, mask[b]].amax(dim=0)
        for c in range(z.shape[1]):
            torch.testing.assert_close(z[b, c], expected)
    with torch.no_grad():  # a sample's scores do not depend on the padding of its batch
        alone = {k: v[1:2] for k, v in batch.items()}
        both = stack_samples([{k: v[:1] for k, v in batch.items()}, alone])
        torch.testing.assert_close(model.scores(model(**both))[1:], model.scores(model(**alone)),
                                   rtol=1e-5, atol=1e-6)


def test_attention_plus_max_label_pooling_adds_the_two():
    both = tiny_model(seed=6, label_pooling="attention+max")
    attention = tiny_model(seed=6)
    attention.load_state_dict(both.state_dict())
    h, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    peak = h.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)[:, None, :]
    torch.testing.assert_close(both.visual_attention(h, mask), attention.visual_attention(h, mask) + peak)


@pytest.mark.parametrize("key,value", [("label_pooling", "mean"), ("modality_fusion", "mean"), ("score_rule", "all"), ("input_dropout", 1.0), ("modality_dropout", -0.1),
                                       ("aligner", "conv"), ("prototype_temperature", 0.0)])
def test_bad_option_values_are_config_errors(key, value):
    from carat.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        tiny_config(**{key: value})


def test_temporal_conv_starts_as_the_reference_and_keeps_padding_invariance():
    from tests.model_helpers import stack_samples

    batch = make_batch(LENGTHS)
    plain = tiny_model(seed=6).eval()
    conv = tiny_model(seed=7, temporal_conv_kernel=5).eval()
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("temporal_conv" in k for k in missing)
    with torch.no_grad():
        # Zero-initialised: the untrained option computes exactly the reference model.
        torch.testing.assert_close(conv.scores(conv(**batch)), plain.scores(plain(**batch)))
        perturb_parameters(conv)
        assert conv.audio_encoder.embedding.temporal_conv.weight.abs().sum() > 0
        # Sample 0 at its own lengths, then beside a longer sample with random (finite) padding.
        alone = {}
        for m, lengths in LENGTHS.items():
            alone[m], alone[f"{m}_mask"] = batch[m][:1, :lengths[0]], batch[f"{m}_mask"][:1, :lengths[0]]
        other = {k: v[1:2] for k, v in batch.items()}
        together = conv.scores(conv(**stack_samples([alone, other])))[:1]
        torch.testing.assert_close(together, conv.scores(conv(**alone)), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(conv.scores(conv(**batch)), plain.scores(plain(**batch)))


@pytest.mark.parametrize("width", [-1, 2, 4])
def test_temporal_conv_width_must_be_zero_or_odd(width):
    from carat.errors import ConfigError

    with pytest.raises(ConfigError, match="model.temporal_conv_kernel"):
        tiny_config(temporal_conv_kernel=width)
