"""What CARAT does at initialisation, on one real training batch: the LSTM alignment's slot entropy and how
alike its aligned slots are, and each loss term's gradient norm on the encoders (BENCHMARKS.md, Learning).

    python bench/probe_init.py --shards shards --preset small [--model.aligner=lstm ...]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from carat.config import load_config
from carat.data.loader import build_loader
from carat.model import CARAT, CaratLoss


def alignment_report(model: CARAT, batch) -> dict[str, float]:
    """Per-frame slot entropy / log(slots + 1), LSTM logit std, mean cosine between aligned slots."""
    aligner = model.audio_align
    x = model._normalize_inputs("audio", batch.audio, batch.audio_mask)
    mask = batch.audio_mask
    lengths = mask.sum(1)
    out, _ = aligner.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    logits, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    probs = torch.softmax(logits, -1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(probs.shape[-1])
    assignment = probs[..., 1:] * mask[..., None]
    aligned = torch.bmm(assignment.transpose(1, 2), x)
    cosine = F.cosine_similarity(aligned[:, :, None], aligned[:, None], dim=-1)
    return {"slot_entropy": float(entropy[mask].mean()), "logit_std": float(logits[mask].std()),
            "aligned_slot_cosine": float(cosine.mean()), "aligned_norm": float(aligned.norm(dim=-1).mean()),
            "frame_norm": float(x[mask].norm(dim=-1).mean())}


def gradient_report(model: CARAT, loss_fn: CaratLoss, batch) -> dict[str, tuple[float, float]]:
    """(weight, norm of the weighted term's gradient on the three encoders) per loss term."""
    model.train()
    out = model(**batch.model_inputs(), sample_weight=batch.weight)
    terms = loss_fn(model, out, batch.labels, sample_weight=batch.weight)
    encoders = [p for n, p in model.named_parameters() if "_encoder." in n]
    report = {}
    for name, weight in loss_fn.term_weights.items():
        if weight == 0:
            continue
        grads = torch.autograd.grad(terms[name] * weight, encoders, retain_graph=True, allow_unused=True)
        report[name] = (weight, float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--preset", default="small")
    args, overrides = parser.parse_known_args()
    torch.manual_seed(0)
    cfg = load_config(preset=args.preset, overrides=overrides)
    model = CARAT.from_config(cfg.model)
    if cfg.model.standardize_features:
        from carat.data.featstats import load_feature_stats

        model.set_feature_stats(load_feature_stats(args.shards))
    loss_fn = CaratLoss.from_config(cfg.loss, cfg.model)
    batch = next(iter(build_loader(args.shards, "train", cfg.loader, rank=0, world_size=1, epoch=0, train=True)))
    print(f"batch of {len(batch)} clips, audio {tuple(batch.audio.shape)}")
    if cfg.model.aligner == "lstm":
        with torch.no_grad():
            for key, value in alignment_report(model, batch).items():
                print(f"alignment {key:20s} {value:.4f}")
    for name, (weight, norm) in gradient_report(model, loss_fn, batch).items():
        print(f"term {name:16s} weight {weight:5.2f}  |d(weight*term)/d(encoders)| = {norm:.3f}")


if __name__ == "__main__":
    main()
