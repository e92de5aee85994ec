"""Prototypes (closed-form EMA vs the reference loop), queue ring buffer, gather hook, shuffle indices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carat.model.carat import shuffle_indices
from carat.model.losses import contrastive_class_ids
from carat.model.memory import ContrastiveQueue, LabelPrototypes, ema_closed_form
from tests.model_helpers import labels_for, make_batch, tiny_model

LENGTHS = {"text": [7, 20, 3], "visual": [30, 11, 5], "audio": [90, 40, 17]}


def update_protos_loop(pos: torch.Tensor, neg: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                       m: float) -> None:
    """The reference's update_protos, verbatim in behaviour."""
    for i in range(feats.shape[0]):
        for j in range(feats.shape[1]):
            if labels[i][j] == 1:
                pos[j] = pos[j] * m + (1 - m) * feats[i][j]
            else:
                neg[j] = neg[j] * m + (1 - m) * feats[i][j]


def test_closed_form_ema_equals_the_sequential_loop():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(40, 6, 8, generator=g), dim=-1)
    labels = torch.randint(0, 2, (40, 6), generator=g).float()
    labels[:, 5] = 0  # a label never present: its positive prototype must not move
    protos = LabelPrototypes(6, 8, momentum=0.99)
    protos.pos_protos.normal_(generator=g)
    pos, neg = protos.pos_protos.clone(), protos.neg_protos.clone()
    update_protos_loop(pos, neg, feats, labels, 0.99)
    protos.update(feats, labels)
    torch.testing.assert_close(protos.pos_protos, pos, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(protos.neg_protos, neg, atol=1e-6, rtol=1e-5)
    assert torch.equal(ema_closed_form(pos, feats, torch.zeros(40, 6, dtype=torch.bool), 0.9), pos)


def test_queue_ring_buffer_equals_writing_rows_one_by_one():
    queue = ContrastiveQueue(size=10, latent_size=3)
    expected_rows, expected_ids, ptr = queue.features.clone(), queue.ids.clone(), 0
    g = torch.Generator().manual_seed(0)
    for n in (4, 7, 0, 23, 9):
        rows, ids = torch.randn(n, 3, generator=g), torch.arange(n) + 100 * n
        for row, row_id in zip(rows, ids):
            expected_rows[ptr], expected_ids[ptr], ptr = row, row_id, (ptr + 1) % 10
        queue.enqueue(rows, ids)
        assert torch.equal(queue.features, expected_rows) and torch.equal(queue.ids, expected_ids)
        assert int(queue.ptr) == ptr


def test_update_memory_uses_features_gathered_from_all_ranks():
    """Simulate 2 ranks: the gather hook appends the other rank's packed rows (2 samples) to this rank's (3)."""
    model = tiny_model(queue_size=512).train()
    other = make_batch({"text": [4, 9], "visual": [8, 3], "audio": [20, 44]}, seed=4)
    torch.manual_seed(0)
    out_other = model(**other)
    labels_other = labels_for(2, seed=8)
    torch.manual_seed(1)
    out = model(**make_batch(LENGTHS))
    labels = labels_for(3)
    calls = []

    def pack(o, y):
        rows = F.normalize(o.contrast_features, dim=-1).reshape(y.shape[0], -1)
        return torch.cat([rows, y, torch.ones(y.shape[0], 1)], dim=1)

    def fake_gather(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return torch.cat([t, pack(out_other, labels_other).detach()])

    protos_before = {m: getattr(model, f"{m}_protos").pos_protos.clone() for m in ("text", "visual", "audio")}
    negs_before = {m: getattr(model, f"{m}_protos").neg_protos.clone() for m in ("text", "visual", "audio")}
    model.update_memory(out, labels, gather=fake_gather)

    assert len(calls) == 1
    torch.testing.assert_close(calls[0], pack(out, labels).detach())
    all_rows = torch.cat([F.normalize(out.contrast_features, dim=-1), F.normalize(out_other.contrast_features,
                                                                                  dim=-1)]).detach()
    all_labels = torch.cat([labels, labels_other])
    n = 5 * 9 * 6
    torch.testing.assert_close(model.queue.features[:n], all_rows.reshape(-1, 8))
    assert torch.equal(model.queue.ids[:n], contrastive_class_ids(all_labels).reshape(-1))
    assert (model.queue.ids[n:] == -1).all() and int(model.queue.ptr) == n
    for m_index, m in enumerate(("text", "visual", "audio")):
        pos, neg = protos_before[m].clone(), negs_before[m].clone()
        update_protos_loop(pos, neg, all_rows[:, m_index], all_labels, 0.99)
        torch.testing.assert_close(getattr(model, f"{m}_protos").pos_protos, pos)
        torch.testing.assert_close(getattr(model, f"{m}_protos").neg_protos, neg)


def test_update_memory_skips_filler_samples():
    model = tiny_model().train()
    out = model(**make_batch(LENGTHS))
    model.update_memory(out, labels_for(3), sample_weight=torch.tensor([1.0, 0.0, 1.0]))
    assert int(model.queue.ptr) == 2 * 9 * 6
    kept = F.normalize(out.contrast_features[[0, 2]], dim=-1).detach().reshape(-1, 8)
    torch.testing.assert_close(model.queue.features[: 2 * 9 * 6], kept)


def test_update_memory_refuses_an_eval_output():
    model = tiny_model().eval()
    out = model(**make_batch(LENGTHS))
    try:
        model.update_memory(out, labels_for(3))
    except ValueError as error:
        assert "training-mode" in str(error)
    else:
        raise AssertionError("expected ValueError")


def test_shuffle_indices_are_permutations_with_the_reference_layout():
    torch.manual_seed(0)
    sample, modality = shuffle_indices(batch=5, num_classes=6, device=torch.device("cpu"))
    assert sample.shape == modality.shape == (5, 3, 6)
    for c in range(6):
        for slot in range(3):
            assert sorted(sample[:, slot, c].tolist()) == list(range(5))  # one sample permutation per (c, slot)
        for b in range(5):
            assert sorted(modality[b, :, c].tolist()) == [0, 1, 2]  # one modality permutation per (c, b)


def test_shuffle_indices_are_uniform_over_permutations():
    torch.manual_seed(0)
    sample, _ = shuffle_indices(batch=3, num_classes=6, device=torch.device("cpu"))
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(200):
        sample, _ = shuffle_indices(batch=3, num_classes=6, device=torch.device("cpu"))
        for c in range(6):
            for slot in range(3):
                key = tuple(sample[:, slot, c].tolist())
                counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6 and min(counts.values()) > 0.8 * 3600 / 6
