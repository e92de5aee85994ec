"""Which modality does a trained model use? Test macro-AUC (and per emotion) with each modality, and each pair,
replaced by its train mean (standardised value 0 at every real frame), from a run's best model.

    python bench/probe_modalities.py RUN_DIR        # a run of a preset with model.standardize_features=true

Results: BENCHMARKS.md, Learning, 2026-12-04.
"""
import sys
from pathlib import Path
import torch
from carat.export import load_model
from carat.data.loader import build_loader
from carat.evaluate import collect_scores
from carat.metrics import macro_roc_auc, roc_auc

run = Path(sys.argv[1])
model, cfg = load_model(run, None)
model.eval()
shards = Path(cfg.train.shard_dir)
def score(neutral):
    loader = build_loader(shards, "test", cfg.loader, rank=0, world_size=1, epoch=0, train=False)
    def f(batch):
        inputs = batch.model_inputs()
        for m in neutral:
            mean = getattr(model, f"{m}_standardize").mean
            inputs[m] = mean.expand_as(inputs[m]).clone() * inputs[f"{m}_mask"][..., None]
        return model.scores(model(**inputs))
    return collect_scores(loader, torch.device("cpu"), f)
for neutral in [(), ("text",), ("visual",), ("audio",), ("visual", "audio"), ("text", "audio"), ("text", "visual")]:
    p = score(neutral)
    per = [roc_auc(p["labels"][:, c], p["scores"][:, c]) for c in range(6)]
    print(f"without {'+'.join(neutral) or 'nothing':<14} macro-AUC {macro_roc_auc(p['labels'], p['scores']):.3f}  per emotion "
          + " ".join(f"{a:.3f}" for a in per), flush=True)
