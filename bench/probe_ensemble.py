"""Would averaging several epochs' predictions beat the one best epoch? A snapshot-ensemble probe.

For a run trained with every epoch's checkpoint kept (``--train.keep_checkpoints`` >= its epochs), score each
epoch's model on valid and test, then compare on test: the loop's rule (the epoch with the best validation
macro-AUC), the mean probabilities of the top-k epochs by validation macro-AUC, and of the last k epochs.
Micro-F1 at one shared threshold, macro-F1 at per-emotion thresholds, both tuned on valid (the loop's rules).

    python bench/probe_ensemble.py RUN_DIR [RUN_DIR ...] [--k 3 5]

Results: BENCHMARKS.md, Learning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from carat.errors import CaratError
from carat.inference import load_model
from carat.metrics import compute_metrics, macro_roc_auc, tune_shared_threshold, tune_thresholds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_thresholds import split_scores  # noqa: E402  (bench scripts are not a package)


def epoch_tags(run: Path) -> list[str]:
    """Complete epoch checkpoint tags under RUN/checkpoints, oldest first (the resume logic's own tag order)."""
    from carat.train.checkpoint import candidate_tags, epoch_of_tag, incomplete_reason

    root = run / "checkpoints"
    tags = [t for t in reversed(candidate_tags(root))
            if epoch_of_tag(t) is not None and incomplete_reason(root / t) is None]
    if not tags:
        raise CaratError(f"{root} holds no complete epoch checkpoint tags")
    return tags


def score_epochs(run: Path) -> list[dict]:
    rows = []
    for tag in epoch_tags(run):
        model, cfg = load_model(run / "checkpoints", tag)
        (yv, sv), (yt, st) = split_scores(model, cfg, "valid"), split_scores(model, cfg, "test")
        rows.append({"tag": tag, "yv": yv, "sv": sv, "yt": yt, "st": st, "valid_auc": macro_roc_auc(yv, sv)})
        print(f"  {tag}: valid macro-AUC {rows[-1]['valid_auc']:.4f}", file=sys.stderr, flush=True)
    return rows


def test_scores(yv: np.ndarray, sv: np.ndarray, yt: np.ndarray, st: np.ndarray) -> tuple[float, float, float]:
    """(test micro-F1 at the shared valid threshold, macro-F1 at per-emotion valid thresholds, test macro-AUC)."""
    micro = compute_metrics(yt, st, np.full(6, tune_shared_threshold(yv, sv)))["micro_f1"]
    macro = compute_metrics(yt, st, tune_thresholds(yv, sv))["macro_f1"]
    return micro, macro, macro_roc_auc(yt, st)


def ensemble(rows: list[dict]) -> tuple[float, float, float]:
    yv, yt = rows[0]["yv"], rows[0]["yt"]
    sv = np.mean([r["sv"] for r in rows], axis=0)
    st = np.mean([r["st"] for r in rows], axis=0)
    return test_scores(yv, sv, yt, st)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories with every epoch's checkpoint kept")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5], help="ensemble sizes (epochs averaged)")
    args = parser.parse_args(argv)
    print(f"{'run':<28} {'rule':<34} test micro-F1  macro-F1  AUC")
    for run in args.runs:
        try:
            rows = score_epochs(run)
        except CaratError as err:
            print(f"probe_ensemble: error: {err}", file=sys.stderr)
            return 1
        ranked = sorted(rows, key=lambda r: -r["valid_auc"])  # stable: ties keep the earlier epoch, as the loop
        ks = [k for k in args.k if k <= len(rows)]  # a k beyond the run's epochs would be mislabelled
        rules = {"best epoch (the loop's rule)": ranked[:1]}
        rules.update({f"mean of top {k} by valid AUC": ranked[:k] for k in ks})
        rules.update({f"mean of last {k}": rows[-k:] for k in ks})
        for name, chosen in rules.items():
            micro, macro, auc = ensemble(chosen)
            print(f"{str(run)[-28:]:<28} {name:<34} {micro:.3f}         {macro:.3f}     {auc:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
