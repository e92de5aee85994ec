"""ASHA on the training loop's epochs, which a trial restored by ``Tuner.restore`` keeps.

Tune counts a trial's reports (``training_iteration``) from 1 again when a restored sweep restarts it, while
the trial resumes its run from its last checkpoint: a trial resumed after epoch 2 of 4 reports epochs 3 and 4
as iterations 1 and 2. Plain ASHA would then judge it at the wrong rungs, and could stop it on its last epoch,
before the loop's final evaluation writes the test scores (issue 26). Every report carries the loop's 0-based
``epoch``, so the epoch count is that plus one, the same before and after a restore.

Tune keeps no scheduler state across ``Tuner.restore``: the restored scheduler starts with empty rungs. Each
trial's run directory keeps its history.jsonl (rebuilt from the checkpoint it resumed from), so when a trial is
added the scheduler records, from that history, the values it had recorded before the kill: the rungs, and
the decisions taken on them from then on, are those of the uninterrupted sweep. Whatever the records say, the
last epoch is never stopped: stopping there saves no training and loses the test scores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

EPOCH_KEY = "epoch"
"""The loop's 0-based epoch in each report (its history record)."""


class EpochASHA(ASHAScheduler):
    """``ASHAScheduler`` with ``time_attr`` = epochs done (``epoch + 1``), no stop on the last epoch, and rungs
    refilled from the trials' run histories under ``runs_dir`` (the sweep's ``runs/``) when trials are added."""

    def __init__(self, *, epochs: int, runs_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(time_attr="training_iteration", **kwargs)
        self.epochs = epochs
        self.runs_dir = runs_dir

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        self.record_history(trial)

    def record_history(self, trial: Any) -> None:
        """Put the epochs a trial finished before a restore into its bracket's rungs, as its reports did then.
        Only records: the decisions on them were taken at the time (a stopped trial is not restarted)."""
        if self.runs_dir is None or self._metric is None:
            return
        from carat.tune.report import run_history, trial_run_name

        bracket = self._trial_info[trial.trial_id]
        recorded = 0
        for record in run_history(Path(self.runs_dir) / trial_run_name(trial.trial_id)):
            done, value = epochs_done(record), record.get(self._metric)
            if done is None or done >= self.epochs or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            bracket.on_result(trial, done, self._metric_op * value)
            recorded += 1
        if recorded:
            print(f"[carat] ASHA: trial {trial.trial_id}: {recorded} epoch(s) before the restore recorded from its "
                  "history.jsonl", flush=True)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        done = epochs_done(result)
        if done is not None and done >= self.epochs:
            return self.CONTINUE  # the final evaluation must run
        return super().on_trial_result(tune_controller, trial, self._by_epoch(result, done))

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._by_epoch(result, epochs_done(result)))

    def _by_epoch(self, result: dict, done: int | None) -> dict:
        return result if done is None else {**result, self._time_attr: done}


def epochs_done(result: dict) -> int | None:
    """Epochs the trial's loop has finished at this report (None: not a report of the loop)."""
    epoch = result.get(EPOCH_KEY)
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        return int(epoch) + 1
    return None
