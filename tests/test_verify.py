"""Issue 10, part 5: `python -m carat.data verify` finds corruption where it is cheap and names shard and
key; a manifest from another corpus is a mismatch; the writer rejects empty and non-finite sequences."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from carat.data.__main__ import main as data_main
from carat.data.sources.segment import SegmentRef
from carat.data.corpus.shards import StorageConfig, read_manifest, tar_key, write_corpus
from carat.data.corpus.verify import verify_corpus
from carat.errors import DataError
from tests.test_shards import load_segment, make_refs, write_tiny


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "corpus"
    write_tiny(out)
    return out


@pytest.fixture
def corpus(clean, tmp_path) -> Path:
    out = tmp_path / "corpus"
    shutil.copytree(clean, out)
    return out


def _member(corpus: Path, key: str, modality: str) -> tuple[Path, int]:
    """(shard path, file offset of the first float) of one sample's array."""
    row = next(r for r in read_manifest(corpus).to_pylist() if r["key"] == key)
    path = corpus / row["shard"]
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{tar_key(key)}.{modality}.npy")
    with open(path, "rb") as handle:
        handle.seek(info.offset_data + 8)
        header_len = int.from_bytes(handle.read(2), "little")
    return path, info.offset_data + 10 + header_len


def test_a_clean_corpus_verifies_at_both_depths(corpus, capsys):
    assert data_main(["verify", str(corpus)]) == 0
    assert data_main(["verify", str(corpus), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "full check of" in out and "quick check of" in out and "OK" in out


def test_finite_garbage_and_nan_in_a_payload_are_found_by_the_full_check(corpus, capsys):
    key = read_manifest(corpus).column("key").to_pylist()[3]
    path, at = _member(corpus, key, "text")
    with open(path, "r+b") as handle:  # same size: only the full check can see it
        handle.seek(at)
        handle.write(np.array([np.nan, 7.0], np.float32).tobytes())
    assert data_main(["verify", str(corpus), "--quick"]) == 0
    assert data_main(["verify", str(corpus)]) == 1
    out = capsys.readouterr().out
    rel = path.relative_to(corpus).as_posix()
    assert f"{rel}: sha256" in out
    assert f"{rel} [{key}]: text has 1 non-finite values" in out


def test_a_truncated_shard_and_a_manifest_of_another_corpus_are_named(corpus, tmp_path, capsys):
    shard = sorted((corpus / "train").glob("*.tar"))[1]
    os.truncate(shard, shard.stat().st_size - 512)
    report = verify_corpus(corpus, "quick")
    assert any(p.shard == f"train/{shard.name}" and "shard table says" in p.what for p in report.problems)
    other = tmp_path / "other"
    write_tiny(other, seed=5)
    shutil.copy(other / "manifest.parquet", corpus / "manifest.parquet")
    assert data_main(["verify", str(corpus), "--quick"]) == 1
    out = capsys.readouterr().out
    assert "manifest and shard" in out and "do not match" in out
    assert "invalid header" not in out


def test_training_runs_the_quick_check_at_start(corpus, tmp_path, capsys):
    from carat.train import __main__ as train_main

    shard = sorted((corpus / "valid").glob("*.tar"))[0]
    os.truncate(shard, 1024)
    code = train_main.main(["--preset", "tiny", f"--train.shard_dir={corpus}", "--launcher", "none",
                            f"--train.storage_path={tmp_path / 'runs'}", "--train.synth_if_missing=false"])
    assert code == 1
    assert f"valid/{shard.name}: 1024 bytes" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_writer_rejects_empty_sequences_naming_the_key(tmp_path):
    refs = make_refs({"train": 4})
    refs["train"][2] = SegmentRef(key="train_empty[2]", split="train", lengths=(0, 5, 9))
    with pytest.raises(DataError, match=r"train_empty\[2\].*text is an empty sequence"):
        write_corpus(refs, load_segment, tmp_path, StorageConfig(dtype="float32"), progress=False)


def test_a_missing_manifest_is_a_problem_not_a_traceback(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    assert data_main(["verify", str(tmp_path / "c")]) == 1
    assert "manifest.parquet: " in capsys.readouterr().out


def test_prepare_prints_a_modality_that_was_all_nan_in_the_source(tmp_path, capsys):
    from carat.data.corpus.card import read_card
    from carat.data.corpus.prepare import PrepareConfig, prepare_corpus
    from tests.data_fixtures import make_csd_fixture

    fx = make_csd_fixture(tmp_path / "csd")
    for vid, (feats, iv) in list(fx.videos["visual"].items()):
        fx.videos["visual"][vid] = (np.full_like(feats, np.nan), iv)  # FACET failed on every video
    fx.rewrite("visual")
    out = prepare_corpus(tmp_path / "csd", tmp_path / "out", PrepareConfig(reference=False),
                         StorageConfig(dtype="float32"))
    err = capsys.readouterr().err
    assert "[carat] warning: visual: every value in the source is NaN/inf" in err
    seen = read_card(out)["non_finite"]["seen"]["visual"]
    assert seen["all_non_finite"] == seen["segments"] > 0
