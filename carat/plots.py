"""Result figures of a carat run: training curves, per-emotion scores, precision-recall curves.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas created inside each function
(``Figure`` + ``FigureCanvasAgg``), never through ``pyplot``: nothing happens at import, no global backend is
switched, no window is opened, and figures are freed when the function returns (safe in headless workers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from carat.data.sources.segment import EMOTIONS
from carat.errors import DataError
from carat.metrics import SUMMARY_METRICS, average_precision, precision_recall_curve, validate_inputs

LOSS_PLOT = "training_loss.png"
NOT_PLOTTED: tuple[str, ...] = ("valid/n_samples", "valid/n_positive", "valid/threshold")
"""History bookkeeping values that are neither losses nor metrics."""
METRICS_PLOT = "validation_metrics.png"
DIAGNOSTICS_PLOT = "diagnostics.png"
NOT_DIAGNOSTICS: tuple[str, ...] = ("train/", "valid/", "perf/", "lr")
"""History key prefixes that are not diagnostics (everything else in a history line is: grad/*, align/* ...)."""


def _new_figure(width: float = 7.0, height: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_path: Path | str) -> Path:
    path = Path(out_path)
    if path.suffix.lower() != ".png":
        raise DataError(f"plot output {path} must be a .png file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------------------- training curves
def _series(history: Sequence[Mapping[str, Any]], prefix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Epochs and {key: values per epoch} of the history keys starting with ``prefix`` (NaN where absent)."""
    epochs = np.array([float(row["epoch"]) for row in history])
    keys = sorted({k for row in history for k in row if k.startswith(prefix)})
    series = {k: np.array([float(row.get(k, math.nan)) for row in history]) for k in keys}
    return epochs, series


def _check_history(history: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(history, Mapping) or not isinstance(history, Sequence) or len(history) == 0:
        raise DataError("history must be a non-empty list of per-epoch dicts")
    for i, row in enumerate(history):
        if not isinstance(row, Mapping):
            raise DataError(f"history[{i}] must be a dict of epoch values; got {type(row).__name__}")
        if "epoch" not in row:
            raise DataError(f"history[{i}] has no 'epoch' key; it has {sorted(row)}")
        for key, value in row.items():
            if key == "epoch" or key.startswith(("train/", "valid/")):
                if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                    raise DataError(f"history[{i}][{key!r}] must be a number; got {value!r}")


def plot_training_curves(history: Sequence[Mapping[str, Any]], out_dir: Path | str) -> list[Path]:
    """PNGs of a run's per-epoch history (one dict per epoch: "epoch", "train/<loss term>", "valid/<metric>").

    ``training_loss.png``: every train/ term (and other valid/ values outside [0, 1]: validation losses),
    log scale when all are positive since CTC, classification and contrastive terms differ by orders of
    magnitude. ``validation_metrics.png``: the compute_metrics scalars and other valid/ values within [0, 1].
    Bookkeeping keys (:data:`NOT_PLOTTED`, e.g. valid/n_samples) are skipped.
    A figure with nothing to show is not written. Returns the written paths.
    """
    _check_history(history)
    epochs, train = _series(history, "train/")
    _, valid = _series(history, "valid/")
    valid = {k: v for k, v in valid.items() if k not in NOT_PLOTTED}
    is_metric = {k: k.removeprefix("valid/") in SUMMARY_METRICS
                 or bool(np.all((v[np.isfinite(v)] >= 0) & (v[np.isfinite(v)] <= 1))) for k, v in valid.items()}
    losses = {**train, **{k: v for k, v in valid.items() if not is_metric[k]}}
    metrics = {k: v for k, v in valid.items() if is_metric[k]}
    if not losses and not metrics:
        raise DataError("history has no 'train/...' or 'valid/...' values to plot")
    out = Path(out_dir)
    written = []
    if losses:
        written.append(_plot_lines(epochs, losses, out / LOSS_PLOT, "training losses per epoch", "loss",
                                   log=all(np.nanmin(v) > 0 for v in losses.values() if np.isfinite(v).any())))
    if metrics:
        written.append(_plot_lines(epochs, metrics, out / METRICS_PLOT, "validation metrics per epoch", "score"))
    return written


def _plot_lines(epochs: np.ndarray, series: dict[str, np.ndarray], path: Path, title: str, ylabel: str,
                log: bool = False) -> Path:
    fig = _new_figure()
    ax = fig.add_subplot()
    for key, values in series.items():
        style = "--" if key.startswith("valid/") and ylabel == "loss" else "-"
        width = 2.2 if key.endswith(("/total", "/micro_f1")) else 1.2
        ax.plot(epochs, values, style, marker="o", markersize=3, linewidth=width, label=key)
    if log:
        ax.set_yscale("log")
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_diagnostics(history: Sequence[Mapping[str, Any]], out_path: Path | str) -> Path | None:
    """Epoch means of a run's step diagnostics: gradient norm per module (``grad/*``, log scale: a module
    whose norm sits orders of magnitude below the others is not learning) and the model's own diagnostics
    (e.g. ``align/*_entropy``: 1.0 means the alignment averages the whole clip into every slot).
    Returns None, writing nothing, when the history has no diagnostics (a run from before they existed).
    """
    _check_history(history)
    epochs = np.array([float(row["epoch"]) for row in history])
    keys = sorted({k for row in history for k in row if k != "epoch" and not k.startswith(NOT_DIAGNOSTICS)})
    keys = [k for k in keys if all(isinstance(row.get(k, math.nan), (int, float)) for row in history)]
    grads = [k for k in keys if k.startswith("grad/")]
    others = [k for k in keys if k not in grads]
    if not keys:
        return None
    from matplotlib import colormaps

    fig = _new_figure(9.0, 4.5 if not (grads and others) else 7.5)
    panels = [(grads, "gradient norm (log)", True), (others, "value", False)]
    panels = [panel for panel in panels if panel[0]]
    colours = colormaps["tab20"]  # ~20 modules: the default 10-colour cycle would repeat
    for i, (names, ylabel, log) in enumerate(panels, start=1):
        ax = fig.add_subplot(len(panels), 1, i)
        for j, key in enumerate(names):
            values = np.array([float(row.get(key, math.nan)) for row in history])
            width = 2.4 if key == "grad/total" else 1.2
            ax.plot(epochs, values, ("-", "--", ":")[j // 20 % 3], color=colours(j % 20), marker="o",
                    markersize=3, linewidth=width, label=key)
        if log and all(float(row.get(k, 1.0)) > 0 for row in history for k in names):
            ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=ylabel)
        if i == 1:
            ax.set_title("diagnostics per epoch (means over the log steps)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines stay visible
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------- per-emotion scores
def plot_per_emotion_f1(metrics: Mapping[str, Any], out_path: Path | str, *, title: str | None = None) -> Path:
    """Grouped bars of each emotion's precision, recall and F1 from a :func:`carat.metrics.compute_metrics`
    dict, with its support under the emotion name and the micro/macro F1 in the title."""
    per = metrics.get("per_emotion") if isinstance(metrics, Mapping) else None
    if not isinstance(per, Mapping) or any(e not in per for e in EMOTIONS):
        raise DataError(f"metrics must be a compute_metrics() dict with 'per_emotion' entries for {EMOTIONS}")
    try:
        values = {m: [float(per[e][m]) for e in EMOTIONS] for m in ("precision", "recall", "f1")}
        support = [int(per[e]["support"]) for e in EMOTIONS]
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"metrics['per_emotion'] needs precision, recall, f1 and support per emotion: {err}") from None
    fig = _new_figure()
    ax = fig.add_subplot()
    x = np.arange(len(EMOTIONS))
    for i, (name, vals) in enumerate(values.items()):
        bars = ax.bar(x + (i - 1) * 0.27, vals, width=0.27, label=name)
        if name == "f1":
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [f"{e}\n(n={n})" for e, n in zip(EMOTIONS, support)])
    ax.set_ylim(0, 1.05)
    summary = ", ".join(f"{k} {float(metrics[k]):.3f}" for k in ("micro_f1", "macro_f1") if k in metrics)
    ax.set_title(title if title else f"per-emotion scores ({summary})" if summary else "per-emotion scores")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out_path)


def plot_pr_curves(y_true: np.ndarray, scores: np.ndarray, out_path: Path | str, *,
                   title: str = "precision-recall per emotion") -> Path:
    """One precision-recall curve per emotion (computed by :func:`carat.metrics.precision_recall_curve`),
    average precision and support in the legend; an emotion with no positive sample has no curve and is
    listed as such."""
    y, s = validate_inputs(y_true, scores)
    fig = _new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    for c, name in enumerate(EMOTIONS):
        support = int(y[:, c].sum())
        if support == 0:
            ax.plot([], [], " ", label=f"{name}: no positive sample")
            continue
        precision, recall, _ = precision_recall_curve(y[:, c], s[:, c])
        ap = average_precision(y[:, c], s[:, c])
        ax.step(recall, precision, where="post", label=f"{name} AP {ap:.3f} (n={support})")
    ax.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.05))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")  # curves crowd the top right
    return _save(fig, out_path)
