"""carat's processes default to a sleeping OpenMP wait policy (carat.threads) and keep the user's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_training_package_sets_the_default_before_torch_and_keeps_the_users(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys; import carat.train; print(os.environ.get('OMP_WAIT_POLICY'), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    # the package itself loads no torch: the variable is in place before any carat module does
    assert out.stdout.split() == [expected, "False"]


def test_ray_workers_get_the_drivers_policy(tmp_path, monkeypatch):
    from carat.config import load_config
    from carat.train.launch import build_trainer

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    trainer = build_trainer(load_config(preset="tiny", overrides=["--train.num_workers=1"]), tmp_path / "run",
                            tmp_path / "shards", num_workers=1, cpus_per_rank=1.0)
    env_vars = trainer.run_config.worker_runtime_env["env_vars"]
    assert env_vars["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    trainer = build_trainer(load_config(preset="tiny", overrides=["--train.num_workers=1"]), tmp_path / "run",
                            tmp_path / "shards", num_workers=1, cpus_per_rank=1.0)
    assert trainer.run_config.worker_runtime_env["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"


def test_available_cpus_follow_the_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    from carat.threads import available_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert available_cpus(str(tmp_path)) == 8  # no cpu.max: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == 8
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus=2.5
    assert available_cpus(str(tmp_path)) == 3
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert available_cpus(str(tmp_path)) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})  # a SLURM cpuset on a big node
    assert available_cpus(str(tmp_path)) == 2
