"""Global, deterministic batch planning from a length index: token-budget buckets dealt evenly to ranks.

Pure functions over an [N, 3] array of (text, visual, audio) lengths; no files, no torch. The loader, the
``inspect`` command and the benchmarks all call them, so what they report is what training runs.

Cost model. A batch is padded per modality to its longest member, so its cost is
``B x max_m(w_m x max_len_m)`` (the padded frames of the most expensive modality, weighted). Samples are
ordered by their own cost ``max_m(w_m x len_m)`` (the shards are already sorted by audio frames, which is
this order for the default weights) and cut greedily: a batch grows while its cost stays within
``token_budget`` and its size within ``max_batch_size``. Short clips ride in big batches, long ones in small
ones, and padding stays small because neighbours have similar lengths. A single sample whose own cost exceeds
the budget forms a batch alone (it cannot be split); ``min_batch_size`` > 1 lets a batch exceed the budget
until it has that many samples.

Ranks. Synchronous data parallelism waits for the slowest rank at every step and hangs if ranks run
different numbers of steps (see platform-notes). So the plan is global: every rank computes the same plan
from the same manifest and (seed, epoch), and takes its own share.

* train: batches (in cost order) are grouped W at a time into *steps*, so the W batches run together have
  near-equal cost; the step order is shuffled and, inside a step, batches are dealt to ranks by a random
  permutation (no rank always gets the heavier one). ``B mod W`` batches chosen at random are dropped
  (``remainder="drop"``, counted) or the last step is completed with weight-0 filler batches
  (``remainder="pad"``). Optional ``sort_jitter`` perturbs each sample's cost by a factor
  ``exp(U(-j, j))`` before the cut, so batch composition changes between epochs at a small padding price.
* eval: no shuffle, no jitter; step s holds batches sW .. sW+W-1 and the last step is completed with filler
  batches, so every sample is seen exactly once and every rank runs the same number of forwards.

This is the ESPnet/lhotse approach (plan globally from a length index, equal counts per rank), with
fairseq-style zero-weight padding for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

FILLER = -1
"""Batch id of a filler batch in a rank's schedule (a copy of one cheap real sample with weight 0)."""


def sample_costs(lengths: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """[N] cost of each sample alone: max over modalities of ``weight x length``."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return (lengths * np.asarray(weights, dtype=np.float64)[None, :]).max(axis=1)


def batch_cost(lengths: np.ndarray, weights: Sequence[float]) -> float:
    """Padded cost of one batch with rows ``lengths`` [B, 3]: ``B x max_m(w_m x max_len_m)``."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return 0.0
    return float(len(lengths) * (lengths.max(axis=0) * np.asarray(weights, dtype=np.float64)).max())


def cost_order(lengths: np.ndarray, weights: Sequence[float], jitter: float = 0.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Sample indices by ascending cost (stable: ties keep manifest order), optionally jittered.

    Jitter multiplies each cost by ``exp(U(-jitter, jitter))`` so neighbours of similar length swap places
    between epochs; samples only move locally, so batches still read from the same few shards.
    """
    costs = sample_costs(lengths, weights)
    if jitter > 0.0:
        if rng is None:
            raise ValueError("cost_order: jitter > 0 needs an rng")
        costs = costs * np.exp(rng.uniform(-jitter, jitter, size=len(costs)))
    return np.argsort(costs, kind="stable")


def plan_batches(lengths: np.ndarray, token_budget: int, max_batch_size: int,
                 weights: Sequence[float] = (1.0, 1.0, 1.0), *, min_batch_size: int = 1,
                 order: np.ndarray | None = None) -> list[np.ndarray]:
    """Cut samples, taken in ``order`` (default: as given), greedily into token-budget batches.

    Returns index arrays into ``lengths``. A batch closes before the sample that would push its padded cost
    over ``token_budget`` or its size over ``max_batch_size``, unless it has fewer than ``min_batch_size``
    samples (then the budget may be exceeded). Every index appears in exactly one batch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 2 or lengths.shape[1] != 3:
        raise ValueError(f"lengths must be [N, 3], got {lengths.shape}")
    order = np.arange(len(lengths)) if order is None else np.asarray(order)
    w = np.asarray(weights, dtype=np.float64)
    weighted = (lengths[order] * w[None, :]).tolist()  # python floats: the loop below is scalar work
    batches: list[np.ndarray] = []
    start = 0
    peak = [0.0, 0.0, 0.0]
    for i, row in enumerate(weighted):
        size = i - start + 1
        new_peak = [max(peak[0], row[0]), max(peak[1], row[1]), max(peak[2], row[2])]
        over = size > max_batch_size or size * max(new_peak) > token_budget
        if over and size - 1 >= min_batch_size:
            batches.append(order[start:i])
            start, new_peak = i, list(row)
        peak = new_peak
    if start < len(order):
        batches.append(order[start:])
    return batches


@dataclass
class EpochPlan:
    """One epoch's global plan: the batches and each rank's schedule of batch ids (FILLER = filler)."""

    batches: list[np.ndarray]
    """Global batches (manifest row indices of the split)."""
    schedule: list[list[int]]
    """schedule[rank] = batch ids in the order that rank runs them; every rank has the same length."""
    dropped: list[int] = field(default_factory=list)
    """Batch ids left out this epoch (train with remainder='drop')."""
    filler_index: int = 0
    """The sample a filler batch copies (the cheapest one), with weight 0."""

    @property
    def steps(self) -> int:
        return len(self.schedule[0]) if self.schedule else 0

    def num_samples(self, rank: int) -> int:
        """Real samples rank ``rank`` sees this epoch."""
        return sum(len(self.batches[b]) for b in self.schedule[rank] if b != FILLER)

    @property
    def num_samples_global(self) -> int:
        return sum(self.num_samples(r) for r in range(len(self.schedule)))

    @property
    def dropped_samples(self) -> int:
        return sum(len(self.batches[b]) for b in self.dropped)


def _deal_steps(step_groups: list[list[int]], world_size: int, rng: np.random.Generator | None) -> list[list[int]]:
    """schedule[rank]: one batch of every step; a random permutation inside a step when rng is given."""
    schedule: list[list[int]] = [[] for _ in range(world_size)]
    for group in step_groups:
        perm = rng.permutation(world_size) if rng is not None else np.arange(world_size)
        for rank in range(world_size):
            schedule[rank].append(group[perm[rank]])
    return schedule


def _steps_of(batch_ids: list[int], world_size: int) -> list[list[int]]:
    """Consecutive groups of ``world_size`` batch ids; the last group is completed with FILLER."""
    groups = [batch_ids[i:i + world_size] for i in range(0, len(batch_ids), world_size)]
    if groups and len(groups[-1]) < world_size:
        groups[-1] = groups[-1] + [FILLER] * (world_size - len(groups[-1]))
    return groups


def plan_epoch(lengths: np.ndarray, *, token_budget: int, max_batch_size: int,
               weights: Sequence[float] = (1.0, 1.0, 1.0), min_batch_size: int = 1, world_size: int = 1,
               train: bool = True, seed: int = 0, epoch: int = 0, sort_jitter: float = 0.0,
               remainder: Literal["drop", "pad"] = "drop") -> EpochPlan:
    """The global plan of one epoch, identical on every rank for the same (lengths, settings, seed, epoch)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch])) if train else None
    jitter = sort_jitter if train else 0.0
    order = cost_order(lengths, weights, jitter, rng)
    batches = plan_batches(lengths, token_budget, max_batch_size, weights, min_batch_size=min_batch_size,
                           order=order)
    filler_index = int(order[0]) if len(order) else 0
    ids = list(range(len(batches)))
    dropped: list[int] = []
    if train and remainder == "drop":
        extra = len(ids) % world_size
        if extra:
            dropped = sorted(int(b) for b in rng.choice(len(ids), size=extra, replace=False))
            keep = set(dropped)
            ids = [b for b in ids if b not in keep]
    steps = _steps_of(ids, world_size)
    if train:
        steps = [steps[i] for i in rng.permutation(len(steps))]
    schedule = _deal_steps(steps, world_size, rng)
    return EpochPlan(batches=batches, schedule=schedule, dropped=dropped, filler_index=filler_index)


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray], weights: Sequence[float]) -> dict[str, float]:
    """Real frames / padded frames per modality, and for the costliest modality of each batch.

    ``cost`` sums, over batches, the real vs padded weighted frames of the modality that sets the batch's
    cost; this is the figure the token budget controls.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    real = np.zeros(3)
    padded = np.zeros(3)
    cost_real = cost_padded = 0.0
    for idx in batches:
        rows = lengths[idx]
        peak = rows.max(axis=0)
        real += rows.sum(axis=0)
        padded += len(rows) * peak
        m = int(np.argmax(peak * w))
        cost_real += float(rows[:, m].sum() * w[m])
        cost_padded += float(len(rows) * peak[m] * w[m])
    out = {name: float(real[i] / padded[i]) if padded[i] else 1.0
           for i, name in enumerate(("text", "visual", "audio"))}
    out["cost"] = cost_real / cost_padded if cost_padded else 1.0
    return out
