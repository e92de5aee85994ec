"""Seed preset on the full-size synthetic corpus, on one GPU: epoch time, samples/s, peak memory, MFU.

    python -m carat.data synth --out /tmp/shards --scale 1.0          # once (about 10 GB at float16)
    python bench/gpu_train_seed.py --shards /tmp/shards [--peak-tflops 989] [--steps 200]

Runs `python -m carat.train --launcher none --preset seed` (bf16) for one epoch, capped at --steps steps, then
reads the loop's own per-epoch figures from history.jsonl. MFU = analytic training FLOPs of the samples seen
(bench/flops.py over the manifest lengths) / time / the GPU's peak dense bf16 FLOP/s (H100 SXM: 989 TFLOP/s).
Needs deepspeed installed on the GPU machine (carry wheels; see the device notes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import train_flops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--extra", nargs="*", default=[], help="more --section.key=value overrides")
    args = parser.parse_args()
    from carat.config import load_config
    from carat.data.corpus.shards import read_manifest

    cfg = load_config("seed")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "carat.train", "--launcher", "none", "--preset", "seed",
               f"--train.shard_dir={args.shards}", f"--train.storage_path={tmp}", "--run-name=bench",
               "--train.epochs=1", f"--train.max_steps_per_epoch={args.steps}", "--train.tune_thresholds=false",
               *args.extra]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        last = json.loads((Path(tmp) / "bench" / "history.jsonl").read_text().splitlines()[-1])
    table = read_manifest(args.shards).to_pylist()
    train = [r for r in table if r["split"] == "train"]
    mean_lengths = {m: sum(r[f"len_{m}"] for r in train) / len(train) for m in ("text", "visual", "audio")}
    samples = last["perf/samples"]
    # Planned batches cover the split uniformly over an epoch; a capped epoch sees a shuffled subset, so the
    # mean-length sample is the unbiased per-sample estimate.
    flops = train_flops(cfg.model, [{m: int(v) for m, v in mean_lengths.items()}]) * samples
    seconds = last["perf/epoch_seconds"]
    print(json.dumps({
        "samples": samples, "epoch_seconds": seconds, "samples_per_s": last["perf/samples_per_s"],
        "frames_per_s": last["perf/frames_per_s"], "peak_memory_gib": last.get("perf/peak_memory_gib"),
        "model_tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / (args.peak_tflops * 1e12),
    }, indent=2))


if __name__ == "__main__":
    main()
