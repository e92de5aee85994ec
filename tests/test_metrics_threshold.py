"""One thresholding rule everywhere: float32(score) > float32(threshold), strict, in CARAT.predict, the metrics,
threshold tuning and carat.predict's files (the authors' code compares float32 tensors with the threshold too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carat.metrics import (
    above_threshold, binarize, compute_metrics, tune_shared_threshold, tune_thresholds,
)

AT = np.float32(0.2)               # 0.2000000030 in float64: above 0.2 there, equal to it in float32
ABOVE = np.nextafter(AT, np.float32(1.0))


def _scores(value) -> np.ndarray:
    scores = np.full((4, 6), 0.05, dtype=np.float32)
    scores[0, 0] = value
    return scores


def test_a_score_exactly_at_float32_threshold_is_negative_everywhere():
    assert not above_threshold(AT, 0.2) and above_threshold(ABOVE, 0.2)
    assert binarize(_scores(AT), 0.2)[0, 0] == 0 and binarize(_scores(ABOVE), 0.2)[0, 0] == 1
    y = np.zeros((4, 6), dtype=np.int64)
    y[0, 0] = 1
    assert compute_metrics(y, _scores(AT), 0.2)["per_emotion"]["happy"]["recall"] == 0.0
    assert compute_metrics(y, _scores(ABOVE), 0.2)["per_emotion"]["happy"]["recall"] == 1.0
    # float64 scores are the same decision once rounded to float32 (what the model produced)
    assert binarize(_scores(AT).astype(np.float64), 0.2)[0, 0] == 0


def test_carat_predict_agrees_with_the_metrics_at_the_threshold():
    from tests.model_helpers import tiny_model

    model = tiny_model(threshold=0.2)
    for value, expected in ((AT, False), (ABOVE, True)):
        scores = torch.from_numpy(_scores(value))
        model.scores = lambda out, s=scores: s  # the rule, not the network, is under test
        predicted = model.predict(None)
        assert bool(predicted[0, 0]) is expected
        assert np.array_equal(predicted.numpy().astype(np.int64), binarize(scores.numpy(), 0.2))


def test_tuned_thresholds_apply_the_same_rule():
    # Every positive sits exactly at a grid value: at that threshold it is a negative, so the F1-optimal
    # threshold is the grid point below it, with the per-emotion and the shared tuning alike.
    y = np.zeros((4, 6), dtype=np.int64)
    y[0, :] = 1
    scores = np.full((4, 6), 0.05, dtype=np.float32)
    scores[0, :] = np.float32(0.3)
    assert np.allclose(tune_thresholds(y, scores, grid=[0.1, 0.29, 0.3], default=0.3), 0.29)
    assert tune_shared_threshold(y, scores, grid=[0.1, 0.29, 0.3], default=0.3) == pytest.approx(0.29)


def test_prediction_files_use_the_rule(tmp_path):
    import csv

    from carat.predict import write_predictions

    out = tmp_path / "preds.csv"
    write_predictions(out, [f"clip{i}" for i in range(4)], _scores(AT), 0.2)
    with out.open() as handle:
        first = next(csv.DictReader(handle))
    assert int(first["happy"]) == 0
