"""Macro ROC-AUC and tuned-threshold metrics of carat.metrics, cross-checked against scikit-learn."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from carat.data.sources.segment import EMOTIONS
from carat.metrics import compute_metrics, macro_roc_auc, roc_auc, tune_thresholds, tuned_metrics
from tests.test_metrics import _random_case


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_auc_matches_sklearn_on_the_labels_with_both_classes(seed):
    y, scores = _random_case(seed)          # fear has no positive: it is left out, as sklearn must be told
    scores = np.round(scores, 1)            # many ties: they count one half
    both = [c for c in range(6) if 0 < y[:, c].sum() < len(y)]
    assert 5 not in both
    want = skm.roc_auc_score(y[:, both], scores[:, both], average="macro")
    assert macro_roc_auc(y, scores) == pytest.approx(want, abs=1e-12)
    got = compute_metrics(y, scores, 0.2)
    assert got["macro_auc"] == pytest.approx(want, abs=1e-12)
    for c in both:
        assert got["per_emotion"][EMOTIONS[c]]["auc"] == pytest.approx(skm.roc_auc_score(y[:, c], scores[:, c]))
    assert got["per_emotion"]["fear"]["auc"] is None
    assert json.loads(json.dumps(got)) == got


def test_auc_edge_cases():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == 0.5  # a constant score ranks nothing
    assert roc_auc(np.zeros(4), np.arange(4) / 4) is None
    y = np.zeros((4, 6), dtype=int)
    assert macro_roc_auc(y, np.full((4, 6), 0.5)) is None           # no emotion with both classes
    assert compute_metrics(y, np.full((4, 6), 0.5), 0.2)["macro_auc"] is None


def test_tuned_metrics_are_compute_metrics_at_tuned_thresholds():
    y, scores = _random_case(3)
    got = tuned_metrics(y, scores)
    assert got == compute_metrics(y, scores, tune_thresholds(y, scores))
    assert got["macro_f1"] >= compute_metrics(y, scores, 0.2)["macro_f1"] - 1e-12
