"""``python -m carat.train``: train CARAT; with no arguments, the quickstart on a synthesized tiny corpus.

    python -m carat.train                                   # tiny preset, Ray + 2 DeepSpeed workers
    python -m carat.train --config run.toml --train.epochs=15 --model.hidden_size=512
    deepspeed --num_gpus 8 --module carat.train --launcher deepspeed --config run.toml
    python -m carat.train --launcher none                   # one process
    ray job submit --working-dir . -- python -m carat.train --config run.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from carat.config import PRESETS, CaratConfig, describe_config, load_config
from carat.errors import CaratError
from carat.metrics import format_verdict, verdict
from carat.train.rundir import new_run_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m carat.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config value: --section.key=value (sections: synth storage prepare loader model loss "
               "optim train). Precedence: preset < --config file < overrides.",
    )
    parser.add_argument("--config", type=Path, help="TOML file with [section] tables (see configs/)")
    parser.add_argument("--preset", choices=PRESETS,
                        help="defaults to start from (default: tiny without --config, else the file's preset or seed)")
    parser.add_argument("--launcher", choices=("ray", "deepspeed", "none"), help="same as --train.launcher")
    parser.add_argument("--run-name", help="same as --train.run_name; reusing a name resumes that run")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved configuration, every key documented, and exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def resolve_config(argv: list[str] | None) -> tuple[CaratConfig, argparse.Namespace]:
    args, overrides = build_parser().parse_known_args(argv)
    preset = args.preset or ("tiny" if args.config is None else "seed")
    if args.launcher:
        overrides.append(f"--train.launcher={args.launcher}")
    if args.run_name:
        overrides.append(f"--train.run_name={args.run_name}")
    if args.config is not None and args.preset is None:
        return load_config(file=args.config, overrides=overrides), args
    return load_config(preset=preset, file=args.config, overrides=overrides), args


def ensure_shards(cfg: CaratConfig, shard_dir: Path) -> None:
    """Synthesize the corpus the config describes when shard_dir has none (and that is allowed)."""
    if (shard_dir / "manifest.parquet").is_file():
        return
    if not cfg.train.synth_if_missing:
        raise CaratError(f"no manifest.parquet in {shard_dir}: run `python -m carat.data synth|prepare "
                         f"--out {shard_dir}` or set --train.synth_if_missing=true")
    from carat.data.synth import synthesize_corpus

    print(f"[carat] no shards in {shard_dir}: synthesizing a corpus (scale {cfg.synth.scale})", flush=True)
    synthesize_corpus(shard_dir, cfg.synth, cfg.storage)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = resolve_config(argv)
        if args.show_config:
            print(describe_config(cfg), end="")
            return 0
        shard_dir = Path(cfg.train.shard_dir).resolve()
        run_dir = (Path(cfg.train.storage_path) / (cfg.train.run_name or new_run_name())).resolve()
        launcher = cfg.train.launcher
        ensure_once(cfg, shard_dir, launcher)
        if launcher == "ray":
            from carat.train.launch import launch_ray

            launch_ray(cfg, run_dir, shard_dir)
        else:
            from carat.train.launch import launch_in_process
            from carat.train import dist

            results = launch_in_process(cfg, run_dir, shard_dir, launcher)
            if dist.rank() != 0:
                return 0
            run_dir = Path(results["run_dir"])  # rank 0's name, broadcast to every rank
        print_summary(run_dir)
        return 0
    except CaratError as err:
        print(f"carat.train: error: {err}", file=sys.stderr)
        return 1


def ensure_once(cfg: CaratConfig, shard_dir: Path, launcher: str) -> None:
    """Under the deepspeed launcher only local rank 0 may synthesize; the others wait for its manifest.
    A single process, or a Ray driver (no LOCAL_RANK), synthesizes itself."""
    import os
    import time

    if launcher == "none" or os.environ.get("LOCAL_RANK", "0") == "0":
        ensure_shards(cfg, shard_dir)
        return
    deadline = time.monotonic() + 3600
    while not (shard_dir / "manifest.parquet").is_file():
        if time.monotonic() > deadline:
            raise CaratError(f"timed out waiting for rank 0 to write {shard_dir / 'manifest.parquet'}")
        time.sleep(1.0)


def print_summary(run_dir: Path) -> None:
    table = run_dir / "results.txt"
    if table.is_file():
        print(table.read_text())
    floor = reference_floor(run_dir / "card.json")
    if floor:
        print(floor)
    results = _read_json(run_dir / "results.json")
    judged = results.get("verdict") or verdict(results, _read_json(run_dir / "card.json"))
    if judged:
        print(format_verdict(judged))
    for message in results.get("warnings", []):  # repeated here: under Ray they scroll by in worker logs
        print(f"[carat] warning: {message}")
    print(f"[carat] run directory: {run_dir}")


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def reference_floor(card_path: Path) -> str | None:
    """The dataset card's baselines on the test split: the floor every training run should beat."""
    import json

    if not card_path.is_file():
        return None
    reference = json.loads(card_path.read_text()).get("reference_scorer") or {}
    fused = (reference.get("fused") or {}).get("tuned_on_valid")
    everything = reference.get("all_positive_baseline")
    if not fused or not everything:
        return None
    return (f"[carat] test-split floors from the dataset card: logistic regression on pooled features "
            f"micro-F1 {fused['micro_f1']:.4f} / macro-F1 {fused['macro_f1']:.4f}; predicting every emotion "
            f"micro-F1 {everything['micro_f1']:.4f} / macro-F1 {everything['macro_f1']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
