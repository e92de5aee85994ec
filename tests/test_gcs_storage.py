"""Corpora and runs in Google Cloud Storage (``gs://``, through fsspec's gcsfs), against a real GCS-compatible
server on 127.0.0.1 (gcp-storage-emulator, :mod:`tests.gcs_server`). No client is patched: carat reads
``STORAGE_EMULATOR_HOST`` as Google's client libraries do. The failure modes every store shares (outages,
bodies cut short, the block cache) are proven against S3 in :mod:`tests.test_object_storage`.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from carat.data.__main__ import main as data_main
from carat.data.loader.loader_config import LoaderConfig
from carat.data.loader.pipeline import build_loader
from carat.errors import DataError
from carat.storage import ObjectPath, forget_filesystems, with_retries
from tests.gcs_server import gcs_emulator_server
from tests.test_object_storage import assert_same_batches, batches

pytestmark = pytest.mark.skipif(find_spec("gcsfs") is None or find_spec("gcp_storage_emulator") is None,
                                reason="gs:// tests need gcsfs and gcp-storage-emulator (pip install -e '.[test]')")

BUCKET = "carat-gcs-test"
SYNTH = ["--scale", "0.005", "--length-scale", "0.05", "--seed", "1", "--dtype", "float32",
         "--storage.shard_max_samples=16", "--no-reference", "--no-progress"]
"""The end-to-end tests' tiny corpus (tests.data_fixtures.tiny_loop_corpus), through the command line."""


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator and the environment that points carat at it, with a bucket (module-wide); yields the
    endpoint."""
    with gcs_emulator_server(str(tmp_path_factory.mktemp("emulator"))) as endpoint, \
            pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", endpoint)
        env.setattr("carat.storage.BACKOFF_S", 0.02)
        forget_filesystems()
        ObjectPath(f"gs://{BUCKET}").fs.mkdir(BUCKET)
        try:
            yield endpoint
        finally:
            forget_filesystems()


def synth(out: str, staging: Path) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CARAT_STAGING_DIR", str(staging))
        assert data_main(["synth", "--preset", "tiny", "--out", out, *SYNTH]) == 0


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "shards"
    synth(str(out), tmp_path_factory.mktemp("staging"))
    return out


@pytest.fixture(scope="module")
def gcs_corpus(gcs, tmp_path_factory) -> ObjectPath:
    """The same corpus as ``local_corpus``, written into the bucket by ``python -m carat.data synth --out gs://``."""
    url = f"gs://{BUCKET}/corpus"
    synth(url, tmp_path_factory.mktemp("staging"))
    return ObjectPath(url)


def test_synth_into_gcs_writes_the_local_corpus_byte_for_byte(gcs_corpus, local_corpus):
    local_files = sorted(p.relative_to(local_corpus).as_posix() for p in local_corpus.rglob("*")
                         if p.is_file() and not p.relative_to(local_corpus).as_posix().startswith("."))
    assert gcs_corpus.walk_files() == local_files
    assert sum(f.endswith(".tar") for f in local_files) > 3
    for rel in local_files:
        remote, local = (gcs_corpus / rel).read_bytes(), (local_corpus / rel).read_bytes()
        if rel == "card.json":  # the one file with a time in it
            remote, local = ({**json.loads(b), "created_utc": None} for b in (remote, local))
        assert remote == local, rel


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_from_gcs_are_bit_identical_to_local_disk(gcs_corpus, local_corpus, workers):
    for split in ("train", "valid"):
        assert_same_batches(batches(gcs_corpus, split, num_workers=workers),
                            batches(local_corpus, split, num_workers=workers))


def test_verify_and_inspect_read_the_corpus_in_gcs(gcs_corpus, capsys):
    assert data_main(["verify", str(gcs_corpus)]) == 0
    assert f"{gcs_corpus}: full check of " in capsys.readouterr().out
    assert data_main(["inspect", str(gcs_corpus)]) == 0
    out = capsys.readouterr().out
    assert "padding efficiency (train" in out and f"{gcs_corpus} is in object storage" in out


def test_a_missing_bucket_or_corpus_is_named_in_one_line(gcs, tmp_path, capsys):
    missing = "gs://no-such-bucket/corpus"
    why = f"bucket 'no-such-bucket' does not exist (endpoint {gcs}); create it or fix the URL"
    with pytest.raises(DataError) as err:
        build_loader(missing, "train", LoaderConfig(num_workers=0), rank=0, world_size=1, epoch=0, train=True)
    assert f"{missing}/manifest.parquet: {why}" in str(err.value) and "\n" not in str(err.value)

    assert data_main(["verify", missing]) == 1
    assert f"{missing}/manifest.parquet: {why}" in capsys.readouterr().out

    tmp_path.joinpath("staging").mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CARAT_STAGING_DIR", str(tmp_path / "staging"))
        assert data_main(["synth", "--preset", "tiny", "--out", missing, *SYNTH]) == 1
    assert f"error: {missing}: {why}\n" in capsys.readouterr().err

    with pytest.raises(DataError, match=rf"gs://{BUCKET}/nothing/manifest.parquet: missing"):
        build_loader(f"gs://{BUCKET}/nothing", "train", LoaderConfig(num_workers=0), rank=0, world_size=1, epoch=0,
                     train=True)


def test_a_denial_is_named_once_with_the_google_credentials_to_check(gcs):
    """gcsfs turns HTTP 403 into a plain OSError("Forbidden: ..."); it is a denial, not a network error to retry.
    (The emulator checks no credentials, so the error comes from gcsfs' own response check.)"""
    from gcsfs.retry import validate_response

    calls = []

    def denied():
        calls.append(1)
        validate_response(403, b'{"error": {"message": "caller does not have storage.objects.get access"}}',
                          f"b/{BUCKET}/o/secret")

    with pytest.raises(DataError, match=rf"gs://{BUCKET}/secret: cannot read: access denied \(Forbidden: .*\): check "
                                        r"the credentials \(GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth "
                                        rf"application-default login`\) and the bucket's policy \(endpoint {gcs}\)"):
        with_retries(f"gs://{BUCKET}/secret", "read", denied)
    assert len(calls) == 1


@pytest.mark.slow
def test_train_from_gcs_into_gcs_then_evaluate_from_it(gcs, gcs_corpus, local_corpus, tmp_path, monkeypatch):
    from carat import evaluate
    from carat.train.__main__ import main as train
    from tests.data_fixtures import loop_args

    runs = f"gs://{BUCKET}/runs"
    monkeypatch.setenv("CARAT_STAGING_DIR", str(tmp_path / "staging"))
    assert train(loop_args(gcs_corpus, runs, "r", 2)) == 0
    run = ObjectPath(f"{runs}/r")
    assert (run / "checkpoints/latest").read_text().strip() == "epoch-002"
    for name in ("config.toml", "environment.json", "card.json", "history.jsonl", "results.json"):
        assert (run / name).is_file(), name
    assert f'storage_path = "{runs}"' in (run / "config.toml").read_text()

    # The same run from the local copy of the corpus into local storage: the same result.
    assert train(loop_args(local_corpus, tmp_path / "local-runs", "r", 2)) == 0
    local_results = json.loads((tmp_path / "local-runs/r/results.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["micro_f1"] == pytest.approx(local_results["test"]["micro_f1"], abs=1e-9)

    out = tmp_path / "test.json"
    assert evaluate.main(["--checkpoint", str(run), "--split", "test", "--out", str(out)]) == 0
    evaluated = next(iter(json.loads(out.read_text()).values()))
    assert evaluated["micro_f1"] == pytest.approx(results["test"]["micro_f1"], abs=1e-9)
