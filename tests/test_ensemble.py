"""Seed ensembles (train.ensemble_size): members really trained with their own seeds, scored by their mean,
resumable, and readable by evaluate / predict; export refuses them with a pointer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carat.data.corpus.shards import StorageConfig
from carat.data.sources.synth import SynthConfig, synthesize_corpus
from carat.errors import CaratError, ConfigError
from tests.faults import fault_env
from tests.model_helpers import make_batch, perturb_parameters, tiny_model
from tests.ports import free_port

LENGTHS = {"text": [7, 20, 3], "visual": [30, 11, 5], "audio": [90, 40, 17]}


def test_ensemble_scores_are_the_mean_of_its_members():
    from carat.ensemble import EnsembleModel

    members = [tiny_model(seed=s) for s in (1, 2)]
    for m in members:
        perturb_parameters(m)
    ensemble = EnsembleModel(members).eval()
    batch = make_batch(LENGTHS)
    with torch.no_grad():
        expected = torch.stack([m.eval().scores(m(**batch)) for m in members]).mean(dim=0)
        torch.testing.assert_close(ensemble.scores(ensemble(**batch)), expected)
    assert not torch.allclose(expected, members[0].scores(members[0](**batch)))


def test_members_differ_in_their_batch_plans_as_well_as_their_initialisation(tmp_path):
    """A lone run's seed spread comes from its initialisation and its batch order: the members vary both."""
    from carat.config import load_config
    from carat.data.loader.plan import plan_epoch
    from carat.ensemble import member_config

    cfg = load_config("tiny", overrides=["--train.ensemble_size=3", "--train.seed=4", "--loader.seed=7"])
    members = [member_config(cfg, tmp_path / "ens", i) for i in range(3)]
    assert [(m.train.seed, m.loader.seed) for m in members] == [(4, 7), (5, 8), (6, 9)]
    lengths = np.random.default_rng(0).integers(5, 400, size=(200, 3))
    plans = [plan_epoch(lengths, token_budget=2000, max_batch_size=16, seed=m.loader.seed, sort_jitter=0.05)
             for m in members]
    orders = [[tuple(plan.batches[b]) for step in plan.schedule for b in step] for plan in plans]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


def test_ensemble_size_must_be_positive():
    from carat.config import TrainConfig

    with pytest.raises(ConfigError, match="ensemble_size"):
        TrainConfig(ensemble_size=0)


@pytest.mark.parametrize("text,match", [("{", "unreadable"), ('{"members": []}', "non-empty"),
                                        ('{"members": ["../x"]}', "plain directory names")])
def test_a_bad_manifest_is_named(tmp_path, text, match):
    from carat.ensemble import MANIFEST, read_manifest

    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(CaratError, match=match):
        read_manifest(tmp_path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "shards"
    synthesize_corpus(out, SynthConfig(scale=0.005, length_scale=0.05, seed=3),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    return out


def _scores(path: Path) -> np.ndarray:
    rows = json.loads(path.read_text())["predictions"]
    return np.array([[r[k] for k in r if k.startswith("score_")] for r in rows])


@pytest.mark.slow
def test_two_member_run_trains_both_seeds_scores_their_mean_and_resumes(shards, tmp_path, capsys):
    from carat import evaluate, export, predict
    from carat.train.__main__ import main

    storage = tmp_path / "runs"
    args = ["--preset", "tiny", "--launcher", "none", f"--train.shard_dir={shards}",
            f"--train.storage_path={storage}", "--train.run_name=ens", "--train.epochs=1", "--train.seed=5",
            "--train.ensemble_size=2", "--train.synth_if_missing=false", "--loader.num_workers=0"]
    assert main(args) == 0
    run = storage / "ens"
    members = [run / "members" / f"member-{i}" for i in range(2)]
    for i, member in enumerate(members):
        assert (member / "results.json").is_file() and (member / "best").is_dir()
        assert f"seed = {5 + i}" in (member / "config.toml").read_text()
    results = json.loads((run / "results.json").read_text())
    assert results["ensemble_size"] == 2 and [m["name"] for m in results["members"]] == ["member-0", "member-1"]
    assert {"test_tuned", "test_tuned_micro", "tuned_thresholds"} <= set(results)
    assert (run / "results.txt").read_text().startswith("ensemble of 2 members")
    out = capsys.readouterr().out
    assert "ensemble member 1/2 (seed 5)" in out and "ensemble member 2/2 (seed 6)" in out

    # predict on the ensemble directory = the mean of the members' own predictions
    preds = {}
    for name, path in (("ens", run), *((m.name, m) for m in members)):
        preds[name] = tmp_path / f"{name}.json"
        assert predict.main(["--checkpoint", str(path), "--shards", str(shards), "--split", "test",
                             "--out", str(preds[name])]) == 0
    member_scores = [_scores(preds[m.name]) for m in members]
    assert not np.allclose(*member_scores)  # two seeds, two different models
    np.testing.assert_allclose(_scores(preds["ens"]), np.mean(member_scores, axis=0), rtol=1e-5, atol=1e-6)

    # evaluate reproduces the run's own ensemble figures
    assert evaluate.main(["--checkpoint", str(run), "--split", "test", "--out", str(tmp_path / "m.json")]) == 0
    evaluated = next(v for k, v in json.loads((tmp_path / "m.json").read_text()).items() if k.startswith("test @"))
    assert evaluated["micro_f1"] == pytest.approx(results["test"]["micro_f1"], abs=1e-9)

    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "x.pt")]) == 1
    assert "ensemble run" in capsys.readouterr().err

    # rerunning the same name keeps the finished members and rescores the same ensemble
    assert main(args) == 0
    assert capsys.readouterr().out.count("already finished: kept") == 2
    again = json.loads((run / "results.json").read_text())
    assert again["test"]["micro_f1"] == results["test"]["micro_f1"]

    # a finished member under a changed config is refused, not silently reused...
    assert main(args + ["--optim.lr=0.5"]) == 1
    assert "member-0" in capsys.readouterr().err
    # ...and so is training one model into an ensemble's directory
    assert main([a for a in args if "ensemble_size" not in a]) == 1
    assert "ensemble of 2" in capsys.readouterr().err


@pytest.mark.slow
def test_deepspeed_launcher_trains_every_member_on_two_ranks(shards, tmp_path):
    import shutil
    import sys

    from tests.test_train_e2e import cpu_env, ranks_in_checkpoint, run_module

    storage = tmp_path / "runs"
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    proc = run_module(
        [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "carat.train", "--launcher",
         "deepspeed", "--preset", "tiny", f"--train.shard_dir={shards}", f"--train.storage_path={storage}",
         "--train.run_name=dsens", "--train.epochs=1", "--train.ensemble_size=2", "--train.synth_if_missing=false",
         "--loader.num_workers=0"], cpu_env(LOCAL_SIZE="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = storage / "dsens"
    for member in ("member-0", "member-1"):
        results = json.loads((run / "members" / member / "results.json").read_text())
        assert results["world_size"] == 2
        assert ranks_in_checkpoint(run / "members" / member / "best") == {0, 1}  # each rank wrote its own shard
    assert json.loads((run / "results.json").read_text())["ensemble_size"] == 2
    assert proc.stdout.count("ensemble of 2 members") == 1  # rank 0 alone scores and prints the ensemble


@pytest.mark.slow
def test_a_member_killed_mid_run_resumes_on_the_rerun(shards, tmp_path):
    import sys

    from tests.test_train_e2e import cpu_env, run_module

    storage = tmp_path / "runs"
    cmd = [sys.executable, "-m", "carat.train", "--launcher", "none", "--preset", "tiny",
           f"--train.shard_dir={shards}", f"--train.storage_path={storage}", "--train.run_name=crash",
           "--train.epochs=2", "--train.ensemble_size=2", "--train.synth_if_missing=false",
           "--loader.num_workers=0"]
    members = storage / "crash" / "members"
    crashed = run_module(cmd, fault_env("1:0", cpu_env()))  # member 0 dies after its first epoch
    assert crashed.returncode != 0
    assert (members / "member-0" / ".fault-injected-1-0").is_file()
    assert not (members / "member-0" / "results.json").exists() and not (members / "member-1").exists()
    assert not (storage / "crash" / "results.json").exists()
    resumed = run_module(cmd, cpu_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout  # member 0 continued from its epoch-1 checkpoint
    assert all((members / m / "results.json").is_file() for m in ("member-0", "member-1"))
    assert json.loads((storage / "crash" / "results.json").read_text())["ensemble_size"] == 2


# -- issue 26: a member's best is its best or an error; results change only when asked ------------------------
def _ensemble_args(shards: Path, storage: Path) -> list[str]:
    return ["--preset", "tiny", "--launcher", "none", f"--train.shard_dir={shards}",
            f"--train.storage_path={storage}", "--train.run_name=ens", "--train.epochs=1", "--train.seed=5",
            "--train.ensemble_size=2", "--train.synth_if_missing=false", "--loader.num_workers=0"]


@pytest.fixture(scope="module")
def finished_ensemble(shards, tmp_path_factory) -> Path:
    """A finished two-member ensemble; tests damage copies of it."""
    import os

    from carat.train.__main__ import main

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    storage = tmp_path_factory.mktemp("ensemble")
    assert main(_ensemble_args(shards, storage)) == 0
    return storage / "ens"


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run, tmp_path / "runs" / "ens")
    return tmp_path / "runs" / "ens"


def _error_line(err: str) -> str:
    """The one line of stderr that says the error (DeepSpeed's progress bars for the members loaded before it
    aside); the assertions on it check the whole message is on it."""
    (line,) = [line for line in err.splitlines() if "error:" in line or "Traceback" in line]
    return line


def _score_commands(run: Path, shards: Path, tmp_path: Path):
    from carat import evaluate, predict

    return (lambda: evaluate.main(["--checkpoint", str(run), "--split", "test"]),
            lambda: predict.main(["--checkpoint", str(run), "--shards", str(shards), "--out",
                                  str(tmp_path / "p.json")]))


@pytest.mark.slow
def test_a_member_without_best_is_an_error_never_its_last_epoch(finished_ensemble, shards, tmp_path, capsys):
    import shutil

    from carat.train.__main__ import main

    run = _copy(finished_ensemble, tmp_path)
    shutil.rmtree(run / "members" / "member-1" / "best")
    saved = (run / "results.json").read_bytes()
    for command in _score_commands(run, shards, tmp_path):
        assert command() == 1
        line = _error_line(capsys.readouterr().err)
        assert "ensemble member member-1 has no best model" in line and line.endswith("retrains that member)")
    assert main(_ensemble_args(shards, tmp_path / "runs")) == 1  # "already finished: kept", then no rescoring
    assert "member-1 has no best model" in capsys.readouterr().err
    assert (run / "results.json").read_bytes() == saved


@pytest.mark.slow
def test_a_member_with_a_damaged_best_is_named(finished_ensemble, shards, tmp_path, capsys):
    from tests.test_checkpoint_integrity import OPTIM_FILE, _flip

    run = _copy(finished_ensemble, tmp_path)
    damaged = run / "members" / "member-0" / "best" / "best" / OPTIM_FILE
    _flip(damaged, damaged.stat().st_size // 3, count=16)
    for command in _score_commands(run, shards, tmp_path):
        assert command() == 1
        line = _error_line(capsys.readouterr().err)
        assert "ensemble member member-0" in line and f"{OPTIM_FILE} does not match its sha256" in line
        assert "--tag" not in line and line.endswith("retrains that member)")


@pytest.mark.slow
def test_a_rerun_rewrites_the_ensemble_results_only_when_they_are_the_same_or_deleted(finished_ensemble, shards,
                                                                                       tmp_path, capsys):
    import shutil

    from carat.train.__main__ import main

    run = _copy(finished_ensemble, tmp_path)
    saved = (run / "results.json").read_bytes()
    assert main(_ensemble_args(shards, tmp_path / "runs")) == 0  # the same members: the same figures, kept
    assert "ensemble results unchanged" in capsys.readouterr().out
    assert (run / "results.json").read_bytes() == saved
    # member 0's best replaced by member 1's (a complete, verified checkpoint): other figures
    shutil.rmtree(run / "members" / "member-0" / "best")
    shutil.copytree(run / "members" / "member-1" / "best", run / "members" / "member-0" / "best")
    assert main(_ensemble_args(shards, tmp_path / "runs")) == 1
    line = _error_line(capsys.readouterr().err)
    assert f"other figures than {run / 'results.json'}" in line and line.endswith("to accept the new figures")
    assert (run / "results.json").read_bytes() == saved
    (run / "results.json").unlink()  # the user accepts the new figures
    assert main(_ensemble_args(shards, tmp_path / "runs")) == 0
    assert json.loads((run / "results.json").read_text())["test"] != json.loads(saved)["test"]
