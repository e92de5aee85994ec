"""Planner and loader: exact coverage across ranks x workers, token budget, equal step counts, fillers,
determinism, corrupt data and manifest mismatches. Tiny corpora written by tests.test_shards' generator."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from carat.data.loader.batch import CollatedBatch
from carat.data.loader.collate import DecodedSample, collate, nonfinite_rows, to_batch
from carat.data.loader.pipeline import PlannedBatches, build_loader
from carat.data.loader.loader_config import LoaderConfig
from carat.data.loader.plan import FILLER, batch_cost, plan_batches, plan_epoch
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES
from carat.data.corpus.shards import tar_key
from carat.data.loader.tar_reader import fast_tar_samples
from carat.errors import ConfigError, DataError
from tests.test_shards import load_segment, make_refs, write_tiny

WEIGHTS = (1.0, 1.0, 1.0)


def tiny_cfg(**kw) -> LoaderConfig:
    base = dict(token_budget=400, max_batch_size=8, num_workers=0, sort_jitter=0.05)
    base.update(kw)
    return LoaderConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    refs, _ = write_tiny(root, {"train": 60, "valid": 23}, per_shard=20)  # 3 train shards, 2 valid shards
    return root, {r.key: r for split in refs.values() for r in split}


def _worker_batches(loader, workers: int) -> list[list[CollatedBatch]]:
    """What each DataLoader worker of this rank would produce (in-process, no subprocesses)."""
    ds: PlannedBatches = loader.dataset
    return [list(ds.iter_worker(w, workers)) for w in range(workers)]


def _real_keys(parts: CollatedBatch) -> list[str]:
    return [k for k, w in zip(parts.keys, parts.weight.tolist()) if w > 0]


# ------------------------------------------------------------------------------------------- planner


def test_plan_batches_covers_every_sample_and_respects_budget() -> None:
    rng = np.random.default_rng(0)
    audio = np.sort(rng.integers(10, 900, size=500))
    lengths = np.stack([audio // 30 + 1, audio // 3, audio], axis=1)
    batches = plan_batches(lengths, token_budget=4000, max_batch_size=16, weights=WEIGHTS)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 16
        assert batch_cost(lengths[b], WEIGHTS) <= 4000 or len(b) == 1
    assert max(len(b) for b in batches) == 16 and min(len(b) for b in batches) < 8  # short ride big


def test_oversized_sample_rides_alone_and_min_batch_size_overrides_budget() -> None:
    lengths = np.array([[1, 1, 10], [1, 1, 10], [1, 1, 500], [1, 1, 20]])
    batches = plan_batches(lengths, token_budget=100, max_batch_size=8, weights=WEIGHTS)
    assert [b.tolist() for b in batches] == [[0, 1], [2], [3]]
    batches = plan_batches(lengths, token_budget=100, max_batch_size=8, weights=WEIGHTS, min_batch_size=2)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3]]


def test_modality_weights_change_the_cost() -> None:
    lengths = np.array([[50, 1, 10]] * 4)
    assert batch_cost(lengths, (1.0, 1.0, 1.0)) == 200
    assert batch_cost(lengths, (0.1, 1.0, 1.0)) == 40


def test_train_plan_is_deterministic_balanced_and_varies_by_epoch() -> None:
    rng = np.random.default_rng(1)
    lengths = np.sort(rng.integers(10, 2000, size=(700, 3)), axis=0)
    kw = dict(token_budget=8000, max_batch_size=32, weights=WEIGHTS, world_size=4, train=True, seed=3,
              sort_jitter=0.05)
    a, b, c = plan_epoch(lengths, epoch=0, **kw), plan_epoch(lengths, epoch=0, **kw), plan_epoch(lengths, epoch=1, **kw)
    assert a.schedule == b.schedule and all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches))
    assert a.schedule != c.schedule
    assert {tuple(x.tolist()) for x in a.batches} != {tuple(x.tolist()) for x in c.batches}  # jitter
    assert len({len(s) for s in a.schedule}) == 1
    assert a.num_samples_global + a.dropped_samples == 700
    assert len(a.batches) - len(a.dropped) == 4 * a.steps
    # The W batches of one step have near-equal cost (ranks wait for the slowest one).
    costs = np.array([[batch_cost(lengths[a.batches[a.schedule[r][s]]], WEIGHTS) for r in range(4)]
                      for s in range(a.steps)])
    assert np.median(costs.min(axis=1) / costs.max(axis=1)) > 0.8


def test_eval_plan_pads_with_fillers() -> None:
    lengths = np.stack([np.arange(1, 31)] * 3, axis=1)
    plan = plan_epoch(lengths, token_budget=40, max_batch_size=4, weights=WEIGHTS, world_size=4, train=False)
    assert len({len(s) for s in plan.schedule}) == 1
    real = [i for s in plan.schedule for b in s if b != FILLER for i in plan.batches[b].tolist()]
    assert sorted(real) == list(range(30))
    fillers = sum(b == FILLER for s in plan.schedule for b in s)
    assert fillers == 4 * plan.steps - len(plan.batches) > 0
    assert plan.filler_index == 0  # the cheapest sample


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("train", [True, False])
def test_round_trip_across_ranks_and_workers(corpus, train: bool) -> None:
    root, refs = corpus
    cfg = tiny_cfg(remainder="pad")
    seen: Counter[str] = Counter()
    lengths = set()
    for rank in range(4):
        loader = build_loader(root, "train", cfg, rank=rank, world_size=4, epoch=2, train=train)
        per_worker = _worker_batches(loader, 2)
        lengths.add(len(loader))
        assert sum(len(w) for w in per_worker) == len(loader)
        for parts in (p for w in per_worker for p in w):
            assert parts.skipped == [] and parts.ring_slot is None
            batch = to_batch(parts)
            for i, key in enumerate(batch.keys):
                seg = load_segment(refs[key])
                for m in MODALITIES:
                    n = len(getattr(seg, m))
                    mask = getattr(batch, f"{m}_mask")[i]
                    assert mask.sum() == n and not mask[n:].any()
                    feats = getattr(batch, m)[i]
                    np.testing.assert_array_equal(feats[:n].numpy(), getattr(seg, m))  # bit-identical
                    assert not feats[n:].any()
                np.testing.assert_array_equal(batch.labels[i].numpy(), seg.labels.astype(np.float32))
                np.testing.assert_array_equal(batch.intensities[i].numpy(), seg.intensities)
            seen.update(_real_keys(parts))
        assert loader.num_samples == sum(len(_real_keys(p)) for w in per_worker for p in w)
    assert len(lengths) == 1  # equal step counts on every rank
    assert seen == Counter(refs[k].key for k in refs if refs[k].split == "train")  # each exactly once


def test_real_dataloader_workers_keep_plan_order(corpus) -> None:
    root, _ = corpus
    cfg = tiny_cfg(num_workers=2)
    loader = build_loader(root, "train", cfg, rank=1, world_size=2, epoch=0, train=True)
    in_process = [p.keys for p in loader.dataset.iter_worker(0, 1)]
    batches = list(loader)
    assert [b.keys for b in batches] == in_process
    assert len(batches) == len(loader)
    assert batches[0].text.dtype == torch.float32 and batches[0].text_mask.dtype == torch.bool


def _assert_same_batches(got: list, want: list) -> None:
    assert [b.keys for b in got] == [b.keys for b in want]
    for a, b in zip(got, want):
        for name in ("text", "visual", "audio", "text_mask", "visual_mask", "audio_mask", "labels", "weight"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("reuse", [True, False])
def test_worker_batches_equal_in_process_and_own_their_memory(corpus, reuse: bool) -> None:
    """Through real workers (reused shared rings, or torch's fresh segments), every batch is bit-identical to
    the in-process one. All batches are held until the end: with prefetch_factor=1 each worker's ring has only
    2 slots, reused many times, so a Batch still viewing a slot would show a later batch's data."""
    root, _ = corpus
    cfg = tiny_cfg(token_budget=300, max_batch_size=4, prefetch_factor=1, reuse_buffers=reuse)
    want = list(build_loader(root, "train", cfg, rank=0, world_size=1, epoch=3, train=True))
    loader = build_loader(root, "train", LoaderConfig(**{**cfg.__dict__, "num_workers": 2}), rank=0,
                          world_size=1, epoch=3, train=True)
    got = list(loader)
    assert len(got) == len(loader) > 8  # several trips round each 2-slot ring
    _assert_same_batches(got, want)
    again = list(loader)  # a second epoch pass makes fresh rings and workers
    _assert_same_batches(again, want)


def test_stopping_early_releases_the_workers(corpus) -> None:
    """A consumer that stops mid-epoch (break) shuts the workers down; the loader can be iterated again."""
    root, _ = corpus
    cfg = tiny_cfg(token_budget=300, max_batch_size=4, prefetch_factor=1, num_workers=2)
    loader = build_loader(root, "train", cfg, rank=0, world_size=1, epoch=0, train=True)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert len(list(loader)) == len(loader)


def test_stored_feature_dtype(tmp_path: Path) -> None:
    """feature_dtype='stored' yields the shards' float16 (cast later, on the device); values match float32."""
    write_tiny(tmp_path, {"train": 24}, dtype="float16")
    for workers in (0, 2):
        kw = dict(token_budget=600, max_batch_size=8, num_workers=workers)
        half = list(build_loader(tmp_path, "train", tiny_cfg(feature_dtype="stored", **kw), rank=0, world_size=1,
                                 epoch=0, train=False))
        full = list(build_loader(tmp_path, "train", tiny_cfg(**kw), rank=0, world_size=1, epoch=0, train=False))
        assert half[0].audio.dtype == torch.float16 and full[0].audio.dtype == torch.float32
        for a, b in zip(half, full):
            assert a.keys == b.keys
            for m in MODALITIES:
                assert torch.equal(getattr(a, m).float(), getattr(b, m))
    with pytest.raises(ConfigError, match="loader.feature_dtype"):
        LoaderConfig(feature_dtype="bfloat16")  # type: ignore[arg-type]


def test_uneven_shards_more_workers_than_shards(corpus) -> None:
    root, _ = corpus  # 3 train shards, 4 ranks x 2 workers = 8 readers
    cfg = tiny_cfg(token_budget=1200, max_batch_size=16)
    counts = []
    for rank in range(4):
        loader = build_loader(root, "train", cfg, rank=rank, world_size=4, epoch=0, train=True)
        per_worker = _worker_batches(loader, 2)
        counts.append((len(loader), sum(len(w) for w in per_worker)))
    assert len(set(counts)) == 1 and counts[0][0] == counts[0][1] > 0
    assert loader.dropped_batches == len(loader.plan.batches) - 4 * len(loader)


def test_token_budget_respected_in_loaded_batches(corpus) -> None:
    root, _ = corpus
    cfg = tiny_cfg()
    loader = build_loader(root, "train", cfg, rank=0, world_size=1, epoch=0, train=True)
    for parts in loader.dataset.iter_worker(0, 1):
        peak = int(parts.lengths.max())  # the longest modality of the batch's longest sample
        assert len(parts.keys) * peak <= cfg.token_budget or len(parts.keys) == 1
        assert len(parts.keys) <= cfg.max_batch_size


def test_eval_every_sample_once_with_zero_weight_fillers(corpus) -> None:
    root, refs = corpus
    cfg = tiny_cfg(token_budget=2000, max_batch_size=16)
    keys: list[str] = []
    fillers = 0
    steps = set()
    for rank in range(5):
        loader = build_loader(root, "valid", cfg, rank=rank, world_size=5, epoch=0, train=False)
        steps.add(len(loader))
        for parts in loader.dataset.iter_worker(0, 1):
            keys += _real_keys(parts)
            if parts.weight.sum() == 0:
                fillers += 1
                assert len(parts.keys) == 1
        assert loader.num_fillers == sum(1 for b in loader.dataset.slots if b == FILLER)
    assert len(steps) == 1 and fillers > 0
    assert sorted(keys) == sorted(k for k, r in refs.items() if r.split == "valid")


def test_determinism_per_seed_and_epoch(corpus) -> None:
    root, _ = corpus

    def keys(epoch: int, seed: int = 0) -> list[list[str]]:
        loader = build_loader(root, "train", tiny_cfg(seed=seed), rank=0, world_size=2, epoch=epoch, train=True)
        return [p.keys for p in loader.dataset.iter_worker(0, 1)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert keys(0, seed=1) != keys(0)


# ------------------------------------------------------------------------------------- bad data


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _victim(root: Path, shard: str = "train/train-000001.tar", position: int = 3) -> dict:
    rows = pq.read_table(root / "manifest.parquet").to_pylist()
    return next(r for r in rows if r["shard"] == shard and r["position"] == position)


@pytest.fixture()
def fresh(tmp_path: Path) -> Path:
    write_tiny(tmp_path, {"train": 60, "valid": 10}, per_shard=20)
    return tmp_path


def test_corrupt_header_raises_naming_shard_and_key(fresh: Path) -> None:
    victim = _victim(fresh)
    _corrupt(fresh / victim["shard"], victim["offset"] + 148, b"XXXXXXXX")  # bad header checksum
    pattern = rf"train-000001.tar: sample {victim['key']!r}".replace("[", r"\[")
    for workers in (0, 1):  # a worker's DataError reaches the training process as a DataError
        loader = build_loader(fresh, "train", tiny_cfg(num_workers=workers), rank=0, world_size=1, epoch=0,
                              train=True)
        with pytest.raises(DataError, match=pattern):
            list(loader)


def _shard_run(root: Path, shard: str) -> tuple[bytes, list[tuple[int, int, str]]]:
    rows = [r for r in pq.read_table(root / "manifest.parquet").to_pylist() if r["shard"] == shard]
    return (root / shard).read_bytes(), [(r["offset"], r["nbytes"], tar_key(r["key"])) for r in rows]


def test_fast_tar_path_matches_webdataset_and_falls_back(fresh: Path) -> None:
    from webdataset.tariterators import group_by_keys, tar_file_expander
    import io

    data, spans = _shard_run(fresh, "train/train-000001.tar")
    fast = fast_tar_samples(data, 0, spans)
    slow = list(group_by_keys(tar_file_expander([{"url": "x", "stream": io.BytesIO(data)}])))
    assert fast is not None and [s["__key__"] for s in fast] == [s["__key__"] for s in slow]
    for f, w in zip(fast, slow):
        assert {k for k in f if not k.startswith("__")} == {k for k in w if not k.startswith("__")}
        assert all(bytes(f[k]) == w[k] for k in f if not k.startswith("__"))
    assert fast_tar_samples(data[1024:], 1024, spans[1:]) is not None  # a ranged read from its offset
    start, nbytes, key = spans[3]
    damaged = bytearray(data)
    damaged[start + 100] ^= 0x01  # a header byte (mode) flipped: only the checksum notices
    assert fast_tar_samples(bytes(damaged), 0, spans) is None
    assert fast_tar_samples(data, 0, [(start, nbytes - 512, key)]) is None  # range does not end on the sample
    assert fast_tar_samples(data, 0, [(start, nbytes, "other")]) is None  # names must carry the key
    assert fast_tar_samples(data[: start + 600], 0, [(start, nbytes, key)]) is None  # short read


def test_nonfinite_rows_is_exact() -> None:
    """Bit-level check: inf and NaN rows found; the largest finite values (whose sums overflow) are not."""
    x16 = torch.zeros(4, 3, FEATURE_DIMS["audio"], dtype=torch.float16)
    x16[0] = 65504.0
    x16[1, 2, 5] = float("inf")
    x16[3, 0, 0] = float("nan")
    x32 = torch.full((4, 2, FEATURE_DIMS["visual"]), 3e38)
    x32[2, 1, 1] = -float("inf")
    parts = {"text": torch.zeros(4, 1, 300, dtype=torch.float16), "visual": x32, "audio": x16}
    assert nonfinite_rows(parts) == {1: "audio has non-finite values", 3: "audio has non-finite values",
                                     2: "visual has non-finite values"}


def _drop_sample_hashes(root: Path) -> None:
    """The manifest as a carat before per-sample hashes wrote it."""
    table = pq.read_table(root / "manifest.parquet")
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"carat.sample_hash"}
    pq.write_table(table.drop_columns(["sample_hash"]).replace_schema_metadata(meta), root / "manifest.parquet")


@pytest.mark.parametrize("hashed, reason", [(True, "do not match the hash"), (False, "non-finite")])
def test_corrupt_data_skip_counts_and_keeps_step_count(fresh: Path, hashed: bool, reason: str) -> None:
    """The sample's hash catches the damage first; without hashes (an older corpus) the values check does."""
    victim = _victim(fresh)
    if not hashed:
        _drop_sample_hashes(fresh)
    # Inside the first member (the audio .npy: names are sorted): 0xFF bytes make NaNs.
    _corrupt(fresh / victim["shard"], victim["offset"] + 512 + 128 + 8, b"\xff" * 16)
    cfg = tiny_cfg(on_error="skip")
    loader = build_loader(fresh, "train", cfg, rank=0, world_size=1, epoch=0, train=True)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        batches = list(loader)
    assert len(batches) == len(loader)
    assert loader.skipped == 1
    shard, key, why = loader.skipped_samples[0]
    assert shard.endswith("train-000001.tar") and key == victim["key"] and reason in why
    keys = [k for b in batches for k in b.keys]
    assert victim["key"] not in keys and len(keys) == loader.num_samples - 1
    assert all(b.weight.eq(1).all() for b in batches)  # the rest of the batch keeps full weight


def test_truncated_shard(fresh: Path) -> None:
    path = fresh / "train/train-000002.tar"
    loader = build_loader(fresh, "train", tiny_cfg(on_error="skip"), rank=0, world_size=1, epoch=0, train=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated after planning
    with pytest.warns(UserWarning):
        batches = list(loader)
    assert len(batches) == len(loader) and loader.skipped >= 5
    assert any("truncated shard" in why for _, _, why in loader.skipped_samples)
    with pytest.raises(DataError, match="train-000002.tar: size"):  # caught at build time from now on
        build_loader(fresh, "train", tiny_cfg(), rank=0, world_size=1, epoch=0, train=True)


def test_missing_shard_is_an_error_at_build(fresh: Path) -> None:
    (fresh / "train/train-000000.tar").unlink()
    with pytest.raises(DataError, match="train-000000.tar: shard listed in the manifest is missing"):
        build_loader(fresh, "train", tiny_cfg(), rank=0, world_size=1, epoch=0, train=True)


def test_manifest_mismatch_on_existing_shard(fresh: Path) -> None:
    table = pq.read_table(fresh / "manifest.parquet")
    keys = table.column("key").to_pylist()
    keys[21], keys[22] = keys[22], keys[21]  # train shard 1, positions 1 and 2
    table = table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys))
    pq.write_table(table, fresh / "manifest.parquet")
    loader = build_loader(fresh, "train", tiny_cfg(), rank=0, world_size=1, epoch=0, train=True)
    with pytest.raises(DataError, match="train-000001.tar: sample"):
        list(loader)


def test_too_few_batches_for_world_size(fresh: Path) -> None:
    cfg = tiny_cfg(token_budget=10**6, max_batch_size=64)
    with pytest.raises(DataError, match="fewer than world_size=4"):
        build_loader(fresh, "valid", cfg, rank=0, world_size=4, epoch=0, train=True)
    cfg = tiny_cfg(token_budget=10**6, max_batch_size=64, remainder="pad")
    ranks = [build_loader(fresh, "valid", cfg, rank=r, world_size=4, epoch=0, train=True) for r in range(4)]
    assert [len(x) for x in ranks] == [1] * 4
    assert sorted(x.num_samples for x in ranks) == [0, 0, 0, 10]
    assert sorted(x.num_fillers for x in ranks) == [0, 1, 1, 1]


# ------------------------------------------------------------------------------------------- misc


def test_collate_pads_and_masks_empty_modalities() -> None:
    samples = [DecodedSample(key=f"k{i}", features={
        "text": np.zeros((0, 300), np.float16), "visual": np.ones((n, 35), np.float16),
        "audio": np.full((2 * n, 74), 0.5, np.float16)}, labels=np.zeros(6, np.uint8),
        intensities=np.full(6, np.nan, np.float32)) for i, n in enumerate((2, 5))]
    parts = collate(samples, weight=1.0)
    assert parts.text.shape == (2, 1, FEATURE_DIMS["text"]) and parts.audio.shape == (2, 10, 74)
    assert parts.audio.dtype == torch.float16  # workers ship the stored dtype ...
    batch = to_batch(parts)
    assert not batch.text_mask.any() and batch.visual_mask.sum(1).tolist() == [2, 5]
    assert batch.audio.dtype == torch.float32 and batch.text.dtype == torch.float32  # ... Batch holds float32
    assert torch.equal(batch.audio, torch.full((2, 10, 74), 0.5) * batch.audio_mask[..., None])
    assert batch.labels.shape == (2, len(EMOTIONS)) and batch.weight.tolist() == [1.0, 1.0]


def test_loader_config_validation() -> None:
    with pytest.raises(ConfigError, match="loader.min_batch_size"):
        LoaderConfig(min_batch_size=65)
    with pytest.raises(ConfigError, match="loader.modality_weights"):
        LoaderConfig(modality_weights=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="loader.on_error"):
        LoaderConfig(on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank=2"):
        build_loader(Path("."), "train", LoaderConfig(), rank=2, world_size=2, epoch=0, train=True)


def test_float16_storage_round_trip(tmp_path: Path) -> None:
    refs, _ = write_tiny(tmp_path, {"train": 12}, dtype="float16")
    by_key = {r.key: r for r in refs["train"]}
    loader = build_loader(tmp_path, "train", tiny_cfg(token_budget=10**5, max_batch_size=64), rank=0,
                          world_size=1, epoch=0, train=False)
    for batch in loader:
        for i, key in enumerate(batch.keys):
            audio = load_segment(by_key[key]).audio
            got = batch.audio[i, : len(audio)].numpy()
            np.testing.assert_array_equal(got, audio.astype(np.float16).astype(np.float32))


def test_pooled_batch_describes_and_resolves_its_ring_slot(corpus) -> None:
    """In-process round trip of the ring transfer: the worker's batch names its slot and carries addresses
    instead of the tensors written there; resolving them gives the same tensors back."""
    from carat.data.loader.shm_pool import PooledTensor

    root, _ = corpus
    loader = build_loader(root, "train", tiny_cfg(), rank=0, world_size=1, epoch=0, train=True)
    dataset: PlannedBatches = loader.dataset
    pool = dataset.shared_pool(1, depth=2)
    (plain, *_), = _worker_batches(loader, 1)
    worker = dataset.with_pool(pool).iter_worker(0, 1)
    sent = next(worker)
    assert sent.ring_slot == (0, 0) and plain.ring_slot is None
    assert all(isinstance(t, PooledTensor) for t in sent.features().values())
    got = pool.resolve(sent)
    assert got.keys == plain.keys and got.skipped == []
    for m in MODALITIES:
        assert torch.equal(getattr(got, m), getattr(plain, m))
    np.testing.assert_array_equal(got.lengths, plain.lengths)
    pool.release(0)
    worker.close()
    pool.close()
