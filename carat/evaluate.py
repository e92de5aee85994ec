"""``python -m carat.evaluate``: score a checkpoint on one split, every sample exactly once, in one process.

    python -m carat.evaluate --checkpoint runs/NAME --split test
    python -m carat.evaluate --checkpoint model.pt --split test --shards shards --tune-on valid --out m.json
    python -m carat.evaluate --config eval.toml --evaluate.split=valid --show-config

Its flags are shorthands of the keys of the [evaluate] section (``EvaluateConfig``): a ``--config`` TOML file
may set them in an [evaluate] table, ``--evaluate.KEY=VALUE`` overrides any, and ``--show-config`` prints the
resolved section, every key documented. Precedence: defaults < --config file < flags < overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from carat.cli import Alias, add_aliases, require, resolve_section, section_parser
from carat.config import describe_sections
from carat.errors import CaratError
from carat.inference import collect_scores, load_model, score_batches, score_split  # noqa: F401  (re-exported)
from carat.inference import torch_device
from carat.inference_config import ScoringConfig, scoring_aliases
from carat.storage import resolved
from carat.train.runsync import local_copy
from carat.metrics import compute_metrics, format_results_table, tune_thresholds


@dataclass
class EvaluateConfig(ScoringConfig):
    """``python -m carat.evaluate``: which model, which split, where the metrics go."""

    shards: str | None = None
    """Shard directory or object-store URL; none = the corpus the run trained on (its train.shard_dir)."""
    tune_on: Literal["valid", "train"] | None = None
    """Also report metrics at per-class thresholds tuned on this split; none = only at the one threshold."""
    out: str | None = None
    """Write the metrics as JSON here; none = print them only."""


SECTION = "evaluate"
ALIASES: tuple[Alias, ...] = scoring_aliases(SECTION) + tuple(
    Alias(f"--{key.replace('_', '-')}", f"{SECTION}.{key}") for key in ("shards", "tune_on", "out"))
"""Every flag is a documented shorthand of an [evaluate] key."""


def build_parser() -> argparse.ArgumentParser:
    parser = section_parser("python -m carat.evaluate", __doc__, SECTION)
    add_aliases(parser, ALIASES, {SECTION: EvaluateConfig()})
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, cfg = resolve_section(parser, argv, SECTION, EvaluateConfig, ALIASES)
        if args.show_config:
            print(describe_sections({SECTION: cfg}), end="")
            return 0
        require(parser, cfg, ALIASES, ("checkpoint",))
        model, run_cfg = load_model(local_copy(cfg.checkpoint), cfg.tag)
        shard_dir = resolved(cfg.shards or run_cfg.train.shard_dir)
        device = torch_device(cfg.device)
        threshold = run_cfg.model.threshold if cfg.threshold is None else cfg.threshold
        pred = score_split(model, run_cfg, shard_dir, cfg.split, device)
        results = {f"{cfg.split} @{threshold:g}": compute_metrics(pred["labels"], pred["scores"], threshold)}
        if cfg.tune_on:
            tuned_on = score_split(model, run_cfg, shard_dir, cfg.tune_on, device)
            thresholds = tune_thresholds(tuned_on["labels"], tuned_on["scores"])
            results[f"{cfg.split} @tuned({cfg.tune_on})"] = compute_metrics(pred["labels"], pred["scores"], thresholds)
    except CaratError as err:
        print(f"carat.evaluate: error: {err}", file=sys.stderr)
        return 1
    print(format_results_table(results))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
