"""Which modality does a trained model use? Test macro-AUC (and per emotion) with each modality, and each pair,
replaced by its train mean (standardised value 0 at every real frame), from a run's best model.

    python bench/probe_modalities.py RUN_DIR [--split test]   # a run with model.standardize_features=true

Results: BENCHMARKS.md, Learning, 2026-12-04.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from carat.data.loader import build_loader
from carat.data.segment import EMOTIONS
from carat.errors import CaratError
from carat.inference import collect_scores
from carat.inference import load_model
from carat.metrics import macro_roc_auc, roc_auc

REMOVED: tuple[tuple[str, ...], ...] = ((), ("text",), ("visual",), ("audio",), ("visual", "audio"),
                                        ("text", "audio"), ("text", "visual"))
"""Modality sets replaced by their train mean, one probe each (the first: nothing removed)."""


def scores_without(model, cfg, split: str, removed: tuple[str, ...]) -> dict:
    """Keys, labels and scores of ``split`` with the ``removed`` modalities set to their train mean."""
    loader = build_loader(Path(cfg.train.shard_dir), split, cfg.loader, rank=0, world_size=1, epoch=0, train=False)

    def score(batch):
        inputs = batch.model_inputs()
        for m in removed:
            mean = getattr(model, f"{m}_standardize").mean
            inputs[m] = mean.expand_as(inputs[m]) * inputs[f"{m}_mask"][..., None]
        return model.scores(model(**inputs))

    return collect_scores(loader, torch.device("cpu"), score)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (its best model), checkpoint or carat.export file")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    args = parser.parse_args(argv)
    try:
        model, cfg = load_model(args.run)
    except CaratError as err:
        print(f"probe_modalities: error: {err}", file=sys.stderr)
        return 1
    if not cfg.model.standardize_features:
        print("probe_modalities: error: the model has no train-split feature means "
              "(model.standardize_features=false)", file=sys.stderr)
        return 1
    print(f"{args.split} macro-AUC | per emotion: {' '.join(EMOTIONS)}")
    for removed in REMOVED:
        pred = scores_without(model, cfg, args.split, removed)
        per = [roc_auc(pred["labels"][:, c], pred["scores"][:, c]) for c in range(len(EMOTIONS))]
        print(f"without {'+'.join(removed) or 'nothing':<14} {macro_roc_auc(pred['labels'], pred['scores']):.3f} | "
              + " ".join("-" if a is None else f"{a:.3f}" for a in per), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
