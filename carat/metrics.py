"""Multi-label emotion recognition metrics for CMU-MOSEI (numpy only).

The metrics of the CARAT paper (Ge et al., "Learning Robust Multi-Modal Representation for Multi-Label
Emotion Recognition via Adversarial Masking and Perturbation", and its predecessors TAILOR and AMP):

- accuracy: the sample-wise Jaccard index |y AND y_hat| / |y OR y_hat| averaged over samples. A sample with
  no true and no predicted label is a perfect prediction and scores 1 (sklearn's ``jaccard_score(...,
  average="samples", zero_division=1)``). ``accuracy_reference`` scores that case 0, as the published code
  does (it divides by ``max(|y OR y_hat|, eps)``); report it only to compare with papers.
- hamming_loss: the fraction of wrong (sample, emotion) decisions.
- micro / macro precision, recall, F1 and per-emotion precision, recall, F1, support, with sklearn's
  ``zero_division=0`` semantics: a ratio whose denominator is 0 is 0.

A prediction is positive when its score is ``> threshold`` (the design note's rule) (seed threshold 0.2); thresholds may differ per
emotion. Every function validates its inputs and raises :class:`carat.errors.DataError` (a ValueError)
naming the problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from carat.data.segment import EMOTIONS
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
def binarize(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Predicted labels [N, 6] (int 0/1): score ``> threshold``, the design note's rule (thresholds broadcast)."""
    return (_check_scores(scores) > _check_threshold(threshold)[None, :]).astype(np.int64)


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

    Returns a JSON-serialisable dict: the scalars named in :data:`SUMMARY_METRICS`, ``per_emotion``
    (emotion -> precision, recall, f1, support), ``n_samples``, ``n_positive`` (true labels) and
    ``threshold`` (a float, or a list of 6 when per-emotion thresholds were given).
    """
    y, s = validate_inputs(y_true, scores)
    t = _check_threshold(threshold)
    y_pred = (s > t[None, :]).astype(np.int64)

    tp = (y & y_pred).sum(axis=0)
    fp = ((1 - y) & y_pred).sum(axis=0)
    fn = (y & (1 - y_pred)).sum(axis=0)
    precision, recall, f1 = _prf(tp, fp, fn)
    micro_p, micro_r, micro_f1 = _prf(tp.sum(), fp.sum(), fn.sum())
    support = y.sum(axis=0)

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
        "per_emotion": {
            name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                   "support": int(support[c])}
            for c, name in enumerate(EMOTIONS)
        },
        "n_samples": int(y.shape[0]),
        "n_positive": int(support.sum()),
        "threshold": float(t[0]) if scalar_threshold else [float(v) for v in t],
    }


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
        pred = s[None, :, c] > g[:, None]                     # [G, N]
        pos = y[None, :, c].astype(bool)
        tp = (pred & pos).sum(axis=1)
        fp = (pred & ~pos).sum(axis=1)
        fn = (~pred & pos).sum(axis=1)
        f1 = _prf(tp, fp, fn)[2]
        best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0.0, atol=1e-12))
        # Rounded distance so equidistant grid points really tie (then argmin takes the smaller).
        tuned[c] = g[best[np.argmin(np.round(np.abs(g[best] - default), 9))]]
    return tuned


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
    return f"{float(result[metric]):.{digits}f}"


def _emotion_cell(result: Mapping, emotion: str, digits: int, column: str) -> str:
    try:
        return f"{float(result['per_emotion'][emotion]['f1']):.{digits}f}"
    except (KeyError, TypeError):
        raise DataError(f"column {column!r} has no per_emotion F1 for {emotion!r}") from None
