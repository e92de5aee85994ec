"""How much of a trained model's test F1 is the threshold rule? Test micro/macro-F1 of a run's best model under
decision rules chosen on the validation split: the seed's fixed 0.2, carat's per-emotion thresholds that
maximise each emotion's F1 (what the loop reports as "tuned"), one shared threshold that maximises micro-F1,
and per-emotion thresholds that maximise micro-F1 (coordinate ascent from the shared one).

    python bench/probe_thresholds.py RUN_DIR [RUN_DIR ...]

Per-emotion F1-optimal thresholds maximise macro-F1 but not micro-F1: a rare emotion's F1-optimal threshold is
low, and the false positives it buys count in the pooled micro counts. Results: BENCHMARKS.md, Learning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from carat.data.loader import build_loader
from carat.errors import CaratError
from carat.inference import collect_scores
from carat.inference import load_model
from carat.metrics import DEFAULT_THRESHOLD_GRID, compute_metrics, tune_thresholds

GRID = DEFAULT_THRESHOLD_GRID


def split_scores(model, cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    loader = build_loader(Path(cfg.train.shard_dir), split, cfg.loader, rank=0, world_size=1, epoch=0, train=False)
    with torch.no_grad():
        pred = collect_scores(loader, torch.device("cpu"), lambda batch: model.scores(model(**batch.model_inputs())))
    return pred["labels"], pred["scores"]


def micro_f1(y: np.ndarray, s: np.ndarray, t: np.ndarray) -> float:
    return compute_metrics(y, s, t)["micro_f1"]


def shared_micro_threshold(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    best = max(GRID, key=lambda g: (micro_f1(y, s, np.full(6, g)), -abs(g - 0.2)))
    return np.full(6, best)


def per_emotion_micro_thresholds(y: np.ndarray, s: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Coordinate ascent on validation micro-F1, one emotion's threshold at a time, from the shared optimum."""
    t = shared_micro_threshold(y, s)
    for _ in range(rounds):
        for c in range(6):
            def with_c(g: float) -> np.ndarray:
                trial = t.copy()
                trial[c] = g
                return trial
            t = with_c(max(GRID, key=lambda g: (micro_f1(y, s, with_c(g)), -abs(g - t[c]))))
    return t


RULES = {
    "fixed 0.2": lambda y, s: np.full(6, 0.2),
    "per-emotion F1 (carat's tuned)": tune_thresholds,
    "shared, micro-F1": shared_micro_threshold,
    "per-emotion, micro-F1": per_emotion_micro_thresholds,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (their best model) or export files")
    args = parser.parse_args(argv)
    print(f"{'run':<40} {'rule':<32} test micro-F1  macro-F1")
    for run in args.runs:
        try:
            model, cfg = load_model(run)
        except CaratError as err:
            print(f"probe_thresholds: error: {err}", file=sys.stderr)
            return 1
        model.eval()
        (yv, sv), (yt, st) = split_scores(model, cfg, "valid"), split_scores(model, cfg, "test")
        for name, rule in RULES.items():
            test = compute_metrics(yt, st, rule(yv, sv))
            print(f"{str(run)[-40:]:<40} {name:<32} {test['micro_f1']:.3f}         {test['macro_f1']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
