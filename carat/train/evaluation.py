"""Evaluation during training: a split's scores from the engine, the validation metrics of each epoch, the final
evaluation of the best epoch into results.json.

:class:`Evaluator` scores every sample of a split exactly once over all ranks, with the weights evaluation uses
(the moving average where there is one), and hands the scores to the divergence guard (NaN or input-independent
scores stop the run) before computing metrics. The results, verdict and plots are assembled by
:mod:`carat.report` and :mod:`carat.plots`; this module only gathers what they need.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from carat.config import CaratConfig
from carat.data.loader.batch import Batch
from carat.data.loader.pipeline import build_loader
from carat.errors import DataError
from carat.inference import collect_scores
from carat.metrics import NUM_CLASSES, compute_metrics, constant_prediction, tuned_metrics
from carat.model import CARAT
from carat.report import assemble_results, judge, write_results_files
from carat.train import dist
from carat.train.averaging import WeightAverage
from carat.train.divergence import DivergenceGuard
from carat.train.rundir import RunDir
from carat.train.state import RunState


class Evaluator:
    """One rank's evaluation of the run's engine: collective methods, called on every rank alike; rank 0
    alone judges the run and writes its results."""

    def __init__(self, engine: Any, state: RunState, guard: DivergenceGuard, cfg: CaratConfig, run: RunDir, *,
                 shard_dir: Path, launcher: str, device: torch.device,
                 inputs: Callable[[Batch], dict[str, torch.Tensor]], average: WeightAverage | None,
                 warn: Callable[[str], None]) -> None:
        self.engine = engine
        self.state = state
        self.guard = guard
        self.cfg = cfg
        self.run = run
        self.shard_dir = shard_dir
        self.launcher = launcher
        self.device = device
        self.inputs = inputs
        """A batch's model inputs in the engine's precision."""
        self.average = average
        self.warn = warn
        self.rank = dist.rank()
        self.world = dist.world_size()
        self.is_main = self.rank == 0

    @property
    def model(self) -> CARAT:
        return self.engine.module.model

    def evaluation_weights(self):
        """The weights evaluation uses: the moving average where there is one, else the trained ones."""
        return self.average.applied(self.model) if self.average is not None else contextlib.nullcontext()

    @torch.no_grad()
    def predict_split(self, split: str) -> dict[str, np.ndarray]:
        """Scores for every sample of ``split``, each exactly once, gathered from all ranks (same on every rank)."""
        self.engine.eval()
        loader = build_loader(self.shard_dir, split, self.cfg.loader, rank=self.rank, world_size=self.world,
                              epoch=0, train=False)
        local = collect_scores(loader, self.device,
                               lambda batch: self.model.scores(self.engine(self.inputs(batch))[0]))
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

    # -- each epoch --------------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        """Validation metrics at the model threshold plus F1 at thresholds tuned on valid itself
        (``tuned_micro_f1``, ``tuned_macro_f1``); warns when every clip gets the same labels."""
        with self.evaluation_weights():
            pred = self.predict_split("valid")
        self.guard.check_scores(pred["scores"], "validation", self.model)
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
        self.warn(f"epoch {self.state.epoch + 1}: all {len(scores)} validation clips get the same labels at "
                  f"threshold {threshold:g}: {said}; the model's predictions do not depend on its input")

    # -- the end of the run ------------------------------------------------------------------------------
    def final_evaluation(self) -> dict[str, Any]:
        """Score valid and test with the weights in the engine (the best epoch's, once the checkpointer has
        loaded them), tune per-class thresholds on valid; rank 0 judges the run and writes its results."""
        with self.evaluation_weights():
            valid = self.predict_split("valid")
            test = self.predict_split("test")
        card = self.read_card()
        best = self.state.best
        results = {"best_epoch": best["epoch"] + 1, **assemble_results(
            valid, test, self.cfg.model.threshold, self.cfg.train.tune_thresholds, card,
            world_size=self.world, launcher=self.launcher, run_dir=str(self.run.root))}
        results["select_metric"] = best["metric"]
        results["best_value"] = best["value"]
        results["nonfinite_steps"] = self.state.nonfinite_total
        if self.is_main:
            self.judge(results, card)
            self.write_results(results, test)
        return results

    def read_card(self) -> dict[str, Any]:
        """The dataset card in the run directory, or the shard directory's (only rank 0 writes the run's copy)."""
        for path in (self.run.card, self.shard_dir / "card.json"):
            if path.is_file():
                return json.loads(path.read_text())
        return {}

    def judge(self, results: dict[str, Any], card: dict[str, Any]) -> None:
        """Rank 0: the verdict against the run's dataset card, the end-of-run warnings, all warnings."""
        end_warnings = judge(results, card)
        skipped = self.state.nonfinite_total
        if skipped:
            self.warn(f"{skipped} training step(s) were skipped for a non-finite loss or gradient "
                      "(train/nonfinite_steps in history.jsonl says which epochs)")
        for message in end_warnings:
            self.warn(message)
        results["warnings"] = list(self.state.warnings)

    def write_results(self, results: dict[str, Any], test: dict[str, np.ndarray]) -> None:
        from carat.plots import (
            DIAGNOSTICS_PLOT, plot_diagnostics, plot_per_emotion_f1, plot_pr_curves, plot_training_curves,
        )

        write_results_files(results, self.run.results, self.run.results_table, self.cfg.model.threshold)
        self.run.plots.mkdir(exist_ok=True)
        history = self.state.history
        plot_training_curves(history, self.run.plots)
        plot_diagnostics(history, self.run.plots / DIAGNOSTICS_PLOT)
        plot_per_emotion_f1(results["test"], self.run.plots / "per_emotion_f1.png")
        plot_pr_curves(test["labels"], test["scores"], self.run.plots / "pr_curves.png")
