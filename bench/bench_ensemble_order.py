"""Does varying the batch order with the ensemble's members change the ensemble's gain?

An ensemble's members used to vary ``train.seed`` only (initialisation, dropout, augmentation) and share one
batch plan (``loader.seed``); they now vary both (:func:`carat.ensemble.member_config`). For each base seed s
this trains, one process each (``--launcher none``), the members of both rules on one corpus:

    shared order:  (train.seed s + i, loader.seed s)       i = 0 .. N-1
    varied order:  (train.seed s + i, loader.seed s + i)   (member 0 is the same run in both)

and scores each member's best model and both ensembles (the mean of the members' probabilities) on test:
micro-F1 at one threshold and macro-F1 at per-emotion thresholds, both tuned on valid, and macro-AUC.

    python bench/bench_ensemble_order.py --shards DIR [--preset tiny] [--members 3] [--seeds 0 1]

Results: BENCHMARKS.md, Learning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from carat.data.loader.pipeline import build_loader
from carat.inference import load_model, score_batches
from carat.metrics import compute_metrics, macro_roc_auc, tune_shared_threshold, tune_thresholds


def train_member(shards: Path, out: Path, preset: str, seed: int, loader_seed: int) -> Path:
    """One member run (reused when it finished before: the bench resumes)."""
    name = f"s{seed}-l{loader_seed}"
    run = out / name
    if not (run / "results.json").is_file():
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run([sys.executable, "-m", "carat.train", "--preset", preset, "--launcher", "none",
                        f"--train.shard_dir={shards}", f"--train.storage_path={out}", f"--train.run_name={name}",
                        f"--train.seed={seed}", f"--loader.seed={loader_seed}", "--train.synth_if_missing=false"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    return run


def split_scores(model, cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    loader = build_loader(Path(cfg.train.shard_dir), split, cfg.loader, rank=0, world_size=1, epoch=0, train=False)
    scored = score_batches(model, loader, torch.device("cpu"))
    return scored["labels"], scored["scores"]


def test_scores(yv: np.ndarray, sv: np.ndarray, yt: np.ndarray, st: np.ndarray) -> tuple[float, float, float]:
    """(test micro-F1 at the shared valid threshold, macro-F1 at per-emotion valid thresholds, test macro-AUC):
    the training loop's rules."""
    micro = compute_metrics(yt, st, np.full(6, tune_shared_threshold(yv, sv)))["micro_f1"]
    macro = compute_metrics(yt, st, tune_thresholds(yv, sv))["macro_f1"]
    return micro, macro, macro_roc_auc(yt, st)


def member_scores(run: Path) -> dict[str, np.ndarray]:
    model, cfg = load_model(run / "best")
    (yv, sv), (yt, st) = split_scores(model, cfg, "valid"), split_scores(model, cfg, "test")
    return {"yv": yv, "sv": sv, "yt": yt, "st": st}


def ensemble_scores(members: list[dict[str, np.ndarray]]) -> tuple[float, float, float]:
    first = members[0]
    return test_scores(first["yv"], np.mean([m["sv"] for m in members], axis=0),
                       first["yt"], np.mean([m["st"] for m in members], axis=0))


def fmt(scores: tuple[float, float, float]) -> str:
    return "{:.3f} / {:.3f} / {:.3f}".format(*scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True, help="a corpus (python -m carat.data synth --out DIR)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/carat-bench-ensemble-order"))
    args = parser.parse_args(argv)

    print("| base seed | rule | members (test micro / macro F1 / AUC) | ensemble (micro / macro F1 / AUC) |")
    print("| --- | --- | --- | --- |")
    summary: dict[str, list[tuple[float, float, float]]] = {"shared": [], "varied": []}
    for base in args.seeds:
        for rule in ("shared", "varied"):
            runs = [train_member(args.shards, args.out, args.preset, base + i, base + (i if rule == "varied" else 0))
                    for i in range(args.members)]
            scored = [member_scores(run) for run in runs]
            singles = [test_scores(m["yv"], m["sv"], m["yt"], m["st"]) for m in scored]
            together = ensemble_scores(scored)
            summary[rule].append(together)
            print(f"| {base} | {rule} order | {'; '.join(fmt(s) for s in singles)} | {fmt(together)} |", flush=True)
    means = {rule: tuple(float(np.mean(col)) for col in zip(*rows)) for rule, rows in summary.items()}
    print(json.dumps({"mean_ensemble": means}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
