"""Issue 10, part 1: real data is never replaced by synthetic data, and train-time synthesis is safe when
several processes start at once."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from carat.config import load_config
from carat.data.corpus import provision
from carat.errors import DataError
from carat.train import __main__ as train_main


def _cfg(*overrides: str):
    return load_config(preset="tiny", overrides=list(overrides))


def _fake_synthesis(calls: list[Path], delay: float = 0.0):
    def synthesize_corpus(out, synth_cfg, storage_cfg, **_):
        calls.append(Path(out))
        time.sleep(delay)
        (Path(out) / "card.json").write_text("{}")
        (Path(out) / "manifest.parquet").write_text("fake")
        return out
    return synthesize_corpus


@pytest.fixture
def fake_synth(monkeypatch):
    calls: list[Path] = []
    import carat.data.sources.synth as synth

    monkeypatch.setattr(synth, "synthesize_corpus", _fake_synthesis(calls, delay=0.3))
    return calls


def _digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("real") / "corpus"
    synthesize_corpus(out, SynthConfig(scale=0.003, length_scale=0.03, seed=3),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    return out


def test_a_corpus_without_its_manifest_is_an_error_and_is_left_untouched(prepared, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    import shutil

    shutil.copytree(prepared, corpus)
    (corpus / "manifest.parquet").unlink()
    before = _digest(corpus)
    code = train_main.main(["--launcher", "none", f"--train.shard_dir={corpus}",
                            f"--train.storage_path={tmp_path / 'runs'}", "--train.synth_if_missing=true"])
    err = capsys.readouterr().err
    assert code == 1
    assert "no manifest.parquet" in err and "card.json" in err and "shard file(s)" in err
    assert "prepare" in err and "verify" in err
    assert _digest(corpus) == before
    assert not (tmp_path / "runs").exists()


def test_the_default_dir_with_a_card_but_no_manifest_is_never_synthesized_into(tmp_path, monkeypatch, fake_synth):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "card.json").write_text('{"source": "csd"}')
    with pytest.raises(DataError, match="card.json but no manifest.parquet"):
        provision.ensure_shards(_cfg(), Path("shards").resolve())
    assert fake_synth == []
    assert (tmp_path / "shards" / "card.json").read_text() == '{"source": "csd"}'


def test_a_named_empty_dir_is_an_error_even_with_synthesis_allowed(tmp_path, fake_synth):
    named = tmp_path / "mistyped"
    with pytest.raises(DataError, match="only fills the default shard_dir"):
        provision.ensure_shards(_cfg(f"--train.shard_dir={named}", "--train.synth_if_missing=true"), named)
    assert fake_synth == [] and not named.exists()


def test_the_empty_default_dir_is_synthesized_once_by_processes_starting_together(tmp_path, monkeypatch,
                                                                                   fake_synth):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "README.md").write_text("the default corpus lives here\n")  # as shipped
    cfg, errors = _cfg(), []

    def start() -> None:
        try:
            provision.ensure_shards(cfg, (tmp_path / "shards").resolve())
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(fake_synth) == 1  # the others waited on the lock and found the corpus
    assert not (tmp_path / "shards" / provision.SYNTH_IN_PROGRESS).exists()


def test_an_interrupted_train_time_synthesis_is_resumed_but_not_a_prepared_corpus(tmp_path, monkeypatch,
                                                                                  fake_synth):
    monkeypatch.chdir(tmp_path)
    shards = (tmp_path / "shards").resolve()
    (shards / "train").mkdir(parents=True)
    (shards / "train" / "train-000000.tar").write_bytes(b"partial")
    (shards / provision.SYNTH_IN_PROGRESS).write_text("x")
    provision.ensure_shards(_cfg(), shards)
    assert fake_synth == [shards]
    # prepare removes the marker: its (interrupted) output is real data from then on
    from carat.data.corpus.prepare import PrepareConfig, prepare_corpus

    (shards / "manifest.parquet").unlink()
    (shards / "card.json").unlink()
    (shards / provision.SYNTH_IN_PROGRESS).write_text("x")
    with pytest.raises(Exception):
        prepare_corpus(tmp_path / "no-such-input", shards, PrepareConfig())
    assert not (shards / provision.SYNTH_IN_PROGRESS).exists()
    with pytest.raises(DataError, match="no manifest.parquet"):
        provision.ensure_shards(_cfg(), shards)
    assert len(fake_synth) == 1


def test_temporary_names_are_unique_per_call(tmp_path):
    from carat.atomic import temp_path, write_text_atomic

    target = tmp_path / "card.json"
    assert temp_path(target) != temp_path(target)
    assert temp_path(target).name.endswith(".tmp")
    write_text_atomic(target, "ok")
    assert target.read_text() == "ok" and not list(tmp_path.glob("*.tmp"))
