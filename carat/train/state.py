"""What a run has done so far: the part of carat's own state that every checkpoint carries, and the best-epoch rules.

One :class:`RunState` per rank is shared by the trainer and its components (checkpointer, evaluator, divergence
guard, metrics log): they read the epoch and step for their records and messages; the trainer advances them, the
divergence guard keeps the non-finite count and the initial loss, and a resume restores all of it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def fresh_best(metric: str) -> dict[str, Any]:
    """The best-epoch record before any epoch: ``value`` None, ``epoch`` -1."""
    return {"metric": metric, "value": None, "epoch": -1}


def restore_best(saved: dict[str, Any], metric: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """A checkpoint's best-epoch record, stated in this run's selection metric.

    Checkpoints written before ``train.select_metric`` existed hold ``{"micro_f1": v, "epoch": e}``: they
    selected on micro_f1. A resume that changes the metric keeps the saved best epoch (its weights are in
    best/) and judges it by that epoch's history line in the new metric.
    """
    epoch = int(saved.get("epoch", -1))
    if epoch < 0:
        return fresh_best(metric)
    saved_metric = saved.get("metric", "micro_f1")
    if saved_metric == metric:
        value = saved.get("value", saved.get(metric))
    else:
        row = next((h for h in history if h.get("epoch") == epoch), {})
        value = row.get(f"valid/{metric}")
    return {"metric": metric, "value": None if value is None else float(value), "epoch": epoch}


def improves(value: float | None, best: dict[str, Any]) -> bool:
    """Whether an epoch scoring ``value`` replaces ``best``. The first epoch always does, so best/ exists even
    when the metric is undefined (macro_auc on a split where no emotion has both classes)."""
    if best["epoch"] < 0:
        return True
    if value is None:
        return False
    return best["value"] is None or value > best["value"]


@dataclass
class RunState:
    """The run's progress and record on this rank, as a checkpoint's client state holds it."""

    best: dict[str, Any]
    """The best epoch so far on ``train.select_metric`` (:func:`fresh_best`, :func:`improves`)."""
    epoch: int = 0
    """Epochs completed."""
    global_step: int = 0
    """Optimizer steps taken, skipped non-finite steps included."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per completed epoch: history.jsonl can be rebuilt from any checkpoint."""
    warnings: list[str] = field(default_factory=list)
    """Every ``[carat] warning:`` of the run, in order; written to results.json."""
    nonfinite_total: int = 0
    """Steps skipped for a non-finite loss or gradient norm, over the whole run."""
    initial_loss: float | None = None
    """The run's initial loss scale: the mean over ranks of its first finite step's loss."""
    initial_loss_step: int = 0

    @classmethod
    def fresh(cls, select_metric: str) -> RunState:
        return cls(best=fresh_best(select_metric))

    def restore(self, saved: dict[str, Any], select_metric: str) -> None:
        """Take over a checkpoint's client state. Warnings given before the resume (a skipped torn tag) stay,
        after the saved ones."""
        self.epoch = int(saved["epoch"])
        self.global_step = int(saved["global_step"])
        self.history = list(saved["history"])
        self.best = restore_best(dict(saved["best"]), select_metric, self.history)
        kept = saved.get("warnings", [])
        self.warnings = list(kept) + [w for w in self.warnings if w not in kept]
        self.nonfinite_total = int(saved.get("nonfinite_total", 0))
        self.restore_initial_loss(saved)

    def restore_initial_loss(self, saved: dict[str, Any]) -> None:
        """The initial loss scale of the run being resumed. A checkpoint written before it was saved gives
        the first epoch's mean loss, its nearest stand-in; the first step after the resume would be the
        trained loss, a far lower reference."""
        if saved.get("initial_loss") is not None:
            self.initial_loss = float(saved["initial_loss"])
            self.initial_loss_step = int(saved.get("initial_loss_step", 1))
        elif self.history and isinstance(self.history[0].get("train/total"), (int, float)):
            self.initial_loss = float(self.history[0]["train/total"])
            self.initial_loss_step = 1
