"""What a run logs while it trains: metrics.jsonl per log step, history.jsonl per epoch, TensorBoard, the printed
epoch line and the progress bar.

:class:`MetricsLog` writes on rank 0 only; every rank keeps the epoch means of the step diagnostics (gradient
norms, the model's own numbers), which go into the epoch's history record. On a resume it rebuilds history.jsonl
from the checkpoint and drops metrics of the attempt that did not checkpoint.
"""

from __future__ import annotations

import sys
from typing import Any

from carat.train import dist
from carat.train.rundir import RunDir, append_jsonl, rewrite_history, truncate_history
from carat.train.state import RunState


class MeanMeter:
    """Running means of named scalars: the diagnostics of an epoch's log steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: total / self.counts[key] for key, total in self.sums.items()}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class MetricsLog:
    """The run's logs on this rank: files, TensorBoard and printed lines on rank 0, diagnostics means on all."""

    def __init__(self, run: RunDir, state: RunState, *, epochs: int, select_metric: str) -> None:
        self.run = run
        self.state = state
        self.epochs = epochs
        self.select_metric = select_metric
        self.is_main = dist.rank() == 0
        self.diagnostics = MeanMeter()
        """The means of this epoch's step diagnostics (every rank: they go into the epoch's record)."""
        self.tb = None  # TensorBoard writer, rank 0 only, opened by open()

    def open(self) -> None:
        """Rank 0, once the run state is known (fresh or resumed): history.jsonl from the checkpoint (a kill
        after the save but before the append lost its line); metrics past the starting epoch belong to an
        attempt that did not checkpoint; TensorBoard drops that attempt's steps too."""
        if not self.is_main:
            return
        rewrite_history(self.run.history, self.state.history)
        truncate_history(self.run.metrics, self.state.epoch)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.run.tensorboard), purge_step=self.state.global_step or None)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def progress_bar(self, total: int):
        from tqdm.auto import tqdm

        # A bar only on rank 0 and only on a terminal: logs of batch jobs stay readable.
        quiet = not self.is_main or not sys.stderr.isatty()
        return tqdm(total=total, desc=f"epoch {self.state.epoch + 1}/{self.epochs}", disable=quiet,
                    dynamic_ncols=True, leave=False)

    # -- steps -------------------------------------------------------------------------------------------
    def start_epoch(self) -> None:
        self.diagnostics = MeanMeter()

    def log_step(self, terms: dict[str, float], diagnostics: dict[str, float], lr: float, samples_per_s: float,
                 frames_per_s: float) -> None:
        """A log step (called on every rank): its diagnostics into the epoch's means; on rank 0 its line in
        metrics.jsonl and its scalars in TensorBoard, at the step just taken."""
        self.diagnostics.add(diagnostics)
        if not self.is_main:
            return
        record = {"epoch": self.state.epoch, "step": self.state.global_step, "lr": lr,
                  "samples_per_s": samples_per_s, "frames_per_s": frames_per_s}
        record.update({f"loss/{k}": v for k, v in terms.items()})
        record.update(diagnostics)
        append_jsonl(self.run.metrics, record)
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("epoch", "step"):
                    self.tb.add_scalar(key, value, self.state.global_step)

    def diagnostic_means(self) -> dict[str, float]:
        """Means over the epoch's log steps, under the same keys as in metrics.jsonl (grad/*, align/* ...)."""
        return self.diagnostics.means()

    # -- epochs ------------------------------------------------------------------------------------------
    def log_epoch(self, record: dict[str, Any], metrics: dict[str, Any], value: float | None,
                  improved: bool) -> None:
        """Rank 0, after the epoch is checkpointed: its line in history.jsonl, TensorBoard and the console."""
        if not self.is_main:
            return
        append_jsonl(self.run.history, record)
        self.log_epoch_scalars(record)
        print(f"[carat] epoch {self.state.epoch}/{self.epochs} loss {record.get('train/total', float('nan')):.4f} "
              f"valid micro-F1 {metrics['micro_f1']:.4f} macro-F1 {metrics['macro_f1']:.4f} "
              f"macro-AUC {_number(metrics['macro_auc'])} | {self.select_metric} {_number(value)}"
              f"{' (best)' if improved else ''}", flush=True)

    def log_epoch_scalars(self, record: dict[str, Any]) -> None:
        """The epoch's history line to TensorBoard, at step = epochs done. The epoch means of the step
        diagnostics go under epoch/ so their tags do not mix the step axis of the per-step ones."""
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"epoch/{key}" if key in self.diagnostics.sums else key
            self.tb.add_scalar(tag, value, self.state.epoch)
