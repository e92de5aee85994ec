"""CARAT objective: SupCon against an explicit-loop reference, class ids, every term, weights, filler samples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from carat.errors import ConfigError
from carat.model import TERMS, CaratLoss, LossConfig
from carat.model.losses import contrastive_class_ids, supcon_loss
from tests.model_helpers import labels_for, make_batch, stack_samples, tiny_config, tiny_model

LENGTHS = {"text": [7, 20, 3], "visual": [30, 11, 5], "audio": [90, 40, 17]}


def supcon_by_loops(features: torch.Tensor, ids: list[int], valid: list[bool], t: float, base: float) -> float:
    """SupCon written out element by element (float64), following the definition in losses.supcon_loss."""
    f = features.double()
    n = len(ids)
    total, anchors = 0.0, 0
    for i in range(n):
        if not valid[i]:
            continue
        anchors += 1
        contrast = [a for a in range(n) if a != i and valid[a]]
        positives = [p for p in contrast if ids[p] == ids[i] and ids[i] != -1]
        if not positives:
            continue
        denominator = sum(math.exp(float(f[i] @ f[a]) / t) for a in contrast)
        mean_log = sum(float(f[i] @ f[p]) / t - math.log(denominator) for p in positives) / len(positives)
        total += -(t / base) * mean_log
    return total / max(anchors, 1)


def test_supcon_equals_the_loop_reference():
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(14, 5, generator=g), dim=1)
    ids = [0, 1, 0, 2, 1, 0, 3, -1, -1, 2, 4, 1, -1, 0]
    valid = [True] * 12 + [False, True]
    valid[8] = False
    got = supcon_loss(features, torch.tensor(ids), torch.tensor(valid), 0.07, 0.07)
    assert got.item() == pytest.approx(supcon_by_loops(features, ids, valid, 0.07, 0.07), rel=1e-4)
    got = supcon_loss(features, torch.tensor(ids), torch.tensor(valid), 0.5, 0.07)
    assert got.item() == pytest.approx(supcon_by_loops(features, ids, valid, 0.5, 0.07), rel=1e-4)


def test_chunked_supcon_equals_one_chunk_in_value_and_gradient():
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(23, 5, generator=g)
    ids = torch.randint(-1, 4, (23,), generator=g)
    valid = torch.rand(23, generator=g) > 0.2
    results = []
    for chunk in (100, 4):
        leaf = raw.clone().requires_grad_(True)
        loss = supcon_loss(F.normalize(leaf, dim=1), ids, valid, 0.07, 0.07, chunk_rows=chunk)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_supcon_matches_the_reference_formula_when_all_rows_count():
    """The reference's SupConLoss (mask = equal ids, self excluded, mean over all anchors)."""
    g = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(10, 4, generator=g), dim=1)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 5])
    logits = f @ f.T / 0.07
    logits = logits - logits.max(1, keepdim=True).values
    logits_mask = 1 - torch.eye(10)
    mask = (ids[:, None] == ids[None, :]).float() * logits_mask
    log_prob = logits - torch.log((logits.exp() * logits_mask).sum(1, keepdim=True) + 1e-12)
    reference = (-(mask * log_prob).sum(1) / (mask.sum(1) + 1e-12)).mean()
    got = supcon_loss(f, ids, torch.ones(10, dtype=torch.bool), 0.07, 0.07)
    torch.testing.assert_close(got, reference)


def dense_supcon(features: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, t: float, base: float):
    """The definition with explicit N x N masks, in autograd-able tensor ops (for gradients)."""
    n = features.shape[0]
    logits = features @ features.T / t
    contrast = ~torch.eye(n, dtype=torch.bool) & valid[None, :]
    positive = contrast & (ids[:, None] == ids[None, :]) & (ids != -1)[:, None]
    log_den = torch.logsumexp(logits.masked_fill(~contrast, float("-inf")), dim=1, keepdim=True)
    log_prob = (logits - log_den).masked_fill(~positive, 0.0)
    count = positive.sum(1)
    per_anchor = -(t / base) * log_prob.sum(1) / count.clamp_min(1)
    return torch.where(valid & (count > 0), per_anchor, 0.0).sum() / valid.sum().clamp_min(1)


@pytest.mark.parametrize("temperature", [0.03, 0.07, 0.3])
def test_supcon_gradient_equals_the_dense_definition(temperature):
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(40, 6, generator=g)
    ids = torch.randint(-1, 5, (40,), generator=g)
    valid = torch.rand(40, generator=g) > 0.25
    grads = []
    for fn in (supcon_loss, dense_supcon):
        leaf = raw.clone().requires_grad_(True)
        loss = fn(F.normalize(leaf, dim=1), ids, valid, temperature, 0.07)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)


def test_supcon_with_a_fixed_id_count_equals_the_measured_one():
    """num_ids (what the loss passes, so that no ids.max() syncs the host each step) changes nothing, also when
    the highest ids are absent from the rows."""
    g = torch.Generator().manual_seed(8)
    raw = torch.randn(50, 4, generator=g)
    ids = torch.randint(-1, 20, (50,), generator=g)
    valid = torch.rand(50, generator=g) > 0.2
    results = []
    for num_ids in (None, 36):
        leaf = raw.clone().requires_grad_(True)
        loss = supcon_loss(F.normalize(leaf, dim=1), ids, valid, 0.07, 0.07, num_ids=num_ids)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-6)


def test_supcon_with_one_valid_row_is_zero_with_finite_gradient():
    """Nothing to contrast against (a queue still empty, a one-clip batch): 0, and no NaN reaches the encoders."""
    leaf = torch.randn(5, 3).requires_grad_(True)
    valid = torch.tensor([False, True, False, False, False])
    loss = supcon_loss(F.normalize(leaf, dim=1), torch.tensor([0, 0, 0, -1, 1]), valid, 0.07, 0.07)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(leaf.grad).all()


def test_contrastive_class_ids_follow_modality_label_and_polarity():
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    ids = contrastive_class_ids(labels)
    assert ids.shape == (1, 9, 6)
    c = 6
    for stage in range(9):
        m = stage % 3
        assert ids[0, stage].tolist() == [0 + c * 2 * m, 1 + c * (2 * m + 1), 2 + c * (2 * m + 1),
                                          3 + c * (2 * m + 1), 4 + c * (2 * m + 1), 5 + c * 2 * m]
    assert ids.max() < 36


def _terms(model, batch, labels, weight=None, seed=3):
    loss_fn = CaratLoss.from_config(LossConfig(), tiny_config())
    torch.manual_seed(seed)
    out = model(**batch, sample_weight=weight)
    return loss_fn(model, out, labels, sample_weight=weight), out


def test_every_term_is_reported_and_total_is_the_weighted_sum():
    model = tiny_model().train()
    terms, _ = _terms(model, make_batch(LENGTHS), labels_for(3))
    assert set(terms) == set(TERMS) | {"total"}
    cfg = LossConfig()
    weights = {t: getattr(cfg, f"{t}_weight") for t in TERMS if t != "supcon"} | {"supcon": cfg.cl_weight}
    expected = sum(weights[t] * terms[t] for t in TERMS)
    torch.testing.assert_close(terms["total"], expected)
    assert all(terms[t] > 0 for t in TERMS)


def test_eval_output_reports_zero_for_training_only_terms():
    model = tiny_model().eval()
    terms, _ = _terms(model, make_batch(LENGTHS), labels_for(3))
    assert terms["supcon"] == 0 and terms["shuffle_aug_clf"] == 0 and terms["final_clf"] > 0


def test_pos_weight_scales_the_positive_part_of_bce():
    model = tiny_model().eval()
    batch, labels = make_batch(LENGTHS), labels_for(3)
    out = model(**batch)
    cfg = tiny_config()
    plain = CaratLoss.from_config(LossConfig(pos_weight=(1.0,) * 6), cfg)(model, out, labels)
    weighted = CaratLoss.from_config(LossConfig(), cfg)(model, out, labels)
    logits = out.srr_logits
    pw = torch.tensor(LossConfig().pos_weight)
    by_hand = -(pw * labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(weighted["final_clf"], by_hand)
    torch.testing.assert_close(plain["final_clf"], F.binary_cross_entropy_with_logits(logits, labels))
    with pytest.raises(ConfigError, match="pos_weight has 2 values"):
        CaratLoss.from_config(LossConfig(pos_weight=(1.0, 2.0)), cfg)


def test_filler_samples_change_no_term():
    """A weight-0 filler sample added to a batch leaves every term as without it (the shuffle term aside,
    whose random draws depend on the batch size) and never feeds the shuffle of real samples."""
    model = tiny_model(text_dropout=0.0, visual_dropout=0.0, audio_dropout=0.0).train()
    batch = make_batch(LENGTHS)
    filler = make_batch({"text": [9], "visual": [13], "audio": [40]}, seed=9)
    samples = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(3)]
    padded = stack_samples(samples[:1] + [filler] + samples[1:], garbage=False)
    labels = labels_for(3)
    with_filler = torch.cat([labels[:1], torch.ones(1, 6), labels[1:]])
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0])
    base, _ = _terms(model, stack_samples(samples, garbage=False), labels)
    extra, out = _terms(model, padded, with_filler, weight=weight)
    for name in TERMS:
        if name != "shuffle_aug_clf":
            torch.testing.assert_close(extra[name], base[name], atol=2e-5, rtol=1e-4, msg=name)
    index = out.shuffle_sample_index
    assert (index[1] == 1).all() and (index[[0, 2, 3]] != 1).all()  # the filler only ever feeds itself
    for c in range(6):
        for slot in range(3):
            assert sorted(index[[0, 2, 3], slot, c].tolist()) == [0, 2, 3]  # a permutation of the real samples
    assert torch.isfinite(extra["shuffle_aug_clf"])


def test_filler_only_batch_gives_a_zero_loss_with_gradients():
    model = tiny_model().train()
    terms, _ = _terms(model, make_batch(LENGTHS), labels_for(3), weight=torch.zeros(3))
    assert all(terms[t] == 0 for t in TERMS)
    terms["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_empty_queue_rows_are_harmless():
    """Before the queue fills, SupCon equals SupCon over the batch rows alone."""
    model = tiny_model().train()
    terms, out = _terms(model, make_batch(LENGTHS), labels_for(3))
    rows = F.normalize(out.contrast_features, dim=-1).reshape(-1, 8)
    ids = contrastive_class_ids(labels_for(3)).reshape(-1)
    alone = supcon_loss(rows, ids, torch.ones(len(ids), dtype=torch.bool), 0.07, 0.07)
    torch.testing.assert_close(terms["supcon"], alone)
    assert torch.allclose(model.queue.features.norm(dim=1), torch.ones(256))
    assert (model.queue.ids == -1).all()
