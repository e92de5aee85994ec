"""carat's training path against a reference-style path, same model, same clips, in one run (CPU or GPU;
results: BENCHMARKS.md, Training).

    OMP_NUM_THREADS=1 nice python bench/bench_reference.py SHARDS [--models tiny wide64 seed] [--clips 256]
        [--reference-batch 64] [--rounds 2] [--max-steps 12] [--device cpu|cuda] [--json out.json]

Both paths train the same model (same config, same initial weights) on the same train clips, read once into
memory (reading is bench_loader.py's subject), with forward + the full CaratLoss + backward + AdamW + the
memory updates per step:

- **carat**: the loader's length-sorted token-budget batches (``loader`` section of the model's preset:
  ``token_budget`` / ``max_batch_size``), SDPA attention, the vectorised prototype EMA and the per-class-sum
  SupCon of ``carat.model``.
- **reference**: what the published code does: ``--reference-batch`` clips in random order, each batch padded
  to its longest clip, eager attention, the prototype EMA as the reference's per-sample Python loop, SupCon
  with N x N element-wise masks (carat's earlier form, bench_supcon.py).
- **random-batches**: carat's kernels on the reference's batches: splits the gain into batching and kernels.

On ``--device cuda`` carat's two paths run under bf16 autocast (carat's precision on a GPU) and the reference in
fp32, as the published code trains; steps are timed between ``torch.cuda.synchronize()`` calls, each path's
peak memory is reported, and a path that runs out of memory is recorded as OOM with its longest padded
audio batch instead of ending the run.

Reported per model and path: real clips per second over the steps run (``--max-steps`` batches evenly
spaced over the path's epoch plan, after one warm-up step), the share of real frames in the padded
batches of the whole epoch plan (padding efficiency), and the ratio carat / reference. The two paths
alternate within each round.

Models: ``tiny`` (the quickstart's), ``wide64`` (tiny at hidden size 64: the 64-wide model of the issue),
``seed`` (the seed preset's size, 512 wide; its step over 64 padded clips takes seconds on a CPU: few steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_supcon import elementwise_supcon  # noqa: E402

from carat.config import load_config  # noqa: E402
from carat.data.corpus.featstats import load_feature_stats  # noqa: E402
from carat.data.loader.pipeline import build_loader  # noqa: E402
from carat.data.loader.loader_config import LoaderConfig  # noqa: E402
from carat.data.loader.plan import cost_order, padding_efficiency, plan_batches  # noqa: E402
from carat.model import CARAT, CaratLoss  # noqa: E402
from carat.model import losses as losses_module  # noqa: E402
from carat.model.memory import LabelPrototypes  # noqa: E402

MODALITIES = ("text", "visual", "audio")
MODELS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "tiny": ("tiny", {}),
    "wide64": ("tiny", {"model": {"hidden_size": 64}}),
    "seed": ("seed", {}),
}


def read_clips(shards: Path, limit: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``limit`` train clips drawn at random (the shards are sorted by length: the first ones would all be
    short), unpadded: features [L, d] per modality and labels."""
    loader = build_loader(shards, "train", LoaderConfig(num_workers=0, token_budget=1 << 22, max_batch_size=64),
                          rank=0, world_size=1, epoch=0, train=False)
    clips: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        for i in range(len(batch.keys)):
            clip = {"labels": batch.labels[i]}
            for m in MODALITIES:
                n = int(getattr(batch, f"{m}_mask")[i].sum())
                clip[m] = getattr(batch, m)[i, :n].clone()
            clips.append(clip)
    keep = np.sort(np.random.default_rng(seed).permutation(len(clips))[:limit])
    return [clips[i] for i in keep]


def collate(clips: list[dict[str, torch.Tensor]], device: torch.device = torch.device("cpu"),
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pad each modality to the batch's longest clip (real frames first, masks True on them), on ``device``."""
    inputs: dict[str, torch.Tensor] = {}
    for m in MODALITIES:
        longest = max(c[m].shape[0] for c in clips)
        dim = clips[0][m].shape[1]
        frames = torch.zeros(len(clips), longest, dim)
        mask = torch.zeros(len(clips), longest, dtype=torch.bool)
        for i, c in enumerate(clips):
            frames[i, :c[m].shape[0]] = c[m]
            mask[i, :c[m].shape[0]] = True
        inputs[m], inputs[f"{m}_mask"] = frames.to(device), mask.to(device)
    return inputs, torch.stack([c["labels"] for c in clips]).to(device)


def lengths_of(clips: list[dict[str, torch.Tensor]]) -> np.ndarray:
    return np.array([[c[m].shape[0] for m in MODALITIES] for c in clips], dtype=np.int64)


def carat_plan(lengths: np.ndarray, loader: LoaderConfig) -> list[np.ndarray]:
    weights = loader.modality_weights
    return plan_batches(lengths, loader.token_budget, loader.max_batch_size, weights,
                        order=cost_order(lengths, weights), min_batch_size=loader.min_batch_size)


def reference_plan(n: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch] for i in range(0, n, batch)]


def prototype_loop_update(self: LabelPrototypes, latent_normed: torch.Tensor, labels: torch.Tensor) -> None:
    """The reference's update_protos: one EMA step per sample and label, in Python."""
    for i in range(latent_normed.shape[0]):
        for j in range(latent_normed.shape[1]):
            if labels[i][j] >= 0.5:
                self.pos_protos[j] = self.pos_protos[j] * self.momentum + (1 - self.momentum) * latent_normed[i][j]
            else:
                self.neg_protos[j] = self.neg_protos[j] * self.momentum + (1 - self.momentum) * latent_normed[i][j]


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Swap in the per-sample prototype loop and the element-wise SupCon for the block."""
    saved_update, saved_supcon = LabelPrototypes.update, losses_module.supcon_loss

    def supcon(features, ids, valid, temperature, base_temperature, chunk_rows=2048, num_ids=None):
        return elementwise_supcon(features, ids, valid, temperature, base_temperature, chunk_rows)

    LabelPrototypes.update = torch.no_grad()(prototype_loop_update)
    losses_module.supcon_loss = supcon
    try:
        yield
    finally:
        LabelPrototypes.update, losses_module.supcon_loss = saved_update, saved_supcon


def build(model_name: str, attention: str, shards: Path, device: torch.device):
    preset, extra = MODELS[model_name]
    overrides = [f"--model.attention={attention}"]
    for section, values in extra.items():
        overrides += [f"--{section}.{k}={v}" for k, v in values.items()]
    cfg = load_config(preset=preset, overrides=overrides)
    torch.manual_seed(0)
    model = CARAT.from_config(cfg.model)
    if cfg.model.standardize_features:
        model.set_feature_stats(load_feature_stats(shards))
    model.to(device).train()
    loss_fn = CaratLoss.from_config(cfg.loss, cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    return cfg, model, loss_fn, optimizer


def train_step(model: CARAT, loss_fn: CaratLoss, optimizer, inputs, labels, bf16: bool = False) -> None:
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with precision:
        out = model(**inputs)
        terms = loss_fn(model, out, labels)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    with torch.no_grad():
        model.update_memory(out, labels)


PATHS = ("carat", "random-batches", "reference")
"""random-batches: carat's kernels on the reference's batches, which splits the gain into batching and kernels."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(path: str, model_name: str, clips, shards: Path, reference_batch: int, max_steps: int,
             device: torch.device = torch.device("cpu")) -> dict:
    attention = "eager" if path == "reference" else "sdpa"
    bf16 = device.type == "cuda" and path != "reference"
    cfg, model, loss_fn, optimizer = build(model_name, attention, shards, device)
    lengths = lengths_of(clips)
    plan = carat_plan(lengths, cfg.loader) if path == "carat" else reference_plan(len(clips), reference_batch)
    efficiency = padding_efficiency(lengths, plan, (1.0, 1.0, 1.0))
    kernels = reference_kernels() if path == "reference" else contextlib.nullcontext()
    # evenly spaced over the epoch plan: carat's plan is sorted by length, so its first batches are its
    # shortest clips; the spread sample weighs every part of the epoch alike
    picks = np.unique(np.linspace(0, len(plan) - 1, min(max_steps, len(plan))).round().astype(int))
    steps = [plan[i] for i in picks]
    summary = {"batches_in_epoch": len(plan), "padding_efficiency": efficiency["audio"],
               "mean_batch": float(np.mean([len(b) for b in plan])), "bf16": bf16}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch: np.ndarray = plan[0]
    try:
        with kernels:
            train_step(model, loss_fn, optimizer, *collate([clips[i] for i in batch], device), bf16=bf16)
            _sync(device)
            seen, start = 0, time.perf_counter()
            for batch in steps:
                train_step(model, loss_fn, optimizer, *collate([clips[i] for i in batch], device), bf16=bf16)
                seen += len(batch)
            _sync(device)
            elapsed = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        longest = int(max(clips[i]["audio"].shape[0] for i in batch))
        del model, optimizer
        torch.cuda.empty_cache()
        return {**summary, "oom": True, "clips_per_s": float("nan"), "steps": 0, "clips": 0, "seconds": 0.0,
                "oom_batch": len(batch), "oom_audio_frames": longest}
    if device.type == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return {**summary, "oom": False, "clips_per_s": seen / elapsed, "steps": len(steps), "clips": seen,
            "seconds": elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", type=Path)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["tiny", "wide64"])
    parser.add_argument("--clips", type=int, default=256, help="train clips used (drawn at random from the split)")
    parser.add_argument("--reference-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=12, help="timed steps per path (after one warm-up)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: carat's paths under bf16 autocast, the reference in fp32; peak memory reported")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")

    clips = read_clips(args.shards, args.clips)
    lengths = lengths_of(clips)
    print(f"{len(clips)} train clips; audio frames median {int(np.median(lengths[:, 2]))}, max "
          f"{int(lengths[:, 2].max())}; torch threads {torch.get_num_threads()}; device {device}", flush=True)
    results: dict[str, dict[str, list[dict]]] = {}
    for _ in range(args.rounds):
        for model_name in args.models:
            for path in PATHS:
                r = run_path(path, model_name, clips, args.shards, args.reference_batch, args.max_steps, device)
                results.setdefault(model_name, {}).setdefault(path, []).append(r)
                memory = f", peak {r['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in r else ""
                if r["oom"]:
                    memory = (f", OUT OF MEMORY at a batch of {r['oom_batch']} up to {r['oom_audio_frames']} "
                              "audio frames")
                print(f"{model_name:<7} {path:<14} {r['clips_per_s']:8.2f} clips/s  ({r['steps']} steps, mean batch "
                      f"{r['mean_batch']:.1f}, audio padding efficiency {r['padding_efficiency']:.2f}{memory})",
                      flush=True)
    print("\n| model | carat clips/s | random batches, carat kernels | reference clips/s | carat / reference | "
          "of which batching / kernels | padded-frame efficiency carat / reference (audio) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model_name, paths in results.items():
        mean = {p: float(np.mean([r["clips_per_s"] for r in runs])) for p, runs in paths.items()}
        eff = {p: runs[0]["padding_efficiency"] for p, runs in paths.items()}
        batching, kernels = mean["carat"] / mean["random-batches"], mean["random-batches"] / mean["reference"]
        print(f"| {model_name} | {mean['carat']:.2f} | {mean['random-batches']:.2f} | {mean['reference']:.2f} | "
              f"{mean['carat'] / mean['reference']:.2f}x | {batching:.2f}x / {kernels:.2f}x | "
              f"{eff['carat']:.2f} / {eff['reference']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
