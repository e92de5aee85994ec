"""Ray Train across two Ray nodes on one machine (``ray.cluster_utils.Cluster``): carat's TorchTrainer puts one
rank on each node, and every sample is seen exactly once per epoch."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_train_e2e import cpu_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


# The cluster's driver is its own process: a Ray driver inside pytest's process keeps Ray's core-worker threads
# until the interpreter exits (see tests/test_tune.py). Two nodes of one CPU each: two 1-CPU workers can only be
# placed one per node.
DRIVER = """
import sys
import ray
from ray.cluster_utils import Cluster
from carat.train.__main__ import main

cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"].get("CPU") == 1.0 for n in nodes), nodes
    rc = main(sys.argv[1:])
finally:
    ray.shutdown()
    cluster.shutdown()
sys.exit(rc)
"""


def test_two_node_ray_cluster_trains_with_a_rank_on_each_node(tmp_path):
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    shards = tmp_path / "shards"
    synthesize_corpus(shards, SynthConfig(scale=0.005, length_scale=0.05, seed=4),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    env = cpu_env(RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, "--preset", "tiny", f"--train.shard_dir={shards}",
         f"--train.storage_path={tmp_path / 'runs'}", "--run-name=two-nodes", "--train.epochs=2",
         "--train.num_workers=2", "--train.synth_if_missing=false", "--loader.num_workers=0",
         "--loader.remainder=pad", "--launcher", "ray"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "two-nodes"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["launcher"] == "ray"
    splits = collections.Counter(pq.read_table(shards / "manifest.parquet").column("split").to_pylist())
    # evaluation scores every clip exactly once (the loop raises on a duplicate key)
    assert results["valid"]["n_samples"] == splits["valid"] and results["test"]["n_samples"] == splits["test"]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for record in history:  # training (remainder=pad: no batch dropped): the ranks see the train split once
        assert record["perf/samples"] == splits["train"]
