"""Issue 26, data part: corrupted sample bytes never reach training silently (a per-sample hash recorded at
write time, checked by the loader on every read and by the full `verify`); empty splits, concurrent writers,
read-only or missing output paths and malformed ``predict --npz`` inputs are one-line errors naming what to fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings, strategies as st

from carat.data.__main__ import main as data_main
from carat.data.loader.pipeline import build_loader
from carat.data.corpus.shards import MANIFEST_FILE, read_manifest, tar_key
from carat.data.loader.split_index import load_split_index
from carat.data.loader.tar_reader import ShardReader
from carat.data.corpus.verify import verify_corpus
from carat.errors import DataError
from tests.data_fixtures import make_csd_fixture
from tests.test_loader import tiny_cfg
from tests.test_shards import write_tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "corpus"
    write_tiny(out, {"train": 40, "valid": 10}, per_shard=10)
    return out


@pytest.fixture
def corpus(clean: Path, tmp_path: Path) -> Path:
    out = tmp_path / "corpus"
    shutil.copytree(clean, out)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A tiny corpus with every split and a card, as `synth` writes it (what training and inspect read)."""
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("synthetic") / "corpus"
    synthesize_corpus(out, SynthConfig(scale=0.003, length_scale=0.03, seed=3),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    return out


def _rows(corpus: Path) -> list[dict]:
    return read_manifest(corpus).to_pylist()


def _payload_offset(corpus: Path, row: dict, modality: str) -> int:
    """File offset of the first value of one sample's ``modality`` array (members are in sorted name order)."""
    path = corpus / row["shard"]
    with open(path, "rb") as handle:
        pos, end = row["offset"], row["offset"] + row["nbytes"]
        while pos < end:
            header = os.pread(handle.fileno(), 512, pos)
            name = header[:100].split(b"\0", 1)[0].decode()
            size = int(header[124:136].rstrip(b"\0 "), 8)
            if name == f"{tar_key(row['key'])}.{modality}.npy":
                npy = os.pread(handle.fileno(), 10, pos + 512)
                return pos + 512 + 10 + int.from_bytes(npy[8:10], "little")
            pos += 512 + -(-size // 512) * 512
    raise AssertionError(f"no {modality} member for {row['key']}")


def _plant_finite_garbage(corpus: Path, row: dict) -> None:
    """The issue's case: 64 bytes of one audio payload replaced, same size, by finite values (4054.0)."""
    at = _payload_offset(corpus, row, "audio")
    with open(corpus / row["shard"], "r+b") as handle:
        handle.seek(at)
        handle.write(np.full(16, 4054.0, np.float32).tobytes())


# ------------------------------------------------------------------------------------ per-sample hashes


def test_the_manifest_records_a_hash_of_each_samples_bytes(clean: Path) -> None:
    table = pq.read_table(clean / MANIFEST_FILE)
    assert table.schema.metadata[b"carat.sample_hash"] == b"xxh3_64"
    for row in table.to_pylist():
        data = (clean / row["shard"]).read_bytes()[row["offset"]: row["offset"] + row["nbytes"]]
        assert row["sample_hash"] == xxhash.xxh3_64_intdigest(data)


@pytest.mark.parametrize("workers", [0, 1])
def test_finite_garbage_in_a_payload_stops_the_loader_naming_shard_and_key(corpus: Path, workers: int) -> None:
    victim = _rows(corpus)[13]
    _plant_finite_garbage(corpus, victim)
    assert verify_corpus(corpus, "quick").ok  # what training checks at start cannot see it
    loader = build_loader(corpus, "train", tiny_cfg(num_workers=workers), rank=0, world_size=1, epoch=0,
                          train=True)
    with pytest.raises(DataError) as err:
        list(loader)
    message = str(err.value)
    assert "\n" not in message  # one line, also when a DataLoader worker found it
    assert f"{victim['shard']}: sample {victim['key']!r}" in message and "hash" in message


def test_a_corrupted_sample_is_skipped_counted_and_named_under_on_error_skip(corpus: Path) -> None:
    victim = _rows(corpus)[13]
    _plant_finite_garbage(corpus, victim)
    loader = build_loader(corpus, "train", tiny_cfg(on_error="skip"), rank=0, world_size=1, epoch=0, train=True)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        batches = list(loader)
    assert len(batches) == len(loader) and loader.skipped == 1
    shard, key, why = loader.skipped_samples[0]
    assert shard.endswith(victim["shard"]) and key == victim["key"] and "hash" in why
    assert victim["key"] not in [k for b in batches for k in b.keys]


def test_the_full_verify_names_each_changed_sample(corpus: Path, capsys) -> None:
    victim = _rows(corpus)[13]
    _plant_finite_garbage(corpus, victim)
    assert data_main(["verify", str(corpus)]) == 1
    out = capsys.readouterr().out
    assert f"{victim['shard']} [{victim['key']}]: bytes differ from the hash" in out


def test_training_stops_on_a_corrupted_payload_the_quick_check_cannot_see(synthetic: Path, tmp_path: Path,
                                                                          capsys) -> None:
    from carat.train import __main__ as train_main

    corpus = tmp_path / "corpus"
    shutil.copytree(synthetic, corpus)
    victim = next(r for r in _rows(corpus) if r["split"] == "train")
    _plant_finite_garbage(corpus, victim)
    code = train_main.main(["--preset", "tiny", f"--train.shard_dir={corpus}", "--launcher", "none",
                            f"--train.storage_path={tmp_path / 'runs'}", "--train.synth_if_missing=false",
                            "--train.epochs=1", "--loader.num_workers=1"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"sample {victim['key']!r}" in err and "hash" in err


@pytest.fixture(scope="module")
def flip_target(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flips") / "corpus"
    write_tiny(out, {"train": 12}, per_shard=12)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=st.integers(0, 11), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_flipped_byte_of_a_sample_is_detected_and_named(flip_target: Path, sample: int, where: float,
                                                            mask: int) -> None:
    index = load_split_index(flip_target, "train")
    row = int(np.flatnonzero(index.offsets == sorted(index.offsets)[sample])[0])
    at = int(index.offsets[row] + int(where * index.nbytes[row]))
    path = flip_target / index.shards[int(index.shard_ids[row])]
    with open(path, "r+b") as handle:
        original = os.pread(handle.fileno(), 1, at)
        os.pwrite(handle.fileno(), bytes([original[0] ^ mask]), at)
        try:
            reader = ShardReader(flip_target, index)
            found, skips = reader.read(np.arange(len(index)))
            reader.close()
        finally:
            os.pwrite(handle.fileno(), original, at)
    assert [key for _, key, _ in skips] == [index.keys[row]]
    assert "hash" in skips[0][2] and skips[0][0].endswith(index.shards[int(index.shard_ids[row])])
    assert sorted(s.key for s in found) == sorted(k for k in index.keys if k != index.keys[row])


def test_a_corpus_written_before_hashes_loads_with_a_one_time_note(corpus: Path, capsys) -> None:
    table = pq.read_table(corpus / MANIFEST_FILE)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"carat.sample_hash"}
    old = table.drop_columns(["sample_hash"]).replace_schema_metadata(meta)
    pq.write_table(old, corpus / MANIFEST_FILE)
    for epoch in (0, 1):
        loader = build_loader(corpus, "train", tiny_cfg(), rank=0, world_size=1, epoch=epoch, train=True)
        assert sum(len(b) for b in loader) == 40
    err = capsys.readouterr().err
    assert err.count("no per-sample hashes") == 1 and str(corpus) in err
    assert verify_corpus(corpus, "full").ok


# ------------------------------------------------------------------------------------------ empty splits


def test_prepare_refuses_an_empty_split_before_writing_anything(tmp_path: Path, capsys) -> None:
    make_csd_fixture(tmp_path / "src", per_split={"train": 3, "valid": 0, "test": 2})
    out = tmp_path / "out"
    code = data_main(["prepare", "--source", "csd", "--input", str(tmp_path / "src"), "--out", str(out),
                      "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: ") and "split 'valid' has no usable segments" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_the_writer_refuses_an_empty_split(tmp_path: Path) -> None:
    from carat.data.corpus.shards import StorageConfig, write_corpus
    from tests.test_shards import load_segment, make_refs

    refs = make_refs({"train": 4})
    refs["valid"] = []
    with pytest.raises(DataError, match="split 'valid' has no segments"):
        write_corpus(refs, load_segment, tmp_path / "c", StorageConfig(dtype="float32"), progress=False)
    assert not (tmp_path / "c").exists()


def test_prepare_prints_what_on_error_skip_left_out(tmp_path: Path, capsys) -> None:
    fx = make_csd_fixture(tmp_path / "src")
    vid = next(iter(fx.expected.values()))["video_id"]
    feats, intervals = fx.videos["audio"][vid]
    fx.videos["audio"][vid] = (feats[:, :70], intervals)  # one video's audio has the wrong width
    fx.rewrite("audio")
    out = tmp_path / "out"
    assert data_main(["prepare", "--source", "csd", "--input", str(tmp_path / "src"), "--out", str(out),
                      "--on-error", "skip", "--no-progress", "--no-reference"]) == 0
    err = capsys.readouterr().err
    assert "skipped 6 segments" in err and "wrong feature dims in the audio file: 3" in err
    assert "video in no fold: 3" in err and f"issues.skipped in {out / 'card.json'}" in err


# ------------------------------------------------------------------------------------------------ locks


def _synth_args(out: Path) -> list[str]:
    return ["synth", "--out", str(out), "--scale", "0.003", "--length-scale", "0.03", "--dtype", "float32",
            "--no-reference", "--no-progress"]


def test_a_second_writer_into_one_corpus_directory_is_refused(tmp_path: Path, capsys) -> None:
    from carat.data.corpus.outdir import CORPUS_LOCK
    from carat.locks import FileLock

    out = tmp_path / "corpus"
    with FileLock(out / CORPUS_LOCK, what="test"):
        assert data_main(_synth_args(out)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and err[1].startswith("error: ") and f"corpus directory {out} is in use" in err[1]
        make_csd_fixture(tmp_path / "src")
        assert data_main(["prepare", "--source", "csd", "--input", str(tmp_path / "src"), "--out", str(out)]) == 1
        assert f"corpus directory {out} is in use" in capsys.readouterr().err
    assert not (out / MANIFEST_FILE).exists()


def test_two_synths_started_together_into_one_out_leave_one_complete_corpus(tmp_path: Path) -> None:
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus
    from carat.locks import LockHeld

    out, results = tmp_path / "corpus", []
    barrier = threading.Barrier(2)

    def synth(seed: int) -> None:
        barrier.wait()
        try:
            synthesize_corpus(out, SynthConfig(scale=0.003, length_scale=0.03, seed=seed),
                              StorageConfig(dtype="float32"), reference=False)
            results.append(("wrote", seed))
        except LockHeld as err:
            results.append(("refused", str(err)))

    threads = [threading.Thread(target=synth, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["refused", "wrote"]
    assert verify_corpus(out, "full").ok


# ------------------------------------------------------------------------------ read-only / missing paths


def _run_read_only(read_only: list[Path], argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m <argv>`` with ``read_only`` directories unwritable: a read-only bind mount in a private
    mount namespace when root (permissions do not stop root), else the write bits removed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", *argv]
    if os.geteuid() != 0:
        for d in read_only:
            d.chmod(0o555)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
        finally:
            for d in read_only:
                d.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to make a read-only mount as root")
    mounts = " && ".join(f"mount --bind '{d}' '{d}' && mount -o remount,ro,bind '{d}'" for d in read_only)
    script = f"{mounts} && exec " + " ".join(f"'{c}'" for c in cmd)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"{mounts} && true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.decode().strip()}")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error") or "Traceback" in line
             or "error:" in line]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_synth_into_a_read_only_directory_is_one_line_naming_the_path(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    proc = _run_read_only([parent], ["carat.data", *_synth_args(parent / "corpus")])
    line = _one_error_line(proc)
    assert str(parent / "corpus") in line and ("Read-only" in line or "Permission denied" in line)


def test_prepare_into_a_read_only_directory_is_one_line_naming_the_path(tmp_path: Path) -> None:
    make_csd_fixture(tmp_path / "src")
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = _run_read_only([ro], ["carat.data", "prepare", "--source", "csd", "--input", str(tmp_path / "src"),
                                 "--out", str(ro), "--no-progress"])
    assert str(ro) in _one_error_line(proc)


def test_an_output_path_under_a_file_is_one_line_naming_the_path(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "corpus"
    assert data_main(_synth_args(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(out) in err[-1] and len(err) == 2


def test_inspect_works_on_a_read_only_corpus_and_says_where_plots_went(synthetic: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(synthetic, corpus)
    proc = _run_read_only([corpus], ["carat.data", "inspect", str(corpus)])
    assert proc.returncode == 0, proc.stderr
    assert "padding efficiency" in proc.stdout
    assert f"plots not written: {corpus / 'plots'}" in proc.stdout + proc.stderr
    assert not (corpus / "plots").exists()
    proc = _run_read_only([corpus], ["carat.data", "inspect", str(corpus), "--plots", str(corpus / "p")])
    assert str(corpus / "p") in _one_error_line(proc)


def test_train_with_a_read_only_shard_or_run_directory_is_one_line(synthetic: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"  # the default train.shard_dir, relative to the working directory
    shards.mkdir()
    train = ["carat.train", "--preset", "tiny", "--launcher", "none", f"--train.storage_path={tmp_path / 'runs'}"]
    line = _one_error_line(_run_read_only([shards], train, cwd=tmp_path))
    assert line.startswith("carat.train: error: ") and str(shards.resolve()) in line
    runs = tmp_path / "runs"
    runs.mkdir()
    line = _one_error_line(_run_read_only([runs], [*train, f"--train.shard_dir={synthetic}", "--train.epochs=1"]))
    assert line.startswith("carat.train: error: ") and str(runs.resolve()) in line


# ---------------------------------------------------------------------------------------- predict --npz


def _npz(path: Path, n: int = 3, **replace) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for m, dim, width in (("text", 300, 5), ("visual", 35, 7), ("audio", 74, 9)):
        arrays[m] = rng.standard_normal((n, width, dim)).astype(np.float32)
        arrays[f"{m}_lengths"] = np.array([width, 2, 1][:n], dtype=np.int64)
    arrays["ids"] = np.array([f"s{i}" for i in range(n)])
    arrays.update(replace)
    np.savez(path, **arrays)
    return path


def test_npz_object_arrays_and_non_integer_lengths_are_errors_naming_the_array(tmp_path: Path) -> None:
    from carat.predict import npz_batches

    assert len(npz_batches(_npz(tmp_path / "ok.npz"))) == 1
    objects = np.empty(3, dtype=object)
    objects[:] = [np.zeros((2, 74)), np.zeros((3, 74)), np.zeros((1, 74))]
    with pytest.raises(DataError, match=r"'audio' is an object array"):
        npz_batches(_npz(tmp_path / "obj.npz", audio=objects))
    with pytest.raises(DataError, match=r"'ids' is an object array"):
        npz_batches(_npz(tmp_path / "ids.npz", ids=np.array(["a", 1, None], dtype=object)))
    with pytest.raises(DataError, match=r"'visual_lengths'.*sample s1.*2\.5.*not a whole number"):
        npz_batches(_npz(tmp_path / "float.npz", visual_lengths=np.array([7.0, 2.5, 1.0])))
    with pytest.raises(DataError, match=r"'text' has dtype <U"):
        npz_batches(_npz(tmp_path / "str.npz", text=np.full((3, 5, 300), "x")))
    whole = npz_batches(_npz(tmp_path / "whole.npz", visual_lengths=np.array([7.0, 2.0, 1.0])))
    assert whole[0].visual_mask.sum(1).tolist() == [7, 2, 1]


def test_predict_names_a_bad_npz_array_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import carat.inference
    from carat.predict import main as predict_main

    monkeypatch.setattr(carat.inference, "load_model", lambda *args: (None, None))  # the .npz is what is tested
    objects = np.empty(3, dtype=object)
    objects[:] = [np.zeros((2, 74))] * 3
    code = predict_main(["--checkpoint", str(tmp_path / "no-model"), "--npz", str(_npz(tmp_path / "o.npz",
                         audio=objects)), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "'audio' is an object array" in err[0]


def test_predictions_to_an_unwritable_place_are_one_error_naming_the_path(tmp_path: Path) -> None:
    from carat.predict import write_predictions

    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "preds.json"
    with pytest.raises(DataError, match=f"{out}: cannot write the predictions there"):
        write_predictions(out, ["a"], np.zeros((1, 6)), 0.5)
