"""Launchers: they start processes and call the one loop in :mod:`carat.train.loop`; nothing else.

- ``ray``: a Ray Train ``TorchTrainer`` (local Ray, or the cluster in ``RAY_ADDRESS`` / a ``ray job``), one
  worker per GPU or two on CPU, checkpoints reported with ``ray.train.report``, ``FailureConfig`` restarts.
- ``deepspeed``: this process is one rank started by ``deepspeed --num_gpus N --module carat.train``.
- ``none``: one process, a world of one.
All three write the same run directory (:mod:`carat.train.rundir`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carat.config import CaratConfig, config_from_dict, config_to_dict
from carat.errors import CaratError
from carat.storage import arrow_filesystem, as_location, is_url
from carat.threads import WAIT_POLICY_ENV, available_cpus, wait_policy
from carat.train import dist
from carat.train.network import bind_gloo_to_master_route
from carat.train.checkpoint import usable_ray_checkpoint
from carat.train.runsync import RAY_TRAIN_OBJECTS, fetch_run_files, host_mirror, staged_storage
from carat.train.loop import WorkerContext, run_training


def use_gpu(cfg: CaratConfig) -> bool:
    return bool(cfg.train.use_gpu if cfg.train.use_gpu is not None else torch.cuda.is_available())


def prepare_worker_env(gpu: bool) -> None:
    """Per-process settings that must precede DeepSpeed's first import of its accelerator."""
    # DeepSpeed 0.19 calls a torch collective that torch 2.13 deprecates, once per step: keep logs readable.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*all_gather_into_tensor.*deprecated")
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    # DeepSpeed's CPU accelerator counts local ranks from LOCAL_SIZE (else NUMA nodes: its CI once ran
    # every "multi-rank" test on one rank because of that).
    os.environ.setdefault("LOCAL_SIZE", str(local_world))
    if not gpu and not os.environ.get("OMP_NUM_THREADS"):
        # The user's (or Ray's: it sets OMP_NUM_THREADS to the CPUs a worker reserved) thread count wins;
        # otherwise share the CPUs this process may use (its affinity and cgroup quota, not the host's count)
        # between the local ranks. Oversubscribed OpenMP threads spin-wait: measured,
        # a run beside two other jobs on 2 cores fell from ~30 to ~1 sample/s.
        torch.set_num_threads(max(1, available_cpus() // local_world))


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op. The op serves only
    ``inference_all_reduce``; training's all-reduces go through torch.distributed (gloo). Its first build costs
    ~40 s on 2 cores (measured; then cached in ~/.cache/torch_extensions), most of a fresh machine's quickstart
    start-up. DeepSpeed keeps its compatibility table in one module-level dict so that edits persist."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_process_group(gpu: bool) -> None:
    """Join (or, with no launcher around, create) the process group and DeepSpeed's view of it."""
    import deepspeed
    import torch.distributed as tdist

    backend = "nccl" if gpu else "gloo"
    if not gpu:
        bind_gloo_to_master_route()
    if not dist.is_distributed() and "MASTER_ADDR" not in os.environ:
        # A world of one: a file store needs no port, so nothing can race us for one.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"})
        store_file = tempfile.NamedTemporaryFile(prefix="carat-store-", delete=False).name
        # A world of one never reopens its store: remove the file at exit, not leave one per run in /tmp.
        atexit.register(Path(store_file).unlink, missing_ok=True)
        tdist.init_process_group(backend, store=tdist.FileStore(store_file, 1), rank=0, world_size=1)
    if not gpu:
        skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if gpu:
        torch.cuda.set_device(dist.local_rank())


def checkpoint_to_resume(root: Path) -> Path | None:
    """A run directory's checkpoints folder, if an earlier attempt of this run left any checkpoint there (the
    loop picks the newest complete tag; a deleted `latest` must not mean a silent fresh start)."""
    from carat.train.checkpoint import candidate_tags

    return root if (root / "latest").is_file() or candidate_tags(root) else None


# -- deepspeed launcher and single process -----------------------------------------------------------------
def launch_in_process(cfg: CaratConfig, run_dir: Path, shard_dir: Path, launcher: str) -> dict[str, Any]:
    gpu = use_gpu(cfg)
    prepare_worker_env(gpu)
    init_process_group(gpu)
    # Every rank must agree on the run name even if their clocks straddle a second; the folder above it is
    # this host's (a run in object storage is staged on each host, carat.train.runsync).
    run_dir = run_dir.parent / dist.broadcast_object(run_dir.name)
    host_copy = dist.rank() != 0 and dist.local_rank() == 0 and is_url(cfg.train.storage_path)
    with host_mirror(run_dir, cfg.train.storage_path, host_copy):
        dist.barrier()  # every host holds the run before any rank looks for a checkpoint to resume
        checkpoints = run_dir / "checkpoints"
        ctx = WorkerContext(
            launcher=launcher, run_dir=run_dir, shard_dir=shard_dir, report=lambda metrics, path: None,
            resume_dir=checkpoint_to_resume(checkpoints), checkpoint_root=checkpoints,
            host_copy=host_copy,
        )
        return run_training(cfg, ctx)


def leave_process_group() -> None:
    """Leave the process group once the command is done (``carat.train``'s main; an ensemble's members share
    one group): a gloo group torn down by static destructors at interpreter exit aborted a rank after its
    results were written (`terminate called without an active exception`, -6). Through DeepSpeed, which drops
    its own references to the group too, so a later command in this process (tests call ``main`` repeatedly)
    starts a fresh one."""
    tdist = sys.modules.get("torch.distributed")  # never imports torch for a command that did not need it
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


# -- Ray Train -----------------------------------------------------------------------------------------------
def _scalar_metrics(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _BelowLevelFrom(logging.Filter):
    """Drops records under ``level`` that were logged from files under ``directory``."""

    def __init__(self, directory: str, level: int) -> None:
        super().__init__()
        self.directory, self.level = directory, level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or not record.pathname.startswith(self.directory)


def quiet_ray_train_console(level_name: str) -> None:
    """Apply train.ray_log_level to the console lines Ray Train's worker code logs outside the ``ray.train``
    logger (that one obeys RunConfig's LoggingConfig). Ray 2.60 logs every report ("Reporting training result
    N: <all metrics>") under a logger named by its file path, which propagates to the root logger; its log
    files under the Ray session keep the records."""
    import ray.train

    quiet = _BelowLevelFrom(os.path.dirname(ray.train.__file__), logging.getLevelName(level_name))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(quiet)


def ray_worker(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer (Ray has created the gloo/NCCL process group)."""
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    quiet_ray_train_console(cfg.train.ray_log_level)
    gpu = use_gpu(cfg)
    prepare_worker_env(gpu)
    init_process_group(gpu)

    def report(record: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(_scalar_metrics(record), checkpoint=checkpoint)

    place = RayRunPlace.of_this_worker(loop_config, ray.train.get_context().get_local_rank())

    def run(resume_dir: Path | None) -> None:
        ctx = WorkerContext(launcher="ray", run_dir=place.run_dir, shard_dir=as_location(loop_config["shard_dir"]),
                            report=report, resume_dir=resume_dir, host_copy=place.host_copy)
        run_training(cfg, ctx)

    with host_mirror(place.run_dir, place.storage_url or "", place.mirrored, owner=dist.rank() == 0,
                     not_fetched=RAY_TRAIN_OBJECTS):
        dist.barrier()  # every host holds the run before any rank reads it
        final = FinalError(place.run_dir, loop_config["attempt"], place.storage_url)
        final.raise_if_recorded()
        try:
            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                run(None)
            else:
                with checkpoint.as_directory() as directory:
                    run(usable_ray_checkpoint(Path(directory), place.run_dir))
        except CaratError as error:
            final.record(error)
            raise


@dataclass(frozen=True)
class RayRunPlace:
    """Where a Ray worker keeps the run directory. On a volume: the driver's path, shared by every node. In
    object storage (``storage_url``): each host's own staged copy (carat.train.runsync), kept and mirrored by one
    worker per host (``mirrored``: rank 0, and local rank 0 elsewhere, ``host_copy``)."""

    run_dir: Path
    storage_url: str | None
    host_copy: bool
    mirrored: bool

    @staticmethod
    def of_this_worker(loop_config: dict[str, Any], local_rank: int) -> "RayRunPlace":
        run_dir, url = Path(loop_config["run_dir"]), loop_config.get("storage_url")
        if not url:
            return RayRunPlace(run_dir, None, False, False)
        keeps = dist.rank() == 0 or local_rank == 0
        return RayRunPlace(staged_storage(url) / run_dir.name, url, keeps and dist.rank() != 0, keeps)


class FinalError:
    """A carat error of one ``fit``, kept so Ray's restart does not run into it again.

    carat's errors are decisions (divergence, bad data, a refused resume, a typo), not crashes: restarting the
    worker group from the last checkpoint (``FailureConfig``) would only train up to the same divergence
    again. Ray Train 2.60 has no hook to choose which failures it retries, so the rank that raises one writes
    it into the run directory, keyed by this fit's attempt id, and the restarted workers raise it at once.
    """

    def __init__(self, run_dir: Path, attempt: str, storage_url: str | None = None):
        self.path = run_dir / f".final-error-{attempt}.json"
        self.remote = as_location(storage_url) / run_dir.name / self.path.name if storage_url else None
        """A run in object storage has no directory every node sees: there the bucket holds the error."""

    def record(self, error: CaratError) -> None:
        from carat.atomic import write_text_atomic

        text = json.dumps({"type": type(error).__name__, "message": str(error)})
        with contextlib.suppress(OSError):  # a run directory gone or read-only: Ray retries as before
            write_text_atomic(self.path, text)
        if self.remote is not None:
            with contextlib.suppress(CaratError):  # the store down as well: Ray retries as before
                self.remote.write_bytes(text.encode())

    def raise_if_recorded(self) -> None:
        try:
            recorded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            recorded = self._recorded_remotely()
        if recorded is not None:
            raise CaratError(recorded["message"])

    def _recorded_remotely(self) -> dict[str, Any] | None:
        if self.remote is None:
            return None
        try:
            return json.loads(self.remote.read_bytes()) if self.remote.is_file() else None
        except (CaratError, ValueError):
            return None

    @staticmethod
    def clear(run_dir: Path, storage_url: str | None = None) -> None:
        for path in run_dir.glob(".final-error-*.json"):
            path.unlink(missing_ok=True)
        if storage_url:  # best effort: a leftover is keyed by its fit's attempt id, which no later fit has
            with contextlib.suppress(CaratError):
                for path in (as_location(storage_url) / run_dir.name).glob(".final-error-*.json"):
                    path.unlink(missing_ok=True)


def _cluster_gpus() -> float | None:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else None


def ray_use_gpu(cfg: CaratConfig) -> bool:
    """GPU workers? train.use_gpu, else whether the Ray cluster has GPUs: the driver may sit on a CPU-only head
    node (KubeRay, SLURM login-type heads) while the workers have GPUs."""
    if cfg.train.use_gpu is not None:
        return cfg.train.use_gpu
    gpus = _cluster_gpus()
    return gpus >= 1 if gpus is not None else use_gpu(cfg)


def _cluster_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) if ray.is_initialized() else 1


def ray_worker_count(cfg: CaratConfig, gpu: bool) -> int:
    """train.num_workers, else one per GPU of the Ray cluster (or of this machine), or on CPU one per node of
    the cluster (at least 2)."""
    if cfg.train.num_workers:
        return cfg.train.num_workers
    if not gpu:
        return max(2, _cluster_nodes())
    gpus = _cluster_gpus()
    return max(1, int(gpus) if gpus is not None else torch.cuda.device_count())


def cpus_per_worker(cfg: CaratConfig, num_workers: int, cluster_cpus: float | None) -> float:
    """CPUs each Ray worker reserves: its own process plus the loader's worker processes, never more than the
    cluster can give every worker (Ray then sets OMP_NUM_THREADS to what it reserved, which the worker's
    thread count follows: :func:`prepare_worker_env`)."""
    wanted = 1.0 + cfg.loader.num_workers
    if cluster_cpus is None:
        return wanted
    return max(1.0, min(wanted, float(int(cluster_cpus // max(1, num_workers)))))


def ensure_ray() -> None:
    """Join RAY_ADDRESS (set by `ray job submit` or the user) or start a local Ray, with its dashboard: Ray
    Train's placement-group cleaner polls the state API it serves (without it: warnings each second)."""
    import ray

    if not ray.is_initialized():
        if starts_a_local_ray():
            quiet_local_ray_defaults()
        ray.init(log_to_driver=True, configure_logging=False)


def starts_a_local_ray() -> bool:
    """Whether ``ray.init()`` here would start a new single-machine Ray (no RAY_ADDRESS, no running local
    cluster) rather than join one."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(None) is None
    except Exception:  # a private helper of Ray 2.60: if it changes, join or start as Ray decides, unquieted
        return False


def quiet_local_ray_defaults() -> None:
    """Settings for the Ray that carat starts for itself, so a quickstart's console holds carat's lines only.

    Ray 2.60 enables token authentication on a new local cluster and says so in a warning ("Token authentication
    is enabled for this Ray cluster"): authentication stays on, the notice is dropped (setting RAY_AUTH_MODE to
    silence it makes this Ray fail to start its GCS). Ray Train's preemption watcher (node drains on a cluster of
    spot or preemptible nodes) has nothing to watch on one machine, and its actor logs a core-worker error line
    ("PreemptionWatcher ... max_restarts > 0") at every start: it is off unless the user set
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER. A cluster joined through RAY_ADDRESS gets neither change."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: "Token authentication is enabled" not in record.getMessage())
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def build_trainer(cfg: CaratConfig, run_dir: Path, shard_dir: Path, callbacks: list | None = None,
                  num_workers: int | None = None, cpus_per_rank: float | None = None,
                  storage_url: str | None = None):
    """The one TorchTrainer of carat: ``python -m carat.train`` fits it, each ``carat.tune`` trial builds it
    with its own config, run directory (the Ray run name is the directory name: rerunning resumes it) and
    Tune's report callback. ``storage_url``: the run lives in object storage under it (``run_dir`` is the
    driver's staged copy); Ray Train then keeps its checkpoints there itself, so every node reaches them."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpu = ray_use_gpu(cfg)
    workers = num_workers or ray_worker_count(cfg, gpu)
    if cpus_per_rank is None:
        cpus_per_rank = cpus_per_worker(cfg, workers, ray.cluster_resources().get("CPU") if ray.is_initialized()
                                        else None)
    resources = {"CPU": cpus_per_rank, **({"GPU": 1} if gpu else {})}
    return TorchTrainer(
        ray_worker,
        train_loop_config={"config": config_to_dict(cfg), "run_dir": str(run_dir), "shard_dir": str(shard_dir),
                           "attempt": uuid.uuid4().hex, "storage_url": storage_url},
        # GPU ranks pack (one per GPU, NVLink within a node); CPU ranks spread, so every node's cores work
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources,
                                     placement_strategy="PACK" if gpu else "SPREAD"),
        run_config=RunConfig(
            name=run_dir.name, **ray_storage(run_dir, storage_url),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks or []),
            # Ray Train's INFO lines (each report's full metric dict, every checkpoint's path, per rank) still go
            # to its log files under the Ray session; the console keeps carat's own lines.
            logging_config=LoggingConfig(log_level=cfg.train.ray_log_level),
            # Ray Train's print patch tees every print of a worker into its logger as well: each carat line
            # reached the console twice. The wait policy is carat's default (carat.threads) or the driver's.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", WAIT_POLICY_ENV: wait_policy()}},
        ),
    )


def ray_storage(run_dir: Path, storage_url: str | None) -> dict[str, Any]:
    """RunConfig's storage: the run directory's folder, or the bucket as a pyarrow filesystem."""
    if not storage_url:
        return {"storage_path": str(run_dir.parent)}
    filesystem, path = arrow_filesystem(as_location(storage_url))
    return {"storage_path": path, "storage_filesystem": filesystem}


def read_results(run_dir: Path) -> dict[str, Any]:
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise CaratError(f"the Ray run finished without writing {results_path}")
    return json.loads(results_path.read_text())


def launch_ray(cfg: CaratConfig, run_dir: Path, shard_dir: Path) -> dict[str, Any]:
    ensure_ray()
    storage_url = cfg.train.storage_path if is_url(cfg.train.storage_path) else None
    try:
        result = build_trainer(cfg, run_dir, shard_dir, storage_url=storage_url).fit()
    except Exception as error:  # Ray 2.60's fit raises the worker group's failure itself
        raise worker_carat_error(error) or error from None
    finally:
        FinalError.clear(run_dir, storage_url)
    if result.error is not None:
        raise worker_carat_error(result.error) or result.error
    if storage_url:  # rank 0 may have run on another node: its files reach this one through the bucket
        fetch_run_files(run_dir, storage_url)
    return read_results(run_dir)


def worker_carat_error(error: BaseException) -> CaratError | None:
    """The carat error a Ray worker raised (divergence, bad data, a refused resume), lowest rank first, so the
    command ends with its one line instead of Ray's wrapped traceback."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        failure = failures[rank]
        cause = getattr(failure, "cause", None) or failure  # a RayTaskError wraps the worker's own exception
        if isinstance(cause, CaratError):
            return cause
    return None
