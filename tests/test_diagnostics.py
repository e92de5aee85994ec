"""What a run tells a practitioner: step diagnostics, the selection metric, warnings and the verdict.

The run tests go through the real loop (``carat.train.main``, ``--launcher none``, the tiny preset) on a
48-clip synthetic corpus with a reference scorer in its card. The two-rank test checks that the gradient norms
are those of the full gradient under every ZeRO stage (DeepSpeed shards it from ZeRO-1 on).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from carat.data.sources.segment import EMOTIONS
from carat.data.corpus.shards import StorageConfig
from carat.data.sources.synth import SynthConfig, synthesize_corpus
from carat.metrics import constant_prediction, format_verdict, result_warnings, verdict
from carat.train.loop import model_diagnostics, module_gradient_norms
from carat.train.metrics_log import MeanMeter
from carat.train.state import fresh_best, improves, restore_best
from carat.train.rundir import read_jsonl

SELECT = "macro_auc"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "shards"
    synthesize_corpus(out, SynthConfig(train_size=24, valid_size=12, test_size=12, length_scale=0.02, seed=1),
                      StorageConfig(dtype="float32", shard_max_samples=8), reference=True)
    return out


def run_args(shards: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--launcher", "none", f"--train.shard_dir={shards}",
            f"--train.storage_path={storage}", f"--train.run_name={name}", "--train.synth_if_missing=false",
            "--loader.num_workers=0", *extra]


def top_level_modules(model: nn.Module) -> set[str]:
    return {name.split(".", 1)[0] for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def diagnosed_run(shards, tmp_path_factory) -> Path:
    from carat.train.__main__ import main

    storage = tmp_path_factory.mktemp("runs")
    assert main(run_args(shards, storage, "diag", "--train.epochs=3", "--train.log_every=2",
                         f"--train.select_metric={SELECT}")) == 0
    return storage / "diag"


# ------------------------------------------------------------------------------------------ through the loop
def test_step_logs_carry_finite_gradient_norms_and_model_diagnostics(diagnosed_run):
    from carat.config import load_config
    from carat.model import CARAT

    cfg = load_config(file=diagnosed_run / "config.toml")  # the run's own model, whatever the preset is now
    model = CARAT.from_config(cfg.model)
    steps = read_jsonl(diagnosed_run / "metrics.jsonl")
    assert steps
    expected = {f"grad/{m}" for m in top_level_modules(model)} | {"grad/total"}
    assert {"grad/text_encoder", "grad/audio_encoder", "grad/classifiers", "grad/agg"} <= expected
    for step in steps:
        assert expected <= set(step), expected - set(step)
        grads = {k: v for k, v in step.items() if k.startswith("grad/")}
        assert all(math.isfinite(v) and v >= 0 for v in grads.values()), grads
        assert step["grad/total"] > 0
        # grad/total is the norm over every module: the root of the summed squares
        parts = sum(v ** 2 for k, v in grads.items() if k != "grad/total")
        assert step["grad/total"] == pytest.approx(math.sqrt(parts), rel=1e-6)
        # the model's own numbers (CARAT.diagnostics): the LSTM aligners' slot entropy in [0, 1]
        if cfg.model.aligner == "lstm":
            assert 0.0 <= step["align/visual_entropy"] <= 1.0 and 0.0 <= step["align/audio_entropy"] <= 1.0
        assert all(math.isfinite(v) for k, v in step.items() if isinstance(v, float))
    history = read_jsonl(diagnosed_run / "history.jsonl")
    assert all(math.isfinite(h["grad/total"]) and h["grad/total"] > 0 for h in history)  # epoch means
    assert (diagnosed_run / "plots" / "diagnostics.png").is_file()
    assert "macro_auc" in (diagnosed_run / "results.txt").read_text()


def test_best_epoch_is_the_argmax_of_the_selection_metric(diagnosed_run):
    history = read_jsonl(diagnosed_run / "history.jsonl")
    results = json.loads((diagnosed_run / "results.json").read_text())
    values = [h[f"valid/{SELECT}"] for h in history]
    assert len(values) == 3
    assert results["select_metric"] == SELECT
    assert results["best_epoch"] == int(np.argmax(values)) + 1
    assert results["best_value"] == pytest.approx(max(values))
    for h in history:  # every selectable metric is logged every epoch
        assert {"valid/micro_f1", "valid/macro_f1", "valid/macro_auc", "valid/tuned_micro_f1",
                "valid/tuned_macro_f1"} <= set(h)
        assert h["valid/tuned_macro_f1"] >= h["valid/macro_f1"] - 1e-12  # tuned on valid: never worse per class


def test_results_carry_the_verdict_and_the_warnings(diagnosed_run):
    results = json.loads((diagnosed_run / "results.json").read_text())
    card = json.loads((diagnosed_run / "card.json").read_text())
    assert isinstance(results["warnings"], list)
    assert results["verdict"] == json.loads(json.dumps(verdict(results, card)))
    # A new card has the floor's micro-F1 at one shared threshold: the run is compared under the same rule.
    assert results["verdict"]["micro_rule"] == "shared"
    assert results["verdict"]["model"]["micro_f1"] == results["test_tuned_micro"]["micro_f1"]
    assert results["verdict"]["model"]["macro_f1"] == results["test_tuned"]["macro_f1"]
    assert results["test_tuned_micro"]["threshold"] == results["tuned_micro_threshold"]
    # The input-independent baseline: the train split's prevalence from the card, scored under the same rule.
    prior = results["prior_baseline"]
    assert prior["source"] == "train"
    assert prior["scores"] == [card["label_prevalence"]["train"][e] for e in EMOTIONS]
    assert results["verdict"]["prior"] == {"micro_f1": prior["test_tuned_micro"]["micro_f1"],
                                           "macro_f1": prior["test_tuned"]["macro_f1"]}
    assert results["scores_depend_on_input"] is True
    assert results["verdict"]["beats_baselines"] == (results["verdict"]["beats_floor"]
                                                     and results["verdict"]["beats_prior"])


def test_a_model_stuck_at_its_prior_is_warned_about(shards, tmp_path, capsys):
    """At lr 1e-12 the tiny model keeps its initial scores, about 0.5 for every emotion: every clip gets
    every emotion at threshold 0.2, so its test micro-F1 is exactly the predict-everything baseline."""
    from carat.train.__main__ import main

    assert main(run_args(shards, tmp_path, "stuck", "--train.epochs=1", "--optim.lr=1e-12")) == 0
    results = json.loads((tmp_path / "stuck" / "results.json").read_text())
    constant = [w for w in results["warnings"] if "the same labels" in w]
    assert constant and constant[0].startswith("epoch 1: all 12 validation clips")
    assert "every emotion (happy, sad, anger, surprise, disgust, fear)" in constant[0]
    assert any(w.startswith("test micro-F1") and "at threshold 0.2 is not above predicting every emotion" in w
               for w in results["warnings"])
    out = capsys.readouterr().out
    assert "[carat] warning: epoch 1: all 12 validation clips" in out
    assert "[carat] verdict: model test micro-F1" in out


# ----------------------------------------------------------------------------------------------- units
def test_constant_prediction():
    scores = np.full((5, 6), 0.5)
    assert constant_prediction(scores, 0.2) == EMOTIONS
    scores[:, 3] = 0.1
    assert constant_prediction(scores, 0.2) == ("happy", "sad", "anger", "disgust", "fear")
    assert constant_prediction(np.zeros((5, 6)), 0.2) == ()   # nothing predicted, for every clip
    scores[0, 0] = 0.0
    assert constant_prediction(scores, 0.2) is None
    assert constant_prediction(np.full((1, 6), 0.5), 0.2) is None  # one clip is trivially constant


def test_gradient_norms_group_by_top_level_module():
    torch.manual_seed(0)
    model = nn.ModuleDict({"encoder": nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), "head": nn.Linear(2, 1),
                           "frozen": nn.Linear(2, 2)})
    model["frozen"].requires_grad_(False)
    x = torch.randn(5, 4)
    model["head"](model["encoder"](x)).sum().backward()
    norms = module_gradient_norms(model)
    assert set(norms) == {"grad/encoder", "grad/head", "grad/total"}
    want = torch.cat([p.grad.flatten() for p in model["encoder"].parameters()]).norm()
    assert norms["grad/encoder"] == pytest.approx(float(want), rel=1e-6)
    every = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert norms["grad/total"] == pytest.approx(float(every), rel=1e-6)


def test_model_diagnostics_are_optional():
    assert model_diagnostics(nn.Linear(2, 2)) == {}

    class Probed(nn.Linear):
        def diagnostics(self) -> dict[str, float]:
            return {"align/visual_entropy": torch.tensor(0.5), "align/audio_entropy": None}

    assert model_diagnostics(Probed(2, 2)) == {"align/visual_entropy": 0.5}
    meter = MeanMeter()
    meter.add({"a": 1.0, "b": 2.0})
    meter.add({"a": 3.0})
    assert meter.means() == {"a": 2.0, "b": 2.0}


def test_best_record_and_resume_of_older_checkpoints():
    best = fresh_best("macro_auc")
    assert improves(None, best)                      # the first epoch is always kept, even undefined
    best = {"metric": "macro_auc", "value": 0.6, "epoch": 0}
    assert improves(0.61, best) and not improves(0.6, best) and not improves(None, best)
    history = [{"epoch": 0, "valid/micro_f1": 0.3, "valid/macro_auc": 0.55},
               {"epoch": 1, "valid/micro_f1": 0.4, "valid/macro_auc": 0.52}]
    old = {"micro_f1": 0.4, "epoch": 1}              # written before train.select_metric existed
    assert restore_best(old, "micro_f1", history) == {"metric": "micro_f1", "value": 0.4, "epoch": 1}
    # a resume that selects on another metric keeps the best weights' epoch, judged by the new metric
    assert restore_best(old, "macro_auc", history) == {"metric": "macro_auc", "value": 0.52, "epoch": 1}
    assert restore_best({"micro_f1": -1.0, "epoch": -1}, "macro_auc", []) == fresh_best("macro_auc")
    new = {"metric": "tuned_micro_f1", "value": 0.7, "epoch": 0}
    assert restore_best(new, "tuned_micro_f1", history) == new


def _card(oracle: bool = True) -> dict:
    reference = {
        "fused": {"tuned_on_valid": {"micro_f1": 0.39, "macro_f1": 0.26, "thresholds": [0.5] * 6}},
        "all_positive_baseline": {"micro_f1": 0.32, "macro_f1": 0.29},
    }
    if oracle:
        reference["oracle"] = {"tuned_on_valid": {"micro_f1": 0.70, "macro_f1": 0.62}}
    return {"reference_scorer": reference}


def test_verdict_on_a_hand_made_pair():
    results = {"test": {"micro_f1": 0.55, "macro_f1": 0.40, "threshold": 0.2},
               "test_tuned": {"micro_f1": 0.61, "macro_f1": 0.48, "threshold": [0.3] * 6}}
    v = verdict(results, _card())
    assert v["compared"] == "tuned_on_valid"
    assert v["model"] == {"micro_f1": 0.61, "macro_f1": 0.48}
    assert v["model_at_threshold"] == {"micro_f1": 0.55, "macro_f1": 0.40, "threshold": 0.2}
    assert v["floor"] == {"micro_f1": 0.39, "macro_f1": 0.26}
    assert v["margin"] == pytest.approx({"micro_f1": 0.22, "macro_f1": 0.22})
    assert v["all_positive"] == {"micro_f1": 0.32, "macro_f1": 0.29}
    assert v["oracle"] == {"micro_f1": 0.70, "macro_f1": 0.62}
    assert v["beats_floor"] is True
    line = format_verdict(v)
    assert line == ("[carat] verdict: model test micro-F1 0.610 / macro-F1 0.480 (thresholds tuned on valid; "
                    "0.550 / 0.400 at threshold 0.2), vs pooled floor 0.390 / 0.260 (+0.220 / +0.220), "
                    "predict-every-emotion 0.320 / 0.290, oracle 0.700 / 0.620: beats the floor")
    assert json.loads(json.dumps(v)) == v            # results.json carries it as is
    assert result_warnings(results, _card()) == []


def test_verdict_compares_micro_f1_at_one_shared_threshold_when_card_and_run_both_have_it():
    card = _card()
    card["reference_scorer"]["fused"]["tuned_micro_on_valid"] = {"micro_f1": 0.45, "macro_f1": 0.20, "threshold": 0.3}
    card["reference_scorer"]["oracle"]["tuned_micro_on_valid"] = {"micro_f1": 0.74, "macro_f1": 0.55}
    results = {"test": {"micro_f1": 0.55, "macro_f1": 0.40, "threshold": 0.2},
               "test_tuned": {"micro_f1": 0.61, "macro_f1": 0.48, "threshold": [0.3] * 6},
               "test_tuned_micro": {"micro_f1": 0.66, "macro_f1": 0.44, "threshold": 0.35}}
    v = verdict(results, card)
    assert v["micro_rule"] == "shared"
    # micro-F1 from the shared thresholds, macro-F1 from the per-emotion ones: for the model, floor and oracle
    assert v["model"] == {"micro_f1": 0.66, "macro_f1": 0.48}
    assert v["floor"] == {"micro_f1": 0.45, "macro_f1": 0.26}
    assert v["oracle"] == {"micro_f1": 0.74, "macro_f1": 0.62}
    assert v["margin"] == pytest.approx({"micro_f1": 0.21, "macro_f1": 0.22})
    assert "micro-F1 at one threshold, macro-F1 at per-emotion thresholds, tuned on valid" in format_verdict(v)
    # A run from before the shared threshold is compared with the card's per-emotion micro-F1 (like with like).
    old_run = {k: results[k] for k in ("test", "test_tuned")}
    v_old = verdict(old_run, card)
    assert v_old["micro_rule"] == "per_emotion"
    assert v_old["floor"] == {"micro_f1": 0.39, "macro_f1": 0.26} and v_old["model"]["micro_f1"] == 0.61
    # An older card without the shared threshold keeps the per-emotion rule for a new run too.
    assert verdict(results, _card())["floor"] == {"micro_f1": 0.39, "macro_f1": 0.26}
    assert verdict(results, _card())["model"] == {"micro_f1": 0.61, "macro_f1": 0.48}


def test_verdict_below_the_floor_without_oracle_or_tuned_thresholds():
    results = {"test": {"micro_f1": 0.32, "macro_f1": 0.29, "threshold": 0.2}}
    v = verdict(results, _card(oracle=False))
    assert v["compared"] == "threshold" and v["oracle"] is None
    assert v["model"] == {"micro_f1": 0.32, "macro_f1": 0.29}
    assert v["beats_floor"] is False and v["beats_floor_macro"] is True and v["beats_floor_micro"] is False
    line = format_verdict(v)
    assert "oracle" not in line and line.endswith("does not beat the floor (above it on macro-F1 only)")
    assert "(at threshold 0.2; the floor's thresholds are tuned on valid)" in line
    results["test"]["macro_f1"] = 0.2
    assert format_verdict(verdict(results, _card())).endswith(": does not beat the floor")
    warnings = result_warnings(results, _card())
    assert warnings == ["test micro-F1 0.3200 at threshold 0.2 is not above predicting every emotion (0.3200) "
                        "and below the pooled-feature floor 0.3900 (logistic regression on mean+std pooled "
                        "features, thresholds tuned on valid)"]
    assert verdict(results, {"counts": {}}) is None  # a prepared corpus' card has no floor
    assert result_warnings(results, {"counts": {}}) == []


def test_summary_prints_the_verdict(tmp_path, capsys):
    from carat.train.__main__ import print_summary

    results = {"test": {"micro_f1": 0.55, "macro_f1": 0.40, "threshold": 0.2},
               "test_tuned": {"micro_f1": 0.61, "macro_f1": 0.48}, "warnings": ["something odd"]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "card.json").write_text(json.dumps(_card()))
    print_summary(tmp_path)
    out = capsys.readouterr().out
    assert "[carat] verdict: model test micro-F1 0.610" in out and out.count("beats the floor") == 1
    assert "[carat] warning: something odd" in out


# -------------------------------------------------------------------------------- ZeRO: the full gradient
STAGES = (0, 1, 2, 3)


def _grad_worker(rank: int, world: int, port: int, shards: str, storage: str, out: str) -> None:
    import os

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    from carat.config import load_config
    from carat.data.loader.pipeline import build_loader
    from carat.train import dist
    from carat.train.launch import init_process_group
    from carat.train.loop import Trainer, WorkerContext
    from tests.test_zero_parity import merge

    init_process_group(False)
    found: dict[str, dict[str, float]] = {}
    for stage in (STAGES if world == 2 else (0,)):
        # Terms that couple the samples of a batch (SupCon, shuffle) and every dropout (each draws its masks
        # for the batch it sees) make two ranks differ from one process legitimately; without them the
        # step's gradient is the same.
        cfg = load_config("tiny", overrides=[
            f"--train.shard_dir={shards}", f"--train.storage_path={storage}", f"--train.zero_stage={stage}",
            "--loader.num_workers=0", "--model.text_dropout=0", "--model.visual_dropout=0",
            "--model.audio_dropout=0", "--model.input_dropout=0", "--loss.cl_weight=0",
            "--loss.shuffle_aug_clf_weight=0"])
        ctx = WorkerContext(launcher="none", run_dir=Path(storage) / f"g{world}", shard_dir=Path(shards),
                            report=lambda *_: None)
        trainer = Trainer(cfg, ctx)
        plans = [build_loader(Path(shards), "train", cfg.loader, rank=r, world_size=2, epoch=0, train=True)
                 for r in range(2)]
        first = [next(iter(plan)) for plan in plans]
        batch = first[rank] if world == 2 else merge(*first)
        trainer.train_step(batch, diagnose=True)
        found[f"world{world}-stage{stage}"] = {k: v for k, v in trainer.step_diagnostics.items()
                                               if k.startswith("grad/")}
    if rank == 0:
        Path(out).write_text(json.dumps({"grads": found, "world": dist.world_size()}))
    dist.barrier()
    os._exit(0)  # see tests/test_zero_parity.py: skip the CPU backend's teardown


@pytest.mark.slow
def test_gradient_norms_are_the_full_gradient_under_every_zero_stage(shards, tmp_path):
    import torch.multiprocessing as mp

    def spawn(world: int, port: int) -> dict:
        out = tmp_path / f"grads{world}.json"
        mp.start_processes(_grad_worker, args=(world, port, str(shards), str(tmp_path / "runs"), str(out)),
                           nprocs=world, join=True, start_method="spawn")
        return json.loads(out.read_text())

    single, multi = spawn(1, 29581), spawn(2, 29582)
    assert single["world"] == 1 and multi["world"] == 2
    reference = single["grads"]["world1-stage0"]
    assert reference["grad/total"] > 0 and len(reference) > 10
    for stage in STAGES:
        got = multi["grads"][f"world2-stage{stage}"]
        assert got.keys() == reference.keys(), f"ZeRO-{stage}"
        for key, want in reference.items():
            assert got[key] == pytest.approx(want, rel=1e-4, abs=1e-7), f"ZeRO-{stage} {key}"
