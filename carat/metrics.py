"""Multi-label emotion recognition metrics for CMU-MOSEI (numpy only).

The metrics CARAT reports (Peng et al., AAAI 2024, as multi-modal multi-label emotion recognition papers before
it, e.g. TAILOR, report them), as its published code computes them (utils/eval.py) except where said:

- accuracy: the sample-wise Jaccard index |y AND y_hat| / |y OR y_hat| averaged over samples. A sample with
  no true and no predicted label is a perfect prediction and scores 1 (sklearn's ``jaccard_score(...,
  average="samples", zero_division=1)``). ``accuracy_reference`` scores that case 0, as the published code
  does (when |y OR y_hat| is 0 it sets the denominator to 1, so the sample scores 0 / 1); report it only to
  compare with papers.
- hamming_loss: the fraction of wrong (sample, emotion) decisions.
- micro / macro precision, recall, F1 and per-emotion precision, recall, F1, support, with sklearn's
  ``zero_division=0`` semantics: a ratio whose denominator is 0 is 0.

- macro_auc: ROC-AUC per emotion, averaged over the emotions that have both classes in the split (sklearn's
  ``roc_auc_score(..., average="macro")`` on those columns; None when no emotion has both). It does not
  depend on a threshold, so it moves smoothly between epochs where F1 at a fixed threshold jumps.

A prediction is positive when its score is above the threshold, compared in float32 (:func:`above_threshold`: the
one rule of ``CARAT.predict``, carat.predict's files and the authors' code); thresholds may differ per emotion.
Every function validates its inputs and raises :class:`carat.errors.DataError` (a ValueError) naming the
problem.

The end of the module judges a run against its dataset card: :func:`verdict` (the model's test scores next to
the card's pooled-feature floor, the label prior, the predict-every-emotion baseline and, when the card has
one, the oracle) and :func:`result_warnings`. A run beats its baselines only when it is above both the floor
and the label prior (the train split's per-emotion prevalence as every clip's scores: the best a predictor
that ignores its input does), each compared under the model's own threshold rule, and its test scores depend
on the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from carat.data.sources.segment import EMOTIONS
from carat.errors import DataError

NUM_CLASSES = len(EMOTIONS)

DEFAULT_THRESHOLD_GRID: np.ndarray = np.round(np.arange(0.01, 1.0, 0.01), 2)
"""Candidate thresholds of :func:`tune_thresholds`: 0.01, 0.02, ..., 0.99."""

SUMMARY_METRICS: tuple[str, ...] = (
    "accuracy",
    "accuracy_reference",
    "hamming_loss",
    "micro_precision",
    "micro_recall",
    "micro_f1",
    "macro_precision",
    "macro_recall",
    "macro_f1",
)
"""The scalar metrics of :func:`compute_metrics`, in table order."""


# ---------------------------------------------------------------------------------------------- validation
def _check_labels(y_true: np.ndarray, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 2 or y.shape[1] != NUM_CLASSES:
        raise DataError(f"{name} must have shape [N, {NUM_CLASSES}] (one column per emotion {EMOTIONS}); "
                        f"got shape {y.shape}")
    if y.shape[0] == 0:
        raise DataError(f"{name} is empty (0 samples); metrics need at least one sample")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{name} must be numeric 0/1 labels; got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{name} must be binary 0/1; sample {row}, emotion {EMOTIONS[col]!r} is {y[row, col].item()!r}"
                        f" ({int(bad.sum())} non-binary entries)")
    return y.astype(np.int64)


def _check_scores(scores: np.ndarray, n: int | None = None) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[1] != NUM_CLASSES:
        raise DataError(f"scores must have shape [N, {NUM_CLASSES}]; got shape {s.shape}")
    if n is not None and s.shape[0] != n:
        raise DataError(f"scores has {s.shape[0]} samples but y_true has {n}; they must match row for row")
    if not np.issubdtype(s.dtype, np.number) or s.dtype == bool:
        raise DataError(f"scores must be float probabilities; got dtype {s.dtype}")
    s = s.astype(np.float64)
    finite = np.isfinite(s)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise DataError(f"scores contain {int((~finite).sum())} NaN/inf values (first: sample {row}, "
                        f"emotion {EMOTIONS[col]!r} = {s[row, col]})")
    if s.min() < 0.0 or s.max() > 1.0:
        # Logits passed by mistake would make a probability threshold meaningless.
        raise DataError(f"scores must be probabilities in [0, 1]; got range [{s.min():.4g}, {s.max():.4g}] "
                        "(pass model.scores(out), not logits)")
    return s


def _check_threshold(threshold: float | np.ndarray) -> np.ndarray:
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(NUM_CLASSES, float(t))
    if t.shape != (NUM_CLASSES,):
        raise DataError(f"threshold must be a float or an array of {NUM_CLASSES} (one per emotion); "
                        f"got shape {t.shape}")
    if not np.isfinite(t).all() or t.min() < 0.0 or t.max() > 1.0:
        raise DataError(f"threshold values must be finite and in [0, 1]; got {t.tolist()}")
    return t


def validate_inputs(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked copies of labels (int64 0/1 [N, 6]) and probability scores (float64 [N, 6], same N)."""
    y = _check_labels(y_true)
    return y, _check_scores(scores, n=y.shape[0])


# ------------------------------------------------------------------------------------------------- metrics
def above_threshold(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """The decision rule, everywhere in carat: ``float32(score) > float32(threshold)`` (broadcast), a bool array.

    ``CARAT.predict`` compares its float32 scores with the threshold in float32 (torch casts a Python float to
    the tensor's dtype), and so do the authors' code and the scores carat writes; comparing in float64 instead
    would call a score of exactly float32(0.2) = 0.2000000030 positive at threshold 0.2, where predict says no.
    """
    return np.asarray(scores, dtype=np.float32) > np.asarray(threshold, dtype=np.float32)


def binarize(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Predicted labels [N, 6] (int 0/1): :func:`above_threshold` (thresholds broadcast per emotion)."""
    return above_threshold(_check_scores(scores), _check_threshold(threshold)[None, :]).astype(np.int64)


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den, 0 where den == 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    # F1 = 2tp / (2tp + fp + fn) equals the harmonic mean of P and R and is 0 where it is undefined.
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    return precision, recall, f1


def jaccard_accuracy(y_true: np.ndarray, y_pred: np.ndarray, *, empty_score: float = 1.0) -> float:
    """Mean sample-wise Jaccard index; a sample whose true and predicted label sets are both empty scores
    ``empty_score`` (1: the set prediction is exactly right; 0: the published code's convention)."""
    inter = np.logical_and(y_true, y_pred).sum(axis=1)
    union = np.logical_or(y_true, y_pred).sum(axis=1)
    per_sample = np.where(union > 0, _safe_div(inter, union), empty_score)
    return float(per_sample.mean())


def compute_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray) -> dict:
    """All evaluation metrics of one split at one threshold (a float or one per emotion).

    Returns a JSON-serialisable dict: the scalars named in :data:`SUMMARY_METRICS`, ``macro_auc`` (a float,
    or None when no emotion has both classes), ``per_emotion`` (emotion -> precision, recall, f1, support,
    auc; auc None for a one-class emotion), ``n_samples``, ``n_positive`` (true labels) and ``threshold`` (a
    float, or a list of 6 when per-emotion thresholds were given).
    """
    y, s = validate_inputs(y_true, scores)
    t = _check_threshold(threshold)
    y_pred = above_threshold(s, t[None, :]).astype(np.int64)

    tp = (y & y_pred).sum(axis=0)
    fp = ((1 - y) & y_pred).sum(axis=0)
    fn = (y & (1 - y_pred)).sum(axis=0)
    precision, recall, f1 = _prf(tp, fp, fn)
    micro_p, micro_r, micro_f1 = _prf(tp.sum(), fp.sum(), fn.sum())
    support = y.sum(axis=0)
    auc = [roc_auc(y[:, c], s[:, c]) for c in range(NUM_CLASSES)]

    scalar_threshold = np.ndim(threshold) == 0
    return {
        "accuracy": jaccard_accuracy(y, y_pred, empty_score=1.0),
        "accuracy_reference": jaccard_accuracy(y, y_pred, empty_score=0.0),
        "hamming_loss": float((y != y_pred).mean()),
        "micro_precision": float(micro_p),
        "micro_recall": float(micro_r),
        "micro_f1": float(micro_f1),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "macro_auc": _mean_defined(auc),
        "per_emotion": {
            name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                   "support": int(support[c]), "auc": auc[c]}
            for c, name in enumerate(EMOTIONS)
        },
        "n_samples": int(y.shape[0]),
        "n_positive": int(support.sum()),
        "threshold": float(t[0]) if scalar_threshold else [float(v) for v in t],
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with ties sharing their average rank (the Mann-Whitney convention)."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of one emotion (1-d labels and scores), None when only one class is present.

    Computed as the Mann-Whitney statistic: the probability that a random positive scores above a random
    negative, ties counting one half (equal to sklearn's ``roc_auc_score``).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def macro_roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean ROC-AUC over the emotions that have both classes in ``y_true`` (None if none has)."""
    y, s = validate_inputs(y_true, scores)
    return _mean_defined([roc_auc(y[:, c], s[:, c]) for c in range(NUM_CLASSES)])


SCORE_SPREAD_ATOL = 1e-6
"""Scores of one emotion that span no more than this over a split are the same score for every clip."""


def scores_depend_on_input(scores: np.ndarray, atol: float = SCORE_SPREAD_ATOL) -> bool:
    """False when every emotion's score is the same (within ``atol``) for every sample of the split.

    Stricter than :func:`constant_prediction`: the same *labels* at one threshold are common early in training
    (scores near the prior, all above 0.2) while the scores still rank the clips; the same *scores* for every
    clip mean the network's output no longer reaches back to its input (saturated or dead units after a
    divergence: lr=10 left 0, 1/3, 2/3 or 1 per emotion for every clip). One sample says nothing: True.
    """
    s = _check_scores(scores)
    if s.shape[0] < 2:
        return True
    return bool((s.max(axis=0) - s.min(axis=0) > atol).any())


def constant_prediction(scores: np.ndarray, threshold: float | np.ndarray) -> tuple[str, ...] | None:
    """The emotions every sample is given at ``threshold`` when all samples get the same label set, else None.

    A model whose predictions do not vary over a split has learned only the label prior (all six emotions
    at the seed threshold 0.2 is the usual case). Needs two or more samples: one sample is trivially constant.
    """
    pred = binarize(scores, threshold)
    if pred.shape[0] < 2 or not (pred == pred[0]).all():
        return None
    return tuple(name for name, on in zip(EMOTIONS, pred[0]) if on)


# ------------------------------------------------------------------------------------ threshold selection
def tune_thresholds(y_true: np.ndarray, scores: np.ndarray, grid: np.ndarray | Sequence[float] | None = None,
                    *, default: float = 0.2) -> np.ndarray:
    """Per-emotion decision thresholds that maximise each emotion's F1 on (validation) data.

    Each emotion is tuned independently over ``grid`` (default :data:`DEFAULT_THRESHOLD_GRID`), since
    per-class F1 depends on that class's threshold only. Ties (a flat F1 plateau, or an emotion with no
    positive sample where F1 is 0 everywhere) go to the grid value closest to ``default`` (the seed
    threshold), then to the smaller one, so the result is deterministic and never drifts far without
    evidence. Returns a float64 array [6] in EMOTIONS order.
    """
    y, s = validate_inputs(y_true, scores)
    g = DEFAULT_THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size == 0 or not np.isfinite(g).all() or g.min() < 0.0 or g.max() > 1.0:
        raise DataError(f"grid must be a non-empty 1-d sequence of thresholds in [0, 1]; got {g!r}")
    _check_threshold(default)
    # Sort so "closest to default, then smaller" is a lexicographic order independent of the input order.
    g = np.unique(g)
    tuned = np.empty(NUM_CLASSES)
    for c in range(NUM_CLASSES):
        pred = above_threshold(s[None, :, c], g[:, None])     # [G, N]
        pos = y[None, :, c].astype(bool)
        tp = (pred & pos).sum(axis=1)
        fp = (pred & ~pos).sum(axis=1)
        fn = (~pred & pos).sum(axis=1)
        f1 = _prf(tp, fp, fn)[2]
        best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0.0, atol=1e-12))
        # Rounded distance so equidistant grid points really tie (then argmin takes the smaller).
        tuned[c] = g[best[np.argmin(np.round(np.abs(g[best] - default), 9))]]
    return tuned


def tune_shared_threshold(y_true: np.ndarray, scores: np.ndarray, grid: np.ndarray | Sequence[float] | None = None,
                          *, default: float = 0.2) -> float:
    """One decision threshold for every emotion that maximises micro-F1 on (validation) data.

    Per-emotion F1-optimal thresholds (:func:`tune_thresholds`) maximise macro-F1, not micro-F1: a rare
    emotion's F1-optimal threshold is low, and the false positives it buys are pooled into micro-F1's counts.
    Measured on four seeds of the small preset, test micro-F1 0.605 at this threshold against 0.558 at the
    per-emotion ones (BENCHMARKS.md, Learning, 2026-12-05). One parameter over 6 x N decisions also moves
    far less with a small validation split. Ties go to the grid value closest to ``default``, then the smaller.
    """
    y, s = validate_inputs(y_true, scores)
    g = np.unique(DEFAULT_THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64))
    pred = above_threshold(s[None], g[:, None, None])          # [G, N, C]
    pos = y[None].astype(bool)
    tp = (pred & pos).sum(axis=(1, 2))
    fp = (pred & ~pos).sum(axis=(1, 2))
    fn = (~pred & pos).sum(axis=(1, 2))
    f1 = _prf(tp, fp, fn)[2]
    best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0.0, atol=1e-12))
    return float(g[best[np.argmin(np.round(np.abs(g[best] - default), 9))]])


def tuned_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """:func:`compute_metrics` at per-emotion thresholds tuned (:func:`tune_thresholds`) on the same data.

    Optimistic as an estimate (the thresholds saw the labels they are scored on), but far less jumpy between
    epochs than F1 at one fixed threshold: it measures how well the scores rank, threshold aside.
    """
    return compute_metrics(y_true, scores, tune_thresholds(y_true, scores))


# ----------------------------------------------------------------------------------- precision vs recall
def precision_recall_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall pairs of one emotion at every distinct score threshold (sklearn's convention).

    ``y_true`` and ``scores`` are 1-d. Returns (precision, recall, thresholds): thresholds ascending,
    precision/recall one longer, ending with the point (recall 0, precision 1). With no positive sample the
    recall is defined as 1 everywhere (as sklearn does, which also warns).
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape or y.size == 0:
        raise DataError(f"y_true and scores must be equal-length non-empty 1-d arrays; got {y.shape}, {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise DataError("y_true must be binary 0/1")
    if not np.isfinite(s).all():
        raise DataError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf values")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order].astype(np.float64)
    # Indices of the last sample of each run of equal scores: one curve point per distinct threshold.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    precision = _safe_div(tps, tps + fps)
    total_pos = tps[-1]
    recall = np.ones_like(tps) if total_pos == 0 else tps / total_pos
    # Reverse to ascending thresholds, then append the (recall 0, precision 1) end point.
    return (np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], s_sorted[last][::-1])


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the step precision-recall curve, sum_n (R_n - R_{n-1}) P_n (sklearn's definition)."""
    precision, recall, _ = precision_recall_curve(y_true, scores)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


# -------------------------------------------------------------------------------------------------- report
def split_results(valid: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], threshold: float,
                  tune: bool, prior: Sequence[float] | np.ndarray | None = None) -> dict:
    """A finished run's metrics from its valid and test scores (dicts with ``labels`` and ``scores``): both at
    the model threshold and, with ``tune``, test at per-emotion thresholds tuned on valid (macro-F1's) and at
    one shared threshold tuned on valid for micro-F1.

    Also ``prior_baseline`` (:func:`prior_baseline`: the input-independent predictor scored by the same rules;
    ``prior`` is the train split's per-emotion prevalence, :func:`card_prior`, else the valid split's) and
    ``scores_depend_on_input`` (:func:`scores_depend_on_input` on the test scores), which :func:`verdict` reads.
    """
    results = _scored_splits(valid, test, threshold, tune)
    results["prior_baseline"] = prior_baseline(valid["labels"], test["labels"], threshold, tune, prior)
    results["scores_depend_on_input"] = scores_depend_on_input(test["scores"])
    return results


def _scored_splits(valid: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], threshold: float,
                   tune: bool) -> dict:
    """:func:`split_results`' metrics of one scorer: valid and test at ``threshold``, test at thresholds tuned
    on valid."""
    results: dict = {"valid": compute_metrics(valid["labels"], valid["scores"], threshold),
                     "test": compute_metrics(test["labels"], test["scores"], threshold)}
    if tune:
        tuned = tune_thresholds(valid["labels"], valid["scores"])
        results["tuned_thresholds"] = tuned.tolist()
        results["test_tuned"] = compute_metrics(test["labels"], test["scores"], tuned)
        shared = tune_shared_threshold(valid["labels"], valid["scores"])
        results["tuned_micro_threshold"] = shared
        results["test_tuned_micro"] = compute_metrics(test["labels"], test["scores"], shared)
    return results


PRIOR_KEYS: tuple[str, ...] = ("test", "test_tuned", "test_tuned_micro")
"""The test columns of :func:`split_results` that :func:`prior_baseline` repeats for the label prior."""


def prior_baseline(valid_labels: np.ndarray, test_labels: np.ndarray, threshold: float, tune: bool,
                   prior: Sequence[float] | np.ndarray | None = None) -> dict:
    """The label prior, an input-independent predictor, scored exactly as :func:`split_results` scores a model.

    Every clip gets the same scores, ``prior`` (the train split's per-emotion prevalence; None = the valid
    split's, the labels the thresholds are tuned on anyway). Under a threshold tuned on valid this is the best
    a predictor that ignores its input does: a constant score can only predict an emotion for every clip or
    for none, micro-F1 is best with the most frequent emotions (a prefix in prevalence order, which one shared
    threshold over prevalence-valued scores picks on valid) and per-emotion F1 with every emotion that occurs.
    On a small corpus that beats the pooled floor in micro-F1 (issue 26: 0.404 against 0.369), so the verdict
    needs it. Returns ``source`` ("train" or "valid"), ``scores`` and the micro/macro-F1 (and threshold) of
    each key of :data:`PRIOR_KEYS` that applies.
    """
    valid_labels, test_labels = _check_labels(valid_labels, "valid labels"), _check_labels(test_labels, "test labels")
    source = "valid" if prior is None else "train"
    values = valid_labels.mean(axis=0) if prior is None else np.asarray(prior, dtype=np.float64)
    if values.shape != (NUM_CLASSES,) or not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise DataError(f"the label prior must be {NUM_CLASSES} prevalences in [0, 1] (one per emotion "
                        f"{EMOTIONS}); got {values.tolist()}")
    scored = _scored_splits({"labels": valid_labels, "scores": np.tile(values, (len(valid_labels), 1))},
                            {"labels": test_labels, "scores": np.tile(values, (len(test_labels), 1))},
                            threshold, tune)
    baseline: dict = {"source": source, "scores": [float(v) for v in values]}
    for key in PRIOR_KEYS:
        if key in scored:
            baseline[key] = {k: scored[key][k] for k in ("micro_f1", "macro_f1", "threshold")}
    return baseline


def card_prior(card: Mapping) -> np.ndarray | None:
    """The train split's per-emotion label prevalence from a dataset card (``label_prevalence.train``), in
    EMOTIONS order, or None when the card has none."""
    prevalence = card.get("label_prevalence") if isinstance(card, Mapping) else None
    train = prevalence.get("train") if isinstance(prevalence, Mapping) else None
    if not isinstance(train, Mapping) or any(name not in train for name in EMOTIONS):
        return None
    return np.array([float(train[name]) for name in EMOTIONS])


def results_columns(results: Mapping, threshold: float) -> dict[str, Mapping]:
    """The results table's columns (``format_results_table``) for what :func:`split_results` returned."""
    columns = {f"valid @{threshold:g}": results["valid"], f"test @{threshold:g}": results["test"]}
    if "test_tuned" in results:
        columns["test @tuned"] = results["test_tuned"]
        columns[f"test @{results['tuned_micro_threshold']:g} (micro)"] = results["test_tuned_micro"]
    return columns


def format_results_table(results: Mapping[str, Mapping], *, metrics: Sequence[str] = SUMMARY_METRICS,
                         per_emotion: bool = True, digits: int = 4) -> str:
    """A plain-text table: one column per entry of ``results`` (e.g. "valid @0.2", "test @0.2",
    "test @tuned" -> a :func:`compute_metrics` dict), one row per metric, then one row per emotion's F1
    and the sample count."""
    if not results:
        raise DataError("format_results_table needs at least one column of results")
    rows: list[tuple[str, list[str]]] = []
    for m in metrics:
        rows.append((m, [_cell(r, m, digits, column) for column, r in results.items()]))
    if per_emotion:
        for name in EMOTIONS:
            rows.append((f"f1/{name}", [_emotion_cell(r, name, digits, column) for column, r in results.items()]))
    rows.append(("n_samples", [str(r.get("n_samples", "-")) for r in results.values()]))

    header = ["metric", *results.keys()]
    widths = [max(len(header[0]), *(len(name) for name, _ in rows))]
    widths += [max(len(col), *(len(cells[i]) for _, cells in rows)) for i, col in enumerate(results.keys())]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for name, cells in rows:
        lines.append("  ".join([name.ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells, widths[1:]))]))
    return "\n".join(lines)


def _cell(result: Mapping, metric: str, digits: int, column: str) -> str:
    if metric not in result:
        raise DataError(f"column {column!r} has no metric {metric!r}; it has {sorted(result)}")
    if result[metric] is None:  # undefined on this split (macro_auc with no two-class emotion)
        return "-"
    return f"{float(result[metric]):.{digits}f}"


def _emotion_cell(result: Mapping, emotion: str, digits: int, column: str) -> str:
    try:
        return f"{float(result['per_emotion'][emotion]['f1']):.{digits}f}"
    except (KeyError, TypeError):
        raise DataError(f"column {column!r} has no per_emotion F1 for {emotion!r}") from None


# ------------------------------------------------------------------------------------- a run vs its card
def _f1_pair(scores: Mapping | None) -> dict[str, float] | None:
    if not isinstance(scores, Mapping) or "micro_f1" not in scores or "macro_f1" not in scores:
        return None
    return {"micro_f1": float(scores["micro_f1"]), "macro_f1": float(scores["macro_f1"])}


def card_references(card: Mapping, micro_rule: str | None = None) -> dict[str, dict[str, float] | None]:
    """The test-split reference scores of a dataset card (``card.json``), each {micro_f1, macro_f1} or None.

    ``floor``: logistic regression on mean+std pooled features, thresholds tuned on valid (the synthetic
    corpus' ``reference_scorer.fused``): what a model that uses time and modalities must beat.
    ``all_positive``: predicting every emotion for every clip. ``oracle``: the scorer that knows the planted
    cues, thresholds tuned on valid (``reference_scorer.oracle``), the ceiling; None when the card predates it.
    A prepared (real) corpus' card has no reference scorer: all three are None. Tuned scores are macro-F1 at
    per-emotion thresholds and micro-F1 under ``micro_rule`` (:func:`_tuned_pair`; None = the card's own,
    :func:`card_micro_rule`).
    """
    reference = card.get("reference_scorer") if isinstance(card, Mapping) else None
    reference = reference if isinstance(reference, Mapping) else {}
    micro_rule = card_micro_rule(card) if micro_rule is None else micro_rule
    return {
        "floor": _tuned_pair(reference.get("fused"), micro_rule),
        "all_positive": _f1_pair(reference.get("all_positive_baseline")),
        "oracle": _tuned_pair(reference.get("oracle"), micro_rule),
    }


def card_micro_rule(card: Mapping) -> str:
    """"shared" when the card's floor has micro-F1 at one shared threshold tuned on valid (cards written since
    2026-12-05: ``tuned_micro_on_valid``), else "per_emotion" (older cards: the per-emotion thresholds)."""
    reference = card.get("reference_scorer") if isinstance(card, Mapping) else None
    fused = (reference or {}).get("fused") if isinstance(reference, Mapping) else None
    return "shared" if _f1_pair((fused or {}).get("tuned_micro_on_valid")) else "per_emotion"


def _tuned_pair(scores: Mapping | None, micro_rule: str, *, per_emotion: str = "tuned_on_valid",
                shared: str = "tuned_micro_on_valid") -> dict[str, float] | None:
    """Macro-F1 from ``scores[per_emotion]`` and micro-F1 from ``scores[shared]`` when ``micro_rule`` is
    "shared" (else from ``scores[per_emotion]`` too); None when a needed entry is missing."""
    scores = scores if isinstance(scores, Mapping) else {}
    pair = _f1_pair(scores.get(per_emotion))
    if pair is None or micro_rule != "shared":
        return pair
    micro = _f1_pair(scores.get(shared))
    return None if micro is None else {**pair, "micro_f1": micro["micro_f1"]}


def model_tuned_pair(results: Mapping, micro_rule: str) -> dict[str, float] | None:
    """A run's test F1 at thresholds tuned on valid: macro-F1 at the per-emotion thresholds
    (``results["test_tuned"]``), micro-F1 under ``micro_rule`` ("shared": one threshold tuned for micro-F1,
    ``results["test_tuned_micro"]``; "per_emotion": the per-emotion thresholds)."""
    return _tuned_pair(results, micro_rule, per_emotion="test_tuned", shared="test_tuned_micro")


def compared_micro_rule(results: Mapping, card: Mapping) -> str:
    """The micro-F1 rule a run and its card share: "shared" when both have a shared-threshold micro-F1, else
    "per_emotion" (an older card, or a run from before the shared threshold)."""
    if card_micro_rule(card) == "shared" and _f1_pair(results.get("test_tuned_micro")) is not None:
        return "shared"
    return "per_emotion"


def verdict(results: Mapping, card: Mapping) -> dict | None:
    """Does a run beat its baselines? Like with like: the floor's thresholds were tuned on valid, so the
    model's test scores at thresholds tuned on valid are compared (macro-F1 at per-emotion thresholds,
    ``results["test_tuned"]``; micro-F1 at one shared threshold, ``results["test_tuned_micro"]``, where the
    card's floor has that rule too, else at the per-emotion ones: ``micro_rule``), and its scores at the
    model threshold (``results["test"]``) are shown beside them. Without ``test_tuned``
    (train.tune_thresholds=false) the threshold scores are compared and ``compared`` says so.

    ``results`` is a run's results.json, ``card`` its card.json. Returns None when the card has no floor.
    ``beats_floor`` needs both micro- and macro-F1 strictly above the floor's: a model that wins micro-F1 on
    the frequent emotions while losing the rare ones has not beaten a linear model. ``beats_prior`` is the
    same test against the label prior (``results["prior_baseline"]``, :func:`prior_baseline`) under the
    same rule as the model; None for results written before it existed. ``beats_baselines``, the success the
    verdict line states, needs ``beats_floor``, ``beats_prior`` (unless unknown) and test scores that depend
    on the input (``depends_on_input``, from ``results["scores_depend_on_input"]``): a constant predictor
    whose constants happen to win on test has still learned nothing from its input.
    """
    micro_rule = compared_micro_rule(results, card)
    refs = card_references(card, micro_rule)
    at_threshold = _f1_pair(results.get("test"))
    tuned = model_tuned_pair(results, micro_rule)
    model = tuned or at_threshold
    floor = refs["floor"]
    if floor is None or model is None:
        return None
    margin = _margin(model, floor)
    prior = _prior_pair(results.get("prior_baseline"), micro_rule, tuned=tuned is not None)
    prior_margin = _margin(model, prior) if prior is not None else None
    beats_floor = margin["micro_f1"] > 0 and margin["macro_f1"] > 0
    beats_prior = None if prior_margin is None else prior_margin["micro_f1"] > 0 and prior_margin["macro_f1"] > 0
    depends_on_input = bool(results.get("scores_depend_on_input", True))
    return {
        "compared": "tuned_on_valid" if tuned else "threshold",
        "micro_rule": micro_rule if tuned else None,
        "model": model,
        "model_at_threshold": {**(at_threshold or {}), "threshold": results.get("test", {}).get("threshold")},
        "floor": floor,
        "margin": margin,
        "prior": prior,
        "prior_margin": prior_margin,
        "all_positive": refs["all_positive"],
        "oracle": refs["oracle"],
        "beats_floor_micro": margin["micro_f1"] > 0,
        "beats_floor_macro": margin["macro_f1"] > 0,
        "beats_floor": beats_floor,
        "beats_prior": beats_prior,
        "depends_on_input": depends_on_input,
        "beats_baselines": beats_floor and beats_prior is not False and depends_on_input,
    }


def _margin(model: Mapping, reference: Mapping) -> dict[str, float]:
    return {k: model[k] - reference[k] for k in ("micro_f1", "macro_f1")}


def _prior_pair(baseline: Mapping | None, micro_rule: str, *, tuned: bool) -> dict[str, float] | None:
    """The label prior's test F1 under the rule the model is compared by: at thresholds tuned on valid (micro-F1
    under ``micro_rule``) when the model's are, else at the model threshold."""
    if not isinstance(baseline, Mapping):
        return None
    return model_tuned_pair(baseline, micro_rule) if tuned else _f1_pair(baseline.get("test"))


def _pair_text(pair: Mapping, digits: int = 3) -> str:
    return f"{pair['micro_f1']:.{digits}f} / {pair['macro_f1']:.{digits}f}"


def _threshold_text(threshold: object) -> str:
    if isinstance(threshold, (int, float)):
        return f"threshold {threshold:g}"
    return "the model thresholds"


def format_verdict(v: Mapping) -> str:
    """One line: the model's test micro / macro-F1 against the floor, the baseline and the oracle."""
    at = v["model_at_threshold"]
    where = _threshold_text(at.get("threshold"))
    if v["compared"] == "tuned_on_valid":
        rule = ("micro-F1 at one threshold, macro-F1 at per-emotion thresholds, tuned on valid"
                if v.get("micro_rule") == "shared" else "thresholds tuned on valid")
        shown = f"({rule}; {_pair_text(at)} at {where})"
    else:
        shown = f"(at {where}; the floor's thresholds are tuned on valid)"
    parts = [f"model test micro-F1 {v['model']['micro_f1']:.3f} / macro-F1 {v['model']['macro_f1']:.3f} {shown}",
             f"vs pooled floor {_pair_text(v['floor'])} ({_margin_text(v['margin'])})"]
    if v.get("prior"):
        parts.append(f"label prior (input-independent) {_pair_text(v['prior'])} ({_margin_text(v['prior_margin'])})")
    if v.get("all_positive"):
        parts.append(f"predict-every-emotion {_pair_text(v['all_positive'])}")
    if v.get("oracle"):
        parts.append(f"oracle {_pair_text(v['oracle'])}")
    return f"[carat] verdict: {', '.join(parts)}: {verdict_outcome(v)}"


def _margin_text(margin: Mapping) -> str:
    return f"{margin['micro_f1']:+.3f} / {margin['macro_f1']:+.3f}"


def verdict_outcome(v: Mapping) -> str:
    """The verdict's last words: "beats ..." only for :func:`verdict`'s ``beats_baselines``, else "does not
    beat ..." naming what it does not beat (and on which F1 it is above, where it is on one)."""
    if not v.get("depends_on_input", True):
        return ("does not beat its baselines: its test scores are the same for every clip (they do not depend "
                "on the input)")
    missed = []
    if not v["beats_floor"]:
        missed.append("the floor" + _one_side(v.get("margin")))
    if v.get("beats_prior") is False:
        missed.append("the label prior" + _one_side(v.get("prior_margin")))
    if missed:
        return f"does not beat {' nor '.join(missed)}"
    return "beats the floor and the label prior" if v.get("beats_prior") else "beats the floor"


def _one_side(margin: Mapping | None) -> str:
    """" (above it on micro-F1 only)" where a margin is positive on one F1 alone, else nothing."""
    if not margin:
        return ""
    above = [k.split("_")[0] for k in ("micro_f1", "macro_f1") if margin[k] > 0]
    return f" (above it on {above[0]}-F1 only)" if len(above) == 1 else ""


def result_warnings(results: Mapping, card: Mapping) -> list[str]:
    """What a practitioner must hear about a finished run, one line per threshold setting (the model
    threshold, thresholds tuned on valid): a test micro-F1 not above predicting every emotion, not above the
    label prior under the same threshold setting (where results.json has it), or below the pooled-feature
    floor. Nothing when the card has no reference and the results no prior."""
    micro_rule = compared_micro_rule(results, card)
    refs = card_references(card, micro_rule)
    baseline, floor = refs["all_positive"], refs["floor"]
    prior = results.get("prior_baseline") if isinstance(results.get("prior_baseline"), Mapping) else {}
    warnings: list[str] = []
    for key in ("test", "test_tuned_micro" if micro_rule == "shared" else "test_tuned"):
        scores = results.get(key)
        if not isinstance(scores, Mapping) or "micro_f1" not in scores:
            continue
        micro = float(scores["micro_f1"])
        problems = []
        if baseline is not None and micro <= baseline["micro_f1"]:
            problems.append(f"not above predicting every emotion ({baseline['micro_f1']:.4f})")
        prior_scores = _f1_pair(prior.get(key))
        if prior_scores is not None and micro <= prior_scores["micro_f1"]:
            problems.append(f"not above the label prior ({prior_scores['micro_f1']:.4f}: the train split's "
                            "prevalence as every clip's scores, an input-independent predictor)")
        if floor is not None and micro < floor["micro_f1"]:
            problems.append(f"below the pooled-feature floor {floor['micro_f1']:.4f} (logistic regression on "
                            "mean+std pooled features, thresholds tuned on valid)")
        if problems:
            where = ({"test_tuned": "at thresholds tuned on valid",
                      "test_tuned_micro": "at one threshold tuned on valid"}.get(key)
                     or f"at {_threshold_text(scores.get('threshold'))}")
            warnings.append(f"test micro-F1 {micro:.4f} {where} is {' and '.join(problems)}")
    return warnings
