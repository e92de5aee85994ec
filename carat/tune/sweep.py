"""A Ray Tune sweep over carat's one training run (the Ray Train V2 pattern: a driver function per trial).

Each trial's driver builds the same ``TorchTrainer`` as ``python -m carat.train``
(:func:`carat.train.launch.build_trainer`) with the trial's configuration, a run directory named after the
trial id (``<sweep>/runs/trial-<id>``: concurrent trials never share one, and a restarted trial resumes its own
checkpoints) and Ray's ``TuneReportCallback``, which forwards rank 0's per-epoch report to Tune, where ASHA and
the searcher see it. The sweep directory is Tune's experiment directory; rerunning the same command restores
it with ``Tuner.restore``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from carat.config import CaratConfig, config_from_dict, config_to_dict, config_to_toml
from carat.errors import CaratError
from carat.storage import as_location
from carat.tune.report import trial_run_name
from carat.tune.space import apply_params, param_space


def metric_key(cfg: CaratConfig) -> str:
    """The name of the tuned metric in the per-epoch report (the training loop's ``valid/<metric>``)."""
    return f"valid/{cfg.tune.metric}"


def sweep_name(cfg: CaratConfig) -> str:
    """``tune.sweep_name``, or a name derived from the resolved configuration: the same command resumes."""
    if cfg.tune.sweep_name:
        return cfg.tune.sweep_name
    digest = hashlib.sha1(config_to_toml(cfg).encode()).hexdigest()[:8]
    return f"sweep-{cfg.preset}-{digest}"


@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves and how many trials fit at once."""

    gpu: bool
    workers: int
    cpus_per_worker: float
    driver_cpus: float
    max_concurrent: int


def plan_resources(cfg: CaratConfig, cluster: dict[str, float]) -> TrialResources:
    """Per-trial resources and the concurrency the cluster (``ray.cluster_resources()``) holds: workers x
    (CPUs, 1 GPU) per trial on GPU clusters, CPUs only on CPU ones; capped by num_samples."""
    t = cfg.tune
    cluster_gpus = float(cluster.get("GPU", 0.0))
    cluster_cpus = float(cluster.get("CPU", 1.0))
    gpu = bool(cfg.train.use_gpu) if cfg.train.use_gpu is not None else cluster_gpus >= 1
    if gpu and cluster_gpus < t.workers_per_trial:
        raise CaratError(f"tune.workers_per_trial={t.workers_per_trial} needs as many GPUs; the cluster has "
                         f"{cluster_gpus:g}")
    cpus = t.cpus_per_worker or float(1 + cfg.loader.num_workers)
    cpus = min(cpus, max(1.0, math.floor(cluster_cpus / t.workers_per_trial)))
    fits = [cluster_cpus / max(t.workers_per_trial * cpus + t.driver_cpus, 1e-9)]
    if gpu:
        fits.append(cluster_gpus / t.workers_per_trial)
    derived = max(1, int(min(fits)))
    concurrent = t.max_concurrent_trials or derived
    return TrialResources(gpu=gpu, workers=t.workers_per_trial, cpus_per_worker=cpus, driver_cpus=t.driver_cpus,
                          max_concurrent=max(1, min(concurrent, t.num_samples)))


def trial_base(cfg: CaratConfig, shard_dir: Path, resources: TrialResources) -> CaratConfig:
    """The configuration every trial starts from: Ray launcher, the sweep's workers and device, the shards
    made once before the sweep (a trial never synthesizes), best epoch chosen on the tuned metric. A trial is
    one model even under a preset that trains a seed ensemble (small): the search ranks hyperparameters, and
    best.toml gives the ensemble back (:func:`carat.tune.report.best_config`)."""
    train = replace(cfg.train, launcher="ray", num_workers=resources.workers, use_gpu=resources.gpu,
                    shard_dir=str(shard_dir), synth_if_missing=False, select_metric=cfg.tune.metric, run_name=None,
                    ensemble_size=1)
    return replace(cfg, train=train)


def trial_dirname(trial: Any) -> str:
    """Tune's own trial directory (its progress.csv / result.json): short and keyed by the trial id."""
    return f"tune-{trial.trial_id}"


def run_trial(params: dict[str, Any], *, base: dict[str, Any], runs_dir: str, cpus_per_worker: float) -> None:
    """One trial's driver: carat's TorchTrainer with the trial's parameters, reporting to Tune every epoch."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from carat.train.launch import FinalError, build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_params(config_from_dict(base), params)
    run_name = trial_run_name(trial_id)
    cfg = replace(cfg, train=replace(cfg.train, run_name=run_name, storage_path=runs_dir))
    trainer = build_trainer(cfg, Path(runs_dir) / run_name, as_location(cfg.train.shard_dir),
                            callbacks=[TuneReportCallback()], num_workers=cfg.train.num_workers,
                            cpus_per_rank=cpus_per_worker)
    try:
        result = trainer.fit()
    finally:
        FinalError.clear(Path(runs_dir) / run_name)
    if result.error is not None:
        raise result.error


def make_search(cfg: CaratConfig, max_concurrent: int):
    """Optuna TPE (wrapped in a ConcurrencyLimiter), or Tune's variant generator for random / grid."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=max_concurrent)


def make_scheduler(cfg: CaratConfig, runs_dir: Path | None = None):
    """ASHA on the loop's epochs (:class:`carat.tune.scheduler.EpochASHA`: one report = one epoch, also for a
    trial restored mid-run, its rungs refilled from the trials' histories under ``runs_dir``), or plain FIFO.

    A stop after the last epoch's report kills the trial's driver before the loop's final evaluation (the best
    epoch on test, results.json) and saves no training. So ``stop_last_trials=False`` (by default ASHA stops
    every trial at max_t), and max_t is one epoch short of ``train.epochs``: ASHA puts its top rung at max_t
    when max_t is grace_period * reduction_factor**k (30 epochs, grace 10, factor 3: rungs 10 and 30), and a
    trial below that rung's cutoff was stopped at its last epoch with no test scores (seen in a sweep of the
    small preset: 2 of 6 trials that trained all 30 epochs). With too few epochs for a rung before the last
    one, nothing can be stopped early: FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    from carat.tune.scheduler import EpochASHA

    last_rung = cfg.train.epochs - 1
    if cfg.tune.scheduler == "fifo" or last_rung < 1:
        return FIFOScheduler()
    return EpochASHA(epochs=cfg.train.epochs, runs_dir=str(runs_dir) if runs_dir else None, max_t=last_rung,
                     grace_period=min(cfg.tune.grace_period, last_rung), reduction_factor=cfg.tune.reduction_factor,
                     stop_last_trials=False)


def build_tuner(cfg: CaratConfig, base: CaratConfig, sweep_dir: Path, resources: TrialResources):
    """A new Tuner, or the interrupted one restored from ``sweep_dir`` (``Tuner.restore``)."""
    from ray import tune

    trainable = tune.with_parameters(run_trial, base=config_to_dict(base), runs_dir=str(sweep_dir / "runs"),
                                     cpus_per_worker=resources.cpus_per_worker)
    trainable = tune.with_resources(trainable, {"cpu": resources.driver_cpus})
    if tune.Tuner.can_restore(str(sweep_dir)):
        print(f"[carat] resuming the sweep in {sweep_dir}", flush=True)
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    t = cfg.tune
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=metric_key(cfg), mode="max", search_alg=make_search(cfg, resources.max_concurrent),
            scheduler=make_scheduler(cfg, sweep_dir / "runs"),
            num_samples=t.num_samples, max_concurrent_trials=resources.max_concurrent,
            time_budget_s=t.time_budget_s, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name, storage_path=str(sweep_dir.parent),
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            verbose=1,  # the status table; each trial's full metric dict per epoch is in its progress.csv
        ),
    )
