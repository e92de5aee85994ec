"""The one training loop, run by every launcher (Ray Train workers, the deepspeed launcher, one process).

A launcher only sets up processes and calls :func:`run_training` with a :class:`WorkerContext` saying where
the run lives and how to report a checkpoint. The :class:`Trainer` builds the DeepSpeed engine, takes the steps
(the loss normalised by the global sample count, the cross-rank queue and prototype updates) and runs the epochs,
identically for all of them; it wires four components, each in its own module:

- :class:`~carat.train.checkpointer.Checkpointer`: complete-or-absent checkpoints each epoch, best/, resume;
- :class:`~carat.train.evaluation.Evaluator`: every sample scored exactly once, validation each epoch, the final
  evaluation, verdict and results of the best epoch;
- :class:`~carat.train.divergence.DivergenceGuard`: non-finite steps skipped, a diverged run stopped with one
  ``training diverged: ...`` line (issue 26);
- :class:`~carat.train.metrics_log.MetricsLog`: metrics.jsonl, history.jsonl, TensorBoard, the printed lines.

They share one :class:`~carat.train.state.RunState` (epochs, steps, best epoch, history, warnings): what a
checkpoint carries and a resume restores.

What a practitioner reads to see whether a run learns is produced here too: per-module gradient norms and the
model's own diagnostics at every log step (metrics.jsonl, TensorBoard; their epoch means in history.jsonl),
the best epoch chosen on ``train.select_metric``, ``[carat] warning:`` lines (constant predictions, a test
score not above the card's baselines) that results.json keeps under "warnings", and the verdict against the
dataset card's floor and the label prior in results.json.

The weaker finding, the same *labels* for every clip at the model threshold, stays a warning: it is common
after one epoch on a tiny corpus while the scores still rank the clips; the verdict then says whether the run
beats an input-independent predictor (:func:`carat.metrics.verdict`), and a run that does not beat its
baselines still ends with exit status 0: it is an honest result, not a failure.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from carat.config import CaratConfig, config_to_toml
from carat.data.loader.batch import Batch
from carat.data.loader.pipeline import build_loader
from carat.errors import CaratError, DataError
from carat.model import CARAT, CaratLoss
from carat.train import dist
from carat.train.averaging import WeightAverage
from carat.train.checkpointer import Checkpointer
from carat.train.deepspeed_config import build_ds_config, default_ds_config_path, read_ds_config
from carat.train.divergence import DivergenceGuard, step_was_finite
from carat.train.evaluation import Evaluator
from carat.train.metrics_log import MetricsLog
from carat.train.network import rank_placement
from carat.train.optim import build_optimizer, build_scheduler
from carat.train.rundir import RunDir, copy_card, environment_report, write_json_atomic
from carat.train.state import RunState, improves


@dataclass
class StepNumbers:
    """One step's numbers on the host: this rank's loss terms, samples (weight) and real frames, and the sums
    over ranks of the samples, of the ranks with a non-finite term, and of the sample-weighted total loss."""

    terms: dict[str, float]
    n_local: float
    frames: int
    n_global: float
    ranks_with_bad_terms: float
    weighted_total_global: float


@dataclass
class WorkerContext:
    """What a launcher tells the loop."""

    launcher: str
    run_dir: Path
    shard_dir: Path
    report: Callable[[dict[str, Any], Path | None], None]
    """Called once per epoch on every rank with the metrics and this rank's checkpoint directory."""
    resume_dir: Path | None = None
    """A DeepSpeed checkpoint directory (with a `latest` file) to resume from, or None for a fresh start."""
    checkpoint_root: Path | None = None
    """Where epoch checkpoints are written; None = a per-epoch temporary directory (Ray copies it away)."""
    host_copy: bool = False
    """This rank keeps its host's own copy of the run directory, as rank 0 keeps its own: a run in object storage
    is staged on every host (carat.train.runsync), so one rank per host clears, prunes and swaps checkpoints."""


class TrainModule(nn.Module):
    """Model and loss in one module, so every parameter use happens inside the engine's forward (ZeRO-3)."""

    def __init__(self, model: CARAT, loss_fn: CaratLoss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None = None,
                sample_weight: torch.Tensor | None = None) -> tuple[Any, dict[str, torch.Tensor] | None]:
        out = self.model(**inputs)
        terms = self.loss_fn(self.model, out, labels, sample_weight=sample_weight) if labels is not None else None
        return out, terms


def pick_device(use_gpu: bool | None) -> torch.device:
    if (use_gpu is None or use_gpu) and torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def module_gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of each top-level submodule (``grad/<name>``) and of all (``grad/total``).

    Call between ``engine.backward()`` and ``engine.step()``, on every rank: there the gradient is the
    all-rank mean, before clipping. Under ZeRO-1/2 ``p.grad`` is None by then (each rank keeps only its
    partition of the flat gradient) and under ZeRO-3 the parameter itself is partitioned, so DeepSpeed's
    ``safe_get_full_grad`` rebuilds the full gradient: an all-reduce (ZeRO-1/2) or all-gather (ZeRO-3) per
    parameter. Every rank must therefore call this on the same steps, and parameters are visited in
    ``named_parameters`` order, the same everywhere. Without ZeRO it returns ``p.grad`` and costs nothing.
    """
    from deepspeed.utils import safe_get_full_grad

    squares: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        grad = safe_get_full_grad(param)
        if grad is None:  # a parameter no loss term reached this step
            continue
        group = name.split(".", 1)[0]
        square = grad.detach().float().square().sum()
        squares[group] = squares[group] + square if group in squares else square
    if not squares:
        return {}
    values = torch.stack(list(squares.values())).double().cpu()  # one device sync for all modules
    norms = {f"grad/{group}": float(v.sqrt()) for group, v in zip(squares, values)}
    norms["grad/total"] = float(values.sum().sqrt())
    return norms


def model_diagnostics(model: nn.Module) -> dict[str, float]:
    """``model.diagnostics()`` (numbers about the last training batch, e.g. alignment entropies) when the
    model has such a method, else nothing."""
    probe = getattr(model, "diagnostics", None)
    if not callable(probe):
        return {}
    return {str(key): float(value) for key, value in probe().items() if value is not None}


class Trainer:
    """One rank's view of a run: the engine, the step and the epochs, the same for every launcher. Checkpoints,
    evaluation, the divergence policy and the logs are its components (see the module docstring)."""

    def __init__(self, cfg: CaratConfig, ctx: WorkerContext) -> None:
        import deepspeed

        self.cfg = cfg
        self.ctx = ctx
        self.run = RunDir(ctx.run_dir)
        self.device = pick_device(cfg.train.use_gpu)
        self.rank = dist.rank()
        self.world = dist.world_size()
        self.is_main = self.rank == 0
        seed_everything(cfg.train.seed)

        model = CARAT.from_config(cfg.model)
        if cfg.model.standardize_features:  # train-split statistics from the card; saved with the model
            from carat.data.corpus.featstats import load_feature_stats

            model.set_feature_stats(load_feature_stats(ctx.shard_dir))
        loss_fn = CaratLoss.from_config(cfg.loss, cfg.model)
        module = TrainModule(model, loss_fn)
        self.steps_per_epoch = self._steps_per_epoch()
        total_steps = self.steps_per_epoch * cfg.train.epochs
        optimizer = build_optimizer(module.model, cfg.optim)
        scheduler = build_scheduler(optimizer, total_steps, self.steps_per_epoch, cfg.optim)
        bf16 = self._use_bf16()
        ds_path = Path(cfg.train.ds_config) if cfg.train.ds_config else default_ds_config_path(
            cfg.train.zero_stage, cfg.train.offload)
        ds_config = build_ds_config(
            read_ds_config(ds_path), source=str(ds_path), micro_batch=cfg.loader.max_batch_size,
            world_size=self.world, grad_clip=cfg.optim.grad_clip, bf16=bf16,
            zero_stage=None if cfg.train.ds_config else cfg.train.zero_stage,
        )
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False,
        )
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.average = self._weight_average()
        """The weights' moving average that evaluation uses (train.ema_decay), or None."""
        self.state = RunState.fresh(cfg.train.select_metric)
        self.step_diagnostics: dict[str, float] = {}
        """Gradient norms and model diagnostics of the last train_step run with diagnose=True."""
        self._build_components()

    # -- setup -------------------------------------------------------------------------------------------
    def _build_components(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.guard = DivergenceGuard(
            self.state, explosion_factor=cfg.train.loss_explosion_factor,
            max_nonfinite_steps=cfg.train.max_nonfinite_steps, lr=cfg.optim.lr, shard_dir=ctx.shard_dir,
            device=self.device, warn=self.warn)
        self.checkpointer = Checkpointer(
            self.engine, self.state, cfg, self.run, shard_dir=ctx.shard_dir, resume_dir=ctx.resume_dir,
            checkpoint_root=ctx.checkpoint_root, host_copy=ctx.host_copy, report=ctx.report, average=self.average,
            warn=self.warn)
        self.evaluator = Evaluator(
            self.engine, self.state, self.guard, cfg, self.run, shard_dir=ctx.shard_dir, launcher=ctx.launcher,
            device=self.device, inputs=self._cast, average=self.average, warn=self.warn)
        self.log = MetricsLog(self.run, self.state, epochs=cfg.train.epochs, select_metric=cfg.train.select_metric)

    def _use_bf16(self) -> bool:
        precision = self.cfg.train.precision
        return precision == "bf16" or (precision == "auto" and self.device.type == "cuda")

    def _weight_average(self) -> WeightAverage | None:
        decay = self.cfg.train.ema_decay
        if not decay:
            return None
        if self.engine.zero_optimization_stage() == 3:  # a train.ds_config file may ask for stage 3
            raise CaratError(f"train.ema_decay={decay} needs ZeRO stage <= 2, and {self.cfg.train.ds_config} "
                             "selects stage 3 (it partitions the weights the average copies)")
        return WeightAverage(self.model, decay)

    def _loader(self, split: str, epoch: int, train: bool):
        return build_loader(self.ctx.shard_dir, split, self.cfg.loader, rank=self.rank, world_size=self.world,
                            epoch=epoch, train=train)

    def _steps_per_epoch(self) -> int:
        steps = len(self._loader("train", 0, True))
        if steps == 0:
            raise DataError(f"the train split in {self.ctx.shard_dir} gives no batch on {self.world} ranks: "
                            "it has fewer batches than ranks (lower loader.token_budget or use fewer workers)")
        cap = self.cfg.train.max_steps_per_epoch
        return min(steps, cap) if cap else steps

    def _cast(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in batch.model_inputs().items()}

    @property
    def model(self) -> CARAT:
        return self.engine.module.model

    @property
    def epoch(self) -> int:
        """Epochs completed (the run state's)."""
        return self.state.epoch

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (the run state's)."""
        return self.state.global_step

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def warn(self, message: str) -> None:
        """Record a warning for results.json (every rank, so the checkpointed list is rank 0's) and print it
        on rank 0."""
        self.state.warnings.append(message)
        if self.is_main:
            print(f"[carat] warning: {message}", flush=True)

    def write_run_files(self) -> None:
        ranks = dist.gather_objects(rank_placement(self.rank))  # a collective: every rank takes part
        if not self.is_main:
            return
        self.run.create()
        self.run.config.write_text(config_to_toml(self.cfg))
        write_json_atomic(self.run.environment,
                          environment_report(self.ctx.launcher, self.world, self.device, ranks))
        copy_card(self.ctx.shard_dir, self.run)

    # -- training ----------------------------------------------------------------------------------------
    def train_step(self, batch: Batch, diagnose: bool = False) -> tuple[dict[str, float] | None, int]:
        """One optimizer step; returns the loss terms (None when the step was skipped as non-finite) and the
        real frames seen. With ``diagnose`` (on the same steps on every rank: it gathers gradients) it also
        fills :attr:`step_diagnostics`."""
        batch = batch.to(self.device, non_blocking=True)
        out, terms = self.engine(self._cast(batch), labels=batch.labels, sample_weight=batch.weight)
        numbers = self.step_numbers(batch, terms)
        values, frames, n_local, n_global = numbers.terms, numbers.frames, numbers.n_local, numbers.n_global
        bad_terms = sorted(name for name, value in values.items() if not math.isfinite(value))
        # Every rank skips together (a rank alone skipping backward would hang the others' all-reduce).
        if numbers.ranks_with_bad_terms > 0:
            self.guard.skip_nonfinite_step(batch, "loss", bad_terms, self.current_lr())
            return None, frames
        # The mean over all ranks: every rank takes the same decision on the same number.
        self.guard.check_loss_scale(numbers.weighted_total_global / max(n_global, 1.0), batch)
        # DeepSpeed averages gradients over ranks; scaling each rank's mean by its share of the global batch
        # makes the result the mean over all samples of the step, whatever the per-rank batch sizes.
        scale = n_local * self.world / max(n_global, 1.0)
        self.engine.backward(terms["total"] * scale)
        if diagnose:  # the gradients exist only between backward and step
            self.step_diagnostics = {**module_gradient_norms(self.model), **model_diagnostics(self.model)}
        self.engine.step()
        if not step_was_finite(self.engine):  # DeepSpeed saw inf/NaN gradients and did not update (or should not have)
            self.guard.skip_nonfinite_step(batch, "gradient norm", [], self.current_lr())
            return None, frames
        if self.average is not None:
            self.average.update(self.model)
        self.guard.step_taken(values["total"])
        with torch.no_grad():
            self.model.update_memory(out, batch.labels, gather=dist.gather_rows, sample_weight=batch.weight)
        return values, frames

    def step_numbers(self, batch: Batch, terms: dict[str, torch.Tensor]) -> StepNumbers:
        """The numbers a step decides on, read from the device once and summed over ranks in one collective
        (each ``.item()`` and each scalar all-reduce is a device sync: a dozen per step otherwise)."""
        names = list(terms)
        local = torch.stack([terms[name].detach().float() for name in names]).double()
        n_local = batch.weight.sum().double()
        frames = (batch.text_mask.sum() + batch.visual_mask.sum() + batch.audio_mask.sum()).double()
        bad = (~torch.isfinite(local)).any().double()
        weighted_total = local[names.index("total")] * n_local
        shared = dist.all_reduce_sums(torch.stack([n_local, bad, weighted_total]), self.device)
        host = torch.cat([local, torch.stack([n_local, frames]), shared]).tolist()
        k = len(names)
        return StepNumbers(terms=dict(zip(names, host[:k])), n_local=host[k], frames=int(host[k + 1]),
                           n_global=host[k + 2], ranks_with_bad_terms=host[k + 3],
                           weighted_total_global=host[k + 4])

    def is_log_step(self, step: int) -> bool:
        """Whether the step about to run (``step`` of this epoch) is logged: a function of counters every rank
        shares, since logging gathers gradients on all ranks."""
        return (self.state.global_step + 1) % self.cfg.train.log_every == 0 or step == self.steps_per_epoch - 1

    def train_epoch(self) -> dict[str, float]:
        self.engine.train()
        loader = self._loader("train", self.state.epoch, True)
        steps = self.steps_per_epoch
        self.log.start_epoch()
        self.guard.start_epoch()
        first_step = self.state.global_step + 1
        sums: dict[str, float] = {}
        seen = frames_seen = skipped_n = 0
        start = time.perf_counter()
        bar = self.log.progress_bar(steps)
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            log_now = self.is_log_step(step)
            terms, frames = self.train_step(batch, diagnose=log_now)
            self.state.global_step += 1
            n = int(batch.weight.sum().item())  # filler samples (weight 0) are not seen
            seen += n
            frames_seen += frames
            bar.update(1)
            if terms is None:  # skipped as non-finite: its loss is no part of the epoch's means
                skipped_n += n
                continue
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value * n
            elapsed = time.perf_counter() - start
            rate = seen * self.world / max(elapsed, 1e-9)
            frame_rate = frames_seen * self.world / max(elapsed, 1e-9)
            bar.set_postfix(step=self.state.global_step, loss=f"{terms['total']:.4f}", sps=f"{rate:.1f}",
                            fps=f"{frame_rate:.0f}")
            if log_now:
                self.log.log_step(terms, self.step_diagnostics, self.current_lr(), rate, frame_rate)
        bar.close()
        self.guard.check_epoch_loss(first_step)
        self.guard.check_finite_state(self.model, self.engine.optimizer)
        return self.epoch_terms(sums, seen, skipped_n, frames_seen, time.perf_counter() - start)

    def epoch_terms(self, sums: dict[str, float], seen: int, skipped_n: int, frames_seen: int,
                    elapsed: float) -> dict[str, float]:
        """The epoch's record of training: loss terms under train/ (plotted as losses), summed over ranks and
        averaged over the samples of the steps not skipped, throughput under perf/, and the means of the log
        steps' diagnostics under their metrics.jsonl keys (grad/*, align/* ...)."""
        names = sorted(sums)  # the same on every rank: ranks skip non-finite steps together
        summed = dist.all_reduce_sums([*(sums[name] for name in names), seen, skipped_n, frames_seen],
                                      self.device).tolist()
        totals = dict(zip(names, summed))
        n_total, skipped_total, frames_total = summed[len(names):]
        n_scored = n_total - skipped_total
        epoch_terms = {f"train/{k}": v / max(n_scored, 1.0) for k, v in totals.items()}
        epoch_terms["train/nonfinite_steps"] = self.guard.nonfinite_epoch
        epoch_terms.update({
            "perf/samples": n_total, "perf/samples_per_s": n_total / max(elapsed, 1e-9),
            "perf/frames_per_s": frames_total / max(elapsed, 1e-9), "perf/epoch_seconds": elapsed,
        })
        if self.device.type == "cuda":
            epoch_terms["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        epoch_terms.update(self.log.diagnostic_means())
        return epoch_terms

    # -- the run -----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.checkpointer.recover_best()  # a crash while best/ was being replaced
        point = self.checkpointer.find_resume()
        if point is not None:
            self.checkpointer.check_resumable(point)  # before anything is written: a refused resume changes nothing
        self.write_run_files()
        if point is not None:
            self.checkpointer.resume(point)
        self.log.open()
        while self.state.epoch < self.cfg.train.epochs:
            self.run_epoch()
        self.checkpointer.load_best()
        results = self.evaluator.final_evaluation()
        self.log.close()
        return results

    def run_epoch(self) -> None:
        state = self.state
        record: dict[str, Any] = {"epoch": state.epoch}
        record.update(self.train_epoch())
        metrics = self.evaluator.validate()
        record.update({f"valid/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        record["lr"] = self.current_lr()
        metric = self.cfg.train.select_metric
        value = metrics.get(metric)
        improved = improves(value, state.best)
        if improved:
            state.best = {"metric": metric, "value": value, "epoch": state.epoch}
        state.epoch += 1
        state.history.append(record)
        if improved:
            self.checkpointer.save_best()
        self.checkpointer.save_epoch(record)
        self.log.log_epoch(record, metrics, value, improved)


def run_training(cfg: CaratConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Entry point of every launcher's worker process, after the process group exists."""
    trainer = Trainer(cfg, ctx)
    return trainer.fit()
