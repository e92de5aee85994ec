"""What a finished (or interrupted) sweep leaves a researcher: the trials table, plots, and the best config.

    <sweep>/trials.csv, trials.parquet   one row per trial: its parameters, status, epochs, final and best
                                         validation metrics, test scores at its best epoch (trials that
                                         ran every epoch), run directory
    <sweep>/plots/metric_vs_hyperparameters.png   the tuned metric against each searched parameter
    <sweep>/plots/learning_curves.png             the tuned metric per epoch, one line per trial
    <sweep>/best.toml                    the best trial's configuration: ``python -m carat.train --config best.toml``
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any


from carat.atomic import write_text_atomic
from carat.config import CaratConfig, config_to_toml
from carat.tune.space import apply_params, search_ranges


def trial_run_name(trial_id: str) -> str:
    """The run directory (under the sweep's runs) of trial ``trial_id``."""
    return f"trial-{trial_id}"

SUMMARY_KEYS: tuple[str, ...] = ("micro_f1", "macro_f1", "macro_auc", "tuned_micro_f1", "tuned_macro_f1")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def epoch_curve(frame: Any, metric: str, history: list[dict[str, Any]] | None = None) -> list[float | None]:
    """The metric per epoch, keyed by the loop's own (0-based) ``epoch``: from the trial's Tune history and,
    where it has them, the trial's run history (``history``, its history.jsonl), which wins.

    A trial restarted by ``Tuner.restore`` counts Tune iterations afresh, may repeat rows, and its Tune
    history (progress.csv) holds only what it reported after the restore: the epochs before the kill are in
    its run's history.jsonl alone, which the loop rebuilds from the checkpoint it resumed from."""
    by_epoch: dict[int, float | None] = {}
    if frame is not None and metric in frame:
        if "epoch" not in frame and not history:
            return [_number(v) for v in frame[metric].tolist()]
        if "epoch" in frame:
            by_epoch = {int(e): _number(v) for e, v in zip(frame["epoch"].tolist(), frame[metric].tolist())
                        if _number(e) is not None}
    for record in history or []:
        if _number(record.get("epoch")) is not None and metric in record:
            by_epoch[int(record["epoch"])] = _number(record[metric])
    return [by_epoch.get(e) for e in range(max(by_epoch) + 1)] if by_epoch else []


def run_history(run_dir: Path) -> list[dict[str, Any]]:
    """A trial run's history.jsonl (one record per finished epoch); [] when absent or unreadable."""
    try:
        lines = (run_dir / "history.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict)]


TEST_COLUMNS: dict[str, tuple[str, str]] = {
    "test/tuned_micro_f1": ("test_tuned_micro", "micro_f1"),  # at the one threshold tuned for micro-F1
    "test/tuned_macro_f1": ("test_tuned", "macro_f1"),
    "test/macro_auc": ("test", "macro_auc"),
}
"""Trials-table column -> (results.json section, key)."""


def trial_test_scores(run_dir: Path) -> dict[str, float | None]:
    """The trial's test scores at its best epoch, from the results.json its loop writes after the last epoch
    (None for a trial stopped early: it never reached the test). For reading off what a chosen configuration
    scores; choose on the validation metric, never on these."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        results = {}
    return {column: _number((results.get(section) or {}).get(key))
            for column, (section, key) in TEST_COLUMNS.items()}


def trial_rows(results: list[Any], metric: str, max_epochs: int, runs_dir: Path) -> list[dict[str, Any]]:
    """One row per Tune result (``ray.tune.Result``): parameters, status, metric history summaries."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("tune-")  # no report yet
        run_dir = runs_dir / f"trial-{trial_id}"
        history = run_history(run_dir)
        curve = epoch_curve(result.metrics_dataframe, metric, history)
        values = [v for v in curve if v is not None]
        epochs = len(curve)
        if result.error is not None:
            status = "error"
        elif epochs >= max_epochs:
            status = "completed"
        else:
            status = "stopped_early"
        row: dict[str, Any] = {"trial_id": trial_id, "status": status, "epochs": epochs}
        row.update({f"param/{k}": v for k, v in sorted((result.config or {}).items())})
        row["final_metric"] = values[-1] if values else None
        row["best_metric"] = max(values) if values else None
        row["best_epoch"] = curve.index(max(values)) + 1 if values else None
        # the last epoch's validation figures: the run's own record of it where the run has one
        last = history[-1] if history and _number(history[-1].get("epoch")) == epochs - 1 else metrics
        for key in SUMMARY_KEYS:
            row[f"final/valid/{key}"] = _number(last.get(f"valid/{key}"))
        row.update(trial_test_scores(run_dir))
        row["run_dir"] = str(run_dir)
        row["curve"] = curve
        row["params"] = dict(result.config or {})
        rows.append(row)
    return rows


def _table_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Columns for Arrow: a column mixing None with values (adaptive ctc_target_length) is written as text."""
    names = list(dict.fromkeys(k for row in rows for k in row if k not in ("curve", "params")))
    columns: dict[str, list[Any]] = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name.startswith("param/") and any(v is None for v in values):
            values = ["none" if v is None else str(v) for v in values]
        columns[name] = values
    return columns


def write_table(rows: list[dict[str, Any]], sweep_dir: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.table(_table_columns(rows)) if rows else pa.table({"trial_id": pa.array([], pa.string())})
    csv_path, parquet_path = sweep_dir / "trials.csv", sweep_dir / "trials.parquet"
    pacsv.write_csv(table, csv_path)
    pq.write_table(table, parquet_path)
    return csv_path, parquet_path


def plot_sweep(rows: list[dict[str, Any]], cfg: CaratConfig, metric: str, out_dir: Path) -> list[Path]:
    """The tuned metric against every searched parameter (one panel each) and the trials' learning curves."""
    from carat.plots import _new_figure, _save

    out_dir.mkdir(parents=True, exist_ok=True)
    ranges = search_ranges(cfg)
    names = list(ranges)
    cols = min(3, max(1, len(names)))
    lines = math.ceil(len(names) / cols) if names else 1
    fig = _new_figure(4.2 * cols, 3.4 * lines)
    best = [row["best_metric"] for row in rows]
    for i, name in enumerate(names):
        ax = fig.add_subplot(lines, cols, i + 1)
        kind, values = ranges[name]
        xs = [row.get(f"param/{name}") for row in rows]
        points = [(x, y) for x, y in zip(xs, best) if y is not None]
        if kind == "choice":
            labels = ["none" if v is None else str(v) for v in values]
            ax.scatter([labels.index("none" if x is None else str(x)) for x, _ in points],
                       [y for _, y in points], alpha=0.8)
            ax.set_xticks(range(len(labels)), labels)
        else:
            ax.scatter([float(x) for x, _ in points], [y for _, y in points], alpha=0.8)
            if kind == "log":
                from matplotlib.ticker import LogFormatter, NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(rows)} trials: best {metric} per trial")
    fig.tight_layout()
    paths = [_save(fig, out_dir / "metric_vs_hyperparameters.png")]
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for row in rows:
        curve = row["curve"]
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"{row['trial_id']} ({row['status']})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("learning curves")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize="small")
    paths.append(_save(fig, out_dir / "learning_curves.png"))
    return paths


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [row for row in rows if row["best_metric"] is not None]
    return max(scored, key=lambda row: row["best_metric"]) if scored else None


def best_config(user_cfg: CaratConfig, base: CaratConfig, params: dict[str, Any]) -> CaratConfig:
    """The best trial's configuration as a training run: the trial's values, the user's own run settings
    (its ensemble size included: trials train one model each)."""
    cfg = apply_params(base, params)
    train = replace(cfg.train, run_name=None, storage_path=user_cfg.train.storage_path,
                    use_gpu=user_cfg.train.use_gpu, synth_if_missing=user_cfg.train.synth_if_missing,
                    ensemble_size=user_cfg.train.ensemble_size)
    return replace(cfg, train=train)


def write_best(row: dict[str, Any], cfg: CaratConfig, metric: str, sweep_dir: Path) -> Path:
    header = (f"# Best trial {row['trial_id']} of sweep {sweep_dir.name}: {metric} {row['best_metric']:.4f} at "
              f"epoch {row['best_epoch']} ({row['status']}, {row['epochs']} epochs).\n"
              f"# Train it: python -m carat.train --config {sweep_dir / 'best.toml'}\n")
    path = sweep_dir / "best.toml"
    write_text_atomic(path, header + config_to_toml(cfg))
    return path
