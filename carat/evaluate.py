"""``python -m carat.evaluate``: score a checkpoint on one split, every sample exactly once, in one process.

    python -m carat.evaluate --checkpoint runs/NAME --split test
    python -m carat.evaluate --checkpoint model.pt --split test --shards shards --tune-on valid --out m.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from carat.data.batch import Batch
from carat.errors import CaratError
from carat.storage import resolved
from carat.train.runsync import local_copy
from carat.metrics import compute_metrics, format_results_table, tune_thresholds


@torch.no_grad()
def collect_scores(batches: Iterable[Batch], device: torch.device,
                   score: Callable[[Batch], torch.Tensor]) -> dict[str, np.ndarray]:
    """Keys, labels and ``score(batch)`` of every real (weight > 0) sample; fillers are dropped here."""
    keys: list[str] = []
    labels, scores = [], []
    for batch in batches:
        batch = batch.to(device)
        real = batch.weight > 0
        batch_scores = score(batch)
        keys += [k for k, keep in zip(batch.keys, real.tolist()) if keep]
        labels.append(batch.labels[real].float().cpu().numpy())
        scores.append(batch_scores[real].float().cpu().numpy())
    return {"keys": np.array(keys, dtype=object),
            "labels": np.concatenate(labels) if labels else np.zeros((0, 6), np.float32),
            "scores": np.concatenate(scores) if scores else np.zeros((0, 6), np.float32)}


def score_batches(model, batches: Iterable[Batch], device: torch.device) -> dict[str, np.ndarray]:
    """Scores of a plain (non-DeepSpeed) CARAT model."""
    model.eval().to(device)
    return collect_scores(batches, device, lambda batch: model.scores(model(**batch.model_inputs())))


def score_split(model, cfg, shard_dir: Path, split: str, device: torch.device) -> dict[str, np.ndarray]:
    from carat.data.loader import build_loader

    loader = build_loader(shard_dir, split, cfg.loader, rank=0, world_size=1, epoch=0, train=False)
    return score_batches(model, loader, device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m carat.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its best model), DeepSpeed checkpoint, or `carat.export` file; a path "
                             "or an object-store URL (s3://bucket/runs/NAME)")
    parser.add_argument("--tag", help="DeepSpeed checkpoint tag")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument("--shards", help="shard directory or object-store URL (default: the one the run trained on)")
    parser.add_argument("--threshold", type=float, help="decision threshold (default: the model config's)")
    parser.add_argument("--tune-on", choices=("valid", "train"),
                        help="also report metrics at per-class thresholds tuned on this split")
    parser.add_argument("--out", type=Path, help="write the metrics as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    from carat.export import load_model

    args = build_parser().parse_args(argv)
    try:
        model, cfg = load_model(local_copy(args.checkpoint), args.tag)
        shard_dir = resolved(args.shards or cfg.train.shard_dir)
        device = torch.device(args.device)
        threshold = cfg.model.threshold if args.threshold is None else args.threshold
        pred = score_split(model, cfg, shard_dir, args.split, device)
        results = {f"{args.split} @{threshold:g}": compute_metrics(pred["labels"], pred["scores"], threshold)}
        if args.tune_on:
            tuned_on = score_split(model, cfg, shard_dir, args.tune_on, device)
            thresholds = tune_thresholds(tuned_on["labels"], tuned_on["scores"])
            results[f"{args.split} @tuned({args.tune_on})"] = compute_metrics(pred["labels"], pred["scores"], thresholds)
    except CaratError as err:
        print(f"carat.evaluate: error: {err}", file=sys.stderr)
        return 1
    print(format_results_table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
