"""Issue 10, part 3: a non-finite loss is caught at its step (skipped, counted), too many in a row stop the
run with the step, the loss terms and the samples named; a loss spike is warned about.

Issue 26, items 1 and 6: divergence is a failure. A loss that explodes (against the initial loss scale, so an
explosion from the first steps counts), weights or optimizer state that turn non-finite, or validation scores
that no longer depend on the input end the run with one line saying what happened, where, and what to change,
a non-zero exit, and no verdict."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from carat.train import __main__ as train_main
from carat.train import divergence, loop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tests.data_fixtures import tiny_loop_corpus

    return tiny_loop_corpus(tmp_path_factory.mktemp("corpus") / "shards")


@pytest.fixture(scope="module")
def reference_shards(tmp_path_factory) -> Path:
    """24/12/12 clips with the pooled floor in the card: the corpus on which a diverged run used to end with
    `verdict: ... beats the floor` and exit 0 (issue 26)."""
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("reference") / "shards"
    synthesize_corpus(out, SynthConfig(train_size=24, valid_size=12, test_size=12, length_scale=0.02, seed=1),
                      StorageConfig(dtype="float32", shard_max_samples=8), reference=True)
    return out


def _preset_args(shards: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """The tiny preset as the issue ran it (16 clips per step: two steps per epoch on 24 training clips)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return ["--preset", "tiny", "--launcher", "none", f"--train.shard_dir={shards}",
            f"--train.storage_path={storage}", f"--train.run_name={name}", "--train.synth_if_missing=false",
            "--loader.num_workers=0", *extra]


def _error_line(err: str) -> str:
    """The one line carat.train prints for a failed run."""
    lines = [line for line in err.splitlines() if line.startswith("carat.train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _args(shards: Path, storage: Path, name: str, *extra: str) -> list[str]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return ["--preset", "tiny", f"--train.shard_dir={shards}", f"--train.storage_path={storage}",
            f"--train.run_name={name}", "--train.epochs=1", "--train.synth_if_missing=false",
            # 8 clips per step (not the preset's 16): the step numbers below need a dozen steps per epoch.
            "--loader.num_workers=0", "--loader.max_batch_size=8", "--launcher", "none", *extra]


def _change_training_terms(monkeypatch, steps: set[int], change) -> None:
    """Replace the loss terms by ``change(terms)`` on the given (0-based) forward calls in training mode."""
    original = loop.TrainModule.forward
    calls = {"n": 0}

    def forward(self, inputs, labels=None, sample_weight=None):
        out, terms = original(self, inputs, labels=labels, sample_weight=sample_weight)
        if terms is not None and self.training:
            if calls["n"] in steps:
                terms = change(terms)
            calls["n"] += 1
        return out, terms

    monkeypatch.setattr(loop.TrainModule, "forward", forward)


def _poison_loss(monkeypatch, steps: set[int], term: str = "supcon", value: float = float("nan")) -> None:
    """Make loss term ``term`` non-finite on the given (0-based) forward calls in training mode."""
    _change_training_terms(monkeypatch, steps,
                           lambda terms: {**terms, term: terms[term] * value, "total": terms["total"] * value})


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is non-finite everywhere."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison_gradient(monkeypatch, steps: set[int]) -> None:
    """Give the real DeepSpeed engine NaN gradients (the loss stays finite) on the given training forwards."""
    _change_training_terms(monkeypatch, steps, lambda terms: {**terms, "total": _NanGradient.apply(terms["total"])})


def test_a_nan_gradient_step_is_skipped_by_the_real_engine_and_the_weights_stay_finite(shards, tmp_path,
                                                                                          monkeypatch, capsys):
    """Not a fake engine: DeepSpeed's ZeRO-2 optimizer itself meets the NaN gradients; the loop must see the
    step as skipped, count it, and the model that comes out must be finite and score every clip."""
    _poison_gradient(monkeypatch, {2, 5})
    assert train_main.main(_args(shards, tmp_path, "nangrad")) == 0
    out = capsys.readouterr().out
    assert "step 3 (epoch 1) skipped: non-finite gradient norm" in out
    assert "step 6 (epoch 1) skipped: non-finite gradient norm" in out
    run = tmp_path / "nangrad"
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert history[0]["train/nonfinite_steps"] == 2
    results = json.loads((run / "results.json").read_text())
    assert results["nonfinite_steps"] == 2
    import math

    assert all(math.isfinite(results["test"][k]) for k in ("micro_f1", "macro_f1", "macro_auc"))
    from carat import export

    model = tmp_path / "model.pt"
    assert export.main(["--checkpoint", str(run), "--out", str(model)]) == 0
    weights = torch.load(model, weights_only=True)["state_dict"]
    assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_nan_gradients_in_a_row_stop_the_real_engine_run(shards, tmp_path, monkeypatch, capsys):
    _poison_gradient(monkeypatch, set(range(1, 100)))
    code = train_main.main(_args(shards, tmp_path, "nangrad-stop", "--train.max_nonfinite_steps=2"))
    err = capsys.readouterr().err
    assert code == 1
    assert "training diverged: step 4 (epoch 1): 3 steps in a row with a non-finite gradient norm" in err
    assert "terms finite" in err and "samples " in err


def test_a_single_nan_step_is_skipped_and_counted(shards, tmp_path, monkeypatch, capsys):
    _poison_loss(monkeypatch, {2})
    assert train_main.main(_args(shards, tmp_path, "once")) == 0
    out = capsys.readouterr().out
    assert "step 3 (epoch 1) skipped: non-finite loss" in out and "non-finite supcon, total" in out
    history = [json.loads(x) for x in (tmp_path / "once" / "history.jsonl").read_text().splitlines()]
    assert history[0]["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for k, v in history[0].items() if k.startswith("train/"))
    results = json.loads((tmp_path / "once" / "results.json").read_text())
    assert results["nonfinite_steps"] == 1
    assert any("skipped for a non-finite" in w for w in results["warnings"])


def test_too_many_nan_steps_in_a_row_stop_the_run_naming_step_terms_and_samples(shards, tmp_path, monkeypatch,
                                                                                capsys):
    _poison_loss(monkeypatch, set(range(1, 100)), term="final_clf", value=float("inf"))
    code = train_main.main(_args(shards, tmp_path, "diverged", "--train.max_nonfinite_steps=2"))
    err = capsys.readouterr().err
    assert code == 1
    assert "training diverged: step 4 (epoch 1): 3 steps in a row with a non-finite loss" in err
    assert "train.max_nonfinite_steps=2" in err and "non-finite final_clf, total" in err
    assert "samples " in err and "optim.lr" in err
    assert not (tmp_path / "diverged" / "results.json").exists()


def test_a_loss_many_times_its_median_is_warned_about(shards, tmp_path, monkeypatch, capsys):
    _poison_loss(monkeypatch, {10}, term="final_clf", value=1000.0)
    assert train_main.main(_args(shards, tmp_path, "spike", "--train.max_steps_per_epoch=12")) == 0
    out = capsys.readouterr().out
    assert "step 11 (epoch 1): loss" in out and "train.loss_explosion_factor=20" in out


def test_divergence_keys_are_typed_and_checked():
    from carat.config import load_config
    from carat.errors import ConfigError

    assert load_config(overrides=["--train.max_nonfinite_steps=0"]).train.max_nonfinite_steps == 0
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        load_config(overrides=["--train.max_nonfinite_steps=-1"])
    with pytest.raises(ConfigError, match="loss_explosion_factor"):
        load_config(overrides=["--train.loss_explosion_factor=0.5"])


# ------------------------------------------------------------------------------- issue 26: divergence fails
def test_a_run_whose_loss_explodes_exits_non_zero_with_no_verdict(reference_shards, tmp_path, capsys):
    """lr=10: the loss went 4 -> 3.6e16 in the second epoch; the run used to finish with rc 0 and `verdict: ...
    beats the floor`. Both of the epoch's steps are far above the initial loss scale: the epoch stops there."""
    code = train_main.main(_preset_args(reference_shards, tmp_path, "lr10", "--train.epochs=2", "--optim.lr=10"))
    out, err = capsys.readouterr()
    assert code == 1
    line = _error_line(err)
    assert re.search(r"training diverged: epoch 2 \(steps 3-4\): median step loss \S+ is \S+x the initial loss "
                     r"\S+ \(step 1\)", line), line
    assert "train.loss_explosion_factor=20" in line and "lower --optim.lr (now 10)" in line
    assert "new --run-name" in line  # a resume keeps the optimizer settings: a lower lr is a new run
    assert "verdict" not in out and "beats the floor" not in out
    run = tmp_path / "lr10"
    assert not (run / "results.json").exists()
    # the diverged epoch is neither in the history nor checkpointed: the last checkpoint is epoch 1's
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0]
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch-*")) == ["epoch-001"]


def test_a_run_whose_scores_turn_non_finite_says_it_diverged(reference_shards, tmp_path, capsys):
    """lr=1e6: the loss stays finite for the epoch's two steps and so do the weights, but they are so large
    that the forward pass overflows; the run used to stop at validation with `scores contain 72 NaN/inf
    values`, a data error that said nothing of training."""
    code = train_main.main(_preset_args(reference_shards, tmp_path, "lr1e6", "--train.epochs=2", "--optim.lr=1e6"))
    out, err = capsys.readouterr()
    assert code == 1
    line = _error_line(err)
    assert re.search(r"training diverged: epoch 1 \(step 2\): \d+ of the \d+ validation scores are NaN/inf "
                     r"\(the largest weight is \S+ in magnitude\)", line), line
    assert "lower --optim.lr (now 1e+06)" in line
    assert "NaN/inf values (first" not in err and "verdict" not in out
    assert not (tmp_path / "lr1e6" / "results.json").exists()
    assert not list((tmp_path / "lr1e6" / "checkpoints").glob("epoch-*"))  # no checkpoint of non-finite weights


def test_a_loss_exploding_from_the_first_steps_stops_the_run(shards, tmp_path, monkeypatch, capsys):
    """The median of the recent steps cannot see an explosion that starts before it has ten steps (or that
    lasts long enough to become the median): the reference is the loss of the untrained model."""
    _poison_loss(monkeypatch, {1, 2, 3, 4}, term="final_clf", value=1000.0)
    code = train_main.main(_args(shards, tmp_path, "early", "--train.max_steps_per_epoch=12"))
    out, err = capsys.readouterr()
    assert code == 1
    line = _error_line(err)
    assert re.search(r"training diverged: step 4 \(epoch 1\): loss \S+ is \S+x the initial loss \S+ \(step 1\), "
                     r"3 steps in a row above train.loss_explosion_factor=20 times it", line), line
    assert "samples " in line and "lower --optim.lr" in line
    assert not (tmp_path / "early" / "results.json").exists()


def test_validation_scores_that_no_longer_depend_on_the_input_stop_the_run(shards, tmp_path, monkeypatch, capsys):
    """A model that gives every clip the same scores (saturated or dead units: what lr=10 left after its
    explosion, macro-AUC exactly 0.5) has stopped learning from its input: the run fails rather than pick it."""
    from carat.model import CARAT

    original = CARAT.scores

    def constant(self, out):
        scores = original(self, out)
        return scores if self.training else torch.full_like(scores, 1.0 / 3.0)

    monkeypatch.setattr(CARAT, "scores", constant)
    code = train_main.main(_args(shards, tmp_path, "constant", "--train.max_steps_per_epoch=2"))
    out, err = capsys.readouterr()
    assert code == 1
    line = _error_line(err)
    assert re.search(r"training diverged: epoch 1 \(step 2\): all \d+ validation clips get the same scores", line), line
    assert "do not depend on the input" in line and "lower --optim.lr" in line
    assert not (tmp_path / "constant" / "results.json").exists()


def test_the_initial_loss_scale_is_checkpointed(shards, tmp_path):
    """A resumed run compares with the loss of the untrained model, not with the first loss after the resume."""
    from carat.export import read_client_state

    assert train_main.main(_args(shards, tmp_path, "scale", "--train.max_steps_per_epoch=3")) == 0
    state = read_client_state(tmp_path / "scale" / "checkpoints", "epoch-001")
    assert state["initial_loss"] > 0
    first = json.loads((tmp_path / "scale" / "metrics.jsonl").read_text().splitlines()[0])
    assert state["initial_loss"] < 10 * first["loss/total"]


def test_non_finite_weights_after_an_epoch_stop_the_run_naming_the_tensor(shards, tmp_path, monkeypatch, capsys):
    """A weight turned NaN by the epoch's last update (its own step's loss was finite): caught before the
    epoch is validated or checkpointed, naming the tensor."""
    original = loop.Trainer.train_step
    calls = {"n": 0}

    def train_step(self, batch, diagnose=False):
        result = original(self, batch, diagnose=diagnose)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.model.classifiers.text_weight.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    code = train_main.main(_args(shards, tmp_path, "nanweight", "--train.max_steps_per_epoch=2"))
    out, err = capsys.readouterr()
    assert code == 1
    line = _error_line(err)
    assert ("training diverged: epoch 1 (step 2): non-finite values in weight classifiers.text_weight after the "
            "epoch's updates") in line, line
    assert not list((tmp_path / "nanweight" / "checkpoints").glob("epoch-*"))
    assert not (tmp_path / "nanweight" / "best").exists()


def test_named_state_tensors_reach_the_optimizer_moments_under_a_wrapper():
    """DeepSpeed's ZeRO optimizers wrap a torch optimizer (``.optimizer``) holding the fp32 master weights and
    the moments; a NaN there is found and named."""
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    adam.step()

    class Wrapper:  # the shape of DeepSpeedZeroOptimizer: not a torch Optimizer, holds one
        optimizer = adam

    named = divergence.named_state_tensors(model, Wrapper())
    names = [name for name, _ in named]
    assert "weight weight" in names and "optimizer state 'exp_avg_sq' of parameter 0 of group 0" in names
    assert divergence.first_nonfinite_tensor(named) is None
    adam.state[adam.param_groups[0]["params"][1]]["exp_avg"][0] = float("inf")
    assert divergence.first_nonfinite_tensor(named) == "optimizer state 'exp_avg' of parameter 1 of group 0"


def test_a_resume_keeps_the_initial_loss_scale_or_takes_the_first_epochs_mean():
    """A checkpoint from before the initial loss was saved: the first epoch's mean loss stands in, never the
    first loss after the resume (the trained loss, far lower)."""
    from carat.train.state import RunState

    state = RunState.fresh("micro_f1")
    state.history = [{"train/total": 4.2}]
    state.restore_initial_loss({"initial_loss": 3.9, "initial_loss_step": 2})
    assert (state.initial_loss, state.initial_loss_step) == (3.9, 2)
    state = RunState.fresh("micro_f1")
    state.history = [{"train/total": 4.2}]
    state.restore_initial_loss({"epoch": 1})
    assert (state.initial_loss, state.initial_loss_step) == (4.2, 1)


def test_a_ray_run_that_diverges_is_not_restarted_into_the_same_divergence(reference_shards, tmp_path):
    """carat's errors are decisions, not crashes: Ray's FailureConfig restart used to resume the diverged run
    from its last checkpoint and train into the same divergence again (issue 26)."""
    import subprocess
    import sys

    from tests.test_train_e2e import cpu_env

    env = cpu_env()
    args = _preset_args(reference_shards, tmp_path, "ray", "--train.epochs=2", "--optim.lr=1e6")
    args[args.index("none")] = "ray"
    proc = subprocess.run([sys.executable, "-m", "carat.train", *args, "--train.num_workers=2",
                           "--train.max_failures=1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "training diverged: epoch 2" in _error_line(proc.stderr)
    run = tmp_path / "ray"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps and len(steps) == len(set(steps)), steps  # epoch 2 was trained once, not again after a restart
    assert not (run / "results.json").exists() and not list(run.glob(".final-error-*"))
