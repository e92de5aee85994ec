"""Corpora and runs in object storage, against a real S3-compatible server on 127.0.0.1 (moto's server mode,
:mod:`tests.s3_server`), reached through a TCP proxy that can go down or cut responses short. No client is
patched: carat reads ``AWS_ENDPOINT_URL`` and the standard credentials, as it would for MinIO, Ceph or AWS.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from carat.data.loader.pipeline import build_loader
from carat.data.loader.loader_config import LoaderConfig
from carat.errors import DataError
from carat.storage import ObjectPath, as_location, forget_filesystems
from tests.data_fixtures import tiny_loop_corpus
from tests.faults import fault_env
from tests.s3_server import FaultyProxy, moto_server

BUCKET = "carat-test"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    """The server, its proxy and the environment that points carat at them (module-wide)."""
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as env:
        proxy = FaultyProxy(int(endpoint.rsplit(":", 1)[1]))
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "carat-test-key")
        env.setenv("AWS_SECRET_ACCESS_KEY", "carat-test-secret")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", proxy.url)
        env.setattr("carat.storage.BACKOFF_S", 0.02)  # the bounded retries, quickly
        forget_filesystems()
        ObjectPath(f"s3://{BUCKET}").fs.mkdir(BUCKET)
        try:
            yield proxy
        finally:
            proxy.close()
            forget_filesystems()


@pytest.fixture(autouse=True)
def proxy_passes(request):
    """Every test starts with the endpoint up and passing responses whole."""
    if "s3" in request.fixturenames:
        proxy = request.getfixturevalue("s3")
        proxy.mode = "pass"
        if proxy._listener is None:
            proxy.up()
    yield


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory) -> Path:
    return tiny_loop_corpus(tmp_path_factory.mktemp("local") / "shards")


@pytest.fixture(scope="module")
def bucket_corpus(s3, tmp_path_factory) -> ObjectPath:
    """The same corpus as ``local_corpus``, written straight into the bucket by the synthesizer."""
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    with pytest.MonkeyPatch.context() as env:
        env.setenv("CARAT_STAGING_DIR", str(tmp_path_factory.mktemp("staging")))
        out = synthesize_corpus(f"s3://{BUCKET}/corpus", SynthConfig(scale=0.005, length_scale=0.05, seed=1),
                                StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    assert out == ObjectPath(f"s3://{BUCKET}/corpus")
    return out


def batches(shard_dir, split: str, **loader: object) -> list:
    cfg = LoaderConfig(**{"token_budget": 4096, "max_batch_size": 16, "num_workers": 0, **loader})
    return list(build_loader(shard_dir, split, cfg, rank=0, world_size=1, epoch=1, train=True))


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys == y.keys
        for name in ("text", "visual", "audio", "labels", "weight"):
            left, right = getattr(x, name), getattr(y, name)
            assert left.dtype == right.dtype and left.shape == right.shape
            assert left.numpy().tobytes() == right.numpy().tobytes(), name


# ------------------------------------------------------------------------------------------ locations


def test_urls_are_not_mangled_into_local_paths():
    where = as_location("s3://bucket/some/prefix/")
    assert isinstance(where, ObjectPath) and str(where) == "s3://bucket/some/prefix"
    assert str(where / "train/train-000000.tar") == "s3://bucket/some/prefix/train/train-000000.tar"
    assert (where / "manifest.parquet").parent == where and where.bucket == "bucket"
    assert as_location("shards") == Path("shards") and as_location("file:///tmp/x") == Path("/tmp/x")
    with pytest.raises(DataError, match="needs a bucket"):
        as_location("s3://")


# ------------------------------------------------------------------------------------------ writing


def test_synth_into_the_bucket_uploads_the_local_corpus_byte_for_byte(bucket_corpus, local_corpus):
    local_files = sorted(p.relative_to(local_corpus).as_posix() for p in local_corpus.rglob("*")
                         if p.is_file() and not p.relative_to(local_corpus).as_posix().startswith(".")
                         and p.name not in (".carat-write.lock",))
    assert bucket_corpus.walk_files() == local_files
    for rel in local_files:
        remote, local = (bucket_corpus / rel).read_bytes(), (local_corpus / rel).read_bytes()
        if rel == "card.json":  # the one file with a time in it
            remote, local = ({**json.loads(b), "created_utc": None} for b in (remote, local))
        assert remote == local, rel


def test_an_interrupted_upload_leaves_no_manifest_and_the_rerun_completes(s3, local_corpus, tmp_path):
    from carat.data.corpus.remote import publish_corpus

    url = ObjectPath(f"s3://{BUCKET}/interrupted")
    publish_corpus(local_corpus, url)
    assert (url / "manifest.parquet").is_file()
    # The endpoint fails during the next publication (a body cut short on every request): the old manifest is
    # deleted first, so a reader sees no corpus rather than the old manifest beside half-replaced shards.
    s3.mode = "cut"
    with pytest.raises(DataError, match="interrupted"):
        publish_corpus(local_corpus, url)
    s3.mode = "pass"
    assert not (url / "manifest.parquet").exists()
    with pytest.raises(DataError, match="manifest.parquet: missing"):
        build_loader(url, "train", LoaderConfig(num_workers=0), rank=0, world_size=1, epoch=0, train=True)
    publish_corpus(local_corpus, url)
    assert_same_batches(batches(url, "train"), batches(local_corpus, "train"))


# ------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_from_the_bucket_are_bit_identical_to_local_disk(bucket_corpus, local_corpus, workers):
    for split in ("train", "valid"):
        assert_same_batches(batches(bucket_corpus, split, num_workers=workers),
                            batches(local_corpus, split, num_workers=workers))


def test_the_block_cache_serves_the_second_epoch_with_the_endpoint_down(s3, bucket_corpus, local_corpus, tmp_path):
    cache = tmp_path / "cache"
    first = batches(bucket_corpus, "train", cache_dir=str(cache))
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) > 0
    cfg = LoaderConfig(token_budget=4096, max_batch_size=16, num_workers=2, cache_dir=str(cache))
    loader = build_loader(bucket_corpus, "train", cfg, rank=0, world_size=1, epoch=1, train=True)
    s3.down()  # the loader is built (manifest read); every byte of the epoch must now come from the cache
    again = list(loader)
    assert_same_batches(again, first)
    assert_same_batches(again, batches(local_corpus, "train"))


def test_a_damaged_cache_block_is_fetched_again_not_reported_as_a_damaged_corpus(s3, bucket_corpus, local_corpus,
                                                                                 tmp_path):
    cache = tmp_path / "cache"
    batches(bucket_corpus, "train", cache_dir=str(cache))
    blocks = sorted(p for p in cache.rglob("*") if p.is_file() and p.name.isdigit())
    originals = {p: p.read_bytes() for p in blocks}
    for block in blocks:  # flip bytes in every cached block: each holds some sample's payload
        data = bytearray(originals[block])
        for i in range(100, len(data), 997):
            data[i] ^= 0xFF
        block.write_bytes(bytes(data))
    again = batches(bucket_corpus, "train", cache_dir=str(cache))  # on_error=raise: a mismatch left would stop
    assert_same_batches(again, batches(local_corpus, "train"))
    assert all(block.read_bytes() == originals[block] for block in blocks)  # the cache holds good copies again


def test_a_bounded_cache_stays_within_its_bytes(bucket_corpus, tmp_path):
    from carat.data.corpus.remote import BlockCache

    cache = BlockCache(tmp_path / "cache", max_bytes=64 << 10, block_bytes=16 << 10)
    obj = bucket_corpus / "train/train-000000.tar"
    size = obj.stat().st_size
    data = obj.read_bytes()
    assert size > 4 * (64 << 10) // 4, "the shard must be larger than the bound for this test"
    for start in range(0, size, 10_000):
        assert cache.read(obj, "f" * 64, size, start, 12_345) == data[start:start + 12_345]
    used = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert 0 < used <= 64 << 10


def test_verify_and_inspect_a_corpus_in_the_bucket(bucket_corpus, capsys):
    from carat.data.__main__ import main

    assert main(["verify", str(bucket_corpus)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["verify", "--quick", str(bucket_corpus)]) == 0
    assert main(["inspect", "--no-plots", str(bucket_corpus)]) == 0
    assert "padding efficiency" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ errors


def test_a_missing_bucket_is_one_line_naming_it(s3):
    with pytest.raises(DataError, match=r"s3://no-such-bucket/corpus/manifest.parquet: bucket 'no-such-bucket' does "
                                        r"not exist") as err:
        build_loader("s3://no-such-bucket/corpus", "train", LoaderConfig(), rank=0, world_size=1, epoch=0,
                     train=True)
    assert "\n" not in str(err.value)


def test_writing_into_a_missing_bucket_fails_before_any_work(s3, tmp_path, monkeypatch):
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    monkeypatch.setenv("CARAT_STAGING_DIR", str(tmp_path / "staging"))
    with pytest.raises(DataError, match="s3://no-such-bucket/corpus: bucket 'no-such-bucket' does not exist"):
        synthesize_corpus("s3://no-such-bucket/corpus", SynthConfig(scale=0.005, length_scale=0.05), reference=False)
    assert not (tmp_path / "staging").exists()


def test_a_missing_prefix_says_no_corpus_there(s3):
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/nothing-here/manifest.parquet: missing; write the corpus"):
        build_loader(f"s3://{BUCKET}/nothing-here", "train", LoaderConfig(), rank=0, world_size=1, epoch=0,
                     train=True)


def test_a_manifest_without_its_shards_names_the_missing_object(s3, local_corpus):
    url = ObjectPath(f"s3://{BUCKET}/no-shards")
    for name in ("shards.parquet", "manifest.parquet"):
        (url / name).upload_from(local_corpus / name)
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/no-shards/train/train-000000.tar: shard listed in the "
                                        "manifest is missing"):
        build_loader(url, "train", LoaderConfig(), rank=0, world_size=1, epoch=0, train=True)


def test_access_denied_names_the_object_and_the_credentials(s3, monkeypatch):
    # A second server that checks credentials as AWS does: ours are unknown to it (403 InvalidAccessKeyId).
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as strict:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict)
        forget_filesystems()
        try:
            with pytest.raises(DataError, match=rf"s3://{BUCKET}/corpus/manifest.parquet: cannot look up: access "
                                                r"denied .*AWS_ACCESS_KEY_ID") as err:
                build_loader(f"s3://{BUCKET}/corpus", "train", LoaderConfig(), rank=0, world_size=1, epoch=0,
                             train=True)
            assert "\n" not in str(err.value) and "carat-test-secret" not in str(err.value)
        finally:
            monkeypatch.undo()
            forget_filesystems()


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_response_cut_short_is_retried_then_an_error_naming_the_object(s3, bucket_corpus, on_error):
    cfg = LoaderConfig(token_budget=4096, max_batch_size=16, num_workers=0, on_error=on_error)
    loader = build_loader(bucket_corpus, "train", cfg, rank=0, world_size=1, epoch=0, train=True)
    s3.mode = "cut"
    cuts = s3.cuts
    # An outage is not a bad sample: even on_error="skip" stops rather than dropping the epoch.
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/corpus/train/train-\d+\.tar: sample .*cannot read bytes "
                                        r"\d+\.\.\d+: .* after 4 attempts") as err:
        list(loader)
    assert s3.cuts - cuts == 4  # one GET and three retries, each cut off halfway
    assert "\n" not in str(err.value)


def test_the_endpoint_down_mid_epoch_is_an_error_naming_the_object_and_reading_resumes(s3, bucket_corpus,
                                                                                       local_corpus):
    # In the training process (workers=0), so the outage starts at a known batch; workers get the same error
    # through the batch they send (test_the_block_cache... reads through workers).
    cfg = LoaderConfig(token_budget=4096, max_batch_size=16, num_workers=0)
    loader = build_loader(bucket_corpus, "train", cfg, rank=0, world_size=1, epoch=1, train=True)
    got = []
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/corpus/train/train-\d+\.tar: sample .*cannot read bytes "
                                        r"\d+\.\.\d+: .*after 4 attempts.*endpoint http://127.0.0.1") as err:
        for batch in loader:
            got.append(batch)
            if len(got) == 1:
                s3.down()
    assert "\n" not in str(err.value)
    assert len(got) < len(loader)
    s3.up()
    assert_same_batches(batches(bucket_corpus, "train", num_workers=2), batches(local_corpus, "train"))


# ------------------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_train_from_the_bucket_into_the_bucket_resume_elsewhere_then_evaluate_from_it(s3, bucket_corpus, local_corpus,
                                                                                     tmp_path, monkeypatch):
    from carat import evaluate, export, predict
    from carat.train.__main__ import main as train
    from tests.data_fixtures import loop_args

    runs = f"s3://{BUCKET}/runs"
    base = [sys.executable, "-m", "carat.train", *loop_args(bucket_corpus, runs, "r", 2)]
    # Machine A dies hard (os._exit) when epoch 2 begins: what reached the bucket is what was committed.
    crashed = subprocess.run(base, env=fault_env("1:0", {**os.environ, "CARAT_STAGING_DIR": str(tmp_path / "machine-a")}),
                             capture_output=True, text=True, timeout=600, cwd=REPO)
    assert crashed.returncode != 0
    run = ObjectPath(f"{runs}/r")
    assert (run / "checkpoints/latest").read_text().strip() == "epoch-001"
    assert not (run / "results.json").exists()
    for name in ("config.toml", "environment.json", "card.json", "history.jsonl"):
        assert (run / name).is_file(), name
    # Nothing secret in what the run wrote: only the URL of where it lives.
    for name in ("config.toml", "environment.json"):
        text = (run / name).read_text()
        assert "carat-test-secret" not in text and "carat-test-key" not in text, name
    assert f'storage_path = "{runs}"' in (run / "config.toml").read_text()

    # Machine B (a fresh staging directory) resumes the run from the bucket and finishes it there.
    monkeypatch.setenv("CARAT_STAGING_DIR", str(tmp_path / "machine-b"))
    assert train(loop_args(bucket_corpus, runs, "r", 2)) == 0
    assert (run / "checkpoints/latest").read_text().strip() == "epoch-002"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]

    # The same run trained from the local copy of the corpus, uninterrupted, into local storage: same result.
    assert train(loop_args(local_corpus, tmp_path / "local-runs", "r", 2)) == 0
    local_results = json.loads((tmp_path / "local-runs/r/results.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["micro_f1"] == pytest.approx(local_results["test"]["micro_f1"], abs=1e-9)

    out = tmp_path / "test.json"
    assert evaluate.main(["--checkpoint", str(run), "--split", "test", "--out", str(out)]) == 0
    evaluated = next(iter(json.loads(out.read_text()).values()))
    assert evaluated["micro_f1"] == pytest.approx(results["test"]["micro_f1"], abs=1e-9)
    assert predict.main(["--checkpoint", str(run), "--shards", str(bucket_corpus), "--split", "test",
                         "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == results["test"]["n_samples"] + 1
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "model.pt")]) == 0


@pytest.mark.slow
def test_ray_two_workers_from_the_bucket_into_the_bucket_with_a_killed_worker(s3, bucket_corpus, tmp_path):
    runs = f"s3://{BUCKET}/ray-runs"
    from tests.test_train_e2e import cpu_env

    env = fault_env("1:1", cpu_env(CARAT_STAGING_DIR=str(tmp_path / "staging")))
    args = ["--preset", "tiny", f"--train.shard_dir={bucket_corpus}", f"--train.storage_path={runs}",
            "--train.run_name=ray", "--train.epochs=2", "--train.synth_if_missing=false", "--loader.num_workers=0",
            "--launcher", "ray", "--train.num_workers=2", "--train.max_failures=1",
            f"--loader.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, "-m", "carat.train", *args], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "resumed from" in output  # rank 1 died after epoch 1; the restarted group resumed
    run = ObjectPath(f"{runs}/ray")
    assert (run / ".fault-injected-1-1").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["test"]["n_samples"] > 0
    files = run.walk_files()
    ray_checkpoints = sorted({f.split("/", 1)[0] for f in files if f.startswith("checkpoint_") and "/" in f})
    assert ray_checkpoints, "Ray kept no checkpoint in the bucket"
    ranks = {int(f.rsplit("rng_rank", 1)[1].split(".")[0]) for f in files
             if f.startswith(ray_checkpoints[-1] + "/") and "rng_rank" in f}
    assert ranks == {0, 1}
    # Ray Train wrote them into the bucket itself (storage_filesystem), not through the driver's staged copy
    assert not list((tmp_path / "staging").rglob("checkpoint_*")), "Ray's checkpoints went through local disk"
    assert any((tmp_path / "cache").rglob("0*")), "the ranks read through the block cache"


def test_a_sweep_in_a_bucket_is_refused_naming_what_may_be_there(s3, capsys):
    from carat.tune.__main__ import main

    assert main(["--preset", "tiny", f"--train.shard_dir=s3://{BUCKET}/corpus",
                 f"--tune.storage_path=s3://{BUCKET}/sweeps"]) == 1
    err = capsys.readouterr().err
    assert f"not in s3://{BUCKET}/sweeps" in err and "train.shard_dir, may be in a bucket" in err


@pytest.mark.slow
def test_a_sweep_trains_its_trials_from_a_corpus_in_the_bucket(s3, bucket_corpus, tmp_path):
    from tests.test_tune import run_sweep

    proc = run_sweep(["--preset", "tiny", f"--train.shard_dir={bucket_corpus}", f"--train.storage_path={tmp_path}",
                      "--train.epochs=1", "--train.synth_if_missing=false", "--loader.num_workers=0",
                      "--tune.num_samples=1", "--tune.sweep_name=s", "--train.log_every=1000",
                      f"--loader.cache_dir={tmp_path / 'cache'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = list(csv.DictReader((tmp_path / "s" / "trials.csv").open()))
    assert row["status"] == "completed" and float(row["best_metric"]) > 0
    run = Path(row["run_dir"])
    assert json.loads((run / "results.json").read_text())["test"]["n_samples"] > 0
    assert any((tmp_path / "cache").rglob("*"))  # the trial's loader read the bucket through its cache


def test_a_failed_run_keeps_its_own_error_when_the_last_upload_fails_too(s3, tmp_path, monkeypatch, capsys):
    from carat.errors import CaratError
    from carat.train.runsync import synced_run

    monkeypatch.setattr("carat.storage.BACKOFF_S", 0.0)
    run_dir = tmp_path / "staging" / "failed"
    with pytest.raises(CaratError, match="training diverged: the run's own error"):
        with synced_run(run_dir, f"s3://{BUCKET}/masked", poll_s=3600):
            (run_dir / "history.jsonl").write_text("{}\n")
            s3.down()
            raise CaratError("training diverged: the run's own error")
    err = capsys.readouterr().err
    assert f"could not be mirrored to s3://{BUCKET}/masked/failed" in err and str(run_dir) in err


def test_prepare_into_the_bucket_publishes_the_local_corpus_and_trains_from_it(s3, tmp_path, monkeypatch):
    """`prepare --out s3://...` (real .csd files): the objects are the bytes a local prepare writes, manifest
    last; a run reads it back with the local corpus' batches."""
    from carat.data.__main__ import main as data_main
    from tests.data_fixtures import make_csd_fixture

    monkeypatch.setenv("CARAT_STAGING_DIR", str(tmp_path / "staging"))
    fixture = make_csd_fixture(tmp_path / "csd", per_split={"train": 6, "valid": 3, "test": 3})
    local, url = tmp_path / "local", f"s3://{BUCKET}/prepared"
    for out in (str(local), url):
        assert data_main(["prepare", "--source", "csd", "--input", str(fixture.directory), "--out", out,
                          "--no-progress"]) == 0
    remote = ObjectPath(url)
    for path in sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(local).as_posix()
        if rel.endswith(".tar") or rel in ("manifest.parquet", "shards.parquet"):
            assert (remote / rel).read_bytes() == path.read_bytes(), rel
    assert_same_batches(batches(remote, "train"), batches(local, "train"))


def _bucket_files(remote: ObjectPath) -> set[str]:
    return set(remote.walk_files()) if remote.is_dir() else set()


def _write_tag(copy: Path, tag: str, names: list[str]) -> None:
    for name in names:
        (copy / tag).mkdir(parents=True, exist_ok=True)
        (copy / tag / name).write_bytes(name.encode() * 10)


def test_two_hosts_copies_of_a_run_meet_in_the_bucket_in_commit_order(s3, tmp_path):
    """A run staged on two hosts (no shared run directory): the other host's mirror uploads its partition and
    never a pointer; rank 0's mirror uploads the marker and `latest` only when a commit is announced; pruning a
    tag on both hosts removes every object of it; swapping best/ on rank 0 keeps the other host's best/ file,
    which the marker lists."""
    from carat.train.checkpoint import COMPLETE_FILE
    from carat.train.runsync import RunSync

    remote = ObjectPath(f"s3://{BUCKET}/two-hosts/run")
    owner = RunSync(tmp_path / "node1", remote, owner=True)
    other = RunSync(tmp_path / "node2", remote, owner=False)
    _write_tag(other.local, "checkpoints/epoch-000", ["zero_pp_rank_1.pt", "rng_rank1.pt"])
    _write_tag(owner.local, "checkpoints/epoch-000", ["zero_pp_rank_0.pt", "rng_rank0.pt", "model_states.pt"])
    other.sync_files()
    owner.sync_files()
    assert not any(name.endswith(("latest", COMPLETE_FILE)) for name in _bucket_files(remote))
    names = ["model_states.pt", "rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_0.pt", "zero_pp_rank_1.pt"]
    marker = json.dumps({"files": {n: 1 for n in names}})
    (owner.local / "checkpoints/epoch-000" / COMPLETE_FILE).write_text(marker)
    (owner.local / "checkpoints/latest").write_text("epoch-000")
    other.sync()  # a pass of the other host's mirror never sends a pointer, even one it holds
    assert "checkpoints/latest" not in _bucket_files(remote)
    owner.sync()  # the commit
    assert _bucket_files(remote) == {f"checkpoints/epoch-000/{n}" for n in [*names, COMPLETE_FILE]} | {
        "checkpoints/latest"}

    # best/ swapped in on both hosts: rank 0's copy lacks the other host's file, which its marker lists
    _write_tag(other.local, "best", ["zero_pp_rank_1.pt"])
    other.sync_files()
    _write_tag(owner.local, "best", ["zero_pp_rank_0.pt"])
    (owner.local / "best" / COMPLETE_FILE).write_text(json.dumps({"files": {"zero_pp_rank_0.pt": 1,
                                                                              "zero_pp_rank_1.pt": 1}}))
    owner.sync()
    owner.download()  # as a resumed rank 0 does: it now knows the other host's best/ file too
    (owner.local / "best" / "zero_pp_rank_1.pt").unlink()  # ... and a new best/ from its own staging lacks it
    owner.sync()
    assert "best/zero_pp_rank_1.pt" in _bucket_files(remote)

    # a pruned tag leaves the bucket once both hosts pruned it
    for copy in (owner, other):
        shutil.rmtree(copy.local / "checkpoints/epoch-000")
        copy.sync()
    assert not any(name.startswith("checkpoints/epoch-000/") for name in _bucket_files(remote))
    assert _bucket_files(remote) >= {"checkpoints/latest", "best/zero_pp_rank_0.pt", "best/zero_pp_rank_1.pt"}


def test_a_corpus_on_a_web_server_reads_like_local_disk_and_names_a_missing_shard(local_corpus, tmp_path):
    """`http(s)://` (read-only, fsspec's HTTP filesystem): a corpus published on a plain web server that honours
    byte ranges verifies and yields the local corpus' batches bit for bit; a shard missing there is named."""
    from carat.data.corpus.verify import verify_corpus
    from tests.s3_server import http_file_server

    site = tmp_path / "site"
    shutil.copytree(local_corpus, site / "corpus")
    with http_file_server(str(site)) as base:
        url = as_location(f"{base}/corpus")
        assert isinstance(url, ObjectPath) and url.url == f"{base}/corpus"
        report = verify_corpus(url)
        assert not report.problems and report.samples > 0, report
        for split in ("train", "valid"):
            assert_same_batches(batches(url, split), batches(local_corpus, split))
        missing = sorted((site / "corpus" / "train").glob("*.tar"))[0]
        missing.unlink()
        with pytest.raises(DataError, match=f"{url}/train/{missing.name}: shard listed in the manifest is missing"):
            batches(url, "train")
