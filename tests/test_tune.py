"""``python -m carat.tune``: the search space and resources (fast), and a real two-trial sweep on CPU (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from carat.config import config_to_toml, load_config
from carat.data.sources.segment import EMOTIONS
from carat.errors import ConfigError
from carat.tune.space import apply_params, ctc_choices, grid_points, param_space, search_ranges
from carat.tune.sweep import plan_resources, sweep_name, trial_base

REPO = Path(__file__).resolve().parents[1]


# -- fast: configuration, search space, resources ------------------------------------------------------------
def test_tune_section_defaults_and_overrides():
    cfg = load_config("tiny", overrides=["--tune.metric=macro_f1", "--tune.search=random",
                                         "--tune.ctc_target_lengths=none,4,8", "--tune.lr_range=1e-4,1e-2"])
    assert cfg.tune.metric == "macro_f1" and cfg.tune.search == "random"
    assert cfg.tune.ctc_target_lengths == (None, 4, 8)
    assert load_config("tiny").tune.search == "optuna" and load_config("tiny").tune.scheduler == "asha"


def test_tune_section_round_trips_through_toml_with_adaptive_length(tmp_path):
    cfg = load_config("tiny", overrides=["--tune.ctc_target_lengths=none,8"])
    path = tmp_path / "sweep.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(file=path).tune == cfg.tune


@pytest.mark.parametrize("override, message", [
    ("--tune.temperature_range=0.3,0.03", "temperature_range"),
    ("--tune.pos_weight_spread=1", "pos_weight_spread"),
    ("--tune.threshold_range=0.1,1.5", "threshold_range"),
    ("--tune.driver_cpus=0", "driver_cpus"),
    ("--tune.search=grid", "pos_weight_mode"),
    ("--tune.metric=accuracy", "tune.metric"),
])
def test_bad_tune_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=[override])


def test_default_space_searches_six_weights_temperature_and_ctc_length():
    cfg = load_config("tiny")
    ranges = search_ranges(cfg)
    for name, seed_weight in zip(EMOTIONS, cfg.loss.pos_weight):
        kind, (low, high) = ranges[f"loss.pos_weight.{name}"]
        assert kind == "log" and low == pytest.approx(seed_weight / 2) and high == pytest.approx(seed_weight * 2)
    assert ranges["loss.temperature"] == ("log", (0.03, 0.3))
    kind, choices = ranges["model.ctc_target_length"]
    assert kind == "choice" and None in choices and cfg.model.ctc_target_length in choices
    assert "optim.lr" not in ranges and "model.threshold" not in ranges
    space = param_space(cfg)
    assert set(space) == set(ranges)


def test_shared_scale_grid_and_optional_ranges():
    cfg = load_config("tiny", overrides=["--tune.pos_weight_mode=shared", "--tune.search=grid",
                                         "--tune.lr_range=1e-4,1e-2", "--tune.threshold_range=0.1,0.5"])
    ranges = search_ranges(cfg)
    assert ranges["loss.pos_weight_scale"] == ("log", (0.5, 2.0))
    assert not any(k.startswith("loss.pos_weight.") for k in ranges)
    assert grid_points(*ranges["optim.lr"]) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert grid_points(*ranges["model.threshold"]) == pytest.approx([0.1, 0.3, 0.5])
    assert all(isinstance(v, dict) and "grid_search" in v for v in param_space(cfg).values())


def test_ctc_choices_must_fit_the_position_tables():
    with pytest.raises(ConfigError, match="position tables"):
        ctc_choices(load_config("tiny", overrides=["--tune.ctc_target_lengths=none,1000"]))


def test_apply_params_sets_weights_scale_and_adaptive_length():
    cfg = load_config("tiny")
    params = {f"loss.pos_weight.{name}": float(i + 1) for i, name in enumerate(EMOTIONS)}
    params.update({"loss.temperature": 0.05, "model.ctc_target_length": None})
    trial = apply_params(cfg, params)
    assert trial.loss.pos_weight == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert trial.loss.temperature == 0.05 and trial.model.ctc_target_length is None
    scaled = apply_params(cfg, {"loss.pos_weight_scale": 2.0})
    assert scaled.loss.pos_weight == pytest.approx(tuple(2 * w for w in cfg.loss.pos_weight))
    with pytest.raises(ConfigError, match="names no config key"):
        apply_params(cfg, {"model.no_such_key": 1})


def test_resources_follow_the_cluster():
    cfg = load_config("tiny", overrides=["--tune.workers_per_trial=2", "--loader.num_workers=3"])
    gpu = plan_resources(cfg, {"CPU": 64.0, "GPU": 8.0})
    assert gpu.gpu and gpu.workers == 2 and gpu.cpus_per_worker == 4.0 and gpu.max_concurrent == 4
    cpu = plan_resources(cfg, {"CPU": 16.0})
    assert not cpu.gpu and cpu.max_concurrent == 1  # 2 workers x 4 CPUs + the driver's share: one trial of 16 CPUs
    tiny = plan_resources(load_config("tiny", overrides=["--loader.num_workers=0", "--tune.num_samples=3"]),
                          {"CPU": 32.0})
    assert tiny.max_concurrent == 3  # capped by num_samples
    with pytest.raises(Exception, match="GPUs"):
        plan_resources(load_config("tiny", overrides=["--tune.workers_per_trial=4", "--train.use_gpu=true"]),
                       {"CPU": 8.0, "GPU": 2.0})


def test_asha_stops_a_trailing_trial_at_the_grace_rung_and_searchers_are_selectable():
    from carat.tune.sweep import make_scheduler, make_search

    cfg = load_config("tiny", overrides=["--train.epochs=4"])
    asha = make_scheduler(cfg)
    assert type(asha).__name__ == "EpochASHA" and asha._max_t == 3
    assert asha._stop_last_trials is False  # the last epoch's report must not cut the final evaluation
    # No rung on a trial's last epoch (a stop there saves nothing and loses the test scores), also where
    # grace * factor**k is the epoch count; with no epoch before the last to stop at, FIFO.
    for epochs, grace, factor in ((4, 1, 2), (30, 10, 3), (9, 3, 3), (2, 1, 2)):
        overrides = [f"--train.epochs={epochs}", f"--tune.grace_period={grace}", f"--tune.reduction_factor={factor}"]
        rungs = [rung[0] for rung in make_scheduler(load_config("tiny", overrides=overrides))._brackets[0]._rungs]
        assert rungs and max(rungs) < epochs, (epochs, grace, factor, rungs)
    assert type(make_scheduler(load_config("tiny", overrides=["--train.epochs=1"]))).__name__ == "FIFOScheduler"
    asha.set_search_properties("valid/micro_f1", "max")

    class Trial:  # what the scheduler reads of a trial
        def __init__(self, trial_id: str) -> None:
            self.trial_id, self.config = trial_id, {}

    leader, trailing = Trial("a"), Trial("b")
    for trial in (leader, trailing):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, leader, {"training_iteration": 1, "valid/micro_f1": 0.8}) == "CONTINUE"
    assert asha.on_trial_result(None, trailing, {"training_iteration": 1, "valid/micro_f1": 0.2}) == "STOP"
    assert type(make_scheduler(load_config("tiny", overrides=["--tune.scheduler=fifo"]))).__name__ == "FIFOScheduler"
    optuna = make_search(cfg, 3)
    assert type(optuna).__name__ == "ConcurrencyLimiter" and type(optuna.searcher).__name__ == "OptunaSearch"
    assert type(make_search(load_config("tiny", overrides=["--tune.search=random"]), 3)).__name__ == \
        "BasicVariantGenerator"


def test_asha_counts_the_loops_epochs_so_a_restored_trial_meets_its_rungs_and_finishes():
    """Tune restarts a restored trial's iteration count at 1 while its loop resumes at a later epoch (issue 26):
    ASHA judges the epoch, and never stops a trial's last epoch (the final evaluation writes its test scores)."""
    import pickle

    from carat.tune.sweep import make_scheduler

    overrides = ["--train.epochs=4", "--tune.grace_period=1", "--tune.reduction_factor=2"]
    asha = pickle.loads(pickle.dumps(make_scheduler(load_config("tiny", overrides=overrides))))  # as tuner.pkl
    asha.set_search_properties("valid/micro_f1", "max")

    class Trial:
        def __init__(self, trial_id: str) -> None:
            self.trial_id, self.config = trial_id, {}

    leader, restored, last = Trial("a"), Trial("b"), Trial("c")
    for trial in (leader, restored, last):
        asha.on_trial_add(None, trial)
    for epoch in range(3):  # epochs 1..3 of the leader: rungs 1 and 2 recorded at 0.8
        assert asha.on_trial_result(None, leader, {"training_iteration": epoch + 1, "epoch": epoch,
                                                   "valid/micro_f1": 0.8}) == "CONTINUE"
    # resumed after epoch 1: its first report after the restore is epoch 2 (iteration 1), judged at rung 2
    assert asha.on_trial_result(None, restored, {"training_iteration": 1, "epoch": 1, "valid/micro_f1": 0.1}) \
        == "STOP"
    assert restored.trial_id in dict(asha._brackets[0]._rungs)[2]
    # a trailing trial's last epoch (epoch 3 of 0..3) is never stopped: its test scores come after it
    assert asha.on_trial_result(None, last, {"training_iteration": 1, "epoch": 3, "valid/micro_f1": 0.0}) \
        == "CONTINUE"


def test_a_restored_sweeps_asha_refills_its_rungs_from_the_trials_histories(tmp_path):
    """Tune restores no scheduler state: the rungs come back from each trial's history.jsonl when it is added."""
    from carat.tune.sweep import make_scheduler

    runs = tmp_path / "runs"
    for trial_id, values in (("a", [0.8, 0.8, 0.8]), ("b", [0.1])):
        (runs / f"trial-{trial_id}").mkdir(parents=True)
        (runs / f"trial-{trial_id}" / "history.jsonl").write_text("".join(
            json.dumps({"epoch": e, "valid/micro_f1": v}) + "\n" for e, v in enumerate(values)))
    overrides = ["--train.epochs=4", "--tune.grace_period=1", "--tune.reduction_factor=2"]
    asha = make_scheduler(load_config("tiny", overrides=overrides), runs)
    asha.set_search_properties("valid/micro_f1", "max")

    class Trial:
        def __init__(self, trial_id: str) -> None:
            self.trial_id, self.config = trial_id, {}

    leader, resumed = Trial("a"), Trial("b")
    for trial in (leader, resumed):
        asha.on_trial_add(None, trial)
    rungs = dict(asha._brackets[0]._rungs)
    assert rungs[1] == {"a": 0.8, "b": 0.1} and rungs[2] == {"a": 0.8}  # as before the kill
    # b resumes after its first epoch: epoch 2 is judged at rung 2 against a's recorded 0.8
    assert asha.on_trial_result(None, resumed, {"training_iteration": 1, "epoch": 1, "valid/micro_f1": 0.2}) == "STOP"


def test_the_trials_table_reads_the_epochs_a_restored_trial_reported_before_the_kill(tmp_path):
    """progress.csv of a restored trial starts at the restore; its run's history.jsonl has every epoch."""
    import types

    import pandas as pd

    from carat.tune.report import best_row, trial_rows

    run = tmp_path / "runs" / "trial-x"
    run.mkdir(parents=True)
    truth = [0.447, 0.30, 0.364, 0.36]
    (run / "history.jsonl").write_text("".join(
        json.dumps({"epoch": e, "valid/micro_f1": v, "valid/macro_f1": v / 2}) + "\n" for e, v in enumerate(truth)))
    (run / "results.json").write_text(json.dumps({"best_epoch": 1, "test": {"macro_auc": 0.7}}))
    restored = types.SimpleNamespace(
        metrics={"trial_id": "x", "epoch": 3, "valid/micro_f1": 0.36, "valid/macro_f1": 0.18}, error=None,
        path=str(tmp_path / "tune-x"), config={"optim.lr": 0.01},
        metrics_dataframe=pd.DataFrame({"epoch": [2.0, 3.0], "training_iteration": [1, 2],
                                        "valid/micro_f1": [0.364, 0.36]}))
    rival = types.SimpleNamespace(
        metrics={"trial_id": "y", "epoch": 3}, error=None, path=str(tmp_path / "tune-y"), config={"optim.lr": 0.1},
        metrics_dataframe=pd.DataFrame({"epoch": [0.0, 1.0, 2.0, 3.0], "valid/micro_f1": [0.3, 0.4, 0.41, 0.2]}))
    rows = trial_rows([restored, rival], "valid/micro_f1", 4, tmp_path / "runs")
    row = rows[0]
    assert row["curve"] == truth and row["epochs"] == 4 and row["status"] == "completed"
    assert row["best_metric"] == 0.447 and row["best_epoch"] == 1
    assert row["final/valid/macro_f1"] == 0.18 and row["test/macro_auc"] == 0.7
    assert best_row(rows)["trial_id"] == "x"  # the restored trial wins on what it really scored


def test_learning_curves_are_keyed_by_epoch_across_a_restored_trial():
    import pandas as pd

    from carat.tune.report import epoch_curve

    # a trial restored after epoch 2 reports epoch 1 again (Tune's iteration counter restarted)
    frame = pd.DataFrame({"epoch": [0.0, 1.0, 1.0, 2.0], "valid/micro_f1": [0.1, 0.2, 0.25, 0.3]})
    assert epoch_curve(frame, "valid/micro_f1") == [0.1, 0.25, 0.3]
    assert epoch_curve(None, "valid/micro_f1") == []


def test_trial_base_never_synthesizes_and_selects_on_the_tuned_metric(tmp_path):
    cfg = load_config("tiny", overrides=["--tune.metric=macro_f1"])
    base = trial_base(cfg, tmp_path, plan_resources(cfg, {"CPU": 4.0}))
    assert base.train.synth_if_missing is False and base.train.select_metric == "macro_f1"
    assert base.train.launcher == "ray" and base.train.shard_dir == str(tmp_path) and base.train.use_gpu is False


def test_trials_train_one_model_and_the_best_config_keeps_the_users_ensemble(tmp_path):
    from carat.tune.report import best_config

    cfg = load_config("small")
    assert cfg.train.ensemble_size == 3
    base = trial_base(cfg, tmp_path, plan_resources(cfg, {"CPU": 4.0}))
    assert base.train.ensemble_size == 1
    best = best_config(cfg, base, {"loss.temperature": 0.2})
    assert best.train.ensemble_size == 3 and best.loss.temperature == pytest.approx(0.2)


def test_sweep_name_is_deterministic_never_a_timestamp():
    a, b = load_config("tiny"), load_config("tiny")
    assert sweep_name(a) == sweep_name(b)
    assert sweep_name(load_config("tiny", overrides=["--tune.metric=macro_f1"])) != sweep_name(a)
    assert sweep_name(load_config("tiny", overrides=["--tune.sweep_name=mine"])) == "mine"


def test_help_and_show_config_document_the_tune_section():
    from carat.tune.__main__ import main

    out = subprocess.run([sys.executable, "-m", "carat.tune", "--show-config"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[tune]" in out.stdout and "pos_weight_mode" in out.stdout
    assert main(["--tune.metric=nope"]) == 1


# -- slow: a real sweep on the local Ray ------------------------------------------------------------------
# A sweep's driver runs in its own process, as `python -m carat.tune` does: a Ray driver inside pytest's process
# keeps Ray's core-worker threads until the interpreter exits, and CI's pytest once died there (exit 139) after
# every test had passed. Logical CPUs beyond the 2 cores of a small CI machine, so both trials (1 worker + a
# driver share) run at once.
SWEEP_DRIVER = """
import sys
import ray
ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
from carat.tune.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _sweep_env() -> dict[str, str]:
    from tests.test_train_e2e import cpu_env

    return cpu_env(RAY_USAGE_STATS_ENABLED="0")


def run_sweep(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SWEEP_DRIVER, *args], cwd=REPO, env=_sweep_env(),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two one-epoch trials, one worker each, side by side on a tiny corpus synthesized once beforehand."""
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    root = tmp_path_factory.mktemp("sweep")
    shards = root / "shards"
    synthesize_corpus(shards, SynthConfig(scale=0.005, length_scale=0.05, seed=1),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    args = ["--preset", "tiny", f"--train.shard_dir={shards}", f"--train.storage_path={root / 'runs'}",
            "--train.epochs=1", "--train.synth_if_missing=false", "--loader.num_workers=0",
            "--tune.num_samples=2", "--tune.sweep_name=s", "--train.log_every=1000"]
    proc = run_sweep(args)
    return {"proc": proc, "rc": proc.returncode, "root": root, "dir": root / "runs" / "s", "args": args}


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_sweep_runs_both_trials_in_their_own_run_dirs(sweep):
    assert sweep["rc"] == 0, sweep["proc"].stderr[-3000:]
    rows = _rows(sweep["dir"])
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2
    assert len({r["run_dir"] for r in rows}) == 2
    for row in rows:
        assert row["status"] == "completed" and row["epochs"] == "1"
        assert 0.0 <= float(row["best_metric"]) <= 1.0
        run = Path(row["run_dir"])
        assert run.name == f"trial-{row['trial_id']}"
        assert json.loads((run / "environment.json").read_text())["world_size"] == 1
        # Every trial that trained all its epochs reached the loop's final test: no rung on the last epoch.
        results = json.loads((run / "results.json").read_text())
        assert results["launcher"] == "ray" and results["world_size"] == 1
        assert float(row["test/macro_auc"]) == pytest.approx(results["test"]["macro_auc"])
        assert float(row["test/tuned_micro_f1"]) == pytest.approx(results["test_tuned_micro"]["micro_f1"])
        history = (run / "history.jsonl").read_text().splitlines()
        assert len(history) == 1  # one epoch, reported to Tune once
        assert (sweep["dir"] / f"tune-{row['trial_id']}" / "progress.csv").is_file()
    import pyarrow.parquet as pq

    table = pq.read_table(sweep["dir"] / "trials.parquet")
    assert table.num_rows == 2 and "param/loss.temperature" in table.column_names


@pytest.mark.slow
def test_sweep_writes_plots_and_a_best_config_carat_train_accepts(sweep):
    for name in ("metric_vs_hyperparameters.png", "learning_curves.png"):
        assert (sweep["dir"] / "plots" / name).stat().st_size > 1000
    rows = _rows(sweep["dir"])
    best = max(rows, key=lambda r: float(r["best_metric"]))
    cfg = load_config(file=sweep["dir"] / "best.toml")
    assert cfg.preset == "tiny" and cfg.train.run_name is None and cfg.train.num_workers == 1
    assert cfg.loss.temperature == pytest.approx(float(best["param/loss.temperature"]))
    assert cfg.loss.pos_weight[EMOTIONS.index("fear")] == pytest.approx(float(best["param/loss.pos_weight.fear"]))
    ctc = best["param/model.ctc_target_length"]
    assert cfg.model.ctc_target_length == (None if ctc == "none" else int(ctc))
    assert cfg.train.select_metric == "micro_f1"
    from carat.train.__main__ import build_parser

    build_parser().parse_known_args(["--config", str(sweep["dir"] / "best.toml")])


@pytest.mark.slow
def test_rerunning_the_sweep_restores_it(sweep):
    rerun = run_sweep(sweep["args"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming the sweep" in rerun.stdout
    assert len(_rows(sweep["dir"])) == 2


def test_ray_launch_follows_the_clusters_gpus_and_cpus(monkeypatch):
    from carat.train import launch

    cfg = load_config("tiny")
    monkeypatch.setattr(launch, "_cluster_gpus", lambda: 8.0)  # a GPU cluster seen from a CPU-only head
    assert launch.ray_use_gpu(cfg) and launch.ray_worker_count(cfg, True) == 8
    off = load_config("tiny", overrides=["--train.use_gpu=false"])
    assert not launch.ray_use_gpu(off) and launch.ray_worker_count(off, False) == 2
    monkeypatch.setattr(launch, "_cluster_nodes", lambda: 3)  # CPU nodes: one rank each (they spread)
    assert launch.ray_worker_count(off, False) == 3
    assert launch.ray_worker_count(load_config("tiny", overrides=["--train.num_workers=3"]), True) == 3
    monkeypatch.setattr(launch, "_cluster_gpus", lambda: 0.0)
    assert not launch.ray_use_gpu(cfg)
    loaders = load_config("tiny", overrides=["--loader.num_workers=4"])
    assert launch.cpus_per_worker(loaders, 2, 16.0) == 5.0  # the rank and its 4 loader processes
    assert launch.cpus_per_worker(loaders, 2, 4.0) == 2.0   # never more than the cluster holds
    assert launch.cpus_per_worker(cfg, 2, None) == 1.0


@pytest.mark.slow
def test_best_toml_trains_unchanged_and_reproduces_the_trials_metric(sweep):
    rows = _rows(sweep["dir"])
    best = max(rows, key=lambda r: float(r["best_metric"]))
    best_toml = sweep["dir"] / "best.toml"
    proc = subprocess.run([sys.executable, "-m", "carat.train", "--config", str(best_toml)], cwd=sweep["root"],
                          env=_sweep_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a local Ray, launcher ray, 1 worker
    runs = [p for p in (sweep["root"] / "runs").iterdir() if p.name != "s"]
    (run,) = runs
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 1 and results["select_metric"] == "micro_f1"
    # same seed, data plan and world size on CPU: the trial's validation metric, up to noise
    assert results["best_value"] == pytest.approx(float(best["best_metric"]), abs=0.05)


def test_a_sweep_on_an_empty_mount_fails_naming_the_shard_dir(tmp_path, capsys):
    from carat.tune.__main__ import main

    empty = tmp_path / "mnt" / "shards"
    assert main(["--preset", "tiny", f"--train.shard_dir={empty}", "--train.synth_if_missing=false",
                 f"--train.storage_path={tmp_path / 'runs'}"]) == 1
    assert str(empty) in capsys.readouterr().err
    assert not empty.exists() and not (tmp_path / "runs").exists()  # nothing synthesized, no Ray started
