"""CMU-MultimodalSDK .csd files -> prepare -> shards -> read back: every segment once, bit-identical features."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from carat.data.corpus.card import read_card
from carat.data.sources.csd import select_frames
from carat.data.corpus.prepare import PrepareConfig, prepare_corpus
from carat.data.corpus.shards import StorageConfig
from carat.data.corpus.verify import require_verified
from carat.errors import ConfigError, DataError
from tests.data_fixtures import make_csd_fixture, read_corpus_samples

F32 = StorageConfig(dtype="float32", shard_max_samples=5)
CFG = PrepareConfig(reference_max_train=10, reference_max_eval=10)


@pytest.fixture
def fx(tmp_path):
    return make_csd_fixture(tmp_path / "src")


def _prepare(fx, out, cfg=CFG, storage=F32, **kw):
    return prepare_corpus(fx.directory, out, cfg, storage, **kw)


def test_round_trip_bit_identical(fx, tmp_path):
    out = _prepare(fx, tmp_path / "out")
    require_verified(out, "full")
    samples = read_corpus_samples(out)
    assert set(samples) == set(fx.expected)
    for key, exp in fx.expected.items():
        got = samples[key]
        for m in ("text", "visual", "audio"):
            assert got[m].dtype == np.float32
            np.testing.assert_array_equal(got[m], exp[m], err_msg=f"{key} {m}")
        meta = got["json"]
        assert meta["split"] == exp["split"] and meta["video_id"] == exp["video_id"]
        assert meta["labels"] == exp["labels"].tolist()
        np.testing.assert_allclose(meta["intensities"], exp["intensities"], rtol=1e-6)
        assert meta["sentiment"] == pytest.approx(exp["sentiment"], rel=1e-6)
        assert meta["lengths"] == {m: len(exp[m]) for m in ("text", "visual", "audio")}
    card = read_card(out)
    assert card["source"] == "csd"
    assert card["counts"]["total"] == len(fx.expected)
    assert card["issues"]["skipped"]["video in no fold"]["count"] == 3
    assert card["issues"]["notes"]["video in no standard fold"]["first_keys"] == [fx.no_fold_video]
    assert set(card["source_files"]) == {"text", "visual", "audio", "labels"}
    assert all(len(f["sha256"]) == 64 for f in card["source_files"].values())
    assert card["non_finite"]["per_modality"]["audio"]["neginf"] == 0


def test_float16_storage_matches_rounded_source(fx, tmp_path):
    out = _prepare(fx, tmp_path / "out", storage=StorageConfig(dtype="float16"),
                   cfg=PrepareConfig(reference=False))
    samples = read_corpus_samples(out)
    key = next(iter(fx.expected))
    assert samples[key]["audio"].dtype == np.float16
    np.testing.assert_array_equal(samples[key]["audio"], fx.expected[key]["audio"].astype(np.float16))


def test_select_frames_midpoint_rule():
    iv = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0]])
    assert select_frames(iv, 0.5, 2.5) == (0, 2)  # midpoints 0.5 and 1.5; 2.5 excluded (half-open)
    assert select_frames(iv, 10.0, 11.0) == (0, 0)
    shuffled = iv[[0, 2, 1, 3]]
    np.testing.assert_array_equal(select_frames(shuffled, 0.0, 2.0), [0, 2])


def test_missing_file_names_it(fx, tmp_path):
    fx.path("audio").unlink()
    with pytest.raises(DataError, match="CMU_MOSEI_COVAREP.csd"):
        _prepare(fx, tmp_path / "out")


def test_override_path_of_one_file(fx, tmp_path):
    moved = tmp_path / "elsewhere.csd"
    fx.path("visual").rename(moved)
    out = _prepare(fx, tmp_path / "out", csd_files={"visual": moved})
    assert read_card(out)["counts"]["total"] == len(fx.expected)


def test_wrong_root_group(fx, tmp_path):
    fx.rewrite("visual", root="FACET 4.1")
    with pytest.raises(DataError, match=r"CMU_MOSEI_VisualFacet42.csd: root group 'FACET 4.2' not found"):
        _prepare(fx, tmp_path / "out")


def test_not_hdf5(fx, tmp_path):
    fx.path("text").write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="CMU_MOSEI_TimestampedWordVectors.csd: not a readable HDF5"):
        _prepare(fx, tmp_path / "out")


def test_wrong_feature_dims_raise_or_skip(fx, tmp_path):
    vid = next(iter(fx.expected.values()))["video_id"]
    feats, iv = fx.videos["audio"][vid]
    fx.videos["audio"][vid] = (feats[:, :70], iv)
    fx.rewrite("audio")
    with pytest.raises(DataError, match=rf"COVAREP.csd: video '{vid}': features have shape .*70.*expected \[T, 74\]"):
        _prepare(fx, tmp_path / "out")
    out = _prepare(fx, tmp_path / "out2", cfg=PrepareConfig(on_error="skip", reference=False))
    card = read_card(out)
    skipped = card["issues"]["skipped"]["wrong feature dims in the audio file"]
    assert skipped["count"] == 3 and all(k.startswith(vid) for k in skipped["first_keys"])
    assert card["counts"]["total"] == len(fx.expected) - 3


def test_ids_not_matching_across_modalities(fx, tmp_path):
    keys = list(fx.expected)
    missing_vid = fx.expected[keys[-1]]["video_id"]
    del fx.videos["visual"][missing_vid]
    fx.videos["visual"]["extraVideoNoLabels"] = fx.videos["visual"][fx.expected[keys[0]]["video_id"]]
    fx.rewrite("visual")
    card = read_card(_prepare(fx, tmp_path / "out", cfg=PrepareConfig(reference=False)))
    assert card["issues"]["skipped"]["video missing from the visual file"]["count"] == 3
    assert card["issues"]["notes"]["video in the visual file has no labels"]["first_keys"] == ["extraVideoNoLabels"]
    assert card["counts"]["total"] == len(fx.expected) - 3


def test_segment_without_frames_is_skipped_and_counted(fx, tmp_path):
    key = next(iter(fx.expected))
    vid = fx.expected[key]["video_id"]
    values, bounds = fx.labels[vid]
    start, end = bounds[0]
    feats, iv = fx.videos["text"][vid]
    mid = iv.mean(axis=1)
    keep = ~((mid >= start) & (mid < end))
    fx.videos["text"][vid] = (feats[keep], iv[keep])  # no words inside segment 0
    fx.rewrite("text")
    card = read_card(_prepare(fx, tmp_path / "out", cfg=PrepareConfig(reference=False)))
    assert card["issues"]["skipped"]["no frames in text"] == {"count": 1, "first_keys": [key]}


def test_nan_inf_counted_and_replaced(fx, tmp_path):
    key = next(iter(fx.expected))
    vid = fx.expected[key]["video_id"]
    feats, iv = fx.videos["audio"][vid]
    feats = feats.copy()
    idx = int(np.flatnonzero((iv.mean(1) >= fx.labels[vid][1][0][0]))[0])  # first frame of segment 0
    feats[idx, :3] = -np.inf
    feats[idx, 3] = np.nan
    feats[idx + 1, 5] = np.inf
    fx.videos["audio"][vid] = (feats, iv)
    fx.rewrite("audio")

    out = _prepare(fx, tmp_path / "zero", cfg=PrepareConfig(reference=False))
    counts = read_card(out)["non_finite"]["per_modality"]["audio"]
    assert counts == {"nan": 1, "posinf": 1, "neginf": 3, "segments": 1}
    audio = read_corpus_samples(out)[key]["audio"]
    assert (audio[0, :4] == 0).all() and audio[1, 5] == 0

    out = _prepare(fx, tmp_path / "clip", cfg=PrepareConfig(reference=False, inf_policy="clip"))
    audio = read_corpus_samples(out)[key]["audio"]
    exp = fx.expected[key]["audio"]
    assert audio[0, 0] == exp[1:, 0].min() and audio[1, 5] == np.delete(exp[:, 5], 1).max()

    with pytest.raises(DataError, match=rf"COVAREP.csd: segment {re.escape(key)}: 1 NaN"):
        _prepare(fx, tmp_path / "err", cfg=PrepareConfig(reference=False, nan_policy="error"))
    out = _prepare(fx, tmp_path / "skip", cfg=PrepareConfig(reference=False, nan_policy="error", on_error="skip"))
    card = read_card(out)
    (reason, entry), = [(r, e) for r, e in card["issues"]["skipped"].items() if r != "video in no fold"]
    assert "NaN in audio" in reason and entry == {"count": 1, "first_keys": [key]}
    assert card["counts"]["total"] == len(fx.expected) - 1


def test_malformed_metadata_is_tolerated(fx, tmp_path):
    with h5py.File(fx.path("labels"), "a") as f:
        meta = f["All Labels"]["metadata"]
        del meta["dimension names"]
        meta.create_group("dimension names")  # a group where a dataset belongs: unreadable as a value
    card = read_card(_prepare(fx, tmp_path / "out", cfg=PrepareConfig(reference=False)))
    assert card["issues"]["notes"]["unreadable metadata in labels file (tolerated)"]["first_keys"] == ["dimension names"]


def test_custom_folds_and_config_errors(fx, tmp_path):
    import json

    vids = sorted({e["video_id"] for e in fx.expected.values()})
    folds = tmp_path / "folds.json"
    folds.write_text(json.dumps({"train": vids[:-2] + [fx.no_fold_video], "valid": vids[-2:-1],
                                 "test": vids[-1:]}))
    card = read_card(_prepare(fx, tmp_path / "out", cfg=PrepareConfig(reference=False), folds_path=folds))
    n_train = 3 * (len(vids) - 2) + 3
    assert card["counts"] == {"train": n_train, "valid": 3, "test": 3, "total": n_train + 6}
    # an empty split is refused before anything is written (issue 26): no corpus lacks a split
    folds.write_text(json.dumps({"train": vids[:-1], "valid": [], "test": vids[-1:]}))
    with pytest.raises(DataError, match="split 'valid' has no usable segments"):
        _prepare(fx, tmp_path / "empty", cfg=PrepareConfig(reference=False), folds_path=folds)
    assert not (tmp_path / "empty").exists()
    folds.write_text(json.dumps({"train": vids}))
    with pytest.raises(DataError, match="folds.json: folds JSON needs lists"):
        _prepare(fx, tmp_path / "out2", folds_path=folds)
    with pytest.raises(ConfigError, match="prepare.nan_policy"):
        PrepareConfig(nan_policy="drop")


def test_rerun_reusing_shards_keeps_counts_and_reference(fx, tmp_path):
    """A rerun keeps verified shards (the writer skips loading them); the card must still count everything."""
    key = next(iter(fx.expected))
    vid = fx.expected[key]["video_id"]
    feats, iv = fx.videos["visual"][vid]
    feats = feats.copy()
    feats[:, 0] = np.nan
    fx.videos["visual"][vid] = (feats, iv)
    fx.rewrite("visual")
    cfg = PrepareConfig(reference_max_train=50, reference_max_eval=50)
    first = read_card(_prepare(fx, tmp_path / "out", cfg=cfg))
    (tmp_path / "out" / "card.json").unlink()
    second = read_card(_prepare(fx, tmp_path / "out", cfg=cfg))
    assert second["non_finite"] == first["non_finite"]
    assert first["non_finite"]["per_modality"]["visual"]["segments"] == 3
    assert second["reference_scorer"]["fused"] == first["reference_scorer"]["fused"]
    assert second["counts"] == first["counts"]
    assert first["write"]["shards_reused"] == 0
    assert second["write"]["shards_reused"] == sum(second["shards"][s]["count"] for s in ("train", "valid", "test"))
    assert second["write"]["segments_loaded_after_write"] == second["counts"]["total"]
