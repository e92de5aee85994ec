"""The one training loop, run by every launcher (Ray Train workers, the deepspeed launcher, one process).

A launcher only sets up processes and calls :func:`run_training` with a :class:`WorkerContext` saying where
the run lives and how to report a checkpoint. Everything else, the DeepSpeed engine, the loss normalised by
the global sample count, the cross-rank queue and prototype updates, evaluation on every sample exactly once,
checkpoints and resume, happens here, identically for all of them.

What a practitioner reads to see whether a run learns is produced here too: per-module gradient norms and the
model's own diagnostics at every log step (metrics.jsonl, TensorBoard; their epoch means in history.jsonl),
the best epoch chosen on ``train.select_metric``, ``[carat] warning:`` lines (constant predictions, a test
score not above the card's baselines) that results.json keeps under "warnings", and the verdict against the
dataset card's floor and the label prior in results.json.

Divergence is a failure, never a result (issue 26). The run stops with one ``training diverged: ...`` line
(a :class:`TrainingDiverged`: what, at which step or epoch, what to change), before that epoch is validated,
checkpointed or judged, when

- the loss stays above ``train.loss_explosion_factor`` times the *initial* loss scale (the first step's loss,
  before any update; checkpointed): :data:`EXPLODED_STEPS_IN_A_ROW` steps in a row, or an epoch's median step
  loss. The reference is not the recent median, which an explosion from the first steps has already raised;
  one spike that the next steps leave behind only warns (:meth:`Trainer.watch_loss`);
- a weight, buffer or optimizer-state tensor holds NaN/inf after an epoch's steps;
- the validation scores are NaN/inf, or the same for every clip (:func:`carat.metrics.scores_depend_on_input`:
  the network's output no longer depends on its input).

The weaker finding, the same *labels* for every clip at the model threshold, stays a warning: it is common
after one epoch on a tiny corpus while the scores still rank the clips; the verdict then says whether the run
beats an input-independent predictor (:func:`carat.metrics.verdict`), and a run that does not beat its
baselines still ends with exit status 0: it is an honest result, not a failure.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from carat.config import CaratConfig, config_to_dict, config_to_toml
from carat.data.batch import Batch
from carat.data.loader import build_loader
from carat.errors import CaratError, DataError
from carat.inference import collect_scores
from carat.metrics import (
    NUM_CLASSES, SCORE_SPREAD_ATOL, compute_metrics, constant_prediction, scores_depend_on_input, tuned_metrics,
)
from carat.model import CARAT, CaratLoss
from carat.report import assemble_results, judge, write_results_files
from carat.train import dist
from carat.train.averaging import WeightAverage
from carat.train.checkpoint import (
    CheckpointError, KeptCopy, ResumePoint, checkpoint_write_errors, clear_tag, corpus_fingerprint, resume_refusal,
    find_resume_point, list_tag_files, load_checkpoint_file, recover_dir, replace_dir, require_intact,
    safe_torch_load, save_torch_atomic, seal_files, torch_save_reports_os_errors, write_completion_marker,
    write_latest,
)
from carat.train.deepspeed_config import build_ds_config, default_ds_config_path, read_ds_config
from carat.train.network import rank_placement
from carat.train.optim import build_optimizer, build_scheduler
from carat.train.rundir import (
    RunDir, append_jsonl, copy_card, environment_report, rewrite_history, truncate_history, write_json_atomic,
)

EXPLODED_STEPS_IN_A_ROW = 3
"""Steps in a row with a loss above ``train.loss_explosion_factor`` times the initial loss scale that stop the
run as diverged. One such step is a spike the run may survive (it is warned about); three are a trend. Short
epochs are covered by the epoch's median step loss."""

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


class TrainingDiverged(CaratError):
    """Training diverged: the message says what happened, at which step or epoch, and what to change."""


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


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process, as tensors and plain numbers only: loadable with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # A bar only on rank 0 and only on a terminal: logs of batch jobs stay readable.
    quiet = not enabled or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=False)


class Trainer:
    """One rank's view of a run: small named steps, the same for every launcher."""

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
            from carat.data.featstats import load_feature_stats

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
        self.epoch = 0
        self.global_step = 0
        self.best = fresh_best(cfg.train.select_metric)
        self.history: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        """Every ``[carat] warning:`` of the run, in order; checkpointed, and written to results.json."""
        self.step_diagnostics: dict[str, float] = {}
        """Gradient norms and model diagnostics of the last train_step run with diagnose=True."""
        self.epoch_diagnostics = MeanMeter()
        self.tb = None  # TensorBoard writer, rank 0 only, opened in fit()
        self.corpus = corpus_fingerprint(ctx.shard_dir)
        """Hash of the shard table trained on: a resume on other shards is refused."""
        self.nonfinite_total = 0
        """Steps skipped for a non-finite loss or gradient norm, over the whole run (checkpointed)."""
        self.nonfinite_epoch = 0
        self.nonfinite_in_a_row = 0
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=50)
        self.explosion_warned = False
        self.initial_loss: float | None = None
        """The run's initial loss scale: the mean over ranks of its first finite step's loss (checkpointed)."""
        self.initial_loss_step = 0
        self.exploded_in_a_row = 0
        self.epoch_losses: list[float] = []
        """This epoch's step losses, each the mean over all ranks (the same list on every rank)."""

    # -- setup -------------------------------------------------------------------------------------------
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

    def evaluation_weights(self):
        """The weights evaluation uses: the moving average where there is one, else the trained ones."""
        return self.average.applied(self.model) if self.average is not None else contextlib.nullcontext()

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

    @property
    def model(self) -> CARAT:
        return self.engine.module.model

    def write_run_files(self) -> None:
        ranks = dist.gather_objects(rank_placement(self.rank))  # a collective: every rank takes part
        if not self.is_main:
            return
        self.run.create()
        self.run.config.write_text(config_to_toml(self.cfg))
        write_json_atomic(self.run.environment,
                          environment_report(self.ctx.launcher, self.world, self.device, ranks))
        copy_card(self.ctx.shard_dir, self.run)

    # -- checkpoints -------------------------------------------------------------------------------------
    def client_state(self, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """carat's state in every checkpoint; ``history`` (with this epoch's ``record``) makes history.jsonl
        reconstructible from the checkpoint alone."""
        return {
            "epoch": self.epoch, "global_step": self.global_step, "best": dict(self.best),
            "history": self.history, "config": config_to_dict(self.cfg), "world_size": self.world,
            "warnings": list(self.warnings), "corpus": self.corpus, "record": record,
            "nonfinite_total": self.nonfinite_total,
            "initial_loss": self.initial_loss, "initial_loss_step": self.initial_loss_step,
            **({"weight_average": self.average.state_dict()} if self.average is not None else {}),
        }

    def save_checkpoint(self, root: Path, tag: str, record: dict[str, Any] | None = None,
                        kept_copy: KeptCopy | None = None) -> None:
        """A complete-or-absent checkpoint (see :mod:`carat.train.checkpoint`): DeepSpeed's files and each
        rank's RNG file, fsync'ed, then rank 0's completion marker, then ``latest``. ``kept_copy``: what a
        failed save leaves valid when ``root`` is a staging folder."""
        tag_dir = root / tag
        with checkpoint_write_errors(root, tag, kept_copy):
            if self.is_main:
                clear_tag(tag_dir)  # a torn tag of an earlier attempt, or the tag being replaced
            dist.barrier()
            with torch_save_reports_os_errors():  # a full disk: ENOSPC naming the file, not `unexpected pos`
                self.engine.save_checkpoint(str(root), tag=tag, client_state=self.client_state(record),
                                            save_latest=False)
            # DeepSpeed keeps rank 0's client state only; RNG streams differ per rank, so each rank saves its own.
            save_torch_atomic(rng_state(), tag_dir / f"rng_rank{self.rank}.pt")
            mine = list_tag_files(tag_dir)
            digests = seal_files(tag_dir, list(mine))  # each rank hashes (and fsyncs) what it wrote
            # Under Ray every rank saves into its own folder: the marker lists the files of all of them.
            files: dict[str, int] = {}
            hashes: dict[str, str] = {}
            for sizes, part in dist.gather_objects((mine, digests)):
                files.update(sizes)
                hashes.update(part)
            if self.is_main:
                write_completion_marker(tag_dir, files, {
                    "epoch": self.epoch, "global_step": self.global_step, "world_size": self.world,
                    "corpus": self.corpus, "record": record}, hashes)
                write_latest(root, tag)
        dist.barrier()

    def save_best(self) -> None:
        """best/ is replaced whole: written beside it, then swapped in, so a crash keeps the old best model."""
        staging = self.run.best.with_name(self.run.best.name + ".staging")
        try:
            self.save_checkpoint(staging, "best", kept_copy=KeptCopy(self.run.best, "best model"))
        except CheckpointError:
            if self.is_main:  # a torn staging copy only holds the space the next save needs
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.is_main:
            replace_dir(staging, self.run.best)
        dist.barrier()

    def find_resume(self) -> ResumePoint | None:
        """The newest complete checkpoint of ``ctx.resume_dir`` (None: start fresh), warning about newer
        incomplete ones that are skipped."""
        if self.ctx.resume_dir is None:
            return None
        point = find_resume_point(self.ctx.resume_dir)
        if point is not None and point.warning():
            self.warn(point.warning())
        if point is not None and point.note() and self.is_main:
            print(f"[carat] note: {point.note()}", flush=True)
        return point if point is not None and point.tag is not None else None

    def resume(self, point: ResumePoint) -> None:
        directory, tag = point.root, point.tag
        with safe_torch_load():
            path, state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise CheckpointError(f"no DeepSpeed checkpoint could be loaded from {directory / tag}")
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best = restore_best(dict(state["best"]), self.cfg.train.select_metric, self.history)
        self.warnings = list(state.get("warnings", [])) + [w for w in self.warnings if w not in state.get("warnings", [])]
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.restore_initial_loss(state)
        self.restore_average(state, directory / tag)
        rng_file = directory / tag / f"rng_rank{self.rank}.pt"
        try:
            set_rng_state(load_checkpoint_file(rng_file))
        except (CheckpointError, KeyError, TypeError) as err:  # still a valid resume, only not bit-identical
            print(f"[carat] warning: {rng_file}: {err}; rank {self.rank} resumes with fresh RNG streams")
        if self.is_main:
            print(f"[carat] resumed from {directory / tag} after epoch {self.epoch} (step {self.global_step})")

    def restore_initial_loss(self, state: dict[str, Any]) -> None:
        """The initial loss scale of the run being resumed. A checkpoint written before it was saved gives
        the first epoch's mean loss, its nearest stand-in; the first step after the resume would be the
        trained loss, a far lower reference."""
        if state.get("initial_loss") is not None:
            self.initial_loss = float(state["initial_loss"])
            self.initial_loss_step = int(state.get("initial_loss_step", 1))
        elif self.history and isinstance(self.history[0].get("train/total"), (int, float)):
            self.initial_loss = float(self.history[0]["train/total"])
            self.initial_loss_step = 1

    def restore_average(self, state: dict[str, Any], where: Path) -> None:
        if self.average is None:
            return
        if "weight_average" not in state:
            raise CheckpointError(f"{where} holds no weight average, and train.ema_decay="
                                  f"{self.cfg.train.ema_decay} needs one")
        try:
            self.average.load_state_dict(state["weight_average"], str(where))
        except ValueError as err:
            raise CheckpointError(str(err)) from None

    def check_resumable(self, point: ResumePoint) -> None:
        """Refuse, before anything is written, a resume whose saved state means something else: another
        world size (ZeRO shards optimizer state by rank), another corpus, or changed config keys that
        shape the model, loss, schedule or batch plan (:data:`carat.train.checkpoint.RESUMABLE_CHANGES`)."""
        from carat.train.checkpoint import read_client_state

        refusal = resume_refusal(read_client_state(point.root, point.tag), config_to_dict(self.cfg), self.corpus,
                                 self.world, point.root / point.tag, self.ctx.shard_dir, self.run.config)
        if refusal:
            raise CheckpointError(refusal)

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
            self.skip_nonfinite_step(batch, "loss", bad_terms, values)
            return None, frames
        if self.cfg.train.loss_explosion_factor:
            # The mean over all ranks: every rank takes the same decision on the same number.
            self.check_loss_scale(numbers.weighted_total_global / max(n_global, 1.0), batch)
        # DeepSpeed averages gradients over ranks; scaling each rank's mean by its share of the global batch
        # makes the result the mean over all samples of the step, whatever the per-rank batch sizes.
        scale = n_local * self.world / max(n_global, 1.0)
        self.engine.backward(terms["total"] * scale)
        if diagnose:  # the gradients exist only between backward and step
            self.step_diagnostics = {**module_gradient_norms(self.model), **model_diagnostics(self.model)}
        self.engine.step()
        if not self.step_was_finite():  # DeepSpeed saw inf/NaN gradients and did not update (or should not have)
            self.skip_nonfinite_step(batch, "gradient norm", [], values)
            return None, frames
        self.nonfinite_in_a_row = 0
        if self.average is not None:
            self.average.update(self.model)
        self.watch_loss(values["total"])
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

    # -- divergence --------------------------------------------------------------------------------------
    def step_was_finite(self) -> bool:
        """Whether the step just taken had a finite gradient: DeepSpeed's ZeRO optimizers skip the update on
        inf/NaN gradients (``was_step_applied`` False); its global gradient norm, where computed, must be
        finite too."""
        if not self.engine.was_step_applied():
            return False
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return True
        norm = float(norm.item() if isinstance(norm, torch.Tensor) else norm)
        return math.isfinite(norm)

    def skip_nonfinite_step(self, batch: Batch, what: str, bad_terms: list[str], values: dict[str, float]) -> None:
        """Count a skipped step (no update, no memory update); stop the run after too many in a row. All ranks
        call this on the same steps."""
        self.nonfinite_in_a_row += 1
        self.nonfinite_epoch += 1
        self.nonfinite_total += 1
        step = self.global_step + 1
        # Which rank saw what: gathered so rank 0's message names the samples wherever they were.
        seen = dist.gather_objects((self.rank, bad_terms, list(batch.keys[:8]), len(batch.keys)))
        where = "; ".join(
            f"rank {r}: {'non-finite ' + ', '.join(terms) if terms else 'terms finite'}, samples "
            f"{', '.join(keys)}{' ...' if n > len(keys) else ''}" for r, terms, keys, n in seen)
        limit = self.cfg.train.max_nonfinite_steps
        if self.is_main:
            print(f"[carat] warning: step {step} (epoch {self.epoch + 1}) skipped: non-finite {what} ({where}); "
                  f"{self.nonfinite_in_a_row} in a row (limit train.max_nonfinite_steps={limit})", flush=True)
        if self.nonfinite_in_a_row > limit:
            lr = self.scheduler.get_last_lr()[0]
            raise CaratError(
                f"training diverged: step {step} (epoch {self.epoch + 1}): {self.nonfinite_in_a_row} steps in a "
                f"row with a non-finite {what} (train.max_nonfinite_steps={limit}); {where}. "
                f"Lower optim.lr (now {lr:g}) or optim.grad_clip, and check those samples with "
                f"`python -m carat.data verify {self.ctx.shard_dir}`; the last checkpoint is unaffected")

    def diverged(self, where: str, what: str, extra: str = "") -> TrainingDiverged:
        """The one-line error of a diverged run. A lower learning rate is a new run: a resume keeps the
        optimizer settings (:data:`carat.train.checkpoint.RESUMABLE_CHANGES`)."""
        last = f"; the last checkpoint (epoch {self.epoch}) was written before it" if self.epoch else ""
        return TrainingDiverged(
            f"training diverged: {where}: {what}; lower --optim.lr (now {self.cfg.optim.lr:g}) and rerun under a "
            f"new --run-name (a resume keeps the optimizer settings){extra}{last}")

    def batch_samples(self, batch: Batch) -> str:
        """The step's samples on every rank (a collective), for an error that names them."""
        seen = dist.gather_objects((list(batch.keys[:8]), len(batch.keys)))
        keys = [key for part, _ in seen for key in part]
        more = sum(n for _, n in seen) > len(keys)
        return f"samples {', '.join(keys)}{' ...' if more else ''}"

    def check_loss_scale(self, loss: float, batch: Batch) -> None:
        """Stop the run when its loss stays far above the initial loss scale (the first step's loss, taken
        here): :data:`EXPLODED_STEPS_IN_A_ROW` steps in a row now, an epoch's median at the epoch's end
        (:meth:`check_epoch_loss`). ``loss`` is the mean over ranks, so every rank decides alike."""
        self.epoch_losses.append(loss)
        if self.initial_loss is None:
            self.initial_loss, self.initial_loss_step = loss, self.global_step + 1
            return
        if not self.is_exploded(loss):
            self.exploded_in_a_row = 0
            return
        self.exploded_in_a_row += 1
        if self.exploded_in_a_row < EXPLODED_STEPS_IN_A_ROW:
            return
        factor = self.cfg.train.loss_explosion_factor
        samples = self.batch_samples(batch)
        raise self.diverged(
            f"step {self.global_step + 1} (epoch {self.epoch + 1})",
            f"loss {loss:.4g} is {loss / self.initial_loss:.3g}x the initial loss {self.initial_loss:.4g} "
            f"(step {self.initial_loss_step}), {self.exploded_in_a_row} steps in a row above "
            f"train.loss_explosion_factor={factor:g} times it ({samples})",
            f" (or check those samples with `python -m carat.data verify {self.ctx.shard_dir}`)")

    def is_exploded(self, loss: float) -> bool:
        factor = self.cfg.train.loss_explosion_factor
        return bool(factor) and self.initial_loss is not None and self.initial_loss > 0 \
            and loss > factor * self.initial_loss

    def check_epoch_loss(self, first_step: int) -> None:
        """An epoch too short for :data:`EXPLODED_STEPS_IN_A_ROW` (the tiny preset has two steps on 24 clips)
        diverged when its median step loss is above ``train.loss_explosion_factor`` times the initial loss."""
        if not self.epoch_losses:
            return
        median = float(np.median(self.epoch_losses))
        if not self.is_exploded(median):
            return
        steps = f"steps {first_step}-{self.global_step}" if self.global_step > first_step else f"step {first_step}"
        raise self.diverged(
            f"epoch {self.epoch + 1} ({steps})",
            f"median step loss {median:.4g} is {median / self.initial_loss:.3g}x the initial loss "
            f"{self.initial_loss:.4g} (step {self.initial_loss_step}), above train.loss_explosion_factor="
            f"{self.cfg.train.loss_explosion_factor:g} times it")

    def check_finite_state(self) -> None:
        """After an epoch's steps, before anything is validated or saved: every weight, buffer and optimizer
        state tensor finite on every rank (a collective). An update of non-finite size leaves the loss of its
        own step finite and every later output NaN (lr=1e6 did: `scores contain 72 NaN/inf values`)."""
        local = first_nonfinite_tensor(named_state_tensors(self.model, self.engine.optimizer))
        if dist.all_reduce_sum(float(local is not None), self.device) == 0:
            return
        found = [(rank, name) for rank, name in enumerate(dist.gather_objects(local)) if name is not None]
        rank, name = found[0]
        where = f" on rank {rank}" if self.world > 1 else ""
        raise self.diverged(f"epoch {self.epoch + 1} (step {self.global_step})",
                            f"non-finite values in {name}{where} after the epoch's updates")

    def check_scores(self, scores: np.ndarray, split: str) -> None:
        """Scores (the same on every rank: gathered) that are NaN/inf, or the same for every clip."""
        where = f"epoch {self.epoch + 1} (step {self.global_step})"
        bad = int((~np.isfinite(scores)).sum())
        if bad:
            # Finite weights can still overflow the forward pass: their size says how far the run went.
            largest = max(dist.gather_objects(largest_weight(self.model)))
            raise self.diverged(where, f"{bad} of the {scores.size} {split} scores are NaN/inf (the largest "
                                       f"weight is {largest:.3g} in magnitude)")
        if not scores_depend_on_input(scores):
            raise self.diverged(
                where, f"all {len(scores)} {split} clips get the same scores (each emotion's within "
                       f"{SCORE_SPREAD_ATOL:g}): the model's outputs do not depend on the input (saturated or "
                       "dead units)")

    def watch_loss(self, total: float) -> None:
        """Warn, once per epoch, about a loss many times its recent median: an lr too high shows here first."""
        factor = self.cfg.train.loss_explosion_factor
        recent = self.recent_losses
        if factor and len(recent) >= 10 and not self.explosion_warned:
            median = float(np.median(recent))
            if median > 0 and total > factor * median:
                self.explosion_warned = True
                self.warn(f"step {self.global_step + 1} (epoch {self.epoch + 1}): loss {total:.4g} is "
                          f"{total / median:.0f}x the median {median:.4g} of the last {len(recent)} steps "
                          f"(train.loss_explosion_factor={factor:g}); the run may be diverging: lower optim.lr")
        recent.append(total)

    def is_log_step(self, step: int) -> bool:
        """Whether the step about to run (``step`` of this epoch) is logged: a function of counters every rank
        shares, since logging gathers gradients on all ranks."""
        return (self.global_step + 1) % self.cfg.train.log_every == 0 or step == self.steps_per_epoch - 1

    def train_epoch(self) -> dict[str, float]:
        self.engine.train()
        loader = self._loader("train", self.epoch, True)
        steps = self.steps_per_epoch
        self.epoch_diagnostics = MeanMeter()
        self.nonfinite_epoch = 0
        self.explosion_warned = False
        self.epoch_losses = []
        first_step = self.global_step + 1
        sums: dict[str, float] = {}
        seen = frames_seen = skipped_n = 0
        start = time.perf_counter()
        bar = _progress(steps, f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", self.is_main)
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            log_now = self.is_log_step(step)
            terms, frames = self.train_step(batch, diagnose=log_now)
            self.global_step += 1
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
            bar.set_postfix(step=self.global_step, loss=f"{terms['total']:.4f}", sps=f"{rate:.1f}",
                            fps=f"{frame_rate:.0f}")
            if log_now:
                self.epoch_diagnostics.add(self.step_diagnostics)
                if self.is_main:
                    self.log_step(terms, rate, frame_rate)
        bar.close()
        self.check_epoch_loss(first_step)
        self.check_finite_state()
        elapsed = time.perf_counter() - start
        names = sorted(sums)  # the same on every rank: ranks skip non-finite steps together
        summed = dist.all_reduce_sums([*(sums[name] for name in names), seen, skipped_n, frames_seen],
                                      self.device).tolist()
        totals = dict(zip(names, summed))
        n_total, skipped_total, frames_total = summed[len(names):]
        n_scored = n_total - skipped_total
        # Loss terms under train/ (plotted as losses), throughput under perf/.
        epoch_terms = {f"train/{k}": v / max(n_scored, 1.0) for k, v in totals.items()}
        epoch_terms["train/nonfinite_steps"] = self.nonfinite_epoch
        epoch_terms.update({
            "perf/samples": n_total, "perf/samples_per_s": n_total / max(elapsed, 1e-9),
            "perf/frames_per_s": frames_total / max(elapsed, 1e-9), "perf/epoch_seconds": elapsed,
        })
        if self.device.type == "cuda":
            epoch_terms["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        # Means over the epoch's log steps, under the same keys as in metrics.jsonl (grad/*, align/* ...).
        epoch_terms.update(self.epoch_diagnostics.means())
        return epoch_terms

    def log_step(self, terms: dict[str, float], samples_per_s: float, frames_per_s: float) -> None:
        record = {"epoch": self.epoch, "step": self.global_step, "lr": self.scheduler.get_last_lr()[0],
                  "samples_per_s": samples_per_s, "frames_per_s": frames_per_s}
        record.update({f"loss/{k}": v for k, v in terms.items()})
        record.update(self.step_diagnostics)
        append_jsonl(self.run.metrics, record)
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("epoch", "step"):
                    self.tb.add_scalar(key, value, self.global_step)

    # -- evaluation --------------------------------------------------------------------------------------
    def _cast(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in batch.model_inputs().items()}

    @torch.no_grad()
    def predict_split(self, split: str) -> dict[str, np.ndarray]:
        """Scores for every sample of ``split``, each exactly once, gathered from all ranks (same on every rank)."""
        self.engine.eval()
        local = collect_scores(self._loader(split, 0, False), self.device,
                               lambda batch: self.model.scores(self.engine(self._cast(batch))[0]))
        parts = dist.gather_objects((list(local["keys"]), local["labels"], local["scores"]))
        all_keys = [k for part in parts for k in part[0]]
        if len(set(all_keys)) != len(all_keys):
            raise DataError(f"evaluation of {split} saw {len(all_keys) - len(set(all_keys))} samples twice")
        order = np.argsort(np.array(all_keys, dtype=object), kind="stable")
        return {
            "keys": np.array(all_keys, dtype=object)[order],
            "labels": np.concatenate([p[1] for p in parts])[order],
            "scores": np.concatenate([p[2] for p in parts])[order],
        }

    def validate(self) -> dict[str, Any]:
        """Validation metrics at the model threshold plus F1 at thresholds tuned on valid itself
        (``tuned_micro_f1``, ``tuned_macro_f1``); warns when every clip gets the same labels."""
        with self.evaluation_weights():
            pred = self.predict_split("valid")
        self.check_scores(pred["scores"], "validation")
        threshold = self.cfg.model.threshold
        metrics = compute_metrics(pred["labels"], pred["scores"], threshold)
        tuned = tuned_metrics(pred["labels"], pred["scores"])
        metrics.update(tuned_micro_f1=tuned["micro_f1"], tuned_macro_f1=tuned["macro_f1"])
        self.check_constant_predictions(pred["scores"], threshold)
        return metrics

    def check_constant_predictions(self, scores: np.ndarray, threshold: float) -> None:
        labels = constant_prediction(scores, threshold)
        if labels is None:
            return
        if len(labels) == NUM_CLASSES:
            said = f"every emotion ({', '.join(labels)})"
        else:
            said = ", ".join(labels) or "no emotion"
        self.warn(f"epoch {self.epoch + 1}: all {len(scores)} validation clips get the same labels at threshold "
                  f"{threshold:g}: {said}; the model's predictions do not depend on its input")

    def warn(self, message: str) -> None:
        """Record a warning for results.json (every rank, so the checkpointed list is rank 0's) and print it
        on rank 0."""
        self.warnings.append(message)
        if self.is_main:
            print(f"[carat] warning: {message}", flush=True)

    # -- the run -----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        if self.is_main:
            recover_dir(self.run.best)  # a crash while best/ was being replaced
        point = self.find_resume()
        if point is not None:
            self.check_resumable(point)  # before anything is written: a refused resume changes nothing
        self.write_run_files()
        if point is not None:
            self.resume(point)
        if self.is_main:
            # history.jsonl from the checkpoint (a kill after the save but before the append lost its line);
            # metrics past the starting epoch belong to an attempt that did not checkpoint
            rewrite_history(self.run.history, self.history)
            truncate_history(self.run.metrics, self.epoch)
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run.tensorboard), purge_step=self.global_step or None)
        while self.epoch < self.cfg.train.epochs:
            self.run_epoch()
        results = self.final_evaluation()
        if self.tb is not None:
            self.tb.close()
        return results

    def run_epoch(self) -> None:
        record: dict[str, Any] = {"epoch": self.epoch}
        record.update(self.train_epoch())
        metrics = self.validate()
        record.update({f"valid/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        record["lr"] = self.scheduler.get_last_lr()[0]
        metric = self.cfg.train.select_metric
        value = metrics.get(metric)
        improved = improves(value, self.best)
        if improved:
            self.best = {"metric": metric, "value": value, "epoch": self.epoch}
        self.epoch += 1
        self.history.append(record)
        if improved:
            # `latest` in best/ too: under ZeRO-3 a module-only load ignores the tag and reads `latest`.
            self.save_best()
        self.checkpoint_and_report(record)
        if self.is_main:
            append_jsonl(self.run.history, record)
            self.log_epoch_scalars(record)
            print(f"[carat] epoch {self.epoch}/{self.cfg.train.epochs} loss {record.get('train/total', float('nan')):.4f} "
                  f"valid micro-F1 {metrics['micro_f1']:.4f} macro-F1 {metrics['macro_f1']:.4f} "
                  f"macro-AUC {_number(metrics['macro_auc'])} | {metric} {_number(value)}"
                  f"{' (best)' if improved else ''}", flush=True)

    def log_epoch_scalars(self, record: dict[str, Any]) -> None:
        """The epoch's history line to TensorBoard, at step = epochs done. The epoch means of the step
        diagnostics go under epoch/ so their tags do not mix the step axis of the per-step ones."""
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"epoch/{key}" if key in self.epoch_diagnostics.sums else key
            self.tb.add_scalar(tag, value, self.epoch)

    def checkpoint_and_report(self, record: dict[str, Any]) -> None:
        tag = f"epoch-{self.epoch:03d}"
        if self.ctx.checkpoint_root is not None:
            self.save_checkpoint(self.ctx.checkpoint_root, tag, record)
            self.ctx.report(record, self.ctx.checkpoint_root)
            if self.is_main:
                prune_checkpoints(self.ctx.checkpoint_root, self.cfg.train.keep_checkpoints)
            return
        with tempfile.TemporaryDirectory(prefix="carat-ckpt-") as tmp:
            self.save_checkpoint(Path(tmp), tag, record)
            self.ctx.report(record, Path(tmp))

    def final_evaluation(self) -> dict[str, Any]:
        """Reload the best epoch's weights, score valid and test, tune per-class thresholds on valid."""
        if (self.run.best / "best").is_dir():
            require_intact(self.run.best / "best", "best model")  # the model scored on test is the one saved
            with safe_torch_load():
                _, state = self.engine.load_checkpoint(str(self.run.best), tag="best", load_module_only=True,
                                                       load_optimizer_states=False, load_lr_scheduler_states=False)
            self.restore_average(state or {}, self.run.best / "best")
        with self.evaluation_weights():
            valid = self.predict_split("valid")
            test = self.predict_split("test")
        card = self.read_card()
        results = {"best_epoch": self.best["epoch"] + 1, **assemble_results(
            valid, test, self.cfg.model.threshold, self.cfg.train.tune_thresholds, card,
            world_size=self.world, launcher=self.ctx.launcher, run_dir=str(self.run.root))}
        results["select_metric"] = self.best["metric"]
        results["best_value"] = self.best["value"]
        results["nonfinite_steps"] = self.nonfinite_total
        if self.is_main:
            self.judge(results, card)
            self.write_results(results, test)
        return results

    def read_card(self) -> dict[str, Any]:
        """The dataset card in the run directory, or the shard directory's (only rank 0 writes the run's copy)."""
        for path in (self.run.card, self.ctx.shard_dir / "card.json"):
            if path.is_file():
                return json.loads(path.read_text())
        return {}

    def judge(self, results: dict[str, Any], card: dict[str, Any]) -> None:
        """Rank 0: the verdict against the run's dataset card, the end-of-run warnings, all warnings."""
        end_warnings = judge(results, card)
        if self.nonfinite_total:
            self.warn(f"{self.nonfinite_total} training step(s) were skipped for a non-finite loss or gradient "
                      "(train/nonfinite_steps in history.jsonl says which epochs)")
        for message in end_warnings:
            self.warn(message)
        results["warnings"] = list(self.warnings)

    def write_results(self, results: dict[str, Any], test: dict[str, np.ndarray]) -> None:
        from carat.plots import (
            DIAGNOSTICS_PLOT, plot_diagnostics, plot_per_emotion_f1, plot_pr_curves, plot_training_curves,
        )

        write_results_files(results, self.run.results, self.run.results_table, self.cfg.model.threshold)
        self.run.plots.mkdir(exist_ok=True)
        plot_training_curves(self.history, self.run.plots)
        plot_diagnostics(self.history, self.run.plots / DIAGNOSTICS_PLOT)
        plot_per_emotion_f1(results["test"], self.run.plots / "per_emotion_f1.png")
        plot_pr_curves(test["labels"], test["scores"], self.run.plots / "pr_curves.png")


def named_state_tensors(model: nn.Module, optimizer: Any) -> list[tuple[str, torch.Tensor]]:
    """This rank's weights, buffers and optimizer state, named for an error message. Under ZeRO-3 a weight's
    local partition is ``ds_tensor``; ZeRO-1/2 keep the fp32 master weights as the parameters of the wrapped
    torch optimizer (``optimizer.optimizer``), whose state holds the moments."""
    tensors: list[tuple[str, torch.Tensor]] = [
        (f"weight {name}", getattr(param, "ds_tensor", param)) for name, param in model.named_parameters()]
    tensors += [(f"buffer {name}", buffer) for name, buffer in model.named_buffers()]
    base = optimizer
    while not isinstance(base, torch.optim.Optimizer) and getattr(base, "optimizer", None) is not None:
        base = base.optimizer
    if isinstance(base, torch.optim.Optimizer):
        for g, group in enumerate(base.param_groups):
            for i, param in enumerate(group["params"]):
                tensors.append((f"optimizer parameter {i} of group {g}", param))
                for key, value in base.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors.append((f"optimizer state {key!r} of parameter {i} of group {g}", value))
    return tensors


def largest_weight(model: nn.Module) -> float:
    """The largest finite magnitude among this rank's weights (its ZeRO-3 partitions)."""
    largest = 0.0
    for param in model.parameters():
        values = getattr(param, "ds_tensor", param).detach()
        values = values[torch.isfinite(values)]
        if values.numel():
            largest = max(largest, float(values.abs().max()))
    return largest


def first_nonfinite_tensor(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN/inf, else None. One flag per tensor, stacked
    per device: one device sync per device (weights on the GPU, offloaded optimizer state on the CPU), not
    one per tensor."""
    floats = [(name, t) for name, t in named if t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor) in enumerate(floats):
        by_device.setdefault(tensor.device, []).append(index)
    bad: list[int] = []
    for indices in by_device.values():
        finite = torch.stack([torch.isfinite(floats[i][1].detach()).all() for i in indices]).cpu()
        bad += [indices[int(k)] for k in (~finite).nonzero().flatten()]
    return floats[min(bad)][0] if bad else None


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` epoch tags (names sort by epoch); returns what was removed."""
    import shutil

    tags = sorted(p for p in root.glob("epoch-*") if p.is_dir())
    removed = tags[:-keep] if keep > 0 else []
    for tag in removed:
        shutil.rmtree(tag, ignore_errors=True)
    return removed


def run_training(cfg: CaratConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Entry point of every launcher's worker process, after the process group exists."""
    trainer = Trainer(cfg, ctx)
    return trainer.fit()
