"""A synthetic corpus exported as CMU-MultimodalSDK .csd files, then read back by the user's path (prepare)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from carat.data.corpus.card import read_card
from carat.data.sources.csd import CSD_FILES
from carat.data.corpus.prepare import PrepareConfig, load_folds, prepare_corpus
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES, SPLITS
from carat.data.sources.synth import SynthConfig, SyntheticCorpus, split_sizes
from carat.data.sources.synth_csd import MAP_FILE, csd_key_map, video_layout, write_synthetic_csd
from tests.data_fixtures import read_corpus_samples

CFG = SynthConfig(scale=0.02, length_scale=0.1, seed=11)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("scsd")
    src = write_synthetic_csd(root / "csd", CFG)
    out = prepare_corpus(src, root / "shards", PrepareConfig(reference=False))  # float16, standard folds
    return src, out


def test_files_have_the_sdk_layout(exported):
    src, _ = exported
    roots = {"text": "glove_vectors", "visual": "FACET 4.2", "audio": "COVAREP", "labels": "All Labels"}
    folds = load_folds()
    for kind, name in CSD_FILES.items():
        with h5py.File(src / name, "r") as f:
            assert list(f.keys()) == [roots[kind]]
            assert f[roots[kind]]["metadata"]["root name"][0].decode() == roots[kind]
            data = f[roots[kind]]["data"]
            vid = next(iter(data))
            assert vid in folds
            feats, iv = data[vid]["features"], data[vid]["intervals"]
            dim = 7 if kind == "labels" else FEATURE_DIMS[kind]
            assert feats.shape[1] == dim and iv.shape == (feats.shape[0], 2)
            assert (np.diff(iv[:, 0]) > 0).all() and (iv[:, 1] > iv[:, 0]).all()
    assert not list(src.glob("*.tmp"))
    doc = json.loads((src / MAP_FILE).read_text())
    assert doc["synth"]["seed"] == CFG.seed and len(doc["csd_key_of"]) == sum(split_sizes(CFG).values())


def test_prepare_gets_the_planned_splits_labels_and_features(exported):
    _, out = exported
    corpus = SyntheticCorpus(CFG)
    card = read_card(out)
    assert card["issues"]["skipped_total"] == 0
    assert {s: card["counts"][s] for s in SPLITS} == split_sizes(CFG)
    for split in SPLITS:
        planned = np.stack([r.locator.labels for r in corpus.refs()[split]]).mean(0)
        got = [card["label_prevalence"][split][e] for e in EMOTIONS]
        np.testing.assert_allclose(got, planned, atol=1e-4)
    samples = read_corpus_samples(out)
    key_of = csd_key_map(corpus)
    assert set(samples) == set(key_of.values())
    for split in SPLITS:
        for ref in corpus.refs()[split]:
            seg, got = corpus.load(ref), samples[key_of[ref.key]]
            assert got["json"]["split"] == split
            assert got["json"]["labels"] == seg.labels.tolist()
            np.testing.assert_allclose(got["json"]["intensities"], seg.intensities, atol=1e-6)
            assert got["json"]["sentiment"] == pytest.approx(seg.sentiment)
            for m in MODALITIES:
                np.testing.assert_array_equal(got[m], getattr(seg, m).astype(np.float16), err_msg=f"{ref.key} {m}")
    assert card["feature_stats"]["segments"] == split_sizes(CFG)["train"]
    assert len(card["feature_stats"]["std"]["audio"]) == FEATURE_DIMS["audio"]


def test_more_synthetic_videos_than_fold_ids_wrap_within_the_split():
    cfg = SynthConfig(scale=1.0)  # the plan only: ~2,330 train videos for 2,250 standard train ids
    corpus = SyntheticCorpus(cfg)
    layout = video_layout(corpus)
    folds = load_folds()
    n_train_videos = corpus.refs()["train"][-1].locator.video_index + 1
    assert n_train_videos > len(layout["train"]) == sum(1 for s in folds.values() if s == "train")
    for split, videos in layout.items():
        assert all(folds[vid] == split for vid in videos)
        assert sum(len(r) for r in videos.values()) == split_sizes(cfg)[split]
    keys = csd_key_map(corpus)
    assert len(set(keys.values())) == len(keys)


def test_cli_synth_csd_then_prepare(tmp_path, capsys):
    from carat.data.__main__ import main

    src, shards = tmp_path / "csd", tmp_path / "shards"
    assert main(["synth", "--format", "csd", "--out", str(src), "--scale", "0.003", "--length-scale", "0.05",
                 "--cue-layout", "shuffled"]) == 0
    assert "prepare --source csd" in capsys.readouterr().out
    assert json.loads((src / MAP_FILE).read_text())["synth"]["cue_layout"] == "shuffled"
    assert main(["prepare", "--source", "csd", "--input", str(src), "--out", str(shards), "--no-reference",
                 "--no-progress"]) == 0
    card = read_card(shards)
    sizes = split_sizes(SynthConfig(scale=0.003))
    assert {s: card["counts"][s] for s in SPLITS} == sizes and "feature_stats" in card
