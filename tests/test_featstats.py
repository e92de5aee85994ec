"""Train-split feature statistics in the dataset card: exact, train-only, on stored values, and readable back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from carat.data.corpus.card import read_card
from carat.data.corpus.featstats import FeatureStatsAccumulator, load_feature_stats
from carat.data.corpus.prepare import PrepareConfig, prepare_corpus
from carat.data.sources.segment import FEATURE_DIMS, MODALITIES
from carat.data.corpus.shards import StorageConfig
from carat.data.sources.synth import SynthConfig, synthesize_corpus
from carat.errors import DataError
from tests.data_fixtures import make_csd_fixture, read_corpus_samples

CFG = SynthConfig(scale=0.004, length_scale=0.05, seed=5)
STORAGE = StorageConfig(shard_max_samples=16)  # float16: the stats must be those of the rounded values


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthesize_corpus(tmp_path_factory.mktemp("fs") / "c", CFG, STORAGE, reference=False)


def _numpy_stats(samples: dict, split: str = "train") -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    chosen = [s for s in samples.values() if s["json"]["split"] == split]
    out = {}
    for m in MODALITIES:
        x = np.concatenate([s[m].astype(np.float64) for s in chosen])
        out[m] = (x.mean(0), x.std(0), len(x))
    return out


def test_card_stats_equal_numpy_over_train_frames_only(corpus):
    card = read_card(corpus)
    fs = card["feature_stats"]
    samples = read_corpus_samples(corpus)
    expected = _numpy_stats(samples)
    assert fs["split"] == "train" and fs["segments"] == card["counts"]["train"]
    assert fs["constant_dims"] == {m: 0 for m in MODALITIES}
    for m in MODALITIES:
        mean, std, frames = expected[m]
        assert fs["frames"][m] == frames
        assert len(fs["mean"][m]) == len(fs["std"][m]) == FEATURE_DIMS[m]
        np.testing.assert_allclose(fs["mean"][m], mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(fs["std"][m], std, rtol=1e-9)
    # Valid / test are left out: their statistics differ from what the card says.
    everything = {m: np.concatenate([s[m].astype(np.float64) for s in samples.values()]) for m in MODALITIES}
    assert not np.allclose(fs["mean"]["audio"], everything["audio"].mean(0), rtol=1e-9, atol=1e-9)
    stats = load_feature_stats(corpus)
    for m in MODALITIES:
        mean, std = stats[m]
        assert mean.dtype == std.dtype == np.float32 and mean.shape == (FEATURE_DIMS[m],)
        np.testing.assert_allclose(std, expected[m][1], rtol=1e-6)


def test_rerun_with_reused_shards_loads_missing_train_segments(corpus, tmp_path):
    import shutil

    copy = tmp_path / "again"
    shutil.copytree(corpus, copy)
    synthesize_corpus(copy, CFG, STORAGE, reference=False)  # every shard kept: the writer loads nothing
    again = read_card(copy)
    assert again["write"]["shards_reused"] > 0
    first = read_card(corpus)["feature_stats"]
    assert again["feature_stats"]["segments"] == first["segments"]
    for m in MODALITIES:
        np.testing.assert_allclose(again["feature_stats"]["mean"][m], first["mean"][m], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(again["feature_stats"]["std"][m], first["std"][m], rtol=1e-9)


def test_fallback_computes_from_shards_for_an_old_card(corpus, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(corpus, old)
    card = read_card(old)
    stored = card.pop("feature_stats")
    (old / "card.json").write_text(json.dumps(card))
    stats = load_feature_stats(old)
    err = capsys.readouterr().err
    assert "no feature_stats" in err and f"{stored['segments']} train segments" in err
    assert len(err.strip().splitlines()) == 1
    for m in MODALITIES:
        np.testing.assert_allclose(stats[m][0], stored["mean"][m], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[m][1], np.float32(stored["std"][m]), rtol=1e-5)
    few = load_feature_stats(old, max_segments=5)
    assert "from 5 train segments" in capsys.readouterr().err
    assert few["audio"][0].shape == (FEATURE_DIMS["audio"],)


@pytest.mark.parametrize("damage, match", [
    (lambda fs: fs["mean"].__setitem__("visual", [0.0] * 34), r"feature_stats.mean.visual must be 35 numbers"),
    (lambda fs: fs["std"]["audio"].__setitem__(3, float("nan")), r"feature_stats.std.audio holds non-finite"),
    (lambda fs: fs["std"]["text"].__setitem__(0, 0.0), r"feature_stats.std.text holds values <= 0"),
    (lambda fs: fs.pop("std"), r"must hold 'mean' and 'std'"),
])
def test_malformed_stats_name_the_card(corpus, tmp_path, damage, match):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    card = read_card(bad)
    damage(card["feature_stats"])
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(DataError, match=match) as exc:
        load_feature_stats(bad)
    assert str(bad / "card.json") in str(exc.value)


def test_prepare_csd_card_has_stats_after_nan_policy(tmp_path):
    fx = make_csd_fixture(tmp_path / "src")
    vid = next(e["video_id"] for e in fx.expected.values() if e["split"] == "train")
    feats, iv = fx.videos["audio"][vid]
    feats = feats.copy()
    feats[0, 0] = -np.inf  # zeroed by the default inf policy: the stats must see the 0
    fx.videos["audio"][vid] = (feats, iv)
    fx.rewrite("audio")
    out = prepare_corpus(fx.directory, tmp_path / "out", PrepareConfig(reference=False),
                         StorageConfig(dtype="float32"))
    fs = read_card(out)["feature_stats"]
    expected = _numpy_stats(read_corpus_samples(out))
    for m in MODALITIES:
        np.testing.assert_allclose(fs["mean"][m], expected[m][0], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(fs["std"][m], expected[m][1], rtol=1e-9)


def test_constant_dimensions_get_unit_std_and_are_counted():
    acc = FeatureStatsAccumulator()
    rng = np.random.default_rng(0)
    for i in range(3):
        feats = {m: rng.standard_normal((5, FEATURE_DIMS[m])).astype(np.float32) for m in MODALITIES}
        feats["visual"][:, 2] = 300.0  # constant, large
        feats["audio"][:, :4] = 0.0
        acc.add(f"k{i}", feats)
    acc.add("k0", {m: np.zeros((9, FEATURE_DIMS[m])) for m in MODALITIES})  # a key counts once
    card = acc.to_card()
    assert card["segments"] == 3 and card["frames"]["text"] == 15
    assert card["constant_dims"] == {"text": 0, "visual": 1, "audio": 4}
    assert card["std"]["visual"][2] == 1.0 and card["mean"]["visual"][2] == pytest.approx(300.0)
    assert card["std"]["audio"][:4] == [1.0] * 4
