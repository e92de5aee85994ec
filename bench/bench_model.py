"""CPU sweep of the CARAT model at the SEED configuration: forward+backward time and peak memory vs audio length
(results: BENCHMARKS.md, ``## Model``).

    OMP_NUM_THREADS=1 nice python bench/bench_model.py [--lengths 500 1000 2000 4000] [--batch 2] [--repeats 2]
        [--variants sdpa eager ckpt] [--queue-size 8192] [--json out.json]

Every point (audio length x variant) runs in a fresh subprocess, so ``ru_maxrss`` (the process's peak resident
memory) belongs to that point alone. Reported per point: mean seconds of one training step (forward in train
mode, the full CaratLoss with a full 8,192-row queue, backward, memory update; after one warm-up step), the
peak RSS, and the peak minus the RSS after the model and the batch were built (the step's own memory:
activations, gradients, SupCon's matrices).
Visual and text lengths scale with audio as in CMU-MOSEI (visual ~ 0.29 x audio, text ~ audio / 29, >= 16).
Variants: ``sdpa`` (default kernel), ``eager`` (reference kernel), ``ckpt`` (sdpa + activation checkpointing of
all encoder layers and both alignments).

The batch and model builders are shared with bench/gpu_model_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from carat.model import CARAT, CaratLoss, LossConfig, ModelConfig

VARIANTS: dict[str, dict[str, object]] = {
    "sdpa": {"attention": "sdpa"},
    "eager": {"attention": "eager"},
    "ckpt": {"attention": "sdpa", "checkpoint_encoders": ("text", "visual", "audio"),
             "checkpoint_alignment": ("visual", "audio")},
}
FEATURE_DIMS = {"text": 300, "visual": 35, "audio": 74}


def mosei_lengths(audio: int) -> dict[str, int]:
    """Lengths of the three modalities for a clip with ``audio`` COVAREP frames (CMU-MOSEI's ratios)."""
    return {"text": max(16, round(audio / 29)), "visual": max(1, round(audio * 0.29)), "audio": audio}


def make_inputs(batch: int, audio: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of ``batch`` full-length random samples (no padding: the worst case for the step's memory)."""
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name, length in mosei_lengths(audio).items():
        inputs[name] = torch.randn(batch, length, FEATURE_DIMS[name], generator=g).to(device)
        inputs[f"{name}_mask"] = torch.ones(batch, length, dtype=torch.bool, device=device)
    return inputs


def build(variant: str, device: torch.device, **overrides: object) -> tuple[CARAT, CaratLoss]:
    """The seed model of ``variant`` with a full queue (steady state: every queue row takes part in SupCon)."""
    cfg = ModelConfig(**{**VARIANTS[variant], **overrides})
    torch.manual_seed(0)
    model = CARAT.from_config(cfg).to(device).train()
    with torch.no_grad():
        model.queue.ids.copy_(torch.randint(0, 6 * cfg.num_classes, model.queue.ids.shape, device=device))
    return model, CaratLoss.from_config(LossConfig(), cfg).to(device)


def training_step(model: CARAT, loss_fn: CaratLoss, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                  autocast_dtype: torch.dtype | None = None) -> float:
    """One forward (train mode) + loss + backward + memory update; returns the total loss."""
    device_type = labels.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(**inputs)
        terms = loss_fn(model, out, labels)
    terms["total"].backward()
    model.update_memory(out, labels)
    model.zero_grad(set_to_none=True)
    return float(terms["total"].detach())


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_point(variant: str, audio: int, batch: int, repeats: int, queue_size: int) -> dict[str, object]:
    """One sweep point, in this process (the parent calls it through a fresh subprocess)."""
    device = torch.device("cpu")
    model, loss_fn = build(variant, device, queue_size=queue_size)
    inputs = make_inputs(batch, audio, device)
    labels = torch.randint(0, 2, (batch, 6), generator=torch.Generator().manual_seed(1)).float()
    base = max_rss_mib()
    training_step(model, loss_fn, inputs, labels)  # warm-up (allocator, kernels)
    start = time.perf_counter()
    for _ in range(repeats):
        training_step(model, loss_fn, inputs, labels)
    seconds = (time.perf_counter() - start) / repeats
    peak = max_rss_mib()
    return {"variant": variant, "audio": audio, "batch": batch, "queue": queue_size, "step_s": seconds,
            "peak_rss_mib": peak, "step_mib": peak - base, "base_rss_mib": base, "threads": torch.get_num_threads()}


def sweep(lengths: list[int], variants: list[str], batch: int, repeats: int,
          queue_size: int) -> list[dict[str, object]]:
    results = []
    for audio in lengths:
        for variant in variants:
            command = [sys.executable, __file__, "--point", variant, str(audio), "--batch", str(batch),
                       "--repeats", str(repeats), "--queue-size", str(queue_size)]
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode != 0:
                print(f"{variant} audio={audio}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def markdown(results: list[dict[str, object]]) -> str:
    """Table with ratios to the sdpa variant at the same length."""
    base = {r["audio"]: r for r in results if r["variant"] == "sdpa"}
    lines = ["| audio frames | text / visual | variant | step s | peak RSS MiB | step MiB | time vs sdpa | "
             "step MiB vs sdpa |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = base.get(r["audio"])
        lengths = mosei_lengths(int(r["audio"]))
        ratio_t = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        ratio_m = f"{r['step_mib'] / ref['step_mib']:.2f}" if ref else "-"
        lines.append(f"| {r['audio']} | {lengths['text']} / {lengths['visual']} | {r['variant']} | "
                     f"{r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['step_mib']:.0f} | {ratio_t} | {ratio_m} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=8192,
                        help="contrastive queue rows (seed 8192; a small queue isolates the length-dependent part)")
    parser.add_argument("--point", nargs=2, metavar=("VARIANT", "AUDIO"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(args.point[0], int(args.point[1]), args.batch, args.repeats,
                                   args.queue_size)))
        return
    results = sweep(args.lengths, args.variants, args.batch, args.repeats, args.queue_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(markdown(results))


if __name__ == "__main__":
    main()
