"""The divergence policy: when a run's steps are skipped, warned about, or the run stopped as diverged (issue 26).

Divergence is a failure, never a result. The run stops with one ``training diverged: ...`` line
(a :class:`TrainingDiverged`: what, at which step or epoch, what to change), before that epoch is validated,
checkpointed or judged, when

- the loss stays above ``train.loss_explosion_factor`` times the *initial* loss scale (the first step's loss,
  before any update; checkpointed): :data:`EXPLODED_STEPS_IN_A_ROW` steps in a row, or an epoch's median step
  loss. The reference is not the recent median, which an explosion from the first steps has already raised;
  one spike that the next steps leave behind only warns (:meth:`DivergenceGuard.watch_loss`);
- a weight, buffer or optimizer-state tensor holds NaN/inf after an epoch's steps;
- the validation scores are NaN/inf, or the same for every clip (:func:`carat.metrics.scores_depend_on_input`:
  the network's output no longer depends on its input).

A step with a non-finite loss or gradient is skipped on every rank (no update); more than
``train.max_nonfinite_steps`` of them in a row stop the run. :class:`DivergenceGuard` holds these rules and the
counters they need; every rank calls it on the same steps, so every rank decides alike.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from carat.data.loader.batch import Batch
from carat.errors import CaratError
from carat.metrics import SCORE_SPREAD_ATOL, scores_depend_on_input
from carat.train import dist
from carat.train.state import RunState

EXPLODED_STEPS_IN_A_ROW = 3
"""Steps in a row with a loss above ``train.loss_explosion_factor`` times the initial loss scale that stop the
run as diverged. One such step is a spike the run may survive (it is warned about); three are a trend. Short
epochs are covered by the epoch's median step loss."""


class TrainingDiverged(CaratError):
    """Training diverged: the message says what happened, at which step or epoch, and what to change."""


def step_was_finite(engine: Any) -> bool:
    """Whether the step just taken had a finite gradient: DeepSpeed's ZeRO optimizers skip the update on
    inf/NaN gradients (``was_step_applied`` False); its global gradient norm, where computed, must be
    finite too."""
    if not engine.was_step_applied():
        return False
    norm = engine.get_global_grad_norm()
    if norm is None:
        return True
    norm = float(norm.item() if isinstance(norm, torch.Tensor) else norm)
    return math.isfinite(norm)


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


class DivergenceGuard:
    """One rank's divergence checks and their counters. The run-long ones (non-finite steps, the initial loss)
    live in the shared :class:`RunState`, which checkpoints carry; the others restart each epoch
    (:meth:`start_epoch`) or with the process."""

    def __init__(self, state: RunState, *, explosion_factor: float, max_nonfinite_steps: int, lr: float,
                 shard_dir: Path, device: torch.device, warn: Callable[[str], None]) -> None:
        self.state = state
        self.explosion_factor = explosion_factor
        """``train.loss_explosion_factor``; 0 turns the loss checks off."""
        self.max_nonfinite_steps = max_nonfinite_steps
        self.lr = lr
        """``optim.lr``, for the advice in a divergence error."""
        self.shard_dir = shard_dir
        self.device = device
        self.warn = warn
        self.rank = dist.rank()
        self.world = dist.world_size()
        self.is_main = self.rank == 0
        self.nonfinite_epoch = 0
        self.nonfinite_in_a_row = 0
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=50)
        self.explosion_warned = False
        self.exploded_in_a_row = 0
        self.epoch_losses: list[float] = []
        """This epoch's step losses, each the mean over all ranks (the same list on every rank)."""

    def start_epoch(self) -> None:
        self.nonfinite_epoch = 0
        self.explosion_warned = False
        self.epoch_losses = []

    # -- steps -------------------------------------------------------------------------------------------
    def skip_nonfinite_step(self, batch: Batch, what: str, bad_terms: list[str], current_lr: float) -> None:
        """Count a skipped step (no update, no memory update); stop the run after too many in a row. All ranks
        call this on the same steps. ``current_lr``: the scheduler's, for the error's advice."""
        state = self.state
        self.nonfinite_in_a_row += 1
        self.nonfinite_epoch += 1
        state.nonfinite_total += 1
        step = state.global_step + 1
        # Which rank saw what: gathered so rank 0's message names the samples wherever they were.
        seen = dist.gather_objects((self.rank, bad_terms, list(batch.keys[:8]), len(batch.keys)))
        where = "; ".join(
            f"rank {r}: {'non-finite ' + ', '.join(terms) if terms else 'terms finite'}, samples "
            f"{', '.join(keys)}{' ...' if n > len(keys) else ''}" for r, terms, keys, n in seen)
        limit = self.max_nonfinite_steps
        if self.is_main:
            print(f"[carat] warning: step {step} (epoch {state.epoch + 1}) skipped: non-finite {what} ({where}); "
                  f"{self.nonfinite_in_a_row} in a row (limit train.max_nonfinite_steps={limit})", flush=True)
        if self.nonfinite_in_a_row > limit:
            raise CaratError(
                f"training diverged: step {step} (epoch {state.epoch + 1}): {self.nonfinite_in_a_row} steps in a "
                f"row with a non-finite {what} (train.max_nonfinite_steps={limit}); {where}. "
                f"Lower optim.lr (now {current_lr:g}) or optim.grad_clip, and check those samples with "
                f"`python -m carat.data verify {self.shard_dir}`; the last checkpoint is unaffected")

    def check_loss_scale(self, loss: float, batch: Batch) -> None:
        """Stop the run when its loss stays far above the initial loss scale (the first step's loss, taken
        here): :data:`EXPLODED_STEPS_IN_A_ROW` steps in a row now, an epoch's median at the epoch's end
        (:meth:`check_epoch_loss`). ``loss`` is the mean over ranks, so every rank decides alike."""
        if not self.explosion_factor:  # the loss checks are off: no initial loss is taken either
            return
        state = self.state
        self.epoch_losses.append(loss)
        if state.initial_loss is None:
            state.initial_loss, state.initial_loss_step = loss, state.global_step + 1
            return
        if not self.is_exploded(loss):
            self.exploded_in_a_row = 0
            return
        self.exploded_in_a_row += 1
        if self.exploded_in_a_row < EXPLODED_STEPS_IN_A_ROW:
            return
        samples = self.batch_samples(batch)
        raise self.diverged(
            f"step {state.global_step + 1} (epoch {state.epoch + 1})",
            f"loss {loss:.4g} is {loss / state.initial_loss:.3g}x the initial loss {state.initial_loss:.4g} "
            f"(step {state.initial_loss_step}), {self.exploded_in_a_row} steps in a row above "
            f"train.loss_explosion_factor={self.explosion_factor:g} times it ({samples})",
            f" (or check those samples with `python -m carat.data verify {self.shard_dir}`)")

    def step_taken(self, total: float) -> None:
        """A step that updated the weights: it ends a run of skipped steps, and its loss is watched."""
        self.nonfinite_in_a_row = 0
        self.watch_loss(total)

    def watch_loss(self, total: float) -> None:
        """Warn, once per epoch, about a loss many times its recent median: an lr too high shows here first."""
        factor = self.explosion_factor
        recent = self.recent_losses
        if factor and len(recent) >= 10 and not self.explosion_warned:
            median = float(np.median(recent))
            if median > 0 and total > factor * median:
                self.explosion_warned = True
                self.warn(f"step {self.state.global_step + 1} (epoch {self.state.epoch + 1}): loss {total:.4g} is "
                          f"{total / median:.0f}x the median {median:.4g} of the last {len(recent)} steps "
                          f"(train.loss_explosion_factor={factor:g}); the run may be diverging: lower optim.lr")
        recent.append(total)

    # -- epochs ------------------------------------------------------------------------------------------
    def check_epoch_loss(self, first_step: int) -> None:
        """An epoch too short for :data:`EXPLODED_STEPS_IN_A_ROW` (the tiny preset has two steps on 24 clips)
        diverged when its median step loss is above ``train.loss_explosion_factor`` times the initial loss."""
        if not self.epoch_losses:
            return
        state = self.state
        median = float(np.median(self.epoch_losses))
        if not self.is_exploded(median):
            return
        last = state.global_step
        steps = f"steps {first_step}-{last}" if last > first_step else f"step {first_step}"
        raise self.diverged(
            f"epoch {state.epoch + 1} ({steps})",
            f"median step loss {median:.4g} is {median / state.initial_loss:.3g}x the initial loss "
            f"{state.initial_loss:.4g} (step {state.initial_loss_step}), above train.loss_explosion_factor="
            f"{self.explosion_factor:g} times it")

    def check_finite_state(self, model: nn.Module, optimizer: Any) -> None:
        """After an epoch's steps, before anything is validated or saved: every weight, buffer and optimizer
        state tensor finite on every rank (a collective). An update of non-finite size leaves the loss of its
        own step finite and every later output NaN (lr=1e6 did: `scores contain 72 NaN/inf values`)."""
        local = first_nonfinite_tensor(named_state_tensors(model, optimizer))
        if dist.all_reduce_sum(float(local is not None), self.device) == 0:
            return
        found = [(rank, name) for rank, name in enumerate(dist.gather_objects(local)) if name is not None]
        rank, name = found[0]
        where = f" on rank {rank}" if self.world > 1 else ""
        raise self.diverged(f"epoch {self.state.epoch + 1} (step {self.state.global_step})",
                            f"non-finite values in {name}{where} after the epoch's updates")

    def check_scores(self, scores: np.ndarray, split: str, model: nn.Module) -> None:
        """Scores (the same on every rank: gathered) that are NaN/inf, or the same for every clip."""
        where = f"epoch {self.state.epoch + 1} (step {self.state.global_step})"
        bad = int((~np.isfinite(scores)).sum())
        if bad:
            # Finite weights can still overflow the forward pass: their size says how far the run went.
            largest = max(dist.gather_objects(largest_weight(model)))
            raise self.diverged(where, f"{bad} of the {scores.size} {split} scores are NaN/inf (the largest "
                                       f"weight is {largest:.3g} in magnitude)")
        if not scores_depend_on_input(scores):
            raise self.diverged(
                where, f"all {len(scores)} {split} clips get the same scores (each emotion's within "
                       f"{SCORE_SPREAD_ATOL:g}): the model's outputs do not depend on the input (saturated or "
                       "dead units)")

    # -- helpers -----------------------------------------------------------------------------------------
    def is_exploded(self, loss: float) -> bool:
        initial = self.state.initial_loss
        return bool(self.explosion_factor) and initial is not None and initial > 0 \
            and loss > self.explosion_factor * initial

    def diverged(self, where: str, what: str, extra: str = "") -> TrainingDiverged:
        """The one-line error of a diverged run. A lower learning rate is a new run: a resume keeps the
        optimizer settings (:data:`carat.train.checkpoint.RESUMABLE_CHANGES`)."""
        epochs = self.state.epoch
        last = f"; the last checkpoint (epoch {epochs}) was written before it" if epochs else ""
        return TrainingDiverged(
            f"training diverged: {where}: {what}; lower --optim.lr (now {self.lr:g}) and rerun under a "
            f"new --run-name (a resume keeps the optimizer settings){extra}{last}")

    def batch_samples(self, batch: Batch) -> str:
        """The step's samples on every rank (a collective), for an error that names them."""
        seen = dist.gather_objects((list(batch.keys[:8]), len(batch.keys)))
        keys = [key for part, _ in seen for key in part]
        more = sum(n for _, n in seen) > len(keys)
        return f"samples {', '.join(keys)}{' ...' if more else ''}"
