"""`ray job submit --working-dir . -- python -m carat.train` against a local `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import secrets
import signal
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from carat.data.corpus.shards import StorageConfig
from carat.data.sources.synth import SynthConfig, synthesize_corpus
from tests.ports import free_port, wait_for_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def ray_cli() -> str:
    return shutil.which("ray") or str(Path(sys.executable).parent / "ray")


@pytest.fixture()
def ray_head():
    """A Ray head of its own, on free ports, in its own session: stopped by signalling that session, never by
    `ray stop`, which stops every Ray on the machine (another test's, a developer's)."""
    # Token authentication as a cluster deployment runs it (cluster/README.md): one token, passed in the
    # environment to the head and to the CLI, never read from ~/.ray/auth_token, which a fresh HOME lacks
    # (the test once passed only where an earlier ray.init had left that file behind).
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    dashboard = free_port()
    # Its own temp dir (short: Ray's socket paths must fit 107 bytes): `ray start` writes the head's address to
    # <temp dir>/ray_current_cluster, where any later local `ray.init()` (the next test's) would try to join it
    # once it is gone.
    temp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))
    head = subprocess.Popen([ray_cli(), "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()),
                             "--dashboard-port", str(dashboard), "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(dashboard, timeout=120)
        yield dict(env, RAY_ADDRESS=f"http://127.0.0.1:{dashboard}")
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's daemons and workers share its session
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submit_trains_on_a_running_cluster(ray_head, tmp_path):
    shards = tmp_path / "shards"
    synthesize_corpus(shards, SynthConfig(scale=0.005, length_scale=0.05, seed=3),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    storage = tmp_path / "runs"
    env = ray_head
    proc = subprocess.run(
        [ray_cli(), "job", "submit", "--working-dir", ".", "--runtime-env-json",
         json.dumps({"excludes": ["shards/", "runs/", ".git/"], "env_vars": {"DS_ACCELERATOR": "cpu"}}), "--",
         "python", "-m", "carat.train", f"--train.shard_dir={shards}", f"--train.storage_path={storage}",
         "--run-name=job", "--train.epochs=1", "--loader.num_workers=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "succeeded" in output
    results = json.loads((storage / "job" / "results.json").read_text())
    assert results["world_size"] == 2 and results["launcher"] == "ray"
    env_report = json.loads((storage / "job" / "environment.json").read_text())
    assert env_report["world_size"] == 2
