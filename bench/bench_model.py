"""CPU sweep of the CARAT model at the SEED configuration: forward+backward time and peak memory vs audio length
(results: BENCHMARKS.md, ``## Model``).

    OMP_NUM_THREADS=1 nice python bench/bench_model.py [--lengths 500 1000 2000 4000] [--batch 2] [--repeats 2]
        [--variants sdpa eager ckpt ckpt-block] [--queue-size 8192] [--json out.json]
    OMP_NUM_THREADS=1 nice python bench/bench_model.py --breakdown 8000 [--batch 2] [--queue-size 8192]

Every point (audio length x variant) runs in a fresh subprocess, so ``ru_maxrss`` (the process's peak resident
memory) belongs to that point alone. Reported per point: mean seconds of one training step (forward in train
mode, the full CaratLoss with a full 8,192-row queue, backward, memory update; after one warm-up step), the
peak RSS, and the peak minus the RSS after the model and the batch were built (the step's own memory:
activations, gradients, SupCon's matrices).
Visual and text lengths scale with audio as in CMU-MOSEI (visual ~ 0.29 x audio, text ~ audio / 29, >= 16).
Variants: ``sdpa`` (default kernel), ``eager`` (reference kernel), ``ckpt`` (sdpa + activation checkpointing of
all encoder layers and both alignments, the alignments time-segmented in ``alignment_chunk_frames`` = 512 frame
segments), ``ckpt-block`` (as ``ckpt`` but each alignment is one checkpointed block: ``alignment_chunk_frames``
None).

``--breakdown AUDIO`` instead reports where the activation memory goes at one length (no RSS noise): the bytes
of the tensors autograd saves for backward, per model part, counted by ``torch.autograd.graph.saved_tensors_hooks``
(each storage once, parameters excluded) in one forward + loss of the ``sdpa`` model, and, for each
checkpointing variant, the number and the largest size of the checkpointed blocks per part (what backward
rebuilds at once). For that count every ``checkpoint`` call of carat.model is run directly (not checkpointed)
under the counter, one block at a time.

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
from collections import defaultdict
from typing import Callable

import torch

from carat.model import CARAT, CaratLoss, LossConfig, ModelConfig

VARIANTS: dict[str, dict[str, object]] = {
    "sdpa": {"attention": "sdpa"},
    "eager": {"attention": "eager"},
    "ckpt": {"attention": "sdpa", "checkpoint_encoders": ("text", "visual", "audio"),
             "checkpoint_alignment": ("visual", "audio")},
    "ckpt-block": {"attention": "sdpa", "checkpoint_encoders": ("text", "visual", "audio"),
                   "checkpoint_alignment": ("visual", "audio"), "alignment_chunk_frames": None},
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


BREAKDOWN_PARTS = ("visual_align", "audio_align", "text_encoder", "visual_encoder", "audio_encoder")


class SavedTensorLedger:
    """Bytes of the tensors autograd saves for backward, per model part and per checkpointed block.

    A part is one of BREAKDOWN_PARTS while that module runs, else ``other`` (norms, heads) or whatever the
    caller sets (``loss``). Each storage is counted once; parameters and buffers are excluded (not activations).
    """

    def __init__(self, model: CARAT) -> None:
        self.part = "other"
        self.saved: dict[str, int] = defaultdict(int)
        self.blocks: dict[str, list[int]] = defaultdict(list)
        self.kept: dict[str, int] = defaultdict(int)  # saved outside checkpointed blocks, or a block's input
        self._block: list[int] | None = None
        self._seen: set[int] = set()
        self._weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        for name in BREAKDOWN_PARTS:
            module = getattr(model, name)
            module.register_forward_pre_hook(lambda *_, name=name: setattr(self, "part", name))
            module.register_forward_hook(lambda *_: setattr(self, "part", "other"))

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr and ptr not in self._weights and ptr not in self._seen:
            self._seen.add(ptr)
            size = tensor.untyped_storage().nbytes()
            self.saved[self.part] += size
            if self._block is not None:
                self._block[0] += size
            else:
                self.kept[self.part] += size
        return tensor

    def direct_checkpoint(self, function: Callable, *args: object, use_reentrant: bool = False,
                          **kwargs: object) -> object:
        """Stand-in for torch.utils.checkpoint.checkpoint: runs ``function`` and records its saved bytes (and
        its tensor inputs, which a real checkpoint keeps until backward, as kept bytes)."""
        flat = [a for arg in args for a in (arg if isinstance(arg, tuple) else (arg,))]
        for tensor in flat:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                self.pack(tensor)
        self._block = [0]
        try:
            return function(*args, **kwargs)
        finally:
            self.blocks[self.part].append(self._block[0])
            self._block = None


def breakdown(audio: int, batch: int, queue_size: int) -> dict[str, dict[str, object]]:
    """Saved-for-backward MiB per part (sdpa) and checkpointed blocks per part (ckpt, ckpt-block)."""
    import carat.model.alignment as alignment_module
    import carat.model.encoder as encoder_module
    import carat.model.losses as losses_module
    inputs = make_inputs(batch, audio, torch.device("cpu"))
    labels = torch.randint(0, 2, (batch, 6), generator=torch.Generator().manual_seed(1)).float()
    report: dict[str, dict[str, object]] = {}
    for variant in ("sdpa", "ckpt-block", "ckpt"):
        model, loss_fn = build(variant, torch.device("cpu"), queue_size=queue_size)
        ledger = SavedTensorLedger(model)
        modules = (alignment_module, encoder_module, losses_module)
        originals = [m.checkpoint for m in modules]
        for m in modules:
            m.checkpoint = ledger.direct_checkpoint
        try:
            with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t):
                out = model(**inputs)
                ledger.part = "loss"
                loss_fn(model, out, labels)
        finally:
            for m, original in zip(modules, originals):
                m.checkpoint = original
        report[variant] = {part: {"saved_mib": ledger.saved[part] / 2 ** 20, "kept_mib": ledger.kept[part] / 2 ** 20,
                                  "blocks": len(ledger.blocks[part]),
                                  "largest_block_mib": max(ledger.blocks[part], default=0) / 2 ** 20}
                           for part in (*BREAKDOWN_PARTS, "other", "loss")}
    return report


def breakdown_markdown(report: dict[str, dict[str, object]]) -> str:
    """Per part: MiB saved if nothing were checkpointed; per variant the MiB kept until backward (saved outside
    checkpointed blocks + block inputs) and the blocks (count, largest MiB; sdpa has SupCon's anchor chunks
    only). The last row estimates each variant's peak activation memory in backward: everything kept + the
    largest block rebuilt at once, and its ratio to sdpa's."""
    variants = ("sdpa", "ckpt-block", "ckpt")
    lines = ["| part | all saved MiB | " + " | ".join(f"{v}: kept MiB; blocks, largest MiB" for v in variants)
             + " |", "|---" * (2 + len(variants)) + "|"]
    for part, row in report["sdpa"].items():
        cells = []
        for v in variants:
            r = report[v][part]
            blocks = f"{r['blocks']}, {r['largest_block_mib']:.1f}" if r["blocks"] else "-"
            cells.append(f"{r['kept_mib']:.1f}; {blocks}")
        lines.append(f"| {part} | {row['saved_mib']:.1f} | " + " | ".join(cells) + " |")
    total = sum(row["saved_mib"] for row in report["sdpa"].values())
    peaks = [sum(r["kept_mib"] for r in report[v].values()) + max(r["largest_block_mib"] for r in report[v].values())
             for v in variants]
    lines.append(f"| kept + largest block (vs sdpa) | {total:.1f} | "
                 + " | ".join(f"{p:.1f} ({p / peaks[0]:.2f}x)" for p in peaks) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--breakdown", type=int, metavar="AUDIO",
                        help="report saved-for-backward bytes per model part at this audio length instead")
    args = parser.parse_args(argv)
    if args.breakdown:
        report = breakdown(args.breakdown, args.batch, args.queue_size)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(breakdown_markdown(report))
        return
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
