"""Soak test of crash-safe training (issue 10): many short epochs, the training process killed at random
moments (SIGKILL: mid-step, mid-save, mid-report), rerun with the same run name until it finishes; then the
result is compared with an uninterrupted run of the same configuration.

    python bench/soak.py --epochs 6 --kills 8                       # one process (launcher none)
    python bench/soak.py --launcher ray --workers 2 --worker-faults  # Ray: also kill a worker once per run

Reports restarts, the samples seen per epoch (history.jsonl perf/samples: the same in every epoch, whatever
the kills) and whether the final test metrics equal the uninterrupted run's. Exit status 1 when they differ
or a rerun failed for another reason than the kill. Not part of CI (minutes of CPU); the pytest wrapper in
tests/test_soak.py runs it only with CARAT_SOAK=1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.faults import fault_env  # noqa: E402  (the crash injection lives with the tests, not in carat)


def cpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env


def train_command(args: argparse.Namespace, shards: Path, storage: Path, name: str) -> list[str]:
    command = [sys.executable, "-m", "carat.train", "--preset", "tiny", f"--train.shard_dir={shards}",
               f"--train.storage_path={storage}", f"--train.run_name={name}", f"--train.epochs={args.epochs}",
               "--train.synth_if_missing=false", "--loader.num_workers=0", "--launcher", args.launcher]
    if args.launcher == "ray":
        command += [f"--train.num_workers={args.workers}", f"--train.max_failures={args.epochs + 2}"]
    return command


def run_once(command: list[str], env: dict[str, str], kill_after: float | None, log) -> int | None:
    """Run ``command``; SIGKILL its whole process group after ``kill_after`` seconds. None = killed."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def soak(args: argparse.Namespace) -> dict:
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    work = Path(args.work).resolve()
    shards = work / "shards"
    if not (shards / "manifest.parquet").is_file():
        synthesize_corpus(shards, SynthConfig(scale=0.005, length_scale=0.05, seed=1),
                          StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    storage = work / "runs"
    rng = random.Random(args.seed)
    with open(work / "straight.log", "w") as log:
        start = time.monotonic()
        code = run_once(train_command(args, shards, storage, "straight"), cpu_env(), None, log)
        straight_seconds = time.monotonic() - start
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed (see {work / 'straight.log'})")
    restarts, failures, kills = 0, [], 0
    results = storage / "soaked" / "results.json"
    with open(work / "soaked.log", "w") as log:
        while not results.is_file():
            kill_after = rng.uniform(args.min_kill_s, straight_seconds) if kills < args.kills else None
            env = cpu_env()
            if args.worker_faults and args.launcher == "ray":  # a worker dies once per attempt as well
                env = fault_env(f"{rng.randrange(args.epochs)}:{rng.randrange(args.workers)}", env)
            code = run_once(train_command(args, shards, storage, "soaked"), env, kill_after, log)
            if code is None:
                kills += 1
            elif code != 0:
                failures.append(code)
                if len(failures) > 2:
                    break
            restarts += 1
    def history(name: str) -> list[dict]:
        path = storage / name / "history.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

    a = json.loads((storage / "straight" / "results.json").read_text())
    b = json.loads(results.read_text()) if results.is_file() else {}
    same = bool(b) and all(abs(a[s][k] - b[s][k]) <= 1e-6 for s in ("valid", "test")
                           for k in ("micro_f1", "macro_f1", "accuracy"))
    return {
        "kills": kills, "restarts": restarts, "other_failures": failures,
        "samples_per_epoch": [h.get("perf/samples") for h in history("soaked")],
        "samples_per_epoch_uninterrupted": [h.get("perf/samples") for h in history("straight")],
        "epochs_in_history": [h["epoch"] for h in history("soaked")],
        "final_metrics_equal": same,
        "logs": str(work),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="soak-work", help="working directory (corpus, runs, logs)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--kills", type=int, default=8, help="SIGKILLs of the training process, at random times")
    parser.add_argument("--min-kill-s", type=float, default=3.0, help="earliest kill after a start (seconds)")
    parser.add_argument("--launcher", choices=("none", "ray"), default="none")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers")
    parser.add_argument("--worker-faults", action="store_true", help="Ray: also kill one worker per attempt")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    report = soak(build_parser().parse_args(argv))
    print(json.dumps(report, indent=1))
    ok = report["final_metrics_equal"] and not report["other_failures"] and (
        report["samples_per_epoch"] == report["samples_per_epoch_uninterrupted"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
