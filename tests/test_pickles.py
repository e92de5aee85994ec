"""MulT-style pickles -> prepare -> shards: lengths recovered from zero padding, both label forms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from carat.data.corpus.card import read_card
from carat.data.sources.pickles import PickleSource, decode_tokens, labels_from_array, leading_padding
from carat.data.corpus.prepare import PrepareConfig, prepare_corpus
from carat.data.corpus.shards import StorageConfig
from carat.errors import ConfigError, DataError
from tests.data_fixtures import make_pickle_fixture, padded_tokens, read_corpus_samples, tokens_of

F32 = StorageConfig(dtype="float32")
TRUSTED = PrepareConfig(source="pickle", trust_pickle=True, reference=False)


def _check_round_trip(fx, out, *, with_intensities: bool, with_sentiment: bool) -> None:
    samples = read_corpus_samples(out)
    assert set(samples) == set(fx.expected)
    for key, exp in fx.expected.items():
        got = samples[key]
        for m in ("text", "visual", "audio"):
            np.testing.assert_array_equal(got[m], exp[m], err_msg=f"{key} {m}")
        assert got["json"]["labels"] == exp["labels"].tolist()
        assert got["json"]["split"] == exp["split"]
        if with_intensities:
            np.testing.assert_allclose(got["json"]["intensities"], exp["intensities"], rtol=1e-6)
        else:
            assert got["json"]["intensities"] == [None] * 6
        if with_sentiment:
            assert got["json"]["sentiment"] == pytest.approx(exp["sentiment"], rel=1e-6)


def test_sentiment_only_pickle_with_npz_labels(tmp_path):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl")
    labels = tmp_path / "labels.npz"
    np.savez(labels, **fx.emotion_labels)
    out = prepare_corpus(fx.path, tmp_path / "out", TRUSTED, F32, labels_path=labels)
    _check_round_trip(fx, out, with_intensities=False, with_sentiment=True)
    card = read_card(out)
    assert card["counts"] == {**fx.sizes, "total": sum(fx.sizes.values())}
    assert any("stripping all-zero leading rows" in n for n in card["notes"])
    assert set(card["source_files"]) == {"pickle", "labels"}


@pytest.mark.parametrize("form", ["padded", "ragged"])
def test_carat_token_labels(tmp_path, form):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl", seed=1, id_form="strings")
    if form == "padded":
        path = tmp_path / "tokens.npz"
        np.savez(path, **{s: padded_tokens(y) for s, y in fx.emotion_labels.items()})
    else:
        path = tmp_path / "tokens.pkl"
        path.write_bytes(pickle.dumps({s: tokens_of(y) for s, y in fx.emotion_labels.items()}))
    out = prepare_corpus(fx.path, tmp_path / "out", TRUSTED, F32, labels_path=path)
    _check_round_trip(fx, out, with_intensities=False, with_sentiment=True)


def test_concatenated_npy_labels(tmp_path):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl", seed=2)
    path = tmp_path / "labels.npy"
    np.save(path, np.concatenate([fx.emotion_labels[s] for s in ("train", "valid", "test")]))
    out = prepare_corpus(fx.path, tmp_path / "out", TRUSTED, F32, labels_path=path)
    _check_round_trip(fx, out, with_intensities=False, with_sentiment=True)


@pytest.mark.parametrize("form", ["seven", "six"])
def test_pickles_own_emotion_labels(tmp_path, form):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl", seed=3, label_form=form)
    out = prepare_corpus(fx.path, tmp_path / "out", TRUSTED, F32)
    _check_round_trip(fx, out, with_intensities=form == "seven", with_sentiment=form == "seven")


def test_refuses_untrusted_pickle(tmp_path):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl")
    with pytest.raises(DataError, match="refusing to unpickle .*executes arbitrary code.*--trust-pickle"):
        prepare_corpus(fx.path, tmp_path / "out", PrepareConfig(source="pickle"), F32)


def test_sentiment_only_without_labels_file_is_an_error(tmp_path):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl")
    with pytest.raises(DataError, match=r"mosei.pkl \[train\]: labels \(6, 1, 1\) hold no emotions.*--labels"):
        prepare_corpus(fx.path, tmp_path / "out", TRUSTED, F32)


def test_lengths_recovered_and_empty_sequences_counted(tmp_path):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl", label_form="six")
    fx.data["train"]["vision"][2] = 0.0  # an all-zero (empty) visual sequence
    fx.path.write_bytes(pickle.dumps(fx.data))
    src = PickleSource(fx.path, trust=True)
    refs = src.list_refs()
    by_key = {r.key: r for split in refs.values() for r in split}
    for key, exp in fx.expected.items():
        if key in by_key:
            assert by_key[key].lengths == tuple(len(exp[m]) for m in ("text", "visual", "audio"))
    assert src.issues.skipped == {"all-zero (empty) visual sequence": 1}
    out = prepare_corpus(fx.path, tmp_path / "out", TRUSTED, F32)
    assert read_card(out)["issues"]["skipped"]["all-zero (empty) visual sequence"]["count"] == 1


def test_neg_inf_audio_counted_and_zeroed(tmp_path):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl", label_form="six")
    t = fx.data["test"]["audio"].shape[1]
    fx.data["test"]["audio"][1, t - 1, :2] = -np.inf
    fx.path.write_bytes(pickle.dumps(fx.data))
    out = prepare_corpus(fx.path, tmp_path / "out", TRUSTED, F32)
    assert read_card(out)["non_finite"]["per_modality"]["audio"]["neginf"] == 2
    key = [k for k, e in fx.expected.items() if e["split"] == "test"][1]
    assert (read_corpus_samples(out)[key]["audio"][-1, :2] == 0).all()
    with pytest.raises(DataError, match=r"mosei.pkl \[test\]\['audio'\] row 1 .*-inf values \(inf_policy='error'"):
        prepare_corpus(fx.path, tmp_path / "err", PrepareConfig(source="pickle", trust_pickle=True,
                                                                inf_policy="error", reference=False), F32)


def test_bad_pickles(tmp_path):
    fx = make_pickle_fixture(tmp_path / "mosei.pkl", label_form="six")
    data = dict(fx.data)
    data["valid"] = {**data["valid"], "audio": data["valid"]["audio"][:, :, :70]}
    bad = tmp_path / "dims.pkl"
    bad.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match=r"dims.pkl \[valid\]\['audio'\]: shape \(3, 24, 70\), expected \[N, T, 74\]"):
        PickleSource(bad, trust=True)
    data = dict(fx.data)
    data["train"] = {**data["train"], "text": data["train"]["text"][:-1]}
    bad.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match=r"\[train\]: modalities disagree on the number of segments"):
        PickleSource(bad, trust=True)
    bad.write_bytes(pickle.dumps({"train": {}}))
    with pytest.raises(DataError, match="expected a dict with"):
        PickleSource(bad, trust=True)
    with pytest.raises(DataError, match="nothere.pkl: pickle file not found"):
        PickleSource(tmp_path / "nothere.pkl", trust=True)
    data = dict(fx.data)
    data["test"] = {**data["test"], "id": np.array([["dup", "0"]] * len(data["test"]["id"]))}
    bad.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match="duplicate segment id 'dup\\[0\\]'"):
        PickleSource(bad, trust=True).list_refs()
    src = PickleSource(bad, trust=True, on_error="skip")
    src.list_refs()
    assert src.issues.skipped == {"duplicate segment id": len(data["test"]["id"]) - 1}
    with pytest.raises(ConfigError, match="--folds applies to --source csd"):
        prepare_corpus(fx.path, tmp_path / "out", TRUSTED, F32, folds_path=tmp_path / "f.json")


def test_label_helpers():
    assert decode_tokens([2, 4, 9, 3, 0], "x").tolist() == [1, 0, 0, 0, 0, 1]
    with pytest.raises(DataError, match="x: token 12 is not an emotion token"):
        decode_tokens([2, 12, 3], "x")
    y, intens = labels_from_array(np.array([[0, 1 / 3, 0, 0, 2, 0]]), 1, "x")
    assert y.tolist() == [[0, 1, 0, 0, 1, 0]] and intens[0, 4] == 2.0
    with pytest.raises(DataError, match="x: 2 label rows for 3 segments"):
        labels_from_array(np.zeros((2, 6)), 3, "x")
    x = np.zeros((2, 4, 3))
    x[0, 1:] = 1.0
    x[1, 3, 2] = np.nan
    assert leading_padding(x).tolist() == [1, 3]
