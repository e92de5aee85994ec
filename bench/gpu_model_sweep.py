"""GPU sweep of the CARAT model at the SEED configuration, up to CMU-MOSEI's longest audio (10,891 frames), bf16
autocast: peak memory (torch.cuda.max_memory_allocated) and step time vs audio length and batch size, with and
without activation checkpointing, SDPA vs eager. Ready to run on a CUDA machine; not run in the session that
wrote it (no GPU there), so BENCHMARKS.md has no GPU figures from it yet.

    python bench/gpu_model_sweep.py [--lengths 1000 2000 4000 8000 10891] [--batches 1 8 32 64]
                                    [--variants sdpa eager ckpt ckpt-block] [--chunk-frames 256 512 1024]
                                    [--repeats 3] [--json out.json]

Each point: seed model (fp32 weights, bf16 autocast, full 8,192-row queue), AdamW step included (so optimizer
state counts), one warm-up step, then ``--repeats`` timed steps (cuda-synchronised). Peak memory is measured
over the timed steps after ``torch.cuda.reset_peak_memory_stats``; "activation MiB" is that peak minus the
memory allocated before the step (weights, gradients-free optimizer state). An out-of-memory point is
recorded as OOM and the sweep goes on.

Variants (bench/bench_model.py): ``ckpt`` checkpoints every encoder layer and both alignments, each alignment
in time segments of ``model.alignment_chunk_frames`` frames (LSTM state carried across segments); with
``--chunk-frames`` it runs once per segment size (rows ``ckpt@N``). ``ckpt-block`` checkpoints each alignment
as one block (the whole LSTM rebuilt at once in backward).

Targets (design): a batch with 10,891-frame audio trains within 80 GB at the seed configuration, and
checkpointing cuts peak activation memory by at least half (compare ``ckpt`` with ``sdpa``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import VARIANTS, build, make_inputs, mosei_lengths  # noqa: E402

MIB = 2 ** 20


def run_point(variant: str, audio: int, batch: int, repeats: int, dtype: torch.dtype,
              chunk_frames: int | None = None) -> dict[str, object]:
    """One point; ``chunk_frames`` (ckpt only) overrides model.alignment_chunk_frames."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    overrides = {} if chunk_frames is None else {"alignment_chunk_frames": chunk_frames}
    model, loss_fn = build(variant, device, **overrides)
    name = variant if chunk_frames is None else f"{variant}@{chunk_frames}"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01, eps=1e-6)
    inputs = make_inputs(batch, audio, device)
    labels = torch.randint(0, 2, (batch, 6), device=device).float()

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype):
            out = model(**inputs)
            terms = loss_fn(model, out, labels)
        terms["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_memory(out, labels)

    step()  # warm-up: kernels, allocator, optimizer state
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer, inputs
    return {"variant": name, "audio": audio, "batch": batch, "step_s": seconds, "peak_mib": peak / MIB,
            "activation_mib": (peak - before) / MIB, "status": "ok"}


def sweep(lengths: list[int], batches: list[int], variants: list[str], repeats: int,
          dtype: torch.dtype, chunk_frames: list[int] | None = None) -> list[dict[str, object]]:
    points = [(v, c) for v in variants for c in (chunk_frames if v == "ckpt" and chunk_frames else [None])]
    results = []
    for audio in lengths:
        for batch in batches:
            for variant, chunk in points:
                try:
                    result = run_point(variant, audio, batch, repeats, dtype, chunk)
                except torch.cuda.OutOfMemoryError:
                    name = variant if chunk is None else f"{variant}@{chunk}"
                    result = {"variant": name, "audio": audio, "batch": batch, "status": "OOM"}
                torch.cuda.empty_cache()
                results.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    return results


def markdown(results: list[dict[str, object]]) -> str:
    """Table with the time and activation-memory ratios to sdpa at the same length and batch."""
    base = {(r["audio"], r["batch"]): r for r in results if r["variant"] == "sdpa" and r["status"] == "ok"}
    lines = ["| audio | text / visual | batch | variant | step s | peak MiB | activation MiB | time vs sdpa | "
             "activation vs sdpa |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lengths = mosei_lengths(int(r["audio"]))
        head = f"| {r['audio']} | {lengths['text']} / {lengths['visual']} | {r['batch']} | {r['variant']} |"
        if r["status"] != "ok":
            lines.append(f"{head} OOM | | | | |")
            continue
        ref = base.get((r["audio"], r["batch"]))
        ratio_t = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        ratio_m = f"{r['activation_mib'] / ref['activation_mib']:.2f}" if ref else "-"
        lines.append(f"{head} {r['step_s']:.3f} | {r['peak_mib']:.0f} | {r['activation_mib']:.0f} | "
                     f"{ratio_t} | {ratio_m} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 10891])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--chunk-frames", type=int, nargs="+",
                        help="run the ckpt variant once per alignment segment size (model.alignment_chunk_frames)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_model_sweep.py needs a CUDA device (the CPU sweep is bench/bench_model.py)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)
    results = sweep(args.lengths, args.batches, args.variants, args.repeats, dtype, args.chunk_frames)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
