"""Can the model learn at all? It must overfit one fixed batch of 32 clips through the real training loop,
learn a strong signal in one epoch, and beat the pooled floor on a corpus it was not tuned on.

A model or objective that cannot memorise 32 clips cannot learn the corpus either; this is the first check to
run when a run ends predicting every emotion. The corpus' train split is exactly 32 clips and the loader puts
them in one batch, so every epoch is one optimizer step on the same batch; dropout is off, the lr is high and
constant (no warmup, no decay by epoch, no weight decay).

The objective is BCE only: the classification terms of every head that feeds the score or the classifiers
(lsr_clf, aug_clf, final_clf, total_aug_clf at weight 1); SupCon, the three reconstruction MSEs and the shuffle
and reconstruction classification terms at 0. Measured with the full tiny-preset objective (dropout 0, lr 1e-2,
40 steps): the clips are memorised too (train micro-F1 1.0), but the total loss falls only ~71%, because SupCon
and the reconstruction MSEs have floors well above 0; so "the loss falls by more than 90%" is a criterion for
the BCE objective only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carat.data.corpus.shards import StorageConfig
from carat.data.sources.synth import SynthConfig, synthesize_corpus
from carat.train.rundir import read_jsonl

pytestmark = pytest.mark.slow  # ~25-45 s on two busy CPU cores: 20 steps plus 20 validations

CLIPS = 32
EPOCHS = 20

BCE_ONLY = [
    "--loss.lsr_clf_weight=1", "--loss.aug_clf_weight=1", "--loss.final_clf_weight=1",
    "--loss.total_aug_clf_weight=1", "--loss.cl_weight=0", "--loss.recon_mse_weight=0",
    "--loss.aug_mse_weight=0", "--loss.beta_mse_weight=0", "--loss.shuffle_aug_clf_weight=0",
    "--loss.recon_clf_weight=0",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "shards"
    synthesize_corpus(out, SynthConfig(train_size=CLIPS, valid_size=8, test_size=8, length_scale=0.01, seed=3),
                      StorageConfig(dtype="float32", shard_max_samples=8), reference=False)
    return out


def test_the_model_overfits_a_fixed_batch_of_32_clips(shards, tmp_path):
    from carat import evaluate
    from carat.train.__main__ import main

    storage = tmp_path / "runs"
    args = [
        "--preset", "tiny", "--launcher", "none", f"--train.shard_dir={shards}", f"--train.storage_path={storage}",
        "--train.run_name=overfit", f"--train.epochs={EPOCHS}", "--train.synth_if_missing=false",
        "--train.log_every=1", "--train.keep_checkpoints=1", "--train.tune_thresholds=false",
        "--loader.num_workers=0", f"--loader.max_batch_size={CLIPS}", "--loader.token_budget=10000000",
        "--loader.sort_jitter=0",
        "--model.text_dropout=0", "--model.visual_dropout=0", "--model.audio_dropout=0", "--model.input_dropout=0",
        "--optim.lr=2e-2", "--optim.warmup_fraction=0", "--optim.epoch_decay=1", "--optim.weight_decay=0",
        *BCE_ONLY,
    ]
    assert main(args) == 0
    run = storage / "overfit"
    history = read_jsonl(run / "history.jsonl")
    assert [h["perf/samples"] for h in history] == [CLIPS] * EPOCHS  # one step of the same 32 clips per epoch
    steps = read_jsonl(run / "metrics.jsonl")
    assert len(steps) == EPOCHS
    first, last = steps[0]["loss/total"], steps[-1]["loss/total"]
    assert last < 0.1 * first, f"train loss fell only {1 - last / first:.1%} ({first:.4f} -> {last:.4f})"

    # Score those same 32 clips with the final weights (the newest epoch checkpoint, not the best on valid).
    out = tmp_path / "train.json"
    assert evaluate.main(["--checkpoint", str(run / "checkpoints"), "--split", "train", "--shards", str(shards),
                          "--out", str(out)]) == 0
    scored = next(iter(json.loads(out.read_text()).values()))
    assert scored["n_samples"] == CLIPS
    assert scored["micro_f1"] >= 0.95, scored


def test_the_tiny_preset_beats_the_pooled_floor_on_a_corpus_it_was_not_tuned_on(tmp_path):
    """The quickstart's claim, on a corpus of the quickstart's size drawn with another seed (the preset was
    chosen on seed 0): the tiny preset through the real loop ends above the card's pooled logistic-regression
    floor in test micro-F1 and macro-F1 (thresholds tuned on valid, the floor's protocol). Measured on this
    corpus (seed 7): +0.077 / +0.046 F1, macro-AUC 0.764 vs 0.754 (BENCHMARKS.md, Learning); the assertion keeps only
    the sign, so seed-level noise does not fail it, a regression to the floor does. ~2-4 min on 2 busy cores."""
    from carat.data.sources.synth import TINY_OVERRIDES as TINY_SYNTH
    from carat.train.__main__ import main

    shards = tmp_path / "shards"
    synthesize_corpus(shards, SynthConfig(**TINY_SYNTH, seed=7), StorageConfig(dtype="float32"))
    storage = tmp_path / "runs"
    assert main(["--preset", "tiny", "--launcher", "none", f"--train.shard_dir={shards}",
                 f"--train.storage_path={storage}", "--train.run_name=learns", "--train.synth_if_missing=false"]) == 0
    results = json.loads((storage / "learns" / "results.json").read_text())
    floor = json.loads((shards / "card.json").read_text())["reference_scorer"]["fused"]
    tuned = results["test_tuned"]
    margins = {k: tuned[k] - floor["tuned_on_valid"][k] for k in ("micro_f1", "macro_f1")}
    auc = (results["test"]["macro_auc"], floor["macro_roc_auc"])  # measured 0.764 vs 0.754: too close to assert
    assert all(m > 0 for m in margins.values()), (margins, auc)


def test_one_epoch_on_a_strong_signal_lifts_the_model_far_above_the_trivial_floors(tmp_path):
    """The fast learning check: one epoch of the tiny preset on a corpus with a strong planted signal (no label
    noise) ends far above predicting every emotion, in tuned micro- and macro-F1, and ranks well (macro-AUC),
    so a regression to "predicts every emotion" (the quickstart's old failure) fails here in seconds.

    Against the pooled logistic-regression floor one epoch does not win: a strong signal makes that convex
    floor strong too (measured: one epoch AUC 0.78 against the floor's 0.91; four epochs beat it; BENCHMARKS.md,
    Learning, 2026-12-03, second part); the slow test above is the beats-the-pooled-floor check."""
    from carat.train.__main__ import main

    shards = tmp_path / "shards"
    synthesize_corpus(shards, SynthConfig(scale=0.1, length_scale=0.025, cue_strength=10.0, label_noise=0.0,
                                          seed=13), StorageConfig(dtype="float32"))
    storage = tmp_path / "runs"
    assert main(["--preset", "tiny", "--launcher", "none", "--train.epochs=1", f"--train.shard_dir={shards}",
                 f"--train.storage_path={storage}", "--train.run_name=one", "--train.synth_if_missing=false"]) == 0
    results = json.loads((storage / "one" / "results.json").read_text())
    everything = results["verdict"]["all_positive"]
    tuned = results["test_tuned"]
    lifts = {k: tuned[k] - everything[k] for k in ("micro_f1", "macro_f1")}
    # Measured (seed 13): 0.629 / 0.483 against 0.351 / 0.324, macro-AUC 0.799.
    assert all(lift > 0.1 for lift in lifts.values()), lifts
    assert results["test"]["macro_auc"] > 0.7, results["test"]["macro_auc"]
