"""OpenMP wait policy under CPU contention: tiny-preset training steps per second with libgomp's idle threads
spinning or sleeping, alone and beside busy processes that compete for the same cores (results:
BENCHMARKS.md, Training). Variants (environment of the measured process):

- ``default``: neither variable set (libgomp spins ~300,000 iterations, then sleeps);
- ``ACTIVE``: ``OMP_WAIT_POLICY=ACTIVE`` (spin without end);
- ``PASSIVE``: ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once);
- ``spin-10k``: ``GOMP_SPINCOUNT=10000`` (spin briefly, then sleep).

    python bench/bench_threads.py [--steps 40] [--busy 2] [--rounds 2] [--threads N] [--variants ...]
        [--json out.json]

Each point runs in a fresh subprocess (libgomp reads the policy once, when torch loads it) with
``OMP_NUM_THREADS`` = the machine's cores, as an unconfigured one-process run sets it: one forward + loss +
backward + AdamW step of the tiny preset's model on a 16-clip batch of quickstart-sized clips, after warm-up
steps. The busy processes are plain Python loops at the same priority, started before and stopped after each
contended point. Variants alternate within a round, so machine noise hits both; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from carat.config import load_config
from carat.model import CARAT, CaratLoss
steps = int(sys.argv[1])
cfg = load_config(preset="tiny")
torch.manual_seed(0)
model = CARAT.from_config(cfg.model).train()
loss_fn = CaratLoss.from_config(cfg.loss, cfg.model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
lengths = {"text": 12, "visual": 90, "audio": 300}  # quickstart-sized clips (length scale 0.025 of MOSEI)
dims = {"text": 300, "visual": 35, "audio": 74}
batch = 16
inputs = {}
for name, n in lengths.items():
    inputs[name] = torch.randn(batch, n, dims[name], generator=g)
    inputs[name + "_mask"] = torch.ones(batch, n, dtype=torch.bool)
labels = (torch.rand(batch, 6, generator=g) < 0.3).float()

sys.path.insert(0, sys.argv[2])
from bench_reference import train_step

def step():
    train_step(model, loss_fn, opt, inputs, labels)

for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
elapsed = time.perf_counter() - start
print(json.dumps({"steps_per_s": steps / elapsed, "threads": torch.get_num_threads()}))
"""


VARIANTS: dict[str, dict[str, str]] = {
    "default": {}, "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000"},
}


def run_point(variant: str, busy: int, steps: int, threads: int) -> dict[str, float]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0.0)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env.update(VARIANTS[variant], OMP_NUM_THREADS=str(threads))
        out = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(Path(__file__).resolve().parent)], env=env, capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--busy", type=int, default=2, help="competing busy processes in the contended points")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)

    points: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for busy in (0, args.busy):
            for variant in args.variants:
                rate = run_point(variant, busy, args.steps, args.threads)["steps_per_s"]
                points.setdefault((busy, variant), []).append(rate)
                print(f"busy {busy}  {variant:<8}  {rate:.2f} steps/s", flush=True)
    base = args.variants[0]
    print(f"\n{args.threads} threads, {args.steps} steps per point, {args.rounds} rounds (mean steps/s; ratio to "
          f"{base} in parentheses)\n")
    print("| competing busy processes | " + " | ".join(args.variants) + " |")
    print("| --- |" + " --- |" * len(args.variants))
    for busy in (0, args.busy):
        means = {v: sum(points[(busy, v)]) / args.rounds for v in args.variants}
        print(f"| {busy} | " + " | ".join(f"{means[v]:.2f} ({means[v] / means[base]:.2f})" for v in args.variants)
              + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({f"busy{b}-{p}": v for (b, p), v in points.items()}, handle, indent=1)


if __name__ == "__main__":
    main()
