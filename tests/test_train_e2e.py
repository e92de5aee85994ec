"""End-to-end training on tiny data: one process, the deepspeed launcher, Ray Train; resume and restarts.

Each multi-rank test proves how many ranks really ran: the world size recorded by the run, and one RNG file per
rank in the DeepSpeed checkpoint (written by each rank itself).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carat.data.corpus.shards import StorageConfig
from carat.data.sources.synth import SynthConfig, synthesize_corpus
from tests.faults import fault_env
from tests.ports import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "shards"
    synthesize_corpus(out, SynthConfig(scale=0.005, length_scale=0.05, seed=1),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    return out


def common_args(shards: Path, storage: Path, name: str, epochs: int = 2) -> list[str]:
    return [
        "--preset", "tiny", f"--train.shard_dir={shards}", f"--train.storage_path={storage}",
        f"--train.run_name={name}", f"--train.epochs={epochs}", "--train.synth_if_missing=false",
        "--loader.num_workers=0",
    ]


def cpu_env(**extra: str) -> dict[str, str]:
    # An in-process run earlier in this session leaves its world-of-one variables behind: drop them.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env


def run_module(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def ranks_in_checkpoint(directory: Path) -> set[int]:
    return {int(p.stem.removeprefix("rng_rank")) for p in directory.rglob("rng_rank*.pt")}


def check_run_dir(run: Path, world: int) -> dict:
    for name in ("config.toml", "environment.json", "card.json", "metrics.jsonl", "history.jsonl",
                 "results.json", "results.txt"):
        assert (run / name).is_file(), f"{name} missing from {run}"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == world
    assert json.loads((run / "environment.json").read_text())["world_size"] == world
    assert ranks_in_checkpoint(run / "best") == set(range(world))
    assert {p.name for p in (run / "plots").glob("*.png")} >= {
        "per_emotion_f1.png", "pr_curves.png", "training_loss.png", "validation_metrics.png"}
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(len(history)))
    assert all(np.isfinite(h["train/total"]) for h in history)
    assert all(h["perf/samples_per_s"] > 0 and h["perf/frames_per_s"] > 0 for h in history)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps and all({"lr", "loss/total", "loss/supcon", "samples_per_s"} <= set(s) for s in steps)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # every validation and test sample scored exactly once
    manifest_counts = results["valid"]["n_samples"], results["test"]["n_samples"]
    assert all(n > 0 for n in manifest_counts)
    return results


def split_size(shards: Path, split: str) -> int:
    from carat.data.corpus.shards import read_manifest

    table = read_manifest(shards)
    return sum(1 for s in table.column("split").to_pylist() if s == split)


def test_single_process_run_then_export_evaluate_predict(shards, tmp_path):
    from carat.train.__main__ import main

    storage = tmp_path / "runs"
    assert main(common_args(shards, storage, "one") + ["--launcher", "none"]) == 0
    run = storage / "one"
    results = check_run_dir(run, world=1)
    assert results["test"]["n_samples"] == split_size(shards, "test")
    assert results["valid"]["n_samples"] == split_size(shards, "valid")
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-002"

    from carat import evaluate, export, predict

    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "model.pt")]) == 0
    out = tmp_path / "test.json"
    assert evaluate.main(["--checkpoint", str(tmp_path / "model.pt"), "--split", "test", "--shards", str(shards),
                          "--out", str(out), "--tune-on", "valid"]) == 0
    evaluated = json.loads(out.read_text())
    single = next(v for k, v in evaluated.items() if k.startswith("test @0.2"))
    # The exported best model scores the test split exactly as the run's own final evaluation did.
    assert single["micro_f1"] == pytest.approx(results["test"]["micro_f1"], abs=1e-9)
    assert single["n_samples"] == results["test"]["n_samples"]

    csv_out = tmp_path / "preds.csv"
    assert predict.main(["--checkpoint", str(run), "--shards", str(shards), "--split", "test",
                         "--out", str(csv_out)]) == 0
    assert len(csv_out.read_text().splitlines()) == split_size(shards, "test") + 1

    rng = np.random.default_rng(0)
    n, lengths = 3, {"text": [5, 9, 2], "visual": [12, 4, 30], "audio": [40, 90, 13]}
    dims = {"text": 300, "visual": 35, "audio": 74}
    arrays = {}
    for m, ls in lengths.items():
        arrays[m] = rng.standard_normal((n, max(ls), dims[m])).astype(np.float32)
        arrays[f"{m}_lengths"] = np.array(ls)
    np.savez(tmp_path / "feats.npz", ids=np.array(["a", "b", "c"]), **arrays)
    json_out = tmp_path / "preds.json"
    assert predict.main(["--checkpoint", str(tmp_path / "model.pt"), "--npz", str(tmp_path / "feats.npz"),
                         "--out", str(json_out)]) == 0
    preds = json.loads(json_out.read_text())["predictions"]
    assert [p["id"] for p in preds] == ["a", "b", "c"]
    assert all(0.0 <= p["score_happy"] <= 1.0 for p in preds)

    arrays["visual"][1, 0, 0] = np.nan
    np.savez(tmp_path / "bad.npz", **arrays)
    assert predict.main(["--checkpoint", str(tmp_path / "model.pt"), "--npz", str(tmp_path / "bad.npz"),
                         "--out", str(json_out)]) == 1


def test_deepspeed_launcher_two_ranks_zero3_checkpointing_and_export(shards, tmp_path):
    storage = tmp_path / "runs"
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    proc = run_module(
        [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "carat.train", "--launcher",
         "deepspeed", "--train.zero_stage=3", "--model.checkpoint_encoders=audio,visual",
         "--model.checkpoint_alignment=audio", "--model.ctc_target_length=none"]
        + common_args(shards, storage, "ds", epochs=1),
        cpu_env(LOCAL_SIZE="2"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = check_run_dir(storage / "ds", world=2)
    assert ranks_in_checkpoint(storage / "ds" / "checkpoints") == {0, 1}

    # The ZeRO-3 shards of both ranks merge into one plain model that scores the test split as the run did.
    from carat import evaluate, export

    model = tmp_path / "model.pt"
    assert export.main(["--checkpoint", str(storage / "ds"), "--out", str(model)]) == 0
    out = tmp_path / "test.json"
    assert evaluate.main(["--checkpoint", str(model), "--split", "test", "--shards", str(shards),
                          "--out", str(out)]) == 0
    single = next(iter(json.loads(out.read_text()).values()))
    assert single["micro_f1"] == pytest.approx(results["test"]["micro_f1"], abs=1e-9)

    # ZeRO shards are per rank: resuming this run in a world of one is refused with the reason.
    resumed = run_module([sys.executable, "-m", "carat.train", "--launcher", "none"]
                         + common_args(shards, storage, "ds", epochs=2), cpu_env())
    assert resumed.returncode == 1 and "was written by 2 ranks and this run has 1" in resumed.stderr


def test_ray_two_workers_and_a_killed_worker_is_restarted(shards, tmp_path):
    storage = tmp_path / "runs"
    proc = run_module(
        [sys.executable, "-m", "carat.train", "--launcher", "ray", "--train.num_workers=2",
         "--train.max_failures=1"] + common_args(shards, storage, "ray", epochs=2),
        fault_env("1:1", cpu_env()),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    run = storage / "ray"
    results = check_run_dir(run, world=2)
    assert (run / ".fault-injected-1-1").is_file()          # rank 1 really died after epoch 1 ...
    assert "resumed from" in output                          # ... and the restarted group resumed
    # the Ray carat starts for itself prints no notices a newcomer reads as failures (issue 28)
    assert "Token authentication is enabled" not in output and "PreemptionWatcher" not in output
    ray_checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert ray_checkpoints, "Ray kept no checkpoint"
    assert ranks_in_checkpoint(ray_checkpoints[-1]) == {0, 1}
    assert len(json.loads(json.dumps(results))["test"]["per_emotion"]) == 6


def test_resumed_run_ends_like_an_uninterrupted_one(shards, tmp_path):
    storage = tmp_path / "runs"
    base = [sys.executable, "-m", "carat.train", "--launcher", "none"]
    straight = run_module(base + common_args(shards, storage, "straight", epochs=3), cpu_env())
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = run_module(base + common_args(shards, storage, "resumed", epochs=3),
                         fault_env("1:0", cpu_env()))
    assert crashed.returncode != 0 and not (storage / "resumed" / "results.json").exists()
    resumed = run_module(base + common_args(shards, storage, "resumed", epochs=3), cpu_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a = json.loads((storage / "straight" / "results.json").read_text())
    b = json.loads((storage / "resumed" / "results.json").read_text())
    for split in ("valid", "test"):
        for key in ("micro_f1", "macro_f1", "accuracy", "hamming_loss"):
            assert b[split][key] == pytest.approx(a[split][key], abs=1e-6), (split, key)
    ha = [json.loads(x) for x in (storage / "straight" / "history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (storage / "resumed" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hb] == [0, 1, 2]
    assert [h["train/total"] for h in hb] == pytest.approx([h["train/total"] for h in ha], rel=1e-5)


def test_csd_files_to_a_trained_model(tmp_path):
    """The path of a user holding CMU-MultimodalSDK files: prepare -> train -> evaluate, one process."""
    from carat.data.__main__ import main as data_main
    from carat.train.__main__ import main as train_main
    from tests.data_fixtures import make_csd_fixture

    fixture = make_csd_fixture(tmp_path / "csd", per_split={"train": 8, "valid": 3, "test": 3})
    shards = tmp_path / "shards"
    assert data_main(["prepare", "--source", "csd", "--input", str(fixture.directory), "--out", str(shards)]) == 0
    storage = tmp_path / "runs"
    assert train_main(common_args(shards, storage, "csd", epochs=1) + ["--launcher", "none"]) == 0
    results = json.loads((storage / "csd" / "results.json").read_text())
    expected_test = sum(1 for e in fixture.expected.values() if e["split"] == "test")
    assert results["test"]["n_samples"] == expected_test
    card = json.loads((storage / "csd" / "card.json").read_text())
    assert card["counts"]["test"] == expected_test  # the run directory carries the prepared corpus' card
