"""Issue 10, part 3: a non-finite loss is caught at its step (skipped, counted), too many in a row stop the
run with the step, the loss terms and the samples named; a loss explosion is warned about."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from carat.train import __main__ as train_main
from carat.train import loop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tests.data_fixtures import tiny_loop_corpus

    return tiny_loop_corpus(tmp_path_factory.mktemp("corpus") / "shards")


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
