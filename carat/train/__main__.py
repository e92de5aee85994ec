"""``python -m carat.train``: train CARAT; with no arguments, the quickstart on a synthesized tiny corpus.

    python -m carat.train                                   # tiny preset, Ray + 2 DeepSpeed workers
    python -m carat.train --config run.toml --train.epochs=15 --model.hidden_size=512
    deepspeed --num_gpus 8 --module carat.train --launcher deepspeed --config run.toml
    python -m carat.train --launcher none                   # one process
    ray job submit --working-dir . -- python -m carat.train --config run.toml
"""

from __future__ import annotations

from carat.threads import set_default_wait_policy

# First: libgomp reads the variable once, when the first module below loads torch.
set_default_wait_policy()

import argparse  # noqa: E402  (the imports follow the wait policy on purpose)
import sys
from pathlib import Path

from carat.cli import Alias, add_aliases, alias_overrides, cli_config, config_parser, tree_defaults
from carat.config import CaratConfig, describe_config
from carat.errors import CaratError, ConfigError
from carat.report import summary_lines
from carat.storage import resolved
from carat.train.rundir import new_run_name
from carat.train.runsync import POLL_S, staged_storage, synced_run
from carat.data.corpus.provision import SYNTH_IN_PROGRESS, check_corpus_fits_model, ensure_shards, verify_once


ALIASES: tuple[Alias, ...] = (
    Alias("--launcher", "train.launcher"),
    Alias("--run-name", "train.run_name", "run directory name under train.storage_path; reusing a name resumes "
                                          "that run"),
)
"""Documented shorthands of [train] keys (carat.cli)."""


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser("python -m carat.train", __doc__, "synth storage prepare loader model loss optim train",
                           "TOML file with [section] tables (see configs/)")
    add_aliases(parser, ALIASES, tree_defaults(CaratConfig()))
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def resolve_config(argv: list[str] | None) -> tuple[CaratConfig, argparse.Namespace]:
    args, overrides = build_parser().parse_known_args(argv)
    return cli_config(args, alias_overrides(args, ALIASES) + overrides), args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = resolve_config(argv)
        if args.show_config:
            print(describe_config(cfg), end="")
            return 0
        shard_dir = resolved(cfg.train.shard_dir)  # a local path, or an object-store URL (carat.storage)
        # An s3:// storage_path is staged locally and mirrored to the bucket (carat.train.runsync).
        run_dir = resolve_run_dir(staged_storage(cfg.train.storage_path), cfg.train.run_name or new_run_name())
        launcher = cfg.train.launcher
        ensure_once(cfg, shard_dir, launcher)
        verify_once(cfg, shard_dir)
        check_corpus_fits_model(cfg, shard_dir)
        # Under Ray the workers mirror the run while it trains; the driver sends what is left at the end.
        mirror_every = None if launcher == "ray" else POLL_S
        with run_dir_lock(run_dir), synced_run(run_dir, cfg.train.storage_path, poll_s=mirror_every):
            if cfg.train.ensemble_size > 1:
                if not train_ensemble_members(cfg, run_dir, shard_dir):
                    return 0
            else:
                refuse_ensemble_dir(run_dir)
                precheck_resume(cfg, run_dir, shard_dir)
                run_dir = launch(cfg, run_dir, shard_dir)
                if run_dir is None:
                    return 0
        print_summary(run_dir)
        return 0
    except CaratError as err:
        print(f"carat.train: error: {err}", file=sys.stderr)
        return 1
    finally:
        if "torch.distributed" in sys.modules:  # a command that trained (not --help or a config error)
            from carat.train.launch import leave_process_group

            leave_process_group()


def launch(cfg: CaratConfig, run_dir: Path, shard_dir: Path) -> Path | None:
    """Train one run through train.launcher; its run directory on rank 0 (or the Ray driver), None elsewhere."""
    if cfg.train.launcher == "ray":
        from carat.train.launch import launch_ray

        launch_ray(cfg, run_dir, shard_dir)
        return run_dir
    from carat.train.launch import launch_in_process
    from carat.train import dist

    results = launch_in_process(cfg, run_dir, shard_dir, cfg.train.launcher)
    return Path(results["run_dir"]) if dist.rank() == 0 else None  # rank 0's name, broadcast to every rank


def refuse_ensemble_dir(run_dir: Path) -> None:
    """One model must not be trained into an ensemble's run directory (its results would replace the
    ensemble's while the members stay)."""
    from carat.ensemble import is_ensemble, read_manifest

    if is_ensemble(run_dir):
        size = len(read_manifest(run_dir)["members"])
        raise ConfigError(f"{run_dir} holds an ensemble of {size} members: rerun it with "
                          f"--train.ensemble_size={size} (or more, to add members), or choose another run name")


def train_ensemble_members(cfg: CaratConfig, run_dir: Path, shard_dir: Path) -> bool:
    """train.ensemble_size > 1: every member through :func:`launch`, then (rank 0) the ensemble's scores."""
    from carat.ensemble import evaluate_ensemble, train_ensemble

    trained = train_ensemble(cfg, run_dir, lambda member, member_dir: launch(member, member_dir, shard_dir),
                             lambda member, member_dir: precheck_resume(member, member_dir, shard_dir))
    if trained is None:
        return False
    # nothing trained now: the ensemble's results.json stays unless rescoring gives the same figures
    evaluate_ensemble(cfg, run_dir, shard_dir, rescore=not trained)
    return True


def precheck_resume(cfg: CaratConfig, run_dir: Path, shard_dir: Path) -> None:
    """Refuse a resume the workers would refuse, here, before Ray or DeepSpeed start: a worker's error
    reaches the user through Ray's retries and wrappers, this one as one line."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    from carat.config import config_to_dict
    from carat.train.checkpoint import read_client_state
    from carat.train.checkpoint import (
        CheckpointError, corpus_fingerprint, damaged_ray_checkpoint, earlier_ray_checkpoint, newest_checkpoint,
        resume_refusal,
    )

    damaged = damaged_ray_checkpoint(run_dir) if cfg.train.launcher == "ray" else None
    if damaged:
        earlier = earlier_ray_checkpoint(run_dir)
        if earlier is None:
            raise CheckpointError(f"{damaged}, and no earlier Ray checkpoint of {run_dir} is intact: restore that "
                                  f"folder from a copy, or move {run_dir} away to start this run over")
        print(f"[carat] warning: {damaged}; the workers resume from the earlier {earlier}", file=sys.stderr,
              flush=True)
    point = newest_checkpoint(run_dir)
    if point is None:
        return
    where = point.root / point.tag
    # the world this launch will have, where it is known before any worker exists
    world = {"none": 1, "deepspeed": int(os.environ.get("WORLD_SIZE", "1"))}.get(cfg.train.launcher,
                                                                               cfg.train.num_workers or None)
    refusal = resume_refusal(read_client_state(point.root, point.tag), config_to_dict(cfg),
                             corpus_fingerprint(shard_dir), world, where, shard_dir, run_dir / "config.toml")
    if refusal:
        raise CheckpointError(refusal)


RUN_LOCK = ".carat-run.lock"


def resolve_run_dir(storage_path: Path, name: str) -> Path:
    """storage_path/name as an absolute path, refused when the name leads outside storage_path."""
    storage = storage_path.resolve()
    run_dir = (storage / name).resolve()
    if run_dir.parent != storage:
        raise ConfigError(f"train.run_name={name!r} leads outside train.storage_path {storage}: use a plain name")
    return run_dir


def run_dir_lock(run_dir: Path):
    """The run directory's lock, held by the process that owns the run (rank 0, or the Ray driver): a second
    `carat.train` with the same run name gets an error instead of mixing its checkpoints into this run's."""
    import contextlib
    import os

    from carat.locks import FileLock

    if os.environ.get("RANK", "0") != "0":  # the other ranks of a deepspeed launch share rank 0's lock
        return contextlib.nullcontext()
    return FileLock(run_dir / RUN_LOCK, what=f"run directory {run_dir}")


def start_ray_early() -> None:
    """Start (or join) Ray before a synthesis: its daemons and idle workers finish starting on the other core
    while this one synthesizes (measured: part of the quickstart's 182 s -> 118 s)."""
    from carat.train.launch import ensure_ray

    ensure_ray()


def ensure_once(cfg: CaratConfig, shard_dir: Path, launcher: str) -> None:
    """Under the deepspeed launcher only local rank 0 may synthesize; the others wait for its manifest.
    A single process, or a Ray driver (no LOCAL_RANK), synthesizes itself."""
    import os
    import time

    if launcher == "none" or os.environ.get("LOCAL_RANK", "0") == "0":
        ensure_shards(cfg, shard_dir, start_ray_early if launcher == "ray" else None)
        return
    deadline = time.monotonic() + 3600
    while not (shard_dir / "manifest.parquet").is_file() or (shard_dir / SYNTH_IN_PROGRESS).exists():
        if time.monotonic() > deadline:
            raise CaratError(f"timed out waiting for rank 0 to write {shard_dir / 'manifest.parquet'}")
        time.sleep(1.0)


def print_summary(run_dir: Path) -> None:
    for line in summary_lines(run_dir):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
