"""carat's processes default to a sleeping OpenMP wait policy (carat.threads) and keep the user's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


WAIT_POLICY_PROBE = """
import os, runpy, sys
import carat.threads as threads
torch_loaded_at_call = []
original = threads.set_default_wait_policy
threads.set_default_wait_policy = lambda: (torch_loaded_at_call.append("torch" in sys.modules), original())
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"), torch_loaded_at_call)
"""


@pytest.mark.parametrize("command", ["carat.train", "carat.tune"])
@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_training_commands_set_the_default_before_torch_and_keep_the_users(command, given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", WAIT_POLICY_PROBE, command], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split("\n")[-2] == f"{expected} [False]"  # set once, before torch was loaded


def test_reading_a_configuration_has_no_side_effects_and_loads_no_torch():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, sys; import carat.config, carat.train, carat.model.config; "
            "print(os.environ.get('OMP_WAIT_POLICY'), sorted(m for m in ('torch', 'pyarrow', 'ray', 'deepspeed') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "[]"]


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
