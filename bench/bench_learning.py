"""Does CARAT learn? Floor < model < oracle on several synthetic corpora, and what each part of CARAT buys.

For every corpus (synthetic, varied in seed, signal strength, which modality carries which emotion and feature
scales; some written as CMU-MultimodalSDK .csd files and read back through ``prepare --source csd``, the path a
user's data takes) and preset, one run of the real training loop (``python -m carat.train --launcher none``;
under the small preset a seed ensemble of three, ``train.ensemble_size``)
and a row: the card's pooled logistic-regression floor, predicting every emotion, the model, the oracle (a
scorer that knows the planted signal), epochs and wall time. Then an ablation table on the first corpus: the
reference model and objective, BCE only, + reconstruction, + SupCon, the full fixed objective, and the full one
with each model fix undone (LSTM aligner, max fusion, no standardisation).

F1 is on the test split, for the model, the floor and the oracle alike: micro-F1 at one shared threshold and
macro-F1 at per-emotion thresholds, each tuned on valid (an older card or run is compared under the per-emotion
rule for both); AUC is the test macro ROC-AUC.

    python bench/bench_learning.py --preset tiny --out /tmp/learning            # ~15 min on 2 cores
    python bench/bench_learning.py --preset small --corpora default --ablations none
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from carat.data.sources.synth import TINY_OVERRIDES as TINY_SYNTH
from carat.metrics import card_references, compared_micro_rule, model_tuned_pair

CORPORA: dict[str, dict[str, object]] = {
    "default": {"seed": 0},
    "shuffled-s1": {"seed": 1, "cue_layout": "shuffled"},
    "wide-scales-s2-csd": {"seed": 2, "feature_scale_spread": 2.0, "feature_mean_spread": 2.0, "csd": True},
    "weak-shuffled-s3-csd": {"seed": 3, "cue_layout": "shuffled", "cue_strength": 4.0, "csd": True},
    "strong-s4": {"seed": 4, "cue_strength": 7.0, "label_noise": 0.05},
}
"""Corpus variants: name -> SynthConfig overrides (plus ``csd``: export as .csd and prepare it)."""

CORPUS_SIZE: dict[str, dict[str, float]] = {
    "tiny": {k: float(TINY_SYNTH[k]) for k in ("scale", "length_scale")},  # the quickstart corpus' size
    "small": {"scale": 0.1, "length_scale": 0.25},
}

OFF = ["--model.aligner=lstm", "--model.standardize_features=false", "--model.modality_fusion=max",
       "--model.input_dropout=0", "--model.prototype_temperature=1", "--model.score_rule=reference",
       "--loss.detach_recon_targets=false", "--loss.cl_weight=1", "--loss.lsr_clf_weight=0.01"]
BCE_ONLY = ["--loss.cl_weight=0", "--loss.recon_mse_weight=0", "--loss.aug_mse_weight=0",
            "--loss.shuffle_aug_clf_weight=0", "--loss.aug_clf_weight=0"]
ABLATIONS: dict[str, list[str]] = {
    "reference model + objective (preset sizes)": OFF,
    "fixed model, BCE only": BCE_ONLY,
    "fixed, BCE + reconstruction": ["--loss.cl_weight=0", "--loss.shuffle_aug_clf_weight=0"],
    "fixed, BCE + SupCon": ["--loss.recon_mse_weight=0", "--loss.aug_mse_weight=0"],
    "fixed, full objective (the preset)": [],
    "full, LSTM aligner": ["--model.aligner=lstm"],
    "full, the seed's slot ratios (1/3 visual, 1/10 audio)": ["--model.visual_compression_ratio=0.333",
                                                              "--model.audio_compression_ratio=0.1"],
    "full, max over modalities": ["--model.modality_fusion=max"],
    "full, no feature standardisation": ["--model.standardize_features=false"],
    "full, reference score rule": ["--model.score_rule=reference"],
}


@dataclass
class Row:
    corpus: str
    preset: str
    variant: str
    floor: tuple[float, float]
    predict_all: tuple[float, float]
    oracle: tuple[float, float] | None
    model: tuple[float, float]
    model_auc: float | None
    floor_auc: float | None
    oracle_auc: float | None
    best_epoch: str
    """The best epoch; for a seed ensemble (train.ensemble_size) each member's, joined by '+'."""
    epochs: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def margin(self) -> tuple[float, float]:
        return (self.model[0] - self.floor[0], self.model[1] - self.floor[1])


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def make_corpus(work: Path, name: str, preset: str) -> Path:
    """Synthesize (or export as .csd and prepare) one corpus variant; reused when already there."""
    spec = dict(CORPORA[name])
    csd = bool(spec.pop("csd", False))
    size = CORPUS_SIZE[preset]
    # The size is in the name: a reused work directory must never hand a new preset size an old corpus.
    out = work / "corpora" / f"{name}-{preset}-s{size['scale']:g}-l{size['length_scale']:g}"
    if (out / "card.json").is_file():
        return out
    flags = [f"--scale={size['scale']}", f"--length-scale={size['length_scale']}", f"--seed={spec.pop('seed')}"]
    flags += [f"--synth.{k}={v}" for k, v in spec.items()]  # cue_layout, cue_strength, label_noise ...
    out.parent.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if csd:
        raw = out.with_name(out.name + "-csd")
        run([py, "-m", "carat.data", "synth", "--format", "csd", "--out", str(raw), *flags, "--no-progress"],
            out.with_suffix(".synth.log"))
        run([py, "-m", "carat.data", "prepare", "--source", "csd", "--input", str(raw), "--out", str(out),
             "--dtype", "float32", "--no-progress"], out.with_suffix(".prepare.log"))
    else:
        run([py, "-m", "carat.data", "synth", "--out", str(out), *flags, "--dtype", "float32", "--no-progress"],
            out.with_suffix(".synth.log"))
    return out


def _pair(block: dict | None) -> tuple[float, float] | None:
    return None if not block else (float(block["micro_f1"]), float(block["macro_f1"]))


def train_once(work: Path, corpus: Path, corpus_name: str, preset: str, variant: str, extra: list[str]) -> Row:
    slug = "".join(c if c.isalnum() else "-" for c in f"{corpus.name}-{variant}")[:80]
    storage = work / "runs"
    cmd = [sys.executable, "-m", "carat.train", "--preset", preset, "--launcher", "none",
           f"--train.shard_dir={corpus}", f"--train.storage_path={storage}", f"--run-name={slug}", *extra]
    start = time.perf_counter()
    results_file = storage / slug / "results.json"
    if not results_file.is_file():
        run(cmd, work / f"{slug}.log")
    seconds = time.perf_counter() - start
    results = json.loads(results_file.read_text())
    card = json.loads((corpus / "card.json").read_text())
    ref = card["reference_scorer"]
    oracle = ref.get("oracle") or {}
    members = [storage / slug / "members" / m["name"] for m in results.get("members", [])]
    history = [json.loads(line) for line in ((members or [storage / slug])[0] / "history.jsonl").read_text()
               .splitlines() if line]
    best = "+".join(str(m["best_epoch"]) for m in results["members"]) if members else str(results["best_epoch"])
    # Like with like, as the run's verdict: micro-F1 at one shared threshold, macro-F1 at per-emotion ones.
    rule = compared_micro_rule(results, card)
    refs = card_references(card, rule)
    tuned = model_tuned_pair(results, rule) or results["test"]
    return Row(corpus=corpus_name, preset=preset, variant=variant,
               floor=_pair(refs["floor"]), predict_all=_pair(refs["all_positive"]),
               oracle=_pair(refs["oracle"]), model=_pair(tuned),
               model_auc=results["test"].get("macro_auc"), floor_auc=ref["fused"].get("macro_roc_auc"),
               oracle_auc=oracle.get("macro_roc_auc"), best_epoch=best,
               epochs=len(history), seconds=round(seconds, 1))


def fmt(pair: tuple[float, float] | None) -> str:
    return "-" if pair is None else f"{pair[0]:.3f} / {pair[1]:.3f}"


def fmt_auc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def corpus_table(rows: list[Row]) -> str:
    lines = ["| corpus | preset | floor | predict-all | model | oracle | AUC floor / model / oracle | margin | "
             "best / epochs | wall s |", "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r.corpus} | {r.preset} | {fmt(r.floor)} | {fmt(r.predict_all)} | {fmt(r.model)} | "
                     f"{fmt(r.oracle)} | {fmt_auc(r.floor_auc)} / {fmt_auc(r.model_auc)} / {fmt_auc(r.oracle_auc)} | "
                     f"{r.margin[0]:+.3f} / {r.margin[1]:+.3f} | {r.best_epoch} / {r.epochs} | {r.seconds:.0f} |")
    if len(rows) > 1:
        micro = [r.margin[0] for r in rows]
        macro = [r.margin[1] for r in rows]
        lines.append(f"\nmargin over the floor (micro / macro F1): mean {statistics.mean(micro):+.3f} / "
                     f"{statistics.mean(macro):+.3f}, spread (stdev) {statistics.pstdev(micro):.3f} / "
                     f"{statistics.pstdev(macro):.3f}, min {min(micro):+.3f} / {min(macro):+.3f}")
    return "\n".join(lines)


def ablation_table(rows: list[Row]) -> str:
    lines = ["| variant | model micro / macro F1 | AUC | margin over floor | wall s |", "|" + " --- |" * 5]
    for r in rows:
        lines.append(f"| {r.variant} | {fmt(r.model)} | {fmt_auc(r.model_auc)} | "
                     f"{r.margin[0]:+.3f} / {r.margin[1]:+.3f} | {r.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(CORPUS_SIZE))
    parser.add_argument("--corpora", default=",".join(CORPORA), help=f"comma list of {', '.join(CORPORA)}")
    parser.add_argument("--ablations", default="all", help="'all', 'none' or a comma list of variant numbers")
    parser.add_argument("--out", type=Path, default=Path("/tmp/carat-bench-learning"))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="overrides passed to every training run (e.g. --train.epochs=4)")
    args = parser.parse_args(argv)
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    names = [c for c in args.corpora.split(",") if c]
    rows = []
    for name in names:
        corpus = make_corpus(work, name, args.preset)
        rows.append(train_once(work, corpus, name, args.preset, "preset", args.extra))
        print(corpus_table(rows[-1:]).splitlines()[-1], flush=True)
    report = {"preset": args.preset, "corpora": [asdict(r) for r in rows]}
    text = "## corpora\n\n" + corpus_table(rows)
    keys = list(ABLATIONS)
    chosen = [] if args.ablations == "none" else keys if args.ablations == "all" else \
        [keys[int(i)] for i in args.ablations.split(",")]
    if chosen:
        corpus = make_corpus(work, names[0], args.preset)
        ablations = []
        for variant in chosen:
            ablations.append(train_once(work, corpus, names[0], args.preset, variant, ABLATIONS[variant] + args.extra))
            print(ablation_table(ablations[-1:]).splitlines()[-1], flush=True)
        report["ablations"] = [asdict(r) for r in ablations]
        text += f"\n\n## ablations on {names[0]} ({args.preset})\n\n" + ablation_table(ablations)
    (work / "learning.json").write_text(json.dumps(report, indent=2))
    (work / "learning.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
