"""Shard writer: layout, determinism, atomic resume, validation and manifest checks (tiny corpora)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES, Segment, SegmentRef
from carat.data.corpus.verify import require_verified, verify_corpus
from carat.data.corpus.shards import (
    FLOAT16_MAX, MANIFEST_FILE, SHARDS_FILE, StorageConfig, read_manifest, read_shard_table, tar_key,
    write_corpus,
)
from carat.errors import ConfigError, DataError


# ------------------------------------------------------------------------------ tiny corpus generator


def make_refs(n_by_split: dict[str, int], seed: int = 0, max_audio: int = 120) -> dict[str, list[SegmentRef]]:
    """Random refs with correlated lengths (a 'duration' drives all three), some keys with '.' in them."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[SegmentRef]] = {}
    for split, n in n_by_split.items():
        refs = []
        for i in range(n):
            audio = int(rng.integers(4, max_audio))
            lengths = (max(1, audio // 30 + int(rng.integers(0, 3))), max(1, audio // 3), audio)
            key = f"{split}.vid{i % 7}[{i}]" if i % 5 == 0 else f"{split}_vid{i % 7}[{i}]"
            refs.append(SegmentRef(key=key, split=split, lengths=lengths))
        out[split] = refs
    return out


def load_segment(ref: SegmentRef, scale: float = 3.0) -> Segment:
    """Deterministic features from the key (same ref -> same values), scale ~ real feature magnitudes."""
    rng = np.random.default_rng(_key_seed(ref.key))
    feats = {m: (rng.standard_normal((n, FEATURE_DIMS[m])) * scale).astype(np.float32)
             for m, n in zip(MODALITIES, ref.lengths)}
    labels = (rng.random(len(EMOTIONS)) < 0.4).astype(np.uint8)
    intensities = labels * rng.choice([0.333, 0.667, 1.0, 2.0], size=len(EMOTIONS))
    intensities = intensities.astype(np.float32)
    if _key_seed(ref.key) % 3 == 0:
        intensities[:] = np.nan
    return Segment(key=ref.key, video_id=ref.key.split("[")[0], split=ref.split, labels=labels,
                   intensities=intensities, sentiment=float(rng.uniform(-3, 3)), **feats)


def _key_seed(key: str) -> int:
    return int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little") % (2**32)


def write_tiny(out: Path, n_by_split: dict[str, int] | None = None, dtype: str = "float32",
               per_shard: int = 8, seed: int = 0, max_audio: int = 120, load=load_segment):
    refs = make_refs(n_by_split or {"train": 30, "valid": 10}, seed=seed, max_audio=max_audio)
    storage = StorageConfig(dtype=dtype, shard_max_samples=per_shard)
    return refs, write_corpus(refs, load, out, storage, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".journal" not in p.parts}


# ------------------------------------------------------------------------------------------- tests


def test_layout_manifest_and_tar_contents(tmp_path: Path) -> None:
    refs, index = write_tiny(tmp_path)
    assert index.counts == {"train": 30, "valid": 10}
    assert [s.shard for s in index.shards][:2] == ["train/train-000000.tar", "train/train-000001.tar"]
    manifest = read_manifest(tmp_path)
    assert manifest.num_rows == 40
    assert manifest.schema.field("len_audio").type == "int32"
    rows = manifest.to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    sort_keys = [(r["len_audio"], r["len_visual"], r["len_text"], r["key"]) for r in train]
    assert sort_keys == sorted(sort_keys)  # sorted by SegmentRef.sort_key
    # Tar members: fixed headers, sorted names, one sample's bytes at [offset, offset + nbytes).
    first = train[0]
    data = (tmp_path / first["shard"]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data[first["offset"]:first["offset"] + first["nbytes"]])) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        k = tar_key(first["key"])
        assert names == sorted([f"{k}.audio.npy", f"{k}.json", f"{k}.text.npy", f"{k}.visual.npy"])
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o644
                   for m in members)
        meta = json.loads(tar.extractfile(f"{k}.json").read())
        audio = np.load(io.BytesIO(tar.extractfile(f"{k}.audio.npy").read()), allow_pickle=False)
    seg = load_segment(next(r for r in refs["train"] if r.key == first["key"]))
    assert meta["key"] == first["key"] and meta["labels"] == seg.labels.tolist() == first["labels"]
    assert meta["lengths"] == {"text": first["len_text"], "visual": first["len_visual"], "audio": first["len_audio"]}
    np.testing.assert_array_equal(audio, seg.audio)  # float32 storage: bit-identical
    assert "." not in k.split("%2E")[0] or "%2E" in k


def test_writes_are_deterministic(tmp_path: Path) -> None:
    write_tiny(tmp_path / "a")
    write_tiny(tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_interrupted_write_resumes_byte_identical(tmp_path: Path) -> None:
    write_tiny(tmp_path / "ref")
    calls = {"n": 0}

    def flaky(ref: SegmentRef) -> Segment:
        calls["n"] += 1
        if calls["n"] == 21:  # mid-way through the third shard of train
            raise RuntimeError("simulated crash")
        return load_segment(ref)

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_tiny(tmp_path / "run", load=flaky)
    run = tmp_path / "run"
    assert not (run / MANIFEST_FILE).exists()  # an interrupted corpus is never advertised as complete
    assert not list(run.rglob("*.tmp"))  # the partial shard was removed
    # Plant a corrupt "complete" shard: resume must not trust it (checksum differs from its journal).
    (run / "train/train-000001.tar").write_bytes(b"garbage")
    loads = {"n": 0}

    def counting(ref: SegmentRef) -> Segment:
        loads["n"] += 1
        return load_segment(ref)

    _, index = write_tiny(run, load=counting)
    assert index.shards_reused == 1  # shard 0 kept; shard 1 rewritten (corrupt), the rest written
    assert loads["n"] == 40 - 8
    assert _files(run) == _files(tmp_path / "ref")
    require_verified(run, "full")


def test_rerun_with_new_plan_removes_stale_shards(tmp_path: Path) -> None:
    write_tiny(tmp_path, per_shard=4)
    write_tiny(tmp_path, per_shard=16)
    assert len(list((tmp_path / "train").glob("*.tar"))) == 2
    require_verified(tmp_path, "full")


def test_float16_overflow_is_an_error_naming_key_and_modality(tmp_path: Path) -> None:
    def loud(ref: SegmentRef) -> Segment:
        seg = load_segment(ref)
        if ref.key.endswith("[3]"):
            seg.audio[0, 0] = 2 * FLOAT16_MAX
        return seg

    with pytest.raises(DataError, match=r"train_vid3\[3\].*audio.*float16"):
        write_tiny(tmp_path / "f16", dtype="float16", load=loud)
    _, index = write_tiny(tmp_path / "f32", dtype="float32", load=loud)  # float32 holds it
    assert index.counts["train"] == 30


@pytest.mark.parametrize("corruption, message", [
    (lambda s: setattr(s, "audio", s.audio[:-1]), r"audio has \d+ frames but its ref says"),
    (lambda s: setattr(s, "visual", np.zeros((len(s.visual), 34), np.float32)), r"visual has shape"),
    (lambda s: s.text.__setitem__((0, 0), np.nan), r"text has 1 non-finite"),
    (lambda s: s.labels.__setitem__(0, 2), r"labels"),
    (lambda s: setattr(s, "key", "other"), r"does not match its ref"),
])
def test_bad_segments_name_the_key(tmp_path: Path, corruption, message) -> None:
    def bad(ref: SegmentRef) -> Segment:
        seg = load_segment(ref)
        if ref.key.endswith("[7]"):
            corruption(seg)
        return seg

    with pytest.raises(DataError, match=message):
        write_tiny(tmp_path, load=bad)


def test_duplicate_keys_and_wrong_split_rejected(tmp_path: Path) -> None:
    refs = make_refs({"train": 3})
    dup = {"train": refs["train"] + [refs["train"][0]]}
    with pytest.raises(DataError, match="duplicate segment key"):
        write_corpus(dup, load_segment, tmp_path, StorageConfig(), progress=False)
    with pytest.raises(DataError, match="unknown split"):
        write_corpus({"dev": refs["train"]}, load_segment, tmp_path, StorageConfig(), progress=False)


def test_storage_config_validation() -> None:
    with pytest.raises(ConfigError, match="storage.dtype"):
        StorageConfig(dtype="bfloat16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shard_max_bytes"):
        StorageConfig(shard_max_bytes=10)
    with pytest.raises(ConfigError, match="shard_max_samples"):
        StorageConfig(shard_max_samples=0)


def test_shard_max_bytes_respected(tmp_path: Path) -> None:
    refs = make_refs({"train": 40}, max_audio=400)
    storage = StorageConfig(dtype="float16", shard_max_bytes=256 * 1024)
    index = write_corpus(refs, load_segment, tmp_path, storage, progress=False)
    assert len(index.shards) > 1
    assert all(s.bytes <= 256 * 1024 for s in index.shards)
    assert sum(s.num_samples for s in index.shards) == 40


def test_verify_names_the_bad_file(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    report = verify_corpus(tmp_path, "full")
    assert report.ok and report.shards == len(read_shard_table(tmp_path))
    shard = tmp_path / "train/train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    require_verified(tmp_path, "quick")  # sizes and tar headers: a flipped payload byte is the full check's
    with pytest.raises(DataError, match="train/train-000002.tar.*sha256"):
        require_verified(tmp_path, "full")
    shard.write_bytes(bytes(data[:-1024]))
    with pytest.raises(DataError, match="train/train-000002.tar.*bytes, the shard table says"):
        require_verified(tmp_path, "quick")
    shard.unlink()
    with pytest.raises(DataError, match="train/train-000002.tar.*shard file missing"):
        require_verified(tmp_path, "quick")
    (tmp_path / SHARDS_FILE).unlink()
    with pytest.raises(DataError, match="shards.parquet"):
        require_verified(tmp_path, "quick")


def test_unlisted_shard_detected(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    (tmp_path / "valid/valid-000009.tar").write_bytes(b"")
    with pytest.raises(DataError, match="valid/valid-000009.tar.*shard not listed"):
        require_verified(tmp_path, "quick")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(crash_at=st.integers(1, 40))
def test_a_write_interrupted_at_any_sample_resumes_to_the_uninterrupted_corpus(tmp_path: Path, crash_at: int):
    """Property: wherever the writer dies (any of the 40 samples), the corpus is never advertised complete, and
    the rerun's files are byte for byte those of a write that never stopped."""
    reference = tmp_path / "ref"
    if not reference.exists():
        write_tiny(reference)
    run = tmp_path / f"run-{crash_at}"
    calls = {"n": 0}

    def dies(ref: SegmentRef) -> Segment:
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise RuntimeError("simulated crash")
        return load_segment(ref)

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_tiny(run, load=dies)
    assert not (run / MANIFEST_FILE).exists()
    write_tiny(run)
    assert _files(run) == _files(reference)
