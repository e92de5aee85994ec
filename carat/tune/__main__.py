"""``python -m carat.tune``: a Ray Tune sweep of carat training runs (Train-in-Tune, ASHA, Optuna TPE).

    python -m carat.tune                                     # tiny preset, 16 trials, on the local Ray
    python -m carat.tune --config configs/seed.toml --train.shard_dir=/data/mosei_shards \\
        --tune.metric=macro_f1 --tune.num_samples=64 --tune.workers_per_trial=2 --tune.time_budget_s=86400
    RAY_ADDRESS=auto python -m carat.tune --config run.toml --tune.sweep_name=mosei-sweep-1

The search space lives in the [tune] section (`--show-config` documents every key). The sweep directory
(<tune.storage_path or train.storage_path>/<sweep name>) receives trials.csv / trials.parquet, plots/ and
best.toml (train it with `python -m carat.train --config best.toml`). Rerunning the same command resumes an
interrupted sweep; a finished one is only summarised again.
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
from carat.storage import is_url, resolved


ALIASES: tuple[Alias, ...] = (
    Alias("--sweep-name", "tune.sweep_name", "sweep directory name; reusing a name resumes that sweep"),
)
"""Documented shorthand of a [tune] key (carat.cli)."""


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser("python -m carat.tune", __doc__,
                           "synth storage prepare loader model loss optim train tune",
                           "TOML file with [section] tables, [tune] included")
    add_aliases(parser, ALIASES, tree_defaults(CaratConfig()))
    return parser


def resolve_config(argv: list[str] | None) -> tuple[CaratConfig, argparse.Namespace]:
    args, overrides = build_parser().parse_known_args(argv)
    return cli_config(args, alias_overrides(args, ALIASES) + overrides), args


def sweep_storage(cfg: CaratConfig) -> Path:
    """Where the sweep's directory goes: a local or shared filesystem. Trials write their run directories there
    as they train (Ray Tune's own ``s3://`` storage would hold Tune's files, not carat's runs)."""
    where = cfg.tune.storage_path or cfg.train.storage_path
    if is_url(where):
        raise ConfigError(f"sweeps keep their directory on a local or shared filesystem, not in {where}: set "
                          "--tune.storage_path to a directory every node sees (the corpus, train.shard_dir, may be "
                          "in a bucket)")
    return Path(where).resolve()


def run_sweep(cfg: CaratConfig) -> Path:
    """Make the shards once, run (or resume) the sweep, write its table, plots and best.toml."""
    import ray

    from carat.data.corpus.provision import ensure_shards
    from carat.train.launch import ensure_ray
    from carat.tune.report import best_config, best_row, plot_sweep, trial_rows, write_best, write_table
    from carat.tune.sweep import build_tuner, metric_key, plan_resources, sweep_name, trial_base

    shard_dir = resolved(cfg.train.shard_dir)  # a directory, or a corpus in a bucket (s3://...)
    storage = sweep_storage(cfg)
    # Once, here, before any trial starts: trials only read the corpus (they run with synth_if_missing=false).
    ensure_shards(cfg, shard_dir)
    sweep_dir = storage / sweep_name(cfg)
    ensure_ray()
    resources = plan_resources(cfg, ray.cluster_resources())
    base = trial_base(cfg, shard_dir, resources)
    print(f"[carat] sweep {sweep_dir}: {cfg.tune.num_samples} trials, {cfg.tune.search} search, "
          f"{cfg.tune.scheduler} scheduler on {metric_key(cfg)}; {resources.workers} worker(s) per trial "
          f"({'GPU' if resources.gpu else 'CPU'}, {resources.cpus_per_worker:g} CPUs each), up to "
          f"{resources.max_concurrent} at once", flush=True)
    grid = build_tuner(cfg, base, sweep_dir, resources).fit()
    results = [grid[i] for i in range(len(grid))]
    rows = trial_rows(results, metric_key(cfg), cfg.train.epochs, sweep_dir / "runs")
    write_table(rows, sweep_dir)
    plot_sweep(rows, cfg, cfg.tune.metric, sweep_dir / "plots")
    best = best_row(rows)
    for row in rows:
        print(f"[carat] trial {row['trial_id']}: {row['status']} after {row['epochs']} epoch(s), best "
              f"{cfg.tune.metric} {row['best_metric'] if row['best_metric'] is not None else 'n/a'}", flush=True)
    if best is None:
        raise CaratError(f"no trial of the sweep in {sweep_dir} reported {metric_key(cfg)}; see the trial logs there")
    path = write_best(best, best_config(cfg, base, best["params"]), cfg.tune.metric, sweep_dir)
    errors = [row["trial_id"] for row in rows if row["status"] == "error"]
    if errors:
        print(f"[carat] warning: {len(errors)} trial(s) failed: {', '.join(errors)}", flush=True)
    print(f"[carat] best trial {best['trial_id']}: {cfg.tune.metric} {best['best_metric']:.4f}; "
          f"table {sweep_dir / 'trials.csv'}; train it: python -m carat.train --config {path}", flush=True)
    return sweep_dir


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = resolve_config(argv)
        if args.show_config:
            print(describe_config(cfg), end="")
            return 0
        run_sweep(cfg)
        return 0
    except CaratError as err:
        print(f"carat.tune: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
