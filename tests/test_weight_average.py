"""train.ema_decay: a moving average of the weights is what validation, best/, export and the final scores
use; it is checkpointed, so a resumed run ends as an uninterrupted one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from carat.config import load_config
from carat.errors import ConfigError
from carat.train.averaging import WARMUP_STEPS, WeightAverage


def test_the_average_follows_the_ema_recursion_and_swaps_back_exactly():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    average = WeightAverage(model, decay=0.9)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model)
        keep = min(0.9, (1 + t) / (WARMUP_STEPS + t))
        for n, p in model.named_parameters():
            expected[n] = keep * expected[n] + (1 - keep) * p.detach()
    for n in expected:
        torch.testing.assert_close(average.shadow[n], expected[n])
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with average.applied(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, average.shadow[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n])  # bit for bit the trained weights again
    copy = WeightAverage(model, decay=0.9)
    copy.load_state_dict(average.state_dict(), "test")
    assert copy.updates == average.updates and all(torch.equal(copy.shadow[n], average.shadow[n]) for n in raw)
    with pytest.raises(ValueError, match="does not match the model"):
        WeightAverage(nn.Linear(4, 2, bias=False), 0.9).load_state_dict(average.state_dict(), "other")


def test_ema_decay_is_checked():
    assert load_config(overrides=["--train.ema_decay=0.99"]).train.ema_decay == 0.99
    with pytest.raises(ConfigError, match="ema_decay=1.0 must be in"):
        load_config(overrides=["--train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="needs zero_stage <= 2"):
        load_config(overrides=["--train.ema_decay=0.9", "--train.zero_stage=3"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tests.data_fixtures import tiny_loop_corpus

    return tiny_loop_corpus(tmp_path_factory.mktemp("corpus") / "shards")


def _args(shards: Path, storage: Path, name: str, epochs: int, *extra: str) -> list[str]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return ["--preset", "tiny", f"--train.shard_dir={shards}", f"--train.storage_path={storage}",
            f"--train.run_name={name}", f"--train.epochs={epochs}", "--train.synth_if_missing=false",
            "--loader.num_workers=0", "--train.ema_decay=0.9", "--train.keep_checkpoints=3",
            "--launcher", "none", *extra]


@pytest.mark.slow
def test_best_export_and_final_scores_are_the_averaged_weights_and_resume_is_exact(shards, tmp_path):
    import subprocess
    import sys

    from carat import evaluate, export
    from carat.export import consolidate
    from tests.faults import fault_env

    # subprocesses with one thread each: the uninterrupted run and the killed one must reduce in the same order
    storage = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def train(name: str, fault: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "carat.train", *_args(shards, storage, name, 3)],
                              env=fault_env(fault, env) if fault else env, capture_output=True, text=True)

    first = train("ema")
    assert first.returncode == 0, first.stderr[-2000:]
    run = storage / "ema"
    results = json.loads((run / "results.json").read_text())

    # best/ holds the raw weights (DeepSpeed's) and the average (carat's client state); export takes the average
    weights, state = consolidate(run / "best", "best")
    shadow = state["weight_average"]["shadow"]
    assert state["weight_average"]["updates"] > 0
    assert all(torch.equal(weights[name], shadow[name].float()) for name in shadow)
    raw = torch.load(run / "best" / "best" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert any(not torch.equal(raw["model." + name].float(), shadow[name]) for name in shadow)

    # the exported model scores the test split exactly as the run's final evaluation did
    model = tmp_path / "model.pt"
    assert export.main(["--checkpoint", str(run), "--out", str(model)]) == 0
    out = tmp_path / "test.json"
    assert evaluate.main(["--checkpoint", str(model), "--split", "test", "--shards", str(shards),
                          "--out", str(out)]) == 0
    scored = next(iter(json.loads(out.read_text()).values()))
    assert scored["micro_f1"] == pytest.approx(results["test"]["micro_f1"], abs=1e-9)
    assert scored["macro_auc"] == pytest.approx(results["test"]["macro_auc"], abs=1e-9)

    # a run killed after epoch 1 and rerun: the average, and so every validation score and the final one,
    # continue exactly
    assert train("killed", fault="1:0").returncode == 17
    done = train("killed")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    resumed = json.loads((storage / "killed" / "results.json").read_text())
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (storage / "killed" / "history.jsonl").read_text().splitlines()]
    assert len(again) == len(history) == 3
    for a, b in zip(history, again):
        assert a["valid/macro_auc"] == b["valid/macro_auc"] and a["train/total"] == b["train/total"]
    assert resumed["test"] == results["test"]
