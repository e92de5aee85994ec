"""SupCon forward + backward: carat's per-class-sum form (carat.model.losses.supcon_loss) against the element-wise
form with N x N masks that carat used before (kept here as the comparison), in one run, as a ratio
(results: BENCHMARKS.md, ``## Model``, "SupCon").

    OMP_NUM_THREADS=1 nice python bench/bench_supcon.py [--repeats 5] [--json out.json]

Row counts N = queue rows + batch x 54 (9 stages x 6 labels per clip): the tiny preset (256-row queue, 16 clips
per rank), the small preset (1,024, 16) and the seed (8,192-row queue at batch 2 and at batch 64). Both forms
see the same features, ids and valid mask (a full queue: every row valid); the two are timed alternately, so
the machine's load hits both alike. Also reported: the largest difference in loss and gradient between them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from carat.model.losses import supcon_loss

ROWS_PER_CLIP = 54
CASES = {"tiny": (256, 16, 8), "small": (1024, 16, 16), "seed-b2": (8192, 2, 64), "seed-b64": (8192, 64, 64)}
"""name -> (queue rows, clips per step, projection size)."""


def elementwise_anchor_sum(features, ids, valid, start, stop, temperature, base_temperature):
    """carat's earlier anchor sum: logits, masks, exp and log-probabilities all N x N element-wise."""
    logits = features[start:stop] @ features.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    rows = torch.arange(start, stop)
    not_self = rows[:, None] != torch.arange(features.shape[0])[None, :]
    contrast = not_self & valid[None, :]
    denominator = torch.where(contrast, logits.exp(), 0.0).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(denominator + 1e-12)
    anchor_ids = ids[start:stop]
    positive = contrast & (anchor_ids[:, None] == ids[None, :]) & (anchor_ids != -1)[:, None]
    num_positive = positive.sum(dim=1)
    mean_log_prob_pos = torch.where(positive, log_prob, 0.0).sum(dim=1) / (num_positive + 1e-12)
    per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
    return torch.where(valid[start:stop], per_anchor, 0.0).sum()


def elementwise_supcon(features, ids, valid, temperature, base_temperature, chunk_rows=2048):
    n = features.shape[0]
    total = features.new_zeros(())
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        args = (features, ids, valid, start, stop, temperature, base_temperature)
        if n > chunk_rows:
            total = total + checkpoint(elementwise_anchor_sum, *args, use_reentrant=False)
        else:
            total = total + elementwise_anchor_sum(*args)
    return total / valid.sum().clamp_min(1)


def inputs(queue: int, clips: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = queue + clips * ROWS_PER_CLIP
    raw = torch.randn(n, dim, generator=g)
    ids = torch.randint(0, 36, (n,), generator=g)
    return raw, ids, torch.ones(n, dtype=torch.bool)


def step(fn, raw, ids, valid):
    leaf = raw.clone().requires_grad_(True)
    t0 = time.perf_counter()
    loss = fn(F.normalize(leaf, dim=1), ids, valid, 0.07, 0.07)
    loss.backward()
    return time.perf_counter() - t0, loss.detach(), leaf.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| case | N rows | element-wise ms | per-class-sum ms | speed-up | max loss diff | max grad diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases:
        queue, clips, dim = CASES[name]
        raw, ids, valid = inputs(queue, clips, dim)
        times = {"elementwise": [], "classsum": []}
        step(elementwise_supcon, raw, ids, valid)  # warm-up
        step(supcon_loss, raw, ids, valid)
        for _ in range(args.repeats):
            t_old, loss_old, grad_old = step(elementwise_supcon, raw, ids, valid)
            t_new, loss_new, grad_new = step(supcon_loss, raw, ids, valid)
            times["elementwise"].append(t_old)
            times["classsum"].append(t_new)
        old_ms, new_ms = (1e3 * statistics.median(times[k]) for k in ("elementwise", "classsum"))
        row = {"case": name, "rows": raw.shape[0], "elementwise_ms": old_ms, "classsum_ms": new_ms,
               "speedup": old_ms / new_ms, "loss_diff": float((loss_old - loss_new).abs()),
               "grad_diff": float((grad_old - grad_new).abs().max())}
        rows.append(row)
        print(f"| {name} | {row['rows']} | {old_ms:.1f} | {new_ms:.1f} | {row['speedup']:.2f} | "
              f"{row['loss_diff']:.2e} | {row['grad_diff']:.2e} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
