"""Results: what a finished run (one model or a seed ensemble) reports, judged against its corpus' dataset card.

One home for the figures of results.json (valid and test scores at the model threshold and at thresholds tuned
on valid, :func:`assemble_results`), the judgement next to the card's floors (:func:`judge`: the verdict, the
trivial-floor flag and the warnings), the files (:func:`write_results_files`: results.json, results.txt) and the
summary a command prints at the end (:func:`summary_lines`). The training loop and :mod:`carat.ensemble` build
their results here; ``python -m carat.train`` prints them from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from carat.metrics import (
    SUMMARY_METRICS, card_prior, card_references, format_results_table, format_verdict, result_warnings,
    results_columns, split_results, verdict,
)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def assemble_results(valid: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], threshold: float,
                     tune: bool, card: Mapping, **extra: Any) -> dict[str, Any]:
    """The scored figures (the label prior from the card's train split, the verdict's input-independent
    baseline) followed by ``extra`` (who trained it, where)."""
    return {**split_results(valid, test, threshold, tune, prior=card_prior(card)), **extra}


def trivial_floor_flags(results: Mapping[str, Any], card: Mapping) -> bool | None:
    """Whether the model's test micro-F1 is not above predicting every emotion (the card's trivial floor),
    at the model threshold and, when tuned, at thresholds tuned on valid: True when either is. None when
    the card has no such baseline. (:func:`carat.metrics.result_warnings` words the same finding.)"""
    baseline = card_references(card)["all_positive"]
    if baseline is None:
        return None
    scores = [results[k]["micro_f1"] for k in ("test", "test_tuned") if isinstance(results.get(k), dict)
              and "micro_f1" in results[k]]
    return any(float(v) <= float(baseline["micro_f1"]) for v in scores)


def judge(results: dict[str, Any], card: Mapping) -> list[str]:
    """Put the verdict and the trivial-floor flag into ``results``; return the end-of-run warnings."""
    judged = verdict(results, card)
    if judged is not None:
        results["verdict"] = judged
    trivial = trivial_floor_flags(results, card)
    if trivial is not None:
        results["below_trivial_floor"] = trivial
    return result_warnings(results, card)


def write_results_files(results: Mapping[str, Any], results_json: Path, results_txt: Path, threshold: float,
                        heading: str | None = None) -> None:
    """results.json and results.txt (the table, under ``heading`` when given), each written atomically."""
    from carat.atomic import write_text_atomic
    from carat.train.rundir import write_json_atomic

    write_json_atomic(results_json, results)
    table = format_results_table(results_columns(results, threshold), metrics=(*SUMMARY_METRICS, "macro_auc"))
    write_text_atomic(results_txt, (f"{heading}\n" if heading else "") + table + "\n")


def reference_floor(card: Mapping) -> str | None:
    """The dataset card's baselines on the test split: the floor every training run should beat."""
    refs = card_references(card)
    fused, everything = refs["floor"], refs["all_positive"]
    if not fused or not everything:
        return None
    return (f"[carat] test-split floors from the dataset card: logistic regression on pooled features "
            f"micro-F1 {fused['micro_f1']:.4f} / macro-F1 {fused['macro_f1']:.4f} (tuned on valid); "
            f"predicting every emotion "
            f"micro-F1 {everything['micro_f1']:.4f} / macro-F1 {everything['macro_f1']:.4f}")


def summary_lines(run_dir: Path) -> list[str]:
    """What a command prints at a run's end: the results table, the card's floors, the verdict, every warning
    (repeated here: under Ray they scroll by in worker logs) and where the run is."""
    lines = []
    table = run_dir / "results.txt"
    if table.is_file():
        lines.append(table.read_text())
    card = read_json(run_dir / "card.json")
    floor = reference_floor(card)
    if floor:
        lines.append(floor)
    results = read_json(run_dir / "results.json")
    judged = results.get("verdict") or verdict(results, card)
    if judged:
        lines.append(format_verdict(judged))
    lines += [f"[carat] warning: {message}" for message in results.get("warnings", [])]
    lines.append(f"[carat] run directory: {run_dir}")
    return lines
