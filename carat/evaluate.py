"""``python -m carat.evaluate``: score a checkpoint on one split, every sample exactly once, in one process.

    python -m carat.evaluate --checkpoint runs/NAME --split test
    python -m carat.evaluate --checkpoint model.pt --split test --shards shards --tune-on valid --out m.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from carat.errors import CaratError
from carat.inference import collect_scores, load_model, score_batches, score_split  # noqa: F401  (re-exported)
from carat.storage import resolved
from carat.train.runsync import local_copy
from carat.metrics import compute_metrics, format_results_table, tune_thresholds


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
