"""The shipped SLURM recipes, unchanged, on a real two-host cluster: cluster/testbed (network, UTS, PID and mount
namespaces; real munged, slurmctld, slurmd, sshd), SLURM's real sbatch/srun/scancel, Ray's `symmetric-run`,
DeepSpeed's pdsh launcher. Every test proves that both hosts took part (two distinct hosts and addresses among
the ranks), and the faults end within a bound and resume without losing an epoch."""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "cluster" / "testbed"
SLURM = REPO / "cluster" / "slurm"
JOB_TIMEOUT_S = 420


def why_no_testbed() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no iproute2 (`ip`)"
    probe = subprocess.run(["ip", "netns", "add", "carat-tb-pytest"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", "carat-tb-pytest"], capture_output=True)
    return None if probe.returncode == 0 else f"cannot make network namespaces: {probe.stderr.strip()}"


@dataclass
class SharedDirs:
    shared: Path
    config: Path

    @property
    def shards(self) -> Path:
        return self.shared / "shards"

    def runs(self, name: str) -> Path:
        return self.shared / "runs" / name


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    reason = why_no_testbed()
    if reason:
        pytest.skip(f"the two-host testbed cannot run here: {reason}")
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    up = subprocess.run([str(TESTBED / "up")], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    # The machine's file system is the cluster's shared one: tmp_path is seen by every host.
    shared = tmp_path_factory.mktemp("testbed")
    synthesize_corpus(shared / "shards", SynthConfig(scale=0.005, length_scale=0.05, seed=2),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    config = shared / "tiny.toml"
    config.write_text('preset = "tiny"\n[train]\nepochs = 1\nlog_every = 1000\n[loader]\nnum_workers = 0\n'
                      'remainder = "pad"\n')
    try:
        yield SharedDirs(shared, config)
    finally:
        subprocess.run([str(TESTBED / "down")], capture_output=True, timeout=120)


def on(host: str, *argv: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(TESTBED / "on"), host, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, **kwargs)


def job_env(tb: SharedDirs, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RAY_", "MASTER_", "GLOO_")) and k not in ("RANK", "LOCAL_RANK",
                                                                                    "WORLD_SIZE", "LOCAL_SIZE")}
    env.update(DATA=str(tb.shared), CONFIG=str(tb.config), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


def sbatch_argv(tb: SharedDirs, script: str, nodes: int, name: str, wait: bool) -> list[str]:
    return ["sbatch", "--parsable", *(["--wait"] if wait else []), f"--nodes={nodes}", f"--job-name={name}",
            f"--output={tb.shared / name}-%j.out", str(SLURM / script)]


@dataclass
class Job:
    id: str
    rc: int
    log: str


def run_job(tb: SharedDirs, script: str, nodes: int, name: str, **env: str) -> Job:
    proc = on("ctl", *sbatch_argv(tb, script, nodes, name, wait=True), env=job_env(tb, **env),
              timeout=JOB_TIMEOUT_S)
    job_id = proc.stdout.split()[0].split(";")[0] if proc.stdout.split() else "?"
    log_file = tb.shared / f"{name}-{job_id}.out"
    log = log_file.read_text(errors="replace") if log_file.is_file() else proc.stdout + proc.stderr
    return Job(job_id, proc.returncode, log)


def submit(tb: SharedDirs, script: str, nodes: int, name: str, **env: str) -> str:
    proc = on("ctl", *sbatch_argv(tb, script, nodes, name, wait=False), env=job_env(tb, **env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(";")[0].strip()


def job_state(job_id: str) -> str:
    proc = on("ctl", "scontrol", "show", "job", job_id, "-o")
    return next((f.split("=", 1)[1] for f in proc.stdout.split() if f.startswith("JobState=")), "GONE")


def wait_for_job_end(job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job_state(job_id)} after {timeout_s:.0f} s")


def wait_for_epochs(run: Path, epochs: int, timeout_s: float) -> None:
    history = run / "history.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if history.is_file() and len(history.read_text().splitlines()) >= epochs:
            return
        time.sleep(0.2)
    raise AssertionError(f"{history} never reached {epochs} epoch(s)")


def carat_processes(host: str) -> list[str]:
    proc = on(host, "ps", "-eo", "args")
    return [line for line in proc.stdout.splitlines()
            if "carat.train" in line or "raylet" in line or "gcs_server" in line]


def assert_two_hosts(run: Path) -> None:
    environment = json.loads((run / "environment.json").read_text())
    ranks = environment["ranks"]
    assert len(ranks) == environment["world_size"] == 2, ranks
    assert {r["host"] for r in ranks} == {"node1", "node2"}, ranks
    addresses = {r["address"] for r in ranks}
    assert addresses == {"10.250.77.1", "10.250.77.2"}, ranks  # the testbed's, never loopback


def assert_every_sample_once(tb: SharedDirs, run: Path, epochs: int) -> dict:
    splits = collections.Counter(pq.read_table(tb.shards / "manifest.parquet").column("split").to_pylist())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(epochs))
    for record in history:  # remainder=pad: the two ranks together see the train split exactly once
        assert record["perf/samples"] == splits["train"], record
    results = json.loads((run / "results.json").read_text())
    assert results["valid"]["n_samples"] == splits["valid"] and results["test"]["n_samples"] == splits["test"]
    return results


# -- the testbed itself ------------------------------------------------------------------------------------
def test_testbed_hosts_have_their_own_names_addresses_processes_and_debians_hosts_file(testbed):
    for host, address in (("node1", "10.250.77.1"), ("node2", "10.250.77.2")):
        assert on(host, "hostname").stdout.strip() == host
        assert f"inet {address}/24" in on(host, "ip", "-4", "-o", "addr", "show", "eth0").stdout
        # Debian's default: the host's own name resolves to loopback (what the recipes must not rely on)
        assert on(host, "hostname", "--ip-address").stdout.split()[0] == "127.0.1.1"
        processes = on(host, "ps", "-eo", "args").stdout
        assert "slurmd" in processes and "slurmctld" not in processes and "pytest" not in processes
    assert on("node1", "ssh", "node2", "hostname").stdout.strip() == "node2"  # the testbed's key, no prompt
    sinfo = on("ctl", "sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
    assert sinfo == ["node1", "idle", "node2", "idle"]


def test_testbed_up_is_idempotent(testbed):
    again = subprocess.run([str(TESTBED / "up")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already up" in again.stdout


# -- SLURM with Ray ------------------------------------------------------------------------------------------
def test_ray_sbatch_trains_across_both_hosts_with_the_one_host_results(testbed):
    two = run_job(testbed, "ray.sbatch", 2, "ray2", EXTRA_ARGS="--run-name=ray-two")
    assert two.rc == 0, two.log[-4000:]
    assert "Ray head 10.250.77.1:" in two.log  # a routable address, not 127.0.1.1
    run = testbed.runs("ray-two")
    assert_two_hosts(run)
    results = assert_every_sample_once(testbed, run, epochs=1)
    assert results["launcher"] == "ray"
    assert "micro_f1" in two.log and "n_samples" in two.log  # the results table
    one = run_job(testbed, "ray.sbatch", 1, "ray1", EXTRA_ARGS="--run-name=ray-one")
    assert one.rc == 0, one.log[-4000:]
    single = json.loads((testbed.runs("ray-one") / "results.json").read_text())
    ranks = json.loads((testbed.runs("ray-one") / "environment.json").read_text())["ranks"]
    assert {r["host"] for r in ranks} == {"node1"} and len(ranks) == 2
    # the same two ranks, the same batches: two hosts change where they run, not what they compute
    for split in ("valid", "test"):
        for metric in ("micro_f1", "macro_f1", "macro_auc"):
            assert results[split][metric] == pytest.approx(single[split][metric], abs=1e-6), (split, metric)
    for node in ("node1", "node2"):
        assert not carat_processes(node), f"{node} kept Ray or carat running after the job"


def test_ray_sbatch_tune_sweeps_across_both_hosts(testbed):
    job = run_job(testbed, "ray.sbatch", 2, "tune2", CARAT_COMMAND="tune",
                  EXTRA_ARGS="--tune.num_samples=2 --tune.workers_per_trial=2 --tune.sweep_name=sweep "
                             "--tune.scheduler=fifo")
    assert job.rc == 0, job.log[-4000:]
    sweep = testbed.runs("sweep")
    with (sweep / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(row["status"] == "completed" for row in rows), rows
    for row in rows:  # each trial's two ranks, one on each host
        assert_two_hosts(Path(row["run_dir"]))
    assert (sweep / "best.toml").is_file()


def test_ray_sbatch_trains_into_a_bucket_across_both_hosts(testbed, testbed_s3):
    """`--train.storage_path=s3://...` under Ray over two hosts: Ray Train writes its checkpoints into the bucket
    itself, each host keeps its own copy of carat's run files, and rank 0 may train on either host."""
    from carat.train.checkpoint import COMPLETE_FILE

    aws, staging, storage = testbed_s3, testbed.shared / "staging", f"s3://{BUCKET}/runs"
    env = {**aws, "CARAT_STAGING_DIR": str(staging)}
    ray = run_job(testbed, "ray.sbatch", 2, "ray-bucket", **{**env, "RUN_NAME": "ray-bucket"},
                  EXTRA_ARGS=f"--run-name=ray-bucket --train.storage_path={storage} --train.epochs=2")
    assert ray.rc == 0, ray.log[-4000:]
    copies = host_copies(staging, "ray-bucket")
    assert_two_hosts(copies["node1"])
    results = assert_every_sample_once(testbed, copies["node1"], epochs=2)
    assert results["launcher"] == "ray" and results["world_size"] == 2
    objects = bucket_objects(testbed, f"{storage}/ray-bucket", aws)
    assert {"history.jsonl", "results.json", "best/best/carat_complete.json"} <= objects, sorted(objects)
    ray_checkpoints = {name.split("/")[0] for name in objects if name.startswith("checkpoint_") and "/" in name}
    assert ray_checkpoints, sorted(objects)
    for checkpoint in ray_checkpoints:  # each holds both ranks' files (each rank sent its own) and the marker
        tags = {name.split("/")[1] for name in objects if name.startswith(f"{checkpoint}/") and name.count("/") == 2}
        assert any({f"{checkpoint}/{tag}/{f}" for f in ("rng_rank0.pt", "rng_rank1.pt", COMPLETE_FILE)} <= objects
                   for tag in tags), sorted(n for n in objects if n.startswith(checkpoint))


def test_ray_rank_killed_on_the_second_host_mid_epoch_restarts_from_the_last_checkpoint(testbed):
    """Ray Train's FailureConfig (train.max_failures): node2's rank is killed in epoch 2, the worker group
    restarts from the epoch-1 checkpoint within the same job, and every epoch is trained exactly once."""
    run = testbed.runs("ray-kill")
    job_id = submit(testbed, "ray.sbatch", 2, "ray-kill", EXTRA_ARGS="--run-name=ray-kill --train.epochs=3")
    wait_for_epochs(run, 1, timeout_s=240)
    # history.jsonl is written before Ray Train registers the epoch's checkpoint: wait for the checkpoint
    # Ray persisted, then give its controller a moment (a kill before that restarts from scratch, correctly)
    deadline = time.monotonic() + 60
    while not list(run.glob("checkpoint_*/epoch-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    assert on("node2", "pkill", "-9", "-f", "RayTrainWorker").returncode == 0, "no rank on node2 to kill"
    assert wait_for_job_end(job_id, timeout_s=300) == "COMPLETED"
    log = (testbed.shared / f"ray-kill-{job_id}.out").read_text(errors="replace")
    assert "resumed from" in log and "after epoch 1" in log
    assert_two_hosts(run)
    assert_every_sample_once(testbed, run, epochs=3)


def test_a_node_that_cannot_start_ends_the_ray_job_naming_it(testbed):
    """node2 unplugged: the job fails within a bound with an error naming node2 (SLURM cannot start the step
    there, or Ray on it cannot reach the head), and nothing is left running on node1."""
    job, elapsed = run_with_node2_unplugged(testbed, "ray.sbatch", "ray-unplugged",
                                            RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT="60",
                                            EXTRA_ARGS="--run-name=ray-unplugged")
    assert job.rc != 0
    assert "node2" in job.log, job.log[-3000:]
    assert elapsed < 240, f"took {elapsed:.0f} s"
    assert not carat_processes("node1")
    wait_for_idle_nodes()


def run_with_node2_unplugged(tb: SharedDirs, script: str, name: str, **env: str) -> tuple[Job, float]:
    """A two-node job while node2's cable is out (SLURM still believes it is up); the job and its seconds."""
    subprocess.run([str(TESTBED / "link"), "node2", "down"], check=True)
    try:
        start = time.monotonic()
        job = run_job(tb, script, 2, name, **env)
        return job, time.monotonic() - start
    finally:
        subprocess.run([str(TESTBED / "link"), "node2", "up"], check=True)


def wait_for_idle_nodes(timeout_s: float = 120) -> None:
    """After a fault, SLURM may have marked a node down: resume it and wait until both take jobs again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = dict(line.split() for line in on("ctl", "sinfo", "-h", "-N", "-o", "%N %t").stdout.splitlines())
        if all(s == "idle" for s in states.values()) and len(states) == 2:
            return
        for node, state in states.items():
            if state.startswith(("down", "drain", "fail")):
                on("ctl", "scontrol", "update", f"nodename={node}", "state=resume")
        time.sleep(1)
    raise AssertionError(f"nodes not idle again: {states}")


# -- SLURM with deepspeed ------------------------------------------------------------------------------------
def test_deepspeed_sbatch_second_host_killed_mid_epoch_then_rerun_resumes(testbed):
    """Two ranks over pdsh/ssh (gloo across the two addresses); all of node2's carat processes are killed in
    epoch 2; the job fails promptly (no rank hangs on its peer); the rerun with the same RUN_NAME resumes after
    epoch 1 and trains every epoch exactly once."""
    run = testbed.runs("ds-kill")
    job_id = submit(testbed, "deepspeed.sbatch", 2, "ds-kill", RUN_NAME="ds-kill",
                    EXTRA_ARGS="--train.epochs=4")
    wait_for_epochs(run, 1, timeout_s=240)
    killed = on("node2", "pkill", "-9", "-f", "carat.train")
    assert killed.returncode == 0, "no carat process on node2 to kill"
    assert wait_for_job_end(job_id, timeout_s=120) == "FAILED"
    assert not carat_processes("node1") and not carat_processes("node2")
    epochs_before = len((run / "history.jsonl").read_text().splitlines())
    assert 1 <= epochs_before < 4
    job = run_job(testbed, "deepspeed.sbatch", 2, "ds-resume", RUN_NAME="ds-kill", EXTRA_ARGS="--train.epochs=4")
    assert job.rc == 0, job.log[-4000:]
    assert f"resumed from {run / 'checkpoints'}" in job.log and f"after epoch {epochs_before}" in job.log
    assert (testbed.shared / "jobs" / job_id / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert_two_hosts(run)
    results = assert_every_sample_once(testbed, run, epochs=4)
    assert results["launcher"] == "deepspeed" and results["world_size"] == 2


def test_scancel_mid_epoch_stops_every_rank_on_both_hosts_and_the_rerun_resumes(testbed):
    run = testbed.runs("ds-scancel")
    job_id = submit(testbed, "deepspeed.sbatch", 2, "ds-scancel", RUN_NAME="ds-scancel",
                    EXTRA_ARGS="--train.epochs=3")
    wait_for_epochs(run, 1, timeout_s=240)
    assert on("ctl", "scancel", job_id).returncode == 0
    assert wait_for_job_end(job_id, timeout_s=60) == "CANCELLED"
    deadline = time.monotonic() + 30
    while (carat_processes("node1") or carat_processes("node2")) and time.monotonic() < deadline:
        time.sleep(1)
    assert not carat_processes("node1") and not carat_processes("node2"), "ranks outlived scancel"
    job = run_job(testbed, "deepspeed.sbatch", 2, "ds-scancel-rerun", RUN_NAME="ds-scancel",
                  EXTRA_ARGS="--train.epochs=3")
    assert job.rc == 0, job.log[-4000:]
    assert "resumed from" in job.log
    assert_every_sample_once(testbed, run, epochs=3)


def test_deepspeed_sbatch_with_the_second_host_unreachable_fails_naming_it(testbed):
    job, elapsed = run_with_node2_unplugged(testbed, "deepspeed.sbatch", "ds-unplugged", RUN_NAME="ds-unplugged",
                                            SSH_TIMEOUT="10")
    assert job.rc != 0
    assert "node node2 is not reachable over ssh" in job.log, job.log[-3000:]
    assert elapsed < 120, f"took {elapsed:.0f} s"
    assert not testbed.runs("ds-unplugged").exists()  # nothing started
    wait_for_idle_nodes()


CTL_ADDRESS = "10.250.77.254"
BUCKET = "carat-testbed"
LIST_OBJECTS = ("import json, sys; from carat.storage import ObjectPath; where = ObjectPath(sys.argv[1]); "
                "print(json.dumps(sorted(where.walk_files()) if where.is_dir() else []))")
MAKE_BUCKET = f"from carat.storage import ObjectPath; ObjectPath('s3://{BUCKET}').fs.mkdir('{BUCKET}')"


@pytest.fixture(scope="module")
def testbed_s3(testbed):
    """A real S3 server (moto's) on the testbed's controller, reached by the nodes over the testbed's network;
    yields the AWS settings of a user whose keys sit in a credentials file every node reads."""
    from tests.ports import free_port

    tb = testbed
    port = free_port()
    credentials = tb.shared / "aws-credentials"
    credentials.write_text("[carat]\naws_access_key_id = testbed\naws_secret_access_key = testbed-secret\n")
    aws = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_PROFILE": "carat",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{CTL_ADDRESS}:{port}"}
    server = subprocess.Popen([str(TESTBED / "on"), "ctl", sys.executable, "-m", "moto.server", "-H", CTL_ADDRESS,
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while on("ctl", sys.executable, "-c", MAKE_BUCKET, env={**job_env(tb), **aws}).returncode != 0:
            assert time.monotonic() < deadline and server.poll() is None, "moto's server did not start on ctl"
            time.sleep(0.5)
        yield aws
    finally:
        on("ctl", "pkill", "-f", "moto.server")
        server.wait(timeout=30)


def bucket_objects(tb: SharedDirs, url: str, aws: dict[str, str]) -> set[str]:
    listing = on("ctl", sys.executable, "-c", LIST_OBJECTS, url, env={**job_env(tb), **aws})
    assert listing.returncode == 0, listing.stderr
    return set(json.loads(listing.stdout))


def host_copies(staging: Path, run_name: str) -> dict[str, Path]:
    return {host: next((staging / host / "runs").glob(f"*/{run_name}")) for host in ("node1", "node2")}


def test_deepspeed_sbatch_trains_into_a_bucket_without_a_shared_run_directory_and_resumes_from_it(
        testbed, testbed_s3):
    """`--train.storage_path=s3://...` over two hosts: each host stages its own copy of the run (named after the
    host, so even a shared staging folder is not shared), the bucket gets every rank's files of each checkpoint,
    and a rerun on hosts whose copies are gone resumes from the bucket alone."""
    from carat.train.checkpoint import COMPLETE_FILE

    aws = testbed_s3
    staging = testbed.shared / "staging"
    storage = f"s3://{BUCKET}/runs"
    env = {**aws, "CARAT_STAGING_DIR": str(staging), "RUN_NAME": "ds-bucket"}
    args = f"--train.storage_path={storage} --train.epochs=4"
    job_id = submit(testbed, "deepspeed.sbatch", 2, "ds-bucket", EXTRA_ARGS=args, **env)
    deadline = time.monotonic() + 240
    while not list((staging / "node1").glob("runs/*/ds-bucket/history.jsonl")):
        assert time.monotonic() < deadline, "the run never wrote its history"
        time.sleep(0.5)
    wait_for_epochs(host_copies(staging, "ds-bucket")["node1"], 1, timeout_s=240)
    assert on("ctl", "scancel", job_id).returncode == 0
    assert wait_for_job_end(job_id, timeout_s=60) == "CANCELLED"
    copies = host_copies(staging, "ds-bucket")
    # no shared run directory: node2's checkpoints hold node2's partition, not rank 0's files
    ds_files = sorted(p.name for p in (copies["node2"] / "checkpoints").rglob("*_optim_states.pt"))
    assert ds_files and all(name.startswith("zero_pp_rank_1_") for name in ds_files), ds_files
    assert not (copies["node2"] / "history.jsonl").exists()
    assert_two_hosts(copies["node1"])
    objects = bucket_objects(testbed, f"{storage}/ds-bucket", aws)
    markers = [m for m in copies["node1"].rglob(COMPLETE_FILE) if ".staging" not in m.as_posix()]
    assert markers
    for marker in markers:  # every file a marker vouches for is in the bucket, both ranks' among them
        folder = marker.parent.relative_to(copies["node1"]).as_posix()
        if f"{folder}/{COMPLETE_FILE}" not in objects:
            continue  # committed locally as the job was cancelled, not yet announced
        listed = {f"{folder}/{name}" for name in json.loads(marker.read_text())["files"]}
        assert listed <= objects, sorted(listed - objects)
        assert any("zero_pp_rank_1_" in name for name in listed), listed
    assert "checkpoints/latest" in objects

    shutil.rmtree(staging)  # both hosts' copies gone: the bucket is all a rerun has
    second = run_job(testbed, "deepspeed.sbatch", 2, "ds-bucket-resume", EXTRA_ARGS=args, **env)
    assert second.rc == 0, second.log[-4000:]
    assert "resumed from" in second.log, second.log[-4000:]
    fetched = [line for line in second.log.splitlines() if "files of the run into" in line]
    assert {"/node1/", "/node2/"} <= {host for host in ("/node1/", "/node2/") for line in fetched if host in line}
    copies = host_copies(staging, "ds-bucket")
    results = assert_every_sample_once(testbed, copies["node1"], epochs=4)
    assert results["launcher"] == "deepspeed" and results["world_size"] == 2
    assert_two_hosts(copies["node1"])
    bucket_history = bucket_objects(testbed, f"{storage}/ds-bucket", aws)
    assert {"history.jsonl", "results.json", "checkpoints/latest"} <= bucket_history
