"""The synthetic corpus: deterministic, realistically shaped, and carrying a learnable, unaligned signal."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from carat.data.corpus.card import ReferenceCollector, read_card
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES
from carat.data.sources.synth import (
    CUE_STRENGTH, LENGTH_BOUNDS, ORACLE_METHOD, TINY_OVERRIDES, SynthConfig, SyntheticCorpus, cue_strength_table,
    plan_corpus, split_sizes, synthesize_corpus,
)
from carat.errors import ConfigError

TINY = SynthConfig(scale=0.005, length_scale=0.1)


def _plan_arrays(cfg: SynthConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    refs = plan_corpus(cfg)[split]
    lengths = np.array([r.lengths for r in refs])
    labels = np.stack([r.locator.labels for r in refs])
    intens = np.stack([r.locator.intensities for r in refs])
    return lengths, labels, intens


def test_split_sizes_real_and_scaled():
    assert split_sizes(SynthConfig()) == {"train": 16326, "valid": 1871, "test": 4659}
    assert split_sizes(SynthConfig(scale=0.02)) == {"train": 327, "valid": 37, "test": 93}
    tiny = split_sizes(SynthConfig(scale=1e-5))
    assert all(n == SynthConfig().min_split_size for n in tiny.values())


def test_plan_full_size_lengths_bounds_tail_and_correlation():
    lengths, _, _ = _plan_arrays(SynthConfig())
    assert len(lengths) == 16326
    for j, m in enumerate(MODALITIES):
        lo, hi = LENGTH_BOUNDS[m]
        assert lengths[:, j].min() >= lo and lengths[:, j].max() <= hi
        p50, p99 = np.percentile(lengths[:, j], [50, 99])
        assert p99 > 2.5 * p50, f"{m} lengths should be long-tailed"
    # One duration drives every modality: lengths are strongly correlated (Spearman rank correlation).
    ranks = np.argsort(np.argsort(lengths, axis=0), axis=0)
    rho = np.corrcoef(ranks.T)
    assert rho[1, 2] > 0.95 and rho[0, 2] > 0.6
    # Audio ~100 Hz and visual ~30 Hz over the same seconds.
    ratio = np.median(lengths[:, 2] / lengths[:, 1])
    assert 3.0 < ratio < 3.8


def test_length_scale_shrinks_proportionally_with_floor():
    full, _, _ = _plan_arrays(SynthConfig(scale=0.05))
    small, _, _ = _plan_arrays(SynthConfig(scale=0.05, length_scale=0.1))
    np.testing.assert_array_equal(small, np.maximum(4, np.rint(full * 0.1)))


def test_label_prevalence_and_cooccurrence():
    _, labels, intens = _plan_arrays(SynthConfig())
    target = np.array(SynthConfig().prevalence)
    np.testing.assert_allclose(labels.mean(0), target, atol=0.015)
    corr = np.corrcoef(labels.T.astype(float))
    sad, anger, disgust, happy = (EMOTIONS.index(e) for e in ("sad", "anger", "disgust", "happy"))
    assert corr[anger, disgust] > 0.2 and corr[sad, anger] > 0.1
    assert corr[happy, sad] < -0.1 and corr[happy, anger] < -0.1
    # Raw intensities are annotator means in thirds, zero exactly when absent, mostly low.
    thirds = intens * 3
    np.testing.assert_allclose(thirds, np.rint(thirds), atol=1e-5)
    assert ((intens > 0) == (labels == 1)).all() and intens.max() <= 3.0
    present = intens[labels == 1]
    assert np.mean(present <= 2 / 3 + 1e-6) > 0.5


def test_segments_have_contract_shapes_and_are_deterministic():
    a, b = SyntheticCorpus(TINY), SyntheticCorpus(TINY)
    other = SyntheticCorpus(SynthConfig(scale=0.005, length_scale=0.1, seed=1))
    ref = a.refs()["valid"][3]
    s1, s2 = a.load(ref), b.load(b.refs()["valid"][3])
    assert s1.key == ref.key and s1.key.endswith("]") and s1.video_id in s1.key
    for j, m in enumerate(MODALITIES):
        x = getattr(s1, m)
        assert x.dtype == np.float32 and x.shape == (ref.lengths[j], FEATURE_DIMS[m])
        assert np.isfinite(x).all()
        np.testing.assert_array_equal(x, getattr(s2, m))
    assert s1.labels.dtype == np.uint8 and s1.labels.shape == (6,)
    assert -3.0 <= s1.sentiment <= 3.0
    # A segment does not depend on the order segments are generated in (the writer sorts by length).
    later_first = SyntheticCorpus(TINY)
    for r in reversed(later_first.refs()["valid"]):
        later_first.load(r)
    np.testing.assert_array_equal(later_first.load(later_first.refs()["valid"][3]).audio, s1.audio)
    assert not np.array_equal(other.load(other.refs()["valid"][3]).text[:4], s1.text[:4])


def test_cues_are_planted_at_different_times_per_modality():
    """With no noise on the evidence, a present emotion's cue peaks at unrelated times across modalities."""
    cfg = SynthConfig(scale=0.01, cue_strength=30.0, label_noise=0.0, modality_dropout=0.0, speaker_offset=0.0)
    corpus = SyntheticCorpus(cfg)
    happy = EMOTIONS.index("happy")
    offsets = []
    for ref in corpus.refs()["train"][:40]:
        if not ref.locator.labels[happy]:
            continue
        seg = corpus.load(ref)
        peaks = []
        for m in ("visual", "audio"):
            p = corpus.params[m]
            proj = ((getattr(seg, m) - p.mean) / p.scale) @ p.directions[happy]
            assert proj.max() > 6.0, "the planted cue stands out of the background"
            peaks.append(np.argmax(proj) / len(proj))
        offsets.append(abs(peaks[0] - peaks[1]))
    assert len(offsets) >= 10
    assert np.median(offsets) > 0.1, "cues should not be aligned across modalities"


def test_reference_scorer_beats_chance_and_oracle_beats_floor_on_small_corpus():
    cfg = SynthConfig(scale=0.1, length_scale=0.1, seed=3)
    corpus = SyntheticCorpus(cfg)
    collector = ReferenceCollector(corpus.refs(), max_train=2000, max_eval=600, seed=3,
                                   oracle=corpus.oracle_features, oracle_method=ORACLE_METHOD)
    collector.complete(corpus.load)
    result = collector.score()
    assert result["subsample"]["valid"]["used"] == min(600, split_sizes(cfg)["valid"])
    assert result["fused"]["macro_roc_auc"] > 0.58
    assert result["fused"]["tuned_on_valid"]["micro_f1"] > result["all_positive_baseline"]["micro_f1"]
    for m in MODALITIES:
        assert 0.0 <= result[m]["threshold_0.5"]["macro_f1"] <= 1.0
    # The oracle knows where the cues are: clearly above the time-blind floor on every summary.
    oracle, fused = result["oracle"], result["fused"]
    assert oracle["method"] == ORACLE_METHOD
    assert set(oracle) == {"method", "threshold_0.5", "tuned_on_valid", "tuned_micro_on_valid", "macro_roc_auc"}
    assert oracle["tuned_on_valid"]["micro_f1"] >= fused["tuned_on_valid"]["micro_f1"] + 0.05
    assert oracle["tuned_on_valid"]["macro_f1"] >= fused["tuned_on_valid"]["macro_f1"] + 0.05
    assert oracle["macro_roc_auc"] > 0.75 and oracle["macro_roc_auc"] > fused["macro_roc_auc"] + 0.1


def test_oracle_features_follow_the_planted_cues():
    """A cue-carrying modality gives a large matched-filter response on its emotion, pure noise a small one."""
    cfg = SynthConfig(scale=0.01, length_scale=0.25, cue_strength=10.0, label_noise=0.0, modality_dropout=0.0)
    corpus = SyntheticCorpus(cfg)
    surprise, visual = EMOTIONS.index("surprise"), MODALITIES.index("visual")
    column = visual * len(EMOTIONS) + surprise
    with_cue, without = [], []
    for ref in corpus.refs()["train"]:
        f = corpus.oracle_features(corpus.load(ref))
        assert f.shape == (len(MODALITIES) * len(EMOTIONS) + len(MODALITIES),) and np.isfinite(f).all()
        (with_cue if ref.locator.labels[surprise] else without).append(f[column])
    assert len(with_cue) >= 3 and min(with_cue) > np.percentile(without, 90)
    seg = corpus.load(corpus.refs()["train"][0])
    np.testing.assert_array_equal(corpus.oracle_features(seg), corpus.oracle_features(seg))


def test_synthesize_corpus_writes_shards_manifest_card_deterministically(tmp_path):
    from carat.data.corpus.shards import StorageConfig
    from carat.data.corpus.verify import require_verified

    storage = StorageConfig(dtype="float32", shard_max_samples=16)
    cfg = SynthConfig(scale=0.004, length_scale=0.05, reference_max_train=40, reference_max_eval=20)
    out1 = synthesize_corpus(tmp_path / "a", cfg, storage)
    out2 = synthesize_corpus(tmp_path / "b", cfg, storage)
    require_verified(out1, "full")
    sha = lambda d: pq.read_table(d / "shards.parquet").column("sha256").to_pylist()
    assert sha(out1) == sha(out2)
    card = read_card(out1)
    assert card["counts"] == {**split_sizes(cfg), "total": sum(split_sizes(cfg).values())}
    assert card["config"]["synth"]["length_scale"] == 0.05
    assert set(card["lengths"]["all"]) == set(MODALITIES)
    assert set(card["lengths"]["all"]["audio"]) == {"min", "p50", "p90", "p99", "max", "mean"}
    assert card["reference_scorer"]["fused"]["tuned_on_valid"]["micro_f1"] >= 0.0
    assert card["reference_scorer"]["oracle"] == read_card(out2)["reference_scorer"]["oracle"]  # reproducible
    assert any("length_scale" in n for n in card["notes"])
    json.dumps(card)  # plain JSON all the way down


def test_tiny_overrides_and_validation():
    cfg = SynthConfig(**TINY_OVERRIDES)
    assert cfg.length_scale < 1.0 and cfg.scale < 1.0
    with pytest.raises(ConfigError, match="synth.scale"):
        SynthConfig(scale=0.0)
    with pytest.raises(ConfigError, match="synth.prevalence"):
        SynthConfig(prevalence=(0.5, 0.2))
    with pytest.raises(ConfigError, match="synth.cue_dims"):
        SynthConfig(cue_dims=(8, 40, 8))
    with pytest.raises(ConfigError, match="synth.label_noise"):
        SynthConfig(label_noise=1.5)
    with pytest.raises(ConfigError, match="synth.cue_layout='diagonal' must be one of"):
        SynthConfig(cue_layout="diagonal")
    with pytest.raises(ConfigError, match="synth.feature_scale_spread=-1.0"):
        SynthConfig(feature_scale_spread=-1.0)
    with pytest.raises(ConfigError, match="synth.feature_mean_spread"):
        SynthConfig(feature_mean_spread=float("nan"))


def test_structure_knobs_at_their_defaults_change_nothing():
    explicit = SyntheticCorpus(SynthConfig(scale=0.005, length_scale=0.1, cue_layout="default",
                                           feature_scale_spread=0.5, feature_mean_spread=0.5))
    plain = SyntheticCorpus(TINY)
    np.testing.assert_array_equal(explicit.cue_strength, np.asarray(CUE_STRENGTH, dtype=np.float32))
    ref = plain.refs()["test"][2]
    a, b = plain.load(ref), explicit.load(explicit.refs()["test"][2])
    for m in MODALITIES:
        np.testing.assert_array_equal(getattr(a, m), getattr(b, m))


def test_shuffled_layout_permutes_each_emotions_row_from_the_seed():
    tables = [cue_strength_table(SynthConfig(cue_layout="shuffled", seed=s)) for s in range(4)]
    base = np.asarray(CUE_STRENGTH, dtype=np.float32)
    for t in tables:
        np.testing.assert_array_equal(np.sort(t, axis=1), np.sort(base, axis=1))  # same values per emotion
    assert any(not np.array_equal(t, base) for t in tables)
    assert not all(np.array_equal(tables[0], t) for t in tables[1:])
    np.testing.assert_array_equal(tables[1], cue_strength_table(SynthConfig(cue_layout="shuffled", seed=1)))
    # The generator plants with the shuffled table: an emotion whose strongest modality moved now shows its cue
    # best in the new one (matched-filter responses of the oracle, averaged over segments carrying it).
    cfg = SynthConfig(scale=0.02, length_scale=0.25, cue_layout="shuffled", seed=2, label_noise=0.0,
                      modality_dropout=0.0)
    corpus = SyntheticCorpus(cfg)
    table = corpus.cue_strength
    moved = [e for e in range(len(EMOTIONS)) if table[e].argmax() != base[e].argmax()]
    assert moved, "seed 2 should move some emotion's strongest modality"
    e = moved[0]
    refs = [r for r in corpus.refs()["train"] if r.locator.labels[e]][:30]
    response = np.mean([corpus.oracle_features(corpus.load(r))[:18].reshape(3, 6)[:, e] for r in refs], axis=0)
    assert response[table[e].argmax()] > response[base[e].argmax()]


def test_feature_spreads_scale_the_same_draws():
    """scale = exp(spread * z), mean = spread * z' with the same z, z': spreads change magnitudes, not structure."""
    a = SyntheticCorpus(SynthConfig(scale=0.005))
    b = SyntheticCorpus(SynthConfig(scale=0.005, feature_scale_spread=2.0, feature_mean_spread=1.5))
    for m in MODALITIES:
        np.testing.assert_allclose(np.log(b.params[m].scale), 4.0 * np.log(a.params[m].scale), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.params[m].mean, 3.0 * a.params[m].mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(b.params[m].directions, a.params[m].directions)
    spans = np.concatenate([b.params[m].scale for m in MODALITIES])
    assert spans.max() / spans.min() > 1000  # real-feature-like magnitudes


def test_synth_cli_structure_flags_reach_config_and_card(tmp_path):
    from carat.data.__main__ import main

    out = tmp_path / "c"
    assert main(["synth", "--out", str(out), "--scale", "0.003", "--length-scale", "0.05", "--no-reference",
                 "--cue-strength", "4", "--cue-layout", "shuffled", "--feature-scale-spread", "2.0",
                 "--feature-mean-spread", "1.0", "--label-noise", "0.2", "--seed", "4", "--no-progress"]) == 0
    card = read_card(out)
    synth = card["config"]["synth"]
    assert (synth["cue_strength"], synth["cue_layout"], synth["feature_scale_spread"], synth["feature_mean_spread"],
            synth["label_noise"]) == (4.0, "shuffled", 2.0, 1.0, 0.2)
    planted = card["planted_signal"]
    table = cue_strength_table(SynthConfig(cue_layout="shuffled", seed=4))
    assert planted["cue_layout"] == "shuffled"
    np.testing.assert_allclose([[planted["cue_strength"][e][m] for m in MODALITIES] for e in EMOTIONS], table,
                               rtol=1e-4)
    lo, hi = planted["feature_scale_range"]["text"]
    assert hi / lo > 1000
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "d"), "--cue-layout", "diagonal"])


def test_inspect_prints_the_oracle(tmp_path, capsys):
    from carat.data.__main__ import main

    out = tmp_path / "c"
    assert main(["synth", "--out", str(out), "--scale", "0.004", "--length-scale", "0.05", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "reference oracle" in text and "\n  oracle " in text and "reference scorer" in text
