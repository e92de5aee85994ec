"""Which way of summarising a clip over time finds the planted cues? A bench-only probe, outside CARAT.

Per modality: standardise (train-split statistics from the card), optionally cut each clip's frames into slots
(segment means: a fixed number of slots, like ``model.ctc_target_length=8``, or an adaptive number, ~10 per
second, like ``ctc_target_length=none``), a per-step Linear(16)+GELU, optionally a 1-layer transformer
encoder, then a pooling over time (mean, max, or label attention: one learned query per emotion), a linear
classifier per emotion, logits summed over modalities; or "stats": no projection, a linear classifier on the
standardised frames' mean and std over time (the floor's features, fitted by SGD). AdamW 3e-3 (or SGD), BCE, a few
epochs, several seeds; the printed figure is the test macro ROC-AUC (mean and spread over seeds) next to the card's pooled
logistic-regression floor and the oracle. It answers what the pooled floor's statistics (mean and std over
time) and CARAT's fixed aligned length cost a learned detector (BENCHMARKS.md, Learning).

    python bench/probe_pooling.py --shards /tmp/bl/corpora/default-tiny --variants mean,max,slots8-max
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from carat.data.featstats import load_feature_stats
from carat.data.loader import build_loader
from carat.data.loader_config import LoaderConfig
from carat.metrics import macro_roc_auc

MODALITIES = ("text", "visual", "audio")
SLOT_RATIO = {"text": None, "visual": 0.333, "audio": 0.1}
"""Adaptive slots per frame (the model's compression ratios; text keeps its steps)."""


def load_split(shards: Path, split: str) -> list:
    cfg = LoaderConfig(token_budget=8192, max_batch_size=32, num_workers=0)
    return list(build_loader(shards, split, cfg, rank=0, world_size=1, epoch=0, train=split == "train"))


def segment_means(x: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip's real frames cut into ``slots[b]`` contiguous segments; slot = the segment's mean."""
    lengths = mask.sum(1)
    top = int(slots.max())
    frame = torch.arange(x.shape[1])[None, :]
    slot_of = (frame * slots[:, None]) // lengths.clamp_min(1)[:, None]
    onehot = F.one_hot(slot_of.clamp_max(top - 1), top).float() * mask[..., None]
    sums = torch.bmm(onehot.transpose(1, 2), x)
    counts = onehot.sum(1)[..., None]
    return sums / counts.clamp_min(1), counts[..., 0] > 0


class Probe(nn.Module):
    def __init__(self, dims: dict[str, int], stats: dict, pooling: str, slots: str, encoder: bool,
                 center: bool = False, temperature: float = 1.0, width: int = 16, classes: int = 6) -> None:
        super().__init__()
        self.pooling, self.slots, self.center, self.temperature = pooling, slots, center, temperature
        for name, (mean, std) in stats.items():
            self.register_buffer(f"{name}_mean", torch.as_tensor(mean))
            self.register_buffer(f"{name}_std", torch.as_tensor(std).clamp_min(1e-6))
        self.proj = nn.ModuleDict({m: nn.Linear(d, width) for m, d in dims.items()})
        self.encoder = nn.ModuleDict({m: nn.TransformerEncoderLayer(width, 2, 2 * width, 0.1, batch_first=True)
                                      for m in dims}) if encoder else None
        self.queries = nn.ParameterDict({m: nn.Parameter(torch.randn(classes, width) * 0.1) for m in dims})
        self.head = nn.ModuleDict({m: nn.Linear(width, 1) if pooling == "attention" else
                                   nn.Linear(2 * d, classes) if pooling == "stats" else nn.Linear(width, classes)
                                   for m, d in dims.items()})

    def _slots(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slots == "frames" or SLOT_RATIO[name] is None:
            return x, mask
        lengths = mask.sum(1)
        if self.slots == "adaptive":
            target = torch.round(lengths * SLOT_RATIO[name]).clamp(min=4).long()
        else:
            target = torch.full_like(lengths, int(self.slots))
        return segment_means(x, mask, torch.minimum(target, lengths.clamp_min(1)))

    def modality_logits(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (x - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std") * mask[..., None]
        if self.center:  # per-clip mean removed (cepstral-mean-normalisation style): a speaker's offset goes
            n = mask.sum(1, keepdim=True).clamp_min(1)[..., None]
            x = (x - x.sum(1, keepdim=True) / n) * mask[..., None]
        x, mask = self._slots(name, x, mask)
        if self.pooling == "stats":  # the pooled floor's functionals (mean, std over time), learned by SGD
            n = mask.sum(1, keepdim=True).clamp_min(1)
            mean = x.sum(1) / n
            std = ((x - mean[:, None]) ** 2 * mask[..., None]).sum(1).div(n).sqrt()
            return self.head[name](torch.cat([mean, std], -1))
        h = F.gelu(self.proj[name](x))
        if self.encoder is not None:
            h = self.encoder[name](h, src_key_padding_mask=~mask)
        if self.pooling == "attention":  # one query per emotion over the real steps
            att = torch.einsum("cd,btd->bct", self.queries[name], h) / self.temperature
            att = att.masked_fill(~mask[:, None], -1e9)
            pooled = torch.einsum("bct,btd->bcd", att.softmax(-1), h)
            return self.head[name](pooled)[..., 0]
        if self.pooling == "max":
            pooled = h.masked_fill(~mask[..., None], -1e9).amax(1)
        else:
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.head[name](pooled)

    def forward(self, batch) -> torch.Tensor:
        return sum(self.modality_logits(m, getattr(batch, m), getattr(batch, f"{m}_mask")) for m in MODALITIES)


def parse_variant(text: str) -> dict:
    """'[center-][slots8-|adaptive-][enc-](mean|max|attention)' -> Probe keyword arguments."""
    parts = text.split("-")
    center = parts[0] == "center"
    if center:
        parts.pop(0)
    slots = "frames"
    if parts[0].startswith("slots"):
        slots = parts.pop(0)[len("slots"):]
    elif parts[0] == "adaptive":
        slots = parts.pop(0)
    encoder = parts[0] == "enc"
    if encoder:
        parts.pop(0)
    pooling, temperature = parts[0], 1.0
    if pooling.startswith("attention") and pooling != "attention":  # "attention0.1": logits / 0.1
        pooling, temperature = "attention", float(pooling[len("attention"):])
    return {"pooling": pooling, "slots": slots, "encoder": encoder, "center": center, "temperature": temperature}


def scores_of(model: Probe, batches: list) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        s = torch.cat([torch.sigmoid(model(b)) for b in batches]).numpy()
    return np.concatenate([b.labels.numpy() for b in batches]), s


def run_variant(data: dict, dims: dict, stats: dict, variant: str, seed: int, args: argparse.Namespace) -> float:
    torch.manual_seed(seed)
    model = Probe(dims, stats, **parse_variant(variant))
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    epochs = args.epochs
    best_valid, test_at_best = -1.0, float("nan")
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(data["train"])).tolist():
            batch = data["train"][i]
            loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        valid = macro_roc_auc(*scores_of(model, data["valid"])) or 0.0
        if valid > best_valid:  # the epoch is picked on valid, as the trainer does
            best_valid, test_at_best = valid, macro_roc_auc(*scores_of(model, data["test"]))
    return test_at_best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--variants", default="mean,max,slots8-max,adaptive-max,enc-attention,"
                                               "slots8-enc-attention,adaptive-enc-attention")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = {split: load_split(args.shards, split) for split in ("train", "valid", "test")}
    first = data["train"][0]
    dims = {m: getattr(first, m).shape[-1] for m in MODALITIES}
    stats = load_feature_stats(args.shards)
    ref = json.loads((args.shards / "card.json").read_text())["reference_scorer"]
    oracle = (ref.get("oracle") or {}).get("macro_roc_auc")
    print(f"corpus {args.shards.name}: floor AUC {ref['fused']['macro_roc_auc']:.3f}, oracle AUC "
          f"{oracle if oracle is None else round(oracle, 3)}")
    print("| variant | test macro-AUC mean | stdev | seeds |\n| --- | --- | --- | --- |")
    for variant in args.variants.split(","):
        aucs = [run_variant(data, dims, stats, variant, seed, args) for seed in range(args.seeds)]
        print(f"| {variant} | {statistics.mean(aucs):.3f} | {statistics.pstdev(aucs):.3f} | {len(aucs)} |",
              flush=True)


if __name__ == "__main__":
    main()
