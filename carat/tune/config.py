"""The ``[tune]`` section: what a ``python -m carat.tune`` sweep searches over and how.

Imports nothing heavy: :mod:`carat.config` composes this dataclass into the one config tree, so a sweep is
configured like a run (preset < ``--config`` file < ``--tune.key=value``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from carat.errors import ConfigError

TUNE_METRICS: tuple[str, ...] = ("micro_f1", "macro_f1", "macro_auc", "tuned_micro_f1", "tuned_macro_f1")


@dataclass
class TuneConfig:
    """A Ray Tune sweep over the knobs that matter for imbalanced multi-label emotion recognition."""

    sweep_name: str | None = None
    """Sweep directory name under storage_path; rerunning with the same name resumes the sweep. None = a name
    derived from the resolved configuration (the same command resumes, a different one starts afresh)."""
    storage_path: str | None = None
    """Where sweep directories live (shared storage on a multi-node cluster). None = train.storage_path."""
    metric: Literal["micro_f1", "macro_f1", "macro_auc", "tuned_micro_f1", "tuned_macro_f1"] = "micro_f1"
    """Validation metric reported every epoch that ASHA and the searcher maximise (macro_f1 weighs the rare
    emotions like the common ones). The trials select their best epoch on it too (train.select_metric)."""
    search: Literal["optuna", "random", "grid"] = "optuna"
    """optuna: Tree-structured Parzen Estimator; random: independent draws; grid: every combination of a
    3-point grid per range and every choice (needs pos_weight_mode shared or fixed)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop trials whose metric trails at rungs grace_period, grace_period * reduction_factor, ...;
    fifo: run every trial for train.epochs."""
    num_samples: int = 16
    """Trials to run (grid: repetitions of the whole grid)."""
    time_budget_s: float | None = None
    """Stop starting and running trials after this many seconds of the sweep; None = no limit."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0 = as many as the cluster's CPUs / GPUs hold (workers_per_trial each)."""
    workers_per_trial: int = 1
    """Ray Train workers (DeepSpeed ranks) per trial: one GPU each on GPU clusters, CPUs on CPU."""
    cpus_per_worker: float = 0.0
    """CPUs each trial worker reserves; 0 = 1 + loader.num_workers (the rank and its loader processes)."""
    driver_cpus: float = 0.05
    """CPUs the per-trial driver reserves (it only waits on its TorchTrainer; Ray needs a non-zero request)."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: the fraction 1 / reduction_factor of trials promoted at each rung."""
    pos_weight_mode: Literal["per_class", "shared", "fixed"] = "per_class"
    """per_class: the six BCE positive-class weights each log-uniform in [w / spread, w * spread] around
    loss.pos_weight; shared: one log-uniform factor in [1 / spread, spread] multiplying all six; fixed: not
    searched."""
    pos_weight_spread: float = 2.0
    """Range factor of the positive-class weight search (> 1)."""
    temperature_range: tuple[float, ...] = (0.03, 0.3)
    """SupCon temperature (loss.temperature), log-uniform in [low, high]; empty = not searched."""
    ctc_target_lengths: tuple[int | None, ...] = ()
    """Choices for model.ctc_target_length, "none" = adaptive per clip. Empty = adaptive, half, the same and
    twice the configured length (within the position tables)."""
    lr_range: tuple[float, ...] = ()
    """optim.lr, log-uniform in [low, high]; empty = not searched."""
    threshold_range: tuple[float, ...] = ()
    """model.threshold (the decision threshold), uniform in [low, high]; empty = not searched."""
    max_failures: int = 1
    """Times Tune restarts a failed trial (it resumes from its own last checkpoint)."""
    seed: int = 0
    """Seeds the searcher."""

    def __post_init__(self) -> None:
        if self.sweep_name is not None and (not self.sweep_name or "/" in self.sweep_name):
            raise ConfigError(f"sweep_name={self.sweep_name!r} must be a non-empty name without '/'")
        for name in ("num_samples", "workers_per_trial", "grace_period"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction_factor={self.reduction_factor} must be >= 2")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"max_concurrent_trials={self.max_concurrent_trials} must be >= 0 (0 = automatic)")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"time_budget_s={self.time_budget_s} must be > 0 or unset")
        if self.cpus_per_worker < 0:
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker} must be >= 0 (0 = automatic)")
        if not self.driver_cpus > 0:
            raise ConfigError(f"driver_cpus={self.driver_cpus} must be > 0 (Ray rejects an empty request)")
        if not (math.isfinite(self.pos_weight_spread) and self.pos_weight_spread > 1):
            raise ConfigError(f"pos_weight_spread={self.pos_weight_spread} must be > 1")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures} must be >= 0")
        for name, low_bound in (("temperature_range", 0.0), ("lr_range", 0.0), ("threshold_range", 0.0)):
            values = getattr(self, name)
            if values and (len(values) != 2 or not low_bound < values[0] < values[1]):
                raise ConfigError(f"{name}={list(values)} must be empty or [low, high] with 0 < low < high")
        if self.threshold_range and self.threshold_range[1] >= 1:
            raise ConfigError(f"threshold_range={list(self.threshold_range)}: thresholds must lie in (0, 1)")
        if any(v is not None and v < 1 for v in self.ctc_target_lengths):
            raise ConfigError(f"ctc_target_lengths={list(self.ctc_target_lengths)}: lengths must be >= 1 or none")
        if self.search == "grid" and self.pos_weight_mode == "per_class":
            raise ConfigError("search=grid needs pos_weight_mode=shared or fixed (six per-class weights would "
                              "make a 729-point grid)")
