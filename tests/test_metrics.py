"""carat.metrics cross-checked against scikit-learn on random data with empty rows and columns."""

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from carat.data.sources.segment import EMOTIONS
from carat.errors import DataError
from carat.metrics import (
    SUMMARY_METRICS,
    average_precision,
    binarize,
    compute_metrics,
    format_results_table,
    precision_recall_curve,
    tune_shared_threshold,
    tune_thresholds,
)


def _random_case(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Random labels/scores with all-zero rows, an all-zero label column and an all-zero score column."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.25).astype(np.int64)
    y[: n // 5] = 0                      # samples with no emotion (common in CMU-MOSEI)
    y[:, 5] = 0                          # an emotion with no positive (fear is rare)
    scores = np.clip(0.6 * y + rng.random((n, 6)) * 0.7 - 0.1, 0.0, 1.0)
    scores[:, 3] = 0.0                   # an emotion never predicted
    return y, scores


def _sklearn_reference(y: np.ndarray, pred: np.ndarray) -> dict:
    ref = {
        "accuracy": skm.jaccard_score(y, pred, average="samples", zero_division=1),
        "hamming_loss": skm.hamming_loss(y, pred),
    }
    for avg in ("micro", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        ref.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    return ref


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.2, 0.5, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
def test_metrics_match_sklearn(seed, threshold):
    y, scores = _random_case(seed)
    pred = (scores > np.asarray(threshold)).astype(int)
    got = compute_metrics(y, scores, threshold)
    for key, want in _sklearn_reference(y, pred).items():
        assert got[key] == pytest.approx(want, abs=1e-12), key

    p, r, f, support = skm.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for c, name in enumerate(EMOTIONS):
        e = got["per_emotion"][name]
        assert (e["precision"], e["recall"], e["f1"], e["support"]) == pytest.approx((p[c], r[c], f[c], support[c]))
    assert got["per_emotion"]["fear"]["support"] == 0 and got["per_emotion"]["fear"]["f1"] == 0.0
    assert got["n_samples"] == len(y) and got["n_positive"] == int(y.sum())


def test_reference_accuracy_scores_empty_samples_zero():
    y, scores = _random_case(3)
    pred = binarize(scores, 0.2)
    got = compute_metrics(y, scores, 0.2)
    both_empty = (y.sum(1) == 0) & (pred.sum(1) == 0)
    assert both_empty.any(), "the case must contain samples with no true and no predicted label"
    # Both variants agree on every other sample: they differ by exactly the empty samples' share.
    assert got["accuracy"] - got["accuracy_reference"] == pytest.approx(both_empty.mean())
    union = np.logical_or(y, pred).sum(1)
    manual = np.where(union > 0, np.logical_and(y, pred).sum(1) / np.maximum(union, 1), 0.0).mean()
    assert got["accuracy_reference"] == pytest.approx(manual)


def test_hand_computed_example():
    y = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    s = np.array([[0.9, 0.1, 0, 0, 0, 0], [0.3, 0.1, 0.5, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    got = compute_metrics(y, s, 0.2)
    # Sample Jaccards: 1, 1/3, empty -> 1 (or 0 for the reference variant).
    assert got["accuracy"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert got["accuracy_reference"] == pytest.approx((1 + 1 / 3) / 3)
    assert got["micro_precision"] == pytest.approx(2 / 3) and got["micro_recall"] == pytest.approx(2 / 3)
    assert got["hamming_loss"] == pytest.approx(2 / 18)


def test_result_is_json_serialisable_with_scalar_or_vector_threshold():
    y, scores = _random_case(4, n=40)
    for t in (0.2, np.full(6, 0.3)):
        got = compute_metrics(y, scores, t)
        assert json.loads(json.dumps(got)) == got
        assert set(SUMMARY_METRICS) <= set(got)
    assert compute_metrics(y, scores, 0.2)["threshold"] == 0.2
    assert compute_metrics(y, scores, np.full(6, 0.3))["threshold"] == [0.3] * 6


def test_bool_labels_accepted():
    y, scores = _random_case(5, n=30)
    assert compute_metrics(y.astype(bool), scores, 0.2) == compute_metrics(y, scores, 0.2)


def test_shared_threshold_maximises_micro_f1_against_a_brute_force():
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    for seed in range(3):
        y, scores = _random_case(seed)
        shared = tune_shared_threshold(y, scores)
        best = max(skm.f1_score(y, scores > g, average="micro", zero_division=0) for g in grid)
        assert compute_metrics(y, scores, shared)["micro_f1"] == pytest.approx(best)
        # 0.2 is on the grid, so the shared optimum is never below it
        assert compute_metrics(y, scores, shared)["micro_f1"] >= compute_metrics(y, scores, 0.2)["micro_f1"] - 1e-12


def test_shared_threshold_beats_per_emotion_thresholds_on_micro_f1_when_one_emotion_is_rare():
    # A rare, badly scored emotion's F1-optimal threshold is low: its false positives flood the pooled counts.
    rng = np.random.default_rng(0)
    n = 400
    y = np.zeros((n, 6), dtype=np.int64)
    y[:, :5] = rng.random((n, 5)) < 0.5
    y[:, 5] = rng.random(n) < 0.05
    scores = np.clip(0.5 * y + rng.normal(0.25, 0.2, (n, 6)), 0.0, 1.0)
    scores[:, 5] = 0.3 * rng.random(n)   # uninformative: its F1-optimal threshold predicts it for everyone
    per_emotion = compute_metrics(y, scores, tune_thresholds(y, scores))
    shared = compute_metrics(y, scores, tune_shared_threshold(y, scores))
    assert shared["micro_f1"] > per_emotion["micro_f1"]
    assert per_emotion["macro_f1"] >= shared["macro_f1"]


def test_tuned_thresholds_beat_or_equal_fixed_on_tuning_data():
    for seed in range(3):
        y, scores = _random_case(seed)
        t = tune_thresholds(y, scores)
        assert t.shape == (6,)
        tuned = compute_metrics(y, scores, t)
        fixed = compute_metrics(y, scores, 0.2)
        for name in EMOTIONS:  # 0.2 is on the grid, so no emotion's F1 can get worse
            assert tuned["per_emotion"][name]["f1"] >= fixed["per_emotion"][name]["f1"] - 1e-12
        assert tuned["macro_f1"] >= fixed["macro_f1"] - 1e-12
        # Per-emotion optimality against a brute force over the same grid.
        grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
        for c in range(6):
            best = max(skm.f1_score(y[:, c], scores[:, c] > g, zero_division=0) for g in grid)
            assert tuned["per_emotion"][EMOTIONS[c]]["f1"] == pytest.approx(best)


def test_tuning_ties_go_to_default_and_are_deterministic():
    y, scores = _random_case(6)
    t = tune_thresholds(y, scores, default=0.2)
    assert t[5] == 0.2          # no positives: F1 is 0 everywhere, keep the default
    assert t[3] == 0.2          # scores all 0: F1 is the same at every threshold > 0
    assert np.array_equal(t, tune_thresholds(y, scores, grid=DEFAULT_GRID_REVERSED, default=0.2))
    # Separable class: any threshold in the gap is optimal; the one closest to the default wins.
    y2 = np.zeros((4, 6), dtype=int)
    y2[:2, 0] = 1
    s2 = np.zeros((4, 6))
    s2[:, 0] = [0.9, 0.8, 0.1, 0.05]
    assert tune_thresholds(y2, s2, grid=[0.05, 0.3, 0.5, 0.9])[0] == 0.3  # 0.3 and 0.5 both optimal...
    assert tune_thresholds(y2, s2, grid=[0.15, 0.25, 0.5], default=0.2)[0] == 0.15  # ...equidistant: smaller


DEFAULT_GRID_REVERSED = np.round(np.arange(0.01, 1.0, 0.01), 2)[::-1]


def test_precision_recall_curve_matches_sklearn():
    y, scores = _random_case(7)
    scores = np.round(scores, 2)  # many ties
    for c in (0, 1, 2, 4):
        p, r, t = precision_recall_curve(y[:, c], scores[:, c])
        sp, sr, st = skm.precision_recall_curve(y[:, c], scores[:, c])
        np.testing.assert_allclose(p, sp)
        np.testing.assert_allclose(r, sr)
        np.testing.assert_allclose(t, st)
        assert average_precision(y[:, c], scores[:, c]) == pytest.approx(
            skm.average_precision_score(y[:, c], scores[:, c]))
    p, r, _ = precision_recall_curve(y[:, 5], scores[:, 5])  # no positives: recall 1 (sklearn's convention)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp, sr, _ = skm.precision_recall_curve(y[:, 5], scores[:, 5])
    np.testing.assert_allclose(p, sp)
    np.testing.assert_allclose(r, sr)


def test_format_results_table():
    y, scores = _random_case(8)
    t = tune_thresholds(y, scores)
    table = format_results_table({"valid @0.2": compute_metrics(y, scores, 0.2),
                                  "test @tuned": compute_metrics(y, scores, t)})
    lines = table.splitlines()
    assert "valid @0.2" in lines[0] and "test @tuned" in lines[0]
    micro = next(line for line in lines if line.startswith("micro_f1"))
    assert f"{compute_metrics(y, scores, 0.2)['micro_f1']:.4f}" in micro
    assert sum(line.startswith("f1/") for line in lines) == 6
    assert lines[-1].split()[-1] == str(len(y))
    with pytest.raises(DataError, match="no metric 'micro_f1'"):
        format_results_table({"x": {"accuracy": 1.0}}, metrics=("micro_f1",))
    with pytest.raises(DataError, match="at least one column"):
        format_results_table({})


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        (np.zeros((4, 5)), np.zeros((4, 6)), r"y_true must have shape \[N, 6\]"),
        (np.zeros((4, 6)), np.zeros((3, 6)), "scores has 3 samples but y_true has 4"),
        (np.full((4, 6), 2), np.zeros((4, 6)), "binary 0/1; sample 0, emotion 'happy' is 2"),
        (np.zeros((4, 6)), np.full((4, 6), np.nan), "NaN/inf"),
        (np.zeros((4, 6)), np.full((4, 6), 3.0), "probabilities in \\[0, 1\\]"),
        (np.zeros((0, 6)), np.zeros((0, 6)), "empty"),
    ],
)
def test_bad_inputs_raise(y, s, match):
    with pytest.raises(DataError, match=match):
        compute_metrics(y, s, 0.2)
    with pytest.raises(ValueError, match=match):  # DataError is a ValueError
        tune_thresholds(y, s)


def test_bad_thresholds_raise():
    y, scores = _random_case(9, n=10)
    with pytest.raises(DataError, match="one per emotion"):
        compute_metrics(y, scores, [0.2, 0.3])
    with pytest.raises(DataError, match="in \\[0, 1\\]"):
        compute_metrics(y, scores, float("nan"))
    with pytest.raises(DataError, match="grid"):
        tune_thresholds(y, scores, grid=[])


# ------------------------------------------------------------------ issue 26: the verdict against the prior
PREVALENCE = np.array([0.54, 0.24, 0.23, 0.10, 0.17, 0.08])


def _labels(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 6)) < PREVALENCE).astype(np.int64)


def _split(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    return {"labels": labels, "scores": scores}


def _card(floor_micro: float, floor_macro: float, *, shared: bool = True) -> dict:
    """A card whose pooled floor has the given test F1 (micro-F1 at one shared threshold when ``shared``) and
    whose train split has PREVALENCE."""
    fused = {"tuned_on_valid": {"micro_f1": floor_micro, "macro_f1": floor_macro}}
    if shared:
        fused["tuned_micro_on_valid"] = {"micro_f1": floor_micro, "macro_f1": floor_macro - 0.1}
    return {"reference_scorer": {"fused": fused, "all_positive_baseline": {"micro_f1": 0.3, "macro_f1": 0.3}},
            "label_prevalence": {"train": dict(zip(EMOTIONS, PREVALENCE.tolist()))}}


def test_the_prior_baseline_is_scored_under_the_models_own_threshold_rule():
    from carat.metrics import card_prior, split_results, tune_shared_threshold

    valid, test = _labels(0, 120), _labels(1, 120)
    prior = card_prior(_card(0.3, 0.2))
    assert prior.tolist() == PREVALENCE.tolist()
    model = np.random.default_rng(2).random((120, 6))
    results = split_results(_split(valid, model), _split(test, model), 0.2, True, prior=prior)
    baseline = results["prior_baseline"]
    assert baseline["source"] == "train" and baseline["scores"] == PREVALENCE.tolist()
    constant_valid, constant_test = np.tile(PREVALENCE, (120, 1)), np.tile(PREVALENCE, (120, 1))
    # thresholds tuned on valid, scored on test: exactly what the model's test_tuned* columns are
    shared = tune_shared_threshold(valid, constant_valid)
    assert baseline["test_tuned_micro"]["micro_f1"] == compute_metrics(test, constant_test, shared)["micro_f1"]
    assert baseline["test_tuned"]["macro_f1"] == compute_metrics(test, constant_test,
                                                                 tune_thresholds(valid, constant_valid))["macro_f1"]
    assert baseline["test"]["micro_f1"] == compute_metrics(test, constant_test, 0.2)["micro_f1"]
    # the shared threshold keeps the most frequent emotions only: above predicting every emotion
    everything = compute_metrics(test, np.ones((120, 6)), 0.5)["micro_f1"]
    assert baseline["test_tuned_micro"]["micro_f1"] > everything
    # without a card's train prevalence the valid split's stands in (the labels the thresholds are tuned on)
    fallback = split_results(_split(valid, model), _split(test, model), 0.2, True)["prior_baseline"]
    assert fallback["source"] == "valid" and fallback["scores"] == pytest.approx(valid.mean(0).tolist())
    assert results["scores_depend_on_input"] is True


def test_an_input_independent_predictor_above_the_floor_does_not_beat_its_baselines():
    """The issue's case: a predictor that ignores its input (here: the train prevalence as every clip's scores)
    scores above the pooled floor at a threshold tuned on valid. The verdict must not call that a success."""
    from carat.metrics import format_verdict, split_results, verdict

    valid, test = _labels(3, 200), _labels(4, 200)
    constant = np.tile(PREVALENCE, (200, 1))
    results = split_results(_split(valid, constant), _split(test, constant), 0.2, True, prior=PREVALENCE)
    tuned_micro = results["test_tuned_micro"]["micro_f1"]
    card = _card(tuned_micro - 0.03, results["test_tuned"]["macro_f1"] - 0.03)
    v = verdict(results, card)
    assert v["micro_rule"] == "shared"
    assert v["beats_floor"] is True                      # what the old verdict said, and all it looked at
    assert v["prior"] == {"micro_f1": tuned_micro, "macro_f1": results["test_tuned"]["macro_f1"]}
    assert v["beats_prior"] is False and v["depends_on_input"] is False and v["beats_baselines"] is False
    line = format_verdict(v)
    assert "label prior (input-independent)" in line
    assert "beats the floor" not in line and ": does not beat its baselines" in line, line


def test_a_model_whose_scores_ignore_the_input_does_not_beat_even_when_its_constants_win_on_test():
    """Constant scores in another order than the prior can beat the prior on test by chance: still no success."""
    from carat.metrics import format_verdict, verdict

    results = {"test": {"micro_f1": 0.45, "macro_f1": 0.40, "threshold": 0.2},
               "test_tuned": {"micro_f1": 0.45, "macro_f1": 0.40},
               "test_tuned_micro": {"micro_f1": 0.45, "macro_f1": 0.30},
               "prior_baseline": {"test": {"micro_f1": 0.40, "macro_f1": 0.35},
                                  "test_tuned": {"micro_f1": 0.40, "macro_f1": 0.35},
                                  "test_tuned_micro": {"micro_f1": 0.40, "macro_f1": 0.25}},
               "scores_depend_on_input": False}
    v = verdict(results, _card(0.35, 0.30))
    assert v["beats_floor"] and v["beats_prior"] and not v["beats_baselines"]
    assert format_verdict(v).endswith("does not beat its baselines: its test scores are the same for every clip "
                                      "(they do not depend on the input)")


def test_the_verdict_needs_both_the_floor_and_the_prior():
    from carat.metrics import format_verdict, verdict

    results = {"test": {"micro_f1": 0.55, "macro_f1": 0.40, "threshold": 0.2},
               "test_tuned": {"micro_f1": 0.60, "macro_f1": 0.45},
               "test_tuned_micro": {"micro_f1": 0.62, "macro_f1": 0.35},
               "prior_baseline": {"test": {"micro_f1": 0.40, "macro_f1": 0.30},
                                  "test_tuned": {"micro_f1": 0.41, "macro_f1": 0.36},
                                  "test_tuned_micro": {"micro_f1": 0.45, "macro_f1": 0.20}},
               "scores_depend_on_input": True}
    v = verdict(results, _card(0.50, 0.30))
    # like with like: the prior's micro-F1 at its own shared threshold, macro-F1 at its per-emotion ones
    assert v["prior"] == {"micro_f1": 0.45, "macro_f1": 0.36}
    assert v["prior_margin"] == pytest.approx({"micro_f1": 0.17, "macro_f1": 0.09})
    assert v["beats_baselines"] is True
    line = format_verdict(v)
    assert "label prior (input-independent) 0.450 / 0.360 (+0.170 / +0.090)" in line
    assert line.endswith(": beats the floor and the label prior")
    # above the floor, not above the prior on macro-F1
    results["prior_baseline"]["test_tuned"]["macro_f1"] = 0.45
    v = verdict(results, _card(0.50, 0.30))
    assert v["beats_floor"] and v["beats_prior"] is False and v["beats_baselines"] is False
    assert format_verdict(v).endswith(": does not beat the label prior (above it on micro-F1 only)")
    # the old compared-at-threshold path (train.tune_thresholds=false) compares the prior at the threshold too
    plain = {"test": results["test"], "prior_baseline": {"test": {"micro_f1": 0.40, "macro_f1": 0.30}}}
    v = verdict(plain, _card(0.60, 0.30, shared=False))
    assert v["compared"] == "threshold" and v["prior"] == {"micro_f1": 0.40, "macro_f1": 0.30}
    assert v["beats_prior"] is True and v["beats_floor"] is False
    assert format_verdict(v).endswith(": does not beat the floor (above it on macro-F1 only)")
    # results written before the prior existed: the floor alone, as before
    old = {k: results[k] for k in ("test", "test_tuned", "test_tuned_micro")}
    v = verdict(old, _card(0.50, 0.30))
    assert v["prior"] is None and v["beats_prior"] is None and v["beats_baselines"] is True
    assert format_verdict(v).endswith(": beats the floor")


def test_scores_depend_on_input():
    from carat.metrics import scores_depend_on_input

    scores = np.tile(PREVALENCE, (5, 1))
    assert scores_depend_on_input(scores) is False
    scores[3, 4] += 1e-3                   # one emotion of one clip moves: the model looks at its input
    assert scores_depend_on_input(scores) is True
    assert scores_depend_on_input(np.tile(PREVALENCE, (1, 1))) is True   # one clip says nothing
