"""An interrupted ``python -m carat.tune`` resumes: SIGKILL mid-trial, rerun the same command (slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.test_tune import _rows
from tests.test_tune import _sweep_env as _tune_env


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_trial_from_the_trials_own_checkpoint(tmp_path):
    """SIGKILL the whole `python -m carat.tune` process group once the trial has checkpointed an epoch; the same
    command then restores the sweep and the trial continues from its last checkpoint in its own run directory."""
    import signal
    import time

    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    EPOCHS = 4  # tiny epochs take a second or two: enough of them that the kill lands mid-run
    shards = tmp_path / "shards"
    synthesize_corpus(shards, SynthConfig(scale=0.005, length_scale=0.05, seed=2),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    command = [sys.executable, "-m", "carat.tune", "--preset", "tiny", f"--train.shard_dir={shards}",
               f"--train.storage_path={tmp_path / 'runs'}", f"--train.epochs={EPOCHS}",
               "--train.synth_if_missing=false", "--loader.num_workers=0", "--tune.num_samples=1", "--tune.sweep_name=k"]
    runs = tmp_path / "runs" / "k" / "runs"
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=_tune_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                histories = list(runs.glob("trial-*/history.jsonl"))
                # Ray Train has registered an epoch checkpoint once its snapshot names one
                snapshots = list(runs.glob("trial-*/checkpoint_manager_snapshot.json"))
                if histories and histories[0].read_text().count("\n") >= 1 and snapshots \
                        and "checkpoint_" in snapshots[0].read_text():
                    break
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (history,) = runs.glob("trial-*/history.jsonl")
    done = history.read_text().count("\n")
    assert 1 <= done < EPOCHS, done  # killed mid-run
    again = subprocess.run(command, cwd=tmp_path, env=_tune_env(), capture_output=True, text=True, timeout=400)
    output = again.stdout + again.stderr
    (tmp_path / "second.log").write_text(output)
    assert again.returncode == 0, _digest(output)
    assert "resuming the sweep" in output
    # ASHA (the default scheduler) got back the epochs the trial reported before the kill
    assert re.search(r"\[carat\] ASHA: trial \w+: [1-9]\d* epoch\(s\) before the restore recorded", output), \
        _digest(output)
    resumed = re.search(r"\[carat\] resumed from \S+ after epoch (\d+)", output)
    # the loop appends history.jsonl just after reporting an epoch, so the kill may fall between the two
    assert resumed and 1 <= int(resumed.group(1)) <= done + 1, _digest(output)
    (row,) = _rows(tmp_path / "runs" / "k")
    assert row["run_dir"] == str(history.parent)
    assert [json.loads(line)["epoch"] for line in history.read_text().splitlines()] == list(range(EPOCHS))
    results = json.loads((history.parent / "results.json").read_text())
    assert results["best_epoch"] >= 1
    # the table, console and best.toml read the whole trial, the epochs before the kill included
    truth = [json.loads(line)["valid/micro_f1"] for line in history.read_text().splitlines()]
    assert float(row["best_metric"]) == pytest.approx(max(truth), abs=1e-9), (row, truth)
    assert int(row["best_epoch"]) == truth.index(max(truth)) + 1 == results["best_epoch"], (row, truth)
    assert int(row["epochs"]) == EPOCHS and row["status"] == "completed"
    assert float(row["test/macro_auc"]) == pytest.approx(results["test"]["macro_auc"])
    assert f"micro_f1 {max(truth):.4f} at epoch {truth.index(max(truth)) + 1}" in \
        (tmp_path / "runs" / "k" / "best.toml").read_text()


def _digest(output: str) -> str:
    """carat's own lines and the errors of a Ray run's output (its raw tail is mostly stack dumps)."""
    keep = [line for line in output.splitlines()
            if "[carat]" in line or re.search(r"Error|error:|Exception|Check failed|died|OOM", line)]
    return "\n".join(keep[-60:])
