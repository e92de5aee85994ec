"""Training throughput of the tiny preset on CPU with 1 and 2 Ray + DeepSpeed workers (same corpus, same run).

    python bench/bench_train.py [--epochs 2] [--scale 0.02] [--length-scale 0.1]

Each variant is a real `python -m carat.train` run; samples/s and frames/s are the loop's own per-epoch
figures (history.jsonl), the last epoch (the first includes start-up effects). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_variant(shards: Path, storage: Path, name: str, extra: list[str], epochs: int) -> dict:
    cmd = [sys.executable, "-m", "carat.train", "--preset", "tiny", f"--train.shard_dir={shards}",
           f"--train.storage_path={storage}", f"--run-name={name}", f"--train.epochs={epochs}",
           "--train.tune_thresholds=false"] + extra
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    history = [json.loads(x) for x in (storage / name / "history.jsonl").read_text().splitlines()]
    last = history[-1]
    return {"name": name, "wall_s": wall, "samples_per_s": last["perf/samples_per_s"],
            "frames_per_s": last["perf/frames_per_s"], "epoch_s": last["perf/epoch_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.02)
    parser.add_argument("--length-scale", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = root / "shards"
        subprocess.run([sys.executable, "-m", "carat.data", "synth", "--out", str(shards), "--scale",
                        str(args.scale), "--length-scale", str(args.length_scale), "--seed", "0"], check=True,
                       capture_output=True)
        rows = [
            run_variant(shards, root / "runs", "none-1", ["--launcher", "none"], args.epochs),
            run_variant(shards, root / "runs", "ray-1", ["--launcher", "ray", "--train.num_workers=1"], args.epochs),
            run_variant(shards, root / "runs", "ray-2", ["--launcher", "ray", "--train.num_workers=2"], args.epochs),
        ]
    base = rows[1]["samples_per_s"]
    print("| variant | samples/s | frames/s | epoch s | wall s (incl. start-up) | vs ray-1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['samples_per_s']:.1f} | {r['frames_per_s']:.0f} | {r['epoch_s']:.1f} | "
              f"{r['wall_s']:.0f} | {r['samples_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
