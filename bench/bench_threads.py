"""OpenMP wait policy under CPU contention: tiny-preset training steps per second with ``OMP_WAIT_POLICY``
ACTIVE (libgomp's default: idle threads spin) against PASSIVE (idle threads sleep), alone and beside busy
processes that compete for the same cores (results: BENCHMARKS.md, Training).

    python bench/bench_threads.py [--steps 40] [--busy 2] [--rounds 2] [--threads N] [--json out.json]

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

def step():
    out = model(**inputs)
    terms = loss_fn(model, out, labels)
    opt.zero_grad(set_to_none=True)
    terms["total"].backward()
    opt.step()
    with torch.no_grad():
        model.update_memory(out, labels)

for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
elapsed = time.perf_counter() - start
print(json.dumps({"steps_per_s": steps / elapsed, "threads": torch.get_num_threads()}))
"""


def run_point(policy: str, busy: int, steps: int, threads: int) -> dict[str, float]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0.0)
        env = dict(os.environ, OMP_WAIT_POLICY=policy, OMP_NUM_THREADS=str(threads))
        out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=env, capture_output=True, text=True,
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
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)

    points: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for busy in (0, args.busy):
            for policy in ("ACTIVE", "PASSIVE"):
                rate = run_point(policy, busy, args.steps, args.threads)["steps_per_s"]
                points.setdefault((busy, policy), []).append(rate)
                print(f"busy {busy}  {policy:<7}  {rate:.2f} steps/s", flush=True)
    print(f"\n{args.threads} threads, {args.steps} steps per point, {args.rounds} rounds (mean steps/s)\n")
    print("| competing busy processes | ACTIVE | PASSIVE | PASSIVE / ACTIVE |")
    print("| --- | --- | --- | --- |")
    for busy in (0, args.busy):
        active = sum(points[(busy, "ACTIVE")]) / args.rounds
        passive = sum(points[(busy, "PASSIVE")]) / args.rounds
        print(f"| {busy} | {active:.2f} | {passive:.2f} | {passive / active:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({f"busy{b}-{p}": v for (b, p), v in points.items()}, handle, indent=1)


if __name__ == "__main__":
    main()
